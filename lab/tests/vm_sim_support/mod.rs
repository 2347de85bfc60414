//! A simulated host in a temporary directory, shared by the `vm-sim` tests.
//!
//! `bin/vm` and `bin/sysrc` are links to the built `vm-sim`, so `$0` and the argv[0]
//! dispatch are the real ones; `vm_dir` is `$VM_SIM_DIR`; the host name is unique per
//! test so that locks of one test never look like another's.

#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flotilla::backend::{VmBhyve, VmBhyveConfig};

/// sim.conf of a test that needs speed, not realism: no start, list or sysrc delays.
pub const FAST: &str = "stop_resend_ms=20\nshutdown_ms=100\nstart_lock_ms=0\nlocked_ms=0\nlist_delay_ms=0\nsysrc_window_ms=0\n";

pub struct SimHost {
    pub tmp: tempfile::TempDir,
    pub vm: PathBuf,
    pub sysrc: PathBuf,
    pub vm_dir: PathBuf,
    pub hostname: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl SimHost {
    /// A fresh host after `vm init`, with fast stops and shutdowns.
    pub fn new() -> SimHost {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_vm-sim"));
        let vm = bin.join("vm");
        let sysrc = bin.join("sysrc");
        std::os::unix::fs::symlink(&exe, &vm).unwrap();
        std::os::unix::fs::symlink(&exe, &sysrc).unwrap();
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let hostname = format!(
            "sim{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let host = SimHost {
            tmp,
            vm,
            sysrc,
            vm_dir,
            hostname,
        };
        let out = host.vm(&["init"]);
        assert!(out.status.success(), "vm init: {out:?}");
        host.write(".config/sim.conf", FAST);
        host
    }

    /// A host with the simulator's realistic defaults (slow starts, lists, sysrc
    /// window), except for the fast stops every test uses.
    pub fn realistic() -> SimHost {
        let host = SimHost::new();
        host.write(".config/sim.conf", "stop_resend_ms=20\nshutdown_ms=100\n");
        host
    }

    pub fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("VM_SIM_DIR".into(), self.vm_dir.clone().into()),
            ("VM_SIM_HOSTNAME".into(), self.hostname.clone().into()),
        ]
    }

    /// Runs `vm ARGS` with stdin at EOF.
    pub fn vm(&self, args: &[&str]) -> Output {
        self.vm_env(args, &[])
    }

    pub fn vm_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        Command::new(&self.vm)
            .args(args)
            .envs(self.env())
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run vm")
    }

    /// `$0: `, the prefix of vm-bhyve's errors and warnings.
    pub fn prefix(&self) -> String {
        format!("{}: ", self.vm.display())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.vm_dir.join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    pub fn append(&self, rel: &str, text: &str) {
        let mut t = self.read(rel);
        t.push_str(text);
        self.write(rel, &t);
    }

    pub fn config(&self) -> VmBhyveConfig {
        VmBhyveConfig {
            vm: self.vm.clone(),
            sysrc: self.sysrc.clone(),
            rc_conf: Some(self.path(".config/rc.conf")),
            zfs: "false".into(),
            env: self.env(),
            hostname: Some(self.hostname.clone()),
            poll_interval: Duration::from_millis(20),
            start_timeout: Duration::from_secs(10),
            poweroff_timeout: Duration::from_secs(5),
            lock_grace: Duration::from_millis(300),
        }
    }

    pub fn backend(&self) -> VmBhyve {
        VmBhyve::new(self.config())
    }

    /// `vm list` as text.
    pub fn list(&self) -> String {
        String::from_utf8(self.vm(&["list"]).stdout).unwrap()
    }

    /// The STATE column of `name`.
    pub fn state(&self, name: &str) -> String {
        self.list()
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.rsplit("  ").next().unwrap().trim().to_string())
            .unwrap_or_default()
    }

    /// Polls `vm list` until `name`'s STATE satisfies `pred`.
    pub fn wait_state(&self, name: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.state(name);
            if pred(&s) || Instant::now() > end {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid in `Running (PID)`.
    pub fn bhyve_pid(&self, name: &str) -> u32 {
        let s = self.wait_state(name, |s| s.starts_with("Running ("));
        s.trim_start_matches("Running (")
            .trim_end_matches(')')
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not running: {s}"))
    }

    /// Kills the guest's `_run` supervisor and then its bhyve, as a host crash would:
    /// nobody removes `run.lock`.
    pub fn crash(&self, name: &str) {
        self.kill9(name);
        // The host rebooted: /dev/vmm is empty again.
        let _ = std::fs::remove_file(self.path(&format!(".sim/{name}.vmm")));
    }

    /// `kill -9` of the guest's `_run` and bhyve: nobody cleans up, so `run.lock` and the
    /// vmm entry stay.
    pub fn kill9(&self, name: &str) {
        let bhyve = self.bhyve_pid(name);
        let stat = std::fs::read_to_string(format!("/proc/{bhyve}/stat")).unwrap();
        let ppid: u32 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kill(ppid);
        kill(bhyve);
        let end = Instant::now() + Duration::from_secs(5);
        while alive(bhyve) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn kill(pid: u32) {
    let ok = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {pid}");
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !matches!(
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next()),
                Some('Z') | None
            )
        })
        .unwrap_or(false)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
