//! The inbox task: results for the creates and ops this host asked for, forgets and
//! triggers, from this host's beanstalkd.

use std::sync::Arc;
use std::time::Duration;

use beanstalk::Client;

use crate::intents::IntentStatus;
use crate::message::{self, tubes, Envelope, JobResult, Message, Outcome, RecentFailure};

use super::events::EventKind;
use super::metrics::Counter;
use super::pace::Backoff;
use super::state::Shared;
use super::RESERVE_WAIT;

/// Results and triggers, from this host's beanstalkd.
pub(super) async fn inbox_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
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
                shared.sleep(backoff.failed()).await;
                continue;
            }
        };
        backoff.succeeded();
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
                    body: Message::Control(c),
                    from,
                    ..
                }) => {
                    super::control::on_control(&shared, &c, &from);
                    client.delete(job.id).await
                }
                Ok(Envelope {
                    body: Message::Trigger(t),
                    from,
                    ..
                }) => {
                    shared.event(
                        EventKind::Trigger,
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
                        EventKind::Buried,
                        None,
                        None,
                        None,
                        format!("a `{}` message in the inbox; buried", other.body.kind()),
                    );
                    client.bury(job.id, 1024).await
                }
                Err(e) => {
                    shared.event(
                        EventKind::Buried,
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
            shared.event(
                EventKind::Forget,
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
            EventKind::Error,
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
    shared.count(Counter::Results {
        kind: &r.job_kind,
        outcome: outcome_name(&r.outcome),
    });
    shared.event(
        EventKind::Result,
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
                        EventKind::Error,
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
