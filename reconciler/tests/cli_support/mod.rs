//! Helpers for the `flotilla validate` / `flotilla plan` CLI tests: real temporary git
//! repos and saved actual state.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla::actual::{ActualVm, Disk, HostActual, Marker, RunState};
use flotilla::desired::{DesiredState, Snapshot, VmSpec};
use flotilla::planner::StateFile;

pub const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../desired");

pub fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("FLOTILLA_CACHE_DIR")
        .output()
        .expect("run flotilla")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A git repo in a temporary directory holding a copy of the example desired repo,
/// committed on `main`.
pub struct Repo {
    pub tmp: tempfile::TempDir,
    pub work: PathBuf,
}

impl Repo {
    pub fn example() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("desired");
        copy_dir(Path::new(EXAMPLE), &work);
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "example"]);
        Repo { tmp, work }
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.work.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn commit(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        git_out(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.work.display())
    }

    pub fn cache(&self) -> String {
        self.tmp.path().join("cache").display().to_string()
    }

    pub fn path(&self, rel: &str) -> String {
        self.tmp.path().join(rel).display().to_string()
    }
}

pub fn load_dir(dir: &Path) -> Snapshot {
    let files = flotilla::source::read_dir(dir).unwrap();
    flotilla::desired::load(&files, None).unwrap()
}

/// A VM as a worker builds it from `spec`.
pub fn built(spec: &VmSpec, cluster: &str) -> ActualVm {
    let mut config = spec.config.clone();
    config.insert(
        "uuid".into(),
        format!("00000000-0000-0000-0000-{:012}", spec.name.len()),
    );
    config.insert("network0_mac".into(), "58:9c:fc:00:00:01".into());
    ActualVm {
        name: spec.name.clone(),
        datastore: "default".into(),
        config,
        cpu: spec.cpu,
        memory: spec.memory,
        disks: vec![Disk {
            name: "disk0.img".into(),
            dev: "file".into(),
            size: spec.disk,
        }],
        state: match spec.state {
            DesiredState::Running => RunState::Running,
            DesiredState::Stopped => RunState::Stopped,
        },
        // A VM that runs as desired is in vm_list (issue 12, item 1).
        autostart: (spec.state == DesiredState::Running).then_some(1),
        marker: Some(Marker {
            format_version: Marker::FORMAT_VERSION,
            cluster: cluster.into(),
            job_id: "job-1".into(),
            spec_hash: spec.spec_hash.clone(),
            commit: "0".repeat(40),
            owner: spec.host.clone().unwrap_or_default(),
            protect: spec.protect,
            complete: true,
            placed_from: None,
        }),
    }
}

/// The actual state that matches `snap`: every VM on its owner.
pub fn matching(snap: &Snapshot) -> Vec<HostActual> {
    let mut hosts: Vec<HostActual> = snap
        .cluster
        .hosts
        .keys()
        .map(|h| HostActual {
            host: h.clone(),
            vms: vec![],
        })
        .collect();
    for spec in snap.vms.values() {
        let owner = flotilla::owner::owner(
            &spec.name,
            spec.host.as_deref(),
            snap.cluster.hosts.keys().map(String::as_str),
        )
        .unwrap();
        let h = hosts.iter_mut().find(|h| h.host == owner).unwrap();
        h.vms.push(built(spec, &snap.cluster.id));
    }
    hosts
}

pub fn save(path: &str, hosts: Vec<HostActual>) {
    let file = StateFile {
        format_version: StateFile::FORMAT_VERSION,
        hosts,
        in_flight: vec![],
    };
    std::fs::write(path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
}

impl Repo {
    pub fn commit_id(&self) -> String {
        git_out(&self.work, &["rev-parse", "HEAD"])
    }
}
