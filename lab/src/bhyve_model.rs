//! `SimBhyve`: an in-memory vm-bhyve host ("place", one `$vm_dir`) for deterministic
//! simulations, implementing [`Backend`] with the results and [`BackendError`] variants
//! of [`VmBhyve`](flotilla::backend::VmBhyve) over the real script (as `vm-sim`
//! reproduces it; `tests/bhyve_conformance.rs` runs the same tests against both).
//!
//! # Time
//! Time is tokio's clock ([`tokio::time::Instant`]), so a paused runtime drives it.
//! Guests progress on the model's own timeline, not on the caller's future: a start
//! schedules "lock taken", "loader runs", "bhyve runs"; an ACPI stop schedules the
//! guest's exit. Each call first applies every scheduled event due by "now", so the
//! state machine is pure over the time it is given; killing the caller never stops a
//! guest.
//!
//! [`Backend`] is synchronous, and a sync call inside a paused runtime cannot sleep
//! (only an await lets tokio's clock move). So where `VmBhyve` waits (a slow `vm list`,
//! a start until `Running`, a stop until its timeout) the sync impl moves the place's
//! **floor** instead: model time is `max(tokio now, floor)`, and a wait of `d` sets the
//! floor `d` later and applies the events in between, in order. The result is what the
//! caller would have seen after waiting; the place's time never runs backwards, and
//! when tokio's clock passes the floor the two agree again. The later async seam wraps
//! the same steps ([`SimBhyve::vm_start`], [`SimBhyve::vm_stop`], ...) and awaits
//! `tokio::time::sleep_until` ([`SimBhyve::next_event_at`] says when the next thing
//! happens) instead of moving the floor, so no floor is needed there.
//!
//! # Semantics (vm-bhyve's, as recorded in the research notes)
//! - A start is not atomic: `vm start` checks the guest is stopped, then after
//!   `start_lock` its supervisor writes `run.lock` (`Locked (host)` for `locked`), runs
//!   the loader (`Bootloader` for `loader`) and bhyve (`Running`). A second start inside
//!   the window goes ahead too and, when it locks, destroys the vmm instance: the first
//!   guest dies (exit 137, recorded as [`CallKind::GuestKilled`]) and its supervisor's
//!   cleanup removes the lock, so the survivor runs without one.
//! - A guest killed with its supervisor ([`SimBhyve::kill_with_supervisor`]) leaves a
//!   stale vmm entry and a stale `run.lock`; [`SimBhyve::crash_host_of`] is the same
//!   after a reboot (the vmm entry is gone, the lock stays).
//! - `sim_ignore_acpi="yes"` in a guest's conf: it ignores ACPI and is powered off at
//!   the stop timeout; `sim_fail_boot="reason"`: its supervisor logs `fatal; reason`;
//!   missing `cpu` or `memory`: `vm start` refuses. (The same keys as `vm-sim`.)
//! - `sysrc vm_list` edits read, wait `sysrc_window`, then write: an operator's edit
//!   ([`SimBhyve::operator_vm_list_edit`]) that overlaps another loses one of them.
//!   flotilla's own edits take turns (as `VmBhyve` does with its lock) and read back.
//! - `vm list` takes `list_latency`; [`SimBhyve::fail_next_lists`] makes it fail.
//!   Markers are read before the listing, rows at its end, as `VmBhyve` does.
//! - `create` fails when the datastore is full ([`SimBhyve::set_datastore_full`]) or
//!   the new images do not fit in its capacity ([`SimBhyve::set_datastore_capacity`]).
//! - Operator-made VMs ([`SimBhyve::operator_create`]) carry [`Origin::Operator`].
//!
//! Every mutating call, and every guest killed by a second start, is recorded with the
//! place and the model time ([`SimBhyve::calls`]) for the simulation's oracle.
//!
//! # Known differences from `VmBhyve` over the real script
//! - One datastore (`default`, at the virtual path `vm_dir`); no ZFS, zvol, iSCSI or
//!   custom disks; `-d` other than `default` fails as an unknown datastore would.
//! - Error texts are built from the same variants, but `Command` errors carry a short
//!   stderr (`vm: ERROR: ...`) rather than the script's exact lines, and command lines
//!   start with `vm`, not the configured program path.
//! - Nothing is on disk: [`Backend::guest_dir`] returns a path that does not exist,
//!   [`Backend::watch_dirs`] is empty, hooks cannot run in it.
//! - Waits cost no poll calls ([`Backend::invocations`] counts one `vm list` per
//!   listing and one per settled wait, not per poll).
//! - A marker is stored as the JSON text written; a bad one is injected with
//!   [`SimBhyve::write_raw_marker`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use flotilla::actual::{ActualVm, Disk, Marker, RunState};
use flotilla::backend::vm_bhyve::{check_key, check_name, check_value};
use flotilla::backend::{Backend, BackendError, CreateSpec, StopOutcome};
use flotilla::conf::{self, Conf};
use flotilla::size::Size;

/// The text `vm init` installs as `default.conf` (shared with `vm-sim`).
pub use crate::sim::host::DEFAULT_TEMPLATE;

/// How slow the place is. [`Timing::realistic`] has `vm-sim`'s defaults (measured on the
/// real script); [`Timing::instant`] has no delays at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// From `vm start` until the supervisor writes `run.lock`.
    pub start_lock: Duration,
    /// `Locked (host)` before the loader runs.
    pub locked: Duration,
    /// `Bootloader (pid)` before bhyve runs.
    pub loader: Duration,
    /// How long a guest that honours ACPI takes to power off.
    pub shutdown: Duration,
    /// How long a `vm list` takes.
    pub list_latency: Duration,
    /// `sysrc`'s read-to-write window.
    pub sysrc_window: Duration,
    /// `VmBhyve`'s `poll_interval` (a stale vmm entry is confirmed after one).
    pub poll_interval: Duration,
    /// `VmBhyve`'s `start_timeout`.
    pub start_timeout: Duration,
    /// `VmBhyve`'s `lock_grace`.
    pub lock_grace: Duration,
}

