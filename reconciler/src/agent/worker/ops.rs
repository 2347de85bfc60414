//! Ops on a VM this host holds: destroy, start, stop and update, each checked again just
//! before it runs, and a change in place admitted like a create.

use std::time::Duration;

use crate::actual::{ActualVm, Marker, RunState};
use crate::backend::{Backend, BackendError};
use crate::capacity::Usage;
use crate::message::{Envelope, Message, Outcome, UpdateJob};
use crate::size::Size;

use super::super::events::EventKind;
use super::super::metrics::Counter;
use super::super::usage::Claims;
use super::super::Shared;
use super::admission::{claims_now, max_age};
use super::{result, End};

/// Destroy, start, stop and update.
pub(super) fn op(shared: &Shared, env: &Envelope) -> End {
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
