//! The reconcile task: lists this host's VMs, reads the other hosts' inventories, plans,
//! and emits this host's share of the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actual::HostActual;
use crate::desired::{self, Snapshot};
use crate::intents::IntentStatus;
use crate::message::{self, Inventory, Origin};
use crate::planner::{self, Action, InFlight, Kind, PlanOptions};
use crate::source::{self, GitSource};

use super::decide;
use super::decide::{Emit, IntentFate};
use super::emit::{emit_create, emit_op, Unsent};
use super::events::EventKind;
use super::metrics::{Counter, Gauge};
use super::pace::{Backoff, Pace, Woke};
use super::publish::inventory;
use super::state::{list_local, poll_interval, Shared};

pub(super) async fn reconcile_loop(shared: Arc<Shared>) {
    let mut pace = Pace::new(Duration::from_millis(500), Duration::from_secs(60));
    // A burst of wakes becomes one pass per gap. Results come in bursts while builds run,
    // and all a pass does for most of them is close an intent; each pass lists the host
    // and reads every inventory, so they wait longer, unless news comes meanwhile.
    let min_gap = Duration::from_millis(250);
    let results_gap = Duration::from_secs(1);
    // The same failure is written to the event log once, not at every retry.
    let mut last_error: Option<String> = None;
    // While creates wait for other hosts, passes come soon, then less often while
    // nothing they wait for changes (issue 13: every 100 ms, each pass reading every
    // inventory); news (a wait-for host's new inventory, a result, a trigger) makes the
    // next one soon again.
    let mut soon = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let pass = Instant::now();
        let wait = match shared.snapshot() {
            Some(snap) => match reconcile_once(&shared, &snap).await {
                Ok((waiting, news)) => {
                    last_error = None;
                    if news || !waiting {
                        soon.succeeded();
                    }
                    pace.success(if waiting {
                        soon.failed()
                    } else {
                        poll_interval(&shared)
                    })
                }
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        shared.event(
                            EventKind::Error,
                            None,
                            None,
                            snap.commit.as_deref(),
                            format!("reconcile failed: {e}"),
                        );
                    }
                    last_error = Some(e);
                    // A failed pass waits out its backoff whatever wakes it.
                    pace.error()
                }
            },
            None => pace.success(poll_interval(&shared)),
        };
        let news = [&shared.wake_reconcile, &shared.results_in];
        match pace.wait(wait, &news, &shared.stop).await {
            Woke::Timer => {}
            Woke::News(0) => {
                soon.succeeded();
                tokio::time::sleep(min_gap.saturating_sub(pass.elapsed())).await;
            }
            Woke::News(_) => {
                soon.succeeded();
                tokio::select! {
                    _ = tokio::time::sleep(results_gap.saturating_sub(pass.elapsed())) => {}
                    _ = shared.wake_reconcile.notified() => {
                        tokio::time::sleep(min_gap.saturating_sub(pass.elapsed())).await;
                    }
                }
            }
            Woke::Stopped => return,
        }
    }
}

/// Reads every other host's inventory; keeps the last one read of a host that does not
/// answer. Returns the hosts that answered, and those of them whose inventory changed
/// since the last read (the others are not read again).
async fn refresh_inventories(
    shared: &Arc<Shared>,
    snap: &Snapshot,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut answered = BTreeSet::new();
    let mut changed = BTreeSet::new();
    let mut reads = Vec::new();
    // Hosts that left cluster.yaml are read too: their guests still exist (rule 9).
    let departed: Vec<(String, String)> = shared
        .departed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .hosts()
        .iter()
        .map(|(h, d)| (h.clone(), d.addr.clone()))
        .collect();
    let hosts = snap
        .cluster
        .hosts
        .iter()
        .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
        .chain(departed);
    for (name, addr) in hosts {
        if name == shared.me() {
            continue;
        }
        let s = shared.clone();
        reads.push(tokio::spawn(async move {
            let window = s.cfg.message_window.0.as_secs();
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                s.peers
                    .inventory_read(&addr, &name, Some((&s.keys, window))),
            )
            .await;
            (name, r)
        }));
    }
    for r in reads {
        let Ok((name, r)) = r.await else { continue };
        match r {
            Ok(Ok((Some(inv), took, read))) if inv.host == name => {
                answered.insert(name.clone());
                if read {
                    changed.insert(name.clone());
                }
                let saw = shared
                    .departed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saw(&name, &inv);
                if let Err(e) = saw {
                    tracing::warn!(host = %name, error = %e, "cannot record a departed host's inventory");
                }
                if let Some(a) = &inv.agent {
                    shared
                        .identities
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .observe(&name, &a.identity, message::now());
                }
                shared
                    .latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), took);
                shared
                    .inventories
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, inv);
            }
            Ok(Ok((Some(inv), _, _))) => {
                tracing::warn!(host = %name, claimed = %inv.host, "inventory names another host; ignored");
            }
            Ok(Ok((None, _, _))) => {}
            Ok(Err(e)) => tracing::debug!(host = %name, error = %e, "no inventory"),
            Err(_) => tracing::debug!(host = %name, "inventory read timed out"),
        }
    }
    (answered, changed)
}

