//! Changes in place on the lab (issue 14, cases 3 and 6): a change that fails puts the VM
//! back as it was and waits for its retry time, and a change past the host's limits is
//! reported, not applied.

use std::time::Duration;

use flotilla::actual::RunState;
use flotilla::size::Size;
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(90);

fn vm_is(c: &Cluster, vm: &str, state: RunState, memory: &str) -> bool {
    let memory: Size = memory.parse().unwrap();
    c.vms(0).iter().any(|v| {
        v.name == vm
            && v.state == state
            && v.memory == memory
            && v.marker.as_ref().is_some_and(|m| m.complete)
    })
}

/// Events of host 0 about `vm` whose message contains `text`.
fn events(c: &Cluster, vm: &str, text: &str) -> usize {
    c.events(0)
        .iter()
        .filter(|e| e.vm.as_deref() == Some(vm) && e.message.contains(text))
        .count()
}

/// Guards issue 14, case 3: a grow that failed left its VM stopped, a start was planned,
/// and the start overwrote the failed grow's retry time, so the grow ran again twice a
/// second. Now a failed change puts the VM back as it was (running stays running), and
/// its retry time holds whatever else is done to the VM meanwhile.
#[test]
fn a_failed_change_leaves_the_vm_running_and_keeps_its_retry_time() {
    let mut c = Cluster::start(
        &[HostSpec::new("host1", None)],
        Options {
            retry_failed: "120s",
            ..Options::default()
        },
    );
    c.start_agents();
    c.commit(
        &[("vms/grow1.yaml", Some(&vm_yaml("grow1", "CS0", "")))],
        "one VM",
    );
    c.wait_until("grow1 built and running", CONVERGE, |c| {
        vm_is(c, "grow1", RunState::Running, "256M")
    });
    // A disk image that cannot be grown: a directory reads as a tiny image, so a grow is
    // planned, and opening it for writing fails (even as root).
    let image = c.hosts[0].vm_dir.join("grow1/disk0.img");
    std::fs::remove_file(&image).unwrap();
    std::fs::create_dir(&image).unwrap();
    c.wait_until("the grow failed for good", CONVERGE, |c| {
        events(c, "grow1", "update grow1 on host1: failed after") >= 1
    });
    assert!(
        vm_is(&c, "grow1", RunState::Running, "256M"),
        "a failed change puts the VM back running: {:?}",
        c.vms(0)
    );
    // Another change of the same VM while the failed grow waits for its retry time.
    c.commit(
        &[(
            "vms/grow1.yaml",
            Some(&vm_yaml("grow1", "CS0", "memory: 512M\n")),
        )],
        "more memory",
    );
    c.wait_until("the memory change applied", CONVERGE, |c| {
        vm_is(c, "grow1", RunState::Running, "512M")
    });
    // Passes after it: a VM built proves the planner ran since.
    c.commit(
        &[("vms/later1.yaml", Some(&vm_yaml("later1", "CS0", "")))],
        "another VM",
    );
    c.wait_until("later1 built", CONVERGE, |c| {
        vm_is(c, "later1", RunState::Running, "256M")
    });
    assert_eq!(
        events(&c, "grow1", "start grow1 queued"),
        0,
        "no start was needed"
    );
    assert_eq!(
        events(&c, "grow1", "update grow1 queued"),
        2,
        "the grow once, the memory change once: the grow waits for its retry time\n{}",
        c.logs()
    );
    assert!(vm_is(&c, "grow1", RunState::Running, "512M"));
}

/// Guards issue 14, case 6: on a host with a 2G memory limit, two 512M VMs raised to
/// 1536M each were both applied (3G on 2G). A change in place is admitted like a create
/// (used + reserved + requested within the limits), else reported and not applied.
#[test]
fn a_change_past_the_limits_is_reported_not_applied() {
    let mut c = Cluster::start(
        &[HostSpec::new("host1", None).limits("2G", "1T", 10)],
        Options {
            retry_failed: "120s",
            ..Options::default()
        },
    );
    c.start_agents();
    let yaml = |name: &str, memory: &str| vm_yaml(name, "CS0", &format!("memory: {memory}\n"));
    c.commit(
        &[
            ("vms/big1.yaml", Some(&yaml("big1", "512M"))),
            ("vms/big2.yaml", Some(&yaml("big2", "512M"))),
        ],
        "two VMs",
    );
    c.wait_until("both built", CONVERGE, |c| {
        vm_is(c, "big1", RunState::Running, "512M") && vm_is(c, "big2", RunState::Running, "512M")
    });
    c.commit(
        &[
            ("vms/big1.yaml", Some(&yaml("big1", "1536M"))),
            ("vms/big2.yaml", Some(&yaml("big2", "1536M"))),
        ],
        "both bigger",
    );
    let raised = |c: &Cluster| {
        ["big1", "big2"]
            .iter()
            .filter(|vm| vm_is(c, vm, RunState::Running, "1536M"))
            .count()
    };
    let refused = |c: &Cluster| {
        events(c, "big1", "would exceed the limit") + events(c, "big2", "would exceed the limit")
    };
    c.wait_until(
        "one raised, the other refused (or both raised)",
        CONVERGE,
        |c| raised(c) == 2 || (raised(c) == 1 && refused(c) >= 1),
    );
    let memory: u64 = c.vms(0).iter().map(|v| v.memory.bytes()).sum();
    assert!(
        memory <= Size::gib(2).bytes(),
        "{} on a 2G host: {:?}",
        Size(memory),
        c.vms(0)
    );
    assert_eq!(raised(&c), 1);
    // Reported, and the refused one runs as it was.
    assert!(["big1", "big2"]
        .iter()
        .any(|vm| vm_is(&c, vm, RunState::Running, "512M")));
}
