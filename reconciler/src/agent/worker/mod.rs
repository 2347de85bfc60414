//! The worker: reserves jobs from this host's `flotilla.create` and `flotilla.ops`
//! tubes and carries them out through the backend.
//!
//! Each slot is one task with its own connection (a reserved job must be deleted,
//! released, touched or buried on the connection that reserved it). `max_creates` slots
//! take creates and ops, one more takes ops only, so a destroy never waits for builds.
//!
//! A create is admitted under one lock that covers listing the VMs, the decision and the
//! reservation, so two slots never both fit into the same room. Every action is
//! idempotent: a redelivered create finds its marker (same job id) and finishes or cleans
//! up; a destroy of a VM already gone is done.
//!
//! The parts: this file holds the slots, the dispatch of a job and the touching of a
//! job while it runs; [`create`] admits, builds and forwards creates; [`ops`] carries
//! out destroy, start, stop and update; [`admission`] tells what the host's guests
//! claim; [`journal`] records the builds begun.

mod admission;
mod create;
mod journal;
mod ops;

use std::sync::Arc;
use std::time::Duration;

use beanstalk::{Client, Job, PutParams};

use crate::message::{self, tubes, Envelope, JobResult, Message, Outcome};

use super::events::EventKind;
use super::metrics::Counter;
use super::pace::Backoff;
use super::Shared;
// The parts name these `super::…`, as they did when the worker was one file.
use super::{listing, recheck, Admission};

use create::{admit_and_build, forward, Built};
use ops::op;

/// How a job ends on this host.
#[derive(Debug)]
enum End {
    /// Done with: delete it, and send the result if any.
    Delete(Option<(Origin, JobResult)>),
    /// Try again after `delay`; not a failure (waiting for room, a peer, a lock).
    Release(Duration, String),
    /// The action failed: retried with backoff a bounded number of times, then buried
    /// with a `failed` result (see [`run`]).
    Failed(String),
    /// Never again: bury it with the reason, and send the result if any.
    Bury(String, Option<(Origin, JobResult)>),
}

type Origin = crate::message::Origin;

fn result(env: &Envelope, vm: &str, host: &str, commit: &str, outcome: Outcome) -> JobResult {
    JobResult {
        job_id: env.id.clone(),
        job_kind: env.body.kind().to_string(),
        vm: vm.to_string(),
        host: host.to_string(),
        commit: commit.to_string(),
        outcome,
        // Set when it is sent, after the work (see `Shared::send_result`).
        inventory_seq: None,
    }
}

/// Runs one worker slot until shutdown.
pub(super) async fn slot(shared: Arc<Shared>, creates: bool) {
    let mut backoff = connect_backoff();
    while !shared.stopping() {
        let Some(addr) = shared.own_addr() else {
            shared.sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut client = match connect(&addr, creates).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%addr, error = %format!("{e:#}"), "worker cannot reach beanstalkd; retrying");
                shared.sleep(backoff.failed()).await;
                continue;
            }
        };
        backoff.succeeded();
        while !shared.stopping() {
            if !shared.lease.held() {
                // Safety rule 8: without the host's lease this agent may be a second one.
                shared.sleep(Duration::from_millis(200)).await;
                continue;
            }
            match client.reserve_with_timeout(super::RESERVE_WAIT).await {
                Ok(None) => {}
                Ok(Some(job)) if !shared.lease.held() => {
                    let pri = client.stats_job(job.id).await.map_or(1024, |s| s.pri);
                    if let Err(e) = client.release(job.id, pri, 0).await {
                        tracing::warn!(job = job.id, error = %e, "cannot give a job back");
                    }
                }
                Ok(Some(job)) => handle(&shared, &mut client, job).await,
                Err(beanstalk::Error::DeadlineSoon) => {}
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "worker lost beanstalkd");
                    break;
                }
            }
        }
    }
}

/// How a slot retries a beanstalkd it cannot reach: 200 ms, doubling up to 10 s, and
/// 200 ms again once it connected.
fn connect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
}

async fn connect(addr: &str, creates: bool) -> Result<Client, beanstalk::Error> {
    let mut c = Client::connect(addr).await?;
    if creates {
        c.watch(tubes::CREATE).await?;
    }
    c.watch(tubes::OPS).await?;
    c.ignore("default").await?;
    Ok(c)
}

