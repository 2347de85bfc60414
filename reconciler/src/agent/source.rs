//! The source task: fetches the desired repo on an interval, at once on a trigger or a
//! file-system event, loads and validates it, and keeps the last good snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::desired::{self, Snapshot};
use crate::source::{self, GitSource};

use super::decide;
use super::events::EventKind;
use super::health::FetchEnd;
use super::metrics::Counter;
use super::pace::{Pace, Woke};
use super::state::{poll_interval, HostsFile, Shared};

fn write_hosts_file(
    state_dir: &std::path::Path,
    me: &str,
    snap: &Snapshot,
    departed: BTreeMap<String, String>,
) -> std::io::Result<()> {
    let me = me.to_string();
    let file = HostsFile {
        departed,
        cluster: snap.cluster.id.clone(),
        commit: snap.commit.clone(),
        me,
        hosts: snap
            .cluster
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
            .collect(),
    };
    crate::atomic::write(
        &state_dir.join(HostsFile::NAME),
        &serde_json::to_vec_pretty(&file).unwrap_or_default(),
    )
}

/// Records the hosts that left cluster.yaml between the last snapshot (or, after a
/// restart, the hosts file) and `snap`, with their last inventory, then rewrites the
/// hosts file.
fn note_departures(s: &Shared, snap: &Snapshot) -> std::io::Result<()> {
    let before: BTreeMap<String, String> = match s.snapshot() {
        Some(old) => old
            .cluster
            .hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
            .collect(),
        None => std::fs::read(s.cfg.state_dir.join(HostsFile::NAME))
            .ok()
            .and_then(|b| serde_json::from_slice::<HostsFile>(&b).ok())
            .map(|f| f.hosts)
            .unwrap_or_default(),
    };
    let now: BTreeMap<String, String> = snap
        .cluster
        .hosts
        .iter()
        .map(|(n, h)| (n.clone(), h.beanstalkd.clone()))
        .collect();
    let last = s
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut departed = s.departed.lock().unwrap_or_else(|p| p.into_inner());
    let left = departed.hosts_changed(&before, &now, snap.commit.as_deref(), s.me(), &last)?;
    let addrs = departed
        .hosts()
        .iter()
        .map(|(h, d)| (h.clone(), d.addr.clone()))
        .collect();
    drop(departed);
    for host in left {
        s.event(
            EventKind::Departed,
            None,
            None,
            snap.commit.as_deref(),
            format!("host `{host}` left cluster.yaml; the VMs its last inventory shows are not created elsewhere until it shows them gone or `flotilla host forget {host}`"),
        );
    }
    write_hosts_file(&s.cfg.state_dir, s.me(), snap, addrs)
}

/// A local path (or file:// URL) of the desired repo, for the file-system watch.
fn local_repo(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.contains("://") || path.contains('@') {
        return None;
    }
    let p = PathBuf::from(path);
    let git = p.join(".git");
    Some(if git.is_dir() { git } else { p })
}

/// What one fetch found.
enum Fetched {
    Unchanged,
    Good(Box<Snapshot>),
    Invalid(String, String, crate::message::DesiredError),
}

fn fetch_and_load(src: &GitSource, branch: &str, last: Option<&str>) -> Result<Fetched, String> {
    let fetched = src.fetch();
    // A remote that is down still leaves the last fetched commit in the clone.
    let oid = match (src.resolve(branch), &fetched) {
        (Ok(oid), _) => oid,
        (Err(e), Ok(())) => return Err(format!("{e}")),
        (Err(_), Err(e)) => return Err(format!("{e}")),
    };
    let commit = oid.to_string();
    let fetch_error = fetched.err().map(|e| e.to_string());
    if last == Some(commit.as_str()) {
        return match fetch_error {
            Some(e) => Err(e),
            None => Ok(Fetched::Unchanged),
        };
    }
    let files = src.read(oid).map_err(|e| e.to_string())?;
    match desired::load(&files, Some(commit.clone())) {
        Ok(s) => Ok(Fetched::Good(Box::new(s))),
        Err(invalid) => {
            let text = invalid
                .0
                .iter()
                .take(5)
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            let first = invalid.0.first();
            let error = crate::message::DesiredError {
                commit: commit.clone(),
                file: first.map(|d| d.file.clone()).unwrap_or_default(),
                line: first.map_or(0, |d| d.line),
                column: first.map_or(0, |d| d.column),
                message: first.map(|d| d.message.clone()).unwrap_or_default(),
                errors: invalid.0.len(),
            };
            Ok(Fetched::Invalid(commit, text, error))
        }
    }
}

