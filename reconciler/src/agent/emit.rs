//! Emitting a pass's actions: creates (after their intent is on disk) and ops on this
//! host's own VMs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::actual::ActualVm;
use crate::desired::Snapshot;
use crate::intents::{Intent, IntentStatus};
use crate::message::{self, tubes, Envelope, Inventory, Message, Origin, UpdateJob, VmJob};
use crate::planner::{Action, Kind};

use super::decide;
use super::events::EventKind;
use super::metrics::Counter;
use super::state::{OpInFlight, Shared};

/// First hops that could not be reached in this pass: how many creates were not sent
/// to each, and the first error.
#[derive(Default)]
pub(super) struct Unsent(pub(super) BTreeMap<String, (usize, String)>);

pub(super) async fn emit_create(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    action: &Action,
    origin: &Origin,
    inventories: &BTreeMap<String, Inventory>,
    unsent: &mut Unsent,
) {
    let Action::Create {
        host,
        vm,
        resume,
        spec,
        ..
    } = action
    else {
        return;
    };
    let latencies = shared
        .latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // A VM with `host:` or `start_at:` goes there first, whatever the strategy.
    let fixed = *resume || spec.host.is_some() || spec.start_at.is_some();
    let to = decide::first_hop(shared.cfg.first_hop, host, fixed, inventories, &latencies);
    if let Some(h) = [shared.me(), &to]
        .into_iter()
        .find(|h| shared.identity_conflict(h))
    {
        tracing::warn!(%vm, host = %h, "create held back: the host is seen under two identities");
        return;
    }
    let Some(addr) = shared.addr_of(&to) else {
        return;
    };
    if let Some((n, _)) = unsent.0.get_mut(&to) {
        // Unreachable a moment ago in this pass: no intent, no attempt.
        *n += 1;
        return;
    }
    let now = message::now();
    let deadline = now + shared.cfg.worker.create_deadline.0.as_secs();
    let job = decide::create_job(snap, spec, origin.clone(), deadline);
    let env = shared.sealed(Envelope::new(
        &snap.cluster.id,
        shared.me(),
        &to,
        Message::Create(job),
    ));
    // Safety rule 2: the intent is on disk before the job is on the queue.
    let intent = Intent {
        vm: vm.clone(),
        job_id: env.id.clone(),
        first_hop: to.clone(),
        commit: origin.commit.clone(),
        spec_hash: spec.spec_hash.clone(),
        recorded_at: now,
        deadline,
        status: IntentStatus::Sent,
    };
    if let Err(e) = shared.intents.record(&intent) {
        shared.event(
            EventKind::Error,
            Some(vm),
            None,
            None,
            format!("cannot record the create intent, so no create is sent: {e}"),
        );
        return;
    }
    match shared
        .peers
        .put(&addr, tubes::CREATE, &env, shared.put_params(1024))
        .await
    {
        Ok(_) => {
            shared.count(Counter::Emitted { kind: "create" });
            shared.event(
                EventKind::Emit,
                Some(vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("create {vm} sent to {to}"),
            );
        }
        Err(e) if e.nothing_sent() => {
            // Nothing reached the queue: the intent can go, the next pass tries again.
            let _ = shared.intents.remove(vm);
            tracing::debug!(%vm, %to, error = %e, "create not sent");
            unsent.0.insert(to.clone(), (1, e.to_string()));
        }
        Err(e) => {
            // It may have reached the queue: the intent stays until its deadline.
            shared.event(EventKind::Error, Some(vm), Some(&env.id), None, format!("create {vm} to {to} may not have been sent: {e}; waiting for its result or deadline"));
        }
    }
}

/// Queues `action` on this host's ops tube, naming the VM it means by the job id in its
/// marker (`local` is the listing the action was planned from), and records it in
/// flight first: at most one op per VM is in flight on this host (safety rule 10).
pub(super) async fn emit_op(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    action: &Action,
    origin: &Origin,
    local: &[ActualVm],
) {
    let me = shared.me().to_string();
    let vm = action.vm().to_string();
    let Some(expect_job) = local
        .iter()
        .find(|v| v.name == vm)
        .and_then(|v| v.marker.as_ref())
        .map(|m| m.job_id.clone())
    else {
        // The planner plans ops on managed VMs only, which have a marker.
        tracing::warn!(%vm, "no marker to name the VM by; the op is not queued");
        return;
    };
    let spec_hash = snap.vms.get(&vm).map(|s| s.spec_hash.clone());
    let job = |replace| VmJob {
        vm: vm.clone(),
        host: me.clone(),
        expect_job: expect_job.clone(),
        spec_hash: spec_hash.clone(),
        replace,
        origin: origin.clone(),
    };
    let (body, kind, pri) = match action {
        Action::Destroy { .. } => (Message::Destroy(job(false)), Kind::Destroy, 100),
        // A replace is in flight as a replace: its destroy says so, and the planner holds
        // the VM back until it has ended.
        Action::Replace { .. } => (Message::Destroy(job(true)), Kind::Replace, 100),
        Action::Start { .. } => (Message::Start(job(false)), Kind::Start, 500),
        Action::Stop { .. } => (Message::Stop(job(false)), Kind::Stop, 500),
        Action::Update {
            changes,
            protect,
            autostart,
            restart,
            spec_hash,
            ..
        } => (
            Message::Update(UpdateJob {
                vm: vm.clone(),
                host: me.clone(),
                expect_job: expect_job.clone(),
                set: changes
                    .iter()
                    .filter_map(|c| c.to.clone().map(|v| (c.key.clone(), v)))
                    .collect(),
                unset: changes
                    .iter()
                    .filter(|c| c.to.is_none())
                    .map(|c| c.key.clone())
                    .collect(),
                grow_disk: None,
                restart: *restart,
                protect: *protect,
                autostart: *autostart,
                spec_hash: spec_hash.clone(),
                origin: origin.clone(),
            }),
            Kind::Update,
            800,
        ),
        Action::GrowDisk { to, restart, .. } => (
            Message::Update(UpdateJob {
                vm: vm.clone(),
                host: me.clone(),
                expect_job: expect_job.clone(),
                set: BTreeMap::new(),
                unset: Vec::new(),
                grow_disk: Some(*to),
                restart: *restart,
                protect: None,
                autostart: None,
                spec_hash: spec_hash.clone().unwrap_or_default(),
                origin: origin.clone(),
            }),
            Kind::GrowDisk,
            800,
        ),
        Action::Create { .. } => return,
    };
    let Some(addr) = shared.own_addr() else {
        return;
    };
    let env = shared.sealed(Envelope::new(&snap.cluster.id, &me, &me, body));
    // In flight before it is on the queue: its result can come before `put` returns, and
    // must find it. One entry per VM, so a VM with an op in flight gets no second one.
    {
        let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.get(&vm) {
            tracing::warn!(%vm, kind = ?o.kind, job = %o.job_id, "an op is in flight already; no second one is queued");
            return;
        }
        ops.insert(
            vm.clone(),
            OpInFlight {
                kind,
                job_id: env.id.clone(),
                expires: None,
            },
        );
    }
    match shared
        .peers
        .put(&addr, tubes::OPS, &env, shared.put_params(pri))
        .await
    {
        Ok(_) => {
            shared.count(Counter::Emitted {
                kind: env.body.kind(),
            });
            shared.event(
                EventKind::Emit,
                Some(&vm),
                Some(&env.id),
                Some(&origin.commit),
                format!("{} {vm} queued", env.body.kind()),
            );
        }
        Err(e) => {
            let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
            if ops.get(&vm).is_some_and(|o| o.job_id == env.id) {
                if e.nothing_sent() {
                    ops.remove(&vm);
                } else if let Some(o) = ops.get_mut(&vm) {
                    // It may be on the queue: held like a failed op, until its retry time.
                    o.expires = Some(Instant::now() + shared.cfg.worker.retry_failed.0);
                }
            }
            drop(ops);
            shared.event(
                EventKind::Error,
                Some(&vm),
                None,
                None,
                format!("cannot queue {} {vm}: {e}", env.body.kind()),
            )
        }
    }
}
