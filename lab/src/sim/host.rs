//! The simulated host: rc.conf, `$vm_dir` and its layout, datastores, guests, and the
//! processes that stand in for `vm _run`, `bhyve` and the loaders.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla::conf::{self, Conf};

/// The text `vm init` installs as `.templates/default.conf` (the sample in vm-bhyve's
/// examples).
pub const DEFAULT_TEMPLATE: &str = "loader=\"bhyveload\"\n\
cpu=1\n\
memory=256M\n\
network0_type=\"virtio-net\"\n\
network0_switch=\"public\"\n\
disk0_type=\"virtio-blk\"\n\
disk0_name=\"disk0.img\"\n";

/// Name of the simulator's own bookkeeping directory under `$vm_dir`. It stands in for
/// the process table and `/dev/vmm`, which a real host has outside `$vm_dir`; vm-bhyve
/// skips dot-directories when it lists guests, so this one is invisible to it.
pub const SIM_DIR: &str = ".sim";

/// Simulator knobs, from `$vm_dir/.config/sim.conf` (rc-style) and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time `vm create` takes (`create_delay_ms`; env `VM_SIM_DELAY_MS` sets both delays).
    pub create_delay: Duration,
    /// Time from `vm start` until bhyve runs (`start_delay_ms`): the loader stage for
    /// bhyveload/grub guests, `Locked (host)` for UEFI ones.
    pub start_delay: Duration,
    /// Time a guest takes to power off after an ACPI shutdown (`shutdown_ms`; per guest
    /// `sim_shutdown_ms` in its `.conf`).
    pub shutdown: Duration,
    /// The pause between `vm stop`'s two SIGTERMs (`stop_resend_ms`; vm-bhyve sleeps 1 s).
    pub stop_resend: Duration,
    /// Time from `vm start` until `_run` writes `run.lock` (`start_lock_ms`): vm-bhyve
    /// checks that the guest is stopped, then sets up its devices and only then locks,
    /// so two starts in this window both go ahead and the second kills the first guest.
    pub start_lock: Duration,
    /// Time the guest shows `Locked (host)` after the lock, before its loader or bhyve
    /// runs (`locked_ms`).
    pub locked: Duration,
    /// Time `vm list` and `vm info` take (`list_delay_ms`): the real ones read every
    /// guest's files and the process table.
    pub list_delay: Duration,
    /// The window between `sysrc` reading its file and writing it back
    /// (`sysrc_window_ms`): sysrc takes no lock, so an edit in this window is lost.
    pub sysrc_window: Duration,
}

impl Settings {
    /// The knobs of the host at `vm_dir`.
    pub fn load(vm_dir: &Path) -> Settings {
        let conf = fs::read(vm_dir.join(".config/sim.conf"))
            .map(|b| Conf::parse_bytes(&b))
            .unwrap_or_default();
        let ms = |key: &str, default: u64| {
            Duration::from_millis(
                conf.get(key)
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(default),
            )
        };
        let mut s = Settings {
            create_delay: ms("create_delay_ms", 0),
            start_delay: ms("start_delay_ms", 0),
            shutdown: ms("shutdown_ms", 300),
            stop_resend: ms("stop_resend_ms", 1000),
            // Measured on the real script (vm-bhyve 1.5, bhyve stand-ins): the guest
            // shows Running about 0.3-0.7 s after `vm start` returns, `vm list` takes
            // tens of milliseconds with a few guests, `vm info` several times that.
            start_lock: ms("start_lock_ms", 200),
            locked: ms("locked_ms", 300),
            list_delay: ms("list_delay_ms", 30),
            sysrc_window: ms("sysrc_window_ms", 20),
        };
        if let Some(d) = std::env::var("VM_SIM_DELAY_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            s.create_delay = Duration::from_millis(d);
            s.start_delay = Duration::from_millis(d);
        }
        s
    }
}

/// A datastore as `system.conf` defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// Its name (`default` for `$vm_dir`).
    pub name: String,
    /// The `path_<name>` value (for `default`, `$vm_dir`).
    pub spec: String,
}

impl Datastore {
    /// `TYPE` as `vm datastore list` prints it.
    pub fn kind(&self) -> &'static str {
        match self.spec.split_once(':').map(|(p, _)| p) {
            Some("zfs") => "zfs",
            Some("iso") => "iso",
            Some("img") => "img",
            _ => "directory",
        }
    }

    /// The directory guests live in, when this store holds guests and resolves. ZFS
    /// stores never resolve here: the simulator has no `mount` to find their mountpoint.
    pub fn guest_path(&self) -> Option<PathBuf> {
        match self.kind() {
            "directory" => Some(PathBuf::from(&self.spec)).filter(|p| p.is_dir()),
            _ => None,
        }
    }
}

