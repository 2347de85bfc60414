//! Development tools for flotilla, never part of what is shipped: `cargo tree -e normal
//! -p flotilla` shows none of this crate.
//!
//! - [`sim`]: `vm-sim`, a stand-in for vm-bhyve's `vm` (and `sysrc`) command line;
//! - [`bhyve_model`]: `SimBhyve`, an in-memory vm-bhyve host for simulations;
//! - [`lab`]: a whole cluster on one machine (real beanstalkd, git and `flotilla agent`
//!   processes over `vm-sim`), run by `flotilla-demo`, the end-to-end tests and the
//!   cluster benchmark.

pub mod bhyve_model;
pub mod lab;
pub mod sim;
