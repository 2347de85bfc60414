//! One live agent per host name (safety rule 8, issue 11 hole 3): a second agent started
//! under a host's name, with its own state directory and vm_dir but the same config and
//! beanstalkd, must refuse to act.

use std::time::{Duration, Instant};

use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(90);

/// Guards issue 11, hole 3: two agents with the same host name (another state_dir and
/// vm_dir, the same beanstalkd). Before the fix the second one planned against its own
/// empty vm_dir and built vm11 a second time within seconds, and published its
/// inventory over the first one's; now it finds the host's lease held, exits 78 naming
/// the holder, and builds nothing.
#[test]
fn a_second_agent_under_the_same_host_name_exits_78_and_builds_nothing() {
    let mut c = Cluster::start(
        &[
            HostSpec::new("host1", Some("host2")),
            HostSpec::new("host2", None),
        ],
        Options::default(),
    );
    c.start_agents();
    c.commit(
        &[(
            "vms/vm11.yaml",
            Some(&vm_yaml("vm11", "CS0", "host: host1\n")),
        )],
        "vm11 on host1",
    );
    c.wait_until("vm11 built on host1", CONVERGE, |c| {
        c.running_complete(0, "vm11")
    });
    let holder_pid = c.hosts[0].agent.as_ref().expect("host1's agent").id();

    let j = c.start_twin(0);
    // Either outcome ends the wait: the twin exits, or it builds something.
    let started = Instant::now();
    let status = loop {
        if let Some(st) = c.twin_exit(j) {
            break Some(st);
        }
        if !c.twin_names(j).is_empty() {
            break None;
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!("the twin neither exited nor built within 60s\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        c.twin_names(j),
        Vec::<String>::new(),
        "the second agent under host1's name built VMs\n{}",
        c.logs()
    );
    let status = status.expect("exited");
    assert_eq!(status.code(), Some(78), "exit status\n{}", c.logs());
    let log = std::fs::read_to_string(&c.twins[j].log).unwrap();
    assert!(
        log.contains("host1") && log.contains(&format!("pid {holder_pid}")),
        "the refusal names the holder (pid {holder_pid}):\n{log}"
    );
    // The holder goes on undisturbed: vm11 once, on host1 only.
    assert!(c.running_complete(0, "vm11"));
    assert_eq!(c.names(0), vec!["vm11".to_string()]);
    assert!(c.names(1).is_empty());
}
