//! `vm-sim`: a stand-in for vm-bhyve's `vm` command on hosts without bhyve.
//!
//! It keeps vm-bhyve's on-disk layout in a directory (`.templates/`,
//! `.config/system.conf`, `<name>/<name>.conf`, sparse `disk0.img`, `run.lock`,
//! `vm-bhyve.log`) and answers `vm`'s command line with vm-bhyve's texts and exit codes,
//! including the exit codes that are 0 on failure. A started guest is a real process
//! tree (see [`guest`]), so stop, poweroff and a killed guest behave as on a host.
//!
//! Where the host is:
//! - `VM_SIM_DIR=/dir`: `$vm_dir` is `/dir` and rc.conf (`vm_enable`, `vm_list`,
//!   `vm_delay`, optionally another `vm_dir`) is `/dir/.config/rc.conf`, which is what
//!   `sysrc -f` must edit to change autostart;
//! - otherwise rc.conf is `$VM_SIM_RC_CONF` or `/etc/rc.conf`, as on FreeBSD.
//!
//! Knobs: `VM_SIM_CALL_LOG=/file` (each `vm` and `sysrc` command line an operator or the
//! agent runs is appended to it, one a line: how benchmarks and tests count calls),
//! `VM_SIM_HOSTNAME` (the name written to `run.lock`), `VM_SIM_DELAY_MS` and
//! `$vm_dir/.config/sim.conf` (`create_delay_ms`, `start_delay_ms`, `shutdown_ms`,
//! `stop_resend_ms`, and the realistic slowness of [`host::Settings`]: `start_lock_ms`,
//! `locked_ms`, `list_delay_ms`, `sysrc_window_ms`; tests that need speed set them to 0), and per guest in its `.conf`: `sim_ignore_acpi="yes"` (ignores
//! ACPI shutdown), `sim_shutdown_ms`, `sim_fail_boot="reason"` (`_run` logs `fatal;
//! reason` and exits 15). vm-bhyve ignores keys it does not know, so these are harmless.
//!
//! Differences from a FreeBSD host: no root or vmm checks, no ZFS datastores, no real
//! switches or taps (`vm info` shows a numbered tap as vm-bhyve would), no cloud-init;
//! `/dev/vmm/NAME` is a file under `.sim/` that the loader or bhyve makes and `_run`'s
//! cleanup removes, so a guest killed together with its `_run` leaves a stale one. The
//! process table is read from Linux's `/proc`.

pub mod cmd;
pub mod guest;
pub mod host;
pub mod md5;
pub mod sysrc;

use std::path::Path;

/// The whole program: dispatches on `argv[0]` (`sysrc`) and `argv[1]`. Returns the exit
/// code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let prog = args.first().cloned().unwrap_or_else(|| "vm".into());
    let base = Path::new(&prog)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base == "sysrc" {
        log_call(&base, &args[1..]);
        return sysrc::main(&args[1..]);
    }
    if base == "bhyvectl" {
        return bhyvectl(&prog, &args[1..]);
    }
    let rest = args.get(1..).unwrap_or(&[]);
    log_call(&base, rest);
    match rest.first().map(String::as_str) {
        Some("sysrc") => sysrc::main(&rest[1..]),
        Some("bhyvectl") => bhyvectl(&prog, &rest[1..]),
        Some(role @ ("_run" | "_bhyve" | "_loader")) => {
            let Some(name) = rest.get(1) else {
                return 1;
            };
            let host = match host::Host::load(&prog) {
                Ok(h) => h,
                Err(m) => {
                    eprintln!("{prog}: ERROR: {m}");
                    return 1;
                }
            };
            match role {
                "_run" => guest::run(&host, name),
                "_bhyve" => guest::bhyve(&host, name),
                _ => guest::loader(&host, name),
            }
        }
        _ => cmd::dispatch(&prog, rest),
    }
}

/// Appends `program args...` to `$VM_SIM_CALL_LOG`, if set: every call of `vm` and
/// `sysrc` from outside, not the simulator's own guest processes (`_run` and friends).
fn log_call(base: &str, args: &[String]) {
    use std::io::Write;
    if args.first().is_some_and(|a| a.starts_with('_')) || base == "bhyvectl" {
        return;
    }
    let Some(path) = std::env::var_os("VM_SIM_CALL_LOG") else {
        return;
    };
    let line = format!("{base} {}\n", args.join(" "));
    // One write of one line with O_APPEND: concurrent calls do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// `bhyvectl --destroy --vm=NAME`, the one use an operator has for it here: removing a
/// stale vmm entry (and killing its bhyve, if one still runs).
fn bhyvectl(prog: &str, args: &[String]) -> i32 {
    let name = args.iter().find_map(|a| a.strip_prefix("--vm="));
    let (Some(name), true) = (name, args.iter().any(|a| a == "--destroy")) else {
        eprintln!("usage: bhyvectl --destroy --vm=NAME (vm-sim knows no other use)");
        return 1;
    };
    let host = match host::Host::load(prog) {
        Ok(h) => h,
        Err(m) => {
            eprintln!("{prog}: ERROR: {m}");
            return 1;
        }
    };
    if !host.vmm_exists(name) {
        eprintln!("vm_open: {name} could not be opened: No such file or directory");
        return 1;
    }
    if let Some(pid) = host.live_pid(name, "bhyve") {
        host::signal(pid, "KILL");
    }
    let _ = std::fs::remove_file(host.vmm_file(name));
    0
}
