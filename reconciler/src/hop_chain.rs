//! The planner, a create job and the hop chain together: wherever the chain places a
//! VM, planning again leaves it alone. It needs `agent::decide::create_job`, so it
//! lives in the runtime crate, not beside the planner (flotilla-core).

use crate::actual::HostActual;
use crate::desired::{load, FileSet, Snapshot};
use crate::planner::{plan, Action, PlanOptions};
use crate::size::Size;
use flotilla_core::actual::built;
use proptest::prelude::*;
const HOSTS: [&str; 3] = ["host1", "host2", "host3"];

/// A chain over `order` (host indexes); the last host's `next` is the first (a loop)
/// or none.
fn chain_cluster(order: &[usize], loops: bool) -> String {
    let mut s = String::from("cluster: lab\nhosts:\n");
    for (i, h) in order.iter().enumerate() {
        let next = match order.get(i + 1) {
            Some(n) => HOSTS[*n].to_string(),
            None if loops => HOSTS[order[0]].to_string(),
            None => "null".to_string(),
        };
        s.push_str(&format!(
            "  {}:\n    beanstalkd: 127.0.0.1:11300\n    next: {next}\n    limits: {{ memory: 8G, storage: 1T, vms: 10 }}\n",
            HOSTS[*h]
        ));
    }
    s
}

/// Walks `job` along the chain from `first` the way workers do (each host full or not),
/// and returns the host that admits it with the marker's `placed_from`, or `None` when
/// it is unplaceable.
fn place(
    snap: &Snapshot,
    job: crate::message::CreateJob,
    first: &str,
    full: &[bool],
) -> Option<(String, Option<String>)> {
    use crate::capacity::{Limits, Usage};
    use crate::placement::{decide, Decision, HostView};
    let (mut at, mut job) = (first.to_string(), job);
    loop {
        let h = &snap.cluster.hosts[&at];
        let limits = Limits::from(&h.limits);
        let i = HOSTS.iter().position(|n| *n == at).unwrap();
        let used = if full[i] {
            Usage {
                memory: limits.memory.unwrap(),
                storage: Size(0),
                vms: 1,
            }
        } else {
            Usage::default()
        };
        let view = HostView {
            name: &at,
            next: h.next.as_deref(),
            used,
            reserved: Usage::default(),
            limits: &limits,
            overload: None,
            drained: false,
        };
        match decide(&job, view) {
            Decision::Admit { .. } => {
                return Some((at, job.visited.first().map(|r| r.host.clone())));
            }
            Decision::Forward { to, job: next } => {
                at = to;
                job = *next;
            }
            Decision::Unplaceable { .. } => return None,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Guards issue 11, hole 5: `host: host1` with `replace: allow` on a full host1 was
    /// forwarded and built on host2, then host2 saw "pinned to host1, found on host2" and
    /// replaced it, again and again. Wherever the chain can place a VM, planning again
    /// gives no action for it: a `host:` VM is never forwarded, a `start_at:` VM belongs
    /// where the chain put it.
    #[test]
    fn wherever_the_chain_places_a_vm_planning_again_leaves_it_alone(
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
        loops in proptest::bool::ANY,
        mode in 0usize..3,
        at in 0usize..3,
        first in 0usize..3,
        full in proptest::collection::vec(proptest::bool::ANY, 3),
        replace in proptest::bool::ANY,
    ) {
        let mut files = FileSet::new();
        files.insert("cluster.yaml", chain_cluster(&order, loops));
        let placement = match mode {
            0 => String::new(),
            1 => format!("host: {}\n", HOSTS[at]),
            _ => format!("start_at: {}\n", HOSTS[at]),
        };
        let replace = if replace { "replace: allow\n" } else { "" };
        files.insert(
            "vms/web1.yaml",
            format!("name: web1\nprofile: CS2\n{placement}{replace}"),
        );
        let snap = load(&files, Some("c1".into())).unwrap_or_else(|e| panic!("{}", e.render()));
        let spec = &snap.vms["web1"];
        let p = plan(&snap, &[], &[], &PlanOptions::default());
        let Some(Action::Create { host, .. }) = p.actions().next() else {
            panic!("{p:#?}")
        };
        // An unpinned VM's first hop is the agent's choice (owner, least loaded, lowest
        // latency): any host.
        let first = if spec.pin().is_some() { host.clone() } else { HOSTS[first].to_string() };
        let origin = crate::message::Origin {
            commit: "c1".into(),
            owner: host.clone(),
            reply_to: "127.0.0.1:11300".into(),
        };
        let job = crate::agent::decide::create_job(&snap, spec, origin, 1);
        let Some((placed, from)) = place(&snap, job, &first, &full) else {
            return Ok(());
        };
        let mut vm = built(spec);
        vm.marker.as_mut().unwrap().placed_from = from;
        let actual: Vec<HostActual> = HOSTS
            .iter()
            .map(|h| HostActual {
                host: h.to_string(),
                vms: if *h == placed { vec![vm.clone()] } else { vec![] },
            })
            .collect();
        let again = plan(&snap, &actual, &[], &PlanOptions::default());
        prop_assert!(!again.has_changes(), "placed on {placed} from {first}: {again:#?}");
        if spec.host.is_some() {
            prop_assert_eq!(Some(placed.as_str()), spec.host.as_deref(), "a `host:` VM left its host");
        }
    }
}
