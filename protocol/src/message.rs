//! Every message flotilla puts on beanstalkd, defined once.
//!
//! A message is an [`Envelope`] (format version, message id, cluster, sender,
//! destination, time) around one [`Message`]: the five job kinds (create, destroy, update, start, stop), the
//! result of a job, a host's inventory, and a trigger. All are JSON, so an operator can
//! read a job with `peek`, and all are decoded by [`decode`], which never panics and
//! refuses what it does not understand with a reason a worker can bury the job with.
//!
//! Jobs are self-contained: a create carries everything the worker needs to build the VM
//! ([`VmOrder`]), so a worker never has to fetch the desired repo at the job's commit.
//! Secrets are carried by name only; each host resolves a name to a file of its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use flotilla_core::capacity::{Limits, Usage};
use flotilla_core::size::Size;

/// The message format this build writes and reads. Version 2 added the signed
/// destination ([`Envelope::to`]); hosts of one cluster upgrade together.
pub const FORMAT_VERSION: u32 = 2;

/// Largest encoded job, result or trigger flotilla writes or reads: under beanstalkd's
/// default `max-job-size` (65535), so a default server takes every job.
pub const MAX_MESSAGE: usize = 60 * 1024;

/// Largest encoded inventory: it holds a host's whole actual state, so hosts run
/// beanstalkd with `-z 1048576` (see `host/rc.conf.sample`).
pub const MAX_INVENTORY: usize = 1024 * 1024;

/// The beanstalkd tubes flotilla uses on every host.
pub mod tubes {
    /// Creates, first tries and forwarded ones.
    pub const CREATE: &str = "flotilla.create";
    /// Destroy, update, start and stop for VMs on this host.
    pub const OPS: &str = "flotilla.ops";
    /// Outcomes sent back to the owner that asked.
    pub const RESULTS: &str = "flotilla.results";
    /// This host's latest inventory, as one ready job that others peek at.
    pub const INVENTORY: &str = "flotilla.inventory";
    /// Triggers: reconcile now.
    pub const CONTROL: &str = "flotilla.control";
}

/// One message with its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`FORMAT_VERSION`] of the writer.
    pub v: u32,
    /// Unique id of this message (a UUID); for jobs, the job id that markers and results
    /// refer to.
    pub id: String,
    /// The cluster id from `cluster.yaml`; a host ignores other clusters' messages.
    pub cluster: String,
    /// The host that sent the message.
    pub from: String,
    /// Where the message is addressed. Covered by the signature, so a copy put on another
    /// host's queue, or on another tube, is refused there as misaddressed.
    pub to: Destination,
    /// When it was sent, in seconds since the Unix epoch (used for expiry, not ordering).
    pub sent_at: u64,
    /// The message itself.
    pub body: Message,
    /// HMAC-SHA256 of the envelope without this field, hex, under the cluster key (see
    /// [`crate::auth`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// The host and tube a message is meant for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// The host meant to read it. Only a trigger may leave it out: the post-receive hook
    /// knows the hosts' addresses, not their names, and a trigger only asks for a fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The tube it is put on: always the one tube its kind belongs on
    /// ([`Message::tube`]).
    pub tube: String,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(h) => write!(f, "{h} on {}", self.tube),
            None => write!(f, "any host on {}", self.tube),
        }
    }
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Build a VM (on this host if it fits, else forward it along the chain).
    Create(CreateJob),
    /// Destroy a managed VM on this host.
    Destroy(VmJob),
    /// Change a managed VM's configuration in place.
    Update(UpdateJob),
    /// Start a managed VM.
    Start(VmJob),
    /// Stop a managed VM.
    Stop(VmJob),
    /// The outcome of a job, sent to the owner that asked.
    Result(JobResult),
    /// A host's actual state and capacity (boxed: it is by far the largest message).
    Inventory(Box<Inventory>),
    /// Reconcile now (sent by the desired repo's post-receive hook or `flotilla trigger`).
    Trigger(Trigger),
    /// An operator says a host is gone for good (`flotilla host forget`): stop waiting
    /// for it and drop what its last inventory showed.
    Forget(Forget),
    /// An operator's verb (`flotilla retry`, `host drain`, `suspend`, …).
    Control(flotilla_core::control::Control),
}

