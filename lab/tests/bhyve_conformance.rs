//! The conformance suite of the in-memory vm-bhyve model: each test function runs
//! against `VmBhyve` driving the `vm-sim` process (the reference, itself checked against
//! the real script) and against `SimBhyve` inside a paused tokio runtime. The model earns
//! its place in the simulation by passing the same assertions. Guards issue 13, part 2
//! (the vm-bhyve stand-in "with the real script's behaviours").

mod vm_sim_support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla::actual::{Marker, RunState};
use flotilla::backend::{Backend, BackendError, CreateSpec, StopOutcome, VmBhyve};
use flotilla::size::Size;
use flotilla_lab::bhyve_model::{CallKind, Origin, SimBhyve, Timing};
use vm_sim_support::SimHost;

/// How slow the place is for one test.
#[derive(Clone, Copy)]
struct Slow {
    start_lock_ms: u64,
    locked_ms: u64,
}

const FAST: Slow = Slow {
    start_lock_ms: 0,
    locked_ms: 0,
};

/// What a test needs from a place besides the [`Backend`]: operator actions, faults
/// and raw `vm` commands.
trait Place {
    fn b(&self) -> &dyn Backend;
    fn hostname(&self) -> String;
    /// Lets `ms` of (real or model) time pass.
    fn pass(&self, ms: u64);
    /// `vm start NAME` itself: its last stdout line.
    fn raw_start(&self, name: &str) -> String;
    /// The `STATE` column.
    fn state(&self, name: &str) -> String;
    fn has_lock(&self, name: &str) -> bool;
    fn log(&self, name: &str) -> String;
    /// The host crashed under a running guest: `run.lock` stays, nothing runs.
    fn crash(&self, name: &str);
    /// `kill -9` of guest and supervisor, then an operator removes `run.lock`.
    fn kill9_unlock(&self, name: &str);
    fn write_lock(&self, name: &str, host: &str);
    fn bad_marker(&self, name: &str);
    fn append_conf(&self, name: &str, line: &str);
    /// Two operators run `sysrc vm_list+=` at once.
    fn two_operator_edits(&self, a: &str, b: &str);
    fn vm_list(&self) -> Vec<String>;
}

struct Proc {
    host: SimHost,
    b: VmBhyve,
}

impl Proc {
    fn new(slow: Slow) -> Proc {
        let host = SimHost::new();
        host.write(
            ".config/sim.conf",
            &format!(
                "stop_resend_ms=20\nshutdown_ms=100\nstart_lock_ms={}\nlocked_ms={}\nlist_delay_ms=0\nsysrc_window_ms=0\n",
                slow.start_lock_ms, slow.locked_ms
            ),
        );
        let b = host.backend();
        Proc { host, b }
    }
}

