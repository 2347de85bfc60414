//! The processes of a started guest: `vm _run` (the supervisor), a stand-in for the
//! loader (`bhyveload`/`grub-bhyve`) and a stand-in for `bhyve` itself.
//!
//! As on a host, `_run` writes `run.lock`, runs the loader and then bhyve in the
//! foreground, decides from bhyve's exit whether to restart it, and removes `run.lock`
//! and `console` when it ends. The bhyve stand-in lives until it is told to stop:
//! SIGTERM is the ACPI power button (it powers off after the guest's shutdown time,
//! or never when the guest has `sim_ignore_acpi="yes"`), SIGUSR1 is `bhyvectl
//! --force-reset` (exit 0, so `_run` boots it again), SIGKILL is `bhyvectl
//! --force-poweroff`. Killing `_run` and bhyve together leaves a stale `run.lock`, as a
//! crashed host does. Every stand-in also ends when its guest's directory disappears, so
//! a test that removes its temporary `$vm_dir` leaves no process behind.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::host::{guest_log, Host, SIM_DIR};
use flotilla::conf::{self, Conf};

/// How often the stand-ins look for their guest directory.
const WATCH: Duration = Duration::from_millis(200);

/// Spawns `prog _run NAME` detached from the caller, as `vm start` does with `&`.
pub fn spawn_run(host: &Host, name: &str) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg0(&host.prog)
        .arg("_run")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(|_| ())
}

/// `vm _run NAME`: the supervisor loop. Returns its exit code (5 guest not found, 10
/// not stopped, 15 configuration error, otherwise bhyve's last exit code).
pub fn run(host: &Host, name: &str) -> i32 {
    let Some(guest) = host.find_guest(name) else {
        return 5;
    };
    if host.confirm_stopped(&guest, true).is_err() {
        return 10;
    }
    let dir = guest.dir();
    let conf = guest.conf();
    guest_log(&dir, "initialising");
    if conf.get("uuid").is_none_or(str::is_empty) {
        let path = guest.conf_path();
        if let Ok(text) = fs::read_to_string(&path) {
            if let Ok(new) = conf::sysrc_set(&text, "uuid", &super::host::uuid()) {
                let _ = fs::write(&path, new);
            }
        }
    }
    let loader = conf.get("loader").unwrap_or("").to_string();
    if let Some(why) = conf.get("sim_fail_boot").filter(|v| !v.is_empty()) {
        // Stands for the configuration and firmware errors `_run` meets before it locks.
        guest_log(&dir, &format!("fatal; {why}"));
        return 15;
    }
    if !matches!(
        loader.as_str(),
        "bhyveload" | "grub" | "uefi" | "uefi-csm" | "uefi-devel" | "uefi-custom"
    ) {
        guest_log(
            &dir,
            &format!("fatal; unsupported loader specified ({loader})"),
        );
        return 15;
    }
    let mut console = format!("com1=/dev/nmdm-{name}.1B\n");
    if conf.yes("graphics") {
        let listen = conf.get("graphics_listen").unwrap_or("0.0.0.0");
        let port = conf.get("graphics_port").unwrap_or("5900");
        console.push_str(&format!("vnc={listen}:{port}\n"));
    }
    // vm-bhyve checked that the guest is stopped (above) long before it locks: devices
    // and taps are set up in between. Another start in this window goes ahead too.
    sleep_watching(&dir, host.settings.start_lock);
    let _ = fs::write(dir.join("console"), console);
    let _ = fs::write(dir.join("run.lock"), format!("{}\n", host.hostname));
    let _ = fs::write(host.tap_file(name), format!("{}\n", free_tap(host)));
    sleep_watching(&dir, host.settings.locked);

    let mut code = 0;
    let mut run_no = 1;
    loop {
        if !dir.exists() {
            break;
        }
        if !loader.starts_with("uefi") {
            // `bhyvectl --destroy` of whatever vmm has this name: a guest another start
            // booted in the window above dies here (bhyve exits 137).
            // From the second run on, the vmm is this guest's own.
            destroy_vmm(host, name, run_no == 1);
        }
        if loader == "bhyveload" || loader == "grub" {
            let util = if loader == "grub" {
                "grub-bhyve"
            } else {
                "bhyveload"
            };
            guest_log(&dir, &format!("booting {util}"));
            match child(host, "loader", name) {
                Ok(0) => {}
                Ok(c) => {
                    guest_log(&dir, &format!("{util} exited with status {c}"));
                    code = c;
                    break;
                }
                Err(e) => {
                    guest_log(&dir, &format!("fatal; unable to run {util}: {e}"));
                    code = 15;
                    break;
                }
            }
        } else {
            sleep_watching(&dir, host.settings.start_delay);
        }
        guest_log(&dir, &format!("starting bhyve (run {run_no})"));
        code = match child(host, "bhyve", name) {
            Ok(c) => c,
            Err(e) => {
                guest_log(&dir, &format!("fatal; unable to run bhyve: {e}"));
                15
            }
        };
        guest_log(&dir, &format!("bhyve exited with status {code}"));
        // vm::handle_exit, reading the config afresh as `_run` does on every run.
        let conf = guest.conf();
        let restart_flag = dir.join("restart");
        let action = match code {
            0 => conf.get("on_restart").unwrap_or("restart").to_string(),
            1 | 2 => {
                if restart_flag.exists() {
                    let _ = fs::remove_file(&restart_flag);
                    "restart".to_string()
                } else {
                    "shutdown".to_string()
                }
            }
            _ => conf.get("on_fault").unwrap_or("shutdown").to_string(),
        };
        if action != "restart" {
            break;
        }
        run_no += 1;
    }
    guest_log(&dir, "stopped");
    let _ = fs::remove_file(host.vmm_file(name));
    let _ = fs::remove_file(host.tap_file(name));
    let _ = fs::remove_file(dir.join("run.lock"));
    let _ = fs::remove_file(dir.join("console"));
    code
}

