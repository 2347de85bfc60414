//! The agent: one process per host that keeps the host's share of the cluster equal to
//! the desired repo.
//!
//! It runs, as tasks of one tokio runtime:
//! - the **source**: fetches the desired repo on an interval, at once on a trigger, and
//!   on a file-system event when the repo is local; keeps the last good snapshot;
//! - the **reconciler**: lists this host's VMs, reads the other hosts' inventories,
//!   plans (a pure function, [`crate::planner`]), and emits this host's share of the plan
//!   ([`decide`]): creates it owns, after recording each intent durably, and ops on the
//!   VMs it holds;
//! - the **worker** slots ([`worker`]): admission, the hop chain, building and changing
//!   VMs through the backend;
//! - the **inbox**: results for the creates and ops this host asked for, and triggers;
//! - the **publisher**: this host's inventory, for the other hosts and `status`.
//!
//! Errors in one pass are reported (log and event log) and retried with backoff; the
//! agent itself only stops on SIGTERM or SIGINT: it stops reserving, lets the jobs in
//! hand finish or releases them, and exits.

pub mod config;
pub mod decide;
pub mod departed;
pub mod events;
pub mod hooks;
pub mod identity;
pub mod lease;
pub mod listing;
pub mod metrics;
pub mod peers;
mod recheck;
mod replay;
mod seq;
pub mod status;
pub mod usage;
mod worker;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beanstalk::{Client, PutParams};
use tokio::sync::{watch, Notify};

use crate::actual::{ActualVm, HostActual};
use crate::backend::{Backend, BackendError, VmBhyve, VmBhyveConfig};
use crate::capacity::{Limits, Usage};
use crate::desired::{self, Snapshot};
use crate::intents::{Intent, IntentStatus, IntentStore};
use crate::message::{
    self, tubes, Envelope, InFlightCreate, Inventory, JobResult, Message, Origin, Outcome,
    RecentFailure, UpdateJob, VmJob,
};
use crate::planner::{self, Action, InFlight, Kind, PlanOptions};
use crate::source::{self, GitSource};

use config::AgentConfig;
use decide::{Emit, IntentFate};
use events::{Event, EventLog};
use peers::Peers;

/// `<state_dir>/hosts.json`: the cluster's hosts as of the last good snapshot, so that
/// `flotilla status`, `apply` and `trigger` on this host know where every beanstalkd is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostsFile {
    /// The cluster id.
    pub cluster: String,
    /// The commit of the last good snapshot.
    pub commit: Option<String>,
    /// This host.
    pub me: String,
    /// Every host's beanstalkd address, by host name.
    pub hosts: BTreeMap<String, String>,
    /// Hosts that left cluster.yaml but may still hold VMs (not forgotten), with the
    /// address they had: `status` shows them.
    #[serde(default)]
    pub departed: BTreeMap<String, String>,
}

impl HostsFile {
    /// The file's name in the state directory.
    pub const NAME: &'static str = "hosts.json";
}

fn write_hosts_file(
    state_dir: &std::path::Path,
    me: &str,
    snap: &Snapshot,
    departed: BTreeMap<String, String>,
) -> std::io::Result<()> {
    let me = me.to_string();
    let file = HostsFile {
        departed,
        cluster: snap.cluster.id.clone(),
        commit: snap.commit.clone(),
        me,
        hosts: snap
            .cluster
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
            .collect(),
    };
    crate::atomic::write(
        &state_dir.join(HostsFile::NAME),
        &serde_json::to_vec_pretty(&file).unwrap_or_default(),
    )
}

/// Records the hosts that left cluster.yaml between the last snapshot (or, after a
/// restart, the hosts file) and `snap`, with their last inventory, then rewrites the
/// hosts file.
fn note_departures(s: &Shared, snap: &Snapshot) -> std::io::Result<()> {
    let before: BTreeMap<String, String> = match s.snapshot() {
        Some(old) => old
            .cluster
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
            .collect(),
        None => std::fs::read(s.cfg.state_dir.join(HostsFile::NAME))
            .ok()
            .and_then(|b| serde_json::from_slice::<HostsFile>(&b).ok())
            .map(|f| f.hosts)
            .unwrap_or_default(),
    };
    let now: BTreeMap<String, String> = snap
        .cluster
        .hosts
        .iter()
        .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
        .collect();
    let last = s
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut departed = s.departed.lock().unwrap_or_else(|p| p.into_inner());
    let left = departed.hosts_changed(&before, &now, snap.commit.as_deref(), s.me(), &last)?;
    let addrs = departed
        .hosts()
        .iter()
        .map(|(h, d)| (h.clone(), d.addr.clone()))
        .collect();
    drop(departed);
    for host in left {
        s.event(
            "departed",
            None,
            None,
            snap.commit.as_deref(),
            format!("host `{host}` left cluster.yaml; the VMs its last inventory shows are not created elsewhere until it shows them gone or `flotilla host forget {host}`"),
        );
    }
    write_hosts_file(&s.cfg.state_dir, s.me(), snap, addrs)
}

