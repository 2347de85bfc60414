//! The only way flotilla reads and changes VMs.
//!
//! [`Backend`] is deliberately small and synchronous: each call is one step a worker
//! takes (the agent runs them on blocking threads). Calls are idempotent where the
//! operation allows it: destroying an absent VM, starting a running one, stopping a
//! stopped one and switching autostart to what it already is all succeed without doing
//! anything. [`vm_bhyve::VmBhyve`] drives vm-bhyve's `vm` command; pointed at the
//! `vm-sim` binary it drives the simulator through the same command line.

pub mod vm_bhyve;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::actual::{ActualVm, Marker};
use flotilla_core::size::Size;

pub use vm_bhyve::{VmBhyve, VmBhyveConfig};

/// What `vm create` is asked to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// The guest name.
    pub name: String,
    /// The datastore (`-d`); `None` for `default`.
    pub datastore: Option<String>,
    /// The template under `$vm_dir/.templates/` without `.conf` (`-t`).
    pub template: String,
    /// Size of disk0 (`-s`); `None` keeps the template's `disk0_size` or vm-bhyve's 20G.
    pub disk_size: Option<Size>,
    /// vCPUs (`-c`); `None` keeps the template's.
    pub cpu: Option<u32>,
    /// Memory (`-m`); `None` keeps the template's.
    pub memory: Option<Size>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The VM was not running; nothing was done.
    AlreadyStopped,
    /// The guest shut down after the ACPI request.
    Shutdown,
    /// The guest ignored the ACPI request until the timeout and was powered off.
    PoweredOff,
}

/// Everything that can go wrong while reading or changing VMs. Failures of external
/// commands carry the command line, its exit code and its stderr.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A command could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({}): {}", exit_text(*.code), stderr.trim())]
    Command {
        /// The command line.
        command: String,
        /// Its exit code; `None` when a signal ended it.
        code: Option<i32>,
        /// What it printed on stdout.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command succeeded but printed something the backend cannot understand, or its
    /// effect is not there afterwards.
    #[error("unexpected result of `{command}`: {reason}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong, with the offending text.
        reason: String,
    },
    /// No guest of that name exists on this host.
    #[error("no VM named `{name}` on this host")]
    NotFound {
        /// The guest name.
        name: String,
    },
    /// A guest of that name already exists.
    #[error("VM `{name}` already exists in {}", .path.display())]
    AlreadyExists {
        /// The guest name.
        name: String,
        /// Its directory.
        path: PathBuf,
    },
    /// The operation needs a stopped VM.
    #[error("VM `{name}` is {state}; it must be stopped first")]
    NotStopped {
        /// The guest name.
        name: String,
        /// The `STATE` vm-bhyve reports.
        state: String,
    },
    /// A `run.lock` without a bhyve process. From another host it means the VM runs
    /// there (shared storage); from this host it is stale, left by a crash, and an
    /// operator has to look before anyone removes it.
    #[error("{}", locked_text(name, host, *stale, lock))]
    Locked {
        /// The guest name.
        name: String,
        /// The host named in `run.lock`.
        host: String,
        /// True when `host` is this host: a stale lock.
        stale: bool,
        /// The lock file.
        lock: PathBuf,
    },
    /// `vm start` refused (its `  ! ...` line) even though it exited 0.
    #[error("`{command}` did not start `{name}`: {message}")]
    StartRefused {
        /// The guest name.
        name: String,
        /// The command line.
        command: String,
        /// vm-bhyve's message without the `  ! ` marker.
        message: String,
    },
    /// `vm start` says the guest runs already while `vm info` says it is stopped and
    /// no `run.lock` exists: a stale `/dev/vmm/NAME` entry, left when a guest is killed
    /// together with its supervisor. Nothing starts it until an operator destroys the
    /// entry; a start, and `vm destroy` (`vmm exists`), are refused until then.
    #[error(
        "VM `{name}` has a stale vmm entry (/dev/vmm/{name}): vm-bhyve says the guest \
         appears to be running already, but it is stopped and has no run.lock; check that \
         no bhyve process of it is left, then run `bhyvectl --destroy --vm={name}`"
    )]
    StaleVmm {
        /// The guest name.
        name: String,
    },
    /// The guest's supervisor logged a fatal error; vm-bhyve reports those only in the
    /// guest's `vm-bhyve.log`.
    #[error("`{name}` failed to boot: {log}")]
    BootFailed {
        /// The guest name.
        name: String,
        /// The `fatal;` log lines.
        log: String,
    },
    /// A state was not reached in time.
    #[error("`{name}` did not become {wanted} within {waited:?} (last state: {last})")]
    Timeout {
        /// The guest name.
        name: String,
        /// The state waited for.
        wanted: &'static str,
        /// How long the backend waited.
        waited: Duration,
        /// The last `STATE` seen.
        last: String,
    },
    /// An argument the backend refuses to hand to vm-bhyve.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid (a VM name, a config key, ...).
        what: String,
        /// Why.
        reason: String,
    },
    /// A file in a guest's directory could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// flotilla's marker exists but is not valid JSON of the expected shape.
    #[error("marker {} is unreadable: {source}", .path.display())]
    Marker {
        /// The marker file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".to_string(),
    }
}

