//! This host's listing, kept while nothing changes it (issue 12, item 4).
//!
//! `vm list` costs a fraction of a second per call with tens of guests, and every pass
//! and every inventory wanted one. As Kubernetes informers do, the agent lists, then
//! watches: every change made through its own backend makes the kept listing stale when
//! it begins and when it ends, a file-system watch of the vm_dir does the same for changes
//! made by anyone else (an operator's `vm`, a guest
//! that exits and drops its `run.lock`), and a full listing is taken anyway once the
//! kept one is `backend.list_interval` old, for what no watch sees. Without a working
//! watch nothing is kept and every caller lists.
//!
//! While the agent's own changes run, the watch sees mostly their own files (a booting
//! guest's log, lock and vmm): those events make nothing stale, since the end of each
//! change does. A listing taken during a change is kept until the next change begins or
//! ends: it shows that change half-way, as a fresh listing would a moment later, and the
//! usage view knows the builds in progress. So the passes and inventories of a build
//! list once per change, not once each.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::actual::{ActualVm, Marker};
use crate::backend::{Backend, BackendError, CreateSpec, StopOutcome};
use crate::size::Size;

/// The kept listing and what makes it stale.
#[derive(Default)]
pub struct Listing {
    /// Bumped by every change seen: a listing begun under another value is not kept.
    generation: AtomicU64,
    /// Changes running now through this agent's backend.
    changing: AtomicUsize,
    /// Set once the vm_dir watch runs; nothing is kept before.
    watched: AtomicBool,
    kept: Mutex<Option<(u64, Instant, Vec<ActualVm>)>>,
}

impl Listing {
    /// Something in the host's VMs may have changed.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The kept listing, if it is younger than `max_age` and nothing changed since.
    pub fn kept(&self, max_age: Duration) -> Option<Vec<ActualVm>> {
        if !self.watched.load(Ordering::SeqCst) {
            return None;
        }
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, at, vms) = kept.as_ref()?;
        (*generation == self.generation.load(Ordering::SeqCst) && at.elapsed() < max_age)
            .then(|| vms.clone())
    }

    /// Call before listing: the token [`Listing::keep`] wants.
    pub fn begin(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Keeps `vms`, listed after [`Listing::begin`] gave `token`, unless something
    /// changed meanwhile (a change of this agent began or ended, or the watch saw one).
    pub fn keep(&self, token: u64, vms: &[ActualVm]) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) == token {
            *kept = Some((token, Instant::now(), vms.to_vec()));
        }
    }

    /// The watch saw a change on disk: stale, unless this agent's own changes run, whose
    /// ends make it stale anyway.
    fn seen_on_disk(&self) {
        if self.changing.load(Ordering::SeqCst) == 0 {
            self.changed();
        }
    }

    /// Marks a change through the backend for as long as the guard lives.
    fn changing(&self) -> Changing<'_> {
        self.changing.fetch_add(1, Ordering::SeqCst);
        self.changed();
        Changing(self)
    }
}

struct Changing<'a>(&'a Listing);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.changed();
        self.0.changing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend that tells [`Listing`] of every change made through it.
pub struct Tracked {
    /// The backend doing the work.
    pub inner: Arc<dyn Backend>,
    /// The listing its changes make stale.
    pub listing: Arc<Listing>,
}

impl Backend for Tracked {
    fn list(&self) -> Result<Vec<ActualVm>, BackendError> {
        self.inner.list()
    }
    fn identity_dir(&self) -> Result<Option<PathBuf>, BackendError> {
        self.inner.identity_dir()
    }
    fn watch_dirs(&self) -> Result<Vec<PathBuf>, BackendError> {
        self.inner.watch_dirs()
    }
    fn invocations(&self) -> BTreeMap<String, u64> {
        self.inner.invocations()
    }
    fn read_config(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, BackendError> {
        self.inner.read_config(name)
    }
    fn get(&self, name: &str) -> Result<Option<ActualVm>, BackendError> {
        self.inner.get(name)
    }
    fn create(&self, spec: &CreateSpec) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.create(spec)
    }
    fn configure(
        &self,
        name: &str,
        set: &std::collections::BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.configure(name, set, unset)
    }
    fn start(&self, name: &str) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.start(name)
    }
    fn stop(&self, name: &str, timeout: Duration) -> Result<StopOutcome, BackendError> {
        let _c = self.listing.changing();
        self.inner.stop(name, timeout)
    }
    fn destroy(&self, name: &str) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.destroy(name)
    }
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.set_autostart(name, on)
    }
    fn install_template(&self, name: &str, contents: &str) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.install_template(name, contents)
    }
    fn read_marker(&self, name: &str) -> Result<Option<Marker>, BackendError> {
        self.inner.read_marker(name)
    }
    fn write_marker(&self, name: &str, marker: &Marker) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.write_marker(name, marker)
    }
    fn guest_dir(&self, name: &str) -> Result<PathBuf, BackendError> {
        self.inner.guest_dir(name)
    }
    fn grow_disk(&self, name: &str, disk: u32, size: Size) -> Result<(), BackendError> {
        let _c = self.listing.changing();
        self.inner.grow_disk(name, disk, size)
    }
}

