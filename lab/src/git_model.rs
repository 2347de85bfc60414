//! `SimRemote` and `SimSource`: an in-memory desired repo whose branch moves, and the
//! hosts' clones of it, implementing [`Source`] with the results and [`SourceError`]s of
//! [`GitSource`](flotilla::source::GitSource) over a real repo
//! (`tests/source_conformance.rs` runs the same tests against both).
//!
//! # Model
//! - A commit is a [`FileSet`] (the loader's input, symlinks and submodules included as
//!   [`Special`] entries) with a parent and a 40-hex id. Ids are deterministic: the n-th
//!   commit of a remote has the same id in every run.
//! - The remote has one branch, which moves: [`SimRemote::push`] adds a commit on top,
//!   [`SimRemote::revert`] adds one whose files are those of an older commit (as `git
//!   revert` of the last commits would), [`SimRemote::force_push`] points the branch at
//!   any commit it has (history rewritten back). [`SimRemote::set_down`] makes it
//!   unreachable.
//! - A clone ([`SimRemote::clone_for`]) holds what its last good fetch saw: the branch's
//!   commit and every commit reachable from it, copied, so a later move of the remote
//!   does not change what the clone reads. A failed fetch keeps all of that, as a bare
//!   clone keeps its objects and refs. `read` works for any commit the clone has.
//! - A clone that watches ([`SimSource::watch`]) has [`Source::changed`] complete after
//!   each move of the branch, as `GitSource`'s file-system watch of the ref does.
//!
//! # Time and faults
//! Time is tokio's clock: a fetch waits the clone's latency
//! ([`SimSource::set_fetch_latency`]) before it reads the remote, so under a paused
//! runtime it costs virtual time, and a fetch dropped meanwhile changes nothing.
//! [`SimSource::fail_next_fetches`] makes fetches fail while the remote is up. No
//! randomness inside: a simulation draws latencies and failures from its seed.
//!
//! Every fetch and every read is recorded with the virtual time ([`SimSource::calls`]),
//! so an oracle knows which commits each host's agent was handed.
//!
//! # Known differences from `GitSource`
//! - No tags, one branch; `resolve` takes the branch (as `main`, `refs/heads/main` or
//!   `HEAD`) or a full commit id the clone has.
//! - A commit unknown to the clone reads as [`SourceError::UnknownCommit`], where git
//!   gives [`SourceError::Git`].
//! - A [`FileSet`] entry that git cannot hold (a FIFO, a file too large) is kept as given.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use flotilla::desired::{Entry, FileSet, Special};
use flotilla::source::{BoxFut, Source, SourceError};

/// The URL the simulated remote goes by in error texts.
pub const URL: &str = "sim://desired";

#[derive(Debug, Clone)]
struct Commit {
    parent: Option<String>,
    files: FileSet,
}

#[derive(Debug, Default)]
struct Remote {
    branch: String,
    tip: Option<String>,
    commits: BTreeMap<String, Commit>,
    down: bool,
    made: u64,
    watchers: Vec<Weak<Notify>>,
}

impl Remote {
    fn add(&mut self, files: FileSet) -> String {
        self.made += 1;
        let n = self.made.to_string();
        let parent = self.tip.clone();
        let id = format!(
            "{:016x}{:016x}{:08x}",
            flotilla::owner::weight(parent.as_deref().unwrap_or(""), &n),
            flotilla::owner::weight(&n, URL),
            self.made as u32
        );
        self.commits.insert(id.clone(), Commit { parent, files });
        self.moved(id.clone());
        id
    }

    fn moved(&mut self, tip: String) {
        self.tip = Some(tip);
        self.watchers.retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        });
    }

    /// The commits on the branch, newest first.
    fn history(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = self.tip.clone();
        while let Some(c) = at {
            at = self.commits.get(&c).and_then(|c| c.parent.clone());
            out.push(c);
        }
        out
    }
}

