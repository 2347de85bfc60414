//! The conformance suite of the simulated desired repo: each test function runs against
//! `GitSource` over a real git repo (made with the `git` command line in a tempdir) and
//! against `SimSource` over a `SimRemote` inside a paused tokio runtime, pushing the same
//! trees. The stand-in earns its place in the simulation by passing the same assertions.
//! Guards issue 13, part 2 ("a git remote whose branch moves").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla::desired::{self, Entry, FileSet, Special};
use flotilla::source::{GitSource, Source};
use flotilla_lab::git_model::{self, Call, SimRemote, SimSource};

/// What a test does to the remote, the same way on both.
trait Remote {
    /// Commits `files` on top of the branch; returns the commit id.
    fn push(&mut self, files: &FileSet) -> String;
    /// Reverts the branch's last commit with a new one; returns its id.
    fn revert(&mut self) -> String;
    /// Points the branch at `commit`.
    fn force_push(&mut self, commit: &str);
    /// Makes the remote unreachable, or reachable again.
    fn set_down(&mut self, down: bool);
    /// A new clone for `host`, watching the branch when `watch`.
    fn clone_for(&mut self, host: &str, watch: bool) -> Box<dyn Source>;
}

/// A work repo on disk whose `main` the clones fetch.
struct Git {
    tmp: tempfile::TempDir,
    work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Git {
    fn new() -> Git {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        Git { tmp, work }
    }

    fn down_path(&self) -> PathBuf {
        self.tmp.path().join("work.down")
    }
}

impl Remote for Git {
    fn push(&mut self, files: &FileSet) -> String {
        for entry in std::fs::read_dir(&self.work).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            match std::fs::symlink_metadata(&path).unwrap().is_dir() {
                true => std::fs::remove_dir_all(&path).unwrap(),
                false => std::fs::remove_file(&path).unwrap(),
            }
        }
        let mut gitlinks = Vec::new();
        for (path, entry) in files.iter() {
            let at = self.work.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            match entry {
                Entry::Data(d) => std::fs::write(&at, d).unwrap(),
                Entry::NotRegular(Special::Symlink) => {
                    std::os::unix::fs::symlink(self.tmp.path().join("outside.yaml"), &at).unwrap()
                }
                Entry::NotRegular(Special::Submodule) => gitlinks.push(path.to_string()),
                other => panic!("git cannot hold {path}: {other:?}"),
            }
        }
        git(&self.work, &["add", "-A"]);
        for path in gitlinks {
            // A gitlink entry, as `git submodule add` leaves it, without a submodule.
            let info = format!("160000,{},{path}", "1".repeat(40));
            git(
                &self.work,
                &["update-index", "--add", "--cacheinfo", info.as_str()],
            );
        }
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", "push"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn revert(&mut self) -> String {
        git(&self.work, &["revert", "--no-edit", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn force_push(&mut self, commit: &str) {
        git(&self.work, &["reset", "-q", "--hard", commit]);
    }

    fn set_down(&mut self, down: bool) {
        let (from, to) = match down {
            true => (self.work.clone(), self.down_path()),
            false => (self.down_path(), self.work.clone()),
        };
        std::fs::rename(from, to).unwrap();
    }

    fn clone_for(&mut self, host: &str, watch: bool) -> Box<dyn Source> {
        let mut src =
            GitSource::open(self.work.to_str().unwrap(), &self.tmp.path().join(host)).unwrap();
        if watch {
            assert!(src.watch("main"));
        }
        Box::new(src)
    }
}

struct Sim {
    remote: SimRemote,
}

impl Sim {
    fn new() -> Sim {
        Sim {
            remote: SimRemote::new("main"),
        }
    }
}

impl Remote for Sim {
    fn push(&mut self, files: &FileSet) -> String {
        self.remote.push(files.clone())
    }

    fn revert(&mut self) -> String {
        self.remote.revert(1).unwrap()
    }

    fn force_push(&mut self, commit: &str) {
        assert!(self.remote.force_push(commit));
    }

    fn set_down(&mut self, down: bool) {
        self.remote.set_down(down);
    }

    fn clone_for(&mut self, host: &str, watch: bool) -> Box<dyn Source> {
        let mut src = self.remote.clone_for(host);
        if watch {
            assert!(src.watch());
        }
        Box::new(src)
    }
}

/// Declares `name` as a test against both remotes.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn git() {
                super::$name(&mut super::Git::new()).await;
            }
            #[tokio::test(start_paused = true)]
            async fn sim() {
                super::$name(&mut super::Sim::new()).await;
            }
        }
    };
}

