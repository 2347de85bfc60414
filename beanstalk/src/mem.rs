//! An in-memory beanstalkd (feature `mem`) for deterministic simulations: [`MemServer`]
//! holds the jobs and tubes, [`MemClient`] is a connection to it with the same async
//! methods, signatures and [`Error`] variants as [`Client`](crate::Client).
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so under a paused runtime delays,
//! TTRs, reserve timeouts and tube pauses run in virtual time, and the whole server is
//! deterministic: no threads, no randomness, ordered maps only. Many servers live in one
//! process (one per simulated host); a [`MemServer`] is a cheap handle (clone it).
//!
//! # Semantics (those of beanstalkd 1.12; checked by `tests/conformance.rs`, which runs
//! the same tests against a real server)
//! - `reserve` takes the ready job with the lowest (priority, id) over the watched tubes
//!   that are not paused. A job that becomes ready while connections wait goes to the one
//!   that has waited longest among those watching its tube.
//! - A reserved job whose TTR (at least 1 s) runs out becomes ready again; a connection
//!   waiting in `reserve` while one of its own jobs is within 1 s of its TTR gets
//!   `DEADLINE_SOON` ([`Error::DeadlineSoon`]), and so does a `reserve` that starts then
//!   with no job ready for it.
//! - `release`, `bury` and `touch` work only on a job reserved by the same connection;
//!   `delete` on any job not reserved by another connection; `reserve-job` on a ready,
//!   delayed or buried job; `kick-job` on a buried or delayed job in any tube; `kick` on
//!   the used tube's buried jobs, or its delayed ones when none is buried. Anything else
//!   is `NOT_FOUND` ([`Error::NotFound`]).
//! - `peek-ready`, `peek-delayed` and `peek-buried` look at the used tube; `peek <id>` at
//!   any job. A tube exists while it is `default`, used or watched by a connection, or
//!   holds a job; when it disappears its counters go with it.
//! - Closing a connection (dropping the client, a cancelled call, [`MemServer::drop_connection`])
//!   makes its reserved jobs ready.
//! - Job ids increase per server. [`MemServer::restart`] breaks every connection; with a
//!   binlog ([`MemConfig::binlog`]) the jobs are kept as their last binlog record has
//!   them (written on put, bury, kick and a delayed release: a plain release's new
//!   priority and the reserve counts since are lost), reserved ones become ready, delayed
//!   and buried ones keep their state, ids continue, tube counters and pauses start
//!   again; without one everything is gone and ids start again at 1.
//! - A stopped server refuses connections: calls fail with [`Error::Connect`], as the real
//!   client's do once it has seen the connection close.
//!
//! The client side behaves like [`Client`](crate::Client): after a broken connection the
//! next call opens a new one and restores the used and watched tubes; a call whose
//! connection broke before it was answered is retried once if it is safe to repeat; a
//! cancelled call costs the connection.
//!
//! # Fault hooks
//! [`MemServer::drop_connection`] / [`MemServer::drop_all_connections`] cut connections
//! (a call in flight sees [`Error::Closed`]); [`MemServer::set_latency`] makes every call
//! wait before the server applies it (a call cancelled meanwhile is not applied);
//! [`MemServer::on_put`] decides per put whether it is stored twice or only becomes
//! visible later ([`PutFault`]).
//!
//! # Known differences from a real server
//! - `stats` (server-wide), `put_many`, `pipeline` and drain mode are not provided.
//! - The real server releases an expired job on its next tick, a moment after the TTR;
//!   here it is exact (the conformance tests poll for the real server).
//! - Without latency, no call is ever "in flight" except a waiting `reserve`, so a
//!   connection drop never hits a put half-way; use [`MemServer::set_latency`] for that.
//! - The binlog never loses an acknowledged write (no fsync lag).
//! - Lookups scan the jobs (fine for the few hundred a simulation holds).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{Job, Options, PutParams};
use crate::error::Error;
use crate::stats::{JobStats, TubeStats};
use crate::tube::check_tube;

/// One second: how close to its TTR a reserved job must be for `DEADLINE_SOON`.
const SAFETY_MARGIN: Duration = Duration::from_secs(1);

/// Priorities below this count as urgent in the stats.
const URGENT: u32 = 1024;

/// How a [`MemServer`] is configured.
#[derive(Debug, Clone)]
pub struct MemConfig {
    /// Keep jobs across [`MemServer::restart`], as `beanstalkd -b` does.
    pub binlog: bool,
    /// The largest job body in bytes (beanstalkd's default is 65535).
    pub max_job_size: u64,
}

impl Default for MemConfig {
    /// No binlog, 65535 bytes.
    fn default() -> MemConfig {
        MemConfig {
            binlog: false,
            max_job_size: 65535,
        }
    }
}

/// What happens to one put (see [`MemServer::on_put`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutFault {
    /// Stored once, at once.
    None,
    /// Stored twice under two ids (the client is told the first), as a put that was
    /// sent again after a lost answer would be.
    Duplicate,
    /// Answered at once, but nobody sees the job (reserve, peek, stats) for this long:
    /// a delivery that arrives late.
    Delay(Duration),
}

