//! `flotilla validate` end to end on real temporary git repos and plain directories.

mod cli_support;

use cli_support::*;

#[test]
fn the_example_repo_is_valid() {
    let out = flotilla(&["validate", EXAMPLE]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        stdout(&out),
        "valid: cluster lab at (work tree): 3 hosts, 8 VMs, 6 profiles, 6 templates\n"
    );
}

fn broken(repo: &Repo) {
    repo.write("vms/web1.yaml", "name: web1\nprofile: CS1\nhost: host9\n");
    repo.write(
        "vms/dup.yaml",
        "name: web2\nprofile: CS0\nsecrets: [keys/web]\n",
    );
    repo.write("vms/typo.yaml", "name: typo\nprofil: CS0\n");
}

#[test]
fn every_error_is_reported_with_its_place_from_a_commit() {
    let repo = Repo::example();
    broken(&repo);
    let commit = repo.commit("break it");
    let out = flotilla(&[
        "validate",
        "--repo",
        &repo.url(),
        "--ref",
        "main",
        "--cache-dir",
        &repo.cache(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "\
error: vms/dup.yaml:3:11: secret name `keys/web` contains a path
  hint: name the secret only (letters, digits, `.`, `_`, `-`); each host keeps its file under its own secrets directory
error: vms/typo.yaml:2:1: unknown field `profil`, expected one of `name`, `profile`, `cpu`, `memory`, `disk`, `host`, `start_at`, `every_host`, `tags`, `state`, `protect`, `replace`, `config`, `hooks`, `secrets`, `description`
  hint: did you mean `profile`?
error: vms/web1.yaml:3:7: unknown host `host9`
  hint: hosts in cluster.yaml: host1, host2, host3
error: vms/web2.yaml:1:7: duplicate VM name `web2`
  hint: `web2` is already declared in vms/dup.yaml:1:7; VM names are unique in the cluster
4 errors in the desired state
"
    );

    let out = flotilla(&[
        "validate",
        "--repo",
        &repo.url(),
        "--cache-dir",
        &repo.cache(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["valid"], false);
    assert_eq!(v["commit"], commit.as_str());
    assert_eq!(v["errors"][2]["file"], "vms/web1.yaml");
    assert_eq!(v["errors"][2]["line"], 3);
    assert_eq!(v["errors"][2]["column"], 7);
}

#[test]
fn the_work_tree_is_checked_before_a_commit() {
    let repo = Repo::example();
    broken(&repo);
    // Uncommitted: the directory shows the errors, the commit does not.
    let out = flotilla(&["validate", &repo.work.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).ends_with("4 errors in the desired state\n"));
    let out = flotilla(&[
        "validate",
        "--repo",
        &repo.url(),
        "--cache-dir",
        &repo.cache(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with(&format!(
        "valid: cluster lab at {}",
        &repo.commit_id()[..12]
    )));
}

#[test]
fn unreadable_sources_are_errors() {
    let out = flotilla(&["validate", "/nonexistent/desired"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("flotilla: error: /nonexistent/desired: "),
        "{}",
        stderr(&out)
    );
    let repo = Repo::example();
    let out = flotilla(&[
        "validate",
        "--repo",
        &repo.url(),
        "--ref",
        "nope",
        "--cache-dir",
        &repo.cache(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("ref `nope` not found"),
        "{}",
        stderr(&out)
    );
    let out = flotilla(&["validate", "--bogus"]);
    assert_eq!(out.status.code(), Some(64));
}

/// Guards issue 11, hole 4: a VM file replaced by a symlink to a copy outside the repo
/// made `validate` say valid with one VM fewer (and a commit of it destroyed that VM).
#[test]
fn a_symlinked_vm_file_is_an_error_with_its_path() {
    let repo = Repo::example();
    let outside = repo.path("web1-copy.yaml");
    std::fs::rename(repo.work.join("vms/web1.yaml"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, repo.work.join("vms/web1.yaml")).unwrap();
    repo.commit("web1 as a symlink");
    for args in [
        vec![
            "validate".to_string(),
            "--repo".into(),
            repo.url(),
            "--cache-dir".into(),
            repo.cache(),
        ],
        vec!["validate".to_string(), repo.work.display().to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = flotilla(&args);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).starts_with("error: vms/web1.yaml:1:1: a symlink, not a regular file\n"),
            "{}",
            stdout(&out)
        );
    }
}