/// A guest found by `datastore::get_guest`.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The guest name.
    pub name: String,
    /// The datastore it was found in.
    pub ds: String,
    /// The datastore's path (`VM_DS_PATH`).
    pub ds_path: PathBuf,
}

impl Guest {
    /// `<ds>/<name>`.
    pub fn dir(&self) -> PathBuf {
        self.ds_path.join(&self.name)
    }
    /// `<ds>/<name>/<name>.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.dir().join(format!("{}.conf", self.name))
    }
    /// The guest's config as vm-bhyve reads it (empty when unreadable).
    pub fn conf(&self) -> Conf {
        fs::read(self.conf_path())
            .map(|b| Conf::parse_bytes(&b))
            .unwrap_or_default()
    }
    /// The first line of `run.lock`, when the lock exists.
    pub fn lock_host(&self) -> Option<String> {
        let path = self.dir().join("run.lock");
        if !path.exists() {
            return None;
        }
        let text = fs::read(&path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        Some(text.lines().next().unwrap_or("").to_string())
    }
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// `$0`, the prefix of every error and warning.
    pub prog: String,
    /// `$vm_dir`.
    pub vm_dir: PathBuf,
    /// The rc.conf this host reads (`vm_enable`, `vm_dir`, `vm_list`, `vm_delay`).
    pub rc_conf: PathBuf,
    /// `vm_list`: autostart order.
    pub vm_list: Vec<String>,
    /// `vm_delay`: pause between guests in a multi-guest `vm start` (default 2 s).
    pub vm_delay: Duration,
    /// `hostname`, as written into `run.lock`.
    pub hostname: String,
    /// Simulator knobs.
    pub settings: Settings,
}

/// Where the simulator's rc.conf is, and what it defaults to.
///
/// With `VM_SIM_DIR=/some/dir`, rc.conf is `/some/dir/.config/rc.conf` and, where it is
/// missing or silent, `vm_enable=YES` and `vm_dir=/some/dir`. Otherwise rc.conf is
/// `$VM_SIM_RC_CONF` or `/etc/rc.conf` without defaults, as on FreeBSD.
fn rc_location() -> (PathBuf, Option<PathBuf>) {
    match std::env::var_os("VM_SIM_DIR") {
        Some(d) if !d.is_empty() => {
            let dir = PathBuf::from(d);
            (dir.join(".config/rc.conf"), Some(dir))
        }
        _ => (
            std::env::var_os("VM_SIM_RC_CONF")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/etc/rc.conf")),
            None,
        ),
    }
}

/// The rc.conf path the simulator reads, for `sysrc` without `-f`.
pub fn rc_conf_path() -> PathBuf {
    rc_location().0
}