/// The hook of [`MemServer::on_put`]: given the tube and body of a put, its fate.
pub type PutHook = Box<dyn FnMut(&str, &[u8]) -> PutFault + Send>;

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Delayed {
        until: Instant,
    },
    Reserved {
        conn: u64,
        deadline: Instant,
    },
    /// `seq` keeps the order of burial: `kick` and `peek-buried` take the oldest.
    Buried {
        seq: u64,
    },
}

#[derive(Debug, Clone)]
struct JobRec {
    tube: String,
    pri: u32,
    delay: u32,
    ttr: u32,
    body: Bytes,
    state: State,
    created: Instant,
    /// Not visible to anyone before this time ([`PutFault::Delay`]).
    hidden_until: Option<Instant>,
    reserves: u64,
    timeouts: u64,
    releases: u64,
    buries: u64,
    kicks: u64,
    /// The job as its last binlog record has it: beanstalkd writes one on put, bury,
    /// kick and a release with a delay, not on reserve, touch, a plain release or a TTR
    /// that ran out, so a restart brings back this copy.
    logged: Option<Box<JobRec>>,
}

impl JobRec {
    fn visible(&self) -> bool {
        self.hidden_until.is_none()
    }

    /// Writes the binlog record of the job as it is now.
    fn log(&mut self) {
        self.logged = None;
        self.logged = Some(Box::new(self.clone()));
    }
}

#[derive(Debug, Clone, Default)]
struct TubeRec {
    total_jobs: u64,
    cmd_delete: u64,
    cmd_pause: u64,
    /// The pause in seconds and when it ends.
    pause: Option<(u32, Instant)>,
}

/// The answer a waiting `reserve` gets.
#[derive(Debug, Clone)]
enum Outcome {
    Job(Job),
    TimedOut,
    DeadlineSoon,
}

#[derive(Debug, Clone)]
struct Wait {
    /// When `reserve-with-timeout` gives up.
    until: Option<Instant>,
}

#[derive(Debug, Clone)]
struct ConnRec {
    used: String,
    watched: Vec<String>,
    wait: Option<Wait>,
    answer: Option<Outcome>,
}

#[derive(Debug)]
struct Server {
    config: MemConfig,
    up: bool,
    next_id: u64,
    next_conn: u64,
    bury_seq: u64,
    jobs: BTreeMap<u64, JobRec>,
    tubes: BTreeMap<String, TubeRec>,
    conns: BTreeMap<u64, ConnRec>,
    /// Waiting connections, longest-waiting first.
    waiting: Vec<u64>,
    latency: Duration,
}

struct Inner {
    name: String,
    server: Mutex<Server>,
    /// Woken on every change, so waiting reserves look at their answer slot again.
    changed: Notify,
    on_put: Mutex<Option<PutHook>>,
}

