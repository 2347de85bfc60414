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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beanstalk::{Client, Job, PutParams};

use crate::actual::{ActualVm, Marker, RunState};
use crate::backend::{Backend, BackendError, CreateSpec};
use crate::capacity::Usage;
use crate::message::{self, tubes, CreateJob, Envelope, JobResult, Message, Outcome, UpdateJob};
use crate::placement::{self, Decision, HostView};
use crate::planner::config_changes;
use crate::size::Size;

use super::events::EventKind;
use super::hooks::{self, HookInput};
use super::metrics::Counter;
use super::usage::Claims;
use super::Shared;

/// How a job ends on this host.
#[derive(Debug)]
pub(super) enum End {
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

/// Why a build step failed, and whether to try again.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error("stopped by shutdown")]
    Cancelled,
}

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
    let mut backoff = Duration::from_millis(200);
    while !shared.stopping() {
        let Some(addr) = shared.own_addr() else {
            shared.sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut client = match connect(&addr, creates).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%addr, error = %format!("{e:#}"), "worker cannot reach beanstalkd; retrying");
                shared.sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
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

enum Built {
    Forward(Box<CreateJob>, String),
    End(Box<End>),
}

fn ended(end: End) -> Built {
    Built::End(Box::new(end))
}

async fn forward(shared: &Arc<Shared>, env: &Envelope, job: CreateJob, to: &str) -> End {
    if shared.identity_conflict(to) {
        return End::Release(
            Duration::from_secs(5),
            format!("next host {to} is seen under two identities: no create goes to it"),
        );
    }
    let Some(addr) = shared.addr_of(to) else {
        return End::Release(
            Duration::from_secs(5),
            format!("next host {to} has no address"),
        );
    };
    let vm = job.vm.clone();
    let reason = job
        .visited
        .last()
        .map(|r| r.reason.clone())
        .unwrap_or_default();
    let sent = job.clone();
    // Addressed, and signed, for the next hop only: a copy of it is no good elsewhere.
    let mut next = Envelope::new(&env.cluster, shared.me(), to, Message::Create(job));
    // The job keeps its id along the chain: markers and results refer to it.
    next.id = env.id.clone();
    let next = shared.sealed(next);
    match shared
        .peers
        .put(&addr, tubes::CREATE, &next, shared.put_params(1024))
        .await
    {
        Ok(_) => {
            shared.forward_settled(&env.id);
            shared.count(Counter::Forwards);
            shared.event(
                EventKind::Forward,
                Some(&vm),
                Some(&env.id),
                None,
                format!("forwarded to {to}: {reason}"),
            );
            End::Delete(None)
        }
        // The next host is down: keep the job here and try again; it must not be lost.
        // If the put may have reached it, the job only ever goes there again.
        Err(e) => {
            if !e.nothing_sent() {
                shared.forward_unsure(&env.id, to, sent);
            }
            End::Release(
                Duration::from_secs(5),
                format!("cannot forward to {to}: {e}"),
            )
        }
    }
}

/// Lists, decides and reserves under the admission lock, then builds.
fn admit_and_build(shared: &Shared, env: &Envelope, job: &CreateJob) -> Built {
    let me = shared.me();
    let done = |outcome| {
        End::Delete(Some((
            job.origin.clone(),
            result(env, &job.vm, me, &job.origin.commit, outcome),
        )))
    };
    if message::now() > job.expires_at {
        return ended(done(Outcome::Refused {
            reason: "the create expired before any host built it; its owner plans it again".into(),
        }));
    }
    let Some(snap) = shared.snapshot() else {
        return ended(End::Release(
            Duration::from_secs(1),
            "no desired state".into(),
        ));
    };
    let Some(host) = snap.cluster.hosts.get(me) else {
        return ended(End::Release(
            Duration::from_secs(10),
            format!("this host `{me}` is not in cluster.yaml"),
        ));
    };
    let limits = crate::capacity::Limits::from(&host.limits);
    let cluster = snap.cluster.id.clone();
    let backend = shared.backend.clone();
    let mut resume = false;
    {
        let mut adm = shared.admission();
        if adm.building.contains(&job.vm) || adm.operating.contains(&job.vm) {
            return ended(End::Release(
                Duration::from_secs(2),
                format!("{} is being built or changed by another slot", job.vm),
            ));
        }
        // The name check reads the guest's own files: exact, whatever the usage view says.
        let existing = match backend.read_marker(&job.vm) {
            Err(BackendError::NotFound { .. }) => None,
            Ok(marker) => Some(marker),
            // Unreadable, as a listing counts it: unmanaged, the safe reading.
            Err(BackendError::Marker { path, source }) => {
                tracing::warn!(vm = %job.vm, path = %path.display(), error = %source, "ignoring an unreadable marker");
                Some(None)
            }
            Err(e) => return ended(End::Failed(e.to_string())),
        };
        if let Some(marker) = existing {
            match &marker {
                Some(m) if m.cluster == cluster && m.job_id == env.id && m.complete => {
                    return ended(done(Outcome::Done));
                }
                Some(m) if m.cluster == cluster && !m.complete => resume = true,
                // No marker yet, but this host's journal says it began building it: a
                // crash between `vm create` and the marker. Ours, half-made.
                None if journaled(shared, &job.vm).is_some() => resume = true,
                Some(m) if m.cluster == cluster => {
                    return ended(done(Outcome::Refused {
                        reason: format!(
                            "{} already exists on {me}, built by job {}",
                            job.vm, m.job_id
                        ),
                    }))
                }
                _ => {
                    return ended(done(Outcome::Refused {
                        reason: format!(
                            "an unmanaged VM named {} exists on {me}; it is not touched",
                            job.vm
                        ),
                    }))
                }
            }
        }
        let claims = match claims_now(&mut adm, backend.as_ref(), &shared.listing, max_age(shared))
        {
            Ok(c) => c,
            Err(e) => return ended(End::Failed(e.to_string())),
        };
        let overload = shared.overload(claims.running_memory, &limits);
        // Every guest once, builds and changes in progress at what they will claim: the
        // view's holds are the reservations (issue 14, case 8).
        let used = claims.used;
        let decision = if resume {
            // A half-made VM of this VM's earlier create is rebuilt in place: it is
            // already counted, and its hold replaces what the listing shows of it.
            Decision::Admit {
                reserve: job.order.usage(),
            }
        } else {
            placement::decide(
                job,
                HostView {
                    name: me,
                    next: host.next.as_deref(),
                    used,
                    reserved: Usage::default(),
                    limits: &limits,
                    overload: overload.as_deref(),
                    drained: shared.switches().get().drains(me),
                },
            )
        };
        match decision {
            Decision::Admit { reserve } => {
                adm.usage.reserve(
                    &job.vm,
                    Claims {
                        used: reserve,
                        running_memory: if job.order.running {
                            job.order.memory
                        } else {
                            Size(0)
                        },
                    },
                );
                adm.building.insert(job.vm.clone());
            }
            Decision::Forward { to, job } => return Built::Forward(job, to),
            Decision::Unplaceable { reason } => {
                shared.count(Counter::Jobs {
                    kind: "create",
                    outcome: "unplaceable",
                });
                return ended(done(Outcome::Unplaceable { reason }));
            }
        }
    }
    // The build is one change of the kept listing, made stale once, when it ends.
    let _job = shared.listing.job(&job.vm);
    shared.event(
        EventKind::Job,
        Some(&job.vm),
        Some(&env.id),
        Some(&job.origin.commit),
        format!("building {} (hops left {})", job.vm, job.hops_left),
    );
    if let Err(e) = journal(shared, &job.vm, Some(&env.id)) {
        let mut adm = shared.admission();
        adm.usage.release(&job.vm);
        adm.building.remove(&job.vm);
        return ended(End::Failed(format!("cannot write the build journal: {e}")));
    }
    let outcome = build(shared, env, job, resume);
    // Built, or cleaned up: the journal entry has served. A failed cleanup keeps it, so
    // the next try still knows the leftover is ours.
    let leftover = outcome.is_err()
        && !name_taken(&outcome)
        && shared
            .backend
            .get(&job.vm)
            .ok()
            .flatten()
            .is_some_and(|v| v.marker.is_none());
    if !leftover {
        let _ = journal(shared, &job.vm, None);
    }
    {
        let mut adm = shared.admission();
        adm.building.remove(&job.vm);
        match &outcome {
            // What it claims now that it is built: known, so no listing is needed.
            Ok(()) => adm.usage.built(
                &job.vm,
                Claims {
                    used: job.order.usage(),
                    running_memory: if job.order.running {
                        job.order.memory
                    } else {
                        Size(0)
                    },
                },
            ),
            // Half-made, cleaned up or not: the next admission lists.
            Err(_) => adm.usage.release(&job.vm),
        }
    }
    ended(match outcome {
        Ok(()) => {
            shared.count(Counter::Jobs {
                kind: "create",
                outcome: "done",
            });
            shared.event(
                EventKind::Job,
                Some(&job.vm),
                Some(&env.id),
                Some(&job.origin.commit),
                format!("built {} on {me}", job.vm),
            );
            done(Outcome::Done)
        }
        Err(StepError::Cancelled) => End::Release(Duration::ZERO, "stopped by shutdown".into()),
        Err(e) => {
            shared.event(
                EventKind::Error,
                Some(&job.vm),
                Some(&env.id),
                Some(&job.origin.commit),
                format!("create failed: {e}"),
            );
            End::Failed(e.to_string())
        }
    })
}

/// How old a kept listing may be (`backend.list_interval`).
fn max_age(shared: &Shared) -> Duration {
    shared
        .cfg
        .backend
        .list_interval
        .map_or(super::listing::MAX_AGE, |d| d.0)
}

/// What this host's guests claim now, each once, from the view or else from a listing
/// taken under the admission lock (so no other slot admits against the same room).
/// A view older than its own age limit is as good as new while the kept listing is
/// (`kept`, at most `max_age` old): the vm_dir watch vouches that nothing changed since
/// but this agent's own jobs, which the view follows. Else the first create after a
/// few idle seconds listed the host once more (issue 12, Measure).
fn claims_now(
    adm: &mut super::Admission,
    backend: &dyn Backend,
    kept: &super::listing::Listing,
    max_age: Duration,
) -> Result<Claims, BackendError> {
    if let Some(c) = adm.usage.claims(Instant::now()) {
        return Ok(c);
    }
    if let Some((began, vms)) = kept.kept_since(max_age) {
        adm.usage.listed(began, &vms);
        if let Some(c) = adm.usage.claims_vouched() {
            return Ok(c);
        }
    }
    let token = kept.begin();
    let listing = adm.usage.begin(Instant::now());
    let vms = backend.list()?;
    adm.usage.listed(listing, &vms);
    kept.keep(token, listing, &vms);
    // Just listed, so the view serves; the listing alone is the fallback.
    Ok(adm
        .usage
        .claims(Instant::now())
        .unwrap_or_else(|| Claims::of(&vms)))
}

/// Builds the VM; on any failure removes what it made (safety rule 6).
fn build(shared: &Shared, env: &Envelope, job: &CreateJob, resume: bool) -> Result<(), StepError> {
    if resume {
        remove_half_made(shared, &job.vm)?;
    }
    let r = build_steps(shared, env, job);
    // A VM that took the name between admission and `vm create` is not ours: nothing is
    // cleaned up (safety rule 1), whatever the build journal says.
    if r.is_err() && !name_taken(&r) {
        if let Err(e) = remove_half_made(shared, &job.vm) {
            shared.event(
                EventKind::Error,
                Some(&job.vm),
                Some(&env.id),
                None,
                format!("cleaning up the half-made VM failed: {e}; the next try cleans it up"),
            );
        }
    }
    r
}

/// True when `vm create` refused because the name exists.
fn name_taken(r: &Result<(), StepError>) -> bool {
    matches!(
        r,
        Err(StepError::Backend(BackendError::AlreadyExists { .. }))
    )
}

/// The build journal: `<state_dir>/building/<vm>` holds the id of the job building it,
/// written (and synced) before `vm create`. It is how a VM that a crash left without a
/// marker is still known as this host's own half-made VM.
fn journal_path(shared: &Shared, vm: &str) -> std::path::PathBuf {
    shared.cfg.state_dir.join("building").join(vm)
}

fn journaled(shared: &Shared, vm: &str) -> Option<String> {
    std::fs::read_to_string(journal_path(shared, vm)).ok()
}

fn journal(shared: &Shared, vm: &str, job: Option<&str>) -> std::io::Result<()> {
    let path = journal_path(shared, vm);
    match job {
        Some(id) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, id.as_bytes())?;
            f.sync_all()
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

fn remove_half_made(shared: &Shared, vm: &str) -> Result<(), StepError> {
    let backend = shared.backend.as_ref();
    let Some(found) = backend.get(vm)? else {
        return Ok(());
    };
    // Only what this cluster half-made is removed; anything else is left alone.
    match &found.marker {
        Some(m) if m.cluster == shared.cluster_id() && !m.complete => {}
        None if journaled(shared, vm).is_some() => {}
        _ => return Ok(()),
    }
    // Out of vm_list first: should the rest fail (a stale vmm makes `vm destroy`
    // refuse), nothing half-made is started at the next boot.
    if found.autostart.is_some() {
        backend.set_autostart(vm, false)?;
    }
    if found.state != RunState::Stopped {
        backend.stop(vm, Duration::from_secs(5))?;
    }
    backend.destroy(vm)?;
    Ok(())
}

fn check(cancel: &AtomicBool) -> Result<(), StepError> {
    if cancel.load(Ordering::SeqCst) {
        Err(StepError::Cancelled)
    } else {
        Ok(())
    }
}

fn build_steps(shared: &Shared, env: &Envelope, job: &CreateJob) -> Result<(), StepError> {
    let backend = shared.backend.as_ref();
    let cancel = &shared.cancel;
    let order = &job.order;
    let marker = |complete| Marker {
        format_version: Marker::FORMAT_VERSION,
        cluster: shared.cluster_id(),
        job_id: env.id.clone(),
        spec_hash: job.spec_hash.clone(),
        commit: job.origin.commit.clone(),
        owner: job.origin.owner.clone(),
        protect: order.protect,
        complete,
        placed_from: job.visited.first().map(|r| r.host.clone()),
    };
    backend.install_template(&order.template, &order.template_conf)?;
    check(cancel)?;
    backend.create(&CreateSpec {
        name: job.vm.clone(),
        datastore: None,
        template: order.template.clone(),
        disk_size: Some(order.disk),
        cpu: Some(order.cpu),
        memory: Some(order.memory),
    })?;
    // The marker goes in first, incomplete: from now on a crash leaves a VM that every
    // host recognises as half-made by this job.
    backend.write_marker(&job.vm, &marker(false))?;
    check(cancel)?;
    {
        let made = backend.read_config(&job.vm)?;
        let changes = config_changes(&made, &order.config);
        let set = changes
            .iter()
            .filter_map(|c| c.to.clone().map(|v| (c.key.clone(), v)))
            .collect();
        let unset: Vec<String> = changes
            .iter()
            .filter(|c| c.to.is_none())
            .map(|c| c.key.clone())
            .collect();
        if !changes.is_empty() {
            backend.configure(&job.vm, &set, &unset)?;
        }
    }
    check(cancel)?;
    let ran = hooks::provision(
        shared.cfg.hooks_dir.as_deref(),
        shared.cfg.provision.as_deref(),
        shared.cfg.secrets_dir.as_deref(),
        &HookInput {
            vm: job.vm.clone(),
            vm_dir: backend.guest_dir(&job.vm)?,
            host: shared.me().to_string(),
            job: env.id.clone(),
            commit: job.origin.commit.clone(),
            cpu: order.cpu,
            memory: order.memory.to_string(),
            disk: order.disk.to_string(),
            swap: order.swap.to_string(),
            options: order.options.clone().into_iter().collect(),
            secrets: order.secrets.clone(),
        },
        &shared.cfg.state_dir.join("hooks"),
        shared.cfg.worker.hook_timeout.0,
    )?;
    for (hook, out) in ran {
        shared.event(
            EventKind::Hook,
            Some(&job.vm),
            Some(&env.id),
            None,
            format!("{hook}: {out}"),
        );
    }
    check(cancel)?;
    // Into vm_list only once it runs: a VM whose start failed is half-made, and a
    // half-made VM must not be started at the next boot.
    if order.running {
        backend.start(&job.vm)?;
    }
    backend.set_autostart(&job.vm, order.running)?;
    backend.write_marker(&job.vm, &marker(true))?;
    Ok(())
}

/// Destroy, start, stop and update.
fn op(shared: &Shared, env: &Envelope) -> End {
    let me = shared.me();
    let (vm, host, origin) = match &env.body {
        Message::Destroy(j) | Message::Start(j) | Message::Stop(j) => (&j.vm, &j.host, &j.origin),
        Message::Update(j) => (&j.vm, &j.host, &j.origin),
        _ => return End::Bury("not an op".into(), None),
    };
    let done = |outcome| {
        End::Delete(Some((
            origin.clone(),
            result(env, vm, me, &origin.commit, outcome),
        )))
    };
    if host != me {
        return done(Outcome::Refused {
            reason: format!("job for {host} reached {me}"),
        });
    }
    let backend = shared.backend.as_ref();
    let found = match backend.get(vm) {
        Ok(v) => v,
        Err(e) => return End::Failed(e.to_string()),
    };
    let Some(found) = found else {
        // Gone already: a destroy is done; anything else has nothing to act on.
        return match env.body {
            Message::Destroy(_) => done(Outcome::Done),
            _ => done(Outcome::Refused {
                reason: format!("{vm} does not exist on {me}"),
            }),
        };
    };
    // Safety rule 1: only VMs with this cluster's marker are ever changed.
    let Some(marker) = found
        .marker
        .clone()
        .filter(|m| m.cluster == shared.cluster_id())
    else {
        return done(Outcome::Refused {
            reason: format!("{vm} on {me} is not managed by this cluster; it is not touched"),
        });
    };
    let stop_timeout = shared.cfg.worker.stop_timeout.0;
    if matches!(env.body, Message::Destroy(_)) && marker.protect {
        return done(Outcome::Refused {
            reason: format!("{vm} is protected (its marker says so); clear protect first"),
        });
    }
    // Just before it runs (issue 14): the op means this very build of the VM, and the
    // newest desired state still asks for it; else it is dropped, and the next pass
    // plans from the newest state.
    let Some(snap) = shared.snapshot() else {
        return End::Release(Duration::from_secs(1), "no desired state read yet".into());
    };
    if let Err(why) = super::recheck::recheck(&env.body, &marker, &snap) {
        shared.count(Counter::Jobs {
            kind: env.body.kind(),
            outcome: "dropped",
        });
        shared.event(
            EventKind::Dropped,
            Some(vm),
            Some(&env.id),
            Some(&origin.commit),
            format!("{} {vm} dropped: {why}", env.body.kind()),
        );
        return done(Outcome::Dropped { reason: why });
    }
    let running = matches!(found.state, RunState::Running | RunState::Bootloader);
    // A change in place is admitted like a create (issue 14, case 6); what it will claim
    // is held until it ends.
    let held = match &env.body {
        Message::Update(u) => match admit_change(shared, &found, u) {
            Ok(held) => held,
            Err(Admit::NoRoom(reason)) => {
                shared.event(
                    EventKind::Job,
                    Some(vm),
                    Some(&env.id),
                    Some(&origin.commit),
                    format!("update {vm} not applied: {reason}"),
                );
                return done(Outcome::Unplaceable { reason });
            }
            Err(Admit::Failed(why)) => return End::Failed(why),
        },
        _ => false,
    };
    // One change of the kept listing, made stale once, when it ends.
    let _job = shared.listing.job(vm);
    let r: Result<(), BackendError> = (|| match &env.body {
        Message::Destroy(_) => {
            if found.state != RunState::Stopped {
                backend.stop(vm, stop_timeout)?;
            }
            backend.destroy(vm)
        }
        Message::Start(_) => {
            backend.set_autostart(vm, true)?;
            // Started already (by an earlier copy of this op, say): a second `vm start`
            // could kill the guest.
            if running {
                return Ok(());
            }
            backend.start(vm)
        }
        Message::Stop(_) => {
            backend.set_autostart(vm, false)?;
            backend.stop(vm, stop_timeout).map(|_| ())
        }
        Message::Update(u) => update(backend, &found, marker.clone(), u, stop_timeout),
        _ => Ok(()),
    })();
    // Room freed or claimed, done or half done: admission lists before it trusts its view.
    if held {
        shared.admission().usage.release(vm);
    } else {
        shared.admission().usage.changed();
    }
    match r {
        Ok(()) => {
            shared.count(Counter::Jobs {
                kind: env.body.kind(),
                outcome: "done",
            });
            shared.event(
                EventKind::Job,
                Some(vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("{} {vm} done", env.body.kind()),
            );
            done(Outcome::Done)
        }
        Err(e) => {
            shared.event(
                EventKind::Error,
                Some(vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("{} {vm} failed: {e}", env.body.kind()),
            );
            End::Failed(e.to_string())
        }
    }
}

/// Why a change in place is not admitted.
enum Admit {
    /// It does not fit the host's limits: reported, not applied.
    NoRoom(String),
    /// Admission could not tell (no desired state, a listing failed): tried again.
    Failed(String),
}

/// Admits the change `u` of `found` like a create: what it adds (more memory, a larger
/// disk0) must fit next to everything the host's guests claim and the builds and
/// changes in progress hold. True when admitted with a hold on the VM's new claim, which
/// the caller releases when the change ends; false when it adds nothing.
fn admit_change(shared: &Shared, found: &ActualVm, u: &UpdateJob) -> Result<bool, Admit> {
    let mut after = found.clone();
    if let Some(m) = u.set.get("memory").and_then(|m| m.parse::<Size>().ok()) {
        after.memory = m;
    }
    if let (Some(size), Some(d)) = (u.grow_disk, after.disks.first_mut()) {
        d.size = d.size.max(size);
    }
    let claim = Claims::of(std::slice::from_ref(&after));
    let grows = claim.used - Usage::of(std::slice::from_ref(found));
    if grows == Usage::default() {
        return Ok(false);
    }
    let snap = shared
        .snapshot()
        .ok_or_else(|| Admit::Failed("no desired state read yet".into()))?;
    let limits = snap
        .cluster
        .hosts
        .get(shared.me())
        .map(|h| crate::capacity::Limits::from(&h.limits))
        .ok_or_else(|| {
            Admit::Failed(format!(
                "this host `{}` is not in cluster.yaml",
                shared.me()
            ))
        })?;
    let mut adm = shared.admission();
    let claims = claims_now(
        &mut adm,
        shared.backend.as_ref(),
        &shared.listing,
        max_age(shared),
    )
    .map_err(|e| Admit::Failed(e.to_string()))?;
    crate::capacity::fits_growth(claims.used, grows, &limits)
        .map_err(|e| Admit::NoRoom(e.to_string()))?;
    adm.usage.reserve(&found.name, claim);
    Ok(true)
}

/// Changes the VM in place. A change that fails part way puts the VM back as it was:
/// the config keys it set or removed are restored and a VM that ran runs again, so a
/// failed change never leaves a VM stopped (issue 14, case 3).
fn update(
    backend: &dyn Backend,
    found: &ActualVm,
    mut marker: Marker,
    u: &UpdateJob,
    stop_timeout: Duration,
) -> Result<(), BackendError> {
    if let (Some(_), Some(d)) = (u.grow_disk, found.disks.first()) {
        if !d.growable() {
            // Before anything is stopped: the backend would refuse it anyway.
            return Err(BackendError::Invalid {
                what: "disk".into(),
                reason: format!(
                    "disk0 of `{}` is a {} device; only file images are grown",
                    u.vm, d.dev
                ),
            });
        }
    }
    let running = found.state != RunState::Stopped;
    let changes_config = !u.set.is_empty() || !u.unset.is_empty() || u.grow_disk.is_some();
    let restart = running && u.restart && changes_config;
    if restart {
        backend.stop(&u.vm, stop_timeout)?;
    }
    let mut configured = false;
    let r = (|| {
        if !u.set.is_empty() || !u.unset.is_empty() {
            configured = true;
            backend.configure(&u.vm, &u.set, &u.unset)?;
        }
        if let Some(size) = u.grow_disk {
            backend.grow_disk(&u.vm, 0, size)?;
        }
        if let Some(p) = u.protect {
            marker.protect = p;
        }
        marker.spec_hash = u.spec_hash.clone();
        backend.write_marker(&u.vm, &marker)
    })();
    if r.is_err() && configured {
        // Back to the keys as they were; a failure here is reported with the first.
        let touched = u.set.keys().chain(u.unset.iter());
        let (set, unset): (Vec<_>, Vec<_>) = touched.partition(|k| found.config.contains_key(*k));
        let set = set
            .into_iter()
            .map(|k| (k.clone(), found.config[k].clone()))
            .collect();
        let unset: Vec<String> = unset.into_iter().cloned().collect();
        if let Err(e) = backend.configure(&u.vm, &set, &unset) {
            tracing::warn!(vm = %u.vm, error = %e, "cannot restore the config of a failed change");
        }
    }
    let r = if restart {
        // The change's own failure, if any, is the one reported.
        let started = backend.start(&u.vm);
        r.and(started)
    } else {
        r
    };
    // The autostart entry last: only a VM as it should be is registered to boot.
    match (r, u.autostart) {
        (Ok(()), Some(on)) => backend.set_autostart(&u.vm, on),
        (r, _) => r,
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
    use crate::agent::listing::{tests::Counting, Listing};
    use crate::agent::usage::UsageView;

    /// An admission whose view comes from a listing begun 30 s ago (older than the
    /// view's own limit), kept in `listing` as well.
    fn listed_long_ago(listing: &Listing) -> super::super::Admission {
        let mut adm = super::super::Admission {
            building: Default::default(),
            operating: Default::default(),
            usage: UsageView::default(),
        };
        let at = Instant::now()
            .checked_sub(Duration::from_secs(30))
            .unwrap_or_else(Instant::now);
        let token = listing.begin();
        let began = adm.usage.begin(at);
        adm.usage.listed(began, &[]);
        listing.keep(token, began, &[]);
        adm
    }

    /// Guards issue 12, Measure (calls per create): admission trusted its view of the
    /// host for 3 s after a listing, then listed again, so the first create of a commit
    /// after an idle spell listed the host though the kept listing, which the vm_dir
    /// watch vouches for, was as good. A view that cannot follow a change, a change the
    /// watch saw and a host without a watch still make it list.
    #[test]
    fn admission_takes_the_kept_listing_the_watch_vouches_for() {
        let backend = Counting::default();
        let lists = || backend.lists.load(Ordering::SeqCst);
        let age = Duration::from_secs(300);
        let listing = Listing::default();
        listing.watch_for_tests();

        let mut adm = listed_long_ago(&listing);
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 0, "the kept listing serves");

        let mut adm = listed_long_ago(&listing);
        adm.usage.changed();
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 1, "a change the view cannot follow");

        let mut adm = listed_long_ago(&listing);
        listing.changed();
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 2, "a change the watch saw");

        let unwatched = Listing::default();
        let mut adm = listed_long_ago(&unwatched);
        claims_now(&mut adm, &backend, &unwatched, age).unwrap();
        assert_eq!(lists(), 3, "no watch");
    }
}
