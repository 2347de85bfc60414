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

use crate::desired::Snapshot;
use crate::intents::{Intent, IntentStatus};
use crate::message::Inventory;
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
        // after the result, an inventory without it proves nothing, so there is no
        // deadline here: closing early could build the VM a second time elsewhere.
        IntentStatus::Placed { host, at } => match inventories.get(host) {
            Some(inv) if inv.listed_at > *at => {
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

/// The intent as the planner's in-flight entry.
pub fn in_flight(intent: &Intent) -> InFlight {
    InFlight {
        vm: intent.vm.clone(),
        kind: Kind::Create,
        host: Some(intent.first_hop.clone()),
    }
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

/// This host's share of `plan`: creates it owns (only with `all_hosts_seen`) and other
/// actions on VMs it holds.
pub fn select<'a>(plan: &'a Plan, me: &str, all_hosts_seen: bool) -> Vec<Emit<'a>> {
    let mut out = Vec::new();
    for action in plan.actions() {
        match action {
            Action::Create { owner, .. } if owner == me && all_hosts_seen => {
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
            listed_at,
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
        }
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
        });
        let mut invs = BTreeMap::new();
        invs.insert("host2".into(), inventory("host2", 499, &[], 8));
        assert_eq!(intent_fate(&i, Some("h1"), &invs, 10_000), IntentFate::Open);
        invs.insert("host2".into(), inventory("host2", 501, &["web1"], 8));
        assert!(matches!(
            intent_fate(&i, Some("h1"), &invs, 600),
            IntentFate::Close(_)
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
}