/// Runs one stand-in (`_loader` or `_bhyve`) in the foreground, recording its pid where
/// `vm list` looks for it, and returns its exit code (128 + signal when killed).
fn child(host: &Host, role: &str, name: &str) -> std::io::Result<i32> {
    let exe = std::env::current_exe()?;
    let mut c = Command::new(exe)
        .arg0(&host.prog)
        .arg(format!("_{role}"))
        .arg(name)
        .arg(&host.vm_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid_file = host.pid_file(name, role);
    let _ = fs::create_dir_all(host.vm_dir.join(SIM_DIR));
    // The loader or bhyve makes /dev/vmm/NAME; only `_run`'s cleanup removes it.
    let _ = fs::write(host.vmm_file(name), "");
    // bhyve records itself once it handles SIGTERM (see `bhyve`): a stop sent the moment
    // `vm list` shows it running must reach its handler, as on a host, not kill it.
    if role != "bhyve" {
        let _ = fs::write(&pid_file, format!("{}\n", c.id()));
    }
    let status = c.wait();
    let _ = fs::remove_file(&pid_file);
    let status = status?;
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}

/// `bhyvectl --destroy`: the guest that owns the vmm dies. A bhyve records its pid a
/// moment after it starts, so a vmm without a known process is given that moment.
fn destroy_vmm(host: &Host, name: &str, patient: bool) {
    let end = Instant::now()
        + if patient {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
    while host.vmm_file(name).exists() {
        let pid = host
            .live_pid(name, "bhyve")
            .or_else(|| host.live_pid(name, "loader"));
        if let Some(pid) = pid {
            super::host::signal(pid, "KILL");
            break;
        }
        if Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = fs::remove_file(host.vmm_file(name));
}

/// The lowest tap number no running guest of this host uses.
fn free_tap(host: &Host) -> u32 {
    let used: Vec<u32> = fs::read_dir(host.vm_dir.join(SIM_DIR))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tap"))
                .filter_map(|e| fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

fn sleep_watching(dir: &Path, total: Duration) {
    let end = Instant::now() + total;
    while Instant::now() < end && dir.exists() {
        std::thread::sleep(WATCH.min(end.saturating_duration_since(Instant::now())));
    }
}

fn guest_dir(host: &Host, name: &str) -> Option<PathBuf> {
    host.find_guest(name).map(|g| g.dir())
}

/// `_loader NAME VM_DIR`: the loader stage. Takes the start delay, then exits 0; SIGTERM
/// (from `vm stop` during the loader stage) kills it, and `_run` then gives up.
pub fn loader(host: &Host, name: &str) -> i32 {
    let Some(dir) = guest_dir(host, name) else {
        return 1;
    };
    sleep_watching(&dir, host.settings.start_delay);
    if dir.exists() {
        0
    } else {
        1
    }
}

/// `_bhyve NAME VM_DIR`: the running guest.
pub fn bhyve(host: &Host, name: &str) -> i32 {
    let Some(guest) = host.find_guest(name) else {
        return 1;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return 4,
    };
    let default_shutdown = host.settings.shutdown;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut usr1)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined1()),
        ) else {
            return 4;
        };
        // Running from now on, in `vm list`'s eyes. Regression: `_run` wrote this before the
        // handlers existed, and a `vm stop` in that moment killed a guest that ignores ACPI.
        let _ = std::fs::write(
            host.pid_file(&guest.name, "bhyve"),
            format!("{}\n", std::process::id()),
        );
        let dir = guest.dir();
        let mut power_off_at: Option<tokio::time::Instant> = None;
        let mut watch = tokio::time::interval(WATCH);
        loop {
            let deadline = async {
                match power_off_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => {
                    // Read the config now, so a test can make a running guest deaf.
                    let conf: Conf = guest.conf();
                    if !conf.yes("sim_ignore_acpi") && power_off_at.is_none() {
                        let wait = conf
                            .get("sim_shutdown_ms")
                            .and_then(|v| v.trim().parse().ok())
                            .map_or(default_shutdown, Duration::from_millis);
                        power_off_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
                // A guest that powers itself off makes bhyve exit 1.
                _ = deadline => return 1,
                // bhyvectl --force-reset: bhyve exits 0 and `_run` boots it again.
                _ = usr1.recv() => return 0,
                _ = watch.tick() => {
                    if !dir.exists() {
                        return 1;
                    }
                }
            }
        }
    })
}