/// An in-memory beanstalkd. Cloning gives another handle to the same server.
#[derive(Clone)]
pub struct MemServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemServer")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Server {
    fn new(config: MemConfig) -> Server {
        let mut tubes = BTreeMap::new();
        tubes.insert("default".to_string(), TubeRec::default());
        Server {
            config,
            up: true,
            next_id: 1,
            next_conn: 1,
            bury_seq: 0,
            jobs: BTreeMap::new(),
            tubes,
            conns: BTreeMap::new(),
            waiting: Vec::new(),
            latency: Duration::ZERO,
        }
    }

    fn ensure_tube(&mut self, t: &str) {
        if !self.tubes.contains_key(t) {
            self.tubes.insert(t.to_string(), TubeRec::default());
        }
    }

    /// Forgets `t` (and its counters) when nothing refers to it any more.
    fn gc_tube(&mut self, t: &str) {
        if t == "default" {
            return;
        }
        let used = self
            .conns
            .values()
            .any(|c| c.used == t || c.watched.iter().any(|w| w == t))
            || self.jobs.values().any(|j| j.tube == t);
        if !used {
            self.tubes.remove(t);
        }
    }

    fn paused(&self, t: &str) -> bool {
        self.tubes.get(t).is_some_and(|r| r.pause.is_some())
    }

    /// Moves time forward to `now`: delays, hidden puts, pauses and TTRs that ran out,
    /// waits that ended; then hands ready jobs to waiting connections.
    /// Returns whether anything changed.
    fn tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for j in self.jobs.values_mut() {
            if j.hidden_until.is_some_and(|h| h <= now) {
                j.hidden_until = None;
                changed = true;
            }
            match j.state {
                State::Delayed { until } if until <= now => {
                    j.state = State::Ready;
                    changed = true;
                }
                State::Reserved { deadline, .. } if deadline <= now => {
                    j.state = State::Ready;
                    j.timeouts += 1;
                    changed = true;
                }
                _ => {}
            }
        }
        for t in self.tubes.values_mut() {
            if t.pause.is_some_and(|(_, until)| until <= now) {
                t.pause = None;
                changed = true;
            }
        }
        let waiting = self.waiting.clone();
        for c in waiting {
            let outcome = if self.deadline_soon(c, now) {
                Some(Outcome::DeadlineSoon)
            } else if self
                .conns
                .get(&c)
                .and_then(|r| r.wait.as_ref())
                .and_then(|w| w.until)
                .is_some_and(|u| u <= now)
            {
                Some(Outcome::TimedOut)
            } else {
                None
            };
            if let Some(o) = outcome {
                self.answer(c, o);
                changed = true;
            }
        }
        self.process_queue(now) || changed
    }

    fn answer(&mut self, c: u64, o: Outcome) {
        self.waiting.retain(|w| *w != c);
        if let Some(r) = self.conns.get_mut(&c) {
            r.wait = None;
            r.answer = Some(o);
        }
    }

    /// Whether a job reserved by `c` is within the safety margin of its TTR.
    fn deadline_soon(&self, c: u64, now: Instant) -> bool {
        self.jobs.values().any(|j| {
            matches!(j.state, State::Reserved { conn, deadline } if conn == c && deadline <= now + SAFETY_MARGIN)
        })
    }

    /// The best ready job (lowest priority, then id) of the tubes `ok` accepts.
    fn best_ready(&self, ok: impl Fn(&str) -> bool) -> Option<u64> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.visible() && j.state == State::Ready && ok(&j.tube))
            .min_by_key(|(id, j)| (j.pri, **id))
            .map(|(id, _)| *id)
    }

    fn ready_for(&self, c: u64) -> Option<u64> {
        let conn = self.conns.get(&c)?;
        self.best_ready(|t| conn.watched.iter().any(|w| w == t) && !self.paused(t))
    }

    /// Gives ready jobs to waiting connections, as beanstalkd's `process_queue` does:
    /// the most urgent job of any tube someone waits on goes to its longest waiter.
    /// Returns whether a job was handed out.
    fn process_queue(&mut self, now: Instant) -> bool {
        let mut handed = false;
        loop {
            let waited = |t: &str| {
                !self.paused(t)
                    && self.waiting.iter().any(|c| {
                        self.conns
                            .get(c)
                            .is_some_and(|r| r.watched.iter().any(|w| w == t))
                    })
            };
            let Some(id) = self.best_ready(waited) else {
                return handed;
            };
            let tube = self.jobs[&id].tube.clone();
            let Some(c) = self
                .waiting
                .iter()
                .copied()
                .find(|c| self.conns.get(c).is_some_and(|r| r.watched.contains(&tube)))
            else {
                return handed;
            };
            let job = self.reserve(c, id, now);
            self.answer(c, Outcome::Job(job));
            handed = true;
        }
    }

    fn reserve(&mut self, c: u64, id: u64, now: Instant) -> Job {
        let j = self
            .jobs
            .get_mut(&id)
            .expect("callers pass the id of a job they just found");
        j.state = State::Reserved {
            conn: c,
            deadline: now + Duration::from_secs(u64::from(j.ttr)),
        };
        j.reserves += 1;
        Job {
            id,
            body: j.body.clone(),
        }
    }

    /// The next time something changes by itself.
    fn next_event(&self) -> Option<Instant> {
        let jobs = self.jobs.values().flat_map(|j| {
            let state = match j.state {
                State::Delayed { until } => Some(until),
                State::Reserved { conn, deadline } => {
                    // A waiting owner hears DEADLINE_SOON a second before expiry.
                    if self.waiting.contains(&conn) {
                        Some(deadline.checked_sub(SAFETY_MARGIN).unwrap_or(deadline))
                    } else {
                        Some(deadline)
                    }
                }
                _ => None,
            };
            [state, j.hidden_until]
        });
        let pauses = self
            .tubes
            .values()
            .filter_map(|t| t.pause.map(|(_, until)| until));
        let waits = self
            .waiting
            .iter()
            .filter_map(|c| self.conns.get(c)?.wait.as_ref()?.until);
        jobs.flatten().chain(pauses).chain(waits).min()
    }

    fn open(&mut self, used: &str, watched: &[String]) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.ensure_tube(used);
        for w in watched {
            self.ensure_tube(w);
        }
        self.conns.insert(
            id,
            ConnRec {
                used: used.to_string(),
                watched: watched.to_vec(),
                wait: None,
                answer: None,
            },
        );
        id
    }

    /// Closes connection `c`: its reserved jobs become ready.
    fn close(&mut self, c: u64, now: Instant) {
        let Some(rec) = self.conns.remove(&c) else {
            return;
        };
        self.waiting.retain(|w| *w != c);
        for j in self.jobs.values_mut() {
            if matches!(j.state, State::Reserved { conn, .. } if conn == c) {
                j.state = State::Ready;
            }
        }
        self.gc_tube(&rec.used);
        for w in &rec.watched {
            self.gc_tube(w);
        }
        self.process_queue(now);
    }

    fn close_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            self.close(c, now);
        }
    }

    fn job(&self, id: u64) -> Option<&JobRec> {
        self.jobs.get(&id).filter(|j| j.visible())
    }

    fn remove_job(&mut self, id: u64) {
        if let Some(j) = self.jobs.remove(&id) {
            if let Some(t) = self.tubes.get_mut(&j.tube) {
                t.cmd_delete += 1;
            }
            self.gc_tube(&j.tube);
        }
    }

    fn kick_one(&mut self, id: u64) {
        if let Some(j) = self.jobs.get_mut(&id) {
            j.state = State::Ready;
            j.kicks += 1;
            j.log();
        }
    }

    fn conn(&self, c: u64) -> &ConnRec {
        &self.conns[&c]
    }

    fn peek_by(&self, tube: &str, want: impl Fn(&State) -> Option<Instant>) -> Option<Job> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.visible() && j.tube == tube)
            .filter_map(|(id, j)| want(&j.state).map(|k| (k, *id)))
            .min()
            .map(|(_, id)| Job {
                id,
                body: self.jobs[&id].body.clone(),
            })
    }
}

