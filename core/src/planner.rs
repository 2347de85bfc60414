//! The planner: what it takes to make the hosts' actual state equal to a snapshot.
//!
//! [`plan`] is a pure function of its inputs: no I/O, no clock, no randomness, and its
//! output is sorted, so the same inputs always give the same plan, byte for byte.
//!
//! Rules, in the order they bite:
//! - Only VMs whose marker names this cluster are managed; nothing is ever planned for
//!   any other VM. A desired name held by an unmanaged VM is reported, not created.
//! - A desired VM that no host has is created, sent first to its owner (the `host` pin,
//!   else rendezvous hashing over the hosts: see [`crate::owner`]), unless a create for
//!   it is in flight.
//! - A managed VM whose vm-bhyve config differs is updated in place (keys set and
//!   removed; a restart when it runs). Keys vm-bhyve writes itself are ignored: `uuid`,
//!   `diskN_size` (removed at create), and `networkN_mac` unless the spec sets it.
//! - A larger disk grows in place. A smaller disk, another loader, another disk type,
//!   device or image name, or another pinned host can only be fixed by a rebuild: a
//!   replace when the VM says `replace: allow`, else blocked drift.
//! - A managed VM no longer desired is destroyed, except: never when protected (as
//!   recorded in its marker, so deleting the YAML does not bypass it); never when the
//!   snapshot lists no VMs at all, unless [`PlanOptions::allow_empty`]; and not when a
//!   host would lose more than the prune-guard share of its managed VMs, unless
//!   [`PlanOptions::allow_prune`]. Refused destroys are reported as blocked.
//! - A create whose unique resources (a disk device or path outside its directory, a
//!   MAC, a fixed VNC port: [`unique_resources`]) another actual VM holds, on any host,
//!   managed or not, is not planned until that VM is gone: a rename destroys the old VM
//!   first. A protected or unmanaged holder blocks it for good, with the reason.
//! - A managed VM that runs as desired but is missing from the host's autostart list
//!   (`vm_list`), or is stopped as desired but still in it, gets an update of its
//!   autostart entry alone: after a reboot it must come up as it is now.
//! - A VM whose marker says `complete: false` is a half-made create: desired, it gets a
//!   create again (which finishes or cleans it up); not desired, it is destroyed.
//! - A VM with any job in flight, of whatever kind, gets no action (safety rule 10), and
//!   no VM gets more than one action in a plan: what is left is planned once the job in
//!   flight has ended.
//!
//! The planner trusts the caller to pass every host's actual state. A cluster host with
//! no actual state is named in [`Plan::warnings`]: VMs it holds are unseen, so creates
//! planned for them could duplicate them, and an agent must not emit such a plan.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::actual::{ActualVm, HostActual, RunState};
use crate::desired::{DesiredState, ReplacePolicy, Snapshot, VmSpec};
use crate::size::Size;

/// The kinds of action, as named in intents, JSON and summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Build a VM.
    Create,
    /// Change config keys in place.
    Update,
    /// Grow `disk0`.
    GrowDisk,
    /// Destroy and build again.
    Replace,
    /// Start.
    Start,
    /// Stop.
    Stop,
    /// Destroy.
    Destroy,
}

/// A job already on its way; the planner plans nothing else for its VM until it has
/// ended. The caller drops intents whose deadline has passed before calling [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The VM.
    pub vm: String,
    /// What is being done to it.
    pub kind: Kind,
    /// The host it was sent to, when known.
    #[serde(default)]
    pub host: Option<String>,
}

/// Overrides of the safety guards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Destroy even when a host would lose more than the prune-guard share of its
    /// managed VMs.
    pub allow_prune: bool,
    /// Destroy even when the snapshot lists no VMs at all.
    pub allow_empty: bool,
}

/// One config key that changes: `from` is the actual value, `to` the desired one; `None`
/// means absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The vm-bhyve key.
    pub key: String,
    /// Its actual value.
    pub from: Option<String>,
    /// Its desired value.
    pub to: Option<String>,
}