impl Message {
    /// The message kind as it appears in JSON (`create`, `destroy`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Create(_) => "create",
            Message::Destroy(_) => "destroy",
            Message::Update(_) => "update",
            Message::Start(_) => "start",
            Message::Stop(_) => "stop",
            Message::Result(_) => "result",
            Message::Inventory(_) => "inventory",
            Message::Trigger(_) => "trigger",
            Message::Forget(_) => "forget",
            Message::Control(_) => "control",
        }
    }

    /// The one tube this kind of message belongs on.
    pub fn tube(&self) -> &'static str {
        match self {
            Message::Create(_) => tubes::CREATE,
            Message::Destroy(_) | Message::Update(_) | Message::Start(_) | Message::Stop(_) => {
                tubes::OPS
            }
            Message::Result(_) => tubes::RESULTS,
            Message::Inventory(_) => tubes::INVENTORY,
            Message::Trigger(_) | Message::Forget(_) | Message::Control(_) => tubes::CONTROL,
        }
    }

    /// The VM a job or result is about.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Message::Create(j) => Some(&j.vm),
            Message::Destroy(j) | Message::Start(j) | Message::Stop(j) => Some(&j.vm),
            Message::Update(j) => Some(&j.vm),
            Message::Result(r) => Some(&r.vm),
            Message::Control(c) => c.verb.vm(),
            Message::Inventory(_) | Message::Trigger(_) | Message::Forget(_) => None,
        }
    }
}

/// Who asked for a job and where the answer goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// The desired commit the job was planned from.
    pub commit: String,
    /// The owner host, whose reconciler emitted the job.
    pub owner: String,
    /// The owner's beanstalkd address, where the result goes (tube `flotilla.results`).
    pub reply_to: String,
}

/// Everything a worker needs to build one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOrder {
    /// vm-bhyve template name (installed as `.templates/<name>.conf`).
    pub template: String,
    /// The template's contents, installed before `vm create`.
    pub template_conf: String,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory.
    pub memory: Size,
    /// Size of `disk0`.
    pub disk: Size,
    /// Swap partition size inside the guest (for the provisioning hooks).
    pub swap: Size,
    /// Further vm-bhyve config keys to set after create.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Whether the VM should run (and start at boot) once built.
    pub running: bool,
    /// Recorded in the marker: the VM is never destroyed while set.
    pub protect: bool,
    /// Hook options (`FLOTILLA_OPT_<KEY>` in the hooks' environment).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Names of secrets; each host resolves them to files of its own.
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl VmOrder {
    /// What the VM claims from a host's capacity: its memory, and every disk it will
    /// take (see [`flotilla_core::capacity::storage_of`]).
    pub fn usage(&self) -> Usage {
        Usage {
            memory: self.memory,
            storage: flotilla_core::capacity::storage_of(&self.template_conf, self.disk),
            vms: 1,
        }
    }
}

/// Build a VM, here or further along the hop chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The VM's name.
    pub vm: String,
    /// What to build.
    pub order: VmOrder,
    /// Hash of the desired spec, recorded in the marker.
    pub spec_hash: String,
    /// Who asked.
    pub origin: Origin,
    /// How many more times the job may be forwarded. Travels with the job: no host resets
    /// it.
    pub hops_left: u32,
    /// Hosts that already refused the job, in order, with their reasons.
    #[serde(default)]
    pub visited: Vec<Refusal>,
    /// After this time (seconds since the Unix epoch) the owner may plan the VM again, so
    /// a worker refuses to start building it: two creates never race.
    pub expires_at: u64,
    /// The VM must run on its first host (`host:` in its file): it is never forwarded,
    /// and is unplaceable when that host has no room.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// One host's refusal of a create, carried along the chain so that `unplaceable` can say
/// why every host said no.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The host.
    pub host: String,
    /// Why it did not take the VM.
    pub reason: String,
}

/// Destroy, start or stop one VM.
///
/// An op names the VM it means, not only its name: the worker drops it, just before it
/// runs, when the VM's marker or the newest desired state no longer asks for it (a VM
/// built again since by another job, a destroyed VM desired again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmJob {
    /// The VM's name.
    pub vm: String,
    /// The host that holds it (the worker refuses a job meant for another host).
    pub host: String,
    /// The job id in the VM's marker when the op was planned: a VM built by another job
    /// is not the one it means.
    pub expect_job: String,
    /// The desired spec hash the op was planned from; absent when the VM was not desired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// Set on the destroy of a replace: the VM is desired, and is destroyed to be built
    /// again from that spec.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    /// Who asked.
    pub origin: Origin,
}

