//! The everyday verbs of issue 15 on a running cluster: `retry`, `host drain`/`undrain`,
//! `suspend`/`resume`, `events --cluster`. Each is a signed control message that every
//! host acts on and records.

use std::time::Duration;

use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(90);

/// `flotilla status --output json` on host1.
fn status(c: &Cluster) -> serde_json::Value {
    let config = c.hosts[0].config.display().to_string();
    let (_, out, _) = c.flotilla(&["status", "--config", &config, "--output", "json"]);
    serde_json::from_str(&out).unwrap_or_default()
}

/// Runs `flotilla ARGS --config <host1's>`; asserts exit 0.
fn verb(c: &Cluster, args: &[&str]) -> String {
    let config = c.hosts[0].config.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &config]);
    let (code, out, err) = c.flotilla(&all);
    assert_eq!(code, 0, "flotilla {args:?}: {out}{err}");
    out
}

/// The VMs whose create failed and waits to retry, as status shows them.
fn retrying(st: &serde_json::Value) -> Vec<String> {
    st["in_flight"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| !f[1]["retry_at"].is_null())
                .filter_map(|f| f[1]["vm"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn applied_everywhere(st: &serde_json::Value, commit: &str) -> bool {
    st["hosts"].as_array().is_some_and(|hs| {
        !hs.is_empty()
            && hs
                .iter()
                .all(|h| h["applied_commit"].as_str() == Some(commit))
    })
}

fn logged_everywhere(c: &Cluster, kind: &str, text: &str) -> bool {
    (0..c.hosts.len()).all(|i| {
        c.events(i)
            .iter()
            .any(|e| e.kind == kind && e.message.contains(text))
    })
}

/// Guards issue 15, verb 1: an unplaceable create waited `retry_failed` (here an hour)
/// even after room was made; `flotilla retry` plans it again at once, and every host
/// logs the retry.
#[test]
fn retry_plans_an_unplaceable_create_again_now() {
    let small = vec![
        HostSpec::new("host1", Some("host2")).limits("64G", "4T", 1),
        HostSpec::new("host2", None).limits("64G", "4T", 1),
    ];
    let mut c = Cluster::start(
        &small,
        Options {
            retry_failed: "1h",
            ..Options::default()
        },
    );
    c.start_agents();
    let names = ["r1", "r2", "r3"];
    let files: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("vms/{n}.yaml"), vm_yaml(n, "CS0", "")))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    c.commit(&refs, "three VMs, room for two");
    c.wait_until("one create unplaceable, waiting to retry", CONVERGE, |c| {
        retrying(&status(c)).len() == 1
    });
    let left_out = retrying(&status(&c)).remove(0);
    let roomy = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let more = c.commit(
        &[("cluster.yaml", Some(&c.cluster_yaml(&roomy)))],
        "room for all",
    );
    // Both hosts passed on the roomier commit and still only wait for the retry time.
    c.wait_until("the roomier commit applied", CONVERGE, |c| {
        applied_everywhere(&status(c), &more)
    });
    assert_eq!(retrying(&status(&c)), vec![left_out.clone()]);
    assert!(c.holders(&left_out).is_empty());

    let out = verb(&c, &["retry", &left_out]);
    assert!(out.contains("host1: told to retry"), "{out}");
    c.wait_until("the left-out VM built after the retry", CONVERGE, |c| {
        c.holders(&left_out).len() == 1
    });
    assert!(logged_everywhere(&c, "retry", "retry asked by"));
    assert!(
        (0..2).any(|i| c.events(i).iter().any(|e| e.kind == "retry"
            && e.message
                .contains(&format!("planned again now: {left_out}")))),
        "no host said it planned {left_out} again"
    );
}

/// Guards issue 15, verb 2: a drained host places no new create (a free one goes on
/// along the chain, one pinned there is unplaceable, "drained"), status shows it as
/// draining, the drain survives the agent's restart, and undrain places creates there
/// again.
#[test]
fn a_drained_host_places_no_new_creates_until_undrained() {
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let mut c = Cluster::start(
        &specs,
        Options {
            retry_failed: "1h",
            ..Options::default()
        },
    );
    c.start_agents();
    c.wait_until("status answers", CONVERGE, |c| {
        status(c)["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    verb(&c, &["host", "drain", "host1"]);
    c.wait_until("both hosts logged the drain", CONVERGE, |c| {
        logged_everywhere(c, "drain", "host `host1` drained")
    });
    c.wait_until("status shows host1 draining", CONVERGE, |c| {
        status(c)["hosts"].as_array().is_some_and(|hs| {
            hs.iter()
                .any(|h| h["host"] == "host1" && h["draining"] == true)
        })
    });
    let config = c.hosts[0].config.display().to_string();
    let (_, text, _) = c.flotilla(&["status", "--config", &config]);
    assert!(text.contains("DRAINING"), "{text}");

    // A VM whose first hop is host1 (it starts there) goes on to host2.
    c.commit(
        &[
            (
                "vms/free.yaml",
                Some(&vm_yaml("free", "CS0", "start_at: host1\n")),
            ),
            (
                "vms/pinned.yaml",
                Some(&vm_yaml("pinned", "CS0", "host: host1\n")),
            ),
        ],
        "one VM starting at host1, one pinned there",
    );
    c.wait_until("free built on host2", CONVERGE, |c| {
        c.holders("free") == vec![1]
    });
    c.wait_until("pinned unplaceable: drained", CONVERGE, |c| {
        status(c)["failures"].as_array().is_some_and(|fs| {
            fs.iter().any(|f| {
                f[1]["vm"] == "pinned"
                    && f[1]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("host1: drained"))
            })
        })
    });
    assert!(c.holders("pinned").is_empty());

    // Still drained after a restart.
    c.stop_agent(0);
    c.start_agent(0);
    c.commit(
        &[(
            "vms/later.yaml",
            Some(&vm_yaml("later", "CS0", "start_at: host1\n")),
        )],
        "another VM starting at host1",
    );
    c.wait_until("later built on host2", CONVERGE, |c| {
        c.holders("later") == vec![1]
    });

    verb(&c, &["host", "undrain", "host1"]);
    c.wait_until("both hosts logged the undrain", CONVERGE, |c| {
        logged_everywhere(c, "undrain", "host `host1` undrained")
    });
    // The pinned create waits an hour to retry; the operator asks for it now.
    verb(&c, &["retry", "pinned"]);
    c.wait_until("pinned built on host1", CONVERGE, |c| {
        c.holders("pinned") == vec![0]
    });
    // Status reads the published inventories: each shows the undrain from its next
    // publication on.
    c.wait_until("status shows no host draining", CONVERGE, |c| {
        status(c)["hosts"]
            .as_array()
            .is_some_and(|hs| hs.iter().all(|h| h["draining"].is_null()))
    });
}

/// Guards issue 15, verb 3: a suspended VM is not acted on (its file deleted, it is not
/// destroyed, while another VM of the same commit is), status shows it suspended, the
/// suspend survives a restart, and `resume` lets the destroy go out.
#[test]
fn a_suspended_vm_is_not_acted_on_until_resumed() {
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let mut c = Cluster::start(&specs, Options::default());
    c.start_agents();
    c.commit(
        &[
            (
                "vms/keep.yaml",
                Some(&vm_yaml("keep", "CS0", "host: host1\n")),
            ),
            (
                "vms/gone.yaml",
                Some(&vm_yaml("gone", "CS0", "host: host1\n")),
            ),
            // The desired state never lists no VMs (that destroys nothing).
            (
                "vms/stay.yaml",
                Some(&vm_yaml("stay", "CS0", "host: host2\n")),
            ),
        ],
        "two VMs on host1, one on host2",
    );
    c.wait_until("both running on host1", CONVERGE, |c| {
        c.running_complete(0, "keep") && c.running_complete(0, "gone")
    });
    verb(&c, &["suspend", "keep"]);
    c.wait_until("both hosts logged the suspend", CONVERGE, |c| {
        logged_everywhere(c, "suspend", "keep suspended")
    });
    c.commit(
        &[("vms/keep.yaml", None), ("vms/gone.yaml", None)],
        "both deleted",
    );
    // The same pass destroys one and holds the other back.
    c.wait_until("gone destroyed", CONVERGE, |c| c.holders("gone").is_empty());
    assert_eq!(c.holders("keep"), vec![0]);
    let config = c.hosts[0].config.display().to_string();
    let (_, text, _) = c.flotilla(&["status", "--config", &config]);
    assert!(
        text.contains("SUSPENDED VMS (`flotilla resume VM`): keep"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("keep") && l.contains("suspended")),
        "{text}"
    );
    // `plan` through host1's agent config shows the held-back destroy as suspended.
    let repo = c.repo.display().to_string();
    let (code, out, err) = c.flotilla(&["plan", &repo, "--agent-config", &config]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("suspended: keep is not acted on until `flotilla resume keep`"),
        "{out}"
    );

    // Still suspended after a restart: the restarted agent runs passes and leaves it.
    c.stop_agent(0);
    c.start_agent(0);
    c.commit(
        &[(
            "vms/after.yaml",
            Some(&vm_yaml("after", "CS0", "host: host1\n")),
        )],
        "a VM after the restart",
    );
    // Built: the restarted agent ran passes on the deletion of `keep` too.
    c.wait_until("after built by the restarted host1", CONVERGE, |c| {
        c.running_complete(0, "after")
    });
    assert_eq!(c.holders("keep"), vec![0]);
    assert_eq!(status(&c)["switches"]["suspended"][0], "keep");

    verb(&c, &["resume"]);
    c.wait_until("keep destroyed after resume", CONVERGE, |c| {
        c.holders("keep").is_empty()
    });
    assert!(logged_everywhere(&c, "resume", "the cluster resumed"));
}

/// Guards issue 15, verb 4: `flotilla import` shows the VM file of an unmanaged VM made
/// by hand, writes it only with --yes, and its host marks it managed as imported: not
/// destroyed while no file desires it (safety), taken over once the file is committed,
/// refused a second time.
#[test]
fn import_adopts_an_unmanaged_vm_without_making_it_destroyable() {
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let mut c = Cluster::start(&specs, Options::default());
    c.start_agents();
    // The desired state is not empty: a managed VM not in it would be destroyed.
    c.commit(
        &[(
            "vms/keep.yaml",
            Some(&vm_yaml("keep", "CS0", "host: host1\n")),
        )],
        "one VM",
    );
    c.wait_until("keep running", CONVERGE, |c| c.running_complete(0, "keep"));
    c.make_by_hand(1, "hand");
    c.wait_until("status shows hand unmanaged on host2", CONVERGE, |c| {
        status(c)["vms"].as_array().is_some_and(|vs| {
            vs.iter()
                .any(|v| v["vm"] == "hand" && v["host"] == "host2" && v["managed"] == false)
        })
    });
    let config = c.hosts[0].config.display().to_string();
    let checkout = c.dir.path().join("checkout");
    let checkout_s = checkout.display().to_string();

    let (code, shown, err) = c.flotilla(&["import", "hand", "--config", &config]);
    assert_eq!(code, 0, "{shown}{err}");
    assert!(
        shown.contains("name: \"hand\"\n") && shown.contains("host: \"host2\"\n"),
        "{shown}"
    );
    assert!(err.contains("not written"), "{err}");
    assert!(!checkout.exists());
    let (code, _, err) = c.flotilla(&["import", "nosuch", "--config", &config]);
    assert_eq!(code, 1, "{err}");

    let (code, out, err) = c.flotilla(&[
        "import",
        "hand",
        "--repo",
        &checkout_s,
        "--yes",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let file = std::fs::read_to_string(checkout.join("vms/hand.yaml")).expect("the VM file");
    assert_eq!(file, shown);
    assert!(c
        .events(1)
        .iter()
        .any(|e| e.kind == "import" && e.message.contains("hand imported")));
    assert!(c
        .events(0)
        .iter()
        .any(|e| e.kind == "import" && e.message.contains("import of hand on host2")));
    // host2 planned with hand managed and undesired, and blocked it.
    c.wait_until("host2 blocked hand as imported", CONVERGE, |c| {
        std::fs::read_to_string(&c.hosts[1].log)
            .unwrap_or_default()
            .contains("imported: commit its VM file")
    });
    assert_eq!(c.holders("hand"), vec![1]);
    assert!(c.running_complete(1, "hand"));
    let (code, _, err) = c.flotilla(&["import", "hand", "--config", &config]);
    assert_eq!(code, 1);
    assert!(err.contains("managed already"), "{err}");

    // Committed: its marker takes the spec's hash, and it stays where it is.
    c.commit(&[("vms/hand.yaml", Some(&file))], "import hand");
    c.wait_until("hand's marker has its spec's hash", CONVERGE, |c| {
        c.vms(1).iter().any(|v| {
            v.name == "hand"
                && v.marker
                    .as_ref()
                    .is_some_and(|m| m.spec_hash != flotilla::control::IMPORTED)
        })
    });
    assert_eq!(c.holders("hand"), vec![1]);
}

/// Guards issue 15, verb 5: `flotilla events --cluster` gathers every host's events
/// (each host's own record of a verb), filters by `--since`, prints JSON lines with a
/// `version`, and `--follow` prints what comes later; plain `events` stays local.
#[test]
fn events_cluster_gathers_every_hosts_events() {
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", None),
    ];
    let mut c = Cluster::start(&specs, Options::default());
    c.start_agents();
    let config = c.hosts[0].config.display().to_string();
    verb(&c, &["host", "drain", "host2"]);
    let lines = |c: &Cluster, extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec![
            "events",
            "--cluster",
            "--output",
            "json",
            "--config",
            &config,
        ];
        args.extend(extra);
        let (code, out, err) = c.flotilla(&args);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let drains = |ls: &[serde_json::Value]| -> Vec<String> {
        ls.iter()
            .filter(|l| l["kind"] == "drain")
            .filter_map(|l| l["host"].as_str().map(str::to_string))
            .collect()
    };
    c.wait_until("both hosts' drain events published", CONVERGE, |c| {
        drains(&lines(c, &[])) == ["host1", "host2"] || drains(&lines(c, &[])) == ["host2", "host1"]
    });
    let all = lines(&c, &[]);
    assert!(all.iter().all(|l| l["format_version"] == 1), "{all:?}");
    assert!(lines(&c, &["--since", "2000-01-01T00:00:00Z"]).len() >= all.len());
    let future = lines(&c, &["--since", "2999-01-01T00:00:00+02:00"]);
    assert!(future.is_empty(), "{future:?}");
    let (code, _, err) = c.flotilla(&["events", "--since", "yesterday", "--config", &config]);
    assert_eq!(code, 64, "{err}");
    // Local: host1's own log only.
    let (_, local, _) = c.flotilla(&["events", "--config", &config]);
    assert!(local.lines().all(|l| l.contains(" host1 ")), "{local}");

    // --follow prints an event that happens after it started.
    let mut follow = std::process::Command::new(flotilla_e2e::bin_dir().join("flotilla"))
        .args([
            "events",
            "--cluster",
            "--follow",
            "--since",
            "1s",
            "--config",
            &config,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    verb(&c, &["host", "undrain", "host2"]);
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => got.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("events --follow ended: {e}"),
        }
        let undrains = got.iter().filter(|l| l.contains(" undrain ")).count();
        if undrains == 2 {
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(
        got.iter().filter(|l| l.contains(" undrain ")).count(),
        2,
        "{got:?}"
    );
}