/// One step towards the desired state, on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Build a VM: the job goes to `host` (its owner, or the host of a half-made VM),
    /// which builds it or forwards it along the hop chain.
    Create {
        /// Where the job goes first.
        host: String,
        /// The VM's name.
        vm: String,
        /// The host whose reconciler emits the job.
        owner: String,
        /// True when a half-made VM of an earlier create is there to finish.
        resume: bool,
        /// Everything to build, including resources and the spec hash.
        spec: Box<VmSpec>,
    },
    /// Change vm-bhyve config keys and the marker in place.
    Update {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
        /// The keys that change, sorted by key.
        changes: Vec<Change>,
        /// The new `protect` flag for the marker, when it changes.
        protect: Option<bool>,
        /// Whether the VM must be added to (`true`) or removed from (`false`) the
        /// host's autostart list, when that differs from its desired state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        autostart: Option<bool>,
        /// True when the VM runs and must restart for the change to take effect.
        restart: bool,
        /// The spec hash recorded in the marker once done.
        spec_hash: String,
        /// The whole desired config, for showing the change in context.
        config: BTreeMap<String, String>,
    },
    /// Grow `disk0` to the desired size.
    GrowDisk {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
        /// The disk's image name.
        disk: String,
        /// Its size now.
        from: Size,
        /// Its desired size.
        to: Size,
        /// True when the VM runs (the guest sees the new size after a restart).
        restart: bool,
    },
    /// Destroy the VM on `host` and build it again from its spec (sent to `owner`).
    Replace {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
        /// The host whose reconciler emits the create.
        owner: String,
        /// Why an update cannot do.
        reasons: Vec<String>,
        /// The config keys that change.
        changes: Vec<Change>,
        /// What to build.
        spec: Box<VmSpec>,
    },
    /// Start the VM.
    Start {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
    },
    /// Stop the VM.
    Stop {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
    },
    /// Destroy the VM, stopping it first if it runs.
    Destroy {
        /// The host that has the VM.
        host: String,
        /// The VM's name.
        vm: String,
        /// True when it runs now.
        running: bool,
    },
}

impl Action {
    /// The host the action is for.
    pub fn host(&self) -> &str {
        match self {
            Action::Create { host, .. }
            | Action::Update { host, .. }
            | Action::GrowDisk { host, .. }
            | Action::Replace { host, .. }
            | Action::Start { host, .. }
            | Action::Stop { host, .. }
            | Action::Destroy { host, .. } => host,
        }
    }

    /// The VM the action is for.
    pub fn vm(&self) -> &str {
        match self {
            Action::Create { vm, .. }
            | Action::Update { vm, .. }
            | Action::GrowDisk { vm, .. }
            | Action::Replace { vm, .. }
            | Action::Start { vm, .. }
            | Action::Stop { vm, .. }
            | Action::Destroy { vm, .. } => vm,
        }
    }

    /// The action's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Action::Create { .. } => Kind::Create,
            Action::Update { .. } => Kind::Update,
            Action::GrowDisk { .. } => Kind::GrowDisk,
            Action::Replace { .. } => Kind::Replace,
            Action::Start { .. } => Kind::Start,
            Action::Stop { .. } => Kind::Stop,
            Action::Destroy { .. } => Kind::Destroy,
        }
    }
}

/// Why something that differs is not planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    /// Drift only a rebuild fixes, and the VM does not allow one.
    Drift,
    /// A destroy of a protected VM.
    Protected,
    /// Destroys over the prune-guard share of a host's managed VMs.
    PruneGuard,
    /// Destroys while the snapshot lists no VMs.
    EmptyDesired,
    /// The desired name belongs to an unmanaged VM.
    NameTaken,
    /// The same managed VM exists on more than one host.
    Duplicate,
    /// The VM has a run lock but no process: its state is unknown.
    Locked,
    /// The host is not in `cluster.yaml`.
    UnknownHost,
    /// The VM is on a host that left `cluster.yaml` (its last inventory is known): it
    /// exists, so it is not created elsewhere until that host shows it gone or an
    /// operator says the host is gone for good (`flotilla host forget`).
    HeldByRemovedHost,
    /// A create whose unique resource (a disk device or path outside its directory, a
    /// MAC, a VNC port) another VM holds: it waits until that VM is gone, and says so.
    ResourceTaken,
    /// A VM imported by `flotilla import` (its marker says so) that no VM file desires
    /// yet: never destroyed until its file is committed.
    Imported,
}

