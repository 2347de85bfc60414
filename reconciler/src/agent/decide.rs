//! What this host's reconciler does next: pure functions over the plan, the intents and
//! the inventories (no I/O, no clock: the time is an argument).
//!
//! The planner sees the whole cluster; each host acts on its share of the plan only:
//! - creates of the VMs it owns (so one host alone may emit a VM's create), and only when
//!   it knows every host's actual state (an unseen host may hold the VM already);
//! - every other action on the VMs it holds itself, planned from its own fresh listing;
//!   a replace becomes a destroy here, and the owner creates the VM again once an
//!   inventory shows it gone.

use std::collections::BTreeMap;

use crate::desired::{DesiredState, Snapshot, VmSpec};
use crate::intents::{Intent, IntentStatus};
use crate::message::{BuiltCreate, CreateJob, Inventory, Origin, VmOrder};
use crate::planner::{Action, InFlight, Kind, Plan};

use super::config::FirstHop;

/// Seconds past a create's deadline before the owner drops its intent: room for clocks
/// that disagree a little between hosts (the worker refuses the job at the deadline).
pub const DEADLINE_GRACE: u64 = 60;

/// What to do with one open intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentFate {
    /// Still in flight: the planner must not plan the VM's create.
    Open,
    /// Done with; remove it and say why.
    Close(String),
}

/// Decides whether `intent` still blocks a new create of its VM. `desired_hash` is the
/// VM's spec hash in the current snapshot (`None`: not desired any more);
/// `inventories` the latest inventory of every host heard from.
pub fn intent_fate(
    intent: &Intent,
    desired_hash: Option<&str>,
    inventories: &BTreeMap<String, Inventory>,
    now: u64,
) -> IntentFate {
    // The VM built by this very job is the proof, whatever became of its result (lost
    // with a beanstalkd, say): the marker carries the job id.
    if let Some(host) = built_by_job(intent, inventories) {
        return IntentFate::Close(format!(
            "built on {host} by job {}, seen in its inventory",
            intent.job_id
        ));
    }
    match &intent.status {
        IntentStatus::Sent => {
            if now > intent.deadline.saturating_add(DEADLINE_GRACE) {
                IntentFate::Close(format!(
                    "no result for job {} by its deadline; planned again if no host shows the VM",
                    intent.job_id
                ))
            } else {
                IntentFate::Open
            }
        }
        // A placed VM is awaited in its host's inventory; until that host lists its VMs
        // after the build, an inventory without it proves nothing, so there is no
        // deadline here: closing early could build the VM a second time elsewhere.
        // "After" is by the builder's own inventory sequence, never by comparing its
        // clock with this host's (issue 14, case 4).
        IntentStatus::Placed { host, at, seq } => match inventories.get(host) {
            Some(inv) if listed_after_build(inv, *at, *seq) => {
                if inv.vms.iter().any(|v| v.name == intent.vm) {
                    IntentFate::Close(format!("built on {host}, seen in its inventory"))
                } else {
                    IntentFate::Close(format!(
                        "built on {host}, but gone from its inventory since"
                    ))
                }
            }
            _ => IntentFate::Open,
        },
        IntentStatus::Failed { retry_at, .. } => {
            if desired_hash.is_some_and(|h| h != intent.spec_hash) {
                IntentFate::Close("the spec changed; planned again".into())
            } else if desired_hash.is_none() {
                IntentFate::Close("not desired any more".into())
            } else if now >= *retry_at {
                IntentFate::Close("retry time reached; planned again".into())
            } else {
                IntentFate::Open
            }
        }
    }
}

/// Whether `inv` was listed after the build whose result arrived at `at` (this host's
/// clock) carrying the builder's inventory sequence `seq`. With a sequence, causality
/// decides: the builder took `seq` after the build and numbers each inventory before
/// listing it. Without one (a result from an older agent), only an inventory stamped
/// later than `at` by more than any clock skew the cluster runs with may decide.
fn listed_after_build(inv: &Inventory, at: u64, seq: Option<u64>) -> bool {
    match seq {
        Some(seq) => inv.seq > seq,
        None => inv.listed_at > at.saturating_add(DEADLINE_GRACE),
    }
}

/// The host whose inventory shows `intent`'s VM complete, built by the intent's own job.
fn built_by_job<'a>(
    intent: &Intent,
    inventories: &'a BTreeMap<String, Inventory>,
) -> Option<&'a str> {
    inventories.iter().find_map(|(host, inv)| {
        inv.vms
            .iter()
            .any(|v| {
                v.name == intent.vm
                    && v.marker
                        .as_ref()
                        .is_some_and(|m| m.complete && m.job_id == intent.job_id)
            })
            .then_some(host.as_str())
    })
}