/// Change a VM's configuration in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateJob {
    /// The VM's name.
    pub vm: String,
    /// The host that holds it.
    pub host: String,
    /// The job id in the VM's marker when the update was planned (see
    /// [`VmJob::expect_job`]).
    pub expect_job: String,
    /// Config keys to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Config keys to remove.
    #[serde(default)]
    pub unset: Vec<String>,
    /// New size of `disk0`, when it grows.
    #[serde(default)]
    pub grow_disk: Option<Size>,
    /// Whether the change needs a stopped VM (cpu, memory, disks): the worker stops it,
    /// changes it, and starts it again if it was running.
    pub restart: bool,
    /// The new `protect` flag for the marker, when it changes.
    #[serde(default)]
    pub protect: Option<bool>,
    /// Add the VM to (`true`) or remove it from (`false`) the autostart list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// The new spec hash, recorded in the marker once done; the update is dropped when
    /// the newest desired spec has another.
    pub spec_hash: String,
    /// Who asked.
    pub origin: Origin,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Done on `JobResult::host`.
    Done,
    /// No host on the chain had room (or the chain looped or ran out of hops).
    Unplaceable {
        /// Why, host by host.
        reason: String,
    },
    /// Tried and failed `attempts` times; the job was buried.
    Failed {
        /// The last error, with its chain.
        reason: String,
        /// How many tries.
        attempts: u32,
    },
    /// Not acted on (an unmanaged VM, a protected VM, a job for another host…).
    Refused {
        /// Why.
        reason: String,
    },
    /// Not run, and not a failure: just before it ran, the VM's marker or the newest
    /// desired state no longer asked for it (see [`VmJob`]).
    Dropped {
        /// Why.
        reason: String,
    },
}

/// The outcome of one job.
// No deny_unknown_fields: serde does not support it together with `flatten`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job's id ([`Envelope::id`]).
    pub job_id: String,
    /// The job's kind.
    pub job_kind: String,
    /// The VM.
    pub vm: String,
    /// The host that acted (or gave up).
    pub host: String,
    /// The commit the job was planned from.
    pub commit: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The acting host's inventory sequence number ([`Inventory::seq`]) when it sent this
    /// result, after the job's work was done: any inventory of that host with a greater
    /// number was listed after the work, whatever either host's clock says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_seq: Option<u64>,
}

/// A create this host owns and has sent, as shown in its inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlightCreate {
    /// The VM.
    pub vm: String,
    /// The create job's id.
    pub job_id: String,
    /// Where it stands (`sent`, `placed on host2`, `unplaceable: …`).
    pub status: String,
    /// When it was sent (seconds since the Unix epoch).
    pub sent_at: u64,
    /// Set when it failed (unplaceable, say) and waits to be sent again at this time:
    /// nothing is under way for it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
}

/// A difference the host's last reconcile pass left alone (the planner's `Blocked`), as
/// shown in its inventory: an operator must act on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedItem {
    /// The host the difference is on.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// The planner's reason, snake_case (`name_taken`, `protected`, `prune_guard`, …);
    /// a string so that a reason added later does not make the inventory unreadable.
    pub reason: String,
    /// Details for the operator.
    pub detail: String,
}

/// An op (update, start, stop, destroy, …) this host sent and awaits the result of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpInFlightItem {
    /// The VM.
    pub vm: String,
    /// The op's kind.
    pub kind: flotilla_core::planner::Kind,
}

/// The newest fetched desired commit did not validate: the host keeps applying its last
/// good one (`applied_commit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredError {
    /// The commit that does not validate.
    pub commit: String,
    /// The file of its first error, relative to the repo's root.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong (the first error; `errors` counts them all).
    pub message: String,
    /// How many errors the commit has.
    pub errors: usize,
}

/// A job that failed recently, as shown in the owner's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecentFailure {
    /// The VM.
    pub vm: String,
    /// The job kind.
    pub job_kind: String,
    /// The host that reported it.
    pub host: String,
    /// What happened.
    pub reason: String,
    /// When the result arrived (seconds since the Unix epoch).
    pub at: u64,
}