/// Ids of acted-on messages, one `id sent_at` per line, in the state directory.
const ACTED_FILE: &str = "acted";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory or the intent store cannot be used.
    #[error("state directory {path}: {reason}")]
    State {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What the worker holds while it builds.
#[derive(Debug, Default)]
struct Admission {
    building: BTreeSet<String>,
    /// VMs an op (destroy, start, stop, update) is running on: one at a time per VM
    /// (safety rule 10), whatever reached the queue.
    operating: BTreeSet<String>,
    /// What the guests claim, between listings, and what builds and changes in progress
    /// hold (each VM once).
    usage: usage::UsageView,
}

/// An op this host sent to its own ops tube and awaits the result of.
#[derive(Debug, Clone)]
struct OpInFlight {
    kind: Kind,
    job_id: String,
    /// When the entry goes even without a result. Set when this host's worker ended the
    /// job (deleted or buried it): its result normally removes the entry at once, but one
    /// that never comes (lost with a beanstalkd, say) must not hold the VM back for ever.
    /// Set too when a put may or may not have reached the queue.
    expires: Option<Instant>,
}

/// How long an ended op's entry waits for its result before it goes.
const ENDED_OP_GRACE: Duration = Duration::from_secs(10);

/// What the agent knows about itself, for its inventory.
#[derive(Debug, Default)]
struct Local {
    applied_commit: Option<String>,
    /// The commit of the last finished reconcile pass.
    reconciled_commit: Option<String>,
    failures: VecDeque<RecentFailure>,
    /// The commit that removed this host from cluster.yaml, while it is not listed.
    left_cluster: Option<String>,
    /// Creates that wait for other hosts, as of the last pass.
    waiting: Vec<message::WaitingCreate>,
    /// Peers' clocks this host saw beyond `max_clock_skew` in its last pass.
    clock_skew: Option<String>,
}

/// State shared by the agent's tasks.
pub struct Shared {
    cfg: AgentConfig,
    backend: Arc<dyn Backend>,
    intents: IntentStore,
    events: EventLog,
    peers: Peers,
    snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    admission: Mutex<Admission>,
    ops: Mutex<BTreeMap<String, OpInFlight>>,
    /// Ops that failed (or found no room), per VM and kind: not planned again before
    /// this time, whatever other op of the VM is sent meanwhile (issue 14, case 3).
    retry_at: Mutex<BTreeMap<(String, Kind), u64>>,
    inventories: Mutex<BTreeMap<String, Inventory>>,
    latencies: Mutex<BTreeMap<String, Duration>>,
    local: Mutex<Local>,
    counters: Mutex<BTreeMap<String, f64>>,
    gauges: Mutex<BTreeMap<String, f64>>,
    wake_reconcile: Notify,
    /// Results came in: a pass is due, but not at once (see the reconcile loop).
    results_in: Notify,
    wake_fetch: Notify,
    wake_publish: Notify,
    stop: watch::Sender<bool>,
    /// Set on shutdown; builds check it between steps and clean up.
    cancel: AtomicBool,
    /// The cluster keys: every message is sealed and checked with them.
    keys: crate::auth::Keys,
    /// Ids of messages acted on, to refuse replays.
    acted: Mutex<replay::ReplayCache>,
    /// This host's lease: one live agent per host name (safety rule 8).
    lease: lease::LeaseCell,
    /// Host names seen under two identities.
    identities: Mutex<identity::IdentityWatch>,
    /// Hosts that left cluster.yaml and hosts declared gone (safety rule 9).
    departed: Mutex<departed::Departed>,
    /// Who owns which VM under each commit seen, for creates that wait for hosts on
    /// other commits.
    owners: Mutex<BTreeMap<String, decide::CommitOwners>>,
    /// Forwards that may have reached the next host (a put that failed after it was
    /// written): the job goes there again, never built here (by job id).
    unsure_forwards: Mutex<BTreeMap<String, (String, message::CreateJob)>>,
    /// This host's address in the hosts file of its last membership: a host that left
    /// cluster.yaml and restarted still publishes its inventory there (rule 9).
    member_addr: Option<String>,
    /// Numbers this host's inventories (issue 14, case 4).
    inventory_seq: seq::InventorySeq,
    /// This host's listing, kept while nothing changes it (issue 12, item 4).
    listing: Arc<listing::Listing>,
}

/// The backend the config describes: vm-bhyve's `vm`, or the simulator when `sim_dir` is
/// set.
pub fn backend_for(cfg: &AgentConfig) -> VmBhyve {
    let mut b = VmBhyveConfig {
        vm: cfg.backend.vm_command.clone(),
        sysrc: cfg.backend.sysrc_command.clone(),
        ..VmBhyveConfig::default()
    };
    if let Some(d) = cfg.backend.start_timeout {
        b.start_timeout = d.0;
    }
    if let Some(d) = cfg.backend.poll_interval {
        b.poll_interval = d.0;
    }
    if let Some(dir) = &cfg.backend.sim_dir {
        b.env.push(("VM_SIM_DIR".into(), dir.clone().into()));
        b.env
            .push(("VM_SIM_HOSTNAME".into(), cfg.host.clone().into()));
        b.rc_conf = Some(dir.join(".config/rc.conf"));
        b.hostname = Some(cfg.host.clone());
        b.lock_grace = Duration::from_secs(2);
    }
    VmBhyve::new(b)
}

impl Shared {
    /// Shared state for an agent with `cfg`, acting through `backend`.
    pub fn new(
        cfg: AgentConfig,
        keys: crate::auth::Keys,
        backend: Arc<dyn Backend>,
    ) -> Result<Arc<Shared>, StartError> {
        let state = |reason: String| StartError::State {
            path: cfg.state_dir.clone(),
            reason,
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| state(e.to_string()))?;
        let intents =
            IntentStore::open(cfg.state_dir.join("intents")).map_err(|e| state(e.to_string()))?;
        let departed =
            departed::Departed::open(&cfg.state_dir).map_err(|e| state(e.to_string()))?;
        let member_addr = std::fs::read(cfg.state_dir.join(HostsFile::NAME))
            .ok()
            .and_then(|b| serde_json::from_slice::<HostsFile>(&b).ok())
            .and_then(|f| f.hosts.get(&cfg.host).cloned());
        let inventory_seq =
            seq::InventorySeq::open(&cfg.state_dir).map_err(|e| state(e.to_string()))?;
        let acted = replay::ReplayCache::open(
            &cfg.state_dir.join(ACTED_FILE),
            cfg.message_window.0.as_secs(),
            message::now(),
        );
        let listing = Arc::new(listing::Listing::default());
        let backend = Arc::new(listing::Tracked {
            inner: backend,
            listing: listing.clone(),
        });
        Ok(Arc::new(Shared {
            events: EventLog::new(&cfg.state_dir),
            cfg,
            backend,
            intents,
            peers: Peers::new(),
            snapshot: watch::channel(None).0,
            admission: Mutex::default(),
            ops: Mutex::default(),
            retry_at: Mutex::default(),
            inventories: Mutex::default(),
            latencies: Mutex::default(),
            local: Mutex::default(),
            counters: Mutex::default(),
            gauges: Mutex::default(),
            wake_reconcile: Notify::new(),
            results_in: Notify::new(),
            wake_fetch: Notify::new(),
            wake_publish: Notify::new(),
            stop: watch::channel(false).0,
            cancel: AtomicBool::new(false),
            acted: Mutex::new(acted),
            keys,
            lease: lease::LeaseCell::default(),
            identities: Mutex::default(),
            departed: Mutex::new(departed),
            owners: Mutex::default(),
            member_addr,
            unsure_forwards: Mutex::default(),
            inventory_seq,
            listing,
        }))
    }

    fn me(&self) -> &str {
        &self.cfg.host
    }

    /// `env`, signed with the cluster key.
    fn sealed(&self, mut env: Envelope) -> Envelope {
        self.keys.seal(&mut env);
        env
    }

    /// Refuses a message that is unsigned, forged, tampered, not addressed to this host
    /// and `tube` (the one it was read from), too old or replayed; counts and logs the
    /// refusal.
    fn check(&self, env: &Envelope, tube: &str) -> Result<(), crate::auth::Rejection> {
        let window = self.cfg.message_window.0.as_secs();
        let mut r = self
            .keys
            .verify(env, self.me(), tube, message::now(), window);
        if r.is_ok()
            && self
                .acted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&env.id)
        {
            r = Err(crate::auth::Rejection::Replayed(env.id.clone()));
        }
        if let Err(e) = &r {
            self.count(&format!(
                "flotilla_rejected_total{{reason=\"{}\"}}",
                e.label()
            ));
            self.event(
                "rejected",
                env.body.vm(),
                Some(&env.id),
                None,
                format!(
                    "a `{}` message claiming to be from {} refused: {e}",
                    env.body.kind(),
                    env.from
                ),
            );
        }
        r
    }

    /// Records that message `env` was acted on, so a replay of it is refused.
    fn acted(&self, env: &Envelope) {
        let mut acted = self.acted.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = acted.record(&env.id, env.sent_at, message::now()) {
            tracing::warn!(error = %e, "cannot record an acted message id");
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The commit that removed this host from cluster.yaml, while it is not listed.
    fn left_cluster(&self) -> Option<String> {
        self.local().left_cluster.clone()
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.borrow().clone()
    }

    fn cluster_id(&self) -> String {
        self.snapshot()
            .map(|s| s.cluster.id.clone())
            .unwrap_or_default()
    }

    fn addr_of(&self, host: &str) -> Option<String> {
        if host == self.me() {
            return self.own_addr();
        }
        self.snapshot()?
            .cluster
            .hosts
            .get(host)
            .map(|h| h.beanstalkd.clone())
    }

    fn own_addr(&self) -> Option<String> {
        self.cfg
            .beanstalkd
            .clone()
            .or_else(|| {
                self.snapshot()?
                    .cluster
                    .hosts
                    .get(self.me())
                    .map(|h| h.beanstalkd.clone())
            })
            .or_else(|| self.member_addr.clone())
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Whether `host` was seen under two identities (by this agent, or by another
    /// whose inventory says so): no create goes to it, from it or along it.
    fn identity_conflict(&self, host: &str) -> bool {
        let now = message::now();
        let ids = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        // Another host's report counts while its inventory is recent: the report of a
        // host that went silent must not hold creates back for ever.
        ids.conflicts(now).contains_key(host)
            || self
                .inventories
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|i| now.saturating_sub(i.listed_at) < identity::CONFLICT_HOLD)
                .filter_map(|i| i.agent.as_ref())
                .any(|a| a.conflicts.contains_key(host))
    }

    /// The next host and job of a forward of job `id` that may have reached it.
    fn maybe_forwarded(&self, id: &str) -> Option<(String, message::CreateJob)> {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A forward of job `id` to `to` may have reached it: the job only goes there again.
    fn forward_unsure(&self, id: &str, to: &str, job: message::CreateJob) {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (to.to_string(), job));
    }

    /// A forward of job `id` was put.
    fn forward_settled(&self, id: &str) {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// This host's worker ended op job `job_id` on `vm` (see [`OpInFlight::expires`]).
    fn op_ended(&self, vm: &str, job_id: &str) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.get_mut(vm).filter(|o| o.job_id == job_id) {
            o.expires
                .get_or_insert_with(|| Instant::now() + ENDED_OP_GRACE);
        }
    }

    /// Sleeps for `d`, or less when the agent stops.
    async fn sleep(&self, d: Duration) {
        let mut rx = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stopped(&mut rx) => {}
        }
    }

    /// Adds one to a counter (a Prometheus series name, labels included).
    fn count(&self, series: &str) {
        self.add(series, 1.0);
    }

    /// Adds `v` to a counter.
    fn add(&self, series: &str, v: f64) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(series.to_string())
            .or_default() += v;
    }

    /// Sets a gauge.
    fn set(&self, series: &str, v: f64) {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(series.to_string(), v);
    }

    fn event(
        &self,
        kind: &str,
        vm: Option<&str>,
        job: Option<&str>,
        commit: Option<&str>,
        message: String,
    ) {
        tracing::info!(kind, vm, job, commit, "{message}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.events.append(&Event {
            at: now.as_secs(),
            at_ms: now.as_millis() as u64,
            host: self.me().to_string(),
            kind: kind.to_string(),
            vm: vm.map(str::to_string),
            job: job.map(str::to_string),
            commit: commit.map(str::to_string),
            message,
        });
    }

    fn put_params(&self, pri: u32) -> PutParams {
        let ttr = self
            .snapshot()
            .map(|s| s.cluster.policies.ttr)
            .unwrap_or(Duration::from_secs(3600));
        worker::params(pri, ttr)
    }

    async fn send_result(&self, origin: &Origin, r: &JobResult) {
        // Taken now, after the job's work: this host's inventories numbered above it
        // were listed after the work (issue 14, case 4).
        let r = JobResult {
            inventory_seq: Some(self.inventory_seq.current()),
            ..r.clone()
        };
        let env = self.sealed(Envelope::new(
            &self.cluster_id(),
            self.me(),
            &origin.owner,
            Message::Result(r),
        ));
        if let Err(e) = self
            .peers
            .put(&origin.reply_to, tubes::RESULTS, &env, self.put_params(512))
            .await
        {
            // The owner learns the outcome from this host's inventory instead.
            tracing::warn!(to = %origin.reply_to, error = %e, "cannot send a result");
        }
    }

    /// The overload threshold this host crosses now, if any.
    /// Lists this host's VMs and tells admission what they claim.
    /// A listing kept since no change was seen is as good and costs no `vm list`.
    fn list_local(&self) -> Result<Vec<ActualVm>, BackendError> {
        let max_age = self
            .cfg
            .backend
            .list_interval
            .map_or(listing::MAX_AGE, |d| d.0);
        let _turn = self.listing.turn();
        if let Some(vms) = self.listing.kept(max_age) {
            return Ok(vms);
        }
        let token = self.listing.begin();
        let listing = self.admission().usage.begin(Instant::now());
        let vms = self.backend.list()?;
        self.admission().usage.listed(listing, &vms);
        self.listing.keep(token, listing, &vms);
        Ok(vms)
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn overload(&self, running_memory: crate::size::Size, limits: &Limits) -> Option<String> {
        let o = &self.cfg.overload;
        let probe = o
            .probe_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let probed = |key: &str| {
            probe.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key)).then(|| it.next()?.parse::<f64>().ok())?
            })
        };
        if let Some(max) = o.memory_in_use {
            let in_use = probed("memory_in_use").or_else(|| {
                limits
                    .memory
                    .filter(|m| m.bytes() > 0)
                    .map(|m| running_memory.bytes() as f64 / m.bytes() as f64)
            });
            if let Some(u) = in_use.filter(|u| *u >= max) {
                return Some(format!(
                    "memory in use {:.0}% >= {:.0}%",
                    u * 100.0,
                    max * 100.0
                ));
            }
        }
        if let (Some(max), Some(n)) = (o.net_bytes, probed("net_bytes")) {
            if n >= max as f64 {
                return Some(format!("network {n} bytes/s >= {max}"));
            }
        }
        for line in probe.lines() {
            // rctl values the probe found over their threshold: `rctl <what>`.
            if let Some(r) = line.strip_prefix("rctl ") {
                return Some(format!("rctl: {}", r.trim()));
            }
        }
        None
    }
}