/// A difference the plan leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    /// The host.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// The rule that blocks it.
    pub reason: BlockReason,
    /// Details for the operator.
    pub detail: String,
}

/// Everything planned for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostPlan {
    /// The host.
    pub host: String,
    /// Actions, sorted by VM then kind.
    pub actions: Vec<Action>,
    /// Blocked differences, sorted by VM.
    pub blocked: Vec<Blocked>,
}

/// The plan: actions per host, in host order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The desired commit it was made from.
    pub commit: Option<String>,
    /// The cluster id.
    pub cluster: String,
    /// Hosts with actions or blocked differences, sorted by name.
    pub hosts: Vec<HostPlan>,
    /// Jobs already in flight that the plan did not repeat, sorted.
    pub pending: Vec<InFlight>,
    /// Things the operator should know (hosts without actual state, unknown hosts).
    pub warnings: Vec<String>,
}

/// Counts of a plan, for the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Creates.
    pub create: usize,
    /// Updates in place.
    pub update: usize,
    /// Disk grows.
    pub grow_disk: usize,
    /// Replaces.
    pub replace: usize,
    /// Starts.
    pub start: usize,
    /// Stops.
    pub stop: usize,
    /// Destroys.
    pub destroy: usize,
    /// Blocked differences.
    pub blocked: usize,
    /// Jobs in flight.
    pub pending: usize,
}

impl Plan {
    /// Every action, host by host.
    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.hosts.iter().flat_map(|h| h.actions.iter())
    }

    /// Every blocked difference, host by host.
    pub fn blocked(&self) -> impl Iterator<Item = &Blocked> {
        self.hosts.iter().flat_map(|h| h.blocked.iter())
    }

    /// The counts.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            pending: self.pending.len(),
            ..Summary::default()
        };
        for a in self.actions() {
            *match a.kind() {
                Kind::Create => &mut s.create,
                Kind::Update => &mut s.update,
                Kind::GrowDisk => &mut s.grow_disk,
                Kind::Replace => &mut s.replace,
                Kind::Start => &mut s.start,
                Kind::Stop => &mut s.stop,
                Kind::Destroy => &mut s.destroy,
            } += 1;
        }
        s.blocked = self.blocked().count();
        s
    }

    /// True when actual differs from desired: there are actions or blocked differences.
    /// Jobs in flight alone do not count: nothing new is to be done.
    pub fn has_changes(&self) -> bool {
        self.hosts
            .iter()
            .any(|h| !h.actions.is_empty() || !h.blocked.is_empty())
    }
}

/// The planner's actual-state inputs saved to a file (`flotilla plan --inventory FILE`),
/// for planning offline or in the CI of the desired repo:
///
/// ```json
/// { "format_version": 1,
///   "hosts": [ { "host": "host1", "vms": [ ...ActualVm... ] } ],
///   "in_flight": [ { "vm": "web3", "kind": "create", "host": "host2" } ] }
/// ```
///
/// `in_flight` may be left out. A bare JSON list of hosts is read as well.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// [`StateFile::FORMAT_VERSION`].
    pub format_version: u32,
    /// Every host's actual state.
    pub hosts: Vec<HostActual>,
    /// Jobs in flight.
    #[serde(default)]
    pub in_flight: Vec<InFlight>,
}

impl StateFile {
    /// The format this build writes and reads.
    pub const FORMAT_VERSION: u32 = 1;