/// What the owner publishes when `intent` closes because an inventory shows its VM
/// built (by the intent's job, or on its placed host after the build): the builder and
/// that inventory's sequence. `None` when no inventory shows the VM (a close as gone,
/// refused or expired guards nothing).
pub fn built_record(
    intent: &Intent,
    inventories: &BTreeMap<String, Inventory>,
) -> Option<BuiltCreate> {
    let record = |host: &str, inv: &Inventory| BuiltCreate {
        vm: intent.vm.clone(),
        host: host.to_string(),
        seq: inv.seq,
    };
    if let Some(host) = built_by_job(intent, inventories) {
        return inventories.get(host).map(|inv| record(host, inv));
    }
    let IntentStatus::Placed { host, at, seq } = &intent.status else {
        return None;
    };
    let inv = inventories.get(host)?;
    (listed_after_build(inv, *at, *seq) && inv.vms.iter().any(|v| v.name == intent.vm))
        .then(|| record(host, inv))
}

/// The builders this host's create of `vm` waits for: a [`BuiltCreate`] published by
/// any host (`inventories`) says the builder's inventory at its `seq` showed the VM;
/// while this host's own latest inventory of that builder is older, the VM may exist
/// where this host cannot see it. The intent that guarded it has closed, so without
/// this wait a host reading peers one after another (an old inventory of the builder, a
/// new one of the closer) would create it a second time (safety rule 2). A builder an
/// operator declared gone (`forgotten`) is not waited for: its VMs count as gone.
pub fn builds_unseen(
    vm: &str,
    inventories: &BTreeMap<String, Inventory>,
    forgotten: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let mut hosts: Vec<String> = inventories
        .values()
        .flat_map(|inv| inv.built.iter())
        .filter(|b| b.vm == vm && !forgotten.contains(&b.host))
        .filter(|b| inventories.get(&b.host).is_none_or(|i| i.seq < b.seq))
        .map(|b| b.host.clone())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The create job for `spec`, as its owner sends it: everything a worker needs to build
/// the VM, the hop budget of the cluster, and whether it must stay on its first host.
pub fn create_job(snap: &Snapshot, spec: &VmSpec, origin: Origin, expires_at: u64) -> CreateJob {
    CreateJob {
        vm: spec.name.clone(),
        order: VmOrder {
            template: spec.template.clone(),
            template_conf: snap
                .templates
                .get(&spec.template)
                .map(|t| t.text.clone())
                .unwrap_or_default(),
            cpu: spec.cpu,
            memory: spec.memory,
            disk: spec.disk,
            swap: spec.swap,
            config: spec.config.clone(),
            running: spec.state == DesiredState::Running,
            protect: spec.protect,
            options: spec.hooks.clone(),
            secrets: spec.secrets.clone(),
        },
        spec_hash: spec.spec_hash.clone(),
        origin,
        hops_left: snap.cluster.policies.hop_limit,
        visited: Vec::new(),
        expires_at,
        pinned: spec.host.is_some(),
    }
}

/// The intent as the planner's in-flight entry.
pub fn in_flight(intent: &Intent) -> InFlight {
    InFlight {
        vm: intent.vm.clone(),
        kind: Kind::Create,
        host: Some(intent.first_hop.clone()),
    }
}

/// The creates other hosts' inventories show in flight, as in-flight entries for this
/// host's planner. Ownership follows cluster.yaml's host set and pins, so a commit can
/// make this host the owner of a VM whose create the old owner still has in flight;
/// until that create ends, this host must not send one of its own. An entry older than
/// a create's deadline (`deadline_secs`, the cluster's setting) plus grace is over
/// whatever its host, down perhaps, last said: no worker builds a create past its
/// deadline.
pub fn others_in_flight(
    inventories: &BTreeMap<String, Inventory>,
    me: &str,
    now: u64,
    deadline_secs: u64,
) -> Vec<InFlight> {
    inventories
        .iter()
        .filter(|(host, _)| host.as_str() != me)
        .flat_map(|(host, inv)| {
            inv.in_flight
                .iter()
                .filter(move |c| {
                    now <= c
                        .sent_at
                        .saturating_add(deadline_secs)
                        .saturating_add(DEADLINE_GRACE)
                })
                .map(move |c| InFlight {
                    vm: c.vm.clone(),
                    kind: Kind::Create,
                    host: Some(host.clone()),
                })
        })
        .collect()
}

/// Who owns which VM under one commit: its host set and each desired VM's pin. A host
/// on that commit may still send the create of any VM it owns there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOwners {
    hosts: Vec<String>,
    pins: BTreeMap<String, Option<String>>,
}

