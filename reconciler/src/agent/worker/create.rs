//! Creates: admission (the name check, the room, the decision and the reservation
//! under one lock), the build steps and hooks, forwarding along the chain, and removing
//! a half-made VM (safety rule 6).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::actual::{Marker, RunState};
use crate::backend::{BackendError, CreateSpec};
use crate::capacity::Usage;
use crate::message::{self, tubes, CreateJob, Envelope, Message, Outcome};
use crate::placement::{self, Decision, HostView};
use crate::planner::config_changes;
use crate::size::Size;

use super::super::events::EventKind;
use super::super::hooks::{self, HookInput};
use super::super::metrics::Counter;
use super::super::usage::Claims;
use super::super::Shared;
use super::admission::{claims_now, max_age};
use super::journal::{journal, journaled};
use super::{result, End};

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

/// What admitting a create came to: send it on to the next host, or end the job here.
pub(super) enum Built {
    Forward(Box<CreateJob>, String),
    End(Box<End>),
}

fn ended(end: End) -> Built {
    Built::End(Box::new(end))
}

/// Sends the create on to host `to` as `job`, its next hop, under the same job id. The
/// job here is done once the put succeeds; else it is released for a later try (to `to`
/// only, should the put have reached it).
pub(super) async fn forward(shared: &Arc<Shared>, env: &Envelope, job: CreateJob, to: &str) -> End {
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
pub(super) fn admit_and_build(shared: &Shared, env: &Envelope, job: &CreateJob) -> Built {
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