/// A simulated git remote with one branch (a cheap handle: clones share it).
#[derive(Debug, Clone)]
pub struct SimRemote {
    inner: Arc<Mutex<Remote>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimRemote {
    /// An empty remote (no commits yet) whose one branch is `branch`.
    pub fn new(branch: &str) -> SimRemote {
        SimRemote {
            inner: Arc::new(Mutex::new(Remote {
                branch: branch.to_string(),
                ..Remote::default()
            })),
        }
    }

    /// The branch's name.
    pub fn branch(&self) -> String {
        lock(&self.inner).branch.clone()
    }

    /// Commits `files` on top of the branch and moves the branch to it; returns its id.
    pub fn push(&self, files: FileSet) -> String {
        lock(&self.inner).add(files)
    }

    /// Commits on top of the branch the files of the commit `n` back (1: the tip's
    /// parent), as reverting the last `n` commits does; None when the branch has no
    /// commit `n` back.
    pub fn revert(&self, n: usize) -> Option<String> {
        let mut r = lock(&self.inner);
        let back = r.history().get(n)?.clone();
        let files = r.commits.get(&back)?.files.clone();
        Some(r.add(files))
    }

    /// Points the branch at `commit`, which the remote has (a force-push of an older or
    /// abandoned history); false when it has no such commit.
    pub fn force_push(&self, commit: &str) -> bool {
        let mut r = lock(&self.inner);
        if !r.commits.contains_key(commit) {
            return false;
        }
        r.moved(commit.to_string());
        true
    }

    /// Makes the remote unreachable (`true`) or reachable again.
    pub fn set_down(&self, down: bool) {
        lock(&self.inner).down = down;
    }

    /// Whether the remote is unreachable.
    pub fn is_down(&self) -> bool {
        lock(&self.inner).down
    }

    /// The commit the branch points at.
    pub fn tip(&self) -> Option<String> {
        lock(&self.inner).tip.clone()
    }

    /// The commits on the branch, newest first.
    pub fn history(&self) -> Vec<String> {
        lock(&self.inner).history()
    }

    /// The files of `commit` as they were committed (nothing filtered out).
    pub fn files(&self, commit: &str) -> Option<FileSet> {
        lock(&self.inner)
            .commits
            .get(commit)
            .map(|c| c.files.clone())
    }

    /// A new, empty clone for `host` (nothing fetched, no watch, no latency).
    pub fn clone_for(&self, host: &str) -> SimSource {
        SimSource {
            remote: self.clone(),
            host: host.to_string(),
            state: Arc::new(Mutex::new(CloneState::default())),
            news: None,
        }
    }
}

/// One thing a clone did, for the oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCall {
    /// When it ended (tokio's clock).
    pub at: Instant,
    /// What it was.
    pub what: Call,
}

/// What a clone did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A fetch that reached the remote, and the branch's commit it saw.
    Fetched {
        /// The branch's commit, None while the remote has none.
        tip: Option<String>,
    },
    /// A fetch that failed (the remote down, or an injected failure).
    FetchFailed,
    /// The files of a commit were handed out.
    Read {
        /// The commit.
        commit: String,
    },
}

#[derive(Debug, Default)]
struct CloneState {
    tip: Option<String>,
    commits: BTreeMap<String, Commit>,
    latency: Duration,
    fail_next: u32,
    calls: Vec<SourceCall>,
}

impl CloneState {
    fn record(&mut self, what: Call) {
        self.calls.push(SourceCall {
            at: Instant::now(),
            what,
        });
    }
}

/// A host's clone of a [`SimRemote`] (a cheap handle: clones of the handle share the
/// clone, so a test keeps one to look at while the agent holds another).
#[derive(Debug, Clone)]
pub struct SimSource {
    remote: SimRemote,
    host: String,
    state: Arc<Mutex<CloneState>>,
    news: Option<Arc<Notify>>,
}

impl SimSource {
    /// The host this clone belongs to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Watches the remote's branch, so that [`Source::changed`] completes after each of
    /// its moves from now on; returns true (a simulated remote is always "local").
    pub fn watch(&mut self) -> bool {
        let news = Arc::new(Notify::new());
        lock(&self.remote.inner)
            .watchers
            .push(Arc::downgrade(&news));
        self.news = Some(news);
        true
    }

    /// How long each fetch takes before it reads the remote.
    pub fn set_fetch_latency(&self, latency: Duration) {
        lock(&self.state).latency = latency;
    }

    /// Makes the next `n` fetches fail even while the remote is up.
    pub fn fail_next_fetches(&self, n: u32) {
        lock(&self.state).fail_next = n;
    }

    /// The branch's commit as of the last good fetch.
    pub fn fetched_tip(&self) -> Option<String> {
        lock(&self.state).tip.clone()
    }

    /// Every fetch and read so far, in order.
    pub fn calls(&self) -> Vec<SourceCall> {
        lock(&self.state).calls.clone()
    }

    /// The commits whose files were handed out, in order.
    pub fn handed_out(&self) -> Vec<String> {
        lock(&self.state)
            .calls
            .iter()
            .filter_map(|c| match &c.what {
                Call::Read { commit } => Some(commit.clone()),
                _ => None,
            })
            .collect()
    }