const CLUSTER: &str = "cluster: lab\nhosts:\n  host1:\n    beanstalkd: 127.0.0.1:11301\n    limits: { memory: 16G, storage: 400G, vms: 16 }\n";

/// A valid desired tree with the VMs `names`, plus files the loader never reads.
fn tree(names: &[&str]) -> FileSet {
    let mut f = FileSet::new();
    f.insert("cluster.yaml", CLUSTER);
    f.insert("README.md", "not read\n");
    f.insert("docs/notes.md", "not read\n");
    for n in names {
        f.insert(
            format!("vms/team/{n}.yaml"),
            format!("name: {n}\nprofile: CS0\n"),
        );
    }
    f
}

/// What a source hands over of `files`: the desired tree only.
fn wanted(files: &FileSet) -> FileSet {
    let mut out = FileSet::new();
    for (p, e) in files.iter().filter(|(p, _)| FileSet::wanted(p)) {
        match e {
            Entry::Data(d) => out.insert(p, d.clone()),
            Entry::TooLarge(n) => out.insert_too_large(p, *n),
            Entry::NotRegular(k) => out.insert_not_regular(p, *k),
        }
    }
    out
}

/// The VM names of a valid read, or the `file:line:col: message` of each error.
fn load(files: &FileSet) -> Result<Vec<String>, Vec<String>> {
    match desired::load(files, None) {
        Ok(s) => Ok(s.vms.keys().cloned().collect()),
        Err(desired::Invalid(d)) => Err(d
            .iter()
            .map(|d| format!("{}:{}:{}: {}", d.file, d.line, d.column, d.message))
            .collect()),
    }
}

async fn fetched(src: &dyn Source) -> String {
    src.fetch().await.unwrap();
    src.resolve("main").await.unwrap()
}

both!(fetches_resolves_and_reads);
async fn fetches_resolves_and_reads(r: &mut dyn Remote) {
    let files = tree(&["L023", "L024"]);
    let c1 = r.push(&files);
    let src = r.clone_for("host1", false);
    // Nothing fetched yet: the clone knows no branch.
    assert!(matches!(
        src.resolve("main").await,
        Err(flotilla::source::SourceError::RefNotFound(_))
    ));
    assert_eq!(fetched(&*src).await, c1);
    assert_eq!(c1.len(), 40);
    assert!(c1.chars().all(|c| c.is_ascii_hexdigit()));
    for name in ["HEAD", "", "refs/heads/main", c1.as_str()] {
        assert_eq!(src.resolve(name).await.unwrap(), c1, "{name:?}");
    }
    assert!(matches!(
        src.resolve("nope").await,
        Err(flotilla::source::SourceError::RefNotFound(_))
    ));
    let read = src.read(&c1).await.unwrap();
    assert_eq!(read, wanted(&files));
    assert!(read.get("README.md").is_none());
    assert_eq!(load(&read).unwrap(), ["L023", "L024"]);
    // A commit the clone does not have, and text that is no commit id.
    assert!(src.read(&"0".repeat(40)).await.is_err());
    assert!(src.read("main").await.is_err());
}

both!(follows_a_moving_branch);
async fn follows_a_moving_branch(r: &mut dyn Remote) {
    let c1 = r.push(&tree(&["L023"]));
    let src = r.clone_for("host1", false);
    assert_eq!(fetched(&*src).await, c1);
    let c2 = r.push(&tree(&["L023", "L024"]));
    // Until it fetches, the clone stays where it was.
    assert_eq!(src.resolve("main").await.unwrap(), c1);
    assert!(src.read(&c2).await.is_err());
    assert_eq!(fetched(&*src).await, c2);
    let c3 = r.push(&tree(&["L024", "L025"]));
    assert_eq!(fetched(&*src).await, c3);
    assert_eq!(load(&src.read(&c1).await.unwrap()).unwrap(), ["L023"]);
    assert_eq!(
        load(&src.read(&c2).await.unwrap()).unwrap(),
        ["L023", "L024"]
    );
    assert_eq!(
        load(&src.read(&c3).await.unwrap()).unwrap(),
        ["L024", "L025"]
    );
    assert!(src.is_descendant(&c3, &c1).await.unwrap());
    assert!(src.is_descendant(&c2, &c1).await.unwrap());
    assert!(!src.is_descendant(&c1, &c2).await.unwrap());
    assert!(!src.is_descendant(&c2, &c2).await.unwrap());
    assert!(src.is_descendant(&c2, &"0".repeat(40)).await.is_err());
}

