//! The agent's Prometheus metrics, kept in a `prometheus-client` registry: every family
//! has HELP and TYPE, and every series whose labels are known in advance is there (at
//! zero) from the start, not only after its first use.
//!
//! The agent records through one method per series ([`Metrics::reconciled`],
//! [`Metrics::job`], …); what is computed from state rather than counted (capacity,
//! VMs by state, inventory ages, commits) is set from the last pass's inventories and
//! refreshed at each scrape ([`Metrics::encode`]).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::actual::RunState;
use crate::message::Inventory;
use crate::planner::{BlockReason, Blocked, Summary};

type FGauge = Gauge<f64, AtomicU64>;

/// A label set of one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: String,
}
/// `kind` and `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcome {
    /// The job's kind.
    pub kind: String,
    /// How it ended.
    pub outcome: String,
}
/// `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The message's kind.
    pub kind: String,
}
/// `action`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// The plan's kind of action.
    pub action: String,
}
/// `tube` and `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TubeState {
    /// The tube.
    pub tube: String,
    /// The jobs' state.
    pub state: String,
}
/// `host`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    /// The host.
    pub host: String,
}
/// `host` and `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostState {
    /// The host.
    pub host: String,
    /// The VMs' run state.
    pub state: String,
}
/// `commit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommitLabel {
    /// The commit.
    pub commit: String,
}
/// `command`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    /// The backend command.
    pub command: String,
}

const OP_KINDS: [&str; 6] = ["update", "grow_disk", "replace", "start", "stop", "destroy"];
const ACTIONS: [&str; 9] = [
    "create",
    "update",
    "grow_disk",
    "replace",
    "start",
    "stop",
    "destroy",
    "blocked",
    "pending",
];
const REJECTIONS: [&str; 6] = [
    "unsigned",
    "bad_signature",
    "expired",
    "replayed",
    "misaddressed",
    "undecodable",
];
const RESULT_OUTCOMES: [&str; 5] = ["done", "unplaceable", "failed", "refused", "dropped"];
const STATES: [RunState; 4] = [
    RunState::Running,
    RunState::Stopped,
    RunState::Bootloader,
    RunState::Locked,
];
const BLOCK_REASONS: [BlockReason; 10] = [
    BlockReason::Drift,
    BlockReason::Protected,
    BlockReason::PruneGuard,
    BlockReason::EmptyDesired,
    BlockReason::NameTaken,
    BlockReason::Duplicate,
    BlockReason::Locked,
    BlockReason::UnknownHost,
    BlockReason::HeldByRemovedHost,
    BlockReason::ResourceTaken,
];

fn state_name(s: RunState) -> String {
    format!("{s:?}").to_lowercase()
}

fn reason_name(r: BlockReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{r:?}"))
}