/// Decodes, runs and ends one job.
async fn handle(shared: &Arc<Shared>, client: &mut Client, job: Job) {
    let id = job.id;
    let mut acted = None;
    let decoded = message::decode(&job.body);
    // An op this host's own reconciler may be waiting on.
    let op = decoded.as_ref().ok().and_then(|env| match &env.body {
        Message::Destroy(_) | Message::Start(_) | Message::Stop(_) | Message::Update(_) => Some((
            env.body.vm().unwrap_or_default().to_string(),
            env.id.clone(),
        )),
        _ => None,
    });
    let end = match decoded {
        Err(e) => {
            shared.count(Counter::Rejected {
                reason: "undecodable",
            });
            End::Bury(format!("cannot decode: {e}"), None)
        }
        // The tube the job was reserved from is half of its address (safety rule 7).
        Ok(env) => match client.stats_job(id).await {
            Err(e) => End::Release(
                Duration::from_secs(1),
                format!("cannot read the job's tube: {e}"),
            ),
            // The job came back after this host built its VM (its delete and its result
            // were lost with beanstalkd): answer it again, or the owner waits for its
            // deadline.
            Ok(stats) if built_here(shared, &env, &stats.tube) => {
                shared.event(
                    EventKind::Job,
                    env.body.vm(),
                    Some(&env.id),
                    None,
                    "create delivered again after its VM was built; its result is sent again"
                        .into(),
                );
                End::Delete(again_done(shared, &env))
            }
            // Safety rule 5: nothing is done for a message that does not verify.
            Ok(stats) => match shared.check(&env, &stats.tube) {
                Err(e) => End::Bury(format!("refused: {e}"), None),
                Ok(()) => {
                    let attempts = stats.reserves.min(u32::MAX as u64) as u32;
                    let end = run(shared, client, id, attempts, env.clone()).await;
                    acted = Some(env);
                    end
                }
            },
        },
    };
    if let (End::Delete(_), Some(env)) = (&end, &acted) {
        shared.acted(env);
    }
    if let (End::Delete(_) | End::Bury(..), Some((vm, job_id))) = (&end, &op) {
        shared.op_ended(vm, job_id);
    }
    let (verb, res) = match end {
        End::Delete(r) => {
            if let Some((origin, r)) = &r {
                shared.send_result(origin, r).await;
            }
            ("delete", client.delete(id).await)
        }
        End::Release(delay, why) => {
            tracing::info!(job = id, %why, ?delay, "released for a later try");
            (
                "release",
                client
                    .release(id, 1024, delay.as_secs().min(u32::MAX as u64) as u32)
                    .await,
            )
        }
        // `run` turns every failure into a release or a bury; this only keeps the
        // match whole.
        End::Failed(why) => (
            "release",
            client.release(id, 1024, 1).await.map(|()| {
                tracing::warn!(job = id, %why, "released after a failure");
            }),
        ),
        End::Bury(why, r) => {
            shared.event(
                EventKind::Buried,
                None,
                None,
                None,
                format!("job {id} buried: {why}"),
            );
            shared.count(Counter::JobsBuried);
            if let Some((origin, r)) = &r {
                shared.send_result(origin, r).await;
            }
            ("bury", client.bury(id, 1024).await)
        }
    };
    if let Err(e) = res {
        tracing::warn!(job = id, error = %e, "cannot {verb} the job; beanstalkd will hand it out again after its TTR");
    }
    shared.wake_publish.notify_one();
}

/// True when `env` is a create that verifies and whose VM this host holds complete,
/// built by this very job (the marker records the job id).
fn built_here(shared: &Shared, env: &Envelope, tube: &str) -> bool {
    let Message::Create(job) = &env.body else {
        return false;
    };
    let window = shared.cfg.message_window.0.as_secs();
    let verified = shared
        .keys
        .verify(env, shared.me(), tube, message::now(), window);
    if verified.is_err() || env.cluster != shared.cluster_id() {
        return false;
    }
    matches!(
        shared.backend.read_marker(&job.vm),
        Ok(Some(m)) if m.cluster == env.cluster && m.job_id == env.id && m.complete
    )
}

/// The `done` result of a create [`built_here`], for its owner.
fn again_done(shared: &Shared, env: &Envelope) -> Option<(Origin, JobResult)> {
    let Message::Create(job) = &env.body else {
        return None;
    };
    let r = result(env, &job.vm, shared.me(), &job.origin.commit, Outcome::Done);
    Some((job.origin.clone(), r))
}

/// Runs `work` on a blocking thread, touching job `id` while it runs so it outlives its
/// TTR.
async fn touching<T: Send + 'static>(
    client: &mut Client,
    id: u64,
    every: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let task = tokio::task::spawn_blocking(work);
    tokio::pin!(task);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            r = &mut task => return r.ok(),
            _ = tick.tick() => {
                if let Err(e) = client.touch(id).await {
                    tracing::warn!(job = id, error = %e, "cannot touch the job");
                }
            }
        }
    }
}