fn locked_text(name: &str, host: &str, stale: bool, lock: &std::path::Path) -> String {
    if stale {
        format!(
            "VM `{name}` has a stale run.lock from this host ({host}) but no bhyve process: \
             left by a crash; check the guest, then remove {} by hand",
            lock.display()
        )
    } else {
        format!(
            "VM `{name}` is locked by host {host} ({}): it runs there, or that host crashed",
            lock.display()
        )
    }
}

/// Reads and changes the VMs of one host.
pub trait Backend: Send + Sync {
    /// Every VM on the host, managed or not, sorted by name.
    fn list(&self) -> Result<Vec<ActualVm>, BackendError>;

    /// The directory that holds the host's VMs, where the host identity is kept (see
    /// `flotilla::agent::identity`); `None` for a backend without one.
    fn identity_dir(&self) -> Result<Option<PathBuf>, BackendError> {
        Ok(None)
    }

    /// The directories whose changes may change what [`Backend::list`] shows (the
    /// datastores), for the agent's watch; empty when there are none to watch.
    fn watch_dirs(&self) -> Result<Vec<PathBuf>, BackendError> {
        Ok(Vec::new())
    }

    /// How many times each outside command has run, by command (`vm list`, `sysrc`).
    fn invocations(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }

    /// The VM's vm-bhyve configuration (`<name>.conf`) as vm-bhyve reads it.
    fn read_config(&self, name: &str) -> Result<BTreeMap<String, String>, BackendError> {
        self.get(name)?
            .map(|v| v.config)
            .ok_or_else(|| BackendError::NotFound {
                name: name.to_string(),
            })
    }

    /// One VM, if it exists (as [`Backend::list`] would show it, without reading the
    /// others).
    fn get(&self, name: &str) -> Result<Option<ActualVm>, BackendError> {
        Ok(self.list()?.into_iter().find(|v| v.name == name))
    }

    /// Creates a VM from a template. Fails if the name exists.
    fn create(&self, spec: &CreateSpec) -> Result<(), BackendError>;

    /// Sets and removes keys of the VM's `<name>.conf` so that vm-bhyve reads the new
    /// values. Takes effect at the next boot.
    fn configure(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<(), BackendError>;

    /// Starts the VM and waits until it runs. Ok if it already runs.
    fn start(&self, name: &str) -> Result<(), BackendError>;

    /// Asks the guest to shut down, waits up to `timeout`, then powers it off.
    fn stop(&self, name: &str, timeout: Duration) -> Result<StopOutcome, BackendError>;

    /// Removes the VM and its disks. Ok if it does not exist; refused unless stopped.
    fn destroy(&self, name: &str) -> Result<(), BackendError>;

    /// Adds the VM to, or removes it from, the host's autostart list (`vm_list`).
    fn set_autostart(&self, name: &str, on: bool) -> Result<(), BackendError>;

    /// Installs `$vm_dir/.templates/<name>.conf` with `contents`, atomically.
    fn install_template(&self, name: &str, contents: &str) -> Result<(), BackendError>;

    /// flotilla's marker of the VM, if it has one.
    fn read_marker(&self, name: &str) -> Result<Option<Marker>, BackendError>;

    /// Writes flotilla's marker into the VM's directory, atomically.
    fn write_marker(&self, name: &str, marker: &Marker) -> Result<(), BackendError>;

    /// The VM's directory (hooks run with it).
    fn guest_dir(&self, name: &str) -> Result<PathBuf, BackendError>;

    /// Grows file disk `disk` (the N of `diskN_name`) of a stopped VM to `size`.
    /// Shrinking is refused: it would destroy guest data.
    fn grow_disk(&self, name: &str, disk: u32, size: Size) -> Result<(), BackendError>;
}