impl MemServer {
    /// A server named `name` (the address its errors name), running.
    pub fn new(name: impl Into<String>, config: MemConfig) -> MemServer {
        MemServer {
            inner: Arc::new(Inner {
                name: name.into(),
                server: Mutex::new(Server::new(config)),
                changed: Notify::new(),
                on_put: Mutex::new(None),
            }),
        }
    }

    /// The name given at creation, used as the address in errors.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn lock(&self) -> MutexGuard<'_, Server> {
        // A panic elsewhere cannot leave the maps half-changed in a way that matters more
        // than the panic itself; keep serving.
        self.inner
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the server state at the current time, then wakes waiters.
    fn with<T>(&self, f: impl FnOnce(&mut Server, Instant) -> T) -> T {
        let now = Instant::now();
        let out = {
            let mut s = self.lock();
            s.tick(now);
            let out = f(&mut s, now);
            s.process_queue(now);
            out
        };
        self.inner.changed.notify_waiters();
        out
    }

    /// Whether the server accepts connections.
    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// Kills the server: every connection breaks, and connecting fails until
    /// [`MemServer::start`]. Without a binlog every job is lost now.
    pub fn stop(&self) {
        self.with(|s, now| {
            s.close_all(now);
            s.up = false;
            for t in s.tubes.values_mut() {
                *t = TubeRec::default();
            }
            if !s.config.binlog {
                s.jobs.clear();
                s.next_id = 1;
            }
        });
    }

    /// Starts a stopped server: from its binlog, reserved jobs are ready again; without
    /// one it is empty and ids start at 1. Does nothing to a running server.
    pub fn start(&self) {
        self.with(|s, _| {
            if s.up {
                return;
            }
            s.up = true;
            s.tubes.clear();
            s.tubes.insert("default".to_string(), TubeRec::default());
            let mut tubes: Vec<String> = Vec::new();
            for j in s.jobs.values_mut() {
                if let Some(logged) = j.logged.take() {
                    *j = *logged;
                    if matches!(j.state, State::Buried { .. }) {
                        // beanstalkd buries a buried record again when it replays it,
                        // counting that bury too (seen against 1.12).
                        j.buries += 1;
                    }
                    j.log();
                }
                if matches!(j.state, State::Reserved { .. }) {
                    j.state = State::Ready;
                }
                tubes.push(j.tube.clone());
            }
            for t in tubes {
                s.ensure_tube(&t);
            }
        });
    }

    /// [`MemServer::stop`] then [`MemServer::start`].
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Breaks connection `conn` (see [`MemClient::conn_id`]): its reserved jobs become
    /// ready, a call in flight fails with [`Error::Closed`], and the client's next call
    /// opens a new connection.
    pub fn drop_connection(&self, conn: u64) {
        self.with(|s, now| s.close(conn, now));
    }

    /// Breaks every connection.
    pub fn drop_all_connections(&self) {
        self.with(|s, now| s.close_all(now));
    }

    /// Every call waits `latency` (virtual time) before the server applies it.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Decides, for each put (given its tube and body), whether it is stored normally,
    /// twice, or seen late; `None` removes the hook.
    pub fn on_put(&self, hook: Option<PutHook>) {
        *self
            .inner
            .on_put
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    /// Ids of the connections open now.
    pub fn connections(&self) -> Vec<u64> {
        self.lock().conns.keys().copied().collect()
    }

    /// Connects with default [`Options`].
    pub async fn connect(&self) -> Result<MemClient, Error> {
        MemClient::connect_with(self, Options::default()).await
    }
}

/// A connection to a [`MemServer`], with [`Client`](crate::Client)'s methods.
#[derive(Debug)]
pub struct MemClient {
    server: MemServer,
    options: Options,
    conn: Option<u64>,
    used: String,
    watched: Vec<String>,
    max_job_size: u64,
    connects: u64,
}

/// Closes the connection when a call is dropped before it finished, as the real client
/// drops a connection left in the middle of a command.
struct CallGuard {
    server: MemServer,
    conn: Option<u64>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.server.drop_connection(c);
        }
    }
}

impl CallGuard {
    fn finish(mut self) -> u64 {
        self.conn.take().unwrap_or_default()
    }
}

/// Whether a command may be sent again after its connection broke (as for `Client`).
fn repeatable(command: &str) -> bool {
    !matches!(
        command,
        "put" | "delete" | "release" | "bury" | "touch" | "kick" | "kick-job"
    )
}

impl Drop for MemClient {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.server.drop_connection(c);
        }
    }
}