/// Runs the agent until SIGTERM or SIGINT, or until it finds another agent live for its
/// host name: then it stops and returns why (the caller exits with `EX_CONFIG`).
pub async fn run(shared: Arc<Shared>) -> Option<String> {
    shared.event(
        "start",
        None,
        None,
        None,
        format!("agent {} starting", env!("CARGO_PKG_VERSION")),
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(lease::keep(shared.clone()));
    tasks.spawn(source_loop(shared.clone()));
    tasks.spawn(reconcile_loop(shared.clone()));
    tasks.spawn(inbox_loop(shared.clone()));
    tasks.spawn(publish_loop(shared.clone()));
    tasks.spawn(watch_vm_dir(shared.clone()));
    if let Some(addr) = shared.cfg.http {
        if let Err(e) = metrics::serve(shared.clone(), addr) {
            shared.event(
                "error",
                None,
                None,
                None,
                format!("cannot serve /metrics on {addr}: {e}"),
            );
        }
    }
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..shared.cfg.worker.max_creates {
        workers.spawn(worker::slot(shared.clone(), true));
    }
    workers.spawn(worker::slot(shared.clone(), false));

    tokio::select! {
        _ = wait_for_signal() => shared.event(
            "stop",
            None,
            None,
            None,
            "signal received: no new jobs; finishing or releasing the jobs in hand".into(),
        ),
        _ = shared.lease.refused() => {}
    }
    shared.stop.send_replace(true);
    shared.cancel.store(true, Ordering::SeqCst);
    while workers.join_next().await.is_some() {}
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    shared.event("stop", None, None, None, "agent stopped".into());
    shared.lease.refusal()
}

/// Watches the datastores while the agent runs, so that a listing is kept until
/// something there changes; a change goes into the next inventory soon.
async fn watch_vm_dir(shared: Arc<Shared>) {
    let b = shared.backend.clone();
    let dirs = tokio::task::spawn_blocking(move || b.watch_dirs()).await;
    let s = shared.clone();
    let watcher = match dirs {
        Ok(Ok(dirs)) => listing::watch(shared.listing.clone(), &dirs, move || {
            s.wake_publish.notify_one()
        }),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &watcher {
        tracing::warn!(error = %e, "no watch of the vm_dir: every pass and inventory lists the VMs");
    }
    let mut stop = shared.stop.subscribe();
    stopped(&mut stop).await;
    drop(watcher);
}

/// How long the inbox and each worker wait in one `reserve`. Each wait that ends empty
/// is a round trip to beanstalkd and a wake-up of an idle agent (issue 12); a job still
/// comes at once, and a job reserved after the lease was lost is given back as before.
/// A stopping agent finishes its waits (and meanwhile publishes what its last pass saw).
const RESERVE_WAIT: Duration = Duration::from_secs(5);

/// Resolves once the agent stops.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent can only be killed; run on regardless.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn poll_interval(shared: &Shared) -> Duration {
    shared
        .cfg
        .desired
        .poll_interval
        .map(|d| d.0)
        .unwrap_or_else(|| {
            shared
                .snapshot()
                .map(|s| s.cluster.policies.reconcile_interval)
                .unwrap_or(Duration::from_secs(60))
        })
}

/// A local path (or file:// URL) of the desired repo, for the file-system watch.
fn local_repo(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.contains("://") || path.contains('@') {
        return None;
    }
    let p = PathBuf::from(path);
    let git = p.join(".git");
    Some(if git.is_dir() { git } else { p })
}

/// What one fetch found.
enum Fetched {
    Unchanged,
    Good(Box<Snapshot>),
    Invalid(String, String),
}

fn fetch_and_load(src: &GitSource, branch: &str, last: Option<&str>) -> Result<Fetched, String> {
    let fetched = src.fetch();
    // A remote that is down still leaves the last fetched commit in the clone.
    let oid = match (src.resolve(branch), &fetched) {
        (Ok(oid), _) => oid,
        (Err(e), Ok(())) => return Err(format!("{e}")),
        (Err(_), Err(e)) => return Err(format!("{e}")),
    };
    let commit = oid.to_string();
    let fetch_error = fetched.err().map(|e| e.to_string());
    if last == Some(commit.as_str()) {
        return match fetch_error {
            Some(e) => Err(e),
            None => Ok(Fetched::Unchanged),
        };
    }
    let files = src.read(oid).map_err(|e| e.to_string())?;
    match desired::load(&files, Some(commit.clone())) {
        Ok(s) => Ok(Fetched::Good(Box::new(s))),
        Err(invalid) => {
            let text = invalid
                .0
                .iter()
                .take(5)
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Ok(Fetched::Invalid(commit, text))
        }
    }
}

async fn source_loop(shared: Arc<Shared>) {
    let url = shared.cfg.desired.url.clone();
    let dir = source::cache_dir(&shared.cfg.state_dir.join("git"), &url);
    let mut src = None;
    let mut last: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    // Local repos are watched, so a commit is seen at once.
    let watch = shared.cfg.desired.watch;
    // Only a write of the branch's ref is news (issue 12, item 4): the agent's own fetch
    // opens files under `.git`, and a watch woken by that fetched and reconciled without
    // end.
    let branch_ref = PathBuf::from("refs/heads").join(&shared.cfg.desired.branch);
    let _watcher = local_repo(&url).filter(|_| watch).and_then(|path| {
        use notify::Watcher;
        let s = shared.clone();
        let refs = branch_ref.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let news = res.is_ok_and(|ev| {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev
                        .paths
                        .iter()
                        .any(|p| p.ends_with(&refs) || p.ends_with("packed-refs"))
            });
            if news {
                s.wake_fetch.notify_one();
            }
        })
        .ok()?;
        // The refs, not the objects: a commit writes many objects and one ref.
        w.watch(&path.join("refs/heads"), notify::RecursiveMode::Recursive)
            .ok()?;
        w.watch(&path, notify::RecursiveMode::NonRecursive).ok()?;
        Some(w)
    });
    // Whether this fetch was asked for (a trigger or a file-system event).
    let mut woken = false;
    loop {
        let s = shared.clone();
        let branch = shared.cfg.desired.branch.clone();
        let url2 = url.clone();
        let dir2 = dir.clone();
        let last2 = last.clone();
        let taken = src.take();
        let res = tokio::task::spawn_blocking(move || {
            let src = match taken {
                Some(s) => s,
                None => GitSource::open(&url2, &dir2).map_err(|e| (None, e.to_string()))?,
            };
            let r = fetch_and_load(&src, &branch, last2.as_deref());
            Ok::<_, (Option<GitSource>, String)>((src, r))
        })
        .await;
        let outcome = match res {
            Ok(Ok((g, r))) => {
                src = Some(g);
                r
            }
            Ok(Err((_, e))) => Err(e),
            Err(e) => Err(e.to_string()),
        };
        let mut wait = poll_interval(&s);
        let failed = outcome.is_err();
        match outcome {
            Ok(Fetched::Unchanged) => {
                last_error = None;
                backoff = Duration::from_millis(500);
                if woken {
                    // A trigger asks for a pass even when the commit did not change.
                    s.wake_reconcile.notify_one();
                }
            }
            Ok(Fetched::Good(snap)) => {
                last_error = None;
                backoff = Duration::from_millis(500);
                let commit = snap.commit.clone();
                last = commit.clone();
                let listed = snap.cluster.hosts.contains_key(s.me());
                let was = s.local().left_cluster.clone();
                if !listed && was.is_none() {
                    // Safety rule 9: its guests stay where they are, and this agent goes
                    // on publishing them; it creates, changes and destroys nothing.
                    s.event(
                        "error",
                        None,
                        None,
                        commit.as_deref(),
                        format!(
                            "this host `{}` left cluster.yaml at {}: it creates, changes and destroys nothing from now on, and its VMs stay as they are (the other hosts do not create them elsewhere until `flotilla host forget {}`)",
                            s.me(),
                            commit.as_deref().unwrap_or("?"),
                            s.me()
                        ),
                    );
                } else if listed && was.is_some() {
                    s.event(
                        "snapshot",
                        None,
                        None,
                        commit.as_deref(),
                        format!("this host `{}` is in cluster.yaml again", s.me()),
                    );
                }
                s.local().left_cluster = if listed { None } else { commit.clone() };
                if let Some(c) = &commit {
                    let mut owners = s.owners.lock().unwrap_or_else(|p| p.into_inner());
                    // Loaded again from the git cache when needed (see `owners_at`).
                    if owners.len() > 256 {
                        owners.clear();
                    }
                    owners.insert(c.clone(), decide::CommitOwners::of(&snap));
                }
                if !listed && s.snapshot().is_some() {
                    // Its last snapshot as a member keeps its address, limits and cluster
                    // for the inventory it goes on publishing; the pass records the
                    // commit that removed it.
                    s.wake_reconcile.notify_one();
                } else if !listed {
                    // Started after it was removed: the snapshot serves for the cluster
                    // id; its address comes from the hosts file of its last membership.
                    s.snapshot.send_replace(Some(Arc::new(*snap)));
                    s.wake_reconcile.notify_one();
                } else {
                    s.event(
                        "snapshot",
                        None,
                        None,
                        commit.as_deref(),
                        format!(
                            "desired state at {}: {} VMs",
                            commit.as_deref().unwrap_or("?"),
                            snap.vms.len()
                        ),
                    );
                    if let Err(e) = note_departures(&s, &snap) {
                        s.event(
                            "error",
                            None,
                            None,
                            commit.as_deref(),
                            format!("cannot record the hosts that left cluster.yaml: {e}"),
                        );
                    }
                    s.snapshot.send_replace(Some(Arc::new(*snap)));
                    s.wake_reconcile.notify_one();
                }
            }
            Ok(Fetched::Invalid(commit, why)) => {
                last = Some(commit.clone());
                s.count("flotilla_snapshots_invalid_total");
                s.event(
                    "error",
                    None,
                    None,
                    Some(&commit),
                    format!("desired state at {commit} is invalid; nothing from it is applied, the last good one is kept: {why}"),
                );
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    s.event(
                        "error",
                        None,
                        None,
                        None,
                        format!("cannot fetch the desired repo {url}: {e}; keeping the last good desired state and retrying"),
                    );
                }
                last_error = Some(e);
                wait = wait.min(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
        let mut stop = s.stop.subscribe();
        woken = false;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A failed fetch waits out its backoff whatever wakes it.
            _ = s.wake_fetch.notified(), if !failed => {
                // Coalesce a burst of file-system events into one fetch.
                tokio::time::sleep(Duration::from_millis(50)).await;
                woken = true;
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn reconcile_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(500);
    // A burst of wakes becomes one pass per gap. Results come in bursts while builds run,
    // and all a pass does for most of them is close an intent; each pass lists the host
    // and reads every inventory, so they wait longer, unless news comes meanwhile.
    let min_gap = Duration::from_millis(250);
    let results_gap = Duration::from_secs(1);
    // The same failure is written to the event log once, not at every retry.
    let mut last_error: Option<String> = None;
    loop {
        let pass = Instant::now();
        let mut failed = false;
        let wait = match shared.snapshot() {
            Some(snap) => match reconcile_once(&shared, &snap).await {
                Ok(waiting) => {
                    last_error = None;
                    backoff = Duration::from_millis(500);
                    if waiting {
                        Duration::from_millis(100)
                    } else {
                        poll_interval(&shared)
                    }
                }
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        shared.event(
                            "error",
                            None,
                            None,
                            snap.commit.as_deref(),
                            format!("reconcile failed: {e}"),
                        );
                    }
                    last_error = Some(e);
                    failed = true;
                    let b = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    b
                }
            },
            None => poll_interval(&shared),
        };
        let mut stop = shared.stop.subscribe();
        // A failed pass waits out its backoff whatever wakes it.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake_reconcile.notified(), if !failed => {
                tokio::time::sleep(min_gap.saturating_sub(pass.elapsed())).await;
            }
            _ = shared.results_in.notified(), if !failed => {
                tokio::select! {
                    _ = tokio::time::sleep(results_gap.saturating_sub(pass.elapsed())) => {}
                    _ = shared.wake_reconcile.notified() => {
                        tokio::time::sleep(min_gap.saturating_sub(pass.elapsed())).await;
                    }
                }
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Lists this host's VMs on a blocking thread.
async fn list_local(shared: &Arc<Shared>) -> Result<Vec<ActualVm>, String> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.list_local())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Reads every other host's inventory; keeps the last one read of a host that does not
/// answer.
async fn refresh_inventories(shared: &Arc<Shared>, snap: &Snapshot) -> BTreeSet<String> {
    let mut answered = BTreeSet::new();
    let mut reads = Vec::new();
    // Hosts that left cluster.yaml are read too: their guests still exist (rule 9).
    let departed: Vec<(String, String)> = shared
        .departed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .hosts()
        .iter()
        .map(|(h, d)| (h.clone(), d.addr.clone()))
        .collect();
    let hosts = snap
        .cluster
        .hosts
        .iter()
        .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
        .chain(departed);
    for (name, addr) in hosts {
        if name == shared.me() {
            continue;
        }
        let s = shared.clone();
        reads.push(tokio::spawn(async move {
            let window = s.cfg.message_window.0.as_secs();
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                s.peers.inventory(&addr, &name, Some((&s.keys, window))),
            )
            .await;
            (name, r)
        }));
    }
    for r in reads {
        let Ok((name, r)) = r.await else { continue };
        match r {
            Ok(Ok((Some(inv), took))) if inv.host == name => {
                answered.insert(name.clone());
                let saw = shared
                    .departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saw(&name, &inv);
                if let Err(e) = saw {
                    tracing::warn!(host = %name, error = %e, "cannot record a departed host's inventory");
                }
                if let Some(a) = &inv.agent {
                    shared
                        .identities
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .observe(&name, &a.identity, message::now());
                }
                shared
                    .latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), took);
                shared
                    .inventories
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, inv);
            }
            Ok(Ok((Some(inv), _))) => {
                tracing::warn!(host = %name, claimed = %inv.host, "inventory names another host; ignored");
            }
            Ok(Ok((None, _))) => {}
            Ok(Err(e)) => tracing::debug!(host = %name, error = %e, "no inventory"),
            Err(_) => tracing::debug!(host = %name, "inventory read timed out"),
        }
    }
    answered
}