/// Whether a file-system event under the vm_dir may change what `vm list` shows: not a
/// read, not a guest writing to its disk image, and not a line in a guest's
/// `vm-bhyve.log` (or its rotation): `vm list` reads none of them. A booting guest
/// writes its log after the start that booted it ended, and each line made the next
/// pass list the host again (issue 12, Measure).
fn relevant(ev: &notify::Event) -> bool {
    if matches!(ev.kind, notify::EventKind::Access(_)) {
        return false;
    }
    // A disk image made, removed or renamed is seen (the listing reads image sizes); a
    // guest writing into its image is not.
    let names = matches!(
        ev.kind,
        notify::EventKind::Create(_)
            | notify::EventKind::Remove(_)
            | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
    );
    ev.paths.is_empty()
        || ev.paths.iter().any(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (names || p.extension().and_then(|e| e.to_str()) != Some("img"))
                && name != "console"
                && !name.starts_with("vm-bhyve.log")
        })
}

/// Watches `dirs` (the datastores); each change calls `on_change` after marking the
/// listing stale. Returns the watcher, which must be kept alive, or why there is none
/// (then nothing is kept and every caller lists).
pub fn watch(
    listing: Arc<Listing>,
    dirs: &[PathBuf],
    on_change: impl Fn() + Send + 'static,
) -> Result<notify::RecommendedWatcher, String> {
    use notify::Watcher;
    if dirs.is_empty() {
        return Err("the backend names no directory to watch".into());
    }
    let l = listing.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match &res {
            // An error may mean lost events: the listing is stale then too.
            Err(_) => l.changed(),
            Ok(ev) if relevant(ev) => l.seen_on_disk(),
            Ok(_) => return,
        }
        on_change();
    })
    .map_err(|e| e.to_string())?;
    for d in dirs {
        w.watch(d, notify::RecursiveMode::Recursive)
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    listing.changed();
    listing.watched.store(true, Ordering::SeqCst);
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `vm list` does not read (a guest's log, disk image, console) makes nothing
    /// stale; its `.conf` and `run.lock` do.
    #[test]
    fn only_what_vm_list_reads_is_relevant() {
        let ev = |p: &str| {
            notify::Event::new(notify::EventKind::Modify(notify::event::ModifyKind::Any))
                .add_path(PathBuf::from(p))
        };
        assert!(!relevant(&ev("/vm/web1/vm-bhyve.log")));
        assert!(!relevant(&ev("/vm/web1/vm-bhyve.log.0.gz")));
        assert!(!relevant(&ev("/vm/web1/disk0.img")));
        // Found by `a_failed_change_leaves_the_vm_running_and_keeps_its_retry_time`: an
        // image replaced on disk went unseen until the next full listing.
        let made = notify::Event::new(notify::EventKind::Create(notify::event::CreateKind::Any))
            .add_path(PathBuf::from("/vm/web1/disk0.img"));
        assert!(relevant(&made));
        assert!(relevant(&ev("/vm/web1/run.lock")));
        assert!(relevant(&ev("/vm/web1/web1.conf")));
    }

    /// A listing begun before a change began or ended is never kept; one taken while a
    /// change runs is kept until it ends, and the watch's events meanwhile (the change's
    /// own files) do not drop it.
    #[test]
    fn a_listing_is_kept_only_when_nothing_changed_around_it() {
        let l = Listing::default();
        l.watched.store(true, Ordering::SeqCst);
        let t = l.begin();
        l.keep(t, &[]);
        assert!(l.kept(Duration::from_secs(60)).is_some());
        l.changed();
        assert!(l.kept(Duration::from_secs(60)).is_none());
        let t = l.begin();
        {
            let _c = l.changing();
            l.keep(t, &[]);
            assert!(l.kept(Duration::from_secs(60)).is_none(), "begun before");
            let t = l.begin();
            l.keep(t, &[]);
            l.seen_on_disk();
            assert!(
                l.kept(Duration::from_secs(60)).is_some(),
                "during the change"
            );
        }
        assert!(
            l.kept(Duration::from_secs(60)).is_none(),
            "the change ended"
        );
        let t = l.begin();
        l.keep(t, &[]);
        l.seen_on_disk();
        assert!(
            l.kept(Duration::from_secs(60)).is_none(),
            "someone else's change"
        );
        let t = l.begin();
        l.keep(t, &[]);
        assert!(l.kept(Duration::ZERO).is_none(), "too old");
    }
}