/// Per-host capacity gauges: used and limit of memory, storage and VM count.
#[derive(Default)]
struct Capacity {
    memory_used: Family<HostLabel, FGauge>,
    memory_limit: Family<HostLabel, FGauge>,
    storage_used: Family<HostLabel, FGauge>,
    storage_limit: Family<HostLabel, FGauge>,
    vms_used: Family<HostLabel, FGauge>,
    vms_limit: Family<HostLabel, FGauge>,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    reconcile_last_seconds: FGauge,
    last_reconcile: FGauge,
    last_good_fetch: FGauge,
    snapshots_invalid: Counter,
    rejected: Family<Reason, Counter>,
    jobs_buried: Counter,
    forwards: Counter,
    jobs: Family<KindOutcome, Counter>,
    emitted: Family<KindLabel, Counter>,
    results: Family<KindOutcome, Counter>,
    plan_actions: Family<ActionLabel, FGauge>,
    blocked: Family<Reason, FGauge>,
    held_destroys: FGauge,
    queue_jobs: Family<TubeState, FGauge>,
    inventory_age: Family<HostLabel, FGauge>,
    applied_commit: Family<CommitLabel, FGauge>,
    desired_commit: Family<CommitLabel, FGauge>,
    backend: Family<CommandLabel, Counter>,
    vms: Family<HostState, FGauge>,
    capacity: Capacity,
    /// The last inventories a pass saw, for the gauges refreshed at each scrape.
    seen: Mutex<BTreeMap<String, Inventory>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, and the series with known labels at zero.
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            reconciles: Counter::default(),
            // 10 ms to ~80 s: a pass lists the host and reads every inventory.
            reconcile_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 14),
            ),
            reconcile_last_seconds: FGauge::default(),
            last_reconcile: FGauge::default(),
            last_good_fetch: FGauge::default(),
            snapshots_invalid: Counter::default(),
            rejected: Family::default(),
            jobs_buried: Counter::default(),
            forwards: Counter::default(),
            jobs: Family::default(),
            emitted: Family::default(),
            results: Family::default(),
            plan_actions: Family::default(),
            blocked: Family::default(),
            held_destroys: FGauge::default(),
            queue_jobs: Family::default(),
            inventory_age: Family::default(),
            applied_commit: Family::default(),
            desired_commit: Family::default(),
            backend: Family::default(),
            vms: Family::default(),
            capacity: Capacity::default(),
            seen: Mutex::default(),
        };
        r.register(
            "flotilla_build",
            "The agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "flotilla_reconciles",
            "Reconcile passes finished",
            m.reconciles.clone(),
        );
        r.register(
            "flotilla_reconcile_seconds",
            "How long reconcile passes took",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "flotilla_reconcile_last_seconds",
            "How long the last reconcile pass took",
            m.reconcile_last_seconds.clone(),
        );
        r.register(
            "flotilla_last_reconcile_timestamp_seconds",
            "When the last reconcile pass finished (Unix time; 0 before the first)",
            m.last_reconcile.clone(),
        );
        r.register(
            "flotilla_last_good_fetch_timestamp_seconds",
            "When the desired repo was last fetched and loaded without error (Unix time; 0 before the first)",
            m.last_good_fetch.clone(),
        );
        r.register(
            "flotilla_snapshots_invalid",
            "Desired states that did not validate (nothing from them is applied)",
            m.snapshots_invalid.clone(),
        );
        r.register(
            "flotilla_rejected",
            "Messages refused (unsigned, forged, expired, replayed, misaddressed, undecodable)",
            m.rejected.clone(),
        );
        r.register(
            "flotilla_jobs_buried",
            "Jobs this host's worker buried",
            m.jobs_buried.clone(),
        );
        r.register(
            "flotilla_forwards",
            "Creates passed on to the next host of their chain",
            m.forwards.clone(),
        );
        r.register(
            "flotilla_jobs",
            "Jobs this host's worker ended, by kind and outcome",
            m.jobs.clone(),
        );
        r.register(
            "flotilla_emitted",
            "Creates and ops this host sent",
            m.emitted.clone(),
        );
        r.register(
            "flotilla_results",
            "Results of this host's creates and ops, by kind and outcome",
            m.results.clone(),
        );
        r.register(
            "flotilla_plan_actions",
            "The last plan's actions of each kind (cluster-wide)",
            m.plan_actions.clone(),
        );
        r.register(
            "flotilla_blocked",
            "Differences the last plan left alone, by reason (cluster-wide)",
            m.blocked.clone(),
        );
        r.register(
            "flotilla_held_destroys",
            "Destroys the prune guard held back in the last plan",
            m.held_destroys.clone(),
        );
        r.register(
            "flotilla_queue_jobs",
            "Jobs in this host's tubes, by state, as of its last inventory",
            m.queue_jobs.clone(),
        );
        r.register(
            "flotilla_inventory_age_seconds",
            "Age of each host's last inventory this agent read",
            m.inventory_age.clone(),
        );
        r.register(
            "flotilla_applied_commit_info",
            "The desired commit this host has applied",
            m.applied_commit.clone(),
        );
        r.register(
            "flotilla_desired_commit_info",
            "The last good desired commit this agent read",
            m.desired_commit.clone(),
        );
        r.register(
            "flotilla_backend_invocations",
            "Each vm-bhyve subcommand and sysrc run",
            m.backend.clone(),
        );
        r.register(
            "flotilla_vms",
            "Managed VMs by host and run state, as of the last inventories",
            m.vms.clone(),
        );
        let c = &m.capacity;
        for (name, help, fam) in [
            (
                "flotilla_host_memory_used_bytes",
                "Memory the host's VMs claim",
                &c.memory_used,
            ),
            (
                "flotilla_host_memory_limit_bytes",
                "The host's memory limit (absent: none)",
                &c.memory_limit,
            ),
            (
                "flotilla_host_storage_used_bytes",
                "Storage the host's VMs claim",
                &c.storage_used,
            ),
            (
                "flotilla_host_storage_limit_bytes",
                "The host's storage limit (absent: none)",
                &c.storage_limit,
            ),
            ("flotilla_host_vms_used", "VMs on the host", &c.vms_used),
            (
                "flotilla_host_vms_limit",
                "The host's VM count limit (absent: none)",
                &c.vms_limit,
            ),
        ] {
            r.register(name, help, fam.clone());
        }
        m.start_at_zero();
        Metrics { registry: r, ..m }
    }

    /// Creates the series whose labels are known in advance, at zero.
    fn start_at_zero(&self) {
        for reason in REJECTIONS {
            self.rejected(reason);
        }
        for outcome in ["done", "failed", "unplaceable"] {
            self.job("create", outcome);
        }
        for kind in OP_KINDS {
            for outcome in ["done", "failed", "dropped"] {
                self.job(kind, outcome);
            }
        }
        for kind in std::iter::once("create").chain(OP_KINDS) {
            self.emitted(kind);
            for outcome in RESULT_OUTCOMES {
                let _ = self.results.get_or_create(&KindOutcome {
                    kind: kind.into(),
                    outcome: outcome.into(),
                });
            }
        }
        for action in ACTIONS {
            let _ = self.plan_actions.get_or_create(&ActionLabel {
                action: action.into(),
            });
        }
        for reason in BLOCK_REASONS {
            let _ = self.blocked.get_or_create(&Reason {
                reason: reason_name(reason),
            });
        }
        for tube in [
            crate::message::tubes::CREATE,
            crate::message::tubes::OPS,
            crate::message::tubes::RESULTS,
            crate::message::tubes::CONTROL,
        ] {
            for state in ["ready", "reserved", "delayed", "buried"] {
                self.queue_jobs(tube, state, 0);
            }
        }
    }

    /// `flotilla_rejected_total{reason}`.
    pub fn rejected(&self, reason: &str) -> Counter {
        self.rejected
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .clone()
    }

    /// `flotilla_jobs_total{kind,outcome}`.
    pub fn job(&self, kind: &str, outcome: &str) -> Counter {
        self.jobs
            .get_or_create(&KindOutcome {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .clone()
    }

    /// `flotilla_emitted_total{kind}`.
    pub fn emitted(&self, kind: &str) -> Counter {
        self.emitted
            .get_or_create(&KindLabel { kind: kind.into() })
            .clone()
    }

    /// `flotilla_results_total{kind,outcome}`.
    pub fn result(&self, kind: &str, outcome: &str) -> Counter {
        self.results
            .get_or_create(&KindOutcome {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .clone()
    }

    /// `flotilla_forwards_total`.
    pub fn forwards(&self) -> &Counter {
        &self.forwards
    }

    /// `flotilla_jobs_buried_total`.
    pub fn jobs_buried(&self) -> &Counter {
        &self.jobs_buried
    }

    /// `flotilla_snapshots_invalid_total`.
    pub fn snapshots_invalid(&self) -> &Counter {
        &self.snapshots_invalid
    }

    /// A reconcile pass ended at `now` (Unix seconds) after `seconds`:
    /// `flotilla_reconciles_total`, the `flotilla_reconcile_seconds` histogram,
    /// `flotilla_reconcile_last_seconds`, `flotilla_last_reconcile_timestamp_seconds`.
    pub fn reconciled(&self, seconds: f64, now: u64) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(seconds);
        self.reconcile_last_seconds.set(seconds);
        self.last_reconcile.set(now as f64);
    }

    /// `flotilla_last_good_fetch_timestamp_seconds`.
    pub fn fetched(&self, now: u64) {
        self.last_good_fetch.set(now as f64);
    }

    /// `flotilla_plan_actions{action}`, `flotilla_blocked{reason}` and
    /// `flotilla_held_destroys` from the last plan.
    pub fn plan<'a>(&self, summary: &Summary, blocked: impl Iterator<Item = &'a Blocked>) {
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
            self.plan_action(action, n as f64);
        }
        let mut by: BTreeMap<BlockReason, usize> = BTreeMap::new();
        for b in blocked {
            *by.entry(b.reason).or_default() += 1;
        }
        for reason in BLOCK_REASONS {
            let n = by.get(&reason).copied().unwrap_or(0) as f64;
            self.blocked
                .get_or_create(&Reason {
                    reason: reason_name(reason),
                })
                .set(n);
            if reason == BlockReason::PruneGuard {
                self.held_destroys.set(n);
            }
        }
    }

    /// `flotilla_plan_actions{action}`.
    pub fn plan_action(&self, action: &str, n: f64) {
        self.plan_actions
            .get_or_create(&ActionLabel {
                action: action.into(),
            })
            .set(n);
    }

    /// `flotilla_queue_jobs{tube,state}`.
    pub fn queue_jobs(&self, tube: &str, state: &str, n: u64) {
        self.queue_jobs
            .get_or_create(&TubeState {
                tube: tube.into(),
                state: state.into(),
            })
            .set(n as f64);
    }

    /// The inventories of the last pass (this host's own included): capacity, VMs by
    /// state and inventory ages come from them at each scrape.
    pub fn inventories(&self, invs: &BTreeMap<String, Inventory>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = invs.clone();
    }

    /// Records a counter given by its series name as written in the exposition
    /// (`family_total{label="value",…}`): the call sites name series by string until
    /// they are typed; unknown names are ignored.
    pub fn add(&self, series: &str, v: f64) {
        let (family, labels) = parse_series(series);
        let l = |k: &str| labels.get(k).map_or("", String::as_str);
        let n = v.max(0.0) as u64;
        match family {
            "flotilla_reconciles_total" => {
                self.reconciles.inc_by(n);
            }
            // The pass's duration: the histogram's sum, observed with its count.
            "flotilla_reconcile_seconds_sum" => self.reconcile_seconds.observe(v),
            "flotilla_snapshots_invalid_total" => {
                self.snapshots_invalid.inc_by(n);
            }
            "flotilla_rejected_total" => {
                self.rejected(l("reason")).inc_by(n);
            }
            "flotilla_jobs_buried_total" => {
                self.jobs_buried.inc_by(n);
            }
            "flotilla_forwards_total" => {
                self.forwards.inc_by(n);
            }
            "flotilla_jobs_total" => {
                self.job(l("kind"), l("outcome")).inc_by(n);
            }
            "flotilla_emitted_total" => {
                self.emitted(l("kind")).inc_by(n);
            }
            "flotilla_results_total" => {
                self.result(l("kind"), l("outcome")).inc_by(n);
            }
            other => tracing::debug!(series = other, "no such counter"),
        }
    }

    /// Sets a gauge given by its series name (see [`Metrics::add`]).
    pub fn set(&self, series: &str, v: f64) {
        let (family, labels) = parse_series(series);
        let l = |k: &str| labels.get(k).map_or("", String::as_str);
        match family {
            "flotilla_reconcile_last_seconds" => {
                self.reconcile_last_seconds.set(v);
            }
            "flotilla_last_reconcile_timestamp_seconds" => {
                self.last_reconcile.set(v);
            }
            "flotilla_plan_actions" => self.plan_action(l("action"), v),
            "flotilla_queue_jobs" => self.queue_jobs(l("tube"), l("state"), v.max(0.0) as u64),
            other => tracing::debug!(series = other, "no such gauge"),
        }
    }

    /// When the last reconcile pass finished (Unix seconds), 0 before the first.
    pub fn last_reconcile(&self) -> u64 {
        self.last_reconcile.get() as u64
    }

    /// The exposition (OpenMetrics text), after refreshing what is computed from state.
    pub fn encode(
        &self,
        now: u64,
        cluster: &str,
        applied: Option<&str>,
        desired: Option<&str>,
        invocations: &BTreeMap<String, u64>,
    ) -> String {
        let one_commit = |fam: &Family<CommitLabel, FGauge>, c: Option<&str>| {
            fam.clear();
            if let Some(c) = c {
                fam.get_or_create(&CommitLabel { commit: c.into() })
                    .set(1.0);
            }
        };
        one_commit(&self.applied_commit, applied);
        one_commit(&self.desired_commit, desired);
        for (command, n) in invocations {
            let c = self.backend.get_or_create(&CommandLabel {
                command: command.clone(),
            });
            // The backend keeps the totals: the counter catches up with them.
            c.inc_by(n.saturating_sub(c.get()));
        }
        let invs = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cap = &self.capacity;
        for fam in [
            &self.inventory_age,
            &cap.memory_used,
            &cap.memory_limit,
            &cap.storage_used,
            &cap.storage_limit,
            &cap.vms_used,
            &cap.vms_limit,
        ] {
            fam.clear();
        }
        self.vms.clear();
        for (host, inv) in &invs {
            let h = HostLabel { host: host.clone() };
            self.inventory_age
                .get_or_create(&h)
                .set(now.saturating_sub(inv.listed_at) as f64);
            cap.memory_used
                .get_or_create(&h)
                .set(inv.used.memory.bytes() as f64);
            cap.storage_used
                .get_or_create(&h)
                .set(inv.used.storage.bytes() as f64);
            cap.vms_used.get_or_create(&h).set(inv.used.vms as f64);
            if let Some(m) = inv.limits.memory {
                cap.memory_limit.get_or_create(&h).set(m.bytes() as f64);
            }
            if let Some(s) = inv.limits.storage {
                cap.storage_limit.get_or_create(&h).set(s.bytes() as f64);
            }
            if let Some(n) = inv.limits.vms {
                cap.vms_limit.get_or_create(&h).set(n as f64);
            }
            for state in STATES {
                let n = inv
                    .vms
                    .iter()
                    .filter(|v| v.state == state && v.is_managed_by(cluster))
                    .count();
                self.vms
                    .get_or_create(&HostState {
                        host: host.clone(),
                        state: state_name(state),
                    })
                    .set(n as f64);
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// Splits `name{a="x",b="y"}` into the name and its labels (values unescaped).
fn parse_series(series: &str) -> (&str, BTreeMap<String, String>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, BTreeMap::new());
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .filter(|c| *c != ',')
            .collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
    (name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards issue 15 (metrics through a maintained library): every family has HELP
    /// and TYPE, the pass durations are a histogram, build_info is there, and the series
    /// with known labels are present at zero before anything happened.
    #[test]
    fn every_family_has_help_and_type_and_starts_at_zero() {
        let m = Metrics::new();
        let page = m.encode(0, "c", None, None, &BTreeMap::new());
        for want in [
            "# HELP flotilla_reconciles Reconcile passes finished.",
            "# TYPE flotilla_reconciles counter",
            "flotilla_reconciles_total 0",
            "# TYPE flotilla_reconcile_seconds histogram",
            "flotilla_reconcile_seconds_count 0",
            "flotilla_reconcile_seconds_bucket{le=\"+Inf\"} 0",
            "# TYPE flotilla_build info",
            "flotilla_build_info{version=\"",
            "flotilla_jobs_total{kind=\"create\",outcome=\"done\"} 0",
            "flotilla_rejected_total{reason=\"misaddressed\"} 0",
            "flotilla_queue_jobs{tube=\"flotilla.create\",state=\"ready\"} 0",
            "flotilla_plan_actions{action=\"create\"} 0",
            "flotilla_blocked{reason=\"prune_guard\"} 0",
            "flotilla_held_destroys 0",
            "flotilla_last_good_fetch_timestamp_seconds 0",
        ] {
            assert!(page.contains(want), "{want} in\n{page}");
        }
        for line in page.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                page.contains(&format!("# HELP {name} ")),
                "HELP for {name}\n{page}"
            );
        }
    }

    /// The string names the call sites use reach the typed series, and a pass's
    /// duration lands in the histogram.
    #[test]
    fn series_names_reach_their_families() {
        let m = Metrics::new();
        m.add("flotilla_jobs_total{kind=\"create\",outcome=\"done\"}", 1.0);
        m.add("flotilla_rejected_total{reason=\"replayed\"}", 1.0);
        m.add("flotilla_reconcile_seconds_sum", 0.5);
        m.set(
            "flotilla_queue_jobs{tube=\"flotilla.ops\",state=\"buried\"}",
            2.0,
        );
        m.reconciled(0.25, 7);
        let page = m.encode(9, "c", Some("abc"), None, &BTreeMap::new());
        for want in [
            "flotilla_jobs_total{kind=\"create\",outcome=\"done\"} 1",
            "flotilla_rejected_total{reason=\"replayed\"} 1",
            "flotilla_reconcile_seconds_count 2",
            "flotilla_reconcile_seconds_sum 0.75",
            "flotilla_queue_jobs{tube=\"flotilla.ops\",state=\"buried\"} 2",
            "flotilla_last_reconcile_timestamp_seconds 7",
            "flotilla_applied_commit_info{commit=\"abc\"} 1",
        ] {
            assert!(page.contains(want), "{want} in\n{page}");
        }
        assert_eq!(
            parse_series("a{x=\"1\\\"2\",y=\"z\"}").1,
            BTreeMap::from([("x".into(), "1\"2".into()), ("y".into(), "z".into())])
        );
    }
}
