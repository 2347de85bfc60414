//! The vm-bhyve backend driven against `vm-sim` through the real command line: each
//! test is one of vm-bhyve's quirks the backend must hide.

mod vm_sim_support;

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla::actual::{Marker, RunState};
use flotilla::backend::{Backend, BackendError, CreateSpec, StopOutcome, VmBhyve};
use flotilla::capacity::{fits, Exceeded, Limits, Usage};
use flotilla::size::Size;
use vm_sim_support::SimHost;

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

#[test]
fn lifecycle_create_list_configure_start_stop_destroy() {
    let host = SimHost::new();
    let b = host.backend();
    assert_eq!(b.list().unwrap(), vec![]);

    b.create(&CreateSpec {
        cpu: Some(2),
        memory: Some(Size::mib(512)),
        disk_size: Some(Size::gib(8)),
        ..spec("alpha")
    })
    .unwrap();
    let vms = b.list().unwrap();
    assert_eq!(vms.len(), 1);
    let a = &vms[0];
    assert_eq!(
        (a.name.as_str(), a.datastore.as_str()),
        ("alpha", "default")
    );
    assert_eq!(
        (a.cpu, a.memory, a.state, a.autostart),
        (2, Size::mib(512), RunState::Stopped, None)
    );
    assert_eq!(a.disks.len(), 1);
    assert_eq!(
        (
            a.disks[0].name.as_str(),
            a.disks[0].dev.as_str(),
            a.disks[0].size
        ),
        ("disk0.img", "file", Size::gib(8))
    );
    assert_eq!(
        a.config.get("loader").map(String::as_str),
        Some("bhyveload")
    );
    assert!(a.config.contains_key("uuid") && a.config.contains_key("network0_mac"));
    assert_eq!(a.marker, None);

    let set = BTreeMap::from([
        ("cpu".to_string(), "4".to_string()),
        ("memory".to_string(), "1G".to_string()),
    ]);
    b.configure("alpha", &set, &["network0_switch".to_string()])
        .unwrap();
    let a = b.list().unwrap().remove(0);
    assert_eq!((a.cpu, a.memory), (4, Size::gib(1)));
    assert!(!a.config.contains_key("network0_switch"));

    b.start("alpha").unwrap();
    assert_eq!(b.list().unwrap()[0].state, RunState::Running);
    b.start("alpha").unwrap(); // idempotent

    assert_eq!(
        b.stop("alpha", Duration::from_secs(5)).unwrap(),
        StopOutcome::Shutdown
    );
    assert_eq!(b.list().unwrap()[0].state, RunState::Stopped);
    assert_eq!(
        b.stop("alpha", Duration::from_secs(5)).unwrap(),
        StopOutcome::AlreadyStopped
    );

    b.destroy("alpha").unwrap();
    assert_eq!(b.list().unwrap(), vec![]);
    assert!(!host.path("alpha").exists());
    b.destroy("alpha").unwrap(); // idempotent
}

#[test]
fn stop_escalates_to_poweroff_when_the_guest_ignores_acpi() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("deaf")).unwrap();
    b.configure(
        "deaf",
        &BTreeMap::from([("sim_ignore_acpi".to_string(), "yes".to_string())]),
        &[],
    )
    .unwrap();
    b.start("deaf").unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        b.stop("deaf", Duration::from_millis(400)).unwrap(),
        StopOutcome::PoweredOff
    );
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert_eq!(b.list().unwrap()[0].state, RunState::Stopped);
}

#[test]
fn destroy_is_refused_while_running() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    b.start("alpha").unwrap();
    match b.destroy("alpha") {
        Err(BackendError::NotStopped { name, state }) => {
            assert_eq!(name, "alpha");
            assert!(state.starts_with("Running ("), "{state}");
        }
        other => panic!("expected NotStopped, got {other:?}"),
    }
    assert!(host.path("alpha/alpha.conf").exists());
    b.stop("alpha", Duration::from_secs(5)).unwrap();
    b.destroy("alpha").unwrap();
}

#[test]
fn a_stale_lock_of_this_host_is_reported_not_removed() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    b.start("alpha").unwrap();
    host.crash("alpha");
    assert_eq!(b.list().unwrap()[0].state, RunState::Locked);
    let lock = host.path("alpha/run.lock");
    for result in [
        b.start("alpha").map(|_| ()),
        b.stop("alpha", Duration::from_secs(1)).map(|_| ()),
        b.destroy("alpha"),
    ] {
        match result {
            Err(BackendError::Locked {
                name,
                host: h,
                stale,
                lock: l,
            }) => {
                assert_eq!(
                    (name.as_str(), h.as_str(), stale),
                    ("alpha", host.hostname.as_str(), true)
                );
                assert_eq!(l, lock);
            }
            other => panic!("expected a stale lock, got {other:?}"),
        }
        assert!(lock.exists(), "the backend must not remove the lock");
    }
    let msg = b.destroy("alpha").unwrap_err().to_string();
    assert!(
        msg.contains("stale run.lock") && msg.contains(&lock.display().to_string()),
        "{msg}"
    );
}