both!(a_revert_is_a_new_commit_with_the_old_files);
async fn a_revert_is_a_new_commit_with_the_old_files(r: &mut dyn Remote) {
    let c1 = r.push(&tree(&["L023", "L024"]));
    let c2 = r.push(&tree(&["L023"]));
    let c3 = r.revert();
    let src = r.clone_for("host1", false);
    assert_eq!(fetched(&*src).await, c3);
    assert_ne!(c3, c1);
    assert_eq!(src.read(&c3).await.unwrap(), src.read(&c1).await.unwrap());
    assert_eq!(
        load(&src.read(&c3).await.unwrap()).unwrap(),
        ["L023", "L024"]
    );
    assert!(src.is_descendant(&c3, &c2).await.unwrap());
}

both!(a_force_push_moves_the_branch_back);
async fn a_force_push_moves_the_branch_back(r: &mut dyn Remote) {
    let c1 = r.push(&tree(&["L023"]));
    let c2 = r.push(&tree(&["L023", "L024"]));
    let src = r.clone_for("host1", false);
    assert_eq!(fetched(&*src).await, c2);
    r.force_push(&c1);
    assert_eq!(fetched(&*src).await, c1);
    // The clone keeps what it fetched before.
    assert_eq!(
        load(&src.read(&c2).await.unwrap()).unwrap(),
        ["L023", "L024"]
    );
    let c3 = r.push(&tree(&["L025"]));
    assert_eq!(fetched(&*src).await, c3);
    assert!(src.is_descendant(&c3, &c1).await.unwrap());
    assert!(!src.is_descendant(&c3, &c2).await.unwrap());
    // A clone made after the force-push never sees the abandoned commit.
    let fresh = r.clone_for("host2", false);
    assert_eq!(fetched(&*fresh).await, c3);
    assert!(fresh.read(&c2).await.is_err());
    assert!(fresh.read(&c1).await.is_ok());
}

both!(an_unreachable_remote_keeps_the_last_fetched_commit);
async fn an_unreachable_remote_keeps_the_last_fetched_commit(r: &mut dyn Remote) {
    let c1 = r.push(&tree(&["L023"]));
    let src = r.clone_for("host1", false);
    assert_eq!(fetched(&*src).await, c1);
    let c2 = r.push(&tree(&["L024"]));
    r.set_down(true);
    assert!(src.fetch().await.is_err());
    assert_eq!(src.resolve("main").await.unwrap(), c1);
    assert_eq!(load(&src.read(&c1).await.unwrap()).unwrap(), ["L023"]);
    // A clone that never reached it has nothing.
    let empty = r.clone_for("host2", false);
    assert!(empty.fetch().await.is_err());
    assert!(empty.resolve("main").await.is_err());
    r.set_down(false);
    assert_eq!(fetched(&*src).await, c2);
}

both!(a_symlink_or_a_submodule_is_an_error_through_the_loader);
/// Guards issue 11, hole 4, in both sources: a VM file replaced by a symlink, or a
/// submodule in the tree, is an error, not a VM fewer.
async fn a_symlink_or_a_submodule_is_an_error_through_the_loader(r: &mut dyn Remote) {
    let base = tree(&["L023", "L024"]);
    let bad = git_model::not_regular(
        &git_model::not_regular(&base, "vms/team/L024.yaml", Special::Symlink),
        "vms/more",
        Special::Submodule,
    );
    let c1 = r.push(&bad);
    let src = r.clone_for("host1", false);
    assert_eq!(fetched(&*src).await, c1);
    let read = src.read(&c1).await.unwrap();
    assert_eq!(read, wanted(&bad));
    assert_eq!(
        load(&read).unwrap_err(),
        [
            "vms/more:1:1: a submodule, not a regular file",
            "vms/team/L024.yaml:1:1: a symlink, not a regular file",
        ]
    );
}

both!(a_push_wakes_a_watching_clone);
async fn a_push_wakes_a_watching_clone(r: &mut dyn Remote) {
    let src = r.clone_for("host1", true);
    let c1 = r.push(&tree(&["L023"]));
    // A bound for a failure, not a wait for "nothing happened": the watch must fire.
    tokio::time::timeout(Duration::from_secs(30), src.changed())
        .await
        .expect("a push to the watched branch wakes the clone");
    assert_eq!(fetched(&*src).await, c1);
}