impl Place for Proc {
    fn b(&self) -> &dyn Backend {
        &self.b
    }
    fn hostname(&self) -> String {
        self.host.hostname.clone()
    }
    fn pass(&self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    fn raw_start(&self, name: &str) -> String {
        let out = self.host.vm(&["start", name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().last().unwrap_or("").to_string()
    }
    fn state(&self, name: &str) -> String {
        self.host.state(name)
    }
    fn has_lock(&self, name: &str) -> bool {
        self.host.path(&format!("{name}/run.lock")).exists()
    }
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.host.path(&format!("{name}/vm-bhyve.log"))).unwrap_or_default()
    }
    fn crash(&self, name: &str) {
        self.host.crash(name)
    }
    fn kill9_unlock(&self, name: &str) {
        self.host.kill9(name);
        std::fs::remove_file(self.host.path(&format!("{name}/run.lock"))).unwrap();
    }
    fn write_lock(&self, name: &str, host: &str) {
        self.host
            .write(&format!("{name}/run.lock"), &format!("{host}\n"));
    }
    fn bad_marker(&self, name: &str) {
        self.host
            .write(&format!("{name}/flotilla.json"), "{not json");
    }
    fn append_conf(&self, name: &str, line: &str) {
        self.host.append(&format!("{name}/{name}.conf"), line);
    }
    fn two_operator_edits(&self, a: &str, b: &str) {
        let rc = self.host.path(".config/rc.conf");
        let spawn = |name: &str| {
            Command::new(&self.host.sysrc)
                .args(["-f", rc.to_str().unwrap(), &format!("vm_list+={name}")])
                .envs(self.host.env())
                .env("VM_SIM_SYSRC_WINDOW_MS", "400")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut x, mut y) = (spawn(a), spawn(b));
        assert!(x.wait().unwrap().success() && y.wait().unwrap().success());
    }
    fn vm_list(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.host.path(".config/rc.conf")).unwrap_or_default();
        flotilla::conf::shell_get(&text, "vm_list")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

struct Model {
    sim: SimBhyve,
}

impl Model {
    fn new(slow: Slow) -> Model {
        let timing = Timing {
            start_lock: Duration::from_millis(slow.start_lock_ms),
            locked: Duration::from_millis(slow.locked_ms),
            shutdown: Duration::from_millis(100),
            sysrc_window: Duration::from_millis(400),
            ..Timing::instant()
        };
        Model {
            sim: SimBhyve::new("p1", "h1.sim", timing),
        }
    }
}

impl Place for Model {
    fn b(&self) -> &dyn Backend {
        &self.sim
    }
    fn hostname(&self) -> String {
        self.sim.hostname()
    }
    fn pass(&self, ms: u64) {
        self.sim.pass(Duration::from_millis(ms));
    }
    fn raw_start(&self, name: &str) -> String {
        match self.sim.vm_start(name) {
            Ok(()) => "  * booting...".into(),
            Err(m) => format!("  ! {m}"),
        }
    }
    fn state(&self, name: &str) -> String {
        self.sim.state_text(name).unwrap_or_default()
    }
    fn has_lock(&self, name: &str) -> bool {
        self.sim.has_lock(name)
    }
    fn log(&self, name: &str) -> String {
        self.sim.log(name).join("\n")
    }
    fn crash(&self, name: &str) {
        self.sim.crash_host_of(name)
    }
    fn kill9_unlock(&self, name: &str) {
        self.sim.kill_with_supervisor(name);
        self.sim.remove_lock(name);
    }
    fn write_lock(&self, name: &str, host: &str) {
        self.sim.write_lock(name, host)
    }
    fn bad_marker(&self, name: &str) {
        self.sim.write_raw_marker(name, "{not json")
    }
    fn append_conf(&self, name: &str, line: &str) {
        self.sim.append_conf(name, line)
    }
    fn two_operator_edits(&self, a: &str, b: &str) {
        self.sim.operator_vm_list_edit(a, true);
        self.sim.operator_vm_list_edit(b, true);
        self.sim.pass(Duration::from_millis(500));
    }
    fn vm_list(&self) -> Vec<String> {
        self.sim.vm_list()
    }
}

/// Runs `test` against the model inside a paused current-thread runtime: the model's
/// time is tokio's paused clock, moved only by the model's own waits.
fn on_model(slow: Slow, test: impl FnOnce(&dyn Place)) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move { test(&Model::new(slow)) });
}

fn spec(name: &str) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        datastore: None,
        template: "default".into(),
        disk_size: Some(Size::mib(64)),
        cpu: None,
        memory: None,
    }
}

fn marker(job: &str) -> Marker {
    Marker {
        format_version: Marker::FORMAT_VERSION,
        cluster: "test".into(),
        job_id: job.into(),
        spec_hash: "h".into(),
        commit: "c".into(),
        owner: "h1".into(),
        protect: false,
        complete: true,
        placed_from: None,
    }
}

