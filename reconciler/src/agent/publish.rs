//! The publish task: this host's inventory, for the other hosts and `status`, and the
//! watch of the vm_dir that tells it when a listing changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actual::ActualVm;
use crate::capacity::{Limits, Usage};
use crate::desired::Snapshot;
use crate::intents::IntentStatus;
use crate::message::{self, tubes, Envelope, InFlightCreate, Inventory, Message};

use super::metrics::Gauge;
use super::pace::{Pace, Woke};
use super::state::{list_local, poll_interval, Shared};
use super::stopped;
use super::{listing, usage};

/// Watches the datastores while the agent runs, so that a listing is kept until
/// something there changes; a change goes into the next inventory soon.
pub(super) async fn watch_vm_dir(shared: Arc<Shared>) {
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

/// This host's inventory, now: `seq` was taken before `vms` were listed.
pub(super) fn inventory(
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
    let built = shared
        .intents
        .built()
        .map_err(|e| format!("reading the closed creates: {e}"))?;
    let ops = shared
        .ops
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(vm, o)| message::OpInFlightItem {
            vm: vm.clone(),
            kind: o.kind,
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
        reconciled_at: local.reconciled_at,
        blocked: local.blocked.clone(),
        ops,
        desired_error: local.desired_error.clone(),
        switches: shared.switches().get().clone(),
        recent_events: shared.events.recent(RECENT_EVENTS),
        // Read after the intents (see there): an intent closed as built is recorded
        // before it is removed, so it shows here or there, never nowhere.
        built,
    })
}

/// How many of its latest events a host publishes in its inventory: enough for
/// `flotilla events --cluster --follow` between two publications, small beside the VMs.
const RECENT_EVENTS: usize = 100;

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

pub(super) async fn publish_loop(shared: Arc<Shared>) {
    let min_gap = Duration::from_millis(500);
    let mut last = Instant::now();
    // Publishing never backs off: a failure is logged and the next news retries.
    let pace = Pace::new(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        // Passes, results, the lease and the vm_dir watch wake a publication when there
        // is news; the timer only repeats the last one (issue 12: an idle agent's CPU went
        // into listing, signing and sending unchanged inventories).
        let woke = pace
            .wait(
                poll_interval(&shared),
                &[&shared.wake_publish],
                &shared.stop,
            )
            .await;
        if woke == Woke::Stopped {
            return;
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
            Message::Inventory(Box::new(inv)),
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
                        shared.set(Gauge::QueueJobs { tube, state }, n as f64);
                    }
                }
            }
        }
    }
}
