//! `flotilla plan` end to end: real git repos, saved actual state, the simulator.

mod cli_support;

use cli_support::*;
use flotilla::actual::RunState;

/// The example repo against a lab that has drifted a little.
fn drifted(repo: &Repo) -> String {
    let snap = load_dir(&repo.work);
    let mut hosts = matching(&snap);
    for h in &mut hosts {
        h.vms.retain(|v| v.name != "monitor-host3");
        for v in &mut h.vms {
            if v.name == "web1" {
                v.config.insert("cpu".into(), "2".into());
                v.config.insert("graphics".into(), "yes".into());
            }
            if v.name == "staging" {
                v.state = RunState::Running;
            }
        }
    }
    let spare = snap.vms["monitor-host1"].clone();
    let h3 = hosts.iter_mut().find(|h| h.host == "host3").unwrap();
    let mut old = built(&spare, "lab");
    old.name = "old-vm".into();
    h3.vms.push(old);
    let h2 = hosts.iter_mut().find(|h| h.host == "host2").unwrap();
    let mut legacy = built(&spare, "lab");
    legacy.name = "legacy".into();
    legacy.marker = None;
    legacy.state = RunState::Stopped;
    h2.vms.push(legacy);
    for h in &mut hosts {
        h.vms.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let path = repo.path("drifted.json");
    save(&path, hosts);
    path
}

#[test]
fn plan_shows_the_expected_diff_and_exits_2() {
    let repo = Repo::example();
    let commit = repo.commit_id();
    let state = drifted(&repo);
    let out = flotilla(&[
        "plan",
        "--repo",
        &repo.url(),
        "--ref",
        "main",
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "\
Plan for cluster lab at {}

host1:
  ~ stop staging
  ~ update web1 (restart)
        --- actual/web1.conf
        +++ desired/web1.conf
        @@ -1,6 +1,5 @@
        -cpu=\"2\"
        +cpu=\"1\"
         disk0_name=\"disk0.img\"
         disk0_type=\"nvme\"
        -graphics=\"yes\"
         loader=\"bhyveload\"
         memory=\"512M\"

host3:
  + create monitor-host3 (CS0: 1 cpu, 256M memory, 20G disk, template CS0; running; owner host3)
  - destroy old-vm (stopped first)

Plan: 1 to create, 1 to update, 0 to replace, 1 to destroy, 0 to start, 1 to stop, 0 disks to grow; 0 blocked, 0 in flight.
",
            &commit[..12]
        )
    );
    assert!(!stdout(&out).contains("legacy"), "an unmanaged VM appeared");
    assert!(!stdout(&out).contains('\x1b'), "colours without a terminal");
}

#[test]
fn plan_of_a_matching_state_exits_0() {
    let repo = Repo::example();
    let state = repo.path("state.json");
    save(&state, matching(&load_dir(&repo.work)));
    let out = flotilla(&[
        "plan",
        &repo.work.display().to_string(),
        "--inventory",
        &state,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Plan for cluster lab at (work tree)\n\nNo changes. The hosts match the desired state.\n"
    );
}

/// Guards issue 15, truth 4: a plan whose only items are blocked changes nothing, and
/// exits 0 as the README says (it exited 2).
#[test]
fn a_plan_of_only_blocked_items_exits_0() {
    let repo = Repo::example();
    let state = repo.path("state.json");
    let mut hosts = matching(&load_dir(&repo.work));
    // web1's name is taken by a VM this cluster does not manage: blocked, not created.
    for v in hosts.iter_mut().flat_map(|h| h.vms.iter_mut()) {
        if v.name == "web1" {
            v.marker = None;
        }
    }
    save(&state, hosts);
    let dir = repo.work.display().to_string();
    let out = flotilla(&["plan", &dir, "--inventory", &state]);
    let text = stdout(&out);
    assert!(text.contains("web1 blocked (name_taken)"), "{text}");
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
}

#[test]
fn plan_json_has_a_format_version() {
    let repo = Repo::example();
    let commit = repo.commit_id();
    let state = drifted(&repo);
    let out = flotilla(&[
        "plan",
        "--repo",
        &repo.url(),
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["commit"], commit.as_str());
    assert_eq!(v["changes"], true);
    assert_eq!(v["summary"]["create"], 1);
    assert_eq!(v["summary"]["destroy"], 1);
    let host3 = &v["hosts"][1];
    assert_eq!(host3["host"], "host3");
    assert_eq!(host3["actions"][0]["action"], "create");
    assert_eq!(
        host3["actions"][0]["spec"]["spec_hash"]
            .as_str()
            .map(str::len),
        Some(64)
    );
}

#[test]
fn plan_follows_new_commits_and_refs() {
    let repo = Repo::example();
    let state = repo.path("state.json");
    save(&state, matching(&load_dir(&repo.work)));
    let first = flotilla(&[
        "plan",
        "--repo",
        &repo.url(),
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
    ]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    git(&repo.work, &["tag", "v1"]);
    repo.write("vms/extra.yaml", "name: extra\nprofile: CS0\nhost: host2\n");
    repo.commit("more");
    // The same clone, fetched again, sees the new commit on the default branch.
    let second = flotilla(&[
        "plan",
        "--repo",
        &repo.url(),
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
    ]);
    assert_eq!(second.status.code(), Some(2));
    assert!(
        stdout(&second).contains("+ create extra"),
        "{}",
        stdout(&second)
    );
    let tagged = flotilla(&[
        "plan",
        "--repo",
        &repo.url(),
        "--ref",
        "v1",
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
    ]);
    assert_eq!(tagged.status.code(), Some(0), "{}", stdout(&tagged));
}

#[test]
fn the_prune_guard_blocks_and_the_override_lets_through() {
    let repo = Repo::example();
    let state = repo.path("state.json");
    save(&state, matching(&load_dir(&repo.work)));
    for f in ["web1", "staging", "ci-runner"] {
        std::fs::remove_file(repo.work.join(format!("vms/{f}.yaml"))).unwrap();
    }
    let dir = repo.work.display().to_string();
    let out = flotilla(&["plan", &dir, "--inventory", &state]);
    // Only blocked destroys: nothing would change.
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains(
            "! web1 blocked (prune_guard): 3 of 4 managed VMs on host1 would be destroyed"
        ),
        "{text}"
    );
    assert!(text.contains("0 to destroy"), "{text}");
    let out = flotilla(&["plan", &dir, "--inventory", &state, "--allow-prune"]);
    assert!(stdout(&out).contains("3 to destroy"), "{}", stdout(&out));
}

#[test]
fn errors_exit_1() {
    let repo = Repo::example();
    let dir = repo.work.display().to_string();
    let out = flotilla(&["plan", &dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no actual state given"),
        "{}",
        stderr(&out)
    );

    let state = repo.path("state.json");
    save(&state, matching(&load_dir(&repo.work)));
    repo.write("vms/bad.yaml", "name: bad\nprofile: CS9\n");
    let out = flotilla(&["plan", &dir, "--inventory", &state]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("error: vms/bad.yaml:2:10: unknown profile `CS9`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");

    let out = flotilla(&[
        "plan",
        "--repo",
        &repo.path("nowhere"),
        "--cache-dir",
        &repo.cache(),
        "--inventory",
        &state,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("flotilla: error: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plan_reads_the_local_host_through_the_simulator() {
    let repo = Repo::example();
    let sim = tempfile::tempdir().unwrap();
    let bin = sim.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let vm = bin.join("vm");
    // vm-sim lives in the lab crate; bin_dir() builds the workspace's binaries first.
    std::os::unix::fs::symlink(flotilla_lab::lab::bin_dir().join("vm-sim"), &vm).unwrap();
    let vm_dir = sim.path().join("vms");
    std::fs::create_dir(&vm_dir).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&vm)
            .args(args)
            .env("VM_SIM_DIR", &vm_dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init"]);
    std::fs::write(vm_dir.join(".templates/default.conf"), "loader=\"bhyveload\"\ncpu=1\nmemory=256M\ndisk0_type=\"virtio-blk\"\ndisk0_name=\"disk0.img\"\n").unwrap();
    run(&["create", "-s", "1G", "handmade"]);
    let saved = repo.path("saved.json");
    let out = flotilla(&[
        "plan",
        &repo.work.display().to_string(),
        "--vm-dir",
        &vm_dir.display().to_string(),
        "--vm-command",
        &vm.display().to_string(),
        "--host",
        "host1",
        "--save-inventory",
        &saved,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("+ create web1"), "{text}");
    assert!(
        !text.contains("handmade"),
        "unmanaged VM in the plan: {text}"
    );
    assert!(
        text.contains("warning: no actual state for host `host2`"),
        "{text}"
    );
    let state =
        flotilla::planner::StateFile::from_json(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(state.hosts[0].vms[0].name, "handmade");
}