impl Timing {
    /// `vm-sim`'s defaults with `VmBhyve`'s default patience.
    pub fn realistic() -> Timing {
        Timing {
            start_lock: Duration::from_millis(200),
            locked: Duration::from_millis(300),
            loader: Duration::from_millis(50),
            shutdown: Duration::from_millis(300),
            list_latency: Duration::from_millis(30),
            sysrc_window: Duration::from_millis(20),
            poll_interval: Duration::from_millis(500),
            start_timeout: Duration::from_secs(120),
            lock_grace: Duration::from_secs(10),
        }
    }

    /// No delays, short patience.
    pub fn instant() -> Timing {
        Timing {
            start_lock: Duration::ZERO,
            locked: Duration::ZERO,
            loader: Duration::ZERO,
            shutdown: Duration::ZERO,
            list_latency: Duration::ZERO,
            sysrc_window: Duration::ZERO,
            poll_interval: Duration::from_millis(20),
            start_timeout: Duration::from_secs(10),
            lock_grace: Duration::from_millis(300),
        }
    }
}

/// Who made a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Made through [`Backend::create`].
    Flotilla,
    /// Made by hand ([`SimBhyve::operator_create`]).
    Operator,
}

/// A mutating call (or a guest's death) as the oracle sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// [`Backend::create`].
    Create {
        /// The guest.
        name: String,
    },
    /// [`Backend::configure`].
    Configure {
        /// The guest.
        name: String,
    },
    /// A `vm start` that went ahead.
    Start {
        /// The guest.
        name: String,
    },
    /// A `vm stop` (ACPI) sent to a running guest.
    Stop {
        /// The guest.
        name: String,
    },
    /// A `vm poweroff`.
    Poweroff {
        /// The guest.
        name: String,
    },
    /// [`Backend::destroy`] of an existing guest.
    Destroy {
        /// The guest.
        name: String,
    },
    /// A `vm_list` edit by flotilla.
    Autostart {
        /// The guest.
        name: String,
        /// Added or removed.
        on: bool,
    },
    /// [`Backend::write_marker`].
    WriteMarker {
        /// The guest.
        name: String,
    },
    /// [`Backend::grow_disk`].
    GrowDisk {
        /// The guest.
        name: String,
    },
    /// [`Backend::install_template`].
    InstallTemplate {
        /// The template.
        name: String,
    },
    /// A running guest killed because a second start of it locked.
    GuestKilled {
        /// The guest.
        name: String,
    },
}

/// One record of [`SimBhyve::calls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The place's name.
    pub place: String,
    /// Model time of the call.
    pub at: Instant,
    /// What happened.
    pub call: CallKind,
    /// The guest's origin, when the call concerns a guest that exists.
    pub origin: Option<Origin>,
}

/// A guest's supervisor (`vm _run`), from `vm start` until it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Checked "not running", setting up, not locked yet.
    Pending,
    /// `run.lock` written, nothing running.
    Locked,
    /// The loader runs.
    Loader,
    /// bhyve runs.
    Running,
}

#[derive(Debug, Clone)]
struct Guest {
    conf: String,
    /// Image name -> apparent size.
    images: BTreeMap<String, u64>,
    marker: Option<String>,
    origin: Origin,
    /// Supervisors by generation (two while a second start races the first).
    runs: BTreeMap<u64, Phase>,
    /// The host in `run.lock`.
    lock: Option<String>,
    /// `/dev/vmm/NAME` exists without a live guest (stale).
    stale_vmm: bool,
    /// A `vm stop` was sent to the running guest.
    acpi: bool,
    log: Vec<String>,
    pid: u32,
}

impl Guest {
    fn conf(&self) -> Conf {
        Conf::parse(&self.conf)
    }

    fn live(&self) -> Option<(u64, Phase)> {
        self.runs
            .iter()
            .rev()
            .find(|(_, p)| matches!(p, Phase::Loader | Phase::Running))
            .map(|(g, p)| (*g, *p))
    }

    fn vmm_exists(&self) -> bool {
        self.stale_vmm || self.live().is_some()
    }

    fn state(&self) -> (RunState, String) {
        match self.live() {
            Some((_, Phase::Running)) => (RunState::Running, format!("Running ({})", self.pid)),
            Some(_) => (RunState::Bootloader, format!("Bootloader ({})", self.pid)),
            None => match &self.lock {
                Some(h) => (RunState::Locked, format!("Locked ({h})")),
                None => (RunState::Stopped, "Stopped".into()),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Lock(String, u64),
    Loader(String, u64),
    Bhyve(String, u64),
    Exit(String, u64),
    /// An operator's `sysrc vm_list` write lands: the list read earlier plus its change.
    VmListWrite(Vec<String>),
}

#[derive(Debug)]
struct Place {
    name: String,
    hostname: String,
    vm_dir: PathBuf,
    timing: Timing,
    floor: Option<Instant>,
    templates: BTreeMap<String, String>,
    guests: BTreeMap<String, Guest>,
    vm_list: Vec<String>,
    capacity: Option<u64>,
    full: bool,
    failing_lists: u32,
    events: BTreeMap<(Instant, u64), Event>,
    seq: u64,
    next_pid: u32,
    calls: Vec<Call>,
    invocations: BTreeMap<String, u64>,
}

impl Place {
    /// Model time: tokio's clock, never behind the floor; applies what is due.
    fn now(&mut self) -> Instant {
        let now = Instant::now().max(self.floor.unwrap_or_else(Instant::now));
        self.apply_until(now);
        self.floor = Some(now);
        now
    }

    /// A sync wait: the floor moves `d` on, and everything due meanwhile happens.
    fn pass(&mut self, d: Duration) -> Instant {
        let to = self.now() + d;
        self.apply_until(to);
        self.floor = Some(to);
        to
    }

    /// Waits until `done` holds or `within` passed, event by event; returns whether it
    /// held.
    fn wait_for(&mut self, within: Duration, mut done: impl FnMut(&Place) -> bool) -> bool {
        let deadline = self.now() + within;
        loop {
            if done(self) {
                return true;
            }
            match self.events.keys().next().map(|k| k.0) {
                Some(t) if t <= deadline => {
                    let now = self.now();
                    self.pass(t.saturating_duration_since(now));
                }
                _ => {
                    let now = self.now();
                    self.pass(deadline.saturating_duration_since(now));
                    return done(self);
                }
            }
        }
    }

    fn schedule(&mut self, at: Instant, e: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), e);
    }

    fn apply_until(&mut self, t: Instant) {
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > t {
                break;
            }
            let ((at, _), e) = entry.remove_entry();
            self.apply(at, e);
        }
    }