impl MemClient {
    /// Connects to `server` with `options`.
    pub async fn connect_with(server: &MemServer, options: Options) -> Result<MemClient, Error> {
        let mut client = MemClient {
            server: server.clone(),
            options,
            conn: None,
            used: "default".to_string(),
            watched: vec!["default".to_string()],
            max_job_size: u64::MAX,
            connects: 0,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// Connects with default [`Options`].
    pub async fn connect(server: &MemServer) -> Result<MemClient, Error> {
        MemClient::connect_with(server, Options::default()).await
    }

    /// The server's name.
    pub fn addr(&self) -> &str {
        self.server.name()
    }

    /// The server this client talks to.
    pub fn server(&self) -> &MemServer {
        &self.server
    }

    /// The server-side id of the current connection, if one is open (for
    /// [`MemServer::drop_connection`]).
    pub fn conn_id(&self) -> Option<u64> {
        self.conn
    }

    /// How many connections this client has opened.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// The server's `max-job-size`.
    pub fn max_job_size(&self) -> u64 {
        self.max_job_size
    }

    /// The tube `put` goes to.
    pub fn used_tube(&self) -> &str {
        &self.used
    }

    /// The tubes `reserve` takes from.
    pub fn watched_tubes(&self) -> &[String] {
        &self.watched
    }

    /// Whether the connection is still open on the server. A connection the server
    /// closed while idle is replaced before the next call, as the real client's stale
    /// check (which sees the EOF) does.
    fn live(&self) -> bool {
        self.conn
            .is_some_and(|c| self.server.lock().conns.contains_key(&c))
    }

    /// Drops the current connection and opens a new one with the used and watched tubes.
    pub async fn reconnect(&mut self) -> Result<(), Error> {
        if let Some(c) = self.conn.take() {
            self.server.drop_connection(c);
        }
        let (used, watched) = (self.used.clone(), self.watched.clone());
        let opened = self.server.with(|s, _| {
            if !s.up {
                return None;
            }
            Some((s.open(&used, &watched), s.config.max_job_size))
        });
        let Some((conn, max)) = opened else {
            return Err(Error::Connect {
                addr: self.server.name().to_string(),
                source: io::Error::from(io::ErrorKind::ConnectionRefused),
            });
        };
        self.connects += 1;
        self.conn = Some(conn);
        self.max_job_size = max;
        Ok(())
    }

    /// Runs `op` on this connection: reconnects first when needed, waits the server's
    /// latency, retries once on a new connection when a repeatable command found its
    /// connection gone, and bounds the whole by the call timeout.
    async fn call<T>(
        &mut self,
        command: &'static str,
        mut op: impl FnMut(&mut Server, u64, Instant) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let timeout = self.options.call_timeout;
        let body = async {
            let mut retried = false;
            loop {
                if !self.live() {
                    self.reconnect().await?;
                }
                let Some(conn) = self.conn.take() else {
                    unreachable!("reconnect either sets a connection or returns an error")
                };
                let guard = CallGuard {
                    server: self.server.clone(),
                    conn: Some(conn),
                };
                let latency = self.server.lock().latency;
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let conn = guard.finish();
                let result = self.server.with(|s, now| {
                    if !s.conns.contains_key(&conn) {
                        return None;
                    }
                    Some(op(s, conn, now))
                });
                match result {
                    Some(r) => {
                        self.conn = Some(conn);
                        return r;
                    }
                    None if repeatable(command) && !retried => retried = true,
                    None => {
                        return Err(Error::Closed {
                            command,
                            mid_answer: false,
                        })
                    }
                }
            }
        };
        bound(timeout, command, body).await
    }

    /// `reserve` and `reserve-with-timeout`: waits for the server's answer.
    async fn wait(
        &mut self,
        command: &'static str,
        secs: Option<u32>,
    ) -> Result<Option<Job>, Error> {
        let mut retried = false;
        loop {
            if !self.live() {
                self.reconnect().await?;
            }
            let Some(conn) = self.conn.take() else {
                unreachable!("reconnect either sets a connection or returns an error")
            };
            let guard = CallGuard {
                server: self.server.clone(),
                conn: Some(conn),
            };
            let latency = self.server.lock().latency;
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let started = self.server.with(|s, now| {
                if !s.conns.contains_key(&conn) {
                    return false;
                }
                match s.ready_for(conn) {
                    Some(id) => {
                        let job = s.reserve(conn, id, now);
                        rec_answer(s, conn, Outcome::Job(job));
                    }
                    None if s.deadline_soon(conn, now) => {
                        rec_answer(s, conn, Outcome::DeadlineSoon)
                    }
                    None if secs == Some(0) => rec_answer(s, conn, Outcome::TimedOut),
                    None => {
                        if let Some(rec) = s.conns.get_mut(&conn) {
                            rec.wait = Some(Wait {
                                until: secs.map(|t| now + Duration::from_secs(u64::from(t))),
                            });
                        }
                        s.waiting.push(conn);
                    }
                }
                true
            });
            if !started {
                drop(guard);
                if repeatable(command) && !retried {
                    retried = true;
                    continue;
                }
                return Err(Error::Closed {
                    command,
                    mid_answer: false,
                });
            }
            loop {
                let notified = self.server.inner.changed.notified();
                let mut notified = pin!(notified);
                notified.as_mut().enable();
                let (answer, gone, next) = {
                    let mut s = self.server.lock();
                    let now = Instant::now();
                    if s.tick(now) {
                        // Others may have been handed jobs or answers by this tick.
                        self.server.inner.changed.notify_waiters();
                    }
                    let gone = !s.conns.contains_key(&conn);
                    let answer = s.conns.get_mut(&conn).and_then(|r| r.answer.take());
                    (answer, gone, s.next_event())
                };
                if let Some(a) = answer {
                    self.conn = Some(guard.finish());
                    return match a {
                        Outcome::Job(job) => Ok(Some(job)),
                        Outcome::TimedOut => Ok(None),
                        Outcome::DeadlineSoon => Err(Error::DeadlineSoon),
                    };
                }
                if gone {
                    drop(guard);
                    break;
                }
                match next {
                    Some(at) => {
                        tokio::select! {
                            biased;
                            () = notified => {}
                            () = tokio::time::sleep_until(at) => {}
                        }
                    }
                    None => notified.await,
                }
            }
            if repeatable(command) && !retried {
                retried = true;
                continue;
            }
            return Err(Error::Closed {
                command,
                mid_answer: false,
            });
        }
    }

    /// `use <tube>`.
    pub async fn use_tube(&mut self, tube: &str) -> Result<(), Error> {
        check_tube(tube)?;
        self.call("use", |s, c, _| {
            let old = std::mem::replace(
                &mut s.conns.get_mut(&c).expect("open").used,
                tube.to_string(),
            );
            s.ensure_tube(tube);
            s.gc_tube(&old);
            Ok(())
        })
        .await?;
        self.used = tube.to_string();
        Ok(())
    }

    /// `watch <tube>`: returns how many tubes are watched.
    pub async fn watch(&mut self, tube: &str) -> Result<u64, Error> {
        check_tube(tube)?;
        let n = self
            .call("watch", |s, c, _| {
                s.ensure_tube(tube);
                let rec = s.conns.get_mut(&c).expect("open");
                if !rec.watched.iter().any(|w| w == tube) {
                    rec.watched.push(tube.to_string());
                }
                Ok(rec.watched.len() as u64)
            })
            .await?;
        if !self.watched.iter().any(|w| w == tube) {
            self.watched.push(tube.to_string());
        }
        Ok(n)
    }

    /// `ignore <tube>`: [`Error::NotIgnored`] for the last watched tube.
    pub async fn ignore(&mut self, tube: &str) -> Result<u64, Error> {
        check_tube(tube)?;
        let n = self
            .call("ignore", |s, c, _| {
                let rec = s.conns.get_mut(&c).expect("open");
                if rec.watched.len() < 2 {
                    return Err(Error::NotIgnored);
                }
                rec.watched.retain(|w| w != tube);
                let n = rec.watched.len() as u64;
                s.gc_tube(tube);
                Ok(n)
            })
            .await?;
        self.watched.retain(|w| w != tube);
        Ok(n)
    }

    /// `put`: stores a job in the used tube and returns its id.
    pub async fn put(&mut self, body: &[u8], params: PutParams) -> Result<u64, Error> {
        if body.len() as u64 > self.max_job_size {
            return Err(Error::BodyTooBig {
                size: body.len(),
                max: self.max_job_size,
            });
        }
        let used = self.used.clone();
        let fault = match self
            .server
            .inner
            .on_put
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            Some(hook) => hook(&used, body),
            None => PutFault::None,
        };
        let body = Bytes::copy_from_slice(body);
        self.call("put", |s, c, now| {
            let tube = s.conn(c).used.clone();
            let copies = if fault == PutFault::Duplicate { 2 } else { 1 };
            let hidden_until = match fault {
                PutFault::Delay(d) => Some(now + d),
                _ => None,
            };
            let first = s.next_id;
            for _ in 0..copies {
                let id = s.next_id;
                s.next_id += 1;
                let state = if params.delay > 0 {
                    State::Delayed {
                        until: now + Duration::from_secs(u64::from(params.delay)),
                    }
                } else {
                    State::Ready
                };
                s.jobs.insert(
                    id,
                    JobRec {
                        tube: tube.clone(),
                        pri: params.pri,
                        delay: params.delay,
                        ttr: params.ttr.max(1),
                        body: body.clone(),
                        state,
                        created: now,
                        hidden_until,
                        reserves: 0,
                        timeouts: 0,
                        releases: 0,
                        buries: 0,
                        kicks: 0,
                        logged: None,
                    },
                );
                if let Some(j) = s.jobs.get_mut(&id) {
                    j.log();
                }
                s.ensure_tube(&tube);
                if let Some(t) = s.tubes.get_mut(&tube) {
                    t.total_jobs += 1;
                }
            }
            Ok(first)
        })
        .await
    }

    /// `reserve`: waits as long as it takes for a job from the watched tubes.
    pub async fn reserve(&mut self) -> Result<Job, Error> {
        match self.wait("reserve", None).await? {
            Some(job) => Ok(job),
            None => Err(Error::Unexpected {
                command: "reserve",
                answer: "TIMED_OUT".to_string(),
            }),
        }
    }

    /// `reserve-with-timeout`: a job, or `None` when none came within `timeout` (whole
    /// seconds; `0` polls).
    pub async fn reserve_with_timeout(&mut self, timeout: Duration) -> Result<Option<Job>, Error> {
        let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        let bound_by = self.options.call_timeout.map(|t| t + timeout);
        bound(
            bound_by,
            "reserve-with-timeout",
            self.wait("reserve-with-timeout", Some(secs)),
        )
        .await
    }

    /// `reserve-job <id>`: reserves that job (ready, delayed or buried), whatever tube it
    /// is in.
    pub async fn reserve_job(&mut self, id: u64) -> Result<Job, Error> {
        self.call("reserve-job", |s, c, now| match s.job(id) {
            Some(j) if !matches!(j.state, State::Reserved { .. }) => Ok(s.reserve(c, id, now)),
            _ => Err(Error::NotFound),
        })
        .await
    }

    /// `delete <id>`: any job but one reserved by another connection.
    pub async fn delete(&mut self, id: u64) -> Result<(), Error> {
        self.call("delete", |s, c, _| match s.job(id).map(|j| j.state) {
            Some(State::Reserved { conn, .. }) if conn != c => Err(Error::NotFound),
            Some(_) => {
                s.remove_job(id);
                Ok(())
            }
            None => Err(Error::NotFound),
        })
        .await
    }

    /// The job `id` if this connection holds it.
    fn own(s: &mut Server, c: u64, id: u64) -> Result<&mut JobRec, Error> {
        match s.jobs.get_mut(&id) {
            Some(j) if matches!(j.state, State::Reserved { conn, .. } if conn == c) => Ok(j),
            _ => Err(Error::NotFound),
        }
    }

    /// `release <id> <pri> <delay>`: gives a reserved job back.
    pub async fn release(&mut self, id: u64, pri: u32, delay: u32) -> Result<(), Error> {
        self.call("release", |s, c, now| {
            let j = MemClient::own(s, c, id)?;
            j.pri = pri;
            j.delay = delay;
            j.releases += 1;
            if delay > 0 {
                j.state = State::Delayed {
                    until: now + Duration::from_secs(u64::from(delay)),
                };
                j.log();
            } else {
                j.state = State::Ready;
            }
            Ok(())
        })
        .await
    }

    /// `bury <id> <pri>`: puts a reserved job aside until kicked.
    pub async fn bury(&mut self, id: u64, pri: u32) -> Result<(), Error> {
        self.call("bury", |s, c, _| {
            s.bury_seq += 1;
            let seq = s.bury_seq;
            let j = MemClient::own(s, c, id)?;
            j.pri = pri;
            j.buries += 1;
            j.state = State::Buried { seq };
            j.log();
            Ok(())
        })
        .await
    }

    /// `touch <id>`: restarts a reserved job's TTR.
    pub async fn touch(&mut self, id: u64) -> Result<(), Error> {
        self.call("touch", |s, c, now| {
            let j = MemClient::own(s, c, id)?;
            j.state = State::Reserved {
                conn: c,
                deadline: now + Duration::from_secs(u64::from(j.ttr)),
            };
            Ok(())
        })
        .await
    }

    /// `peek <id>`: the job in any state, or `None`.
    pub async fn peek(&mut self, id: u64) -> Result<Option<Job>, Error> {
        self.call("peek", |s, _, _| {
            Ok(s.job(id).map(|j| Job {
                id,
                body: j.body.clone(),
            }))
        })
        .await
    }

    /// `peek-ready`: the next ready job of the used tube, or `None`.
    pub async fn peek_ready(&mut self) -> Result<Option<Job>, Error> {
        self.call("peek-ready", |s, c, _| {
            let tube = s.conn(c).used.clone();
            Ok(s.best_ready(|t| t == tube).map(|id| Job {
                id,
                body: s.jobs[&id].body.clone(),
            }))
        })
        .await
    }

    /// `peek-delayed`: the delayed job of the used tube that is ready soonest, or `None`.
    pub async fn peek_delayed(&mut self) -> Result<Option<Job>, Error> {
        self.call("peek-delayed", |s, c, _| {
            let tube = s.conn(c).used.clone();
            Ok(s.peek_by(&tube, |st| match st {
                State::Delayed { until } => Some(*until),
                _ => None,
            }))
        })
        .await
    }

    /// `peek-buried`: the oldest buried job of the used tube, or `None`.
    pub async fn peek_buried(&mut self) -> Result<Option<Job>, Error> {
        self.call("peek-buried", |s, c, _| {
            Ok(oldest_buried(s, &s.conn(c).used))
        })
        .await
    }

    /// `kick <bound>`: moves up to `bound` buried (or, if none, delayed) jobs of the used
    /// tube to ready; returns how many.
    pub async fn kick(&mut self, bound: u32) -> Result<u64, Error> {
        self.call("kick", |s, c, _| {
            let tube = s.conn(c).used.clone();
            let mut buried: Vec<(u64, u64)> = s
                .jobs
                .iter()
                .filter(|(_, j)| j.visible() && j.tube == tube)
                .filter_map(|(id, j)| match j.state {
                    State::Buried { seq } => Some((seq, *id)),
                    _ => None,
                })
                .collect();
            buried.sort_unstable();
            let mut ids: Vec<u64> = buried.into_iter().map(|(_, id)| id).collect();
            if ids.is_empty() {
                let mut delayed: Vec<(Instant, u64)> = s
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.visible() && j.tube == tube)
                    .filter_map(|(id, j)| match j.state {
                        State::Delayed { until } => Some((until, *id)),
                        _ => None,
                    })
                    .collect();
                delayed.sort_unstable();
                ids = delayed.into_iter().map(|(_, id)| id).collect();
            }
            ids.truncate(bound as usize);
            for id in &ids {
                s.kick_one(*id);
            }
            Ok(ids.len() as u64)
        })
        .await
    }