/// Who owns which VM under each of `commits`: from the snapshots this agent loaded, else
/// read from its git cache (a commit it skipped). A commit it cannot read is left out,
/// and creates wait for hosts on it whatever the VM.
async fn owners_at<'a>(
    shared: &Arc<Shared>,
    commits: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, decide::CommitOwners> {
    let wanted: BTreeSet<String> = commits.cloned().collect();
    // Only the commits asked for: the cache may hold many, each with every VM.
    let mut known: BTreeMap<String, decide::CommitOwners> = {
        let cache = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .iter()
            .filter_map(|c| Some((c.clone(), cache.get(c)?.clone())))
            .collect()
    };
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|c| !known.contains_key(c))
        .collect();
    if missing.is_empty() {
        return known;
    }
    let url = shared.cfg.desired.url.clone();
    let dir = source::cache_dir(&shared.cfg.state_dir.join("git"), &url);
    let loaded = tokio::task::spawn_blocking(move || {
        let Ok(src) = GitSource::open(&url, &dir) else {
            return Vec::new();
        };
        missing
            .into_iter()
            .filter_map(|c| {
                let oid = git2::Oid::from_str(&c).ok()?;
                let files = src.read(oid).ok()?;
                let snap = desired::load(&files, Some(c.clone())).ok()?;
                Some((c, decide::CommitOwners::of(&snap)))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut cache = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
    for (c, o) in loaded {
        cache.insert(c.clone(), o.clone());
        known.insert(c, o);
    }
    known
}

/// One pass: list, read inventories, plan, emit this host's share. Returns true when
/// creates wait for hosts not heard from yet (the next pass should come soon).
async fn reconcile_once(shared: &Arc<Shared>, snap: &Arc<Snapshot>) -> Result<bool, String> {
    let started = Instant::now();
    if !shared.lease.held() {
        // Safety rule 8: without the host's lease this agent may be a second one.
        return Ok(false);
    }
    if let Some(left) = shared.left_cluster() {
        // Safety rule 9: a host that left cluster.yaml acts on nothing; it only goes on
        // publishing its inventory, now as having seen the commit that removed it, so
        // that creates waiting for it go ahead.
        shared.local().reconciled_commit = Some(left);
        shared.wake_publish.notify_one();
        return Ok(false);
    }
    let me = shared.me().to_string();
    let seq = shared.inventory_seq.next();
    let listed_at = message::now();
    let local = list_local(shared)
        .await
        .map_err(|e| format!("listing this host's VMs: {e}"))?;
    let answered = refresh_inventories(shared, snap).await;
    let (departed, forgotten) = {
        let d = shared.departed.lock().unwrap_or_else(|p| p.into_inner());
        (d.hosts().clone(), d.forgotten().clone())
    };
    let mut inventories = shared
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // A host that left cluster.yaml counts with its last inventory, read now or kept on
    // disk; one declared gone does not count at all.
    inventories.retain(|h, _| snap.cluster.hosts.contains_key(h) || departed.contains_key(h));
    for (h, d) in &departed {
        if let (false, Some(inv)) = (inventories.contains_key(h), &d.inventory) {
            inventories.insert(h.clone(), inv.clone());
        }
    }
    // This host's own listing counts as its freshest inventory (intents placed here
    // close on it).
    inventories.insert(
        me.clone(),
        inventory(shared, snap, local.clone(), listed_at, seq)?,
    );
    let mut actual = vec![HostActual {
        host: me.clone(),
        vms: local.clone(),
    }];
    for (name, inv) in &inventories {
        if name != &me {
            actual.push(HostActual {
                host: name.clone(),
                vms: inv.vms.clone(),
            });
        }
    }
    // A host that left cluster.yaml and whose inventory this host never read may hold
    // any VM: it counts as unseen until it answers or is forgotten (rule 9).
    let unseen = decide::unseen(
        snap.cluster.hosts.keys().chain(departed.keys()),
        &me,
        actual.iter().map(|a| a.host.as_str()),
    );

    // Intents: close the ones that are done with, keep the rest in flight.
    let now = message::now();
    let mut in_flight: Vec<InFlight> = Vec::new();
    // Failed creates waiting for their retry time: nothing is under way for them.
    let mut retrying = 0;
    let intents = shared.intents.all().map_err(|e| e.to_string())?;
    for intent in &intents {
        let hash = snap.vms.get(&intent.vm).map(|v| v.spec_hash.as_str());
        match decide::intent_fate(intent, hash, &inventories, now) {
            IntentFate::Open => {
                if matches!(intent.status, IntentStatus::Failed { .. }) {
                    retrying += 1;
                }
                in_flight.push(decide::in_flight(intent));
            }
            IntentFate::Close(why) => {
                shared
                    .intents
                    .remove(&intent.vm)
                    .map_err(|e| e.to_string())?;
                shared.event(
                    "intent",
                    Some(&intent.vm),
                    Some(&intent.job_id),
                    Some(&intent.commit),
                    format!("create intent closed: {why}"),
                );
            }
        }
    }
    {
        let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|_, o| o.expires.is_none_or(|t| Instant::now() < t));
        for (vm, o) in ops.iter() {
            in_flight.push(InFlight {
                vm: vm.clone(),
                kind: o.kind,
                host: Some(me.clone()),
            });
        }
    }
    // A failed op waits for its retry time, but nothing is under way for its VM: other
    // actions on it go ahead (this one is held back below, not planned around).
    let retrying_ops: BTreeSet<(String, Kind)> = {
        let mut retry = shared.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        retry.retain(|_, t| now < *t);
        retry.keys().cloned().collect()
    };
    // Another host's open create (it owned the VM under an earlier host set or pin) holds
    // the VM back here too: a second create now could build it twice.
    let mut planned_in_flight = in_flight.clone();
    planned_in_flight.extend(decide::others_in_flight(
        &inventories,
        &me,
        now,
        shared.cfg.worker.create_deadline.0.as_secs(),
    ));
    let plan = planner::plan(snap, &actual, &planned_in_flight, &PlanOptions::default());
    // Safety rules 2 and 9: a create waits for every host that may still send it under
    // another commit, answering or not, until it is on this commit or declared gone.
    let commits: BTreeMap<String, Option<String>> = inventories
        .iter()
        .map(|(h, inv)| (h.clone(), inv.commit.clone()))
        .collect();
    let owners = owners_at(shared, commits.values().flatten()).await;
    let mut waiting: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in plan.actions() {
        if let Action::Create { owner, vm, .. } = a {
            if owner != &me {
                continue;
            }
            let hosts = decide::waits_for(
                vm,
                &me,
                snap.commit.as_deref(),
                &commits,
                &owners,
                &forgotten,
            );
            if !hosts.is_empty() {
                waiting.insert(vm.clone(), hosts);
            }
        }
    }
    let skews = clock_skews(shared, &inventories, &answered, &me, now);
    let mut emits = decide::select(&plan, &me, unseen.is_empty() && skews.is_empty(), &waiting);
    let selected = emits.len();
    emits.retain(|e| match e {
        Emit::Op(a) => !retrying_ops.contains(&(a.vm().to_string(), a.kind())),
        Emit::Create(_) => true,
    });
    let held_back = selected - emits.len();
    let waiting_creates = plan
        .actions()
        .filter(|a| matches!(a, Action::Create { owner, .. } if owner == &me))
        .count();
    if !unseen.is_empty() && waiting_creates > 0 {
        tracing::info!(hosts = ?unseen, creates = waiting_creates, "creates wait until every host's inventory is known");
    }
    if !waiting.is_empty() {
        tracing::debug!(
            ?waiting,
            "creates wait until these hosts reconcile this commit"
        );
    }
    // Soon again only while a host it waits for answers (it is about to catch up); a
    // silent one is waited for at the ordinary pace.
    let catching_up = waiting.values().flatten().any(|h| answered.contains(h));
    shared.local().waiting = waiting
        .iter()
        .map(|(vm, hosts)| message::WaitingCreate {
            vm: vm.clone(),
            for_hosts: hosts.clone(),
        })
        .collect();
    let commit = snap.commit.clone().unwrap_or_default();
    let origin = Origin {
        commit: commit.clone(),
        owner: me.clone(),
        reply_to: decide::reply_to(snap, &me, shared.own_addr().as_deref()),
    };
    // Applied means this host saw every other host too (an unseen host could still need
    // something from it), and nothing is under way but failed creates waiting to retry:
    // those are shown as such in the inventory, and `apply --wait` reports them.
    let nothing_to_do = emits.is_empty()
        && held_back == 0
        && in_flight.len() == retrying
        && waiting_creates == 0
        && unseen.is_empty();
    let mut unsent = Unsent::default();
    for emit in emits {
        if !shared.lease.held() {
            break;
        }
        match emit {
            Emit::Create(action) => {
                emit_create(shared, snap, action, &origin, &inventories, &mut unsent).await
            }
            Emit::Op(action) => emit_op(shared, snap, action, &origin, &local).await,
        }
    }
    // One line per unreachable first hop, not one per create.
    for (to, (n, e)) in unsent.0 {
        shared.event(
            "error",
            None,
            None,
            Some(&origin.commit),
            format!("cannot send {n} creates to {to}: {e}; they wait for the next pass"),
        );
    }
    for b in plan.blocked() {
        if b.host == me {
            tracing::debug!(vm = %b.vm, reason = ?b.reason, "{}", b.detail);
        }
    }
    if nothing_to_do {
        shared
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied_commit = snap.commit.clone();
    }
    shared.count("flotilla_reconciles_total");
    let took = started.elapsed().as_secs_f64();
    shared.add("flotilla_reconcile_seconds_sum", took);
    shared.set("flotilla_reconcile_last_seconds", took);
    shared.set(
        "flotilla_last_reconcile_timestamp_seconds",
        message::now() as f64,
    );
    let summary = plan.summary();
    for (action, n) in [
        ("create", summary.create),
        ("update", summary.update),
        ("grow_disk", summary.grow_disk),
        ("replace", summary.replace),
        ("start", summary.start),
        ("stop", summary.stop),
        ("destroy", summary.destroy),
        ("blocked", summary.blocked),
        ("pending", summary.pending),
    ] {
        shared.set(
            &format!("flotilla_plan_actions{{action=\"{action}\"}}"),
            n as f64,
        );
    }
    shared
        .local
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reconciled_commit = snap.commit.clone();
    tracing::debug!(took = ?started.elapsed(), "reconciled");
    shared.wake_publish.notify_one();
    Ok(!unseen.is_empty() || catching_up)
}

/// Issue 14, case 4: the clock skews beyond `max_clock_skew` that stop this host's
/// creates, first-hand or reported by peers. A change in what this host sees itself is
/// an error event; the sighting goes into its inventory, for `flotilla status` and for
/// the peers, which stop too.
fn clock_skews(
    shared: &Shared,
    inventories: &BTreeMap<String, Inventory>,
    answered: &BTreeSet<String>,
    me: &str,
    now: u64,
) -> Vec<String> {
    let max = shared.cfg.max_clock_skew.0.as_secs();
    let seen = decide::clocks_ahead(inventories, me, now, max);
    let sighting = (!seen.is_empty()).then(|| seen.join("; "));
    let changed = {
        let mut local = shared.local.lock().unwrap_or_else(|p| p.into_inner());
        let changed = local.clock_skew != sighting;
        local.clock_skew = sighting.clone();
        changed
    };
    if changed {
        let text = match &sighting {
            Some(s) => format!("{s}: this host sends no creates until the clocks agree"),
            None => "clocks agree again within max_clock_skew".to_string(),
        };
        shared.event("error", None, None, None, text);
    }
    let mut all = seen;
    // Reports only from hosts heard from now: a host shut down to fix its clock must not
    // hold every create back with the last report it published.
    all.extend(decide::skew_reports(
        inventories.iter().filter(|(h, _)| answered.contains(*h)),
        me,
    ));
    if !all.is_empty() {
        tracing::warn!(skews = ?all, "creates held back: clocks disagree beyond max_clock_skew");
    }
    all
}

/// First hops that could not be reached in this pass: how many creates were not sent
/// to each, and the first error.
#[derive(Default)]
struct Unsent(BTreeMap<String, (usize, String)>);

async fn emit_create(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    action: &Action,
    origin: &Origin,
    inventories: &BTreeMap<String, Inventory>,
    unsent: &mut Unsent,
) {
    let Action::Create {
        host,
        vm,
        resume,
        spec,
        ..
    } = action
    else {
        return;
    };
    let latencies = shared
        .latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // A VM with `host:` or `start_at:` goes there first, whatever the strategy.
    let fixed = *resume || spec.host.is_some() || spec.start_at.is_some();
    let to = decide::first_hop(shared.cfg.first_hop, host, fixed, inventories, &latencies);
    if let Some(h) = [shared.me(), &to]
        .into_iter()
        .find(|h| shared.identity_conflict(h))
    {
        tracing::warn!(%vm, host = %h, "create held back: the host is seen under two identities");
        return;
    }
    let Some(addr) = shared.addr_of(&to) else {
        return;
    };
    if let Some((n, _)) = unsent.0.get_mut(&to) {
        // Unreachable a moment ago in this pass: no intent, no attempt.
        *n += 1;
        return;
    }
    let now = message::now();
    let deadline = now + shared.cfg.worker.create_deadline.0.as_secs();
    let job = decide::create_job(snap, spec, origin.clone(), deadline);
    let env = shared.sealed(Envelope::new(
        &snap.cluster.id,
        shared.me(),
        &to,
        Message::Create(job),
    ));
    // Safety rule 2: the intent is on disk before the job is on the queue.
    let intent = Intent {
        vm: vm.clone(),
        job_id: env.id.clone(),
        first_hop: to.clone(),
        commit: origin.commit.clone(),
        spec_hash: spec.spec_hash.clone(),
        recorded_at: now,
        deadline,
        status: IntentStatus::Sent,
    };
    if let Err(e) = shared.intents.record(&intent) {
        shared.event(
            "error",
            Some(vm),
            None,
            None,
            format!("cannot record the create intent, so no create is sent: {e}"),
        );
        return;
    }
    match shared
        .peers
        .put(&addr, tubes::CREATE, &env, shared.put_params(1024))
        .await
    {
        Ok(_) => {
            shared.count("flotilla_emitted_total{kind=\"create\"}");
            shared.event(
                "emit",
                Some(vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("create {vm} sent to {to}"),
            );
        }
        Err(e) if e.nothing_sent() => {
            // Nothing reached the queue: the intent can go, the next pass tries again.
            let _ = shared.intents.remove(vm);
            tracing::debug!(%vm, %to, error = %e, "create not sent");
            unsent.0.insert(to.clone(), (1, e.to_string()));
        }
        Err(e) => {
            // It may have reached the queue: the intent stays until its deadline.
            shared.event("error", Some(vm), Some(&env.id), None, format!("create {vm} to {to} may not have been sent: {e}; waiting for its result or deadline"));
        }
    }
}

/// Queues `action` on this host's ops tube, naming the VM it means by the job id in its
/// marker (`local` is the listing the action was planned from), and records it in
/// flight first: at most one op per VM is in flight on this host (safety rule 10).
async fn emit_op(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    action: &Action,
    origin: &Origin,
    local: &[ActualVm],
) {
    let me = shared.me().to_string();
    let vm = action.vm().to_string();
    let Some(expect_job) = local
        .iter()
        .find(|v| v.name == vm)
        .and_then(|v| v.marker.as_ref())
        .map(|m| m.job_id.clone())
    else {
        // The planner plans ops on managed VMs only, which have a marker.
        tracing::warn!(%vm, "no marker to name the VM by; the op is not queued");
        return;
    };
    let spec_hash = snap.vms.get(&vm).map(|s| s.spec_hash.clone());
    let job = |replace| VmJob {
        vm: vm.clone(),
        host: me.clone(),
        expect_job: expect_job.clone(),
        spec_hash: spec_hash.clone(),
        replace,
        origin: origin.clone(),
    };
    let (body, kind, pri) = match action {
        Action::Destroy { .. } => (Message::Destroy(job(false)), Kind::Destroy, 100),
        // A replace is in flight as a replace: its destroy says so, and the planner holds
        // the VM back until it has ended.
        Action::Replace { .. } => (Message::Destroy(job(true)), Kind::Replace, 100),
        Action::Start { .. } => (Message::Start(job(false)), Kind::Start, 500),
        Action::Stop { .. } => (Message::Stop(job(false)), Kind::Stop, 500),
        Action::Update {
            changes,
            protect,
            autostart,
            restart,
            spec_hash,
            ..
        } => (
            Message::Update(UpdateJob {
                vm: vm.clone(),
                host: me.clone(),
                expect_job: expect_job.clone(),
                set: changes
                    .iter()
                    .filter_map(|c| c.to.clone().map(|v| (c.key.clone(), v)))
                    .collect(),
                unset: changes
                    .iter()
                    .filter(|c| c.to.is_none())
                    .map(|c| c.key.clone())
                    .collect(),
                grow_disk: None,
                restart: *restart,
                protect: *protect,
                autostart: *autostart,
                spec_hash: spec_hash.clone(),
                origin: origin.clone(),
            }),
            Kind::Update,
            800,
        ),
        Action::GrowDisk { to, restart, .. } => (
            Message::Update(UpdateJob {
                vm: vm.clone(),
                host: me.clone(),
                expect_job: expect_job.clone(),
                set: BTreeMap::new(),
                unset: Vec::new(),
                grow_disk: Some(*to),
                restart: *restart,
                protect: None,
                autostart: None,
                spec_hash: spec_hash.clone().unwrap_or_default(),
                origin: origin.clone(),
            }),
            Kind::GrowDisk,
            800,
        ),
        Action::Create { .. } => return,
    };
    let Some(addr) = shared.own_addr() else {
        return;
    };
    let env = shared.sealed(Envelope::new(&snap.cluster.id, &me, &me, body));
    // In flight before it is on the queue: its result can come before `put` returns, and
    // must find it. One entry per VM, so a VM with an op in flight gets no second one.
    {
        let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.get(&vm) {
            tracing::warn!(%vm, kind = ?o.kind, job = %o.job_id, "an op is in flight already; no second one is queued");
            return;
        }
        ops.insert(
            vm.clone(),
            OpInFlight {
                kind,
                job_id: env.id.clone(),
                expires: None,
            },
        );
    }
    match shared
        .peers
        .put(&addr, tubes::OPS, &env, shared.put_params(pri))
        .await
    {
        Ok(_) => {
            shared.count(&format!(
                "flotilla_emitted_total{{kind=\"{}\"}}",
                env.body.kind()
            ));
            shared.event(
                "emit",
                Some(&vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("{} {vm} queued", env.body.kind()),
            );
        }
        Err(e) => {
            let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
            if ops.get(&vm).is_some_and(|o| o.job_id == env.id) {
                if e.nothing_sent() {
                    ops.remove(&vm);
                } else if let Some(o) = ops.get_mut(&vm) {
                    // It may be on the queue: held like a failed op, until its retry time.
                    o.expires = Some(Instant::now() + shared.cfg.worker.retry_failed.0);
                }
            }
            drop(ops);
            shared.event(
                "error",
                Some(&vm),
                None,
                None,
                format!("cannot queue {} {vm}: {e}", env.body.kind()),
            )
        }
    }
}

/// Results and triggers, from this host's beanstalkd.
async fn inbox_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    while !shared.stopping() {
        let Some(addr) = shared.own_addr() else {
            shared.sleep(Duration::from_millis(200)).await;
            continue;
        };
        let conn = async {
            let mut c = Client::connect(&addr).await?;
            c.watch(tubes::RESULTS).await?;
            c.watch(tubes::CONTROL).await?;
            c.ignore("default").await?;
            Ok::<_, beanstalk::Error>(c)
        };
        let mut client = match conn.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "inbox cannot reach beanstalkd; retrying");
                shared.sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        while !shared.stopping() {
            if !shared.lease.held() {
                shared.sleep(Duration::from_millis(200)).await;
                continue;
            }
            let job = match client.reserve_with_timeout(RESERVE_WAIT).await {
                Ok(Some(j)) if !shared.lease.held() => {
                    let _ = client.release(j.id, 512, 0).await;
                    continue;
                }
                Ok(Some(j)) => j,
                Ok(None) | Err(beanstalk::Error::DeadlineSoon) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "inbox lost beanstalkd");
                    break;
                }
            };
            let decoded = message::decode(&job.body);
            if let Ok(env) = &decoded {
                // Where the job was read from is half of its address.
                let tube = match client.stats_job(job.id).await {
                    Ok(st) => st.tube,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox cannot read a job's tube; releasing it");
                        let _ = client.release(job.id, 1024, 1).await;
                        continue;
                    }
                };
                if shared.check(env, &tube).is_err() {
                    if let Err(e) = client.bury(job.id, 1024).await {
                        tracing::warn!(error = %e, "inbox cannot bury a refused message");
                    }
                    continue;
                }
                shared.acted(env);
            }
            let done = match decoded {
                Ok(Envelope {
                    body: Message::Result(r),
                    ..
                }) => {
                    on_result(&shared, r);
                    client.delete(job.id).await
                }
                Ok(Envelope {
                    body: Message::Forget(f),
                    from,
                    ..
                }) => {
                    on_forget(&shared, &f, &from);
                    client.delete(job.id).await
                }
                Ok(Envelope {
                    body: Message::Trigger(t),
                    from,
                    ..
                }) => {
                    shared.event(
                        "trigger",
                        None,
                        None,
                        None,
                        format!("trigger from {from}: {}", t.reason),
                    );
                    // The fetch wakes the reconciler when it is done: a pass now would
                    // still plan the old commit and hold the next one back by a gap.
                    shared.wake_fetch.notify_one();
                    client.delete(job.id).await
                }
                Ok(other) => {
                    shared.event(
                        "buried",
                        None,
                        None,
                        None,
                        format!("a `{}` message in the inbox; buried", other.body.kind()),
                    );
                    client.bury(job.id, 1024).await
                }
                Err(e) => {
                    shared.event(
                        "buried",
                        None,
                        None,
                        None,
                        format!("unreadable message in the inbox, buried: {e}"),
                    );
                    client.bury(job.id, 1024).await
                }
            };
            if let Err(e) = done {
                tracing::warn!(error = %e, "inbox cannot end a job");
            }
        }
    }
}