#[test]
fn a_lock_of_another_host_means_running_there() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    host.write("alpha/run.lock", "otherhost\n");
    match b.start("alpha") {
        Err(BackendError::Locked {
            host: h,
            stale: false,
            ..
        }) => assert_eq!(h, "otherhost"),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(matches!(
        b.destroy("alpha"),
        Err(BackendError::Locked { stale: false, .. })
    ));
}

#[test]
fn start_failures_hidden_behind_exit_code_zero_are_errors() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    // vm start refuses on stdout and exits 0.
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
    // _run fails after `vm start` said "booting...": only the log knows.
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
}

#[test]
fn start_waits_through_the_loader_stage() {
    let host = SimHost::new();
    host.write(
        ".config/sim.conf",
        "stop_resend_ms=20\nshutdown_ms=100\nstart_delay_ms=500\n",
    );
    let b = host.backend();
    b.create(&spec("slow")).unwrap();
    let t = std::time::Instant::now();
    b.start("slow").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert_eq!(b.list().unwrap()[0].state, RunState::Running);
}

#[test]
fn command_failures_carry_argv_exit_code_and_stderr() {
    let host = SimHost::new();
    let b = host.backend();
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
    assert!(err.to_string().contains("exit code 1"));
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
}

#[test]
fn garbage_from_vm_list_is_an_error_not_a_panic() {
    let host = SimHost::new();
    let fake = host.tmp.path().join("bin/fake-vm");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = datastore ]; then printf 'NAME TYPE PATH ZFS\\ndefault directory /x -\\n'; \
         else printf '\\377\\376 not a list\\n'; fi\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = host.config();
    cfg.vm = fake;
    let err = VmBhyve::new(cfg).list().unwrap_err();
    assert!(matches!(err, BackendError::Output { .. }), "{err:?}");
    let mut cfg = host.config();
    cfg.vm = host.tmp.path().join("bin/missing");
    assert!(matches!(
        VmBhyve::new(cfg).list(),
        Err(BackendError::Spawn { .. })
    ));
}

#[test]
fn autostart_follows_vm_list_and_destroy_clears_it() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    b.create(&spec("beta")).unwrap();
    b.set_autostart("beta", true).unwrap();
    b.set_autostart("alpha", true).unwrap();
    b.set_autostart("alpha", true).unwrap(); // idempotent
    let vms = b.list().unwrap();
    assert_eq!((vms[0].autostart, vms[1].autostart), (Some(2), Some(1)));
    b.set_autostart("beta", false).unwrap();
    assert_eq!(b.list().unwrap()[0].autostart, Some(1));
    b.destroy("alpha").unwrap();
    assert_eq!(host.read(".config/rc.conf"), "vm_list=\"\"\n");
}