async fn run(
    shared: &Arc<Shared>,
    client: &mut Client,
    id: u64,
    attempts: u32,
    env: Envelope,
) -> End {
    let Some(snap) = shared.snapshot() else {
        return End::Release(Duration::from_secs(1), "no desired state read yet".into());
    };
    if env.cluster != snap.cluster.id {
        return End::Bury(
            format!(
                "job of cluster `{}`, this host is in `{}`",
                env.cluster, snap.cluster.id
            ),
            None,
        );
    }
    if let Some(left) = shared.left_cluster() {
        // Safety rule 9: a host that left cluster.yaml builds, changes and destroys
        // nothing; the owner hears so and plans the create for a host that is listed.
        let reason = format!(
            "{} left cluster.yaml at {left}; it acts on nothing",
            shared.me()
        );
        let r = origin_of(&env.body).map(|o| {
            let vm = env.body.vm().unwrap_or_default().to_string();
            let r = result(
                &env,
                &vm,
                shared.me(),
                &o.commit,
                Outcome::Refused {
                    reason: reason.clone(),
                },
            );
            (o, r)
        });
        return End::Delete(r);
    }
    let attempts = attempts.max(1);
    let ttr = snap.cluster.policies.ttr;
    let every = (ttr / 2).max(Duration::from_millis(500));
    let me = shared.me().to_string();
    let kind = env.body.kind();
    let shared2 = shared.clone();
    let env2 = env.clone();
    // A forward that may have reached the next host is only ever sent there again, never
    // built here: the next host may be building it already.
    if let (Message::Create(_), Some((to, next))) = (&env.body, shared.maybe_forwarded(&env.id)) {
        return forward(shared, &env, next, &to).await;
    }
    let end = match &env.body {
        Message::Create(_) if shared.identity_conflict(&me) => End::Release(
            Duration::from_secs(5),
            format!("host {me} is seen under two identities: no create is built here"),
        ),
        Message::Create(job) => {
            let job = job.clone();
            match touching(client, id, every, move || {
                admit_and_build(&shared2, &env2, &job)
            })
            .await
            {
                Some(Built::Forward(next, to)) => return forward(shared, &env, *next, &to).await,
                Some(Built::End(end)) => *end,
                None => End::Release(Duration::from_secs(1), "worker thread failed".into()),
            }
        }
        Message::Destroy(_) | Message::Start(_) | Message::Stop(_) | Message::Update(_) => {
            // Safety rule 10 here too: whatever reached the queue (a copy kept over an
            // agent restart, say), two ops never run on one VM at once. vm-bhyve's own
            // start is check-then-lock: two at once kill the first guest.
            let vm = env.body.vm().unwrap_or_default().to_string();
            {
                let mut adm = shared.admission();
                if adm.building.contains(&vm) || !adm.operating.insert(vm.clone()) {
                    return End::Release(
                        Duration::from_secs(1),
                        format!("{vm} is being built or changed by another slot"),
                    );
                }
            }
            let end = touching(client, id, every, move || op(&shared2, &env2))
                .await
                .unwrap_or_else(|| {
                    End::Release(Duration::from_secs(1), "worker thread failed".into())
                });
            shared.admission().operating.remove(&vm);
            end
        }
        other => End::Bury(format!("a `{}` message is not a job", other.kind()), None),
    };
    // Failures are retried with backoff a bounded number of times, then buried.
    match end {
        End::Failed(why) => {
            let retries = shared.cfg.worker.retries.max(1);
            if attempts >= retries {
                let origin = origin_of(&env.body);
                let vm = env.body.vm().unwrap_or_default().to_string();
                let outcome = Outcome::Failed {
                    reason: why.clone(),
                    attempts,
                };
                shared.count(Counter::Jobs {
                    kind,
                    outcome: "failed",
                });
                let r = origin.map(|o| {
                    let r = result(&env, &vm, &me, &o.commit, outcome);
                    (o, r)
                });
                End::Bury(format!("failed: {why} (after {attempts} tries)"), r)
            } else {
                let backoff = shared.cfg.worker.backoff.0 * 2u32.saturating_pow(attempts - 1);
                End::Release(backoff, format!("failed: {why}"))
            }
        }
        other => other,
    }
}

fn origin_of(m: &Message) -> Option<Origin> {
    match m {
        Message::Create(j) => Some(j.origin.clone()),
        Message::Destroy(j) | Message::Start(j) | Message::Stop(j) => Some(j.origin.clone()),
        Message::Update(j) => Some(j.origin.clone()),
        _ => None,
    }
}

/// Parameters of a put of a job.
pub(super) fn params(pri: u32, ttr: Duration) -> PutParams {
    PutParams {
        pri,
        delay: 0,
        ttr: ttr.as_secs().clamp(1, u32::MAX as u64) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards issue 13, part 1 (one backoff helper): a slot that cannot reach beanstalkd
    /// retries at the pace of the loop written out here before: 200 ms, doubling up to
    /// 10 s, and 200 ms again after a connection.
    #[test]
    fn a_slot_retries_beanstalkd_at_the_same_pace() {
        let ms = Duration::from_millis;
        let mut b = connect_backoff();
        let waits: Vec<_> = (0..8).map(|_| b.failed()).collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000].map(ms)
        );
        b.succeeded();
        assert_eq!(b.failed(), ms(200));
    }
}
