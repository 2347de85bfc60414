//! What the agent's tasks share: the config, the backend, the stores on disk, and small
//! named pieces of state each behind its own lock (admission, ops in flight, what the
//! agent knows about itself, the peers' inventories), and the notifiers that wake tasks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beanstalk::PutParams;
use tokio::sync::{watch, Notify};

use crate::actual::ActualVm;
use crate::backend::{Backend, BackendError, VmBhyve, VmBhyveConfig};
use crate::capacity::Limits;
use crate::desired::Snapshot;
use crate::intents::IntentStore;
use crate::message::{self, tubes, Envelope, Inventory, JobResult, Message, Origin, RecentFailure};
use crate::planner::Kind;

use super::config::AgentConfig;
use super::events::{Event, EventKind, EventLog};
use super::metrics::{Counter, Gauge};
use super::peers::Peers;
use super::stopped;
use super::{control, decide, departed, identity, lease, listing, replay, seq, usage, worker};

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
pub(super) struct Admission {
    pub(super) building: BTreeSet<String>,
    /// VMs an op (destroy, start, stop, update) is running on: one at a time per VM
    /// (safety rule 10), whatever reached the queue.
    pub(super) operating: BTreeSet<String>,
    /// What the guests claim, between listings, and what builds and changes in progress
    /// hold (each VM once).
    pub(super) usage: usage::UsageView,
}

/// An op this host sent to its own ops tube and awaits the result of.
#[derive(Debug, Clone)]
pub(super) struct OpInFlight {
    pub(super) kind: Kind,
    pub(super) job_id: String,
    /// When the entry goes even without a result. Set when this host's worker ended the
    /// job (deleted or buried it): its result normally removes the entry at once, but one
    /// that never comes (lost with a beanstalkd, say) must not hold the VM back for ever.
    /// Set too when a put may or may not have reached the queue.
    pub(super) expires: Option<Instant>,
}

/// How long an ended op's entry waits for its result before it goes.
const ENDED_OP_GRACE: Duration = Duration::from_secs(10);

/// What the agent knows about itself, for its inventory.
#[derive(Debug, Default)]
pub(super) struct Local {
    pub(super) applied_commit: Option<String>,
    /// The commit of the last finished reconcile pass.
    pub(super) reconciled_commit: Option<String>,
    pub(super) failures: VecDeque<RecentFailure>,
    /// The commit that removed this host from cluster.yaml, while it is not listed.
    pub(super) left_cluster: Option<String>,
    /// Creates that wait for other hosts, as of the last pass.
    pub(super) waiting: Vec<message::WaitingCreate>,
    /// Peers' clocks this host saw beyond `max_clock_skew` in its last pass.
    pub(super) clock_skew: Option<String>,
    /// When the last reconcile pass ended (seconds since the Unix epoch).
    pub(super) reconciled_at: u64,
    /// What the last pass left blocked.
    pub(super) blocked: Vec<message::BlockedItem>,
    /// Why the newest fetched desired commit does not validate, while it does not.
    pub(super) desired_error: Option<message::DesiredError>,
}