    /// Parses a state file (or a bare list of hosts).
    pub fn from_json(text: &str) -> Result<StateFile, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            File(StateFile),
            Hosts(Vec<HostActual>),
        }
        match serde_json::from_str::<Either>(text) {
            Ok(Either::File(f)) => Ok(f),
            Ok(Either::Hosts(hosts)) => Ok(StateFile {
                format_version: StateFile::FORMAT_VERSION,
                hosts,
                in_flight: Vec::new(),
            }),
            // The untagged error says nothing useful; report the object form's error.
            Err(_) => serde_json::from_str::<StateFile>(text),
        }
    }
}

/// True for keys vm-bhyve writes itself, which the desired config never has to match.
fn generated(key: &str, desired: &BTreeMap<String, String>) -> bool {
    key == "uuid"
        || matches!(disk_key(key), Some((_, "size")))
        || (matches!(network_key(key), Some((_, "mac"))) && !desired.contains_key(key))
}

fn indexed<'a>(key: &'a str, prefix: &str) -> Option<(u32, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let n = rest.get(..digits)?.parse().ok()?;
    Some((n, rest[digits..].strip_prefix('_')?))
}

fn disk_key(key: &str) -> Option<(u32, &str)> {
    indexed(key, "disk")
}

fn network_key(key: &str) -> Option<(u32, &str)> {
    indexed(key, "network")
}

/// How much the guest builder adds to `disk0` beyond the spec's size (GPT and boot
/// partition); an image up to this much larger than desired matches.
pub const BUILDER_PAD: Size = Size::mib(8);

/// The resources in a vm-bhyve config that no two VMs may share, as `(key, value)`: a
/// disk named by an absolute path or as a custom device (outside the VM's own
/// directory), a MAC address (any case), a fixed VNC port (`graphics_port`). Two VMs
/// holding one would run on one disk, or fight over an address or a port.
pub fn unique_resources(config: &BTreeMap<String, String>) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    for (key, value) in config {
        match (disk_key(key), network_key(key)) {
            (Some((n, "name")), _) => {
                let custom = config
                    .get(&format!("disk{n}_dev"))
                    .is_some_and(|d| d == "custom");
                if value.starts_with('/') || custom {
                    out.push((key.as_str(), value.clone()));
                }
            }
            (_, Some((_, "mac"))) => out.push((key.as_str(), value.to_ascii_lowercase())),
            _ if key == "graphics_port" => out.push((key.as_str(), value.trim().to_string())),
            _ => {}
        }
    }
    out
}

