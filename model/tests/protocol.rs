//! The protocol model checked exhaustively to a bounded depth (issue 13, part 2): it
//! passes with the agent's real decisions and finds a counterexample with each old one.
//!
//! `FLOTILLA_MODEL_DEPTH` sets the depth of the check of the real decisions (default
//! [`DEPTH`]) and `FLOTILLA_MODEL_LOSSY=1` lets messages drop; the deeper check is
//! `FLOTILLA_MODEL_DEPTH=8 cargo test -p flotilla-model --release --test protocol`.

use flotilla_model::{check, Faults, Logic, Scenario, ALL_PLACED, NO_GONE_WHILE_HELD, NO_TWICE};
use stateright::Checker;

/// Deep enough to place the VM under crashes and skewed clocks, small enough for a debug
/// build in CI (about 44,000 states).
const DEPTH: usize = 6;

/// Hole 6's check depth in [`Scenario::HOST_ADDED`]: the checker evaluates the states
/// above this depth, so paths of up to six actions (the old wait's counterexample); about
/// 40,000 states with the old logic (it stops there) and 78,000 with the real one.
const HOLE6_DEPTH: usize = 8;

fn depth() -> usize {
    std::env::var("FLOTILLA_MODEL_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(DEPTH)
}

fn faults() -> Faults {
    Faults {
        lossy: std::env::var_os("FLOTILLA_MODEL_LOSSY").is_some(),
        ..Faults::DEFAULT
    }
}

/// Guards issue 13, part 2 (the model): with the real `waits_for` and `intent_fate`, no
/// interleaving up to the depth builds a VM on two hosts or closes a placed intent as
/// gone while its builder holds the VM, and some interleaving places every VM.
#[test]
fn the_real_decisions_keep_every_vm_on_one_host() {
    let c = check(Logic::default(), faults(), Scenario::FULL, depth(), false);
    eprintln!(
        "real logic: {} states, depth {}",
        c.unique_state_count(),
        c.max_depth()
    );
    for p in [NO_TWICE, NO_GONE_WHILE_HELD] {
        if let Some(path) = c.discovery(p) {
            panic!("{p}: counterexample\n{path}");
        }
    }
    assert!(
        c.discovery(ALL_PLACED).is_some(),
        "no interleaving placed every VM"
    );
}

/// Guards issue 11, hole 6, in the model: with the old `on_other_commits` (only hosts
/// that answered this pass were waited for), the model finds a VM built on two hosts:
/// host1, still on c0 where it owns web1, creates it while host3, owner under c1, did not
/// wait for host1 because host1 had not answered since host3's last pass. The real
/// `waits_for` finds nothing in the same scenario to the same depth.
///
/// [`Scenario::HOST_ADDED`] starts where every host has run its pass on c0 and c1 is
/// pushed (a reachable state, see [`Scenario`]), so the path is six deliveries, not ten.
#[test]
fn the_old_wait_for_answered_hosts_builds_a_vm_twice() {
    let logic = Logic {
        answered_only_waits: true,
        ..Logic::default()
    };
    let c = check(
        logic,
        Faults::NETWORK,
        Scenario::HOST_ADDED,
        HOLE6_DEPTH,
        true,
    );
    let path = c
        .discovery(NO_TWICE)
        .expect("the old wait found no VM on two hosts");
    eprintln!("{NO_TWICE}: counterexample\n{path}");
    let real = check(
        Logic::default(),
        Faults::NETWORK,
        Scenario::HOST_ADDED,
        HOLE6_DEPTH,
        false,
    );
    eprintln!(
        "real logic, host added: {} states, depth {}",
        real.unique_state_count(),
        real.max_depth()
    );
    for p in [NO_TWICE, NO_GONE_WHILE_HELD] {
        if let Some(path) = real.discovery(p) {
            panic!("{p}: counterexample\n{path}");
        }
    }
}

/// Guards issue 14, case 4, in the model: with the old `listed_at > at` close, a builder
/// whose clock runs ahead has a placed intent closed as gone while it holds the VM
/// (host2's inventory from before the build, stamped 30 s ahead, reaches host1 before the
/// one after it).
#[test]
fn the_old_close_by_clocks_closes_a_held_vm_as_gone() {
    let logic = Logic {
        clock_close: true,
        ..Logic::default()
    };
    let c = check(logic, Faults::DEFAULT, Scenario::FULL, 8, true);
    let path = c
        .discovery(NO_GONE_WHILE_HELD)
        .expect("the old close by clocks found nothing");
    eprintln!("{NO_GONE_WHILE_HELD}: counterexample\n{path}");
}

/// The depth of the check of a closed intent's guard in [`Scenario::BUILT_HOST3_COLD`]:
/// paths of up to six deliveries (the double build's).
const CLOSED_DEPTH: usize = 8;

/// Guards the double build through a closed intent (issue 13, part 2; found by this
/// model): host1 on c0 creates web1 and host2 builds it; host1 moves to c1, sees host2's
/// inventory with web1, closes its intent as built by its job and publishes an inventory
/// without the create in flight; host3, owner under c1, holds that inventory of host1's
/// but only host2's older one from before the build, so no host shows web1 and none
/// waits. Now host1's inventory carries the closed create ("built on host2, seen at its
/// seq 2", [`flotilla::agent::decide::built_record`]) and host3 waits until it has read
/// host2's inventory at that sequence ([`flotilla::agent::decide::builds_unseen`]).
///
/// [`Scenario::BUILT_HOST3_COLD`] starts after host1's create is built on host2 (a
/// reachable state); the network delivers each message once ([`Faults::ONCE`]: a
/// subset of the duplicating network's paths, about half the states). Without the wait
/// (`Logic::no_built_records`, the logic before the fix) the check fails in six
/// deliveries:
///
/// ```text
/// no VM held by two hosts: counterexample
/// Path[6]:
/// - Deliver { src: Id(3), dst: Id(0), msg: Head(1) }
/// - Deliver { src: Id(1), dst: Id(0), msg: Inventory(Inv { seq: 2, commit: Some(0), vms: {0: (0, 0)}, .. }) }
/// - Deliver { src: Id(0), dst: Id(2), msg: Inventory(Inv { seq: 4, commit: Some(1), vms: {}, in_flight: {}, .. }) }
/// - Deliver { src: Id(3), dst: Id(2), msg: Head(1) }
/// - Deliver { src: Id(1), dst: Id(2), msg: Inventory(Inv { seq: 1, commit: Some(0), vms: {}, .. }) }
/// - Deliver { src: Id(2), dst: Id(2), msg: Create { job: (2, 0), vm: 0, commit: 1, .. } }
/// ```
#[test]
fn a_closed_intent_guards_its_vm_until_the_builder_is_seen() {
    let depth = std::env::var("FLOTILLA_MODEL_CLOSED_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(CLOSED_DEPTH);
    let old = Logic {
        no_built_records: true,
        ..Logic::default()
    };
    let c = check(old, Faults::ONCE, Scenario::BUILT_HOST3_COLD, depth, true);
    let path = c
        .discovery(NO_TWICE)
        .expect("without the wait for builders, no VM was built twice");
    eprintln!("{NO_TWICE}: counterexample\n{path}");
    let c = check(
        Logic::default(),
        Faults::ONCE,
        Scenario::BUILT_HOST3_COLD,
        depth,
        false,
    );
    eprintln!(
        "real logic, built, host3 cold: {} states, depth {}",
        c.unique_state_count(),
        c.max_depth()
    );
    for p in [NO_TWICE, NO_GONE_WHILE_HELD] {
        if let Some(path) = c.discovery(p) {
            panic!("{p}: counterexample\n{path}");
        }
    }
}