/// The model alone: what a clone records, its latency and injected failures, and the
/// commit helpers the generator uses.
mod model {
    use super::*;

    /// A clone without a watch is not woken by a push.
    #[tokio::test(start_paused = true)]
    async fn an_unwatched_clone_is_not_woken() {
        let remote = SimRemote::new("main");
        let src = remote.clone_for("host1");
        remote.push(tree(&["L023"]));
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), src.changed())
                .await
                .is_err()
        );
    }

    /// A fetch costs its latency in virtual time; an injected failure keeps the last
    /// fetched commit; the record says what was fetched and handed out, and when.
    #[tokio::test(start_paused = true)]
    async fn records_fetches_and_reads_on_the_virtual_clock() {
        let start = tokio::time::Instant::now();
        let remote = SimRemote::new("main");
        let src: SimSource = remote.clone_for("host1");
        let c1 = remote.push(tree(&["L023"]));
        src.set_fetch_latency(Duration::from_secs(2));
        src.fetch().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        src.read(&c1).await.unwrap();
        let c2 = remote.push(tree(&["L024"]));
        src.fail_next_fetches(1);
        assert!(src.fetch().await.is_err());
        assert_eq!(src.fetched_tip(), Some(c1.clone()));
        src.fetch().await.unwrap();
        src.read(&c2).await.unwrap();
        let t = |s| start + Duration::from_secs(s);
        let calls: Vec<_> = src.calls().into_iter().map(|c| (c.at, c.what)).collect();
        assert_eq!(
            calls,
            [
                (
                    t(2),
                    Call::Fetched {
                        tip: Some(c1.clone())
                    }
                ),
                (t(2), Call::Read { commit: c1.clone() }),
                (t(4), Call::FetchFailed),
                (
                    t(6),
                    Call::Fetched {
                        tip: Some(c2.clone())
                    }
                ),
                (t(6), Call::Read { commit: c2.clone() }),
            ]
        );
        assert_eq!(src.handed_out(), [c1, c2]);
    }

    /// A fetch dropped before its latency ran out changes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_fetch_changes_nothing() {
        let remote = SimRemote::new("main");
        let src = remote.clone_for("host1");
        remote.push(tree(&["L023"]));
        src.set_fetch_latency(Duration::from_secs(5));
        assert!(tokio::time::timeout(Duration::from_secs(1), src.fetch())
            .await
            .is_err());
        assert_eq!(src.fetched_tip(), None);
        assert!(src.calls().is_empty());
    }

    /// Ids are the same in every run; reverting n commits brings back older files.
    #[test]
    fn ids_are_deterministic_and_reverts_go_back_n() {
        let make = || {
            let r = SimRemote::new("main");
            let a = r.push(tree(&["L023"]));
            let b = r.push(tree(&["L024"]));
            let c = r.push(tree(&["L025"]));
            (r, [a, b, c])
        };
        let (r, ids) = make();
        assert_eq!(ids, make().1);
        assert_eq!(
            r.history(),
            [ids[2].clone(), ids[1].clone(), ids[0].clone()]
        );
        let back = r.revert(2).unwrap();
        assert_eq!(r.files(&back), r.files(&ids[0]));
        assert_eq!(r.tip(), Some(back));
        assert!(r.revert(9).is_none());
        assert!(!r.force_push(&"f".repeat(40)));
    }

    /// The generator's helpers: an empty commit loads with no VMs, a broken one and a
    /// symlinked one do not load.
    #[test]
    fn empty_broken_and_symlinked_commits() {
        let base = wanted(&tree(&["L023", "L024"]));
        assert_eq!(
            load(&git_model::empty_vms(&base)).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            load(&git_model::without(&base, "vms/team/L023.yaml")).unwrap(),
            ["L024"]
        );
        let broken = load(&git_model::broken(&base, "vms/team/L023.yaml")).unwrap_err();
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].starts_with("vms/team/L023.yaml:"), "{broken:?}");
        assert_eq!(
            load(&git_model::not_regular(
                &base,
                "vms/team/L023.yaml",
                Special::Symlink
            ))
            .unwrap_err(),
            ["vms/team/L023.yaml:1:1: a symlink, not a regular file"]
        );
    }
}