/// An operator declared a host gone for good: its last inventory no longer holds VMs
/// back, and no create waits for it any more (safety rule 9). Logged as a warning: it
/// lets VMs that host may still run be created elsewhere.
fn on_forget(shared: &Shared, f: &message::Forget, from: &str) {
    let res = shared
        .departed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .forget(&f.host);
    // A host still in cluster.yaml keeps counting with its last inventory (its VMs are
    // not created elsewhere while it is listed); only the waits for it end.
    let listed = shared
        .snapshot()
        .is_some_and(|s| s.cluster.hosts.contains_key(&f.host));
    if !listed {
        shared
            .inventories
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&f.host);
    }
    match res {
        Ok(_) => {
            tracing::warn!(host = %f.host, by = %f.by, "host declared gone for good");
            shared.event(
                "forget",
                None,
                None,
                None,
                format!(
                    "host `{}` declared gone for good by {} (sent from {from}): the VMs its last inventory showed may be created elsewhere, and no create waits for it until it answers again",
                    f.host, f.by
                ),
            );
        }
        Err(e) => shared.event(
            "error",
            None,
            None,
            None,
            format!("cannot record that host `{}` is gone: {e}", f.host),
        ),
    }
    // Recorded: the creates it held back go out on the next pass.
    shared.wake_reconcile.notify_one();
}

fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Done => "done",
        Outcome::Unplaceable { .. } => "unplaceable",
        Outcome::Failed { .. } => "failed",
        Outcome::Refused { .. } => "refused",
        Outcome::Dropped { .. } => "dropped",
    }
}

fn on_result(shared: &Arc<Shared>, r: JobResult) {
    let now = message::now();
    let text = match &r.outcome {
        Outcome::Done => "done".to_string(),
        Outcome::Unplaceable { reason } => format!("unplaceable: {reason}"),
        Outcome::Failed { reason, attempts } => format!("failed after {attempts} tries: {reason}"),
        Outcome::Refused { reason } => format!("refused: {reason}"),
        Outcome::Dropped { reason } => format!("dropped: {reason}"),
    };
    shared.count(&format!(
        "flotilla_results_total{{kind=\"{}\",outcome=\"{}\"}}",
        r.job_kind,
        outcome_name(&r.outcome)
    ));
    shared.event(
        "result",
        Some(&r.vm),
        Some(&r.job_id),
        Some(&r.commit),
        format!("{} {} on {}: {text}", r.job_kind, r.vm, r.host),
    );
    // A dropped op is not a failure: the desired state moved on before it ran.
    if !matches!(r.outcome, Outcome::Done | Outcome::Dropped { .. }) {
        let mut local = shared.local.lock().unwrap_or_else(|p| p.into_inner());
        local.failures.push_back(RecentFailure {
            vm: r.vm.clone(),
            job_kind: r.job_kind.clone(),
            host: r.host.clone(),
            reason: text.clone(),
            at: now,
        });
        while local.failures.len() > 20 {
            local.failures.pop_front();
        }
    }
    let retry_at = now + shared.cfg.worker.retry_failed.0.as_secs();
    if r.job_kind == "create" {
        if let Ok(Some(mut intent)) = shared.intents.get(&r.vm) {
            if intent.job_id == r.job_id {
                let update = match &r.outcome {
                    Outcome::Done => Some(IntentStatus::Placed {
                        host: r.host.clone(),
                        at: now,
                        seq: r.inventory_seq,
                    }),
                    Outcome::Unplaceable { .. } | Outcome::Failed { .. } => {
                        Some(IntentStatus::Failed {
                            reason: text.clone(),
                            retry_at,
                        })
                    }
                    Outcome::Refused { .. } | Outcome::Dropped { .. } => None,
                };
                let res = match update {
                    Some(status) => {
                        intent.status = status;
                        shared.intents.record(&intent)
                    }
                    None => shared.intents.remove(&r.vm),
                };
                if let Err(e) = res {
                    shared.event(
                        "error",
                        Some(&r.vm),
                        Some(&r.job_id),
                        None,
                        format!("cannot update the create intent: {e}"),
                    );
                }
            }
        }
    } else {
        let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.get(&r.vm).filter(|o| o.job_id == r.job_id) {
            if matches!(
                r.outcome,
                Outcome::Failed { .. } | Outcome::Unplaceable { .. }
            ) {
                shared
                    .retry_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((r.vm.clone(), o.kind), retry_at);
            }
        }
        // Ended, whatever the outcome: nothing is under way for the VM any more.
        if ops.get(&r.vm).is_some_and(|o| o.job_id == r.job_id) {
            ops.remove(&r.vm);
        }
    }
    shared.results_in.notify_one();
}