    fn record(&mut self, at: Instant, call: CallKind) {
        let name = match &call {
            CallKind::Create { name }
            | CallKind::Configure { name }
            | CallKind::Start { name }
            | CallKind::Stop { name }
            | CallKind::Poweroff { name }
            | CallKind::Destroy { name }
            | CallKind::Autostart { name, .. }
            | CallKind::WriteMarker { name }
            | CallKind::GrowDisk { name }
            | CallKind::GuestKilled { name } => Some(name.as_str()),
            CallKind::InstallTemplate { .. } => None,
        };
        let origin = name.and_then(|n| self.guests.get(n)).map(|g| g.origin);
        self.calls.push(Call {
            place: self.name.clone(),
            at,
            call,
            origin,
        });
    }

    fn count(&mut self, what: &str) {
        *self.invocations.entry(what.to_string()).or_default() += 1;
    }

    fn apply(&mut self, at: Instant, e: Event) {
        let hostname = self.hostname.clone();
        let timing = self.timing.clone();
        match e {
            Event::VmListWrite(list) => self.vm_list = list,
            Event::Lock(name, g) => {
                let Some(guest) = self.guests.get_mut(&name) else {
                    return;
                };
                if guest.runs.get(&g) != Some(&Phase::Pending) {
                    return;
                }
                guest.runs.insert(g, Phase::Locked);
                guest.lock = Some(hostname);
                // The supervisor destroys any vmm instance before making its own: an
                // earlier guest of this name dies, and its supervisor's cleanup removes
                // the lock the newer one just wrote.
                let victims: Vec<u64> = guest
                    .runs
                    .iter()
                    .filter(|(o, p)| **o != g && matches!(p, Phase::Loader | Phase::Running))
                    .map(|(o, _)| *o)
                    .collect();
                guest.stale_vmm = false;
                for v in &victims {
                    guest.runs.remove(v);
                    guest.log.push("bhyve exited with status 137".into());
                    guest.lock = None;
                }
                if !victims.is_empty() {
                    self.record(at, CallKind::GuestKilled { name: name.clone() });
                }
                self.schedule(at + timing.locked, Event::Loader(name, g));
            }
            Event::Loader(name, g) => {
                let pid = self.next_pid;
                let Some(guest) = self.guests.get_mut(&name) else {
                    return;
                };
                if guest.runs.get(&g) != Some(&Phase::Locked) {
                    return;
                }
                // Another guest of this name got its vmm instance first: this one cannot
                // make its own, and its supervisor gives up.
                if guest
                    .runs
                    .iter()
                    .any(|(o, p)| *o != g && matches!(p, Phase::Loader | Phase::Running))
                {
                    guest.log.push("vm_create: File exists".into());
                    guest.runs.remove(&g);
                    return;
                }
                if let Some(reason) = guest.conf().get("sim_fail_boot").map(str::to_string) {
                    guest.log.push(format!("fatal; {reason}"));
                    guest.runs.remove(&g);
                    guest.lock = None;
                    return;
                }
                guest.runs.insert(g, Phase::Loader);
                guest.pid = pid;
                self.next_pid += 1;
                self.schedule(at + timing.loader, Event::Bhyve(name, g));
            }
            Event::Bhyve(name, g) => {
                let pid = self.next_pid;
                let Some(guest) = self.guests.get_mut(&name) else {
                    return;
                };
                if guest.runs.get(&g) != Some(&Phase::Loader) {
                    return;
                }
                guest.runs.insert(g, Phase::Running);
                guest.acpi = false;
                guest.pid = pid;
                self.next_pid += 1;
                guest.log.push("starting bhyve".into());
            }
            Event::Exit(name, g) => {
                let Some(guest) = self.guests.get_mut(&name) else {
                    return;
                };
                if guest.runs.remove(&g).is_some() {
                    guest.log.push("bhyve exited with status 1".into());
                    guest.lock = None;
                    guest.acpi = false;
                }
            }
        }
    }