impl CommitOwners {
    /// The owners under `snap`.
    pub fn of(snap: &Snapshot) -> CommitOwners {
        CommitOwners {
            hosts: snap.cluster.hosts.keys().cloned().collect(),
            pins: snap
                .vms
                .values()
                .map(|v| (v.name.clone(), v.pin().map(str::to_string)))
                .collect(),
        }
    }

    /// The owners under a commit with these `hosts` and each desired VM's pin (`pins`):
    /// what [`CommitOwners::of`] takes from a snapshot, for callers without one (the
    /// protocol model in `model/`).
    pub fn new(hosts: Vec<String>, pins: BTreeMap<String, Option<String>>) -> CommitOwners {
        CommitOwners { hosts, pins }
    }

    /// The owner of `vm` under this commit; `None` when the commit does not desire it.
    pub fn owner(&self, vm: &str) -> Option<&str> {
        let pin = self.pins.get(vm)?;
        crate::owner::owner(vm, pin.as_deref(), self.hosts.iter().map(String::as_str))
    }
}

/// The hosts this host's create of `vm` waits for (safety rules 2 and 9): every other
/// host whose last known inventory (`commits`: its reconciled commit, whether it answers
/// now or not, whether it is still in cluster.yaml or left it) comes from another commit
/// than `commit`, and that owns `vm` under that commit, so may still send its create.
/// Safety comes before progress: a host that does not answer is waited for however long
/// it takes, unless an operator said it is gone (`forgotten`). A commit whose owners are
/// not known here (`owners` has none: not fetched yet, say) is waited for whatever the VM.
pub fn waits_for(
    vm: &str,
    me: &str,
    commit: Option<&str>,
    commits: &BTreeMap<String, Option<String>>,
    owners: &BTreeMap<String, CommitOwners>,
    forgotten: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    commits
        .iter()
        .filter(|(h, c)| h.as_str() != me && !forgotten.contains(*h) && c.as_deref() != commit)
        .filter(|(h, c)| match c.as_deref().and_then(|c| owners.get(c)) {
            Some(o) => o.owner(vm) == Some(h.as_str()),
            None => true,
        })
        .map(|(h, _)| h.clone())
        .collect()
}

/// The hosts among `hosts` (cluster.yaml's, and those that left it and are not
/// forgotten) whose actual state this host does not know (`known`): they may hold any VM,
/// so no create goes out until they answer or are forgotten.
pub fn unseen<'a>(
    hosts: impl Iterator<Item = &'a String>,
    me: &str,
    known: impl Iterator<Item = &'a str> + Clone,
) -> Vec<String> {
    hosts
        .filter(|h| h.as_str() != me && !known.clone().any(|k| k == h.as_str()))
        .cloned()
        .collect()
}

/// One thing this host sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit<'a> {
    /// A create, to the `flotilla.create` tube of the first hop (decided by
    /// [`first_hop`]).
    Create(&'a Action),
    /// Any other action, to this host's `flotilla.ops` tube. A replace is sent as a
    /// destroy.
    Op(&'a Action),
}

/// This host's share of `plan`: creates it owns (only with `all_hosts_seen`, and none
/// that `waiting` holds back) and other actions on VMs it holds.
pub fn select<'a>(
    plan: &'a Plan,
    me: &str,
    all_hosts_seen: bool,
    waiting: &BTreeMap<String, Vec<String>>,
) -> Vec<Emit<'a>> {
    let mut out = Vec::new();
    for action in plan.actions() {
        match action {
            Action::Create { owner, vm, .. }
                if owner == me && all_hosts_seen && !waiting.contains_key(vm) =>
            {
                out.push(Emit::Create(action));
            }
            Action::Create { .. } => {}
            other if other.host() == me => out.push(Emit::Op(other)),
            _ => {}
        }
    }
    out
}

/// Free memory of a host by its inventory (limit minus used and reserved); `None` when
/// unlimited.
fn free_memory(inv: &Inventory) -> Option<u64> {
    let taken = inv.used + inv.reserved;
    inv.limits
        .memory
        .map(|m| m.bytes().saturating_sub(taken.memory.bytes()))
}

