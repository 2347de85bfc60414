//! vm-bhyve's observed quirks, reproduced by `vm-sim` through its command line: the
//! exit codes that are 0 on failure, EOF meaning "yes", guests as real processes that
//! stop, power off, reboot and crash like bhyve guests, and the simulator's delays.

mod vm_sim_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_sim_support::{alive, kill, text, SimHost};

fn created(name: &str) -> SimHost {
    let host = SimHost::new();
    assert!(host.vm(&["create", "-s", "64M", name]).status.success());
    host
}

#[test]
fn destroy_without_f_destroys_at_eof_and_keeps_on_n() {
    let host = created("alpha");
    // Answering "n" exits 0 too: the exit code does not tell.
    let mut child = Command::new(&host.vm)
        .args(["destroy", "alpha"])
        .envs(host.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(host.path("alpha/alpha.conf").exists());
    // stdin at EOF: yes.
    let out = host.vm(&["destroy", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!host.path("alpha").exists());
}

#[test]
fn stop_returns_at_once_and_the_guest_powers_off_later() {
    let host = created("alpha");
    host.write(".config/sim.conf", "stop_resend_ms=20\nshutdown_ms=2000\n");
    assert!(host.vm(&["start", "alpha"]).status.success());
    let pid = host.bhyve_pid("alpha");
    let out = host.vm(&["stop", "alpha"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "Sending ACPI shutdown to alpha\n")
    );
    // Still running right after `vm stop` returned: the guest takes its time.
    assert_eq!(host.state("alpha"), format!("Running ({pid})"));
    assert_eq!(host.wait_state("alpha", |s| s == "Stopped"), "Stopped");
    assert!(!host.path("alpha/run.lock").exists());
    // `_run` removes `console` right after the lock.
    let end = Instant::now() + Duration::from_secs(5);
    while host.path("alpha/console").exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!host.path("alpha/console").exists());
    let log = host.read("alpha/vm-bhyve.log");
    assert!(log.contains("bhyve exited with status 1"), "{log}");
}

#[test]
fn a_guest_that_ignores_acpi_needs_poweroff() {
    let host = created("alpha");
    host.append("alpha/alpha.conf", "sim_ignore_acpi=\"yes\"\n");
    assert!(host.vm(&["start", "alpha"]).status.success());
    let pid = host.bhyve_pid("alpha");
    assert!(host.vm(&["stop", "alpha"]).status.success());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(host.state("alpha"), format!("Running ({pid})"));
    // Without -f, EOF on stdin confirms.
    let out = host.vm(&["poweroff", "alpha"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(0), String::new(), String::new())
    );
    assert_eq!(host.wait_state("alpha", |s| s == "Stopped"), "Stopped");
    assert!(!alive(pid));
    assert!(
        !host.path("alpha/run.lock").exists(),
        "_run cleans up after a poweroff"
    );
}

#[test]
fn a_crashed_host_leaves_a_stale_lock() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    host.crash("alpha");
    let locked = format!("Locked ({})", host.hostname);
    assert_eq!(host.state("alpha"), locked);
    assert_eq!(host.read("alpha/run.lock"), format!("{}\n", host.hostname));
    // `list -r` hides only Stopped rows.
    assert!(text(&host.vm(&["list", "-r"]).stdout).contains(&locked));
    // stop sees no vmm; destroy refuses the lock; start ignores a lock of this host.
    let out = host.vm(&["stop", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stderr)
        .ends_with("WARNING: alpha doesn't appear to be a running virtual machine\n"));
    assert_eq!(host.vm(&["destroy", "-f", "alpha"]).status.code(), Some(1));
    let out = host.vm(&["start", "alpha"]);
    assert!(text(&out.stdout).ends_with("  * booting...\n"), "{out:?}");
    host.bhyve_pid("alpha");
}

#[test]
fn a_killed_bhyve_is_cleaned_up_by_its_supervisor() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    kill(host.bhyve_pid("alpha"));
    assert_eq!(host.wait_state("alpha", |s| s == "Stopped"), "Stopped");
    assert!(!host.path("alpha/run.lock").exists());
    assert!(host
        .read("alpha/vm-bhyve.log")
        .contains("bhyve exited with status 137"));
}

