//! The validated desired state.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// The desired state at one commit (or of one plain directory), parsed and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The commit id, hex; `None` for a plain directory.
    pub commit: Option<String>,
    /// `cluster.yaml`.
    pub cluster: Cluster,
    /// Every profile by name: the built-in ones and the repo's own.
    pub profiles: BTreeMap<String, Profile>,
    /// Every template by name: the built-in ones and the repo's own.
    pub templates: BTreeMap<String, Template>,
    /// Every desired VM by name, `every_host` VMs expanded to one per host.
    pub vms: BTreeMap<String, VmSpec>,
}

/// `cluster.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The cluster id; a VM is managed only if its marker names it.
    pub id: String,
    /// The hosts by name.
    pub hosts: BTreeMap<String, Host>,
    /// Cluster-wide policies.
    pub policies: Policies,
}

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Its name.
    pub name: String,
    /// `host:port` of its beanstalkd.
    pub beanstalkd: String,
    /// The next host of the hop chain; `None` ends the chain.
    pub next: Option<String>,
    /// What it may hold.
    pub limits: HostLimits,
}

/// What one host may hold, counting unmanaged VMs too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostLimits {
    /// Total guest memory.
    pub memory: Size,
    /// Total apparent size of the guests' disks.
    pub storage: Size,
    /// Number of guests.
    pub vms: u32,
}

/// Cluster-wide policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policies {
    /// How often each host reconciles without a trigger.
    pub reconcile_interval: Duration,
    /// The share (0..=1) of a host's managed VMs that one plan may destroy.
    pub prune_guard: f64,
    /// How often a create may be forwarded along the hop chain.
    pub hop_limit: u32,
    /// beanstalkd time-to-run of a job.
    pub ttr: Duration,
}

impl Default for Policies {
    fn default() -> Policies {
        Policies {
            reconcile_interval: Duration::from_secs(60),
            prune_guard: 0.5,
            hop_limit: 8,
            ttr: Duration::from_secs(3600),
        }
    }
}

/// A resource class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// Its name (the file's stem).
    pub name: String,
    /// Where it came from: `profiles/NAME.yaml`, or `built-in`.
    pub source: String,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory.
    pub memory: Size,
    /// Size of `disk0`.
    pub disk: Size,
    /// Swap inside `disk0`.
    pub swap: Size,
    /// The vm-bhyve template.
    pub template: String,
}

/// A vm-bhyve template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    /// Its name (the file's stem).
    pub name: String,
    /// Where it came from: `templates/NAME.conf`, or `built-in`.
    pub source: String,
    /// The file's text, installed as `$vm_dir/.templates/NAME.conf`.
    pub text: String,
    /// The keys as vm-bhyve reads them.
    pub config: BTreeMap<String, String>,
}

/// Whether a VM should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Running, and started at boot.
    #[default]
    Running,
    /// Stopped.
    Stopped,
}

/// What to do with drift that only a rebuild can fix (a smaller disk, another loader or
/// disk type, another host pin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplacePolicy {
    /// Report it as blocked drift (the default: a rebuild loses the guest's disk).
    #[default]
    Deny,
    /// Destroy and create the VM again.
    Allow,
}

/// One desired VM, with its profile applied and overrides resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmSpec {
    /// The vm-bhyve name.
    pub name: String,
    /// The file it is declared in.
    pub file: String,
    /// Its profile.
    pub profile: String,
    /// Its template.
    pub template: String,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory.
    pub memory: Size,
    /// Size of `disk0`'s image.
    pub disk: Size,
    /// Swap inside `disk0`.
    pub swap: Size,
    /// The host it must run on (`host`, or the host of an `every_host` instance): its
    /// create is never forwarded, and a VM found elsewhere is drift.
    pub host: Option<String>,
    /// The host its placement starts at (`start_at`): the create goes there first and
    /// the hop chain may place it further; wherever it is placed is where it belongs.
    pub start_at: Option<String>,
    /// Labels, matched exactly.
    pub tags: Vec<String>,
    /// Whether it should run.
    pub state: DesiredState,
    /// Whether it must never be destroyed (recorded in its marker).
    pub protect: bool,
    /// Whether drift may be fixed by a rebuild.
    pub replace: ReplacePolicy,
    /// The vm-bhyve config it should have: the template's keys (without the create-time
    /// `diskN_size`), then `cpu` and `memory`, then the VM's extra keys.
    pub config: BTreeMap<String, String>,
    /// Options for the pre/local/post hooks.
    pub hooks: BTreeMap<String, String>,
    /// Names of secrets the hooks get.
    pub secrets: Vec<String>,
    /// sha256 (hex) of the canonical JSON of everything above but `file`: it changes
    /// exactly when the spec does, and goes into the VM's marker.
    pub spec_hash: String,
}

impl VmSpec {
    /// The host whose reconciler owns the VM and where its create goes first, when the
    /// file names one (`host` or `start_at`).
    pub fn pin(&self) -> Option<&str> {
        self.host.as_deref().or(self.start_at.as_deref())
    }

    /// Computes [`VmSpec::spec_hash`] from the other fields.
    pub fn compute_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Canonical<'a> {
            name: &'a str,
            profile: &'a str,
            template: &'a str,
            cpu: u32,
            memory: u64,
            disk: u64,
            swap: u64,
            host: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            start_at: &'a Option<String>,
            tags: &'a [String],
            state: DesiredState,
            protect: bool,
            replace: ReplacePolicy,
            config: &'a BTreeMap<String, String>,
            hooks: &'a BTreeMap<String, String>,
            secrets: &'a [String],
        }
        let c = Canonical {
            name: &self.name,
            profile: &self.profile,
            template: &self.template,
            cpu: self.cpu,
            memory: self.memory.bytes(),
            disk: self.disk.bytes(),
            swap: self.swap.bytes(),
            host: &self.host,
            start_at: &self.start_at,
            tags: &self.tags,
            state: self.state,
            protect: self.protect,
            replace: self.replace,
            config: &self.config,
            hooks: &self.hooks,
            secrets: &self.secrets,
        };
        // Serializing plain structs and BTreeMaps cannot fail.
        let json = serde_json::to_vec(&c).unwrap_or_default();
        let digest = Sha256::digest(&json);
        let mut hex = String::with_capacity(64);
        for b in digest {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        hex
    }
}