/// A host's published actual state and capacity. Other hosts plan creates against it
/// (a VM in any inventory is never created again) and `flotilla status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The host.
    pub host: String,
    /// The desired commit this host last reconciled.
    #[serde(default)]
    pub applied_commit: Option<String>,
    /// The desired commit of this host's last finished reconcile pass: it sends no create
    /// of a VM it does not own under that commit, and `in_flight` shows every create it
    /// sent before. Another host sends creates only while every host it hears from is
    /// on its own commit (ownership can move between commits).
    #[serde(default)]
    pub commit: Option<String>,
    /// When this host last listed its VMs (seconds since the Unix epoch, by this host's
    /// clock: for display and for its peers' check of clock skew, never for ordering).
    pub listed_at: u64,
    /// This inventory's place among the host's inventories: taken before the listing,
    /// greater than every earlier one, across restarts too (the order that `listed_at`
    /// cannot give across hosts' clocks). 0 from older agents.
    #[serde(default)]
    pub seq: u64,
    /// Set when this host sees a peer's clock beyond its `max_clock_skew`: it sends no
    /// creates meanwhile, and nor do the hosts that read this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<String>,
    /// What all its VMs claim.
    pub used: Usage,
    /// What admitted creates in progress hold.
    pub reserved: Usage,
    /// Its limits.
    pub limits: Limits,
    /// An overload threshold crossed, if any.
    #[serde(default)]
    pub overload: Option<String>,
    /// Every VM on it, managed or not, as vm-bhyve shows them.
    pub vms: Vec<flotilla_core::actual::ActualVm>,
    /// Creates this host owns that are still in flight.
    #[serde(default)]
    pub in_flight: Vec<InFlightCreate>,
    /// Failures reported to this host recently, newest last.
    #[serde(default)]
    pub failures: Vec<RecentFailure>,
    /// Creates this host owns that wait for other hosts to reach its commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<WaitingCreate>,
    /// Set when this host's agent found itself missing from cluster.yaml: the commit
    /// that removed it. It creates, changes and destroys nothing since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_cluster: Option<String>,
    /// The agent that published it: the host identity, the lease it holds, the host
    /// names it saw under two identities (safety rule 8). Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::identity::AgentInfo>,
    /// When this host's last reconcile pass ended (seconds since the Unix epoch, its
    /// clock): `apply --wait` waits for a pass after it started. 0 before the first.
    #[serde(default)]
    pub reconciled_at: u64,
    /// What its last pass left blocked (the whole plan's, as this host saw it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<BlockedItem>,
    /// Ops it sent and awaits: drift repairs under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpInFlightItem>,
    /// Set when the newest desired commit it fetched does not validate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_error: Option<DesiredError>,
    /// The drains and suspends this host knows of (`flotilla host drain`, `suspend`).
    #[serde(
        default,
        skip_serializing_if = "flotilla_core::control::Switches::is_empty"
    )]
    pub switches: flotilla_core::control::Switches,
    /// This host's most recent events, newest last, for `flotilla events --cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_events: Vec<crate::events::Event>,
    /// Creates this host owned whose intents closed as built: a host that has not yet
    /// read the builder's inventory that showed the VM must not create it again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub built: Vec<BuiltCreate>,
}

/// A create whose intent closed because the VM was seen built (safety rule 2): published
/// by the closer so that a host holding an older inventory of the builder waits for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltCreate {
    /// The VM.
    pub vm: String,
    /// The host that built it.
    pub host: String,
    /// The sequence of the builder's inventory that showed it.
    pub seq: u64,
}

/// A host an operator declared gone for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forget {
    /// The host.
    pub host: String,
    /// Who said so (user and machine of the `flotilla host forget` that sent it).
    pub by: String,
}

/// A create this host owns that waits for other hosts before it is sent (safety rules 2
/// and 9), as shown in its inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitingCreate {
    /// The VM.
    pub vm: String,
    /// The hosts it waits for: each is on another commit under which it owns the VM.
    pub for_hosts: Vec<String>,
}

/// Reconcile now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Why (e.g. `push to refs/heads/main`), for the event log.
    pub reason: String,
}

/// Why bytes from the queue are not a message this host can act on. A worker buries the
/// job with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is larger than the {1}-byte limit")]
    TooLarge(usize, usize),
    /// Not JSON of the expected shape.
    #[error("not a flotilla message: {0}")]
    Malformed(String),
    /// A format this build does not read.
    #[error(
        "message format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version(u32),
}

/// Serializes an envelope.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    // Serializing plain data structs with string keys cannot fail.
    serde_json::to_vec(envelope).unwrap_or_default()
}

/// Reads an envelope, checking size and version first.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() > MAX_INVENTORY {
        return Err(DecodeError::TooLarge(bytes.len(), MAX_INVENTORY));
    }
    // The version is read on its own first, so a message from a newer flotilla is
    // reported as such rather than as "unknown field".
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if version.v != FORMAT_VERSION {
        return Err(DecodeError::Version(version.v));
    }
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE && !matches!(envelope.body, Message::Inventory(_)) {
        return Err(DecodeError::TooLarge(bytes.len(), MAX_MESSAGE));
    }
    Ok(envelope)
}