/// Declares `name` as a test against both places.
macro_rules! both {
    ($name:ident, $slow:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn vm_sim() {
                super::$name(&super::Proc::new($slow));
            }
            #[test]
            fn model() {
                super::on_model($slow, super::$name);
            }
        }
    };
}

fn lifecycle(p: &dyn Place) {
    let b = p.b();
    assert_eq!(b.list().unwrap(), vec![]);
    b.create(&CreateSpec {
        cpu: Some(2),
        memory: Some(Size::mib(512)),
        disk_size: Some(Size::gib(8)),
        ..spec("alpha")
    })
    .unwrap();
    let a = b.list().unwrap().remove(0);
    assert_eq!(
        (a.name.as_str(), a.datastore.as_str()),
        ("alpha", "default")
    );
    assert_eq!(
        (a.cpu, a.memory, a.state, a.autostart),
        (2, Size::mib(512), RunState::Stopped, None)
    );
    let disks: Vec<_> = a
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.dev.as_str(), d.size))
        .collect();
    assert_eq!(disks, vec![("disk0.img", "file", Size::gib(8))]);
    assert_eq!(
        a.config.get("loader").map(String::as_str),
        Some("bhyveload")
    );
    assert!(a.config.contains_key("uuid") && a.config.contains_key("network0_mac"));
    assert!(!a.config.contains_key("disk0_size"));
    assert_eq!(a.marker, None);
    assert_eq!(b.get("alpha").unwrap(), Some(a));
    assert_eq!(b.get("nosuch").unwrap(), None);

    let set = BTreeMap::from([
        ("cpu".to_string(), "4".to_string()),
        ("memory".to_string(), "1G".to_string()),
    ]);
    b.configure("alpha", &set, &["network0_switch".to_string()])
        .unwrap();
    let a = b.list().unwrap().remove(0);
    assert_eq!((a.cpu, a.memory), (4, Size::gib(1)));
    assert!(!a.config.contains_key("network0_switch"));
    assert_eq!(b.read_config("alpha").unwrap(), a.config);

    b.start("alpha").unwrap();
    assert_eq!(b.list().unwrap()[0].state, RunState::Running);
    b.start("alpha").unwrap();
    assert!(p.state("alpha").starts_with("Running ("));
    assert_eq!(
        b.stop("alpha", Duration::from_secs(5)).unwrap(),
        StopOutcome::Shutdown
    );
    assert_eq!(b.list().unwrap()[0].state, RunState::Stopped);
    assert!(!p.has_lock("alpha"));
    assert_eq!(
        b.stop("alpha", Duration::from_secs(5)).unwrap(),
        StopOutcome::AlreadyStopped
    );
    b.destroy("alpha").unwrap();
    assert_eq!(b.list().unwrap(), vec![]);
    b.destroy("alpha").unwrap();
}
both!(lifecycle, FAST);

fn errors_by_variant(p: &dyn Place) {
    let b = p.b();
    let err = b
        .create(&CreateSpec {
            template: "nosuch".into(),
            ..spec("alpha")
        })
        .unwrap_err();
    match &err {
        BackendError::Command {
            command,
            code,
            stderr,
            ..
        } => {
            assert!(
                command.ends_with("vm create -t nosuch -s 64M alpha"),
                "{command}"
            );
            assert_eq!(*code, Some(1));
            assert!(
                stderr.contains("ERROR: unable to find template"),
                "{stderr}"
            );
        }
        other => panic!("expected Command, got {other:?}"),
    }
    b.create(&spec("alpha")).unwrap();
    assert!(matches!(
        b.create(&spec("alpha")),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        b.create(&spec("-rf")),
        Err(BackendError::Invalid { .. })
    ));
    assert!(matches!(
        b.start("nosuch"),
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        b.stop("nosuch", Duration::from_secs(1)),
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        b.read_marker("nosuch"),
        Err(BackendError::NotFound { .. })
    ));
    b.start("alpha").unwrap();
    match b.destroy("alpha") {
        Err(BackendError::NotStopped { name, state }) => {
            assert_eq!(name, "alpha");
            assert!(state.starts_with("Running ("), "{state}");
        }
        other => panic!("expected NotStopped, got {other:?}"),
    }
    assert!(matches!(
        b.grow_disk("alpha", 0, Size::gib(1)),
        Err(BackendError::NotStopped { .. })
    ));
    b.stop("alpha", Duration::from_secs(5)).unwrap();
    b.destroy("alpha").unwrap();
}
both!(errors_by_variant, FAST);