    /// `kick-job <id>`: moves one buried or delayed job to ready.
    pub async fn kick_job(&mut self, id: u64) -> Result<(), Error> {
        self.call("kick-job", |s, _, _| match s.job(id).map(|j| j.state) {
            Some(State::Buried { .. } | State::Delayed { .. }) => {
                s.kick_one(id);
                Ok(())
            }
            _ => Err(Error::NotFound),
        })
        .await
    }

    /// `stats-job <id>`.
    pub async fn stats_job(&mut self, id: u64) -> Result<JobStats, Error> {
        self.call("stats-job", |s, _, now| {
            let j = s.job(id).ok_or(Error::NotFound)?;
            let (state, left) = match j.state {
                State::Ready => ("ready", None),
                State::Delayed { until } => ("delayed", Some(until)),
                State::Reserved { deadline, .. } => ("reserved", Some(deadline)),
                State::Buried { .. } => ("buried", None),
            };
            Ok(JobStats {
                id,
                tube: j.tube.clone(),
                state: state.to_string(),
                pri: j.pri,
                age: now.saturating_duration_since(j.created).as_secs(),
                delay: u64::from(j.delay),
                ttr: u64::from(j.ttr),
                time_left: left.map_or(0, |t| t.saturating_duration_since(now).as_secs()),
                file: 0,
                reserves: j.reserves,
                timeouts: j.timeouts,
                releases: j.releases,
                buries: j.buries,
                kicks: j.kicks,
                extra: BTreeMap::new(),
            })
        })
        .await
    }