/// State shared by the agent's tasks.
pub struct Shared {
    pub(super) cfg: AgentConfig,
    pub(super) backend: Arc<dyn Backend>,
    pub(super) intents: IntentStore,
    pub(super) events: EventLog,
    pub(super) peers: Peers,
    pub(super) snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    pub(super) admission: Mutex<Admission>,
    pub(super) ops: Mutex<BTreeMap<String, OpInFlight>>,
    /// Ops that failed (or found no room), per VM and kind: not planned again before
    /// this time, whatever other op of the VM is sent meanwhile (issue 14, case 3).
    pub(super) retry_at: Mutex<BTreeMap<(String, Kind), u64>>,
    pub(super) inventories: Mutex<BTreeMap<String, Inventory>>,
    pub(super) latencies: Mutex<BTreeMap<String, Duration>>,
    pub(super) local: Mutex<Local>,
    pub(super) metrics: super::registry::Metrics,
    /// What the loops last did, for `/healthz` and the status page.
    pub(super) seen: Mutex<super::health::Seen>,
    pub(super) wake_reconcile: Notify,
    /// Results came in: a pass is due, but not at once (see the reconcile loop).
    pub(super) results_in: Notify,
    pub(super) wake_fetch: Notify,
    pub(super) wake_publish: Notify,
    pub(super) stop: watch::Sender<bool>,
    /// Set on shutdown; builds check it between steps and clean up.
    pub(super) cancel: AtomicBool,
    /// The cluster keys: every message is sealed and checked with them.
    pub(super) keys: crate::auth::Keys,
    /// Ids of messages acted on, to refuse replays.
    pub(super) acted: Mutex<replay::ReplayCache>,
    /// This host's lease: one live agent per host name (safety rule 8).
    pub(super) lease: lease::LeaseCell,
    /// Host names seen under two identities.
    pub(super) identities: Mutex<identity::IdentityWatch>,
    /// Hosts that left cluster.yaml and hosts declared gone (safety rule 9).
    pub(super) departed: Mutex<departed::Departed>,
    /// Who owns which VM under each commit seen, for creates that wait for hosts on
    /// other commits.
    pub(super) owners: Mutex<BTreeMap<String, decide::CommitOwners>>,
    /// Forwards that may have reached the next host (a put that failed after it was
    /// written): the job goes there again, never built here (by job id).
    pub(super) unsure_forwards: Mutex<BTreeMap<String, (String, message::CreateJob)>>,
    /// This host's address in the hosts file of its last membership: a host that left
    /// cluster.yaml and restarted still publishes its inventory there (rule 9).
    pub(super) member_addr: Option<String>,
    /// Numbers this host's inventories (issue 14, case 4).
    pub(super) inventory_seq: seq::InventorySeq,
    /// This host's listing, kept while nothing changes it (issue 12, item 4).
    pub(super) listing: Arc<listing::Listing>,
    /// Drains and suspends operators set (issue 15), kept on disk.
    pub(super) switches: Mutex<control::SwitchStore>,
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
        let switches =
            control::SwitchStore::open(&cfg.state_dir).map_err(|e| state(e.to_string()))?;
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
            metrics: super::registry::Metrics::new(),
            seen: Mutex::new(super::health::Seen {
                started_at: message::now(),
                ..Default::default()
            }),
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
            switches: Mutex::new(switches),
        }))
    }

    pub(super) fn me(&self) -> &str {
        &self.cfg.host
    }

    /// `env`, signed with the cluster key.
    pub(super) fn sealed(&self, mut env: Envelope) -> Envelope {
        self.keys.seal(&mut env);
        env
    }

    /// Refuses a message that is unsigned, forged, tampered, not addressed to this host
    /// and `tube` (the one it was read from), too old or replayed; counts and logs the
    /// refusal.
    pub(super) fn check(&self, env: &Envelope, tube: &str) -> Result<(), crate::auth::Rejection> {
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
            self.count(Counter::Rejected { reason: e.label() });
            self.event(
                EventKind::Rejected,
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
    pub(super) fn acted(&self, env: &Envelope) {
        let mut acted = self.acted.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = acted.record(&env.id, env.sent_at, message::now()) {
            tracing::warn!(error = %e, "cannot record an acted message id");
        }
    }

    pub(super) fn switches(&self) -> std::sync::MutexGuard<'_, control::SwitchStore> {
        self.switches.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The commit that removed this host from cluster.yaml, while it is not listed.
    pub(super) fn left_cluster(&self) -> Option<String> {
        self.local().left_cluster.clone()
    }

    pub(super) fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.borrow().clone()
    }

    pub(super) fn cluster_id(&self) -> String {
        self.snapshot()
            .map(|s| s.cluster.id.clone())
            .unwrap_or_default()
    }

    pub(super) fn addr_of(&self, host: &str) -> Option<String> {
        if host == self.me() {
            return self.own_addr();
        }
        self.snapshot()?
            .cluster
            .hosts
            .get(host)
            .map(|h| h.beanstalkd.clone())
    }

    pub(super) fn own_addr(&self) -> Option<String> {
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

    pub(super) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Whether `host` was seen under two identities (by this agent, or by another
    /// whose inventory says so): no create goes to it, from it or along it.
    pub(super) fn identity_conflict(&self, host: &str) -> bool {
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
    pub(super) fn maybe_forwarded(&self, id: &str) -> Option<(String, message::CreateJob)> {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A forward of job `id` to `to` may have reached it: the job only goes there again.
    pub(super) fn forward_unsure(&self, id: &str, to: &str, job: message::CreateJob) {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (to.to_string(), job));
    }

    /// A forward of job `id` was put.
    pub(super) fn forward_settled(&self, id: &str) {
        self.unsure_forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// This host's worker ended op job `job_id` on `vm` (see [`OpInFlight::expires`]).
    pub(super) fn op_ended(&self, vm: &str, job_id: &str) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.get_mut(vm).filter(|o| o.job_id == job_id) {
            o.expires
                .get_or_insert_with(|| Instant::now() + ENDED_OP_GRACE);
        }
    }

    /// Sleeps for `d`, or less when the agent stops.
    pub(super) async fn sleep(&self, d: Duration) {
        let mut rx = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stopped(&mut rx) => {}
        }
    }

    /// Adds one to a counter.
    pub(super) fn count(&self, series: Counter<'_>) {
        self.add(series, 1.0);
    }

    /// Adds `v` to a counter.
    pub(super) fn add(&self, series: Counter<'_>, v: f64) {
        self.metrics.add(&series.series(), v);
    }

    /// Sets a gauge.
    pub(super) fn set(&self, series: Gauge<'_>, v: f64) {
        self.metrics.set(&series.series(), v);
    }

    /// What the loops last did.
    pub(super) fn seen(&self) -> std::sync::MutexGuard<'_, super::health::Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGHUP: agent.yaml was read again (`fresh`, or why it could not be). The agent
    /// keeps running with the configuration it started with, so a hangup never stops it
    /// or half-applies a change; the event says whether a restart would change anything,
    /// and a reconcile pass and a fetch run now, as after a trigger.
    pub fn hangup(&self, fresh: Result<AgentConfig, String>) {
        let (kind, message) = match fresh {
            Err(e) => (
                EventKind::Error,
                format!("SIGHUP: agent.yaml does not load, the agent keeps running with the one it started with: {e}"),
            ),
            // Debug shows every setting (paths, not secrets: the key is read from a file).
            Ok(c) if format!("{c:?}") == format!("{:?}", self.cfg) => (
                EventKind::ConfigUnchanged,
                "SIGHUP: agent.yaml unchanged; reconciling now".to_string(),
            ),
            Ok(_) => (
                EventKind::ConfigChanged,
                "SIGHUP: agent.yaml changed; it takes effect when the agent restarts (e.g. supervisorctl restart flotilla); reconciling now with the running settings".to_string(),
            ),
        };
        self.event(kind, None, None, None, message);
        self.wake_fetch.notify_one();
        self.wake_reconcile.notify_one();
    }

    /// Records an event in the event log, and logs it at its kind's level.
    pub(super) fn event(
        &self,
        kind: EventKind,
        vm: Option<&str>,
        job: Option<&str>,
        commit: Option<&str>,
        message: String,
    ) {
        super::events::trace(kind, vm, job, commit, &message);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.events.append(&Event {
            at: now.as_secs(),
            at_ms: now.as_millis() as u64,
            host: self.me().to_string(),
            kind: kind.as_str().to_string(),
            vm: vm.map(str::to_string),
            job: job.map(str::to_string),
            commit: commit.map(str::to_string),
            message,
        });
    }

    pub(super) fn put_params(&self, pri: u32) -> PutParams {
        let ttr = self
            .snapshot()
            .map(|s| s.cluster.policies.ttr)
            .unwrap_or(Duration::from_secs(3600));
        worker::params(pri, ttr)
    }

    pub(super) async fn send_result(&self, origin: &Origin, r: &JobResult) {
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

    /// Lists this host's VMs and tells admission what they claim.
    /// A listing kept since no change was seen is as good and costs no `vm list`.
    pub(super) fn list_local(&self) -> Result<Vec<ActualVm>, BackendError> {
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

    pub(super) fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The overload threshold this host crosses now, if any.
    pub(super) fn overload(
        &self,
        running_memory: crate::size::Size,
        limits: &Limits,
    ) -> Option<String> {
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

pub(super) fn poll_interval(shared: &Shared) -> Duration {
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

/// Lists this host's VMs on a blocking thread.
pub(super) async fn list_local(shared: &Arc<Shared>) -> Result<Vec<ActualVm>, String> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.list_local())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