/// Where a create goes first. A half-made VM's create (`resume`) always goes to its
/// host; otherwise the strategy picks among the hosts with a known inventory (or
/// latency), falling back to `default` (the owner).
pub fn first_hop(
    strategy: FirstHop,
    default: &str,
    resume: bool,
    inventories: &BTreeMap<String, Inventory>,
    latencies: &BTreeMap<String, std::time::Duration>,
) -> String {
    if resume {
        return default.to_string();
    }
    let pick = match strategy {
        FirstHop::Owner => None,
        FirstHop::LeastLoaded => inventories
            .values()
            .map(|inv| {
                let free = free_memory(inv).unwrap_or(u64::MAX);
                (free, std::cmp::Reverse(inv.host.as_str()))
            })
            .max()
            .map(|(_, std::cmp::Reverse(h))| h.to_string()),
        FirstHop::LowestLatency => latencies
            .iter()
            .min_by_key(|(h, d)| (**d, h.as_str()))
            .map(|(h, _)| h.clone()),
    };
    pick.unwrap_or_else(|| default.to_string())
}

/// The address other hosts send this host's results to: its beanstalkd as cluster.yaml
/// names it, which every host can reach. The agent's own `beanstalkd:` setting is how
/// this host reaches its server (often `127.0.0.1`), which would send a result to the
/// builder's own loopback; it serves only when cluster.yaml does not list this host.
pub fn reply_to(snap: &Snapshot, me: &str, local: Option<&str>) -> String {
    snap.cluster
        .hosts
        .get(me)
        .map(|h| h.beanstalkd.clone())
        .or_else(|| local.map(str::to_string))
        .unwrap_or_default()
}

/// The peers whose clocks this host sees beyond `max_skew` seconds ahead of its own
/// (`now`): their inventories are stamped later than this host's clock allows. A clock
/// behind this host's cannot be told from an old inventory here; the host that is behind
/// sees this one ahead, reports it ([`Inventory::clock_skew`]) and [`skew_reports`]
/// carries the report to everyone.
pub fn clocks_ahead(
    inventories: &BTreeMap<String, Inventory>,
    me: &str,
    now: u64,
    max_skew: u64,
) -> Vec<String> {
    inventories
        .iter()
        .filter(|(host, inv)| host.as_str() != me && inv.listed_at > now.saturating_add(max_skew))
        .map(|(host, inv)| {
            format!(
                "{host}'s clock is {}s ahead of {me}'s (at most {max_skew}s allowed)",
                inv.listed_at - now
            )
        })
        .collect()
}