    fn guest(&self, name: &str) -> Result<&Guest, BackendError> {
        check_name("VM name", name)?;
        self.guests.get(name).ok_or_else(|| BackendError::NotFound {
            name: name.to_string(),
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.vm_dir.join(name)
    }

    fn used(&self) -> u64 {
        self.guests.values().flat_map(|g| g.images.values()).sum()
    }

    fn autostart(&self, name: &str) -> Option<u32> {
        self.vm_list
            .iter()
            .position(|n| n == name)
            .map(|p| p as u32 + 1)
    }

    fn actual(&self, name: &str, marker: Option<Marker>) -> Option<ActualVm> {
        let g = self.guests.get(name)?;
        let conf = g.conf();
        let mut disks = Vec::new();
        for n in 0.. {
            let Some(disk) = conf.get(&format!("disk{n}_name")).filter(|d| !d.is_empty()) else {
                break;
            };
            let dev = conf
                .get(&format!("disk{n}_dev"))
                .filter(|d| !d.is_empty())
                .unwrap_or("file")
                .to_string();
            let size = Size(g.images.get(disk).copied().unwrap_or(0));
            disks.push(Disk {
                name: disk.to_string(),
                dev,
                size,
            });
        }
        Some(ActualVm {
            name: name.to_string(),
            datastore: "default".into(),
            cpu: conf
                .get("cpu")
                .and_then(|c| c.trim().parse().ok())
                .unwrap_or(0),
            memory: conf
                .get("memory")
                .and_then(|m| m.parse().ok())
                .unwrap_or_default(),
            config: conf.to_map(),
            disks,
            state: g.state().0,
            autostart: self.autostart(name),
            marker,
        })
    }

    fn marker_of(&self, name: &str) -> Option<Marker> {
        self.guests
            .get(name)?
            .marker
            .as_ref()
            .and_then(|m| serde_json::from_str(m).ok())
    }

    /// `vm list`: its latency, then the rows of that moment; fails when told to.
    fn list_rows_done(&mut self) -> Result<(), BackendError> {
        self.count("vm list");
        let latency = self.timing.list_latency;
        self.pass(latency);
        if self.failing_lists > 0 {
            self.failing_lists -= 1;
            return Err(BackendError::Command {
                command: "vm list".into(),
                code: Some(1),
                stdout: String::new(),
                stderr: "vm: ERROR: the listing failed (injected)".into(),
            });
        }
        Ok(())
    }

    fn locked_error(&self, name: &str) -> BackendError {
        let host = self
            .guests
            .get(name)
            .and_then(|g| g.lock.clone())
            .unwrap_or_default();
        BackendError::Locked {
            name: name.to_string(),
            stale: host == self.hostname,
            host,
            lock: self.dir(name).join("run.lock"),
        }
    }

    fn state_of(&self, name: &str) -> Option<(RunState, String)> {
        self.guests.get(name).map(Guest::state)
    }

    /// `VmBhyve::settle_lock`: a lock of this host may be a start in progress.
    fn settle_lock(&mut self, name: &str) -> Result<(), BackendError> {
        let Some((RunState::Locked, _)) = self.state_of(name) else {
            return Ok(());
        };
        let ours = self.guests.get(name).and_then(|g| g.lock.as_deref()) == Some(&self.hostname);
        if !ours {
            return Err(self.locked_error(name));
        }
        let grace = self.timing.lock_grace;
        let n = name.to_string();
        if self.wait_for(grace, |p| {
            p.state_of(&n).is_none_or(|s| s.0 != RunState::Locked)
        }) {
            Ok(())
        } else {
            Err(self.locked_error(name))
        }
    }

    /// `vm start NAME` itself: checks, then lets a supervisor go. `Err(message)` is the
    /// `  ! ` line it would print.
    fn vm_start(&mut self, name: &str) -> Result<Option<u64>, String> {
        let now = self.now();
        self.count("vm start");
        let timing = self.timing.clone();
        let hostname = self.hostname.clone();
        let Some(g) = self.guests.get(name) else {
            return Err("unable to locate virtual machine".into());
        };
        if g.lock.as_ref().is_some_and(|h| *h != hostname) || g.vmm_exists() {
            return Err("guest appears to be running already".into());
        }
        let conf = g.conf();
        if conf.get("cpu").is_none_or(str::is_empty) || conf.get("memory").is_none_or(str::is_empty)
        {
            return Err("incomplete virtual machine configuration".into());
        }
        self.seq += 1;
        let gen = self.seq;
        if let Some(g) = self.guests.get_mut(name) {
            g.runs.insert(gen, Phase::Pending);
        }
        self.record(now, CallKind::Start { name: name.into() });
        self.schedule(now + timing.start_lock, Event::Lock(name.into(), gen));
        Ok(Some(gen))
    }

    /// `vm stop NAME`: ACPI to a running guest, kills a loader. Returns whether there
    /// was anything to stop.
    fn vm_stop(&mut self, name: &str) -> bool {
        let now = self.now();
        self.count("vm stop");
        let shutdown = self.timing.shutdown;
        let Some(g) = self.guests.get_mut(name) else {
            return false;
        };
        let Some((gen, phase)) = g.live() else {
            return false;
        };
        let ignores = g.conf().yes("sim_ignore_acpi");
        g.acpi = true;
        self.record(now, CallKind::Stop { name: name.into() });
        match phase {
            Phase::Running if ignores => {}
            Phase::Running => self.schedule(now + shutdown, Event::Exit(name.into(), gen)),
            _ => self.schedule(now, Event::Exit(name.into(), gen)),
        }
        self.apply_until(now);
        true
    }

    /// `vm poweroff -f NAME`.
    fn vm_poweroff(&mut self, name: &str) -> bool {
        let now = self.now();
        self.count("vm poweroff");
        let Some((gen, _)) = self.guests.get(name).and_then(Guest::live) else {
            return false;
        };
        self.record(now, CallKind::Poweroff { name: name.into() });
        self.apply(now, Event::Exit(name.into(), gen));
        true
    }

    /// A `sysrc vm_list` edit by flotilla: read, window, write, read back.
    fn edit_vm_list(&mut self, name: &str, on: bool) -> Result<(), BackendError> {
        let command = format!("sysrc vm_list{}={name}", if on { "+" } else { "-" });
        for attempt in 0..5u32 {
            if attempt > 0 {
                let pi = self.timing.poll_interval;
                self.pass(pi * attempt);
            }
            if self.vm_list.iter().any(|v| v == name) == on {
                return Ok(());
            }
            let now = self.now();
            self.count("sysrc");
            let mut list = self.vm_list.clone();
            let window = self.timing.sysrc_window;
            self.pass(window);
            edit_words(&mut list, name, on);
            self.vm_list = list;
            self.record(
                now,
                CallKind::Autostart {
                    name: name.into(),
                    on,
                },
            );
            if self.vm_list.iter().any(|v| v == name) == on {
                return Ok(());
            }
        }
        Err(BackendError::Output {
            command,
            reason: format!(
                "vm_list still {} {name} after 5 edits",
                if on { "lacks" } else { "has" }
            ),
        })
    }

    fn conf_mut(&mut self, name: &str) -> Result<&mut Guest, BackendError> {
        self.guests
            .get_mut(name)
            .ok_or_else(|| BackendError::NotFound {
                name: name.to_string(),
            })
    }
}

fn edit_words(list: &mut Vec<String>, name: &str, on: bool) {
    let text = list.join(" ");
    let new = if on {
        conf::words_add(&text, name)
    } else {
        conf::words_remove(&text, name)
    };
    *list = new.split_whitespace().map(str::to_string).collect();
}

/// One in-memory vm-bhyve place. A cheap handle: clones share the place.
#[derive(Debug, Clone)]
pub struct SimBhyve {
    inner: Arc<Mutex<Place>>,
}

impl SimBhyve {
    /// A fresh place after `vm init` (the `default` template installed), named `place`,
    /// whose `run.lock` files say `hostname`.
    pub fn new(place: &str, hostname: &str, timing: Timing) -> SimBhyve {
        let place = Place {
            name: place.to_string(),
            hostname: hostname.to_string(),
            vm_dir: PathBuf::from(format!("/sim/{place}/vm")),
            timing,
            floor: None,
            templates: BTreeMap::from([("default".to_string(), DEFAULT_TEMPLATE.to_string())]),
            guests: BTreeMap::new(),
            vm_list: Vec::new(),
            capacity: None,
            full: false,
            failing_lists: 0,
            events: BTreeMap::new(),
            seq: 0,
            next_pid: 1000,
            calls: Vec::new(),
            invocations: BTreeMap::new(),
        };
        SimBhyve {
            inner: Arc::new(Mutex::new(place)),
        }
    }

    fn place(&self) -> MutexGuard<'_, Place> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hostname in this place's `run.lock` files.
    pub fn hostname(&self) -> String {
        self.place().hostname.clone()
    }

    /// The place's model time now (tokio's clock, or later after sync waits).
    pub fn now(&self) -> Instant {
        self.place().now()
    }

    /// When the next scheduled guest event happens, if any: what an async caller
    /// sleeps until.
    pub fn next_event_at(&self) -> Option<Instant> {
        self.place().events.keys().next().map(|k| k.0)
    }

    /// Lets `d` of model time pass (as a sync wait would), applying what falls due.
    pub fn pass(&self, d: Duration) {
        self.place().pass(d);
    }

    /// Every mutating call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.place().calls.clone()
    }

    /// The origin of a guest, if it exists.
    pub fn origin(&self, name: &str) -> Option<Origin> {
        self.place().guests.get(name).map(|g| g.origin)
    }

    /// The `STATE` column of a guest as `vm list` prints it now.
    pub fn state_text(&self, name: &str) -> Option<String> {
        let mut p = self.place();
        p.now();
        p.state_of(name).map(|s| s.1)
    }

    /// Whether `run.lock` exists.
    pub fn has_lock(&self, name: &str) -> bool {
        let mut p = self.place();
        p.now();
        p.guests.get(name).is_some_and(|g| g.lock.is_some())
    }

    /// The guest's `vm-bhyve.log` lines.
    pub fn log(&self, name: &str) -> Vec<String> {
        let mut p = self.place();
        p.now();
        p.guests
            .get(name)
            .map(|g| g.log.clone())
            .unwrap_or_default()
    }

    /// `vm_list` now.
    pub fn vm_list(&self) -> Vec<String> {
        let mut p = self.place();
        p.now();
        p.vm_list.clone()
    }

    /// The raw `vm start NAME` (returns at once; `Err` is its `  ! ` message).
    pub fn vm_start(&self, name: &str) -> Result<(), String> {
        self.place().vm_start(name).map(|_| ())
    }

    /// The raw `vm stop NAME` (returns at once); false when nothing was running.
    pub fn vm_stop(&self, name: &str) -> bool {
        self.place().vm_stop(name)
    }

    /// The raw `vm poweroff -f NAME`.
    pub fn vm_poweroff(&self, name: &str) -> bool {
        self.place().vm_poweroff(name)
    }

    // Fault hooks and operator actions.

    /// Kills the guest and its supervisor (`kill -9`): the vmm entry and `run.lock` stay.
    pub fn kill_with_supervisor(&self, name: &str) {
        let mut p = self.place();
        p.now();
        if let Some(g) = p.guests.get_mut(name) {
            let had = g.live().is_some();
            g.runs.clear();
            g.stale_vmm |= had;
        }
    }

    /// The host crashed and rebooted under the guest: `run.lock` stays, nothing runs.
    pub fn crash_host_of(&self, name: &str) {
        self.kill_with_supervisor(name);
        if let Some(g) = self.place().guests.get_mut(name) {
            g.stale_vmm = false;
        }
    }

    /// An operator removes `run.lock` by hand.
    pub fn remove_lock(&self, name: &str) {
        if let Some(g) = self.place().guests.get_mut(name) {
            g.lock = None;
        }
    }

    /// An operator writes `run.lock` naming `host`.
    pub fn write_lock(&self, name: &str, host: &str) {
        if let Some(g) = self.place().guests.get_mut(name) {
            g.lock = Some(host.to_string());
        }
    }

    /// `bhyvectl --destroy --vm=NAME`: removes a stale vmm entry.
    pub fn destroy_vmm(&self, name: &str) {
        if let Some(g) = self.place().guests.get_mut(name) {
            g.stale_vmm = false;
        }
    }

    /// Marks the datastore full (every create fails) or not.
    pub fn set_datastore_full(&self, full: bool) {
        self.place().full = full;
    }

    /// The datastore's capacity for disk images (apparent sizes); `None`: unlimited.
    pub fn set_datastore_capacity(&self, bytes: Option<u64>) {
        self.place().capacity = bytes;
    }

    /// The next `n` `vm list` calls fail.
    pub fn fail_next_lists(&self, n: u32) {
        self.place().failing_lists = n;
    }

    /// Changes the place's timing (latencies, windows).
    pub fn set_timing(&self, timing: Timing) {
        self.place().timing = timing;
    }

    /// An operator makes a VM by hand with `conf` as its `.conf` and the given images.
    pub fn operator_create(&self, name: &str, conf_text: &str, images: &[(&str, Size)]) {
        let mut p = self.place();
        p.guests.insert(
            name.to_string(),
            Guest {
                conf: conf_text.to_string(),
                images: images.iter().map(|(n, s)| (n.to_string(), s.0)).collect(),
                marker: None,
                origin: Origin::Operator,
                runs: BTreeMap::new(),
                lock: None,
                stale_vmm: false,
                acpi: false,
                log: Vec::new(),
                pid: 0,
            },
        );
    }

    /// An operator's `sysrc vm_list+=NAME` (or `-=`): it reads `vm_list` now and writes
    /// its version back after the sysrc window, overwriting whatever landed meanwhile.
    pub fn operator_vm_list_edit(&self, name: &str, on: bool) {
        let mut p = self.place();
        let now = p.now();
        let mut list = p.vm_list.clone();
        edit_words(&mut list, name, on);
        let at = now + p.timing.sysrc_window;
        p.schedule(at, Event::VmListWrite(list));
    }

    /// Writes `text` as the guest's marker file, valid or not.
    pub fn write_raw_marker(&self, name: &str, text: &str) {
        if let Some(g) = self.place().guests.get_mut(name) {
            g.marker = Some(text.to_string());
        }
    }

    /// Appends `line` to the guest's `.conf` (a hand edit).
    pub fn append_conf(&self, name: &str, line: &str) {
        if let Some(g) = self.place().guests.get_mut(name) {
            if !g.conf.ends_with('\n') && !g.conf.is_empty() {
                g.conf.push('\n');
            }
            g.conf.push_str(line);
        }
    }
}

fn cmd_err(command: String, stderr: &str) -> BackendError {
    BackendError::Command {
        command,
        code: Some(1),
        stdout: String::new(),
        stderr: format!("vm: ERROR: {stderr}\n"),
    }
}

impl Backend for SimBhyve {
    fn list(&self) -> Result<Vec<ActualVm>, BackendError> {
        let mut p = self.place();
        p.now();
        // Markers before the listing, rows at its end (see `marker_before_listing`).
        let markers: BTreeMap<String, Option<Marker>> = p
            .guests
            .keys()
            .map(|n| (n.clone(), p.marker_of(n)))
            .collect();
        p.list_rows_done()?;
        let names: Vec<String> = p.guests.keys().cloned().collect();
        Ok(names
            .iter()
            .filter_map(|n| p.actual(n, markers.get(n).cloned().flatten()))
            .collect())
    }

