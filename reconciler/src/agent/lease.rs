//! The host lease: one live agent per host name (safety rule 8).
//!
//! The lease is one job in tube [`TUBE`] of the host's own beanstalkd, held reserved by
//! the agent on a connection of its own and touched well within its time-to-run. A job
//! reserved on one connection belongs to that connection only, so a second agent cannot
//! take it while the first lives. beanstalkd gives the job back at once when the holder's
//! connection closes (the agent exits or is killed) and after [`TTR`] seconds when the
//! holder stops touching it without closing (a hung process, a cut network): a stale
//! lease clears within its TTR, and a new agent waits that long before it refuses.
//!
//! Acquiring: reserve a lease job if one is ready; if the tube has none at all, put one
//! and reserve. Two agents that both found the tube empty both put one: after reserving,
//! an agent counts the tube's jobs, and if there is more than its own it deletes its job
//! and tries again after a random pause. An agent that counted only its own holds the
//! lease; any later one sees that job reserved and eventually refuses.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beanstalk::{Client, Options, PutParams};
use tokio::sync::Notify;

use super::events::EventKind;
use super::identity::{self, AgentInfo};
use super::pace::Backoff;
use super::Shared;

/// The lease tube on every host's beanstalkd.
pub const TUBE: &str = "flotilla.lease";

/// The lease job's time-to-run (seconds): how long a holder that stopped touching keeps
/// it.
pub const TTR: u32 = 6;

/// How often the holder touches the lease job: twice within [`VALID_FOR`], and each
/// touch is a wake-up of an idle agent (issue 12).
pub const TOUCH_EVERY: Duration = Duration::from_secs(2);

/// How long the lease counts as held after a touch began: less than [`TTR`], so the agent
/// stops acting before beanstalkd could give the job to another.
pub const VALID_FOR: Duration = Duration::from_secs(TTR as u64 - 2);

/// How often an agent gives up its job after seeing another one beside it before it
/// gives up acquiring.
const MAX_COLLISIONS: u32 = 40;

/// Knobs of [`acquire`] (tests shorten them).
#[derive(Debug, Clone)]
pub struct Params {
    /// How long the lease must be seen held by another before refusing: longer than the
    /// TTR, so a holder that died without closing its connection is outlived.
    pub refuse_after: Duration,
    /// The TTR of a lease job put.
    pub ttr: u32,
    /// Largest random pause after a collision.
    pub max_pause: Duration,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            refuse_after: Duration::from_secs(TTR as u64 + 2),
            ttr: TTR,
            max_pause: Duration::from_millis(500),
        }
    }
}

/// Why acquiring failed, other than another holder.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// beanstalkd could not be used.
    #[error("lease on {addr}: {source}")]
    Queue {
        /// The beanstalkd.
        addr: String,
        /// The error.
        source: beanstalk::Error,
    },
    /// Every try collided with another agent's.
    #[error("lease on {0}: every try collided with another agent starting at the same time")]
    Collisions(String),
}

/// What [`acquire`] came to.
#[derive(Debug)]
pub enum Acquired {
    /// This agent holds the lease.
    Held(Box<Lease>),
    /// Another agent held it the whole [`Params::refuse_after`].
    Refused,
}

/// What an agent that has reserved a lease job does, given how many lease jobs (ready,
/// reserved or delayed) the tube holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Its job is the only one: it holds the lease.
    Hold,
    /// Another agent's job is there too: give this one up and try again.
    Yield,
}

/// The rule that settles two agents putting lease jobs at once. A holder that settled on
/// [`Settle::Hold`] never checks again: any job put later belongs to a newcomer, which
/// counts two and yields. Two newcomers may both yield; their random pauses part them.
pub fn settle(jobs_in_tube: u64) -> Settle {
    if jobs_in_tube <= 1 {
        Settle::Hold
    } else {
        Settle::Yield
    }
}

/// A held lease: the job, on the connection that reserved it.
#[derive(Debug)]
pub struct Lease {
    client: Client,
    job: u64,
    touched: Instant,
}

impl Lease {
    /// The lease job's id.
    pub fn job(&self) -> u64 {
        self.job
    }

    /// Until when the lease counts as held.
    pub fn valid_until(&self) -> Instant {
        self.touched + VALID_FOR
    }