/// This machine's host name: `VM_SIM_HOSTNAME` when set, so tests can play several
/// hosts on one machine, else the kernel's.
pub fn hostname() -> String {
    if let Ok(h) = std::env::var("VM_SIM_HOSTNAME") {
        if !h.is_empty() {
            return h;
        }
    }
    if let Ok(h) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            return h.to_string();
        }
    }
    std::process::Command::new("hostname")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Host {
    /// vm-bhyve's prologue: read rc.conf, check `vm_enable` and `vm_dir`, and create the
    /// dot-directories and `system.conf` when missing. The error is the message
    /// `util::err` would print.
    pub fn load(prog: &str) -> Result<Host, String> {
        let (rc_conf, sim_dir) = rc_location();
        let rc = fs::read(&rc_conf)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let enable = conf::shell_get(&rc, "vm_enable")
            .or_else(|| sim_dir.as_ref().map(|_| "YES".to_string()));
        if !enable.as_deref().is_some_and(conf::is_yes) {
            return Err("$vm_enable is not enabled in /etc/rc.conf!".to_string());
        }
        let vm_dir = conf::shell_get(&rc, "vm_dir")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or(sim_dir);
        let vm_dir = match vm_dir {
            Some(d) if d.is_dir() => d,
            _ => {
                return Err(
                    "$vm_dir has not been configured or is not a valid directory".to_string(),
                )
            }
        };
        if vm_dir.to_string_lossy().starts_with("zfs:") {
            return Err("vm-sim does not simulate ZFS: set vm_dir to a directory".to_string());
        }
        for d in [".config", ".templates", ".iso", ".img", SIM_DIR] {
            let _ = fs::create_dir_all(vm_dir.join(d));
        }
        let null_iso = vm_dir.join(".config/null.iso");
        if !null_iso.exists() {
            let _ = fs::File::create(&null_iso);
        }
        let system = vm_dir.join(".config/system.conf");
        if !system.exists() {
            let _ = fs::File::create(&system);
        }
        let vm_list = conf::shell_get(&rc, "vm_list")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let vm_delay = conf::shell_get(&rc, "vm_delay")
            .and_then(|v| v.trim().parse().ok())
            .map_or(Duration::from_secs(2), Duration::from_secs);
        let settings = Settings::load(&vm_dir);
        Ok(Host {
            prog: prog.to_string(),
            vm_dir,
            rc_conf,
            vm_list,
            vm_delay,
            hostname: hostname(),
            settings,
        })
    }

    /// `.config/system.conf`.
    pub fn system_conf_path(&self) -> PathBuf {
        self.vm_dir.join(".config/system.conf")
    }

    /// `system.conf` as `config::core_get` reads it.
    pub fn system_conf(&self) -> Conf {
        fs::read(self.system_conf_path())
            .map(|b| Conf::parse_bytes(&b))
            .unwrap_or_default()
    }

    /// `default` followed by `datastore_list`, each with its spec.
    pub fn datastores(&self) -> Vec<Datastore> {
        let sys = self.system_conf();
        let mut out = vec![Datastore {
            name: "default".into(),
            spec: self.vm_dir.to_string_lossy().into_owned(),
        }];
        for name in sys.get("datastore_list").unwrap_or("").split_whitespace() {
            if name == "default" {
                continue;
            }
            if let Some(spec) = sys.get(&format!("path_{name}")).filter(|s| !s.is_empty()) {
                out.push(Datastore {
                    name: name.to_string(),
                    spec: spec.to_string(),
                });
            }
        }
        out
    }

    /// `datastore::get`: the path of a guest datastore by name.
    pub fn datastore_path(&self, name: &str) -> Option<PathBuf> {
        if name == "default" {
            return Some(self.vm_dir.clone());
        }
        self.datastores()
            .into_iter()
            .find(|d| d.name == name)
            .and_then(|d| d.guest_path())
    }

    /// `datastore::get_guest`: the first datastore holding `<name>/<name>.conf`.
    pub fn find_guest(&self, name: &str) -> Option<Guest> {
        // A name with a slash would escape the datastore; vm-bhyve's `-f` test would
        // happily follow it, but no valid guest name contains one.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return None;
        }
        self.datastores().into_iter().find_map(|d| {
            let path = d.guest_path()?;
            path.join(name)
                .join(format!("{name}.conf"))
                .is_file()
                .then(|| Guest {
                    name: name.to_string(),
                    ds: d.name.clone(),
                    ds_path: path,
                })
        })
    }

    /// The pid file standing for a process of `role` (`bhyve` or `loader`) of `name`.
    pub fn pid_file(&self, name: &str, role: &str) -> PathBuf {
        self.vm_dir.join(SIM_DIR).join(format!("{name}.{role}"))
    }

    /// The pid of the live `role` process of guest `name`, if any: what `pgrep -fx
    /// "bhyve: NAME"` (or the loader pgrep) would find.
    pub fn live_pid(&self, name: &str, role: &str) -> Option<u32> {
        let text = fs::read_to_string(self.pid_file(name, role)).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        process_matches(pid, &format!("_{role}"), name, &self.vm_dir).then_some(pid)
    }

    /// `vm::running_check`: the `STATE` of a guest before lock handling, and its pid.
    pub fn running_state(&self, name: &str) -> (String, Option<u32>) {
        if let Some(pid) = self.live_pid(name, "bhyve") {
            (format!("Running ({pid})"), Some(pid))
        } else if let Some(pid) = self.live_pid(name, "loader") {
            (format!("Bootloader ({pid})"), Some(pid))
        } else {
            ("Stopped".to_string(), None)
        }
    }

    /// Whether `/dev/vmm/NAME` would exist: the simulator ties the vmm instance to its
    /// bhyve or loader process, so a guest whose processes were killed leaves none
    /// behind (as after a host reboot) while its `run.lock` stays.
    pub fn vmm_exists(&self, name: &str) -> bool {
        self.live_pid(name, "bhyve").is_some()
            || self.live_pid(name, "loader").is_some()
            || self.vmm_file(name).exists()
    }

    /// The file standing for `/dev/vmm/NAME`: made when the loader or bhyve starts,
    /// removed by `_run`'s cleanup (`bhyvectl --destroy`). A guest whose `_run` and bhyve
    /// are both killed (`kill -9`) leaves it behind: a stale vmm entry, which makes `vm
    /// start` say the guest runs while `vm list` and `vm info` say it is stopped, until
    /// `bhyvectl --destroy --vm=NAME` (here `vm-sim bhyvectl ...`) removes it. A reboot
    /// clears it.
    pub fn vmm_file(&self, name: &str) -> PathBuf {
        self.vm_dir.join(SIM_DIR).join(format!("{name}.vmm"))
    }

    /// The file holding the number of the guest's tap device while `_run` runs.
    pub fn tap_file(&self, name: &str) -> PathBuf {
        self.vm_dir.join(SIM_DIR).join(format!("{name}.tap"))
    }

    /// `vm::confirm_stopped`: `Ok` when the guest may be treated as stopped, otherwise
    /// the warning and the return code (2 locked, 1 vmm exists).
    pub fn confirm_stopped(&self, guest: &Guest, skip_lock: bool) -> Result<(), (String, i32)> {
        if let Some(host) = guest.lock_host() {
            if host != self.hostname || !skip_lock {
                return Err((
                    format!("{} appears to be running on {host} (locked)", guest.name),
                    2,
                ));
            }
        }
        if self.vmm_exists(&guest.name) {
            return Err((
                format!("{} appears to be running locally (vmm exists)", guest.name),
                1,
            ));
        }
        Ok(())
    }
}