    /// `stats-tube <tube>`: [`Error::NotFound`] for a tube that does not exist.
    pub async fn stats_tube(&mut self, tube: &str) -> Result<TubeStats, Error> {
        check_tube(tube)?;
        self.call("stats-tube", |s, _, now| {
            let t = s.tubes.get(tube).ok_or(Error::NotFound)?;
            let jobs = || s.jobs.values().filter(|j| j.visible() && j.tube == tube);
            let count = |f: &dyn Fn(&JobRec) -> bool| jobs().filter(|j| f(j)).count() as u64;
            let conns = |f: &dyn Fn(u64, &ConnRec) -> bool| {
                s.conns.iter().filter(|(id, r)| f(**id, r)).count() as u64
            };
            let watches = |r: &ConnRec| r.watched.iter().any(|w| w == tube);
            Ok(TubeStats {
                name: tube.to_string(),
                current_jobs_urgent: count(&|j| j.state == State::Ready && j.pri < URGENT),
                current_jobs_ready: count(&|j| j.state == State::Ready),
                current_jobs_reserved: count(&|j| matches!(j.state, State::Reserved { .. })),
                current_jobs_delayed: count(&|j| matches!(j.state, State::Delayed { .. })),
                current_jobs_buried: count(&|j| matches!(j.state, State::Buried { .. })),
                total_jobs: t.total_jobs,
                current_using: conns(&|_, r| r.used == tube),
                current_waiting: conns(&|id, r| s.waiting.contains(&id) && watches(r)),
                current_watching: conns(&|_, r| watches(r)),
                pause: t.pause.map_or(0, |(secs, _)| u64::from(secs)),
                cmd_delete: t.cmd_delete,
                cmd_pause_tube: t.cmd_pause,
                pause_time_left: t.pause.map_or(0, |(_, until)| {
                    until.saturating_duration_since(now).as_secs()
                }),
                extra: BTreeMap::new(),
            })
        })
        .await
    }