fn acpi_ignoring_guest_is_powered_off(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("deaf")).unwrap();
    let set = BTreeMap::from([("sim_ignore_acpi".to_string(), "yes".to_string())]);
    b.configure("deaf", &set, &[]).unwrap();
    b.start("deaf").unwrap();
    assert_eq!(
        b.stop("deaf", Duration::from_millis(400)).unwrap(),
        StopOutcome::PoweredOff
    );
    assert_eq!(b.list().unwrap()[0].state, RunState::Stopped);
    assert!(!p.has_lock("deaf"));
}
both!(acpi_ignoring_guest_is_powered_off, FAST);

fn start_refusals_and_boot_failures(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    b.configure("alpha", &BTreeMap::new(), &["cpu".to_string()])
        .unwrap();
    match b.start("alpha") {
        Err(BackendError::StartRefused {
            message, command, ..
        }) => {
            assert_eq!(message, "incomplete virtual machine configuration");
            assert!(command.ends_with("vm start alpha"), "{command}");
        }
        other => panic!("expected StartRefused, got {other:?}"),
    }
    let set = BTreeMap::from([
        ("cpu".to_string(), "1".to_string()),
        (
            "sim_fail_boot".to_string(),
            "unable to locate firmware".to_string(),
        ),
    ]);
    b.configure("alpha", &set, &[]).unwrap();
    match b.start("alpha") {
        Err(BackendError::BootFailed { log, .. }) => {
            assert!(log.contains("fatal; unable to locate firmware"), "{log}")
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
    assert_eq!(p.state("alpha"), "Stopped");
}
both!(start_refusals_and_boot_failures, FAST);

fn a_crash_leaves_a_stale_lock_reported_not_removed(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    b.start("alpha").unwrap();
    p.crash("alpha");
    assert_eq!(b.list().unwrap()[0].state, RunState::Locked);
    assert_eq!(p.state("alpha"), format!("Locked ({})", p.hostname()));
    for result in [
        b.start("alpha").map(|_| ()),
        b.stop("alpha", Duration::from_secs(1)).map(|_| ()),
        b.destroy("alpha"),
    ] {
        match result {
            Err(BackendError::Locked {
                name,
                host,
                stale,
                lock,
                ..
            }) => {
                assert_eq!((name.as_str(), host, stale), ("alpha", p.hostname(), true));
                assert!(lock.ends_with("alpha/run.lock"), "{lock:?}");
            }
            other => panic!("expected a stale lock, got {other:?}"),
        }
        assert!(p.has_lock("alpha"), "the backend must not remove the lock");
    }
}
both!(a_crash_leaves_a_stale_lock_reported_not_removed, FAST);

fn a_lock_of_another_host_means_running_there(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    p.write_lock("alpha", "otherhost");
    match b.start("alpha") {
        Err(BackendError::Locked {
            host, stale: false, ..
        }) => assert_eq!(host, "otherhost"),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(matches!(
        b.destroy("alpha"),
        Err(BackendError::Locked { stale: false, .. })
    ));
}
both!(a_lock_of_another_host_means_running_there, FAST);

fn a_stale_vmm_entry_is_reported_by_name(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    b.start("alpha").unwrap();
    p.kill9_unlock("alpha");
    assert_eq!(p.state("alpha"), "Stopped");
    let err = b.start("alpha").unwrap_err();
    assert!(matches!(err, BackendError::StaleVmm { .. }), "{err:?}");
    assert!(
        err.to_string().contains("bhyvectl --destroy --vm=alpha"),
        "{err}"
    );
    // `vm destroy` refuses too (vmm exists).
    assert!(matches!(
        b.destroy("alpha"),
        Err(BackendError::Command { .. })
    ));
}
both!(a_stale_vmm_entry_is_reported_by_name, FAST);

fn autostart_follows_vm_list_and_destroy_clears_it(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    b.create(&spec("beta")).unwrap();
    b.set_autostart("beta", true).unwrap();
    b.set_autostart("alpha", true).unwrap();
    b.set_autostart("alpha", true).unwrap();
    let vms = b.list().unwrap();
    assert_eq!((vms[0].autostart, vms[1].autostart), (Some(2), Some(1)));
    b.set_autostart("beta", false).unwrap();
    assert_eq!(b.list().unwrap()[0].autostart, Some(1));
    b.destroy("alpha").unwrap();
    assert_eq!(p.vm_list(), Vec::<String>::new());
}
both!(autostart_follows_vm_list_and_destroy_clears_it, FAST);

fn two_operator_sysrc_edits_at_once_lose_one(p: &dyn Place) {
    p.two_operator_edits("alpha", "beta");
    assert_eq!(
        p.vm_list().len(),
        1,
        "one edit must be lost: {:?}",
        p.vm_list()
    );
}
both!(two_operator_sysrc_edits_at_once_lose_one, FAST);

fn markers_and_bad_markers(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    assert_eq!(b.read_marker("alpha").unwrap(), None);
    b.write_marker("alpha", &marker("job-1")).unwrap();
    assert_eq!(b.read_marker("alpha").unwrap(), Some(marker("job-1")));
    assert!(b.list().unwrap()[0].is_managed_by("test"));
    assert!(b.guest_dir("alpha").unwrap().ends_with("alpha"));
    p.bad_marker("alpha");
    assert!(matches!(
        b.read_marker("alpha"),
        Err(BackendError::Marker { .. })
    ));
    assert_eq!(b.list().unwrap()[0].marker, None);
}
both!(markers_and_bad_markers, FAST);

fn templates_drive_create_and_disks_grow(p: &dyn Place) {
    let b = p.b();
    let t = "loader=\"uefi\"\ncpu=2\nmemory=1G\ndisk0_type=\"nvme\"\ndisk0_name=\"disk0.img\"\ndisk0_size=\"2G\"\n\
             disk1_type=\"nvme\"\ndisk1_name=\"swap.img\"\ndisk1_size=\"512M\"\n";
    b.install_template("cs1", t).unwrap();
    b.install_template("cs1", t).unwrap();
    b.create(&CreateSpec {
        template: "cs1".into(),
        disk_size: None,
        ..spec("web")
    })
    .unwrap();
    let w = b.list().unwrap().remove(0);
    assert_eq!((w.cpu, w.memory), (2, Size::gib(1)));
    let sizes: Vec<_> = w.disks.iter().map(|d| (d.name.as_str(), d.size)).collect();
    assert_eq!(
        sizes,
        vec![("disk0.img", Size::gib(2)), ("swap.img", Size::mib(512))]
    );
    assert!(!w.config.contains_key("disk0_size"));
    b.grow_disk("web", 0, Size::gib(4)).unwrap();
    assert!(matches!(
        b.grow_disk("web", 0, Size::gib(1)),
        Err(BackendError::Invalid { .. })
    ));
    assert!(matches!(
        b.grow_disk("web", 5, Size::gib(1)),
        Err(BackendError::Invalid { .. })
    ));
    assert_eq!(b.list().unwrap()[0].disks[0].size, Size::gib(4));
}
both!(templates_drive_create_and_disks_grow, FAST);

fn configure_sees_through_duplicates_and_refuses_unreadable_values(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    p.append_conf("alpha", "cpu=7\n");
    let set = BTreeMap::from([("cpu".to_string(), "3".to_string())]);
    b.configure("alpha", &set, &[]).unwrap();
    assert_eq!(b.list().unwrap()[0].cpu, 3);
    for bad in ["a#b", "say \"hi\"", "$(reboot)"] {
        let set = BTreeMap::from([("graphics_res".to_string(), bad.to_string())]);
        assert!(
            matches!(
                b.configure("alpha", &set, &[]),
                Err(BackendError::Invalid { .. })
            ),
            "{bad}"
        );
    }
    let set = BTreeMap::from([("Loader".to_string(), "uefi".to_string())]);
    assert!(matches!(
        b.configure("alpha", &set, &[]),
        Err(BackendError::Invalid { .. })
    ));
}
both!(
    configure_sees_through_duplicates_and_refuses_unreadable_values,
    FAST
);

/// The start window: the lock comes `start_lock` after `vm start`, so a second start
/// half-way through it goes ahead and, when it locks, kills the first guest; the
/// survivor runs without a lock (the first supervisor's cleanup removed it).
fn two_starts_in_the_lock_window_kill_the_first_guest(p: &dyn Place) {
    let b = p.b();
    b.create(&spec("alpha")).unwrap();
    assert_eq!(p.raw_start("alpha"), "  * booting...");
    p.pass(600);
    assert!(
        !p.has_lock("alpha"),
        "the first start locked already: too slow a machine"
    );
    assert_eq!(p.raw_start("alpha"), "  * booting...");
    let mut waited = 0;
    while !p.log("alpha").contains("bhyve exited with status 137") && waited < 10_000 {
        p.pass(20);
        waited += 20;
    }
    assert!(
        p.log("alpha").contains("bhyve exited with status 137"),
        "{}",
        p.log("alpha")
    );
    let mut waited = 0;
    while (p.has_lock("alpha") || !p.state("alpha").starts_with("Running (")) && waited < 5_000 {
        p.pass(20);
        waited += 20;
    }
    assert!(!p.has_lock("alpha"));
    assert!(
        p.state("alpha").starts_with("Running ("),
        "{}",
        p.state("alpha")
    );
}
both!(
    two_starts_in_the_lock_window_kill_the_first_guest,
    super::Slow {
        start_lock_ms: 1200,
        locked_ms: 300
    }
);

// The model's own fault hooks and records, which the process simulator has no
// counterpart for.

fn model() -> SimBhyve {
    SimBhyve::new("p1", "h1.sim", Timing::realistic())
}

fn paused(test: impl FnOnce()) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move { test() });
}

/// A full datastore (or one too small for the images) fails a create with vm-bhyve's
/// error, and nothing is left behind.
#[test]
fn model_create_on_a_full_datastore_fails() {
    paused(|| {
        let m = model();
        m.set_datastore_full(true);
        assert!(matches!(
            m.create(&spec("va")),
            Err(BackendError::Command { .. })
        ));
        m.set_datastore_full(false);
        m.set_datastore_capacity(Some(Size::mib(100).0));
        m.create(&spec("va")).unwrap();
        assert!(matches!(
            m.create(&spec("vb")),
            Err(BackendError::Command { .. })
        ));
        assert_eq!(m.list().unwrap().len(), 1);
    });
}

/// A failing and a slow `vm list`: the listing takes model time and fails when told to.
#[test]
fn model_list_is_slow_and_can_fail() {
    paused(|| {
        let m = model();
        let t0 = m.now();
        m.list().unwrap();
        assert_eq!(m.now() - t0, Duration::from_millis(30));
        m.fail_next_lists(1);
        assert!(matches!(m.list(), Err(BackendError::Command { .. })));
        m.list().unwrap();
    });
}

/// Guests progress on model time, not on the caller: a raw start goes Stopped, Locked,
/// Bootloader, Running as tokio's paused clock moves, with nobody waiting on it.
#[test]
fn model_guests_progress_on_tokios_clock() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let m = model();
        m.create(&spec("va")).unwrap();
        m.vm_start("va").unwrap();
        let mut seen = vec![m.state_text("va").unwrap()];
        while let Some(at) = m.next_event_at() {
            tokio::time::sleep_until(at).await;
            let s = m.state_text("va").unwrap();
            let s = s.split(" (").next().unwrap_or_default().to_string();
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
        assert_eq!(seen, ["Stopped", "Locked", "Bootloader", "Running"]);
    });
}