#[test]
fn markers_are_written_atomically_and_bad_ones_mean_unmanaged() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    assert_eq!(b.read_marker("alpha").unwrap(), None);
    b.write_marker("alpha", &marker("job-1")).unwrap();
    assert_eq!(b.read_marker("alpha").unwrap(), Some(marker("job-1")));
    let a = b.list().unwrap().remove(0);
    assert!(a.is_managed_by("test"));
    assert_eq!(b.guest_dir("alpha").unwrap(), host.path("alpha"));
    let leftovers: Vec<_> = std::fs::read_dir(host.path("alpha"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    host.write("alpha/flotilla.json", "{not json");
    assert!(matches!(
        b.read_marker("alpha"),
        Err(BackendError::Marker { .. })
    ));
    assert_eq!(b.list().unwrap()[0].marker, None);
}

#[test]
fn templates_install_and_drive_create() {
    let host = SimHost::new();
    let b = host.backend();
    let t = "loader=\"uefi\"\ncpu=2\nmemory=1G\ndisk0_type=\"nvme\"\ndisk0_name=\"disk0.img\"\ndisk0_size=\"2G\"\n\
             disk1_type=\"nvme\"\ndisk1_name=\"swap.img\"\ndisk1_size=\"512M\"\n";
    b.install_template("cs1", t).unwrap();
    b.install_template("cs1", t).unwrap();
    assert_eq!(host.read(".templates/cs1.conf"), t);
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
    assert_eq!(b.list().unwrap()[0].disks[0].size, Size::gib(4));
}

#[test]
fn configure_sees_through_duplicate_keys_and_refuses_unreadable_values() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    // A hand edit left `cpu` twice: vm-bhyve reads the first, sysrc edits the last.
    host.append("alpha/alpha.conf", "cpu=7\n");
    b.configure(
        "alpha",
        &BTreeMap::from([("cpu".to_string(), "3".to_string())]),
        &[],
    )
    .unwrap();
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

#[test]
fn capacity_counts_every_vm_from_actual_state() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&CreateSpec {
        memory: Some(Size::mib(512)),
        disk_size: Some(Size::gib(10)),
        ..spec("alpha")
    })
    .unwrap();
    b.create(&CreateSpec {
        memory: Some(Size::gib(2)),
        disk_size: Some(Size::gib(20)),
        ..spec("beta")
    })
    .unwrap();
    b.write_marker("alpha", &marker("j")).unwrap(); // beta stays unmanaged
    b.start("alpha").unwrap();
    let used = Usage::of(&b.list().unwrap());
    assert_eq!(
        used,
        Usage {
            memory: Size::mib(2560),
            storage: Size::gib(30),
            vms: 2
        }
    );
    let limits = Limits {
        memory: Some(Size::gib(4)),
        storage: Some(Size::gib(100)),
        vms: Some(3),
    };
    assert_eq!(
        fits(
            used,
            Usage::default(),
            Usage::one(Size::gib(1), Size::gib(20)),
            &limits
        ),
        Ok(())
    );
    let err = fits(
        used,
        Usage::one(Size::gib(1), Size::gib(20)),
        Usage::one(Size::gib(1), Size::gib(20)),
        &limits,
    )
    .unwrap_err();
    assert_eq!(err.0.len(), 2);
    assert!(
        matches!(err.0[0], Exceeded::Memory { .. })
            && matches!(
                err.0[1],
                Exceeded::Vms {
                    needed: 4,
                    limit: 3
                }
            )
    );
}

#[test]
fn guests_in_other_datastores_are_found() {
    let host = SimHost::new();
    let ds2 = host.tmp.path().join("ds2");
    std::fs::create_dir(&ds2).unwrap();
    assert!(host
        .vm(&["datastore", "add", "ds2", ds2.to_str().unwrap()])
        .status
        .success());
    let b = host.backend();
    b.create(&CreateSpec {
        datastore: Some("ds2".into()),
        ..spec("far")
    })
    .unwrap();
    let f = b.list().unwrap().remove(0);
    assert_eq!(f.datastore, "ds2");
    assert_eq!(f.disks[0].size, Size::mib(64));
    assert_eq!(b.guest_dir("far").unwrap(), ds2.join("far"));
    b.start("far").unwrap();
    b.stop("far", Duration::from_secs(5)).unwrap();
    b.destroy("far").unwrap();
    assert!(!ds2.join("far").exists());
}

#[test]
fn a_conf_with_invalid_utf8_and_odd_lines_still_lists() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    let path = host.path("alpha/alpha.conf");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"# \xff\xfe junk\nnote=\xff\nMEMORY=9G\ncpu=9\n");
    std::fs::write(&path, bytes).unwrap();
    let a = b.list().unwrap().remove(0);
    assert_eq!(
        (a.cpu, a.memory),
        (1, Size::mib(256)),
        "first assignment wins, upper case ignored"
    );
    assert_eq!(a.config.get("note").map(String::as_str), Some("\u{fffd}"));
}

/// Guards issue 12, item 1: parallel creates each add their VM to `vm_list`; sysrc's
/// unlocked read-modify-write lost entries, and those guests stayed down after a
/// reboot. Every edit of the backend, from any clone in the process, takes its turn,
/// and an operator's entries and their order are kept.
#[test]
fn parallel_autostart_edits_all_land_and_keep_other_entries() {
    let host = SimHost::new();
    host.write(".config/rc.conf", "vm_list=\"ops1 ops2\"\n");
    let names: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
    for n in &names {
        host.vm(&["create", "-s", "1M", n]);
    }
    // sysrc's read-to-write window, long enough that unordered edits overlap.
    host.append(".config/sim.conf", "sysrc_window_ms=100\n");
    let b = host.backend();
    std::thread::scope(|s| {
        for n in &names {
            let b = b.clone();
            s.spawn(move || b.set_autostart(n, true).unwrap());
        }
    });
    let rc = host.read(".config/rc.conf");
    let list = rc
        .trim()
        .strip_prefix("vm_list=\"")
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{rc}"));
    let words: Vec<&str> = list.split_whitespace().collect();
    assert_eq!(&words[..2], &["ops1", "ops2"], "{rc}");
    for n in &names {
        assert!(words.contains(&n.as_str()), "{n} lost: {rc}");
    }
}