/// This host's inventory, now: `seq` was taken before `vms` were listed.
fn inventory(
    shared: &Shared,
    snap: &Snapshot,
    vms: Vec<ActualVm>,
    listed_at: u64,
    seq: u64,
) -> Result<Inventory, String> {
    let limits = snap
        .cluster
        .hosts
        .get(shared.me())
        .map(|h| Limits::from(&h.limits))
        .unwrap_or_default();
    // Beyond what the listing shows of the same VMs: `used + reserved` counts each VM
    // once (issue 14, case 8).
    let reserved = shared
        .admission
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .usage
        .reserved_beyond(&vms);
    let local = shared.local.lock().unwrap_or_else(|p| p.into_inner());
    // Read after `local` (the reconciled commit): every pass under an older commit has
    // ended, so every create it sent is among them. An inventory never shows "nothing in
    // flight" because the intents could not be read: another host could send a second
    // create.
    let in_flight = shared
        .intents
        .all()
        .map_err(|e| format!("reading the create intents: {e}"))?
        .into_iter()
        .map(|i| InFlightCreate {
            status: match &i.status {
                IntentStatus::Sent => format!("sent to {}", i.first_hop),
                IntentStatus::Placed { host, .. } => format!("built on {host}"),
                IntentStatus::Failed { reason, .. } => reason.clone(),
            },
            retry_at: match &i.status {
                IntentStatus::Failed { retry_at, .. } => Some(*retry_at),
                _ => None,
            },
            vm: i.vm,
            job_id: i.job_id,
            sent_at: i.recorded_at,
        })
        .collect();
    Ok(Inventory {
        host: shared.me().to_string(),
        applied_commit: local.applied_commit.clone(),
        // Read before the intents above (see there).
        commit: local.reconciled_commit.clone(),
        listed_at,
        seq,
        clock_skew: local.clock_skew.clone(),
        used: Usage::of(&vms),
        reserved,
        overload: shared.overload(usage::Claims::of(&vms).running_memory, &limits),
        limits,
        vms,
        in_flight,
        failures: local.failures.iter().cloned().collect(),
        waiting: local.waiting.clone(),
        left_cluster: local.left_cluster.clone(),
        agent: shared.lease.info().map(|mut a| {
            a.conflicts = shared
                .identities
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .conflicts(message::now());
            a
        }),
    })
}

