//! SIGHUP to a running agent (issue 15, "Conventions of a good CLI and daemon").

use std::time::Duration;

use flotilla_e2e::{Cluster, HostSpec, Options};

const WAIT: Duration = Duration::from_secs(60);

fn config_events(c: &Cluster) -> Vec<(String, String)> {
    c.events(0)
        .into_iter()
        .filter(|e| e.message.starts_with("SIGHUP"))
        .map(|e| (e.kind, e.message))
        .collect()
}

/// Guards issue 15 (SIGHUP): a hangup killed the agent without a clean stop (the default
/// action of the signal: `kill -HUP` left no "agent stopped" event and the process
/// gone). Now the agent reads agent.yaml again, says whether a restart would change
/// anything (or why the file does not load), keeps running with the settings it started
/// with, and reconciles at once.
#[test]
fn a_hangup_rereads_agent_yaml_and_keeps_the_agent_running() {
    let mut c = Cluster::start(&[HostSpec::new("host1", None)], Options::default());
    c.start_agents();
    // The handler is installed before the agent's first event is written.
    c.wait_until("the agent started", WAIT, |c| {
        c.events(0).iter().any(|e| e.kind == "start")
    });

    c.signal_agent(0, "HUP");
    c.wait_until("the hangup is answered", WAIT, |c| {
        config_events(c).len() == 1
    });
    assert!(c.agent_alive(0), "the agent died of SIGHUP:\n{}", c.logs());
    assert_eq!(config_events(&c)[0].0, "config", "{:?}", config_events(&c));
    assert!(config_events(&c)[0].1.contains("unchanged"));

    let path = c.hosts[0].config.clone();
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original + "max_clock_skew: 7s\n").unwrap();
    c.signal_agent(0, "HUP");
    c.wait_until("the changed file is reported", WAIT, |c| {
        config_events(c).len() == 2
    });
    let (kind, msg) = config_events(&c)[1].clone();
    assert_eq!(kind, "config");
    assert!(msg.contains("changed") && msg.contains("restarts"), "{msg}");

    std::fs::write(&path, "this: is: not agent.yaml\n").unwrap();
    c.signal_agent(0, "HUP");
    c.wait_until("the broken file is reported", WAIT, |c| {
        config_events(c).len() == 3
    });
    let (kind, msg) = config_events(&c)[2].clone();
    assert_eq!(kind, "error");
    assert!(msg.contains("does not load"), "{msg}");
    assert!(c.agent_alive(0), "the agent died:\n{}", c.logs());
    assert_eq!(c.stop_agent(0), Some(0), "a clean stop after the hangups");
}