/// Guards issue 12, item 3: a stale vmm entry (guest killed with -9, run.lock removed)
/// makes `vm start` say the guest runs while `vm info` says stopped. The backend polled
/// until its timeout; it must name the state and what the operator runs, at once.
#[test]
fn start_on_a_stale_vmm_entry_is_reported_by_name_without_waiting() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("alpha")).unwrap();
    b.start("alpha").unwrap();
    host.kill9("alpha");
    std::fs::remove_file(host.path("alpha/run.lock")).unwrap();
    let t = std::time::Instant::now();
    let err = b.start("alpha").unwrap_err();
    assert!(
        matches!(err, BackendError::StaleVmm { .. }),
        "{err:?} after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        err.to_string().contains("bhyvectl --destroy --vm=alpha"),
        "{err}"
    );
}

/// Guards issue 12 (the scenario on the real script): a real `vm list` reads rc.conf's
/// `vm_list` when it starts and prints half a second later, and the markers were read
/// after it. A create that finished meanwhile (start, `vm_list`, then its complete
/// marker) was listed complete but without its autostart entry, and the owner planned
/// an update for 9 of 10 new VMs; a complete marker must never claim more than the
/// rows of the same listing show. A wrapper holds `vm list`'s output back until the
/// create's last steps are done, so the interleaving is certain, not timed.
#[test]
fn a_listing_never_shows_a_marker_newer_than_its_rows() {
    let host = SimHost::new();
    let wrapper = host.tmp.path().join("bin/vm-held");
    let listed = host.tmp.path().join("listed");
    let go = host.tmp.path().join("go");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nout=$(\"{vm}\" \"$@\"); rc=$?\n\
             if [ \"$1\" = list ]; then : > \"{listed}\"; while [ ! -e \"{go}\" ]; do sleep 0.01; done; fi\n\
             printf '%s\\n' \"$out\"; exit $rc\n",
            vm = host.vm.display(),
            listed = listed.display(),
            go = go.display(),
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let b = host.backend();
    b.create(&spec("fresh")).unwrap();
    b.write_marker(
        "fresh",
        &Marker {
            complete: false,
            ..marker("j1")
        },
    )
    .unwrap();
    b.start("fresh").unwrap();

    let held = VmBhyve::new(flotilla::backend::VmBhyveConfig {
        vm: wrapper,
        ..host.config()
    });
    let listing = std::thread::spawn(move || held.list());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !listed.exists() {
        assert!(std::time::Instant::now() < deadline, "vm list never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // `vm list` has printed its rows (running, not in vm_list); the create ends now.
    b.set_autostart("fresh", true).unwrap();
    b.write_marker("fresh", &marker("j1")).unwrap();
    std::fs::write(&go, "").unwrap();
    let vms = listing.join().unwrap().unwrap();
    let fresh = vms.iter().find(|v| v.name == "fresh").expect("listed");
    let complete = fresh.marker.as_ref().is_some_and(|m| m.complete);
    assert!(
        !complete || fresh.autostart.is_some(),
        "listed complete but not in vm_list: {fresh:?}"
    );
}

/// Guards issue 12, Measure (calls per update): a stop polled `vm list`, which reads
/// every guest, each `poll_interval` until the guest was down: 50 listings for 9
/// restarting updates. Now it looks once (is it running, locked?), then waits on the
/// guest's own `run.lock` (no call) and asks `vm info` of this guest alone. A guest that
/// ignores the ACPI request for 400 ms (20 intervals) is stopped with one listing.
#[test]
fn a_stop_lists_the_host_once_however_long_the_guest_takes() {
    let host = SimHost::new();
    let b = host.backend();
    b.create(&spec("deaf")).unwrap();
    b.configure(
        "deaf",
        &BTreeMap::from([("sim_ignore_acpi".to_string(), "yes".to_string())]),
        &[],
    )
    .unwrap();
    b.start("deaf").unwrap();
    let before = b.invocations();
    assert_eq!(
        b.stop("deaf", Duration::from_millis(400)).unwrap(),
        StopOutcome::PoweredOff
    );
    let after = b.invocations();
    let n = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(n("vm list") <= 1, "{} listings: {after:?}", n("vm list"));
    assert!(n("vm info") <= 3, "{} looks: {after:?}", n("vm info"));
    assert_eq!(b.list().unwrap()[0].state, RunState::Stopped);
}