/// The VM other than `spec` holding one of the unique resources `spec` would be built
/// with, as a block reason's detail, or `None` when all are free.
fn resource_holder(
    spec: &VmSpec,
    held: &HashMap<(&str, String), Vec<(&str, &ActualVm)>>,
    cluster: &str,
) -> Option<String> {
    for (key, value) in unique_resources(&spec.config) {
        let kind = resource_kind(key);
        let holders = held
            .get(&(kind, value.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let Some((host, vm)) = holders.iter().find(|(_, vm)| vm.name != spec.name) else {
            continue;
        };
        let what = format!("{key} {value} is held by");
        return Some(if !vm.is_managed_by(cluster) {
            format!(
                "{what} the unmanaged VM {} on {host}; flotilla does not touch it, so `{}` is not created while it holds it",
                vm.name, spec.name
            )
        } else if vm.marker.as_ref().is_some_and(|m| m.protect) {
            format!(
                "{what} {} on {host}, which is protected (recorded in its marker); `{}` is not created while it holds it",
                vm.name, spec.name
            )
        } else {
            format!(
                "{what} {} on {host}; `{}` is created once that VM is gone",
                vm.name, spec.name
            )
        });
    }
    None
}

/// What kind of resource a key of [`unique_resources`] names: disks, MACs and VNC
/// ports are compared among their own kind, whatever the key's index.
fn resource_kind(key: &str) -> &'static str {
    if disk_key(key).is_some() {
        "disk"
    } else if network_key(key).is_some() {
        "mac"
    } else {
        "vnc"
    }
}

/// Keys whose change needs a new VM: another loader, or another disk layout.
fn needs_rebuild(key: &str) -> bool {
    key == "loader" || matches!(disk_key(key), Some((_, "type" | "dev" | "name")))
}

/// Values equal as vm-bhyve reads them (`memory=1024M` is `memory=1G`).
fn same_value(key: &str, actual: &str, desired: &str) -> bool {
    if actual == desired {
        return true;
    }
    match key {
        "memory" => matches!(
            (actual.parse::<Size>(), desired.parse::<Size>()),
            (Ok(a), Ok(d)) if a == d
        ),
        "cpu" => matches!(
            (actual.trim().parse::<u32>(), desired.trim().parse::<u32>()),
            (Ok(a), Ok(d)) if a == d
        ),
        _ => false,
    }
}

/// The config keys to change so that `actual` reads as `desired`.
pub fn config_changes(
    actual: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> Vec<Change> {
    let mut out = Vec::new();
    for (k, v) in desired {
        match actual.get(k) {
            Some(a) if same_value(k, a, v) => {}
            a => out.push(Change {
                key: k.clone(),
                from: a.cloned(),
                to: Some(v.clone()),
            }),
        }
    }
    for (k, v) in actual {
        if !desired.contains_key(k) && !generated(k, desired) {
            out.push(Change {
                key: k.clone(),
                from: Some(v.clone()),
                to: None,
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn is_running(state: RunState) -> bool {
    matches!(state, RunState::Running | RunState::Bootloader)
}

struct Builder {
    hosts: BTreeMap<String, HostPlan>,
}

impl Builder {
    fn host(&mut self, host: &str) -> &mut HostPlan {
        self.hosts
            .entry(host.to_string())
            .or_insert_with(|| HostPlan {
                host: host.to_string(),
                ..HostPlan::default()
            })
    }
    fn act(&mut self, a: Action) {
        let host = a.host().to_string();
        self.host(&host).actions.push(a);
    }
    fn block(&mut self, host: &str, vm: &str, reason: BlockReason, detail: String) {
        self.host(host).blocked.push(Blocked {
            host: host.to_string(),
            vm: vm.to_string(),
            reason,
            detail,
        });
    }
}

/// Plans the actions that make `actual` (every host's state) equal to `desired`,
/// skipping what `in_flight` already does. See the module documentation for the rules.
pub fn plan(
    desired: &Snapshot,
    actual: &[HostActual],
    in_flight: &[InFlight],
    options: &PlanOptions,
) -> Plan {
    let cluster = &desired.cluster;
    let host_names: Vec<&str> = cluster.hosts.keys().map(String::as_str).collect();
    let mut b = Builder {
        hosts: BTreeMap::new(),
    };
    let mut warnings = Vec::new();
    let mut pending: Vec<InFlight> = Vec::new();

    // Safety rule 10: one job in flight per VM, whatever its kind, so the lookup is by
    // VM alone.
    let flying = |vm: &str| busy(in_flight, vm);

    // Index the actual state by VM name. Several entries for one name mean duplicates
    // or name clashes; hosts are visited in name order so the index is deterministic.
    let mut sorted_actual: Vec<&HostActual> = actual.iter().collect();
    sorted_actual.sort_by(|a, b| a.host.cmp(&b.host));
    let mut managed: HashMap<&str, Vec<(&str, &ActualVm)>> = HashMap::new();
    let mut unmanaged: HashMap<&str, &str> = HashMap::new();
    let mut managed_count: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &sorted_actual {
        let known = cluster.hosts.contains_key(&h.host);
        if !known {
            warnings.push(format!(
                "host `{}` is not in cluster.yaml: its VMs are left alone",
                h.host
            ));
        }
        for vm in &h.vms {
            if vm.is_managed_by(&cluster.id) {
                managed.entry(&vm.name).or_default().push((&h.host, vm));
                if known {
                    *managed_count.entry(&h.host).or_default() += 1;
                }
            } else {
                unmanaged.entry(&vm.name).or_insert(&h.host);
            }
        }
    }
    // Issue 14, case 5: the unique resources every actual VM holds, on any host,
    // managed or not: a create that would share one waits for the holder to be gone.
    let mut held: HashMap<(&str, String), Vec<(&str, &ActualVm)>> = HashMap::new();
    for h in &sorted_actual {
        for vm in &h.vms {
            for (key, value) in unique_resources(&vm.config) {
                held.entry((resource_kind(key), value))
                    .or_default()
                    .push((&h.host, vm));
            }
        }
    }
    for name in &host_names {
        if !sorted_actual.iter().any(|h| h.host == *name) {
            warnings.push(format!(
                "no actual state for host `{name}`: VMs there are unseen, and creates planned for them could duplicate them"
            ));
        }
    }

    for spec in desired.vms.values() {
        let owner = crate::owner::owner(&spec.name, spec.pin(), host_names.iter().copied())
            .unwrap_or_default()
            .to_string();
        let found = managed
            .get(spec.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match found {
            [] => {
                // An unmanaged VM under a name whose create is in flight is that create's
                // VM before its marker is written: pending, not someone else's name.
                let creating = flying(&spec.name).filter(|f| f.kind == Kind::Create);
                if let Some(f) = creating {
                    pending.push(f.clone());
                } else if let Some(host) = unmanaged.get(spec.name.as_str()) {
                    b.block(
                        host,
                        &spec.name,
                        BlockReason::NameTaken,
                        format!(
                            "an unmanaged VM named `{}` exists on {host}; flotilla does not touch it nor create another",
                            spec.name
                        ),
                    );
                } else if let Some(f) = flying(&spec.name) {
                    pending.push(f.clone());
                } else if let Some(detail) = resource_holder(spec, &held, &cluster.id) {
                    b.block(&owner, &spec.name, BlockReason::ResourceTaken, detail);
                } else {
                    b.act(Action::Create {
                        host: owner.clone(),
                        vm: spec.name.clone(),
                        owner,
                        resume: false,
                        spec: Box::new(spec.clone()),
                    });
                }
            }
            [(host, _)] if !cluster.hosts.contains_key(*host) => {
                b.block(
                    host,
                    &spec.name,
                    BlockReason::HeldByRemovedHost,
                    format!(
                        "`{}` runs on {host}, which left cluster.yaml; it is not created elsewhere until {host} shows it gone, or `flotilla host forget {host}` says the host is gone for good",
                        spec.name
                    ),
                );
            }
            [(host, vm)] => {
                plan_existing(&mut b, &mut pending, in_flight, spec, host, vm, owner);
            }
            many => {
                let hosts: Vec<&str> = many.iter().map(|(h, _)| *h).collect();
                for h in &hosts {
                    b.block(
                        h,
                        &spec.name,
                        BlockReason::Duplicate,
                        format!(
                            "managed VM `{}` exists on {}; remove all but one by hand",
                            spec.name,
                            hosts.join(", ")
                        ),
                    );
                }
            }
        }
    }

    // Destroys, host by host, under the guards.
    let mut candidates: BTreeMap<&str, Vec<&ActualVm>> = BTreeMap::new();
    for h in &sorted_actual {
        if !cluster.hosts.contains_key(&h.host) {
            continue;
        }
        for vm in &h.vms {
            if vm.is_managed_by(&cluster.id) && !desired.vms.contains_key(&vm.name) {
                candidates.entry(&h.host).or_default().push(vm);
            }
        }
    }
    let share = cluster.policies.prune_guard;
    for (host, vms) in candidates {
        let mut destroys = Vec::new();
        for vm in vms {
            if vm.marker.as_ref().is_some_and(|m| m.protect) {
                b.block(
                    host,
                    &vm.name,
                    BlockReason::Protected,
                    "not desired any more, but protected (recorded in its marker); clear protect first".to_string(),
                );
            } else if crate::control::imported(vm) {
                // Marked managed by `flotilla import` before its file is committed.
                b.block(
                    host,
                    &vm.name,
                    BlockReason::Imported,
                    "imported: commit its VM file".to_string(),
                );
            } else if let Some(f) = flying(&vm.name) {
                pending.push(f.clone());
            } else {
                destroys.push(vm);
            }
        }
        if destroys.is_empty() {
            continue;
        }
        let managed_here = managed_count.get(host).copied().unwrap_or(0);
        let refusal = if desired.vms.is_empty() && !options.allow_empty {
            Some((
                BlockReason::EmptyDesired,
                "the desired state lists no VMs at all; nothing is destroyed without --allow-empty"
                    .to_string(),
            ))
        } else if !options.allow_prune && destroys.len() as f64 > share * managed_here as f64 {
            Some((
                BlockReason::PruneGuard,
                format!(
                    "{} of {managed_here} managed VMs on {host} would be destroyed, more than the prune guard's {}%; pass --allow-prune to proceed",
                    destroys.len(),
                    (share * 100.0).round()
                ),
            ))
        } else {
            None
        };
        for vm in destroys {
            match &refusal {
                Some((reason, detail)) => b.block(host, &vm.name, *reason, detail.clone()),
                None => b.act(Action::Destroy {
                    host: host.to_string(),
                    vm: vm.name.clone(),
                    running: is_running(vm.state) || vm.state == RunState::Locked,
                }),
            }
        }
    }

    let mut hosts: Vec<HostPlan> = b.hosts.into_values().collect();
    for h in &mut hosts {
        h.actions
            .sort_by(|x, y| x.vm().cmp(y.vm()).then(x.kind().cmp(&y.kind())));
        h.blocked
            .sort_by(|x, y| x.vm.cmp(&y.vm).then(x.reason.cmp(&y.reason)));
    }
    pending.sort_by(|x, y| x.vm.cmp(&y.vm).then(x.kind.cmp(&y.kind)));
    pending.dedup();
    Plan {
        commit: desired.commit.clone(),
        cluster: cluster.id.clone(),
        hosts,
        pending,
        warnings,
    }
}

/// The job in flight for `vm`, of whatever kind: the first in sorted order, so the plan
/// does not depend on the order of `in_flight`.
fn busy<'a>(in_flight: &'a [InFlight], vm: &str) -> Option<&'a InFlight> {
    in_flight
        .iter()
        .filter(|f| f.vm == vm)
        .min_by(|x, y| x.kind.cmp(&y.kind).then(x.host.cmp(&y.host)))
}

/// Plans for a desired VM that exists, managed, on `host`: at most one action.
fn plan_existing(
    b: &mut Builder,
    pending: &mut Vec<InFlight>,
    in_flight: &[InFlight],
    spec: &VmSpec,
    host: &str,
    vm: &ActualVm,
    owner: String,
) {
    if let Some(f) = busy(in_flight, &spec.name) {
        pending.push(f.clone());
        return;
    }
    let marker = vm.marker.as_ref();
    if marker.is_some_and(|m| !m.complete) {
        let action = match spec.host.as_deref() {
            // Half-made on a host its pin no longer names: nothing there is worth
            // keeping, so it is rebuilt where it belongs whatever `replace` says.
            Some(pin) if pin != host && marker.is_some_and(|m| m.protect) => {
                b.block(
                    host,
                    &spec.name,
                    BlockReason::Protected,
                    format!("half-made by an earlier create on {host}, but pinned to {pin}; it is protected, so it is not rebuilt"),
                );
                return;
            }
            Some(pin) if pin != host => Action::Replace {
                host: host.to_string(),
                vm: spec.name.clone(),
                owner,
                reasons: vec![format!(
                    "half-made by an earlier create on {host}, but pinned to {pin}"
                )],
                changes: Vec::new(),
                spec: Box::new(spec.clone()),
            },
            _ => Action::Create {
                host: host.to_string(),
                vm: spec.name.clone(),
                owner,
                resume: true,
                spec: Box::new(spec.clone()),
            },
        };
        b.act(action);
        return;
    }

    let changes = config_changes(&vm.config, &spec.config);
    let mut reasons: Vec<String> = changes
        .iter()
        .filter(|c| needs_rebuild(&c.key))
        .map(|c| match (&c.from, &c.to) {
            (Some(f), Some(t)) => format!("{} changes from {f} to {t}", c.key),
            (None, Some(t)) => format!("{} is added ({t})", c.key),
            (Some(f), None) => format!("{} ({f}) is removed", c.key),
            (None, None) => c.key.clone(),
        })
        .collect();
    // Only a file image can be sized and grown (issue 14, case 3): a device's size says
    // nothing about drift, and a grow of it would stop the VM for nothing.
    let disk0 = vm.disks.first().filter(|d| d.growable());
    if let Some(d) = disk0 {
        // The FreeBSD guest builder (host/provision/provision.sh) grows the image by
        // BUILDER_PAD for the partition table and boot partition: that is not drift.
        if d.size.bytes() > spec.disk.bytes().saturating_add(BUILDER_PAD.bytes()) {
            reasons.push(format!(
                "disk0 would shrink from {} to {}",
                d.size, spec.disk
            ));
        }
    }
    if let Some(pin) = &spec.host {
        if pin != host {
            reasons.push(format!("pinned to {pin} but it is on {host}"));
        }
    }
    let running = is_running(vm.state);

    if !reasons.is_empty() {
        let protected = marker.is_some_and(|m| m.protect);
        if spec.replace == ReplacePolicy::Allow && !protected {
            b.act(Action::Replace {
                host: host.to_string(),
                vm: spec.name.clone(),
                owner,
                reasons,
                changes,
                spec: Box::new(spec.clone()),
            });
        } else {
            let why = if protected {
                "it is protected"
            } else {
                "it does not allow a replace (replace: allow)"
            };
            b.block(
                host,
                &spec.name,
                if protected {
                    BlockReason::Protected
                } else {
                    BlockReason::Drift
                },
                format!(
                    "{}; only a rebuild fixes that, and {why}",
                    reasons.join("; ")
                ),
            );
        }
        return;
    }

    let protect = match marker {
        Some(m) if m.protect != spec.protect => Some(spec.protect),
        _ => None,
    };
    let wants_running = spec.state == DesiredState::Running;
    // Autostart is drift only where the run state is as desired: a start or stop sets
    // it anyway, and a locked VM's state is unknown.
    let autostart = match (wants_running, vm.state, vm.autostart.is_some()) {
        (true, RunState::Running | RunState::Bootloader, false) => Some(true),
        (false, RunState::Stopped, true) => Some(false),
        _ => None,
    };
    // One action at a time: the rest is planned once it is done (safety rule 10).
    // An imported VM's marker takes the spec's hash at once: from then on, deleting its
    // file destroys it like any managed VM.
    let imported = marker.is_some_and(|m| m.spec_hash == crate::control::IMPORTED);
    if !changes.is_empty() || protect.is_some() || autostart.is_some() || imported {
        b.act(Action::Update {
            host: host.to_string(),
            vm: spec.name.clone(),
            restart: running && wants_running && !changes.is_empty(),
            changes,
            protect,
            autostart,
            spec_hash: spec.spec_hash.clone(),
            config: spec.config.clone(),
        });
        return;
    }
    if let Some(d) = disk0.filter(|d| d.size < spec.disk) {
        b.act(Action::GrowDisk {
            host: host.to_string(),
            vm: spec.name.clone(),
            disk: d.name.clone(),
            from: d.size,
            to: spec.disk,
            restart: running && wants_running,
        });
        return;
    }
    if vm.state == RunState::Locked {
        b.block(
            host,
            &spec.name,
            BlockReason::Locked,
            "a run.lock exists but no bhyve process: running elsewhere, or a stale lock; its state is left alone".to_string(),
        );
        return;
    }
    let kind = match (wants_running, running) {
        (true, false) => Kind::Start,
        (false, true) => Kind::Stop,
        _ => return,
    };
    b.act(if kind == Kind::Start {
        Action::Start {
            host: host.to_string(),
            vm: spec.name.clone(),
        }
    } else {
        Action::Stop {
            host: host.to_string(),
            vm: spec.name.clone(),
        }
    });
}

#[cfg(test)]
mod tests;