    fn identity_dir(&self) -> Result<Option<PathBuf>, BackendError> {
        Ok(Some(self.place().vm_dir.clone()))
    }

    fn invocations(&self) -> BTreeMap<String, u64> {
        self.place().invocations.clone()
    }

    fn read_config(&self, name: &str) -> Result<BTreeMap<String, String>, BackendError> {
        let mut p = self.place();
        p.now();
        Ok(p.guest(name)?.conf().to_map())
    }

    fn get(&self, name: &str) -> Result<Option<ActualVm>, BackendError> {
        check_name("VM name", name)?;
        let mut p = self.place();
        p.now();
        let marker = p.marker_of(name);
        p.list_rows_done()?;
        Ok(p.actual(name, marker))
    }

    fn create(&self, spec: &CreateSpec) -> Result<(), BackendError> {
        check_name("VM name", &spec.name)?;
        check_name("template name", &spec.template)?;
        let mut p = self.place();
        let now = p.now();
        if p.guests.contains_key(&spec.name) {
            return Err(BackendError::AlreadyExists {
                name: spec.name.clone(),
                path: p.dir(&spec.name),
            });
        }
        let mut command = "vm create".to_string();
        if let Some(ds) = &spec.datastore {
            check_name("datastore name", ds)?;
            command.push_str(&format!(" -d {ds}"));
        }
        command.push_str(&format!(" -t {}", spec.template));
        if let Some(s) = spec.disk_size {
            command.push_str(&format!(" -s {s}"));
        }
        if let Some(c) = spec.cpu {
            command.push_str(&format!(" -c {c}"));
        }
        if let Some(m) = spec.memory {
            command.push_str(&format!(" -m {m}"));
        }
        command.push_str(&format!(" {}", spec.name));
        p.count("vm create");
        if spec.datastore.as_deref().is_some_and(|d| d != "default") {
            let ds = spec.datastore.clone().unwrap_or_default();
            return Err(cmd_err(
                command,
                &format!("unable to load datastore - '{ds}'"),
            ));
        }
        let Some(template) = p.templates.get(&spec.template).cloned() else {
            let path = p.vm_dir.join(format!(".templates/{}.conf", spec.template));
            return Err(cmd_err(
                command,
                &format!("unable to find template {}", path.display()),
            ));
        };
        let tconf = Conf::parse(&template);
        if tconf.get("disk0_name").is_none_or(str::is_empty) {
            return Err(cmd_err(
                command,
                "template is missing disk0_name specification",
            ));
        }
        if p.full {
            return Err(cmd_err(
                command,
                "unable to copy template to virtual machine directory",
            ));
        }
        let mut text = template.clone();
        let set = |text: &mut String, k: &str, v: &str| {
            if let Ok(t) = conf::sysrc_set(text, k, v) {
                *text = t;
            }
        };
        p.seq += 1;
        let seq = p.seq;
        set(
            &mut text,
            "uuid",
            &format!("00000000-0000-4000-8000-{seq:012x}"),
        );
        let h = crate::sim::md5::hex(format!("{}:{}:0", p.name, spec.name).as_bytes());
        let mac = format!("58:9c:fc:0{}:{}:{}", &h[0..1], &h[1..3], &h[3..5]);
        set(&mut text, "network0_mac", &mac);
        if let Some(c) = spec.cpu {
            set(&mut text, "cpu", &c.to_string());
        }
        if let Some(m) = spec.memory {
            set(&mut text, "memory", &m.to_string());
        }
        let mut images = BTreeMap::new();
        let mut n = 0;
        while let Some(disk) = tconf
            .get(&format!("disk{n}_name"))
            .filter(|d| !d.is_empty())
        {
            let dev = tconf.get(&format!("disk{n}_dev")).unwrap_or("");
            if matches!(dev, "zvol" | "sparse-zvol") {
                return Err(cmd_err(
                    command,
                    &format!("failed to create new ZVOL {}/{disk} (no ZFS)", spec.name),
                ));
            }
            let mut size = tconf
                .get(&format!("disk{n}_size"))
                .unwrap_or("20G")
                .to_string();
            if n == 0 {
                if let Some(s) = spec.disk_size {
                    size = s.to_string();
                }
            }
            if !matches!(dev, "custom" | "iscsi") {
                let Ok(s) = size.parse::<Size>() else {
                    return Err(cmd_err(
                        command,
                        "failed to create sparse file for disk image",
                    ));
                };
                images.insert(disk.to_string(), s.0);
            }
            text = conf::sysrc_delete(&text, &format!("disk{n}_size")).0;
            n += 1;
        }
        let need: u64 = images.values().sum();
        if p.capacity.is_some_and(|c| p.used() + need > c) {
            return Err(cmd_err(
                command,
                "failed to create sparse file for disk image",
            ));
        }
        p.guests.insert(
            spec.name.clone(),
            Guest {
                conf: text,
                images,
                marker: None,
                origin: Origin::Flotilla,
                runs: BTreeMap::new(),
                lock: None,
                stale_vmm: false,
                acpi: false,
                log: Vec::new(),
                pid: 0,
            },
        );
        p.record(
            now,
            CallKind::Create {
                name: spec.name.clone(),
            },
        );
        Ok(())
    }