pub(super) async fn source_loop(shared: Arc<Shared>) {
    let url = shared.cfg.desired.url.clone();
    let dir = source::cache_dir(&shared.cfg.state_dir.join("git"), &url);
    let mut src = None;
    let mut last: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut pace = Pace::new(Duration::from_millis(500), Duration::from_secs(60));
    // Local repos are watched, so a commit is seen at once.
    let watch = shared.cfg.desired.watch;
    // Only a write of the branch's ref is news (issue 12, item 4): the agent's own fetch
    // opens files under `.git`, and a watch woken by that fetched and reconciled without
    // end.
    let branch_ref = PathBuf::from("refs/heads").join(&shared.cfg.desired.branch);
    let _watcher = local_repo(&url).filter(|_| watch).and_then(|path| {
        use notify::Watcher;
        let s = shared.clone();
        let refs = branch_ref.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let news = res.is_ok_and(|ev| {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev
                        .paths
                        .iter()
                        .any(|p| p.ends_with(&refs) || p.ends_with("packed-refs"))
            });
            if news {
                s.wake_fetch.notify_one();
            }
        })
        .ok()?;
        // The refs, not the objects: a commit writes many objects and one ref.
        w.watch(&path.join("refs/heads"), notify::RecursiveMode::Recursive)
            .ok()?;
        w.watch(&path, notify::RecursiveMode::NonRecursive).ok()?;
        Some(w)
    });
    // Whether this fetch was asked for (a trigger or a file-system event).
    let mut woken = false;
    loop {
        let s = shared.clone();
        let branch = shared.cfg.desired.branch.clone();
        let url2 = url.clone();
        let dir2 = dir.clone();
        let last2 = last.clone();
        let taken = src.take();
        let res = tokio::task::spawn_blocking(move || {
            let src = match taken {
                Some(s) => s,
                None => GitSource::open(&url2, &dir2).map_err(|e| (None, e.to_string()))?,
            };
            let r = fetch_and_load(&src, &branch, last2.as_deref());
            Ok::<_, (Option<GitSource>, String)>((src, r))
        })
        .await;
        let outcome = match res {
            Ok(Ok((g, r))) => {
                src = Some(g);
                r
            }
            Ok(Err((_, e))) => Err(e),
            Err(e) => Err(e.to_string()),
        };
        s.seen().fetch_ended(
            crate::message::now(),
            match &outcome {
                Ok(Fetched::Unchanged) => FetchEnd::Unchanged,
                Ok(Fetched::Good(_)) => FetchEnd::Loaded,
                Ok(Fetched::Invalid(commit, why, _)) => FetchEnd::Invalid(commit, why),
                Err(e) => FetchEnd::Failed(e),
            },
        );
        // Good: fetched, and the tip loads (an unchanged invalid tip is not).
        if outcome.is_ok() && s.seen().invalid_tip.is_none() {
            s.metrics.fetched(crate::message::now());
        }
        let poll = poll_interval(&s);
        let wait = match outcome {
            Ok(Fetched::Unchanged) => {
                last_error = None;
                if woken {
                    // A trigger asks for a pass even when the commit did not change.
                    s.wake_reconcile.notify_one();
                }
                pace.success(poll)
            }
            Ok(Fetched::Good(snap)) => {
                last_error = None;
                let commit = snap.commit.clone();
                last = commit.clone();
                s.local().desired_error = None;
                let listed = snap.cluster.hosts.contains_key(s.me());
                let was = s.local().left_cluster.clone();
                if !listed && was.is_none() {
                    // Safety rule 9: its guests stay where they are, and this agent goes
                    // on publishing them; it creates, changes and destroys nothing.
                    s.event(
                        EventKind::Error,
                        None,
                        None,
                        commit.as_deref(),
                        format!(
                            "this host `{}` left cluster.yaml at {}: it creates, changes and destroys nothing from now on, and its VMs stay as they are (the other hosts do not create them elsewhere until `flotilla host forget {}`)",
                            s.me(),
                            commit.as_deref().unwrap_or("?"),
                            s.me()
                        ),
                    );
                } else if listed && was.is_some() {
                    s.event(
                        EventKind::Snapshot,
                        None,
                        None,
                        commit.as_deref(),
                        format!("this host `{}` is in cluster.yaml again", s.me()),
                    );
                }
                s.local().left_cluster = if listed { None } else { commit.clone() };
                if let Some(c) = &commit {
                    let mut owners = s.owners.lock().unwrap_or_else(|p| p.into_inner());
                    // Loaded again from the git cache when needed (see `owners_at`).
                    if owners.len() > 256 {
                        owners.clear();
                    }
                    owners.insert(c.clone(), decide::CommitOwners::of(&snap));
                }
                if !listed && s.snapshot().is_some() {
                    // Its last snapshot as a member keeps its address, limits and cluster
                    // for the inventory it goes on publishing; the pass records the
                    // commit that removed it.
                    s.wake_reconcile.notify_one();
                } else if !listed {
                    // Started after it was removed: the snapshot serves for the cluster
                    // id; its address comes from the hosts file of its last membership.
                    s.snapshot.send_replace(Some(Arc::new(*snap)));
                    s.wake_reconcile.notify_one();
                } else {
                    s.event(
                        EventKind::Snapshot,
                        None,
                        None,
                        commit.as_deref(),
                        format!(
                            "desired state at {}: {} VMs",
                            commit.as_deref().unwrap_or("?"),
                            snap.vms.len()
                        ),
                    );
                    if let Err(e) = note_departures(&s, &snap) {
                        s.event(
                            EventKind::Error,
                            None,
                            None,
                            commit.as_deref(),
                            format!("cannot record the hosts that left cluster.yaml: {e}"),
                        );
                    }
                    s.snapshot.send_replace(Some(Arc::new(*snap)));
                    s.wake_reconcile.notify_one();
                }
                pace.success(poll)
            }
            Ok(Fetched::Invalid(commit, why, error)) => {
                last = Some(commit.clone());
                s.local().desired_error = Some(error);
                s.wake_publish.notify_one();
                s.count(Counter::SnapshotsInvalid);
                s.event(
                    EventKind::Error,
                    None,
                    None,
                    Some(&commit),
                    format!("desired state at {commit} is invalid; nothing from it is applied, the last good one is kept: {why}"),
                );
                // The fetch worked: the next one comes at the ordinary pace.
                pace.success(poll)
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    s.event(
                        EventKind::Error,
                        None,
                        None,
                        None,
                        format!("cannot fetch the desired repo {url}: {e}; keeping the last good desired state and retrying"),
                    );
                }
                last_error = Some(e);
                // A failed fetch waits out its backoff whatever wakes it.
                pace.error().min(poll)
            }
        };
        woken = false;
        match pace.wait(wait, &[&s.wake_fetch], &s.stop).await {
            Woke::Timer => {}
            Woke::News(_) => {
                // Coalesce a burst of file-system events into one fetch.
                tokio::time::sleep(Duration::from_millis(50)).await;
                woken = true;
            }
            Woke::Stopped => return,
        }
    }
}
