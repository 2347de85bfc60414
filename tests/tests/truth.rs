//! Issue 15, "Truth first": `apply --wait` and `status` tell what the cluster did with
//! the commit pushed, and what an operator must act on, on a two-host lab cluster.

use std::time::Duration;

use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(60);

fn two() -> Vec<HostSpec> {
    vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ]
}

fn short(commit: &str) -> &str {
    &commit[..10]
}

/// Guards issue 15, truth 1: right after a push, `apply --wait` waits for the commit at
/// the tip of the desired branch (read from git), not the one the local agent last
/// read, and says which commit converged: the VM it adds runs when it returns.
#[test]
fn apply_waits_for_the_tip_just_pushed() {
    let mut c = Cluster::start(&two(), Options::default());
    c.start_agents();
    let config = c.hosts[0].config.display().to_string();
    let first = c.commit(
        &[(
            "vms/first.yaml",
            Some(&vm_yaml("first", "CS0", "host: host1\n")),
        )],
        "first",
    );
    let (code, out, err) =
        c.flotilla(&["apply", "--config", &config, "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}{}", c.logs());
    assert!(
        out.contains(&format!("converged at {}", short(&first))),
        "{out}"
    );
    let second = c.commit(
        &[(
            "vms/second.yaml",
            Some(&vm_yaml("second", "CS0", "host: host2\n")),
        )],
        "second",
    );
    let (code, out, err) =
        c.flotilla(&["apply", "--config", &config, "--wait", "--timeout", "60s"]);
    assert!(
        out.contains(&format!("converged at {}", short(&second))),
        "apply --wait right after a push must wait for {second}: {out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        c.running_complete(1, "second"),
        "converged, yet the VM the tip adds is not running: {out}"
    );
}

/// Guards issue 15, truths 1 and 2: a converged cluster with a blocked VM (its name is
/// taken by an unmanaged VM) is not plain success for `apply --wait` (exit 2, the item
/// listed), and `status` shows it as needing action (exit 2); a tip that does not
/// validate makes `apply` say so at once (commit, file, line, and the commit the hosts
/// keep applying; exit 1), and `status` shows it once the hosts fetched it; a host that
/// does not answer makes `status` exit 1.
#[test]
fn apply_and_status_tell_what_needs_action() {
    let mut c = Cluster::start(&two(), Options::default());
    c.make_by_hand(0, "taken");
    c.start_agents();
    let config = c.hosts[0].config.display().to_string();
    let good = c.commit(
        &[
            (
                "vms/taken.yaml",
                Some(&vm_yaml("taken", "CS0", "host: host1\n")),
            ),
            ("vms/ok.yaml", Some(&vm_yaml("ok", "CS0", "host: host2\n"))),
        ],
        "a VM named like an unmanaged one",
    );
    let (code, out, err) =
        c.flotilla(&["apply", "--config", &config, "--wait", "--timeout", "60s"]);
    assert_eq!(
        code,
        2,
        "blocked is not plain success: {out}{err}{}",
        c.logs()
    );
    assert!(
        out.contains(&format!("converged at {}", short(&good))),
        "{out}"
    );
    assert!(out.contains("taken") && out.contains("name_taken"), "{out}");
    assert!(c.running_complete(1, "ok"), "{out}");

    let (code, out, err) = c.flotilla(&["status", "--config", &config]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("NEEDS ACTION"), "{out}");
    assert!(
        out.contains("taken") && out.contains("name taken by a VM this cluster does not manage"),
        "{out}"
    );
    // Column headers, and the filters.
    assert!(out.contains("HOST") && out.contains("APPLIED"), "{out}");
    let (_, only, _) = c.flotilla(&["status", "--config", &config, "--vm", "ok"]);
    assert!(
        only.contains(" ok ") && !only.contains("\n  taken"),
        "{only}"
    );

    let bad = c.commit(
        &[(
            "vms/bad.yaml",
            Some("name: bad\nprofile: CS0\nmemroy: 1G\n"),
        )],
        "a typo",
    );
    let (code, out, err) = c.flotilla(&["apply", "--config", &config, "--wait"]);
    let all = format!("{out}{err}");
    assert_eq!(code, 1, "{all}");
    assert!(all.contains(short(&bad)), "names the bad commit: {all}");
    assert!(all.contains("vms/bad.yaml:3"), "file and line: {all}");
    assert!(
        all.contains(&format!("hosts keep applying {}", short(&good))),
        "{all}"
    );

    c.wait_until("status shows the invalid tip", CONVERGE, |c| {
        let (_, out, _) = c.flotilla(&["status", "--config", &config]);
        out.contains(short(&bad)) && out.contains("vms/bad.yaml:3")
    });
    let (code, out, err) = c.flotilla(&["status", "--config", &config]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains(&format!("hosts keep applying {}", short(&good))),
        "{out}"
    );

    c.hosts[1].beanstalkd.stop();
    let (code, out, err) = c.flotilla(&["status", "--config", &config]);
    assert_eq!(code, 1, "a host does not answer: {out}{err}");
    assert!(
        out.contains("host2") && out.contains("does not answer"),
        "{out}"
    );
}
