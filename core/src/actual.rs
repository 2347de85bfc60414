//! Actual state: what vm-bhyve really has on one host.
//!
//! Backends produce these values; the planner, capacity accounting and the inventory read
//! them. They describe every VM on the host, managed or not, because capacity counts
//! unmanaged VMs too and the planner must be able to prove it leaves them alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// The run state of a guest, as the `STATE` column of `vm list` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// `Running (PID)`: the bhyve process is alive.
    Running,
    /// `Stopped`.
    Stopped,
    /// `Bootloader (PID)`: the loader is running, the guest has not started yet.
    Bootloader,
    /// `Locked (HOST)`: a `run.lock` exists but no bhyve process; running elsewhere, or a
    /// stale lock left by a crash.
    Locked,
}

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The `diskN_name` value, e.g. `disk0.img`.
    pub name: String,
    /// The `diskN_dev` value (`file` when absent).
    pub dev: String,
    /// The apparent size of the image (its length, not the blocks in use).
    pub size: Size,
}

impl Disk {
    /// True for a file image: the only kind of disk flotilla can size and grow. A device
    /// (`custom`, a zvol, iSCSI) reads as 0 or as what its owner made it, and is never
    /// compared by size.
    pub fn growable(&self) -> bool {
        self.dev.is_empty() || self.dev == "file"
    }
}

/// flotilla's ownership marker, kept in the guest's directory. A VM without one (or with
/// one for another cluster) is unmanaged and never touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Version of the marker format.
    pub format_version: u32,
    /// The cluster id from `cluster.yaml`; a marker of another cluster means "unmanaged here".
    pub cluster: String,
    /// The id of the create job that made the VM; lets a redelivered create recognise its work.
    pub job_id: String,
    /// Hash of the VM spec the VM was last made equal to.
    pub spec_hash: String,
    /// The desired commit the VM was last made equal to.
    pub commit: String,
    /// The host whose reconciler owns the VM.
    pub owner: String,
    /// Whether the VM is protected from destruction (kept here so that deleting its YAML
    /// does not bypass the protection).
    pub protect: bool,
    /// True while a create is still in progress: a marker with `complete: false` marks a
    /// half-made VM that a retried create finishes or cleans up.
    #[serde(default = "yes")]
    pub complete: bool,
    /// Where the hop chain started when it placed the VM on another host than its first
    /// (the first host that refused it); `None` when built where it was sent. Wherever
    /// the chain placed a VM is where it belongs: this says why it is here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_from: Option<String>,
}

fn yes() -> bool {
    true
}

impl Marker {
    /// The current marker format.
    pub const FORMAT_VERSION: u32 = 1;
    /// The marker's file name inside the guest directory.
    pub const FILE_NAME: &'static str = "flotilla.json";
}

/// One guest as vm-bhyve sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualVm {
    /// The guest name (its directory and `.conf` name).
    pub name: String,
    /// The datastore holding it (`default` for `$vm_dir`).
    pub datastore: String,
    /// Every key of `<name>.conf` as vm-bhyve reads it (first assignment wins).
    pub config: BTreeMap<String, String>,
    /// `cpu` from the config (0 when missing or unparsable).
    pub cpu: u32,
    /// `memory` from the config (0 when missing or unparsable).
    pub memory: Size,
    /// The guest's disks in `diskN` order.
    pub disks: Vec<Disk>,
    /// The run state.
    pub state: RunState,
    /// Position in `vm_list` (1-based), when the guest is started at boot.
    pub autostart: Option<u32>,
    /// flotilla's marker, when present and readable.
    pub marker: Option<Marker>,
}

impl ActualVm {
    /// True when the VM carries a marker of `cluster`: only such VMs may be changed.
    pub fn is_managed_by(&self, cluster: &str) -> bool {
        self.marker.as_ref().is_some_and(|m| m.cluster == cluster)
    }

    /// Total apparent size of the guest's disks.
    pub fn storage(&self) -> Size {
        Size(self.disks.iter().map(|d| d.size.0).sum())
    }
}

/// Everything one host has.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostActual {
    /// The host's name in `cluster.yaml`.
    pub host: String,
    /// Every guest, sorted by name.
    pub vms: Vec<ActualVm>,
}

/// A guest for tests: `memory` and disk sizes as in the desired files ("512M").
#[cfg(any(test, feature = "testing"))]
pub fn sample_vm(name: &str, memory: &str, disks: &[&str], state: RunState) -> ActualVm {
    ActualVm {
        name: name.into(),
        datastore: "default".into(),
        config: BTreeMap::new(),
        cpu: 1,
        memory: memory.parse().unwrap(),
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, s)| Disk {
                name: format!("disk{i}.img"),
                dev: "file".into(),
                size: s.parse().unwrap(),
            })
            .collect(),
        state,
        autostart: None,
        marker: None,
    }
}

/// A marker for tests: this `cluster`'s (or another's), protect and complete as given.
#[cfg(any(test, feature = "testing"))]
pub fn marker(protect: bool, complete: bool, cluster: &str) -> Marker {
    Marker {
        format_version: Marker::FORMAT_VERSION,
        cluster: cluster.into(),
        job_id: "job".into(),
        spec_hash: "old".into(),
        commit: "old".into(),
        owner: "host1".into(),
        protect,
        placed_from: None,
        complete,
    }
}

/// A VM as a worker would build it from `spec` (tests).
#[cfg(any(test, feature = "testing"))]
pub fn built(spec: &crate::desired::VmSpec) -> ActualVm {
    let mut config = spec.config.clone();
    config.insert("uuid".into(), format!("uuid-{}", spec.name));
    config.insert("network0_mac".into(), "58:9c:fc:00:00:01".into());
    ActualVm {
        name: spec.name.clone(),
        datastore: "default".into(),
        cpu: spec.cpu,
        memory: spec.memory,
        config,
        disks: vec![Disk {
            name: "disk0.img".into(),
            dev: "file".into(),
            size: spec.disk,
        }],
        state: match spec.state {
            crate::desired::DesiredState::Running => RunState::Running,
            crate::desired::DesiredState::Stopped => RunState::Stopped,
        },
        // The worker puts a VM that runs into vm_list.
        autostart: (spec.state == crate::desired::DesiredState::Running).then_some(1),
        marker: Some(Marker {
            spec_hash: spec.spec_hash.clone(),
            protect: spec.protect,
            ..marker(spec.protect, true, "lab")
        }),
    }
}