/// True when `pid` is a live (not zombie) simulator process whose arguments are
/// `<role> <name> <vm_dir>`. Reads `/proc`: the simulator runs on Linux.
pub fn process_matches(pid: u32, role: &str, name: &str, vm_dir: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last `)`: the command name may itself contain one.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, None | Some('Z') | Some('X') | Some('x')) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let dir = vm_dir.to_string_lossy();
    args.len() >= 4
        && args[1] == role.as_bytes()
        && args[2] == name.as_bytes()
        && args[3] == dir.as_bytes()
}

/// Sends `signal` (a `kill(1)` name such as `TERM`) to `pid`. `std` cannot signal an
/// arbitrary process and the workspace forbids `unsafe`, so this runs `kill`.
pub fn signal(pid: u32, signal: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Appends `msg` to a guest's `vm-bhyve.log` as `util::log` does ("Mon DD HH:MM:SS:
/// msg"). The simulator stamps in UTC.
pub fn guest_log(dir: &Path, msg: &str) {
    let line = format!("{}: {msg}\n", log_stamp(SystemTime::now()));
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vm-bhyve.log"))
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// `date "+%b %d %H:%M:%S"` in UTC.
pub fn log_stamp(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (_, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{} {:02} {:02}:{:02}:{:02}",
        MONTHS[(month - 1) as usize],
        day,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A fresh random UUID in `uuidgen`'s lower-case form.
pub fn uuid() -> String {
    if let Ok(u) = fs::read_to_string("/proc/sys/kernel/random/uuid") {
        let u = u.trim();
        if u.len() == 36 {
            return u.to_string();
        }
    }
    let mut b = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_stamps_look_like_bsd_date() {
        // 2024-02-29 13:05:09 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        assert_eq!(log_stamp(t), "Feb 29 13:05:09");
        assert_eq!(log_stamp(UNIX_EPOCH), "Jan 01 00:00:00");
    }

    #[test]
    fn uuids_have_the_uuidgen_shape() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
        assert_eq!(u, u.to_lowercase());
    }

    #[test]
    fn datastore_types_follow_the_spec_prefix() {
        let d = |s: &str| Datastore {
            name: "x".into(),
            spec: s.into(),
        };
        assert_eq!(d("/vm2").kind(), "directory");
        assert_eq!(d("zfs:pool/vm").kind(), "zfs");
        assert_eq!(d("iso:/isos").kind(), "iso");
        assert_eq!(d("img:/imgs").kind(), "img");
        assert_eq!(d("zfs:pool/vm").guest_path(), None);
    }
}
