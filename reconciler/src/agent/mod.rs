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
pub mod control;
pub mod decide;
pub mod departed;
pub mod events;
pub mod health;
pub mod hooks;
pub mod identity;
pub mod lease;
pub mod listing;
pub mod metrics;
mod pace;
pub mod peers;
mod recheck;
mod replay;
mod seq;
pub mod status;
pub mod usage;
mod worker;

mod emit;
mod inbox;
mod publish;
mod reconcile;
pub mod registry;
pub mod series;
mod source;
mod state;

pub use state::{backend_for, HostsFile, Shared, StartError};
use state::{poll_interval, Admission};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use events::EventKind;

/// Runs the agent until SIGTERM or SIGINT, or until it finds another agent live for its
/// host name: then it stops and returns why (the caller exits with `EX_CONFIG`).
pub async fn run(shared: Arc<Shared>) -> Option<String> {
    shared.event(
        EventKind::Start,
        None,
        None,
        None,
        format!("agent {} starting", env!("CARGO_PKG_VERSION")),
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(lease::keep(shared.clone()));
    tasks.spawn(source::source_loop(shared.clone()));
    tasks.spawn(reconcile::reconcile_loop(shared.clone()));
    tasks.spawn(inbox::inbox_loop(shared.clone()));
    tasks.spawn(publish::publish_loop(shared.clone()));
    tasks.spawn(publish::watch_vm_dir(shared.clone()));
    if let Some(addr) = shared.cfg.http {
        if let Err(e) = metrics::serve(shared.clone(), addr) {
            shared.event(
                EventKind::Error,
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
            EventKind::Stop,
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
    shared.event(EventKind::Stop, None, None, None, "agent stopped".into());
    shared.lease.refusal()
}

/// How long the inbox and each worker wait in one `reserve`. Each wait that ends empty
/// is a round trip to beanstalkd and a wake-up of an idle agent (issue 12); a job still
/// comes at once, and a job reserved after the lease was lost is given back as before.
/// A stopping agent finishes its waits (and meanwhile publishes what its last pass saw).
pub(super) const RESERVE_WAIT: Duration = Duration::from_secs(5);

/// Resolves once the agent stops.
pub(super) async fn stopped(rx: &mut watch::Receiver<bool>) {
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
