//! An async [beanstalkd](https://beanstalkd.github.io/) client for tokio, covering the
//! whole 1.12 protocol.
//!
//! - [`Client`] has one typed method per command: producer (`use`, `put`, pipelined
//!   [`Client::put_many`]), worker (`watch`, `ignore`, `reserve`, `reserve-with-timeout`,
//!   `reserve-job`, `delete`, `release`, `bury`, `touch`) and admin (`peek*`, `kick*`,
//!   `stats*` parsed into typed structs, `list-tube*`, `pause-tube`).
//! - Every answer the server can give has a typed outcome or an [`Error`] variant.
//! - Tube names and body sizes are checked before anything is sent.
//! - A connection that drops or loses sync is replaced on the next call, with its used and
//!   watched tubes restored; every call can be bounded by a timeout ([`Options`]).
//! - [`proto`] is the wire format on its own (no I/O), for tests and other transports.
//! - Feature `mem`: `mem::MemServer`, an in-memory beanstalkd with the same semantics and
//!   a client with the same methods, for deterministic simulations on tokio's clock.
//!
//! ```no_run
//! # async fn demo() -> Result<(), beanstalk::Error> {
//! use beanstalk::{Client, PutJob, PutParams};
//!
//! let mut client = Client::connect("127.0.0.1:11300").await?;
//! client.use_tube("emails").await?;
//! let bodies: Vec<Vec<u8>> = (0..1000).map(|i| format!("mail {i}").into_bytes()).collect();
//! let jobs: Vec<PutJob<'_>> = bodies.iter().map(|b| PutJob::new(b, PutParams::default())).collect();
//! for outcome in client.put_many(&jobs).await? {
//!     let id = outcome?;
//!     # let _ = id;
//! }
//! let stats = client.stats_tube("emails").await?;
//! assert!(stats.current_jobs_ready >= 1000);
//! # Ok(()) }
//! ```

mod client;
mod conn;
mod error;
pub mod proto;
pub mod stats;
mod tube;

pub use client::{Client, Job, Options, PutJob, PutParams};
pub use error::Error;
pub use stats::{JobStats, ServerStats, StatsError, TubeStats};
pub use tube::{check_tube, TubeError, MAX_TUBE_LEN};

#[cfg(feature = "mem")]
pub mod mem;
#[cfg(feature = "testing")]
pub mod testing;