    /// Restarts the job's TTR. An error means the lease is lost: the connection broke
    /// (a restarted beanstalkd) or the job is no longer this connection's.
    pub async fn touch(&mut self) -> Result<(), beanstalk::Error> {
        let started = Instant::now();
        self.client.touch(self.job).await?;
        self.touched = started;
        Ok(())
    }
}

async fn jobs(c: &mut Client) -> Result<u64, beanstalk::Error> {
    match c.stats_tube(TUBE).await {
        Ok(s) => Ok(s.current_jobs_ready + s.current_jobs_reserved + s.current_jobs_delayed),
        Err(beanstalk::Error::NotFound) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Takes the lease on the beanstalkd at `addr` for the agent `me` (the body of a job it
/// puts), or finds it held by another for [`Params::refuse_after`]. `random` gives the
/// pauses after collisions (any 64-bit values).
pub async fn acquire(
    addr: &str,
    me: &AgentInfo,
    params: &Params,
    random: &mut (dyn FnMut() -> u64 + Send),
) -> Result<Acquired, LeaseError> {
    let q = |source| LeaseError::Queue {
        addr: addr.to_string(),
        source,
    };
    let options = Options {
        call_timeout: Some(Duration::from_secs(3)),
        connect_timeout: Duration::from_secs(3),
    };
    let mut c = Client::connect_with(addr, options).await.map_err(q)?;
    c.use_tube(TUBE).await.map_err(q)?;
    c.watch(TUBE).await.map_err(q)?;
    c.ignore("default").await.map_err(q)?;
    let body = serde_json::to_vec(me).unwrap_or_default();
    let put = PutParams {
        pri: 0,
        delay: 0,
        ttr: params.ttr,
    };
    let mut held_since: Option<Instant> = None;
    let mut collisions = 0;
    loop {
        if let Some(job) = c.reserve_with_timeout(Duration::ZERO).await.map_err(q)? {
            let touched = Instant::now();
            match settle(jobs(&mut c).await.map_err(q)?) {
                Settle::Hold => {
                    return Ok(Acquired::Held(Box::new(Lease {
                        client: c,
                        job: job.id,
                        touched,
                    })))
                }
                Settle::Yield => {
                    match c.delete(job.id).await {
                        Ok(()) | Err(beanstalk::Error::NotFound) => {}
                        Err(e) => return Err(q(e)),
                    }
                    collisions += 1;
                    if collisions >= MAX_COLLISIONS {
                        return Err(LeaseError::Collisions(addr.to_string()));
                    }
                    let max = params.max_pause.as_millis().max(1) as u64;
                    tokio::time::sleep(Duration::from_millis(random() % max)).await;
                    continue;
                }
            }
        }
        if jobs(&mut c).await.map_err(q)? == 0 {
            held_since = None;
            c.put(&body, put).await.map_err(q)?;
            continue;
        }
        // Reserved by another connection (or put by an agent starting now, and taken
        // back by the next loop).
        let since = *held_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= params.refuse_after {
            return Ok(Acquired::Refused);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent's view of its lease, shared by its tasks.
#[derive(Debug, Default)]
pub struct LeaseCell {
    state: Mutex<LeaseState>,
    refused: Notify,
}

#[derive(Debug, Default)]
struct LeaseState {
    info: Option<AgentInfo>,
    valid_until: Option<Instant>,
    /// When the lease was taken, in seconds since the Unix epoch.
    since: u64,
    refusal: Option<String>,
}

impl LeaseCell {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this agent holds its host's lease now: nothing is emitted, reserved or
    /// published without it.
    pub fn held(&self) -> bool {
        self.state().valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// This agent as its inventory shows it (identity, lease job), once known.
    pub fn info(&self) -> Option<AgentInfo> {
        self.state().info.clone()
    }

    /// When the lease held now was taken (seconds since the Unix epoch).
    pub fn since(&self) -> u64 {
        self.state().since
    }

    /// Why this agent refused to run, once it has.
    pub fn refusal(&self) -> Option<String> {
        self.state().refusal.clone()
    }

    /// Resolves when the agent refuses to run.
    pub async fn refused(&self) {
        self.refused.notified().await
    }

    fn set(&self, info: Option<AgentInfo>, valid_until: Option<Instant>, since: Option<u64>) {
        let mut st = self.state();
        if info.is_some() {
            st.info = info;
        }
        st.valid_until = valid_until;
        if let Some(s) = since {
            st.since = s;
        }
    }

    fn refuse(&self, why: String) {
        self.state().valid_until = None;
        self.state().refusal = Some(why);
        self.refused.notify_one();
    }
}

/// The machine's name, for messages naming an agent.
fn machine() -> String {
    std::process::Command::new("hostname")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// This agent's identity and particulars; the identity lives in the backend's vm_dir
/// (the state directory for a backend without one).
async fn agent_info(shared: &Arc<Shared>) -> Result<AgentInfo, String> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        let dir = s
            .backend
            .identity_dir()
            .map_err(|e| format!("cannot find the vm_dir for the host identity: {e}"))?
            .unwrap_or_else(|| s.cfg.state_dir.clone());
        let identity = identity::load_or_create(&dir).map_err(|e| e.to_string())?;
        Ok(AgentInfo {
            identity,
            pid: std::process::id(),
            machine: machine(),
            state_dir: s.cfg.state_dir.display().to_string(),
            started_at: crate::message::now(),
            lease_job: None,
            conflicts: Default::default(),
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Who holds the lease on `addr`, as the host's published inventory names it.
async fn holder(shared: &Shared, addr: &str) -> String {
    let window = shared.cfg.message_window.0.as_secs();
    let read = shared
        .peers
        .inventory(addr, shared.me(), Some((&shared.keys, window)));
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok((Some(inv), _))) => match inv.agent {
            Some(a) => format!(
                "{a}{}",
                a.lease_job
                    .map(|j| format!(", lease job {j}"))
                    .unwrap_or_default()
            ),
            None => "an agent whose inventory does not name it (an older flotilla?)".into(),
        },
        _ => "an agent that has published no inventory yet".into(),
    }
}

/// Takes and keeps this host's lease for the agent's life. Until it is held nothing
/// acts; when it is lost (beanstalkd restarted, the job timed out) nothing acts until it
/// is held again; when another agent holds it, the agent refuses to run (see
/// [`LeaseCell::refused`]).
pub(super) async fn keep(shared: Arc<Shared>) {
    let info = loop {
        match agent_info(&shared).await {
            Ok(i) => break i,
            Err(e) => {
                shared.event(
                    EventKind::Error,
                    None,
                    None,
                    None,
                    format!("host identity: {e}"),
                );
                shared.sleep(Duration::from_secs(5)).await;
                if shared.stopping() {
                    return;
                }
            }
        }
    };
    let mut random = || uuid::Uuid::new_v4().as_u64_pair().0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        // A held lease is kept through a shutdown until the jobs in hand are done (the
        // task is then aborted, which closes its connection and frees the job).
        if shared.stopping() {
            return;
        }
        let Some(addr) = shared.own_addr() else {
            shared.sleep(Duration::from_millis(200)).await;
            continue;
        };
        match acquire(&addr, &info, &Params::default(), &mut random).await {
            Ok(Acquired::Held(mut lease)) => {
                backoff.succeeded();
                let mine = AgentInfo {
                    lease_job: Some(lease.job()),
                    ..info.clone()
                };
                shared.lease.set(
                    Some(mine),
                    Some(lease.valid_until()),
                    Some(crate::message::now()),
                );
                shared.event(
                    EventKind::Lease,
                    None,
                    None,
                    None,
                    format!(
                        "holding the lease of host {} on {addr} (job {}, identity {})",
                        shared.me(),
                        lease.job(),
                        info.identity
                    ),
                );
                shared.wake_reconcile.notify_one();
                shared.wake_publish.notify_one();
                loop {
                    tokio::time::sleep(TOUCH_EVERY).await;
                    match lease.touch().await {
                        Ok(()) => shared.lease.set(None, Some(lease.valid_until()), None),
                        Err(e) => {
                            shared.lease.set(None, None, None);
                            shared.event(
                                EventKind::Error,
                                None,
                                None,
                                None,
                                format!("lost the host lease on {addr}: {e}; acting on nothing until it is held again"),
                            );
                            break;
                        }
                    }
                }
            }
            Ok(Acquired::Refused) => {
                let who = holder(&shared, &addr).await;
                let why = format!(
                    "another agent is live for host {} (its lease on {addr}, tube {TUBE}, is held): {who}; this agent (pid {}, state_dir {}) refuses to act",
                    shared.me(),
                    std::process::id(),
                    shared.cfg.state_dir.display()
                );
                shared.event(EventKind::Refused, None, None, None, why.clone());
                shared.lease.refuse(why);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the host lease; retrying");
                shared.sleep(backoff.failed()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beanstalk::testing::Beanstalkd;

    fn info(pid: u32) -> AgentInfo {
        AgentInfo {
            identity: format!("id-{pid}"),
            pid,
            machine: "m".into(),
            state_dir: format!("/state/{pid}"),
            started_at: 0,
            lease_job: None,
            conflicts: Default::default(),
        }
    }

    fn quick() -> Params {
        Params {
            refuse_after: Duration::from_secs(1),
            ttr: 30,
            max_pause: Duration::from_millis(200),
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> u64 + Send {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Guards issue 11, hole 3: a job put later than the holder's makes the newcomer
    /// yield; only a lone job is held.
    #[test]
    fn only_a_lone_lease_job_is_held() {
        assert_eq!(settle(0), Settle::Hold);
        assert_eq!(settle(1), Settle::Hold);
        assert_eq!(settle(2), Settle::Yield);
        assert_eq!(settle(5), Settle::Yield);
    }

    /// Guards issue 11, hole 3, the start-up race: agents that start at the same moment
    /// on one empty beanstalkd (each may find the tube empty and put a job) end with
    /// exactly one holder; every other one refuses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn agents_starting_at_once_end_with_exactly_one_holder() {
        for round in 0..3u64 {
            let server = Beanstalkd::start().expect("beanstalkd");
            let addr = server.addr().to_string();
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(4));
            let mut tasks = Vec::new();
            for n in 0..4u32 {
                let addr = addr.clone();
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    let mut r = rng(round * 10 + u64::from(n));
                    barrier.wait().await;
                    acquire(&addr, &info(n), &quick(), &mut r).await
                }));
            }
            let mut held = Vec::new();
            let mut refused = 0;
            for t in tasks {
                match t.await.unwrap().expect("no queue error") {
                    Acquired::Held(l) => held.push(l),
                    Acquired::Refused => refused += 1,
                }
            }
            assert_eq!(held.len(), 1, "round {round}: one holder");
            assert_eq!(refused, 3);
            // The holder keeps it by touching; a newcomer then still refuses.
            let mut l = held.pop().unwrap();
            l.touch().await.expect("touch");
            let mut r = rng(99);
            let late = acquire(&addr, &info(9), &quick(), &mut r).await.unwrap();
            assert!(matches!(late, Acquired::Refused));
            l.touch().await.expect("still held");
            // Its connection closed (the agent stopped): the next agent takes it at once.
            drop(l);
            let next = acquire(&addr, &info(10), &quick(), &mut r).await.unwrap();
            assert!(matches!(next, Acquired::Held(_)));
        }
    }

    /// Guards issue 11, hole 3: a holder whose connection closes (killed) leaves the job
    /// to the next agent at once; the lease lost on a restarted beanstalkd shows as a
    /// failed touch.
    #[tokio::test]
    async fn a_dead_holders_lease_is_taken_and_a_lost_one_fails_to_touch() {
        let mut server = Beanstalkd::start().expect("beanstalkd");
        let addr = server.addr().to_string();
        let mut r = rng(1);
        let Acquired::Held(first) = acquire(&addr, &info(1), &quick(), &mut r).await.unwrap()
        else {
            panic!("first agent holds");
        };
        drop(first);
        let started = Instant::now();
        let Acquired::Held(mut second) = acquire(&addr, &info(2), &quick(), &mut r).await.unwrap()
        else {
            panic!("second agent holds after the first is gone");
        };
        assert!(started.elapsed() < Duration::from_secs(1), "at once");
        server.restart().expect("restart beanstalkd");
        assert!(second.touch().await.is_err(), "the lease is lost");
    }
}