/// The clock skews other hosts report having seen themselves. Only first-hand sightings
/// are published, so a report cannot echo between hosts after the clocks agree again.
pub fn skew_reports<'a>(
    inventories: impl Iterator<Item = (&'a String, &'a Inventory)>,
    me: &str,
) -> Vec<String> {
    inventories
        .filter(|(host, _)| host.as_str() != me)
        .filter_map(|(host, inv)| {
            inv.clock_skew
                .as_ref()
                .map(|s| format!("{host} reports: {s}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actual::{ActualVm, RunState};
    use crate::capacity::{Limits, Usage};
    use crate::size::Size;

    fn intent(status: IntentStatus) -> Intent {
        Intent {
            vm: "web1".into(),
            job_id: "j1".into(),
            first_hop: "host1".into(),
            commit: "c1".into(),
            spec_hash: "h1".into(),
            recorded_at: 100,
            deadline: 1000,
            status,
        }
    }

    fn inventory(host: &str, listed_at: u64, vms: &[&str], free_gib: u64) -> Inventory {
        Inventory {
            host: host.into(),
            applied_commit: None,
            commit: None,
            listed_at,
            seq: 0,
            clock_skew: None,
            used: Usage::default(),
            reserved: Usage::default(),
            limits: Limits {
                memory: Some(Size::gib(free_gib)),
                storage: None,
                vms: None,
            },
            overload: None,
            vms: vms
                .iter()
                .map(|n| ActualVm {
                    name: n.to_string(),
                    datastore: "default".into(),
                    config: BTreeMap::new(),
                    cpu: 1,
                    memory: Size::mib(512),
                    disks: vec![],
                    state: RunState::Running,
                    autostart: None,
                    marker: None,
                })
                .collect(),
            in_flight: vec![],
            failures: vec![],
            waiting: vec![],
            left_cluster: None,
            agent: None,
            reconciled_at: 0,
            blocked: vec![],
            ops: vec![],
            desired_error: None,
            switches: Default::default(),
            recent_events: vec![],
            built: vec![],
        }
    }

    /// Guards the double build through a closed intent (found by the model, test
    /// `a_closed_intent_guards_its_vm_until_the_builder_is_seen`): an intent closed
    /// because the builder's inventory showed the VM yields the builder and that
    /// inventory's sequence; one closed with nothing seen yields nothing.
    #[test]
    fn an_intent_closed_as_built_records_the_builder_and_its_sequence() {
        let placed = intent(IntentStatus::Placed {
            host: "host2".into(),
            at: 500,
            seq: Some(10),
        });
        let mut shows = inventory("host2", 501, &["web1"], 8);
        shows.seq = 11;
        let invs = BTreeMap::from([("host2".to_string(), shows)]);
        assert_eq!(
            built_record(&placed, &invs),
            Some(BuiltCreate {
                vm: "web1".into(),
                host: "host2".into(),
                seq: 11
            })
        );
        let mut gone = inventory("host2", 501, &[], 8);
        gone.seq = 11;
        let invs = BTreeMap::from([("host2".to_string(), gone)]);
        assert_eq!(built_record(&placed, &invs), None);
        let mut before = inventory("host2", 499, &["web1"], 8);
        before.seq = 10;
        let invs = BTreeMap::from([("host2".to_string(), before)]);
        assert_eq!(built_record(&placed, &invs), None);
        assert_eq!(built_record(&intent(IntentStatus::Sent), &invs), None);
    }

    /// Guards the double build through a closed intent (found by the model, test
    /// `a_closed_intent_guards_its_vm_until_the_builder_is_seen`): host3 holds host1's
    /// inventory saying web1 was seen built on host2 at seq 2, but only host2's seq 1
    /// (before the build): it waits for host2, and creates once it reads seq 2 or later
    /// (then host2's inventory itself decides: a later one without the VM lets it go).
    #[test]
    fn a_create_waits_until_the_builders_inventory_of_a_published_build_is_read() {
        let mut closer = inventory("host1", 0, &[], 8);
        closer.built = vec![BuiltCreate {
            vm: "web1".into(),
            host: "host2".into(),
            seq: 2,
        }];
        let mut old = inventory("host2", 0, &[], 8);
        old.seq = 1;
        let mut invs = BTreeMap::from([("host1".to_string(), closer), ("host2".to_string(), old)]);
        let none = std::collections::BTreeSet::new();
        assert_eq!(
            builds_unseen("web1", &invs, &none),
            vec!["host2".to_string()]
        );
        assert!(builds_unseen("db1", &invs, &none).is_empty());
        invs.remove("host2");
        assert_eq!(
            builds_unseen("web1", &invs, &none),
            vec!["host2".to_string()]
        );
        let gone = std::collections::BTreeSet::from(["host2".to_string()]);
        assert!(builds_unseen("web1", &invs, &gone).is_empty());
        let mut destroyed_since = inventory("host2", 0, &[], 8);
        destroyed_since.seq = 5;
        invs.insert("host2".into(), destroyed_since);
        assert!(builds_unseen("web1", &invs, &none).is_empty());
    }

    #[test]
    fn a_sent_intent_holds_until_its_deadline_and_grace() {
        let i = intent(IntentStatus::Sent);
        let none = BTreeMap::new();
        assert_eq!(intent_fate(&i, Some("h1"), &none, 1000), IntentFate::Open);
        assert_eq!(
            intent_fate(&i, Some("h1"), &none, 1000 + DEADLINE_GRACE),
            IntentFate::Open
        );
        assert!(matches!(
            intent_fate(&i, Some("h1"), &none, 1001 + DEADLINE_GRACE),
            IntentFate::Close(_)
        ));
    }

    /// Guards the duplicate-create bug where a result closed the intent and the owner,
    /// still holding an inventory of the placing host from before the build, planned the
    /// VM again.
    #[test]
    fn a_placed_intent_holds_until_an_inventory_listed_after_the_result_shows_the_vm() {
        let i = intent(IntentStatus::Placed {
            host: "host2".into(),
            at: 500,
            seq: Some(10),
        });
        let mut invs = BTreeMap::new();
        let mut before = inventory("host2", 499, &[], 8);
        before.seq = 10;
        invs.insert("host2".into(), before);
        assert_eq!(intent_fate(&i, Some("h1"), &invs, 10_000), IntentFate::Open);
        let mut after = inventory("host2", 501, &["web1"], 8);
        after.seq = 11;
        invs.insert("host2".into(), after);
        assert!(matches!(
            intent_fate(&i, Some("h1"), &invs, 600),
            IntentFate::Close(_)
        ));
    }

    /// Guards issue 14, case 4 (clock skew builds a VM twice): the builder's clock ran 30 s
    /// ahead and its beanstalkd stalled during the build, so its last inventory, listed
    /// before the build, carried a time later than the result's arrival on the owner's
    /// clock; the intent closed as "gone" and the VM was built again elsewhere. Only an
    /// inventory published after the build may say the VM is gone.
    #[test]
    fn an_inventory_from_before_the_build_never_closes_a_placed_intent_whatever_its_clock() {
        let i = intent(IntentStatus::Placed {
            host: "host2".into(),
            at: 1000,
            seq: Some(7),
        });
        // Listed before the build (no VM yet), stamped 30 s ahead by host2's clock.
        let mut before = inventory("host2", 1030, &[], 8);
        before.seq = 6;
        let invs = BTreeMap::from([("host2".to_string(), before)]);
        assert_eq!(intent_fate(&i, Some("h1"), &invs, 1001), IntentFate::Open);
        // A result from an older builder has no sequence: the same inventory still
        // cannot close the intent (its time is within the grace of any allowed skew).
        let legacy = intent(IntentStatus::Placed {
            host: "host2".into(),
            at: 1000,
            seq: None,
        });
        assert_eq!(
            intent_fate(&legacy, Some("h1"), &invs, 1001),
            IntentFate::Open
        );
    }

    /// Guards issue 14, case 4 (the same-second stall): the result and the next inventory
    /// of the builder fell in the same second, so `listed_at > at` never held and the
    /// intent stayed open until the next poll, 60 s later. An inventory published after
    /// the build decides at once, whatever second it was listed in.
    #[test]
    fn an_inventory_published_after_the_build_decides_in_the_same_second() {
        let i = intent(IntentStatus::Placed {
            host: "host2".into(),
            at: 1000,
            seq: Some(7),
        });
        // Listed after the result (the VM was destroyed since), in the same second.
        let mut after = inventory("host2", 1000, &[], 8);
        after.seq = 8;
        let invs = BTreeMap::from([("host2".to_string(), after)]);
        assert!(matches!(
            intent_fate(&i, Some("h1"), &invs, 1000),
            IntentFate::Close(why) if why.contains("gone")
        ));
    }

    /// Guards issue 14, case 4: beyond the clock skew the cluster is built for, deadlines
    /// set on one host and checked on another no longer hold, so creates stop. A host
    /// sees a peer ahead by its inventory's time; a peer behind sees this host ahead and
    /// says so in its own inventory.
    #[test]
    fn a_clock_beyond_the_allowed_skew_is_seen_first_hand_or_by_report() {
        let ahead = inventory("host2", 1030, &[], 8);
        let fine = inventory("host3", 1005, &[], 8);
        let mut behind = inventory("host4", 990, &[], 8);
        behind.clock_skew = Some("host1's clock is 10s ahead of host4's".into());
        let mut mine = inventory("host1", 2000, &[], 8);
        mine.clock_skew = Some("an old sighting of my own".into());
        let invs: BTreeMap<String, Inventory> = [
            ("host1".to_string(), mine),
            ("host2".to_string(), ahead),
            ("host3".to_string(), fine),
            ("host4".to_string(), behind),
        ]
        .into();
        let seen = clocks_ahead(&invs, "host1", 1000, 5);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("host2's clock is 30s ahead"),
            "{seen:?}"
        );
        assert!(clocks_ahead(&invs, "host1", 1000, 30).is_empty());
        let reported = skew_reports(invs.iter(), "host1");
        assert_eq!(
            reported,
            vec!["host4 reports: host1's clock is 10s ahead of host4's".to_string()]
        );
    }

    /// Guards issue 11, hole 7: host3's beanstalkd was killed during builds, the VMs were
    /// built but their results were lost, and the owner's intents stayed `sent` until
    /// their deadline (hours). The marker's job id in any inventory closes the intent.
    #[test]
    fn an_intent_closes_as_soon_as_an_inventory_shows_the_vm_built_by_its_job() {
        let i = intent(IntentStatus::Sent);
        let mut host3 = inventory("host3", 200, &["web1"], 8);
        let marker = |job: &str, complete| crate::actual::Marker {
            format_version: 1,
            cluster: "lab".into(),
            job_id: job.into(),
            spec_hash: "h1".into(),
            commit: "c1".into(),
            owner: "host1".into(),
            protect: false,
            placed_from: None,
            complete,
        };
        // Half-made by the job: still building, the intent holds.
        host3.vms[0].marker = Some(marker("j1", false));
        let mut invs = BTreeMap::from([("host3".to_string(), host3.clone())]);
        assert_eq!(intent_fate(&i, Some("h1"), &invs, 300), IntentFate::Open);
        // Another job's VM of that name proves nothing about this job.
        host3.vms[0].marker = Some(marker("other", true));
        invs.insert("host3".into(), host3.clone());
        assert_eq!(intent_fate(&i, Some("h1"), &invs, 300), IntentFate::Open);
        host3.vms[0].marker = Some(marker("j1", true));
        invs.insert("host3".into(), host3);
        assert!(matches!(
            intent_fate(&i, Some("h1"), &invs, 300),
            IntentFate::Close(why) if why.contains("host3")
        ));
    }

    #[test]
    fn a_failed_intent_waits_for_its_retry_time_or_a_new_spec() {
        let i = intent(IntentStatus::Failed {
            reason: "unplaceable".into(),
            retry_at: 700,
        });
        let none = BTreeMap::new();
        assert_eq!(intent_fate(&i, Some("h1"), &none, 600), IntentFate::Open);
        assert!(matches!(
            intent_fate(&i, Some("h2"), &none, 600),
            IntentFate::Close(_)
        ));
        assert!(matches!(
            intent_fate(&i, Some("h1"), &none, 700),
            IntentFate::Close(_)
        ));
    }

    #[test]
    fn first_hop_by_strategy() {
        let mut invs = BTreeMap::new();
        invs.insert("host1".into(), inventory("host1", 1, &[], 4));
        invs.insert("host2".into(), inventory("host2", 1, &[], 16));
        let lat = BTreeMap::from([
            ("host1".to_string(), std::time::Duration::from_millis(3)),
            ("host3".to_string(), std::time::Duration::from_millis(1)),
        ]);
        assert_eq!(
            first_hop(FirstHop::Owner, "host1", false, &invs, &lat),
            "host1"
        );
        assert_eq!(
            first_hop(FirstHop::LeastLoaded, "host1", false, &invs, &lat),
            "host2"
        );
        assert_eq!(
            first_hop(FirstHop::LowestLatency, "host1", false, &invs, &lat),
            "host3"
        );
        assert_eq!(
            first_hop(FirstHop::LeastLoaded, "host1", true, &invs, &lat),
            "host1"
        );
    }

    /// Regression: results were addressed to the agent's own `beanstalkd:` setting
    /// (`127.0.0.1:11300` in the sample config), so a host that built a forwarded create
    /// put the result on its own loopback and the owner never heard of it.
    #[test]
    fn results_come_back_to_the_address_other_hosts_reach() {
        let mut files = crate::desired::FileSet::new();
        files.insert(
            "cluster.yaml",
            "cluster: lab\nhosts:\n  host1:\n    beanstalkd: 10.0.0.1:11300\n    limits: { memory: 8G, storage: 100G, vms: 10 }\n",
        );
        let snap = crate::desired::load(&files, None).unwrap_or_else(|e| panic!("{}", e.render()));
        assert_eq!(
            reply_to(&snap, "host1", Some("127.0.0.1:11300")),
            "10.0.0.1:11300"
        );
        assert_eq!(
            reply_to(&snap, "host9", Some("127.0.0.1:11300")),
            "127.0.0.1:11300"
        );
    }

    /// Regression guard for safety rule 2: a commit that adds a host moves the
    /// ownership of some VMs. The new owner must hold back while the old owner's create
    /// is still in flight, or the VM is built twice, on two hosts.
    #[test]
    fn another_hosts_open_create_holds_the_vm_back_until_its_deadline() {
        use crate::message::InFlightCreate;
        let mut old_owner = inventory("host1", 100, &[], 8);
        old_owner.in_flight.push(InFlightCreate {
            vm: "web1".into(),
            job_id: "j1".into(),
            status: "sent to host1".into(),
            sent_at: 100,
            retry_at: None,
        });
        let mut own = inventory("host4", 100, &[], 8);
        own.in_flight.push(InFlightCreate {
            vm: "mine".into(),
            job_id: "j2".into(),
            status: "sent to host4".into(),
            sent_at: 100,
            retry_at: None,
        });
        let invs: BTreeMap<String, Inventory> =
            [("host1".to_string(), old_owner), ("host4".to_string(), own)].into();
        let held = others_in_flight(&invs, "host4", 150, 600);
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!((held[0].vm.as_str(), held[0].kind), ("web1", Kind::Create));
        // Past the deadline and grace no worker builds it: the VM is free to plan.
        assert!(others_in_flight(&invs, "host4", 100 + 600 + DEADLINE_GRACE, 600).len() == 1);
        assert!(others_in_flight(&invs, "host4", 101 + 600 + DEADLINE_GRACE, 600).is_empty());
    }

    fn owners(hosts: &[&str], pins: &[(&str, Option<&str>)]) -> CommitOwners {
        CommitOwners {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            pins: pins
                .iter()
                .map(|(v, p)| (v.to_string(), p.map(str::to_string)))
                .collect(),
        }
    }

    /// Regression guard for safety rule 2: host3 joined and owned `web1` under the new
    /// commit while host1, still on the old one, was about to send its create; host3 sent
    /// one too and the VM was built on two hosts. Only the VMs a host on another commit
    /// owns there wait for it.
    #[test]
    fn a_create_waits_for_the_host_that_owns_it_under_its_own_commit() {
        let old = owners(
            &["host1", "host2"],
            &[("web1", Some("host1")), ("web2", Some("host2"))],
        );
        let new = owners(
            &["host1", "host2", "host3"],
            &[("web1", Some("host3")), ("web2", Some("host2"))],
        );
        let all = BTreeMap::from([("old".to_string(), old), ("new".to_string(), new)]);
        let commits = BTreeMap::from([
            ("host1".to_string(), Some("old".to_string())),
            ("host2".to_string(), Some("new".to_string())),
            ("host3".to_string(), Some("new".to_string())),
        ]);
        let none = Default::default();
        assert_eq!(
            waits_for("web1", "host3", Some("new"), &commits, &all, &none),
            vec!["host1".to_string()]
        );
        // host1 does not own web2 under the old commit: it cannot send its create.
        assert!(waits_for("web2", "host2", Some("new"), &commits, &all, &none).is_empty());
    }

    /// Guards the review finding on issue 11, hole 1: a host removed from cluster.yaml
    /// before this agent (just restarted) ever read its inventory was in neither the
    /// actual state nor the unseen hosts, so the VMs it holds could be created elsewhere.
    #[test]
    fn a_departed_host_never_read_is_unseen() {
        let hosts = [
            "host1".to_string(),
            "host2".to_string(),
            "host3".to_string(),
        ];
        let known = ["host1", "host2"];
        assert_eq!(
            unseen(hosts.iter(), "host1", known.iter().copied()),
            vec!["host3".to_string()]
        );
        assert!(unseen(hosts[..2].iter(), "host1", known.iter().copied()).is_empty());
    }

    /// Guards issue 11, hole 6: a host cut off while on an older commit could still
    /// create a VM it owns there while the new owner created it too. Before, only hosts
    /// that answered with a live inventory were waited for. Now a host that does not
    /// answer, or whose commit is not known here, is waited for however long it takes,
    /// unless an operator said it is gone (`flotilla host forget`).
    #[test]
    fn a_silent_host_on_an_older_commit_is_waited_for_until_it_is_forgotten() {
        let old = owners(&["host1", "host2", "host3"], &[("web1", Some("host3"))]);
        let new = owners(&["host1", "host2", "host3"], &[("web1", Some("host1"))]);
        let all = BTreeMap::from([("old".to_string(), old), ("new".to_string(), new)]);
        // host3's last inventory, hours old, from before it was cut off.
        let commits = BTreeMap::from([
            ("host2".to_string(), Some("new".to_string())),
            ("host3".to_string(), Some("old".to_string())),
        ]);
        let none = Default::default();
        assert_eq!(
            waits_for("web1", "host1", Some("new"), &commits, &all, &none),
            vec!["host3".to_string()]
        );
        // A commit this host cannot read: wait, whatever the VM.
        let only_new = BTreeMap::from([("new".to_string(), all["new"].clone())]);
        assert_eq!(
            waits_for("web1", "host1", Some("new"), &commits, &only_new, &none),
            vec!["host3".to_string()]
        );
        let forgotten = ["host3".to_string()].into();
        assert!(waits_for("web1", "host1", Some("new"), &commits, &all, &forgotten).is_empty());
    }
}