/// Who owns which VM under each of `commits`: from the snapshots this agent loaded, else
/// read from its git cache (a commit it skipped). A commit it cannot read is left out,
/// and creates wait for hosts on it whatever the VM.
async fn owners_at<'a>(
    shared: &Arc<Shared>,
    commits: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, decide::CommitOwners> {
    let wanted: BTreeSet<String> = commits.cloned().collect();
    // Only the commits asked for: the cache may hold many, each with every VM.
    let mut known: BTreeMap<String, decide::CommitOwners> = {
        let cache = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
        wanted
            .iter()
            .filter_map(|c| Some((c.clone(), cache.get(c)?.clone())))
            .collect()
    };
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|c| !known.contains_key(c))
        .collect();
    if missing.is_empty() {
        return known;
    }
    let url = shared.cfg.desired.url.clone();
    let dir = source::cache_dir(&shared.cfg.state_dir.join("git"), &url);
    let loaded = tokio::task::spawn_blocking(move || {
        let Ok(src) = GitSource::open(&url, &dir) else {
            return Vec::new();
        };
        missing
            .into_iter()
            .filter_map(|c| {
                let oid = git2::Oid::from_str(&c).ok()?;
                let files = src.read(oid).ok()?;
                let snap = desired::load(&files, Some(c.clone())).ok()?;
                Some((c, decide::CommitOwners::of(&snap)))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut cache = shared.owners.lock().unwrap_or_else(|p| p.into_inner());
    for (c, o) in loaded {
        cache.insert(c.clone(), o.clone());
        known.insert(c, o);
    }
    known
}

/// One pass: list, read inventories, plan, emit this host's share. Returns whether
/// creates wait for hosts not heard from yet (the next pass should come soon), and
/// whether a host they wait for published news (a new inventory) since the last pass.
async fn reconcile_once(
    shared: &Arc<Shared>,
    snap: &Arc<Snapshot>,
) -> Result<(bool, bool), String> {
    let started = Instant::now();
    shared.seen().reconcile_turn = Some(message::now());
    if !shared.lease.held() {
        // Safety rule 8: without the host's lease this agent may be a second one.
        return Ok((false, false));
    }
    if let Some(left) = shared.left_cluster() {
        // Safety rule 9: a host that left cluster.yaml acts on nothing; it only goes on
        // publishing its inventory, now as having seen the commit that removed it, so
        // that creates waiting for it go ahead.
        shared.local().reconciled_commit = Some(left);
        shared.wake_publish.notify_one();
        return Ok((false, false));
    }
    let me = shared.me().to_string();
    let seq = shared.inventory_seq.next();
    let listed_at = message::now();
    let local = list_local(shared)
        .await
        .map_err(|e| format!("listing this host's VMs: {e}"))?;
    let known: BTreeSet<String> = shared
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    let (answered, changed) = refresh_inventories(shared, snap).await;
    let (departed, forgotten) = {
        let d = shared.departed.lock().unwrap_or_else(|p| p.into_inner());
        (d.hosts().clone(), d.forgotten().clone())
    };
    let mut inventories = shared
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // A host that left cluster.yaml counts with its last inventory, read now or kept on
    // disk; one declared gone does not count at all.
    inventories.retain(|h, _| snap.cluster.hosts.contains_key(h) || departed.contains_key(h));
    for (h, d) in &departed {
        if let (false, Some(inv)) = (inventories.contains_key(h), &d.inventory) {
            inventories.insert(h.clone(), inv.clone());
        }
    }
    // This host's own listing counts as its freshest inventory (intents placed here
    // close on it).
    inventories.insert(
        me.clone(),
        inventory(shared, snap, local.clone(), listed_at, seq)?,
    );
    let mut actual = vec![HostActual {
        host: me.clone(),
        vms: local.clone(),
    }];
    for (name, inv) in &inventories {
        if name != &me {
            actual.push(HostActual {
                host: name.clone(),
                vms: inv.vms.clone(),
            });
        }
    }
    // A host that left cluster.yaml and whose inventory this host never read may hold
    // any VM: it counts as unseen until it answers or is forgotten (rule 9).
    let unseen = decide::unseen(
        snap.cluster.hosts.keys().chain(departed.keys()),
        &me,
        actual.iter().map(|a| a.host.as_str()),
    );

    // Intents: close the ones that are done with, keep the rest in flight.
    let now = message::now();
    let mut in_flight: Vec<InFlight> = Vec::new();
    // Failed creates waiting for their retry time: nothing is under way for them.
    let mut retrying = 0;
    let intents = shared.intents.all().map_err(|e| e.to_string())?;
    for intent in &intents {
        let hash = snap.vms.get(&intent.vm).map(|v| v.spec_hash.as_str());
        match decide::intent_fate(intent, hash, &inventories, now) {
            IntentFate::Open => {
                if matches!(intent.status, IntentStatus::Failed { .. }) {
                    retrying += 1;
                }
                in_flight.push(decide::in_flight(intent));
            }
            IntentFate::Close(why) => {
                // The record first: it guards the VM until every host has read the
                // builder's inventory that showed it (decide::builds_unseen).
                if let Some(b) = decide::built_record(intent, &inventories) {
                    shared.intents.record_built(&b).map_err(|e| e.to_string())?;
                }
                shared
                    .intents
                    .remove(&intent.vm)
                    .map_err(|e| e.to_string())?;
                shared.event(
                    EventKind::Intent,
                    Some(&intent.vm),
                    Some(&intent.job_id),
                    Some(&intent.commit),
                    format!("create intent closed: {why}"),
                );
            }
        }
    }
    {
        let mut ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|_, o| o.expires.is_none_or(|t| Instant::now() < t));
        for (vm, o) in ops.iter() {
            in_flight.push(InFlight {
                vm: vm.clone(),
                kind: o.kind,
                host: Some(me.clone()),
            });
        }
    }
    // A failed op waits for its retry time, but nothing is under way for its VM: other
    // actions on it go ahead (this one is held back below, not planned around).
    let retrying_ops: BTreeSet<(String, Kind)> = {
        let mut retry = shared.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        retry.retain(|_, t| now < *t);
        retry.keys().cloned().collect()
    };
    // Another host's open create (it owned the VM under an earlier host set or pin) holds
    // the VM back here too: a second create now could build it twice.
    let mut planned_in_flight = in_flight.clone();
    planned_in_flight.extend(decide::others_in_flight(
        &inventories,
        &me,
        now,
        shared.cfg.worker.create_deadline.0.as_secs(),
    ));
    let plan = planner::plan(snap, &actual, &planned_in_flight, &PlanOptions::default());
    // Safety rules 2 and 9: a create waits for every host that may still send it under
    // another commit, answering or not, until it is on this commit or declared gone.
    let commits: BTreeMap<String, Option<String>> = inventories
        .iter()
        .map(|(h, inv)| (h.clone(), inv.commit.clone()))
        .collect();
    let owners = owners_at(shared, commits.values().flatten()).await;
    let mut waiting: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in plan.actions() {
        if let Action::Create { owner, vm, .. } = a {
            if owner != &me {
                continue;
            }
            let mut hosts = decide::waits_for(
                vm,
                &me,
                snap.commit.as_deref(),
                &commits,
                &owners,
                &forgotten,
            );
            hosts.extend(decide::builds_unseen(vm, &inventories, &forgotten));
            if !hosts.is_empty() {
                waiting.insert(vm.clone(), hosts);
            }
        }
    }
    let skews = clock_skews(shared, &inventories, &answered, &me, now);
    let mut emits = decide::select(&plan, &me, unseen.is_empty() && skews.is_empty(), &waiting);
    let selected = emits.len();
    emits.retain(|e| match e {
        Emit::Op(a) => !retrying_ops.contains(&(a.vm().to_string(), a.kind())),
        Emit::Create(_) => true,
    });
    // Issue 15, verb 3: a suspended VM (or cluster) is planned and reported, never
    // acted on; it counts as held back, so the commit is not applied meanwhile.
    let switches = shared.switches().get().clone();
    emits.retain(|e| {
        let (Emit::Op(a) | Emit::Create(a)) = e;
        !switches.suspends(a.vm())
    });
    let held_back = selected - emits.len();
    let waiting_creates = plan
        .actions()
        .filter(|a| matches!(a, Action::Create { owner, .. } if owner == &me))
        .count();
    if !unseen.is_empty() && waiting_creates > 0 {
        tracing::info!(hosts = ?unseen, creates = waiting_creates, "creates wait until every host's inventory is known");
    }
    if !waiting.is_empty() {
        tracing::debug!(
            ?waiting,
            "creates wait until these hosts reconcile this commit"
        );
    }
    // Soon again only while a host it waits for answers (it is about to catch up); a
    // silent one is waited for at the ordinary pace.
    let catching_up = waiting.values().flatten().any(|h| answered.contains(h));
    // A host first heard from, or one waited for with a new inventory.
    let news = changed
        .iter()
        .any(|h| !known.contains(h) || waiting.values().flatten().any(|w| w == h));
    shared.local().waiting = waiting
        .iter()
        .map(|(vm, hosts)| message::WaitingCreate {
            vm: vm.clone(),
            for_hosts: hosts.clone(),
        })
        .collect();
    let commit = snap.commit.clone().unwrap_or_default();
    let origin = Origin {
        commit: commit.clone(),
        owner: me.clone(),
        reply_to: decide::reply_to(snap, &me, shared.own_addr().as_deref()),
    };
    // Applied means this host saw every other host too (an unseen host could still need
    // something from it), and nothing is under way but failed creates waiting to retry:
    // those are shown as such in the inventory, and `apply --wait` reports them.
    let nothing_to_do = emits.is_empty()
        && held_back == 0
        && in_flight.len() == retrying
        && waiting_creates == 0
        && unseen.is_empty();
    let mut unsent = Unsent::default();
    for emit in emits {
        if !shared.lease.held() {
            break;
        }
        match emit {
            Emit::Create(action) => {
                emit_create(shared, snap, action, &origin, &inventories, &mut unsent).await
            }
            Emit::Op(action) => emit_op(shared, snap, action, &origin, &local).await,
        }
    }
    // One line per unreachable first hop, not one per create.
    for (to, (n, e)) in unsent.0 {
        shared.event(
            EventKind::Error,
            None,
            None,
            Some(&origin.commit),
            format!("cannot send {n} creates to {to}: {e}; they wait for the next pass"),
        );
    }
    shared.metrics.plan(&plan.summary(), plan.blocked());
    shared.metrics.inventories(&inventories);
    shared.seen().blocked = plan.blocked().cloned().collect();
    for b in plan.blocked() {
        if b.host == me {
            tracing::debug!(vm = %b.vm, reason = ?b.reason, "{}", b.detail);
        }
    }
    // The whole plan's, not only this host's: a VM held by a host that left the cluster
    // is reported by the hosts that still plan.
    let blocked = plan.blocked().map(blocked_item).collect();
    if nothing_to_do {
        shared
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied_commit = snap.commit.clone();
    }
    shared.count(Counter::Reconciles);
    let took = started.elapsed().as_secs_f64();
    shared.add(Counter::ReconcileSeconds, took);
    shared.set(Gauge::ReconcileLastSeconds, took);
    shared.set(Gauge::LastReconcileTimestamp, message::now() as f64);
    // `flotilla_plan_actions` came with `metrics.plan` above.
    {
        let mut local = shared.local.lock().unwrap_or_else(|p| p.into_inner());
        local.reconciled_commit = snap.commit.clone();
        local.reconciled_at = message::now();
        local.blocked = blocked;
    }
    tracing::debug!(took = ?started.elapsed(), "reconciled");
    shared.wake_publish.notify_one();
    Ok((!unseen.is_empty() || catching_up, news))
}

/// A blocked difference as inventories carry it.
fn blocked_item(b: &planner::Blocked) -> message::BlockedItem {
    let reason = serde_json::to_value(b.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", b.reason));
    message::BlockedItem {
        host: b.host.clone(),
        vm: b.vm.clone(),
        reason,
        detail: b.detail.clone(),
    }
}

/// Issue 14, case 4: the clock skews beyond `max_clock_skew` that stop this host's
/// creates, first-hand or reported by peers. A change in what this host sees itself is
/// an error event; the sighting goes into its inventory, for `flotilla status` and for
/// the peers, which stop too.
fn clock_skews(
    shared: &Shared,
    inventories: &BTreeMap<String, Inventory>,
    answered: &BTreeSet<String>,
    me: &str,
    now: u64,
) -> Vec<String> {
    let max = shared.cfg.max_clock_skew.0.as_secs();
    let seen = decide::clocks_ahead(inventories, me, now, max);
    let sighting = (!seen.is_empty()).then(|| seen.join("; "));
    let changed = {
        let mut local = shared.local.lock().unwrap_or_else(|p| p.into_inner());
        let changed = local.clock_skew != sighting;
        local.clock_skew = sighting.clone();
        changed
    };
    if changed {
        let (kind, text) = match &sighting {
            Some(s) => (
                EventKind::ClockSkew,
                format!("{s}: this host sends no creates until the clocks agree"),
            ),
            None => (
                EventKind::ClockAgreed,
                "clocks agree again within max_clock_skew".to_string(),
            ),
        };
        shared.event(kind, None, None, None, text);
    }
    let mut all = seen;
    // Reports only from hosts heard from now: a host shut down to fix its clock must not
    // hold every create back with the last report it published.
    all.extend(decide::skew_reports(
        inventories.iter().filter(|(h, _)| answered.contains(*h)),
        me,
    ));
    if !all.is_empty() {
        tracing::warn!(skews = ?all, "creates held back: clocks disagree beyond max_clock_skew");
    }
    all
}
