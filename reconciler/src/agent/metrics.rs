//! `/metrics` (Prometheus text format) and `/healthz`, on a loopback address when the
//! agent's config sets `http`.
//!
//! Series: `flotilla_reconciles_total`, `flotilla_reconcile_seconds_sum`,
//! `flotilla_reconcile_last_seconds`, `flotilla_plan_actions{action}` (the last plan),
//! `flotilla_jobs_total{kind,outcome}`, `flotilla_forwards_total`,
//! `flotilla_emitted_total{kind}`, `flotilla_results_total{kind,outcome}`,
//! `flotilla_queue_jobs{tube,state}`, `flotilla_applied_commit_info{commit}`,
//! `flotilla_inventory_age_seconds{host}`, `flotilla_backend_invocations_total{command}`
//! (each `vm` subcommand and `sysrc` run) and the rest of the counters the agent keeps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::message;

use super::Shared;

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
    /// `flotilla_backend_invocations_total{command}`: each `vm` subcommand and `sysrc`
    /// run.
    BackendInvocations {
        /// The command.
        command: &'a str,
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
    /// `flotilla_inventory_age_seconds{host}`: the age of each host's inventory.
    InventoryAge {
        /// The host.
        host: &'a str,
    },
    /// `flotilla_applied_commit_info{commit}`: the commit this host applied.
    AppliedCommit {
        /// The commit.
        commit: &'a str,
    },
    /// `flotilla_desired_commit_info{commit}`: the last good desired commit.
    DesiredCommit {
        /// The commit.
        commit: &'a str,
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
            Counter::BackendInvocations { command } => format!(
                "flotilla_backend_invocations_total{{command=\"{}\"}}",
                label(command)
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
            Gauge::InventoryAge { host } => {
                format!("flotilla_inventory_age_seconds{{host=\"{}\"}}", label(host))
            }
            Gauge::AppliedCommit { commit } => {
                format!(
                    "flotilla_applied_commit_info{{commit=\"{}\"}}",
                    label(commit)
                )
            }
            Gauge::DesiredCommit { commit } => {
                format!(
                    "flotilla_desired_commit_info{{commit=\"{}\"}}",
                    label(commit)
                )
            }
        }
    }
}

/// The series family of `series` (the name before any labels).
fn family(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

fn write_family(out: &mut String, kind: &str, series: &BTreeMap<String, f64>) {
    let mut last = "";
    for (name, v) in series {
        let fam = family(name);
        if fam != last {
            let _ = writeln!(out, "# TYPE {fam} {kind}");
            last = fam;
        }
        let _ = writeln!(out, "{name} {v}");
    }
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics page.
pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let mut counters = shared
        .counters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (command, n) in shared.backend.invocations() {
        counters.insert(
            Counter::BackendInvocations { command: &command }.series(),
            n as f64,
        );
    }
    let mut gauges = shared
        .gauges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let now = message::now();
    for (host, inv) in shared
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        gauges.insert(
            Gauge::InventoryAge { host }.series(),
            now.saturating_sub(inv.listed_at) as f64,
        );
    }
    if let Some(c) = &shared
        .local
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .applied_commit
    {
        gauges.insert(Gauge::AppliedCommit { commit: c }.series(), 1.0);
    }
    if let Some(s) = shared.snapshot() {
        if let Some(c) = &s.commit {
            gauges.insert(Gauge::DesiredCommit { commit: c }.series(), 1.0);
        }
    }
    write_family(&mut out, "counter", &counters);
    write_family(&mut out, "gauge", &gauges);
    out
}

/// Healthy when a desired state is loaded and a reconcile pass finished within three
/// poll intervals; otherwise the reason.
pub fn health(shared: &Shared) -> Result<(), String> {
    if shared.snapshot().is_none() {
        return Err("no desired state read yet".into());
    }
    let last = shared
        .gauges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&Gauge::LastReconcileTimestamp.series())
        .copied()
        .unwrap_or(0.0) as u64;
    let limit = 3 * super::poll_interval(shared).as_secs().max(10);
    let age = message::now().saturating_sub(last);
    if age > limit {
        return Err(format!("last reconcile {age}s ago (limit {limit}s)"));
    }
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `addr` from a thread of its own.
pub fn serve(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("flotilla-http".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (code, body, ctype) = match (req.method(), req.url()) {
                    (tiny_http::Method::Get, "/metrics") => {
                        (200, render(&shared), "text/plain; version=0.0.4")
                    }
                    (tiny_http::Method::Get, "/healthz") => match health(&shared) {
                        Ok(()) => (200, "ok\n".to_string(), "text/plain"),
                        Err(e) => (503, format!("unhealthy: {e}\n"), "text/plain"),
                    },
                    _ => (404, "not found\n".to_string(), "text/plain"),
                };
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes());
                let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
                if let Ok(h) = header {
                    resp = resp.with_header(h);
                }
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
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
            (
                Counter::BackendInvocations { command: "list" },
                "flotilla_backend_invocations_total{command=\"list\"}",
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
            (
                Gauge::InventoryAge { host: "host1" },
                "flotilla_inventory_age_seconds{host=\"host1\"}",
            ),
            (
                Gauge::AppliedCommit { commit: "abc" },
                "flotilla_applied_commit_info{commit=\"abc\"}",
            ),
            (
                Gauge::DesiredCommit { commit: "abc" },
                "flotilla_desired_commit_info{commit=\"abc\"}",
            ),
        ];
        for (series, name) in g {
            assert_eq!(series.series(), name);
        }
    }

    #[test]
    fn families_get_one_type_line_and_labels_are_escaped() {
        let mut m = BTreeMap::new();
        m.insert(
            "flotilla_jobs_total{kind=\"create\",outcome=\"done\"}".to_string(),
            3.0,
        );
        m.insert(
            "flotilla_jobs_total{kind=\"stop\",outcome=\"done\"}".to_string(),
            1.0,
        );
        m.insert("flotilla_reconciles_total".to_string(), 7.0);
        let mut out = String::new();
        write_family(&mut out, "counter", &m);
        assert_eq!(
            out,
            "# TYPE flotilla_jobs_total counter\n\
             flotilla_jobs_total{kind=\"create\",outcome=\"done\"} 3\n\
             flotilla_jobs_total{kind=\"stop\",outcome=\"done\"} 1\n\
             # TYPE flotilla_reconciles_total counter\n\
             flotilla_reconciles_total 7\n"
        );
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