/// Safety rule 8: an inventory in this host's own tube under another identity than
/// this agent's, listed since it took the lease, was published by another agent under
/// this host's name.
async fn check_own_tube(shared: &Arc<Shared>, addr: &str) {
    let Some(mine) = shared.lease.info() else {
        return;
    };
    let window = shared.cfg.message_window.0.as_secs();
    let read = shared
        .peers
        .inventory(addr, shared.me(), Some((&shared.keys, window)));
    let Ok(Ok((Some(inv), _))) = tokio::time::timeout(Duration::from_secs(3), read).await else {
        return;
    };
    let Some(other) = inv.agent.filter(|_| inv.host == shared.me()) else {
        return;
    };
    shared
        .identities
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe_own(
            shared.me(),
            &mine.identity,
            &other.identity,
            inv.listed_at,
            shared.lease.since(),
            message::now(),
        );
}

async fn publish_loop(shared: Arc<Shared>) {
    let min_gap = Duration::from_millis(500);
    let mut last = Instant::now();
    loop {
        let mut stop = shared.stop.subscribe();
        tokio::select! {
            // Passes, results, the lease and the vm_dir watch wake a publication when
            // there is news; the timer only repeats the last one (issue 12: an idle
            // agent's CPU went into listing, signing and sending unchanged inventories).
            _ = tokio::time::sleep(poll_interval(&shared)) => {}
            _ = shared.wake_publish.notified() => {}
            _ = stopped(&mut stop) => return,
        }
        // At most one publication per gap while builds run: a burst of job ends becomes
        // a few. The first change after a quiet spell, and the end of the last build in
        // hand, go out at once: that is when the others wait for news.
        if !shared.admission().building.is_empty() {
            tokio::time::sleep(min_gap.saturating_sub(last.elapsed())).await;
        }
        last = Instant::now();
        let (Some(snap), Some(addr)) = (shared.snapshot(), shared.own_addr()) else {
            continue;
        };
        if !shared.lease.held() {
            continue;
        }
        check_own_tube(&shared, &addr).await;
        let seq = shared.inventory_seq.next();
        let listed_at = message::now();
        let vms = match list_local(&shared).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list VMs for the inventory");
                continue;
            }
        };
        let inv = match inventory(&shared, &snap, vms, listed_at, seq) {
            Ok(inv) => inv,
            Err(e) => {
                tracing::warn!(error = %e, "no inventory published");
                continue;
            }
        };
        let env = shared.sealed(Envelope::new(
            &snap.cluster.id,
            shared.me(),
            shared.me(),
            Message::Inventory(inv),
        ));
        if let Err(e) = shared.peers.publish_inventory(&addr, &env).await {
            tracing::warn!(error = %e, "cannot publish the inventory");
        }
        if shared.cfg.http.is_some() {
            for tube in [tubes::CREATE, tubes::OPS, tubes::RESULTS, tubes::CONTROL] {
                if let Ok(Some(st)) = shared.peers.tube_stats(&addr, tube).await {
                    for (state, n) in [
                        ("ready", st.current_jobs_ready),
                        ("reserved", st.current_jobs_reserved),
                        ("delayed", st.current_jobs_delayed),
                        ("buried", st.current_jobs_buried),
                    ] {
                        shared.set(
                            &format!("flotilla_queue_jobs{{tube=\"{tube}\",state=\"{state}\"}}"),
                            n as f64,
                        );
                    }
                }
            }
        }
    }
}