    /// `list-tubes`: every tube that exists.
    pub async fn list_tubes(&mut self) -> Result<Vec<String>, Error> {
        self.call("list-tubes", |s, _, _| {
            Ok(s.tubes.keys().cloned().collect())
        })
        .await
    }

    /// `list-tube-used`.
    pub async fn list_tube_used(&mut self) -> Result<String, Error> {
        self.call("list-tube-used", |s, c, _| Ok(s.conn(c).used.clone()))
            .await
    }

    /// `list-tubes-watched`.
    pub async fn list_tubes_watched(&mut self) -> Result<Vec<String>, Error> {
        self.call("list-tubes-watched", |s, c, _| {
            Ok(s.conn(c).watched.clone())
        })
        .await
    }

    /// `pause-tube <tube> <delay>`: no job is reserved from `tube` for `delay` seconds.
    pub async fn pause_tube(&mut self, tube: &str, delay: u32) -> Result<(), Error> {
        check_tube(tube)?;
        self.call("pause-tube", |s, _, now| {
            let t = s.tubes.get_mut(tube).ok_or(Error::NotFound)?;
            t.cmd_pause += 1;
            t.pause = (delay > 0).then(|| (delay, now + Duration::from_secs(u64::from(delay))));
            Ok(())
        })
        .await
    }

    /// `quit`: closes the connection; the next call reconnects.
    pub async fn quit(&mut self) {
        if let Some(c) = self.conn.take() {
            self.server.drop_connection(c);
        }
    }
}

fn rec_answer(s: &mut Server, c: u64, o: Outcome) {
    if let Some(r) = s.conns.get_mut(&c) {
        r.answer = Some(o);
    }
}

fn oldest_buried(s: &Server, tube: &str) -> Option<Job> {
    s.jobs
        .iter()
        .filter(|(_, j)| j.visible() && j.tube == tube)
        .filter_map(|(id, j)| match j.state {
            State::Buried { seq } => Some((seq, *id)),
            _ => None,
        })
        .min()
        .map(|(_, id)| Job {
            id,
            body: s.jobs[&id].body.clone(),
        })
}

async fn bound<T>(
    timeout: Option<Duration>,
    command: &'static str,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or(Err(Error::Timeout {
                command,
                timeout: t,
            })),
    }
}
