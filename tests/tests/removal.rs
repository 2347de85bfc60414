//! A host removed from cluster.yaml while it holds VMs (issue 11, holes 1 and 6): its
//! guests still exist, so no other host builds them again until it shows them gone or an
//! operator runs `flotilla host forget`.

use std::time::Duration;

use flotilla::actual::RunState;
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(90);

fn running(c: &Cluster, i: usize, vm: &str) -> bool {
    c.vms(i)
        .iter()
        .any(|v| v.name == vm && v.state == RunState::Running)
}

/// `flotilla status --output json` on host1.
fn status(c: &Cluster) -> serde_json::Value {
    let config = c.hosts[0].config.display().to_string();
    let (_, out, _) = c.flotilla(&["status", "--config", &config, "--output", "json"]);
    serde_json::from_str(&out).unwrap_or_default()
}

fn applied(st: &serde_json::Value, host: &str, commit: &str) -> bool {
    st["hosts"].as_array().is_some_and(|hs| {
        hs.iter()
            .any(|h| h["host"] == host && h["applied_commit"].as_str() == Some(commit))
    })
}

/// Guards issue 11, hole 1: a commit removed host3 (and ended host2's chain) while two
/// VMs ran on it; within seconds both were built again on host1 or host2 while still
/// running on host3. Now the others keep host3's last inventory: its VMs are held there,
/// shown as such, host3's agent acts on nothing, and only `flotilla host forget host3`
/// lets them be built elsewhere.
#[test]
fn a_host_removed_while_it_holds_vms_keeps_them_until_it_is_forgotten() {
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", Some("host3")),
        HostSpec::new("host3", None),
    ];
    let mut c = Cluster::start(&specs, Options::default());
    c.start_agents();
    let names: Vec<String> = (0..)
        .map(|i| format!("vm{i:02}"))
        .filter(|n| flotilla::owner::rendezvous(n, ["host1", "host2", "host3"]) == Some("host3"))
        .take(2)
        .collect();
    let files: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("vms/{n}.yaml"), vm_yaml(n, "CS0", "")))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    c.commit(&refs, "two VMs that host3 owns");
    c.wait_until("both running on host3", CONVERGE, |c| {
        names.iter().all(|n| running(c, 2, n))
    });

    let two = [
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let removal = c.commit(
        &[("cluster.yaml", Some(&c.cluster_yaml(&two)))],
        "host3 leaves the cluster",
    );
    // Seen and acted on: host1 and host2 finished passes on the removal, host3 knows it
    // left, and status shows the VMs held by it.
    c.wait_until("host1 and host2 applied the removal", CONVERGE, |c| {
        let st = status(c);
        applied(&st, "host1", &removal) && applied(&st, "host2", &removal)
    });
    for n in &names {
        assert_eq!(c.holders(n), vec![2], "{n} built again elsewhere");
    }
    c.wait_until("host3's agent saw it left", CONVERGE, |c| {
        c.events(2)
            .iter()
            .any(|e| e.kind == "error" && e.message.contains("left cluster.yaml"))
    });
    // Status shows what host3's published inventory shows: the one after its builds.
    let held = |c: &Cluster| -> Vec<String> {
        status(c)["vms"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter(|v| v["held_by_removed_host"] == true)
                    .filter_map(|v| v["vm"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    c.wait_until("status shows both VMs held by host3", CONVERGE, |c| {
        held(c) == names
    });
    let config = c.hosts[0].config.display().to_string();
    let (_, text, _) = c.flotilla(&["status", "--config", &config]);
    assert!(
        text.contains("held by a host that left cluster.yaml"),
        "{text}"
    );
    // Still so after the others restart (the last inventory is kept on disk).
    c.stop_agent(0);
    c.start_agent(0);
    c.wait_until("host1 back, applied again", CONVERGE, |c| {
        applied(&status(c), "host1", &removal)
            && c.events(0).iter().filter(|e| e.kind == "start").count() >= 2
    });
    for n in &names {
        assert_eq!(c.holders(n), vec![2], "{n} built again after a restart");
    }

    // The operator takes host3 down for good and says so.
    c.stop_agent(2);
    let (code, out, err) = c.flotilla(&["host", "forget", "host3", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    c.wait_until("both built on host1 or host2", CONVERGE, |c| {
        names.iter().all(|n| running(c, 0, n) || running(c, 1, n))
    });
    assert!(c
        .events(0)
        .iter()
        .any(|e| e.kind == "forget" && e.message.contains("host3")));
}