#[test]
fn restart_and_reset_boot_the_guest_again() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    let first = host.bhyve_pid("alpha");
    let out = host.vm(&["restart", "alpha"]);
    assert_eq!(
        text(&out.stdout),
        "Setting guest restart flag\nSending ACPI shutdown to alpha\n"
    );
    let second = host.wait_state("alpha", |s| {
        s.starts_with("Running (") && *s != format!("Running ({first})")
    });
    assert!(!host.path("alpha/restart").exists(), "the flag is consumed");
    assert!(host.vm(&["reset", "-f", "alpha"]).status.success());
    let third = host.wait_state("alpha", |s| s.starts_with("Running (") && s != second);
    assert_ne!(third, second);
    assert!(host
        .read("alpha/vm-bhyve.log")
        .contains("starting bhyve (run 3)"));
}

#[test]
fn a_restart_flag_left_on_a_stopped_guest_turns_the_next_stop_into_a_reboot() {
    let host = created("alpha");
    let out = host.vm(&["restart", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        host.path("alpha/restart").exists(),
        "stale flag stays behind"
    );
    assert!(host.vm(&["start", "alpha"]).status.success());
    let pid = host.bhyve_pid("alpha");
    assert!(host.vm(&["stop", "alpha"]).status.success());
    let s = host.wait_state("alpha", |s| {
        s.starts_with("Running (") && *s != format!("Running ({pid})")
    });
    assert!(
        s.starts_with("Running ("),
        "rebooted instead of stopping: {s}"
    );
}

#[test]
fn delays_model_a_slow_host_and_show_the_loader_stage() {
    let host = created("alpha");
    let t = Instant::now();
    let out = host.vm_env(
        &["create", "-s", "1M", "beta"],
        &[("VM_SIM_DELAY_MS", "300")],
    );
    assert!(out.status.success());
    assert!(t.elapsed() >= Duration::from_millis(300));
    host.write(
        ".config/sim.conf",
        "stop_resend_ms=20\nstart_delay_ms=1500\n",
    );
    assert!(host.vm(&["start", "alpha"]).status.success());
    let s = host.wait_state("alpha", |s| s.starts_with("Bootloader ("));
    assert!(s.starts_with("Bootloader ("), "{s}");
    // Stopping during the loader stage asks (EOF: yes) and kills the loader.
    let out = host.vm(&["stop", "alpha"]);
    assert_eq!(text(&out.stdout), "Killing alpha\n");
    assert_eq!(host.wait_state("alpha", |s| s == "Stopped"), "Stopped");
}

#[test]
fn start_failures_exit_zero_and_fatal_errors_only_reach_the_log() {
    let host = created("alpha");
    host.append("alpha/alpha.conf", "sim_fail_boot=\"unable to locate firmware /usr/local/share/uefi-firmware/BHYVE_UEFI.fd\"\n");
    let out = host.vm(&["start", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).ends_with("  * booting...\n"));
    let end = Instant::now() + Duration::from_secs(5);
    while !host.read("alpha/vm-bhyve.log").contains("fatal;") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(host
        .read("alpha/vm-bhyve.log")
        .contains("fatal; unable to locate firmware /usr/local/share/uefi-firmware/BHYVE_UEFI.fd"));
    assert_eq!(host.state("alpha"), "Stopped");
    // Incomplete configuration: refused on stdout, exit 0.
    host.write(
        "alpha/alpha.conf",
        "loader=\"bhyveload\"\nmemory=256M\ndisk0_name=\"disk0.img\"\n",
    );
    let out = host.vm(&["start", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).ends_with("  ! incomplete virtual machine configuration\n"));
}

#[test]
fn configure_runs_editor_on_the_conf() {
    let host = created("alpha");
    let out = host.vm_env(
        &["configure", "alpha"],
        &[("EDITOR", "sed -i s/^cpu=1$/cpu=3/")],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(host.read("alpha/alpha.conf").contains("\ncpu=3\n"));
    let out = host.vm_env(&["configure", "nosuch"], &[("EDITOR", "true")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{}ERROR: cannot locate configuration file for virtual machine: nosuch\n",
            host.prefix()
        )
    );
}

#[test]
fn sysrc_mode_edits_like_sysrc() {
    let host = created("alpha");
    let f = host.path("alpha/alpha.conf");
    let run = |args: &[&str]| {
        Command::new(&host.sysrc)
            .args(args)
            .envs(host.env())
            .output()
            .unwrap()
    };
    host.append("alpha/alpha.conf", "cpu=2 # second\n");
    assert!(
        run(&["-inqf", f.to_str().unwrap(), "cpu=8", "graphics=yes"])
            .status
            .success()
    );
    let t = host.read("alpha/alpha.conf");
    assert!(
        t.contains("\ncpu=1\n") && t.ends_with("cpu=\"8\" # second\ngraphics=\"yes\"\n"),
        "{t}"
    );
    assert!(run(&["-inxqf", f.to_str().unwrap(), "cpu"])
        .status
        .success());
    assert!(!host.read("alpha/alpha.conf").contains("cpu="));
    // Without -f: the simulator's rc.conf; += adds once, -= removes.
    assert!(run(&["vm_list+=alpha"]).status.success());
    assert!(run(&["vm_list+=beta"]).status.success());
    assert!(run(&["vm_list+=alpha"]).status.success());
    assert_eq!(text(&run(&["-n", "vm_list"]).stdout), "alpha beta\n");
    assert!(host.list().contains("Yes [1]"));
    assert!(run(&["vm_list-=alpha"]).status.success());
    assert_eq!(host.read(".config/rc.conf"), "vm_list=\"beta\"\n");
    let out = run(&["nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    // Also reachable as `vm-sim sysrc`.
    let out = Command::new(env!("CARGO_BIN_EXE_vm-sim"))
        .args(["sysrc", "-f", f.to_str().unwrap(), "-n", "memory"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "256M\n");
}

#[test]
fn guests_die_with_their_directory() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    let pid = host.bhyve_pid("alpha");
    drop(host);
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "a guest outlived its temporary vm_dir");
}

/// The `STATE` column of `name` sampled every 20 ms for `total`, without repeats.
fn states_over(host: &SimHost, name: &str, total: Duration) -> Vec<String> {
    let end = Instant::now() + total;
    let mut seen: Vec<String> = Vec::new();
    while Instant::now() < end {
        let s = host.state(name);
        let s = if s.starts_with("Running (") {
            "Running".to_string()
        } else {
            s
        };
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// Guards issue 12, simulator: a start goes Stopped, then `Locked (host)`, then Running,
/// over a configurable time, as the real script does (measured: Running after 0.3-0.7 s).
#[test]
fn a_start_goes_stopped_then_locked_then_running() {
    let host = created("alpha");
    host.write(
        ".config/sim.conf",
        "stop_resend_ms=20\nshutdown_ms=100\nstart_lock_ms=300\nlocked_ms=400\nlist_delay_ms=0\n",
    );
    let t = Instant::now();
    assert!(host.vm(&["start", "alpha"]).status.success());
    let mut seen = states_over(&host, "alpha", Duration::from_millis(1200));
    // bhyveload runs for a moment between the lock and bhyve: a look may catch it.
    seen.retain(|s| !s.starts_with("Bootloader"));
    assert_eq!(
        seen,
        vec![
            "Stopped".to_string(),
            format!("Locked ({})", host.hostname),
            "Running".to_string()
        ]
    );
    assert!(t.elapsed() >= Duration::from_millis(700));
}

/// Guards issue 12, item 2 and simulator: vm-bhyve checks that a guest is stopped long
/// before it locks it, so two starts at once both go ahead; the second one's `bhyvectl
/// --destroy` kills the first guest (bhyve exits 137) and the first supervisor's cleanup
/// removes the survivor's `run.lock`.
#[test]
fn two_starts_at_once_kill_the_first_guest() {
    let host = created("alpha");
    // The second start comes half-way through the first one's window between its check
    // and its lock, so it goes ahead too; by the time it destroys "its" vmm, the first
    // guest has booted (the margins are wide, so a busy machine does not change the order).
    host.write(
        ".config/sim.conf",
        "stop_resend_ms=20\nshutdown_ms=100\nstart_lock_ms=1200\nlocked_ms=300\nlist_delay_ms=0\n",
    );
    let a = host.vm(&["start", "alpha"]);
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !host.path("alpha/run.lock").exists(),
        "the first start locked already: the machine is too slow for this test's window"
    );
    let b = host.vm(&["start", "alpha"]);
    for out in [&a, &b] {
        assert!(text(&out.stdout).ends_with("  * booting...\n"), "{out:?}");
    }
    let end = Instant::now() + Duration::from_secs(10);
    while !host
        .read("alpha/vm-bhyve.log")
        .contains("bhyve exited with status 137")
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = host.read("alpha/vm-bhyve.log");
    assert!(log.contains("bhyve exited with status 137"), "{log}");
    // The second guest runs on, without the lock the first supervisor removed.
    host.bhyve_pid("alpha");
    let end = Instant::now() + Duration::from_secs(5);
    while host.path("alpha/run.lock").exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!host.path("alpha/run.lock").exists());
    assert!(host.state("alpha").starts_with("Running ("));
}

/// Guards issue 12, item 1 and simulator: `sysrc` reads, edits and rewrites rc.conf
/// without a lock; a second edit inside the window is lost.
#[test]
fn two_sysrc_edits_at_once_lose_one() {
    let host = SimHost::new();
    let rc = host.path(".config/rc.conf");
    let rc = rc.to_str().unwrap();
    let spawn = |name: &str| {
        Command::new(&host.sysrc)
            .args(["-f", rc, &format!("vm_list+={name}")])
            .envs(host.env())
            .env("VM_SIM_SYSRC_WINDOW_MS", "400")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("alpha"), spawn("beta"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let out = Command::new(&host.sysrc)
        .args(["-f", rc, "-n", "vm_list"])
        .envs(host.env())
        .output()
        .unwrap();
    let list = text(&out.stdout);
    let words: Vec<&str> = list.split_whitespace().collect();
    assert_eq!(words.len(), 1, "one edit must be lost: {list:?}");
}

/// Guards issue 12, item 3 and simulator: a guest killed with its supervisor (`kill -9`)
/// and its `run.lock` removed leaves a stale vmm entry: `vm list` and `vm info` say
/// stopped, `vm start` says it runs already, `vm destroy` refuses, until `bhyvectl
/// --destroy --vm=NAME`.
#[test]
fn a_stale_vmm_entry_blocks_start_and_destroy() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    host.kill9("alpha");
    std::fs::remove_file(host.path("alpha/run.lock")).unwrap();
    assert_eq!(host.state("alpha"), "Stopped");
    let info = text(&host.vm(&["info", "alpha"]).stdout);
    assert!(info.contains("  state: stopped\n"), "{info}");
    let out = host.vm(&["start", "alpha"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).ends_with("  ! guest appears to be running already\n"),
        "{out:?}"
    );
    let out = host.vm(&["destroy", "-f", "alpha"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("alpha appears to be running locally (vmm exists)"),
        "{out:?}"
    );
    let out = host.vm(&["bhyvectl", "--destroy", "--vm=alpha"]);
    assert!(out.status.success(), "{out:?}");
    let out = host.vm(&["start", "alpha"]);
    assert!(text(&out.stdout).ends_with("  * booting...\n"), "{out:?}");
    host.bhyve_pid("alpha");
}

/// Guards issue 12, simulator: `vm info` of a running guest shows its network device as
/// the real script prints it.
#[test]
fn info_shows_the_running_guests_network_device() {
    let host = created("alpha");
    assert!(host.vm(&["start", "alpha"]).status.success());
    host.bhyve_pid("alpha");
    let info = text(&host.vm(&["info", "alpha"]).stdout);
    let want = "    active-device: tap0\n    desc: vmnet/alpha/0/public\n    mtu: 1500\n    \
                bridge: vm-public\n    bytes-in: 0 (0.000B)\n    bytes-out: 0 (0.000B)\n";
    assert!(info.contains(want), "{info}");
}

/// Guards issue 12, simulator: `vm list` and `vm info` take their time by default (tens
/// of milliseconds), configurable, so the cost of calling them shows.
#[test]
fn list_and_info_take_time() {
    let host = created("alpha");
    host.write(".config/sim.conf", "stop_resend_ms=20\n");
    for args in [&["list"][..], &["info", "alpha"][..]] {
        let t = Instant::now();
        assert!(host.vm(args).status.success());
        assert!(t.elapsed() >= Duration::from_millis(20), "{args:?}");
    }
    host.write(".config/sim.conf", "list_delay_ms=300\n");
    let t = Instant::now();
    assert!(host.vm(&["list"]).status.success());
    assert!(t.elapsed() >= Duration::from_millis(300));
}