impl Envelope {
    /// A new message from `from` to host `to` in `cluster`, on the tube its kind belongs
    /// on, with a fresh id, sent now.
    pub fn new(cluster: &str, from: &str, to: &str, body: Message) -> Envelope {
        Envelope {
            v: FORMAT_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            cluster: cluster.to_string(),
            from: from.to_string(),
            to: Destination {
                host: Some(to.to_string()),
                tube: body.tube().to_string(),
            },
            sent_at: now(),
            body,
            sig: None,
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A create job for unit tests across the crate.
#[cfg(test)]
pub(crate) fn sample_create() -> CreateJob {
    CreateJob {
        vm: "web01".into(),
        order: VmOrder {
            template: "CS1".into(),
            template_conf: "loader=\"bhyveload\"\ncpu=1\nmemory=512M\n".into(),
            cpu: 1,
            memory: Size::mib(512),
            disk: Size::gib(30),
            swap: Size::gib(4),
            config: BTreeMap::new(),
            running: true,
            protect: false,
            options: BTreeMap::from([("timezone".into(), "UTC".into())]),
            secrets: vec!["tailscale".into()],
        },
        spec_hash: "ab12".into(),
        origin: Origin {
            commit: "0123abcd".into(),
            owner: "host1".into(),
            reply_to: "10.0.0.1:11300".into(),
        },
        hops_left: 3,
        visited: vec![],
        expires_at: 1_790_007_200,
        pinned: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            commit: "0123abcd".into(),
            owner: "host1".into(),
            reply_to: "10.0.0.1:11300".into(),
        }
    }

    fn create() -> Envelope {
        Envelope {
            v: FORMAT_VERSION,
            id: "4f1c7a52-2d0e-4b8e-9d8e-1f2a3b4c5d6e".into(),
            cluster: "lab".into(),
            from: "host1".into(),
            to: Destination {
                host: Some("host2".into()),
                tube: tubes::CREATE.into(),
            },
            sent_at: 1_790_000_000,
            body: Message::Create(sample_create()),
            sig: None,
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let job = VmJob {
            vm: "web01".into(),
            host: "host2".into(),
            expect_job: "4f1c7a52".into(),
            spec_hash: Some("ab12".into()),
            replace: true,
            origin: origin(),
        };
        let bodies = vec![
            create().body,
            Message::Destroy(job.clone()),
            Message::Start(job.clone()),
            Message::Stop(job),
            Message::Update(UpdateJob {
                vm: "web01".into(),
                host: "host2".into(),
                expect_job: "4f1c7a52".into(),
                set: BTreeMap::from([("memory".into(), "1G".into())]),
                unset: vec!["graphics".into()],
                grow_disk: Some(Size::gib(40)),
                restart: true,
                protect: Some(true),
                autostart: Some(true),
                spec_hash: "cd34".into(),
                origin: origin(),
            }),
            Message::Result(JobResult {
                job_id: "x".into(),
                job_kind: "create".into(),
                vm: "web01".into(),
                host: "host3".into(),
                commit: "0123abcd".into(),
                outcome: Outcome::Unplaceable {
                    reason: "host1: memory 9G would exceed the limit 8G".into(),
                },
                inventory_seq: Some(7),
            }),
            Message::Inventory(Box::new(Inventory {
                host: "host1".into(),
                applied_commit: None,
                commit: None,
                listed_at: 1_790_000_000,
                seq: (3 << 32) | 12,
                clock_skew: None,
                used: Usage::default(),
                reserved: Usage::default(),
                limits: Limits::default(),
                overload: None,
                vms: vec![],
                in_flight: vec![],
                failures: vec![],
                waiting: vec![],
                left_cluster: Some("c9".into()),
                agent: Some(crate::identity::AgentInfo {
                    identity: "5d0c1d9e-4a5b-4c39-9a57-0c8f3b2b8f10".into(),
                    pid: 4242,
                    machine: "m1".into(),
                    state_dir: "/var/db/flotilla".into(),
                    started_at: 1_790_000_000,
                    lease_job: Some(7),
                    conflicts: Default::default(),
                }),
                reconciled_at: 0,
                blocked: vec![],
                ops: vec![],
                desired_error: None,
                switches: Default::default(),
                recent_events: vec![],
                built: vec![],
            })),
            Message::Trigger(Trigger {
                reason: "push".into(),
            }),
        ];
        for body in bodies {
            let env = Envelope { body, ..create() };
            let bytes = encode(&env);
            assert_eq!(decode(&bytes), Ok(env));
        }
    }

    #[test]
    fn kind_is_a_readable_tag() {
        let text = String::from_utf8(encode(&create())).unwrap();
        assert!(text.contains(r#""kind":"create""#), "{text}");
        assert!(text.contains(r#""memory":"512M""#), "{text}");
    }

    #[test]
    fn refuses_what_it_cannot_act_on_with_a_reason() {
        assert_eq!(
            decode(&vec![b' '; MAX_INVENTORY + 1]),
            Err(DecodeError::TooLarge(MAX_INVENTORY + 1, MAX_INVENTORY))
        );
        // Only an inventory may be larger than a job.
        let mut big = create();
        if let Message::Create(job) = &mut big.body {
            job.order
                .options
                .insert("motd".into(), "x".repeat(MAX_MESSAGE));
        }
        let bytes = encode(&big);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::TooLarge(bytes.len(), MAX_MESSAGE))
        );
        let mut newer = serde_json::to_value(create()).unwrap();
        newer["v"] = 3.into();
        newer["new_field"] = true.into();
        assert_eq!(
            decode(newer.to_string().as_bytes()),
            Err(DecodeError::Version(3))
        );
        // A version 1 message has no destination: it is not read, whatever it says.
        let mut older = serde_json::to_value(create()).unwrap();
        older["v"] = 1.into();
        older.as_object_mut().unwrap().remove("to");
        assert_eq!(
            decode(older.to_string().as_bytes()),
            Err(DecodeError::Version(1))
        );
        let mut unaddressed = serde_json::to_value(create()).unwrap();
        unaddressed.as_object_mut().unwrap().remove("to");
        assert!(matches!(
            decode(unaddressed.to_string().as_bytes()),
            Err(DecodeError::Malformed(m)) if m.contains("`to`")
        ));
        let mut extra = serde_json::to_value(create()).unwrap();
        extra["body"]["hops_left"] = (-1).into();
        assert!(matches!(
            decode(extra.to_string().as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
        let mut unknown = serde_json::to_value(create()).unwrap();
        unknown["body"]["kind"] = "format_disk".into();
        assert!(matches!(
            decode(unknown.to_string().as_bytes()),
            Err(DecodeError::Malformed(m)) if m.contains("format_disk")
        ));
        assert!(matches!(
            decode(b"create web01"),
            Err(DecodeError::Malformed(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode(&bytes);
        }
    }

    /// Guards issue 14, case 7: storage counted disk0 only, so three 10G VMs whose
    /// template adds `disk1_size="100G"` ended at 330G on a 150G host. A VM's request is
    /// every disk `vm create` makes from its template (file images and zvols; a custom or
    /// iSCSI device takes nothing here) plus the guest builder's pad on disk0.
    #[test]
    fn a_request_counts_every_disk_the_template_adds_and_the_builder_pad() {
        use flotilla_core::capacity::*;
        let mut order = sample_create().order;
        order.disk = Size::gib(10);
        order.template_conf = "loader=\"bhyveload\"\n\
            disk0_type=\"nvme\"\ndisk0_name=\"disk0.img\"\ndisk0_size=\"50G\"\n\
            disk1_type=\"nvme\"\ndisk1_name=\"disk1.img\"\ndisk1_size=\"100G\"\n\
            disk2_type=\"virtio-blk\"\ndisk2_name=\"disk2.img\"\n\
            disk3_type=\"virtio-blk\"\ndisk3_dev=\"custom\"\ndisk3_name=\"/dev/zvol/tank/x\"\ndisk3_size=\"1T\"\n\
            disk5_name=\"after-a-gap.img\"\ndisk5_size=\"1T\"\n"
            .into();
        let u = order.usage();
        // disk0 from the order (`-s` wins over the template), disk1 as the template
        // says, disk2 at vm create's default of 20G, disk3 a device, disk5 never made.
        let want = Size::gib(10 + 100 + 20).bytes() + flotilla_core::planner::BUILDER_PAD.bytes();
        assert_eq!(u.storage, Size(want));
        assert_eq!((u.memory, u.vms), (order.memory, 1));
        // Three such VMs no longer fit a 150G host.
        let limits = Limits {
            storage: Some(Size::gib(150)),
            ..Limits::default()
        };
        assert!(fits(u, Usage::default(), Usage::default(), &limits).is_ok());
        assert!(fits(u, Usage::default(), u, &limits).is_err());
    }
}
