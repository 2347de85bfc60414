//! The agent's metric series as typed values: each name and label set is written once,
//! here, and the registry ([`super::registry::Metrics`]) takes them by name.

/// A counter the agent keeps, with its labels: each name is written once, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter<'a> {
    /// `flotilla_reconciles_total`: reconcile passes finished.
    Reconciles,
    /// `flotilla_reconcile_seconds_sum`: time spent in reconcile passes.
    ReconcileSeconds,
    /// `flotilla_snapshots_invalid_total`: desired states that did not validate.
    SnapshotsInvalid,
    /// `flotilla_rejected_total{reason}`: messages refused.
    Rejected {
        /// Why (see `Rejection::label`).
        reason: &'a str,
    },
    /// `flotilla_jobs_buried_total`: jobs buried by this host's worker.
    JobsBuried,
    /// `flotilla_forwards_total`: creates passed on to the next host.
    Forwards,
    /// `flotilla_jobs_total{kind,outcome}`: jobs this host's worker ended.
    Jobs {
        /// The job's kind.
        kind: &'a str,
        /// How it ended.
        outcome: &'a str,
    },
    /// `flotilla_emitted_total{kind}`: creates and ops this host sent.
    Emitted {
        /// The message's kind.
        kind: &'a str,
    },
    /// `flotilla_results_total{kind,outcome}`: results this host received.
    Results {
        /// The job's kind.
        kind: &'a str,
        /// How it ended.
        outcome: &'a str,
    },
}

/// A gauge the agent keeps, with its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge<'a> {
    /// `flotilla_reconcile_last_seconds`: how long the last pass took.
    ReconcileLastSeconds,
    /// `flotilla_last_reconcile_timestamp_seconds`: when the last pass ended.
    LastReconcileTimestamp,
    /// `flotilla_plan_actions{action}`: the last plan's actions of each kind.
    PlanActions {
        /// The kind of action.
        action: &'a str,
    },
    /// `flotilla_queue_jobs{tube,state}`: jobs in this host's tubes.
    QueueJobs {
        /// The tube.
        tube: &'a str,
        /// The jobs' state.
        state: &'a str,
    },
}

impl Counter<'_> {
    /// The series as written in the exposition, labels included.
    pub fn series(&self) -> String {
        match self {
            Counter::Reconciles => "flotilla_reconciles_total".into(),
            Counter::ReconcileSeconds => "flotilla_reconcile_seconds_sum".into(),
            Counter::SnapshotsInvalid => "flotilla_snapshots_invalid_total".into(),
            Counter::Rejected { reason } => {
                format!("flotilla_rejected_total{{reason=\"{}\"}}", label(reason))
            }
            Counter::JobsBuried => "flotilla_jobs_buried_total".into(),
            Counter::Forwards => "flotilla_forwards_total".into(),
            Counter::Jobs { kind, outcome } => format!(
                "flotilla_jobs_total{{kind=\"{}\",outcome=\"{}\"}}",
                label(kind),
                label(outcome)
            ),
            Counter::Emitted { kind } => {
                format!("flotilla_emitted_total{{kind=\"{}\"}}", label(kind))
            }
            Counter::Results { kind, outcome } => format!(
                "flotilla_results_total{{kind=\"{}\",outcome=\"{}\"}}",
                label(kind),
                label(outcome)
            ),
        }
    }
}

impl Gauge<'_> {
    /// The series as written in the exposition, labels included.
    pub fn series(&self) -> String {
        match self {
            Gauge::ReconcileLastSeconds => "flotilla_reconcile_last_seconds".into(),
            Gauge::LastReconcileTimestamp => "flotilla_last_reconcile_timestamp_seconds".into(),
            Gauge::PlanActions { action } => {
                format!("flotilla_plan_actions{{action=\"{}\"}}", label(action))
            }
            Gauge::QueueJobs { tube, state } => format!(
                "flotilla_queue_jobs{{tube=\"{}\",state=\"{}\"}}",
                label(tube),
                label(state)
            ),
        }
    }
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enums write the names the exposition had when they were `format!`ed at each
    /// call site (tests and dashboards read them).
    #[test]
    fn series_names_are_the_ones_scraped() {
        let c = [
            (Counter::Reconciles, "flotilla_reconciles_total"),
            (Counter::ReconcileSeconds, "flotilla_reconcile_seconds_sum"),
            (
                Counter::SnapshotsInvalid,
                "flotilla_snapshots_invalid_total",
            ),
            (
                Counter::Rejected { reason: "replayed" },
                "flotilla_rejected_total{reason=\"replayed\"}",
            ),
            (Counter::JobsBuried, "flotilla_jobs_buried_total"),
            (Counter::Forwards, "flotilla_forwards_total"),
            (
                Counter::Jobs {
                    kind: "create",
                    outcome: "done",
                },
                "flotilla_jobs_total{kind=\"create\",outcome=\"done\"}",
            ),
            (
                Counter::Emitted { kind: "destroy" },
                "flotilla_emitted_total{kind=\"destroy\"}",
            ),
            (
                Counter::Results {
                    kind: "stop",
                    outcome: "failed",
                },
                "flotilla_results_total{kind=\"stop\",outcome=\"failed\"}",
            ),
        ];
        for (series, name) in c {
            assert_eq!(series.series(), name);
        }
        let g = [
            (
                Gauge::ReconcileLastSeconds,
                "flotilla_reconcile_last_seconds",
            ),
            (
                Gauge::LastReconcileTimestamp,
                "flotilla_last_reconcile_timestamp_seconds",
            ),
            (
                Gauge::PlanActions {
                    action: "grow_disk",
                },
                "flotilla_plan_actions{action=\"grow_disk\"}",
            ),
            (
                Gauge::QueueJobs {
                    tube: "flotilla-ops",
                    state: "ready",
                },
                "flotilla_queue_jobs{tube=\"flotilla-ops\",state=\"ready\"}",
            ),
        ];
        for (series, name) in g {
            assert_eq!(series.series(), name);
        }
    }
}