/// Every mutating call is recorded with the place, the model time and the guest's
/// origin; an operator's VM is tagged as such, and a guest killed by a second start
/// shows up as its own record.
#[test]
fn model_records_calls_for_the_oracle() {
    paused(|| {
        let m = model();
        m.operator_create(
            "ops",
            "cpu=1\nmemory=1G\ndisk0_name=\"d.img\"\n",
            &[("d.img", Size::gib(1))],
        );
        m.create(&spec("va")).unwrap();
        m.start("va").unwrap();
        m.stop("va", Duration::from_secs(5)).unwrap();
        m.vm_start("va").unwrap();
        m.pass(Duration::from_millis(100));
        m.vm_start("va").unwrap();
        m.pass(Duration::from_secs(2));
        let calls = m.calls();
        assert!(calls.iter().all(|c| c.place == "p1"));
        assert!(calls.windows(2).all(|w| w[0].at <= w[1].at));
        let kinds: Vec<_> = calls.iter().map(|c| &c.call).collect();
        let a = || "va".to_string();
        assert_eq!(
            kinds,
            [
                &CallKind::Create { name: a() },
                &CallKind::Start { name: a() },
                &CallKind::Stop { name: a() },
                &CallKind::Start { name: a() },
                &CallKind::Start { name: a() },
            ],
            "the second start killed nothing yet: the first had not booted"
        );
        m.pass(Duration::from_secs(1));
        m.stop("va", Duration::from_secs(5)).unwrap();
        // A lock window longer than the boot: the second start locks after the first
        // guest runs, and kills it.
        m.set_timing(Timing {
            start_lock: Duration::from_millis(1200),
            ..Timing::realistic()
        });
        m.vm_start("va").unwrap();
        m.pass(Duration::from_millis(600));
        m.vm_start("va").unwrap();
        m.pass(Duration::from_secs(3));
        let killed: Vec<_> = m
            .calls()
            .into_iter()
            .filter(|c| matches!(c.call, CallKind::GuestKilled { .. }))
            .collect();
        assert_eq!(killed.len(), 1, "{killed:?}");
        assert_eq!(killed[0].origin, Some(Origin::Flotilla));
        assert!(m.state_text("va").unwrap().starts_with("Running ("));
        assert!(m.vm_start("va").is_err(), "runs already");
        assert_eq!(m.origin("ops"), Some(Origin::Operator));
        assert_eq!(m.origin("va"), Some(Origin::Flotilla));
    });
}

/// An operator's `sysrc vm_list+=` that read before flotilla's edit and writes after
/// it loses flotilla's entry: flotilla's read-back saw it, the drift comes later.
#[test]
fn model_an_operator_edit_overlapping_flotillas_loses_it() {
    paused(|| {
        let m = model();
        m.create(&spec("va")).unwrap();
        m.set_timing(Timing {
            sysrc_window: Duration::from_millis(400),
            ..Timing::realistic()
        });
        m.operator_vm_list_edit("ops", true);
        // flotilla's edit ends inside the operator's window only if its own window is
        // shorter; make it so.
        m.set_timing(Timing::realistic());
        m.set_autostart("va", true).unwrap();
        assert_eq!(m.vm_list(), ["va"]);
        m.pass(Duration::from_millis(400));
        assert_eq!(m.vm_list(), ["ops"]);
    });
}