    fn configure(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<(), BackendError> {
        let mut p = self.place();
        let now = p.now();
        p.guest(name)?;
        for (k, v) in set {
            check_key(k)?;
            check_value(k, v)?;
        }
        for k in unset {
            check_key(k)?;
        }
        p.count("sysrc");
        let g = p.conf_mut(name)?;
        let dups = g.conf().duplicates();
        let mut text = g.conf.clone();
        for k in unset.iter().chain(set.keys().filter(|k| dups.contains(k))) {
            text = conf::sysrc_delete(&text, k).0;
        }
        for (k, v) in set {
            text = conf::sysrc_set(&text, k, v).map_err(|e| BackendError::Output {
                command: format!("sysrc -inqf {name}.conf {k}={v}"),
                reason: e.to_string(),
            })?;
        }
        g.conf = text;
        p.record(now, CallKind::Configure { name: name.into() });
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), BackendError> {
        let mut p = self.place();
        p.now();
        p.guest(name)?;
        if p.guests.get(name).is_some_and(|g| g.lock.is_some()) {
            p.settle_lock(name)?;
            match p.state_of(name).map(|s| s.0) {
                Some(RunState::Running) => return Ok(()),
                Some(RunState::Locked) => return Err(p.locked_error(name)),
                _ => {}
            }
        }
        let log_from = p.guests.get(name).map_or(0, |g| g.log.len());
        match p.vm_start(name) {
            Ok(_) => {}
            Err(m) if m == "guest appears to be running already" => {
                // `VmBhyve::stale_vmm_check`: stopped, unlocked, twice a poll apart.
                let pi = p.timing.poll_interval;
                p.pass(pi);
                let g = p.guest(name)?;
                if g.live().is_none() && g.lock.is_none() && g.stale_vmm {
                    return Err(BackendError::StaleVmm {
                        name: name.to_string(),
                    });
                }
            }
            Err(message) => {
                return Err(BackendError::StartRefused {
                    name: name.to_string(),
                    command: format!("vm start {name}"),
                    message,
                })
            }
        }
        let timeout = p.timing.start_timeout;
        let n = name.to_string();
        let running = p.wait_for(timeout, |p| {
            let Some(g) = p.guests.get(&n) else {
                return true;
            };
            g.state().0 == RunState::Running
                || g.log[log_from.min(g.log.len())..]
                    .iter()
                    .any(|l| l.contains("fatal;"))
        });
        p.count("vm info");
        let g = p.guest(name)?;
        let fatal: Vec<&str> = g.log[log_from.min(g.log.len())..]
            .iter()
            .filter(|l| l.contains("fatal;"))
            .map(String::as_str)
            .collect();
        if !fatal.is_empty() {
            return Err(BackendError::BootFailed {
                name: name.to_string(),
                log: fatal.join("; "),
            });
        }
        if running {
            return Ok(());
        }
        Err(BackendError::Timeout {
            name: name.to_string(),
            wanted: "Running",
            waited: timeout,
            last: g.state().1.to_lowercase(),
        })
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<StopOutcome, BackendError> {
        let mut p = self.place();
        p.now();
        p.guest(name)?;
        p.list_rows_done()?;
        p.settle_lock(name)?;
        match p.state_of(name).map(|s| s.0) {
            None => {
                return Err(BackendError::NotFound {
                    name: name.to_string(),
                })
            }
            Some(RunState::Stopped) => return Ok(StopOutcome::AlreadyStopped),
            Some(RunState::Locked) => return Err(p.locked_error(name)),
            Some(_) => {}
        }
        p.vm_stop(name);
        let n = name.to_string();
        let stopped = |p: &Place| p.state_of(&n).is_none_or(|s| s.0 == RunState::Stopped);
        if p.wait_for(timeout, stopped) {
            return Ok(StopOutcome::Shutdown);
        }
        p.vm_poweroff(name);
        if stopped(&p) {
            Ok(StopOutcome::PoweredOff)
        } else {
            Err(BackendError::Timeout {
                name: name.to_string(),
                wanted: "Stopped",
                waited: timeout,
                last: p.state_of(name).map(|s| s.1).unwrap_or_default(),
            })
        }
    }

    fn destroy(&self, name: &str) -> Result<(), BackendError> {
        check_name("VM name", name)?;
        let mut p = self.place();
        let now = p.now();
        p.list_rows_done()?;
        let Some((state, text)) = p.state_of(name) else {
            return Ok(());
        };
        match state {
            RunState::Stopped => {}
            RunState::Locked => return Err(p.locked_error(name)),
            RunState::Running | RunState::Bootloader => {
                return Err(BackendError::NotStopped {
                    name: name.to_string(),
                    state: text,
                })
            }
        }
        p.count("vm destroy");
        if p.guests.get(name).is_some_and(|g| g.stale_vmm) {
            return Err(cmd_err(
                format!("vm destroy -f {name}"),
                &format!("{name} appears to be running locally (vmm exists)"),
            ));
        }
        p.record(now, CallKind::Destroy { name: name.into() });
        p.guests.remove(name);
        if p.autostart(name).is_some() {
            p.edit_vm_list(name, false)?;
        }
        Ok(())
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), BackendError> {
        check_name("VM name", name)?;
        let mut p = self.place();
        p.now();
        p.edit_vm_list(name, on)
    }

    fn install_template(&self, name: &str, contents: &str) -> Result<(), BackendError> {
        check_name("template name", name)?;
        let mut p = self.place();
        let now = p.now();
        if p.templates.get(name).is_some_and(|t| t == contents) {
            return Ok(());
        }
        p.templates.insert(name.to_string(), contents.to_string());
        p.record(now, CallKind::InstallTemplate { name: name.into() });
        Ok(())
    }

    fn read_marker(&self, name: &str) -> Result<Option<Marker>, BackendError> {
        let mut p = self.place();
        p.now();
        let path = p.dir(name).join(Marker::FILE_NAME);
        match &p.guest(name)?.marker {
            None => Ok(None),
            Some(text) => serde_json::from_str(text)
                .map(Some)
                .map_err(|source| BackendError::Marker { path, source }),
        }
    }

    fn write_marker(&self, name: &str, marker: &Marker) -> Result<(), BackendError> {
        let mut p = self.place();
        let now = p.now();
        let path = p.dir(name).join(Marker::FILE_NAME);
        p.guest(name)?;
        let json = serde_json::to_string_pretty(marker)
            .map_err(|source| BackendError::Marker { path, source })?;
        p.conf_mut(name)?.marker = Some(json + "\n");
        p.record(now, CallKind::WriteMarker { name: name.into() });
        Ok(())
    }

    fn guest_dir(&self, name: &str) -> Result<PathBuf, BackendError> {
        let p = self.place();
        p.guest(name)?;
        Ok(p.dir(name))
    }

    fn grow_disk(&self, name: &str, disk: u32, size: Size) -> Result<(), BackendError> {
        let mut p = self.place();
        let now = p.now();
        p.guest(name)?;
        p.list_rows_done()?;
        let (state, text) = p.state_of(name).ok_or_else(|| BackendError::NotFound {
            name: name.to_string(),
        })?;
        if state != RunState::Stopped {
            return Err(BackendError::NotStopped {
                name: name.to_string(),
                state: text,
            });
        }
        let g = p.conf_mut(name)?;
        let conf = g.conf();
        let file = conf
            .get(&format!("disk{disk}_name"))
            .filter(|d| !d.is_empty())
            .ok_or_else(|| BackendError::Invalid {
                what: "disk".into(),
                reason: format!("`{name}` has no disk{disk}_name"),
            })?
            .to_string();
        let dev = conf.get(&format!("disk{disk}_dev")).unwrap_or("file");
        if !dev.is_empty() && dev != "file" {
            return Err(BackendError::Invalid {
                what: "disk".into(),
                reason: format!(
                    "disk{disk} of `{name}` is a {dev} device; only file images are grown"
                ),
            });
        }
        let current = g.images.get(&file).copied().unwrap_or(0);
        if size.0 < current {
            return Err(BackendError::Invalid {
                what: "disk size".into(),
                reason: format!(
                    "disk{disk} of `{name}` is {} and cannot shrink to {size}",
                    Size(current)
                ),
            });
        }
        g.images.insert(file, size.0);
        p.record(now, CallKind::GrowDisk { name: name.into() });
        Ok(())
    }
}