    async fn fetch_now(&self) -> Result<(), SourceError> {
        let latency = lock(&self.state).latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let remote = lock(&self.remote.inner);
        let mut state = lock(&self.state);
        if remote.down || state.fail_next > 0 {
            state.fail_next = state.fail_next.saturating_sub(1);
            state.record(Call::FetchFailed);
            return Err(SourceError::Failed {
                what: format!("fetching {URL}"),
                reason: "the remote cannot be reached".to_string(),
            });
        }
        // What git fetches: the commits reachable from the branch.
        let mut at = remote.tip.clone();
        while let Some(id) = at {
            if state.commits.contains_key(&id) {
                break;
            }
            let Some(c) = remote.commits.get(&id) else {
                break;
            };
            at = c.parent.clone();
            state.commits.insert(id, c.clone());
        }
        state.tip = remote.tip.clone();
        let tip = state.tip.clone();
        state.record(Call::Fetched { tip });
        Ok(())
    }

    fn resolve_now(&self, reference: &str) -> Result<String, SourceError> {
        let branch = self.remote.branch();
        let state = lock(&self.state);
        let r = if reference.is_empty() {
            "HEAD"
        } else {
            reference
        };
        let name = r.strip_prefix("refs/heads/").unwrap_or(r);
        if name == branch || name == "HEAD" {
            if let Some(tip) = &state.tip {
                return Ok(tip.clone());
            }
        } else if state.commits.contains_key(r) {
            return Ok(r.to_string());
        }
        Err(SourceError::RefNotFound(r.to_string()))
    }

    fn read_now(&self, commit: &str) -> Result<FileSet, SourceError> {
        let mut state = lock(&self.state);
        let files = match state.commits.get(commit) {
            Some(c) => keep(&c.files, |path, _| FileSet::wanted(path)),
            None => return Err(SourceError::UnknownCommit(commit.to_string())),
        };
        state.record(Call::Read {
            commit: commit.to_string(),
        });
        Ok(files)
    }

    fn descendant_now(&self, commit: &str, ancestor: &str) -> Result<bool, SourceError> {
        let state = lock(&self.state);
        for c in [commit, ancestor] {
            if !state.commits.contains_key(c) {
                return Err(SourceError::UnknownCommit(c.to_string()));
            }
        }
        let mut at = state.commits.get(commit).and_then(|c| c.parent.clone());
        while let Some(c) = at {
            if c == ancestor {
                return Ok(true);
            }
            at = state.commits.get(&c).and_then(|c| c.parent.clone());
        }
        Ok(false)
    }
}

impl Source for SimSource {
    fn fetch(&self) -> BoxFut<'_, Result<(), SourceError>> {
        Box::pin(self.fetch_now())
    }

    fn resolve<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<String, SourceError>> {
        Box::pin(std::future::ready(self.resolve_now(reference)))
    }

    fn read<'a>(&'a self, commit: &'a str) -> BoxFut<'a, Result<FileSet, SourceError>> {
        Box::pin(std::future::ready(self.read_now(commit)))
    }

    fn is_descendant<'a>(
        &'a self,
        commit: &'a str,
        ancestor: &'a str,
    ) -> BoxFut<'a, Result<bool, SourceError>> {
        Box::pin(std::future::ready(self.descendant_now(commit, ancestor)))
    }

    fn changed(&self) -> BoxFut<'_, ()> {
        match &self.news {
            Some(n) => Box::pin(n.notified()),
            None => Box::pin(std::future::pending()),
        }
    }
}

/// The entries of `files` for which `keep_it` holds.
fn keep(files: &FileSet, mut keep_it: impl FnMut(&str, &Entry) -> bool) -> FileSet {
    let mut out = FileSet::new();
    for (path, entry) in files.iter().filter(|(p, e)| keep_it(p, e)) {
        put(&mut out, path, entry.clone());
    }
    out
}

fn put(files: &mut FileSet, path: &str, entry: Entry) {
    match entry {
        Entry::Data(d) => files.insert(path, d),
        Entry::TooLarge(n) => files.insert_too_large(path, n),
        Entry::NotRegular(k) => files.insert_not_regular(path, k),
    }
}

/// `base` without `path`.
pub fn without(base: &FileSet, path: &str) -> FileSet {
    keep(base, |p, _| p != path)
}

/// `base` with no VM files at all (`vms/` empty): an "empty commit", which the planner's
/// prune guard must not read as "destroy every VM".
pub fn empty_vms(base: &FileSet) -> FileSet {
    keep(base, |p, _| !(p == "vms" || p.starts_with("vms/")))
}

/// `base` with `path` replaced by (or added as) YAML that does not parse: a broken
/// commit, which the loader refuses as a whole.
pub fn broken(base: &FileSet, path: &str) -> FileSet {
    let mut out = base.clone();
    out.insert(path, "name: [unclosed\n  profile: {\n");
    out
}

/// `base` with `path` replaced by (or added as) something other than a regular file,
/// e.g. a symlink or a submodule: the loader's rule makes that an error, where skipping
/// it would read as the removal of what the file held.
pub fn not_regular(base: &FileSet, path: &str, kind: Special) -> FileSet {
    let mut out = base.clone();
    out.insert_not_regular(path, kind);
    out
}
