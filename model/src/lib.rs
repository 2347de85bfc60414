//! An exhaustive model of flotilla's ownership and intent protocol (issue 13, part 2).
//!
//! The seeded simulation checks the agent's code; this checks the protocol: every
//! interleaving of a small cluster, up to a depth, with [stateright]. Three hosts and a
//! git remote whose branch moves through four commits (a host added, a pin, an unpin, a
//! revert), each of which moves the VM's owner. The network is unordered, duplicating
//! and lossy; a host may crash once and restart with what it keeps on disk (its intents,
//! its inventory sequence, the VMs it holds); each host's clock is a nondeterministic
//! choice of "on time" or [`SKEW`] seconds ahead.
//!
//! The handlers decide with the real pure functions of the `flotilla` crate:
//! [`owner`](flotilla::owner::owner) through [`CommitOwners`], [`decide::unseen`],
//! [`decide::intent_fate`], [`decide::others_in_flight`], [`decide::waits_for`],
//! [`decide::first_hop`] and [`placement::decide`], called on real `Inventory`, `Intent`
//! and `CreateJob` values built from small `Hash` projections of the model's state.
//!
//! [`Logic`] switches two of them back to their old versions, reimplemented here from
//! the fixes' diffs, so that tests can show the model finds those bugs.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use flotilla::actual::{ActualVm, Marker, RunState};
use flotilla::agent::config::FirstHop;
use flotilla::agent::decide::{self, CommitOwners, IntentFate};
use flotilla::capacity::{Limits, Usage};
use flotilla::intents::{Intent, IntentStatus};
use flotilla::message::{CreateJob, InFlightCreate, Inventory, Origin, VmOrder};
use flotilla::placement::{self, Decision, HostView};
use flotilla::size::Size;
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelState, Id, LossyNetwork, Network, Out,
};
use stateright::{Checker, Expectation, Model};

/// The hosts, by index: the model's actor ids 0..3 (the remote is 3).
pub const HOSTS: [&str; 3] = ["host1", "host2", "host3"];
/// The VMs desired by every commit.
pub const VMS: [&str; 1] = ["web1"];
/// The wall clock of a host that is on time (seconds since the epoch).
pub const T0: u64 = 1_000_000;
/// How far ahead a skewed host's clock runs: well inside a create's deadline, so only
/// the comparison of clocks across hosts can go wrong, never a deadline.
pub const SKEW: u64 = 30;
/// A create's deadline (seconds after it is sent); no model run reaches it.
pub const DEADLINE: u64 = 600;
/// The spec hash of every VM (no commit changes a spec).
const SPEC: &str = "spec";

/// One commit of the desired repo: its host set and the VMs' pins.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The commit id.
    pub id: &'static str,
    /// cluster.yaml's hosts (indexes into [`HOSTS`]).
    pub hosts: Vec<usize>,
    /// Per VM of [`VMS`], its `host:` pin.
    pub pins: Vec<Option<usize>>,
}

impl Commit {
    /// The owners under this commit, as the agent computes them.
    pub fn owners(&self) -> CommitOwners {
        CommitOwners::new(
            self.hosts.iter().map(|h| HOSTS[*h].to_string()).collect(),
            VMS.iter()
                .zip(&self.pins)
                .map(|(vm, p)| (vm.to_string(), p.map(|h| HOSTS[h].to_string())))
                .collect(),
        )
    }
}

/// The branch's history: c0 (host1, host2), c1 adds host3, c2 pins web1 to host1, c3
/// reverts the pin. Each moves web1's owner (checked by a test).
pub fn commits() -> Vec<Commit> {
    vec![
        Commit {
            id: "c0",
            hosts: vec![0, 1],
            pins: vec![None],
        },
        Commit {
            id: "c1",
            hosts: vec![0, 1, 2],
            pins: vec![None],
        },
        Commit {
            id: "c2",
            hosts: vec![0, 1, 2],
            pins: vec![Some(0)],
        },
        Commit {
            id: "c3",
            hosts: vec![0, 1, 2],
            pins: vec![None],
        },
    ]
}

/// Which version of the decisions the hosts run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Logic {
    /// Creates wait only for hosts that answered this pass on another commit (the
    /// `on_other_commits` before 2a9c0d0, issue 11 hole 6) instead of [`decide::waits_for`].
    pub answered_only_waits: bool,
    /// A placed intent is decided by `listed_at > at` (before df2dff3, issue 14 case 4)
    /// instead of the builder's inventory sequence.
    pub clock_close: bool,
    /// A create does not wait for the builders that closed intents name
    /// ([`decide::builds_unseen`]): the logic before that fix.
    pub no_built_records: bool,
}

/// The faults the model explores besides an unordered, duplicating network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Messages may be dropped.
    pub lossy: bool,
    /// How many hosts may be crashed at once (each restarts with its disk).
    pub crashes: usize,
    /// A host's clock may run [`SKEW`] ahead (chosen at each start).
    pub skew: bool,
    /// Each message is delivered at most once (no duplicates): fewer states, so deeper
    /// paths in a test's time; every path it finds is one of the duplicating network's.
    pub once: bool,
}

impl Faults {
    /// Every fault: lossy, one crash, clocks ahead.
    pub const ALL: Faults = Faults {
        lossy: true,
        crashes: 1,
        skew: true,
        once: false,
    };
    /// The tests' default: a crash and clocks ahead, no drops (see [`model`]).
    pub const DEFAULT: Faults = Faults {
        lossy: false,
        crashes: 1,
        skew: true,
        once: false,
    };
    /// An unordered, duplicating network only.
    pub const NETWORK: Faults = Faults {
        lossy: false,
        crashes: 0,
        skew: false,
        once: false,
    };
    /// An unordered network that delivers each message at most once, nothing else.
    pub const ONCE: Faults = Faults {
        lossy: false,
        crashes: 0,
        skew: false,
        once: true,
    };
}

/// Which part of the branch a model runs and how its hosts start: a smaller scenario
/// reaches a deep interleaving at a depth the checker can explore in a test's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// How many of [`commits`] the remote pushes, c0 first (at least one).
    pub commits: usize,
    /// Hosts that start having run their pass on c0 already: they hold c0 and their
    /// first inventory (c0, nothing held) is on its way to the others.
    ///
    /// Such a start is reachable from the cold one: it is the state after the remote's
    /// first `Head(0)` is delivered to these hosts in index order before any other
    /// message, since a host on c0 that has seen no peer's inventory only publishes its
    /// own (its creates wait for the unseen peers). It skips those steps, not states a
    /// real cluster could not be in.
    pub warm: &'static [usize],
    /// The commit the branch is at when the model starts: the remote pushed the ones
    /// before it and this one already, their `Head`s on their way to every host (the
    /// state after the remote's first pushes, before any delivery).
    pub head: u8,
    /// host1's first create of web1 was built on host2 before the start (host1 and
    /// host2 warm, host2 with the most room). Reachable: the state after two more
    /// deliveries, host2's first inventory to host1 (host1 then sends the create to
    /// host2) and that create to host2 (host2 builds it, answers and publishes); both
    /// messages stay in the network, as a duplicating one keeps every message.
    pub built: bool,
}

impl Scenario {
    /// The whole branch, every host starting cold.
    pub const FULL: Scenario = Scenario {
        commits: 4,
        warm: &[],
        head: 0,
        built: false,
    };
    /// The first move of the owner (c0 to c1, host3 added): every host has run its pass
    /// on c0 (host3 runs, not yet in cluster.yaml) and c1 is pushed: the setting of
    /// issue 11's hole 6.
    pub const HOST_ADDED: Scenario = Scenario {
        commits: 2,
        warm: &[0, 1, 2],
        head: 1,
        built: false,
    };
    /// The first move of the owner with host3 cold: host1 and host2 have run their pass
    /// on c0 and host1's create of web1 is built on host2, host3 (added by c1) has not
    /// run its first pass, and c1 is pushed: the setting of the double build through a
    /// closed intent (test `a_closed_intent_guards_its_vm_until_the_builder_is_seen`).
    pub const BUILT_HOST3_COLD: Scenario = Scenario {
        commits: 2,
        warm: &[0, 1],
        head: 1,
        built: true,
    };
}

/// A create job's id: the owner's index and its count.
pub type Job = (u8, u8);

fn job_id(j: Job) -> String {
    format!("{}-{}", HOSTS[j.0 as usize], j.1)
}

/// What an inventory says, projected.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inv {
    /// The host's inventory sequence.
    pub seq: u64,
    /// Its last finished pass's commit (an index into [`commits`]).
    pub commit: Option<u8>,
    /// Its clock when it listed.
    pub listed_at: u64,
    /// The VMs it holds, with the job that built each.
    pub vms: BTreeMap<u8, Job>,
    /// The creates it has in flight.
    pub in_flight: BTreeMap<u8, Job>,
    /// Its creates closed as built: VM to the builder and the sequence that showed it.
    pub built: BTreeMap<u8, (u8, u64)>,
}

/// Where an intent stands, projected from [`IntentStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Sent, no result.
    Sent,
    /// Built on `host`; the result arrived at `at` carrying the builder's `seq`.
    Placed {
        /// The builder.
        host: u8,
        /// The owner's clock at the result.
        at: u64,
        /// The builder's inventory sequence at the result.
        seq: u64,
    },
    /// Refused.
    Failed,
}

/// An open create intent, projected.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntentP {
    /// The job.
    pub job: Job,
    /// Where it was sent first.
    pub first_hop: u8,
    /// The commit it was planned from.
    pub commit: u8,
    /// Its status.
    pub status: Status,
}

/// What a host keeps across a crash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Disk {
    /// The inventory sequence (a generation on disk: never goes back).
    pub seq: u64,
    /// The next job count.
    pub next_job: u8,
    /// Open intents per VM.
    pub intents: BTreeMap<u8, IntentP>,
    /// The VMs on this host (vm-bhyve's state, not the agent's), with the building job.
    pub held: BTreeMap<u8, Job>,
    /// Ghost state for the property: intents closed as "gone" (vm, builder, job).
    pub closed_gone: BTreeSet<(u8, u8, Job)>,
    /// Intents closed as built ([`decide::built_record`]): VM to builder and sequence.
    pub built: BTreeMap<u8, (u8, u64)>,
}

/// A host's state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostState {
    /// Kept on disk.
    pub disk: Disk,
    /// Its clock's offset from [`T0`], chosen once per start.
    pub offset: u64,
    /// The newest commit fetched.
    pub commit: Option<u8>,
    /// The commit of its last finished pass.
    pub reconciled: Option<u8>,
    /// The newest inventory of each peer.
    pub peers: BTreeMap<u8, Inv>,
    /// Peers heard from since the last pass (the old logic's "answered").
    pub answered: BTreeSet<u8>,
    /// What it published last (seq and clock aside): publishes only on change.
    pub published: Option<Published>,
}

/// What an inventory said, seq and clock aside: its commit, the VMs held, the creates in
/// flight, the creates closed as built.
pub type Published = (
    Option<u8>,
    BTreeMap<u8, Job>,
    BTreeMap<u8, Job>,
    BTreeMap<u8, (u8, u64)>,
);

/// An actor's state.
// One remote beside three hosts: boxing the hosts' states would add an allocation to each
// of the checker's clones to save a few bytes on one actor.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// A host.
    Host(HostState),
    /// The remote: the branch's commit index.
    Remote(u8),
}

/// The messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// The branch points at this commit.
    Head(u8),
    /// A host's inventory.
    Inventory(Inv),
    /// A create job.
    Create {
        /// The job.
        job: Job,
        /// The VM.
        vm: u8,
        /// The commit it was planned from.
        commit: u8,
        /// Hops left.
        hops_left: u32,
        /// Hosts that refused it.
        visited: Vec<u8>,
        /// Pinned.
        pinned: bool,
    },
    /// A create's result, to its owner.
    Result {
        /// The job.
        job: Job,
        /// The VM.
        vm: u8,
        /// The host that built it, if placed.
        built_on: Option<u8>,
        /// The acting host's inventory sequence after the work.
        seq: u64,
    },
}

/// A model timer: the remote's next push.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Push;

/// A random choice: a host's clock offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offset(pub u64);

/// Storage kept across a crash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Store {
    /// A host's disk.
    Host(Disk),
}

/// An actor of the model.
#[derive(Debug, Clone)]
pub enum Node {
    /// A host running the agent's decisions.
    Host {
        /// Which decisions.
        logic: Logic,
        /// Whether its clock may run [`SKEW`] ahead.
        skew: bool,
        /// The branch's commits.
        commits: Vec<Commit>,
        /// It starts having run its pass on c0 (see [`Scenario::warm`]).
        warm: bool,
        /// host1's first create was built on host2 before the start (see
        /// [`Scenario::built`]).
        built: bool,
    },
    /// The git remote.
    Remote {
        /// How many commits it pushes.
        commits: u8,
        /// The commit it starts at (see [`Scenario::head`]).
        head: u8,
        /// The hosts that start warm: their `Head(0)` is delivered already.
        warm: Vec<usize>,
    },
}

fn limits(h: usize) -> Limits {
    // Unequal memory: `least_loaded` sends a create to the host with most room among
    // those its owner knows, often not itself: under c0 host1's creates go to host2, under
    // c1 host3 builds its own, so results and inventories cross between hosts.
    Limits {
        memory: Some(Size::gib([4, 6, 8][h])),
        storage: None,
        vms: None,
    }
}

fn vm_memory() -> Size {
    Size::gib(1)
}

/// The real inventory for a projection.
pub fn inventory(host: usize, inv: &Inv, commits: &[Commit]) -> Inventory {
    let vm = |(v, j): (&u8, &Job)| ActualVm {
        name: VMS[*v as usize].into(),
        datastore: "default".into(),
        config: BTreeMap::new(),
        cpu: 1,
        memory: vm_memory(),
        disks: vec![],
        state: RunState::Running,
        autostart: Some(1),
        marker: Some(Marker {
            format_version: 1,
            cluster: "model".into(),
            job_id: job_id(*j),
            spec_hash: SPEC.into(),
            commit: String::new(),
            owner: String::new(),
            protect: false,
            placed_from: None,
            complete: true,
        }),
    };
    Inventory {
        host: HOSTS[host].into(),
        applied_commit: None,
        commit: inv.commit.map(|c| commits[c as usize].id.to_string()),
        listed_at: inv.listed_at,
        seq: inv.seq,
        clock_skew: None,
        used: Usage {
            memory: Size(vm_memory().0 * inv.vms.len() as u64),
            storage: Size(0),
            vms: inv.vms.len() as u32,
        },
        reserved: Usage::default(),
        limits: limits(host),
        overload: None,
        vms: inv.vms.iter().map(vm).collect(),
        in_flight: inv
            .in_flight
            .iter()
            .map(|(v, j)| InFlightCreate {
                vm: VMS[*v as usize].into(),
                job_id: job_id(*j),
                status: "sent".into(),
                sent_at: T0,
                retry_at: None,
            })
            .collect(),
        failures: vec![],
        waiting: vec![],
        left_cluster: None,
        agent: None,
        reconciled_at: 0,
        blocked: vec![],
        ops: vec![],
        desired_error: None,
        switches: Default::default(),
        recent_events: vec![],
        built: inv
            .built
            .iter()
            .map(|(v, (h, seq))| flotilla::message::BuiltCreate {
                vm: VMS[*v as usize].into(),
                host: HOSTS[*h as usize].into(),
                seq: *seq,
            })
            .collect(),
    }
}

/// The real intent for a projection.
pub fn intent(vm: u8, i: &IntentP, commits: &[Commit]) -> Intent {
    Intent {
        vm: VMS[vm as usize].into(),
        job_id: job_id(i.job),
        first_hop: HOSTS[i.first_hop as usize].into(),
        commit: commits[i.commit as usize].id.into(),
        spec_hash: SPEC.into(),
        recorded_at: T0,
        deadline: T0 + DEADLINE,
        status: match i.status {
            Status::Sent => IntentStatus::Sent,
            Status::Placed { host, at, seq } => IntentStatus::Placed {
                host: HOSTS[host as usize].into(),
                at,
                seq: Some(seq),
            },
            Status::Failed => IntentStatus::Failed {
                reason: "refused".into(),
                retry_at: T0 + DEADLINE,
            },
        },
    }
}

fn create_job(
    job: Job,
    vm: u8,
    commit: &Commit,
    hops_left: u32,
    visited: &[u8],
    pinned: bool,
) -> CreateJob {
    CreateJob {
        vm: VMS[vm as usize].into(),
        order: VmOrder {
            template: "default".into(),
            template_conf: String::new(),
            cpu: 1,
            memory: vm_memory(),
            disk: Size(0),
            swap: Size(0),
            config: BTreeMap::new(),
            running: true,
            protect: false,
            options: BTreeMap::new(),
            secrets: vec![],
        },
        spec_hash: SPEC.into(),
        origin: Origin {
            commit: commit.id.into(),
            owner: HOSTS[job.0 as usize].into(),
            reply_to: String::new(),
        },
        hops_left,
        visited: visited
            .iter()
            .map(|h| flotilla::message::Refusal {
                host: HOSTS[*h as usize].into(),
                reason: "refused".into(),
            })
            .collect(),
        expires_at: T0 + DEADLINE,
        pinned,
    }
}

/// The old `on_other_commits` (before 2a9c0d0): only hosts that answered this pass with a
/// live inventory on another commit hold creates back; a silent one does not.
pub fn old_on_other_commits(
    inventories: &BTreeMap<String, Inventory>,
    answered: &BTreeSet<String>,
    commit: Option<&str>,
    now: u64,
) -> Vec<String> {
    const LIVE_INVENTORY: u64 = 30;
    answered
        .iter()
        .filter(|h| {
            inventories.get(*h).is_some_and(|inv| {
                inv.commit.as_deref() != commit
                    && now.saturating_sub(inv.listed_at) <= LIVE_INVENTORY
            })
        })
        .cloned()
        .collect()
}

/// The old `intent_fate` of a placed intent (before df2dff3): an inventory of the
/// builder stamped later than the result's arrival, by either host's clock, decides.
/// Everything else is the real function's.
pub fn old_intent_fate(
    intent: &Intent,
    desired_hash: Option<&str>,
    inventories: &BTreeMap<String, Inventory>,
    now: u64,
) -> IntentFate {
    let IntentStatus::Placed { host, at, .. } = &intent.status else {
        return decide::intent_fate(intent, desired_hash, inventories, now);
    };
    let built_by_job = inventories.values().any(|inv| {
        inv.vms.iter().any(|v| {
            v.name == intent.vm
                && v.marker
                    .as_ref()
                    .is_some_and(|m| m.complete && m.job_id == intent.job_id)
        })
    });
    if built_by_job {
        return IntentFate::Close("built by its job".into());
    }
    match inventories.get(host) {
        Some(inv) if inv.listed_at > *at => {
            if inv.vms.iter().any(|v| v.name == intent.vm) {
                IntentFate::Close(format!("built on {host}, seen in its inventory"))
            } else {
                IntentFate::Close(format!(
                    "built on {host}, but gone from its inventory since"
                ))
            }
        }
        _ => IntentFate::Open,
    }
}

impl Node {
    fn host_pass(
        &self,
        me: usize,
        s: &mut HostState,
        o: &mut Out<Self>,
        logic: Logic,
        commits: &[Commit],
    ) {
        let Some(c) = s.commit else { return };
        let commit = &commits[c as usize];
        let now = T0 + s.offset;
        let name = |h: u8| HOSTS[h as usize].to_string();
        // The peers of this commit, and this host's own listing as its freshest inventory.
        let mut inventories: BTreeMap<String, Inventory> = s
            .peers
            .iter()
            .filter(|(h, _)| commit.hosts.contains(&(**h as usize)))
            .map(|(h, inv)| (name(*h), inventory(*h as usize, inv, commits)))
            .collect();
        let own = Inv {
            seq: s.disk.seq,
            commit: s.reconciled,
            listed_at: now,
            vms: s.disk.held.clone(),
            in_flight: BTreeMap::new(),
            built: s.disk.built.clone(),
        };
        inventories.insert(HOSTS[me].into(), inventory(me, &own, commits));
        let cluster: Vec<String> = commit.hosts.iter().map(|h| HOSTS[*h].to_string()).collect();
        let unseen = decide::unseen(
            cluster.iter(),
            HOSTS[me],
            inventories.keys().map(String::as_str),
        );
        // Intents.
        let open: Vec<(u8, IntentP)> = s
            .disk
            .intents
            .iter()
            .map(|(v, i)| (*v, i.clone()))
            .collect();
        for (vm, i) in open {
            let real = intent(vm, &i, commits);
            let fate = if logic.clock_close {
                old_intent_fate(&real, Some(SPEC), &inventories, now)
            } else {
                decide::intent_fate(&real, Some(SPEC), &inventories, now)
            };
            if let IntentFate::Close(why) = fate {
                if let Some(b) = decide::built_record(&real, &inventories) {
                    if let Some(h) = HOSTS.iter().position(|h| *h == b.host) {
                        s.disk.built.insert(vm, (h as u8, b.seq));
                    }
                }
                if let (true, Status::Placed { host, .. }) = (why.contains("gone"), &i.status) {
                    s.disk.closed_gone.insert((vm, *host, i.job));
                }
                s.disk.intents.remove(&vm);
            }
        }
        let others = decide::others_in_flight(&inventories, HOSTS[me], now, DEADLINE);
        let all_owners: BTreeMap<String, CommitOwners> = commits
            .iter()
            .map(|c| (c.id.to_string(), c.owners()))
            .collect();
        let peer_commits: BTreeMap<String, Option<String>> = inventories
            .iter()
            .map(|(h, inv)| (h.clone(), inv.commit.clone()))
            .collect();
        let answered: BTreeSet<String> = s.answered.iter().map(|h| name(*h)).collect();
        let owners = commit.owners();
        for (v, vm) in VMS.iter().enumerate() {
            let v8 = v as u8;
            if owners.owner(vm) != Some(HOSTS[me])
                || s.disk.intents.contains_key(&v8)
                || inventories
                    .values()
                    .any(|inv| inv.vms.iter().any(|x| x.name == *vm))
                || others.iter().any(|f| f.vm == *vm)
                || !unseen.is_empty()
                || (!logic.no_built_records
                    && !decide::builds_unseen(vm, &inventories, &BTreeSet::new()).is_empty())
            {
                continue;
            }
            let waits = if logic.answered_only_waits {
                old_on_other_commits(&inventories, &answered, Some(commit.id), now)
            } else {
                decide::waits_for(
                    vm,
                    HOSTS[me],
                    Some(commit.id),
                    &peer_commits,
                    &all_owners,
                    &BTreeSet::new(),
                )
            };
            if !waits.is_empty() {
                continue;
            }
            let pinned = commit.pins[v].is_some();
            let to = decide::first_hop(
                FirstHop::LeastLoaded,
                HOSTS[me],
                pinned,
                &inventories,
                &BTreeMap::new(),
            );
            let Some(to) = HOSTS.iter().position(|h| *h == to) else {
                continue;
            };
            let job = (me as u8, s.disk.next_job);
            s.disk.next_job += 1;
            // The intent is on disk before the put (safety rule 2).
            s.disk.intents.insert(
                v8,
                IntentP {
                    job,
                    first_hop: to as u8,
                    commit: c,
                    status: Status::Sent,
                },
            );
            o.send(
                Id::from(to),
                Msg::Create {
                    job,
                    vm: v8,
                    commit: c,
                    hops_left: 3,
                    visited: vec![],
                    pinned,
                },
            );
        }
        s.answered.clear();
        s.reconciled = Some(c);
        publish(me, s, o);
        o.save(Store::Host(s.disk.clone()));
    }
}

/// Publishes this host's inventory when it says something new: a new sequence, taken
/// before the listing (the VMs it holds now).
fn publish(me: usize, s: &mut HostState, o: &mut Out<Node>) {
    let in_flight: BTreeMap<u8, Job> = s.disk.intents.iter().map(|(v, i)| (*v, i.job)).collect();
    let content = (
        s.reconciled,
        s.disk.held.clone(),
        in_flight.clone(),
        s.disk.built.clone(),
    );
    if s.published.as_ref() == Some(&content) {
        return;
    }
    s.disk.seq += 1;
    let inv = Inv {
        seq: s.disk.seq,
        commit: s.reconciled,
        listed_at: T0 + s.offset,
        vms: s.disk.held.clone(),
        in_flight,
        built: s.disk.built.clone(),
    };
    s.published = Some(content);
    let peers: Vec<Id> = (0..HOSTS.len())
        .filter(|h| *h != me)
        .map(Id::from)
        .collect();
    o.broadcast(&peers, &Msg::Inventory(inv));
}

impl Actor for Node {
    type Msg = Msg;
    type State = State;
    type Timer = Push;
    type Random = Offset;
    type Storage = Store;

    fn on_start(&self, id: Id, storage: &Option<Store>, o: &mut Out<Self>) -> State {
        match self {
            Node::Host {
                skew,
                logic,
                commits,
                warm,
                built,
            } => {
                if *skew {
                    o.choose_random("clock", vec![Offset(0), Offset(SKEW)]);
                }
                let disk = match storage {
                    Some(Store::Host(d)) => d.clone(),
                    None => Disk {
                        seq: 0,
                        next_job: 0,
                        intents: BTreeMap::new(),
                        held: BTreeMap::new(),
                        closed_gone: BTreeSet::new(),
                        built: BTreeMap::new(),
                    },
                };
                let fresh = storage.is_none();
                let mut s = HostState {
                    disk,
                    offset: 0,
                    commit: None,
                    reconciled: None,
                    peers: BTreeMap::new(),
                    answered: BTreeSet::new(),
                    published: None,
                };
                if *warm && fresh {
                    // What delivering `Head(0)` does (on_msg), at the first start only:
                    // a restart after a crash waits for the remote like any other.
                    s.commit = Some(0);
                    self.host_pass(usize::from(id), &mut s, o, *logic, commits);
                }
                if !(*built && *warm && fresh) {
                    return State::Host(s);
                }
                // The two deliveries of `Scenario::built`, through the real handler:
                // host1 reads host2's first inventory (as host2's warm start published
                // it) and sends its create to host2; host2 builds that create (as
                // host1 sent it; a unit test checks the two agree).
                let mut state = Cow::Owned(State::Host(s));
                match usize::from(id) {
                    0 => {
                        let first = Inv {
                            seq: 1,
                            commit: Some(0),
                            listed_at: T0,
                            vms: BTreeMap::new(),
                            in_flight: BTreeMap::new(),
                            built: BTreeMap::new(),
                        };
                        self.on_msg(id, &mut state, Id::from(1), Msg::Inventory(first), o);
                    }
                    1 => {
                        let create = Msg::Create {
                            job: (0, 0),
                            vm: 0,
                            commit: 0,
                            hops_left: 3,
                            visited: vec![],
                            pinned: false,
                        };
                        self.on_msg(id, &mut state, Id::from(0), create, o);
                    }
                    _ => {}
                }
                state.into_owned()
            }
            Node::Remote {
                commits,
                head,
                warm,
            } => {
                for c in 0..=*head {
                    // A warm host's `Head(0)` is consumed: delivering it again changes
                    // nothing but a network that delivers once, where it would only
                    // multiply the states.
                    let to: Vec<Id> = (0..HOSTS.len())
                        .filter(|h| c > 0 || !warm.contains(h))
                        .map(Id::from)
                        .collect();
                    o.broadcast(&to, &Msg::Head(c));
                }
                if head + 1 < *commits {
                    o.set_timer(Push, model_timeout());
                }
                State::Remote(*head)
            }
        }
    }

    fn on_random(&self, _id: Id, state: &mut Cow<State>, random: &Offset, _o: &mut Out<Self>) {
        if let State::Host(s) = state.to_mut() {
            s.offset = random.0;
        }
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<State>, _t: &Push, o: &mut Out<Self>) {
        let (Node::Remote { commits, .. }, State::Remote(head)) = (self, state.as_ref()) else {
            return;
        };
        let next = head + 1;
        if next >= *commits {
            return;
        }
        *state.to_mut() = State::Remote(next);
        let hosts: Vec<Id> = (0..HOSTS.len()).map(Id::from).collect();
        o.broadcast(&hosts, &Msg::Head(next));
        if next + 1 < *commits {
            o.set_timer(Push, model_timeout());
        }
    }

    fn on_msg(&self, id: Id, state: &mut Cow<State>, src: Id, msg: Msg, o: &mut Out<Self>) {
        let Node::Host { logic, commits, .. } = self else {
            return;
        };
        let me = usize::from(id);
        let State::Host(s) = state.to_mut() else {
            return;
        };
        match msg {
            Msg::Head(c) => {
                if s.commit.is_some_and(|have| have >= c) {
                    return;
                }
                s.commit = Some(c);
            }
            Msg::Inventory(inv) => {
                let from = usize::from(src) as u8;
                if s.peers.get(&from).is_some_and(|have| have.seq >= inv.seq) {
                    return;
                }
                s.peers.insert(from, inv);
                s.answered.insert(from);
            }
            Msg::Create {
                job,
                vm,
                commit,
                hops_left,
                visited,
                pinned,
            } => {
                if s.disk.held.get(&vm) == Some(&job) {
                    // A redelivered create whose VM is built answers again.
                    o.send(
                        Id::from(job.0 as usize),
                        Msg::Result {
                            job,
                            vm,
                            built_on: Some(me as u8),
                            seq: s.disk.seq,
                        },
                    );
                    return;
                }
                if s.disk.held.contains_key(&vm) {
                    o.send(
                        Id::from(job.0 as usize),
                        Msg::Result {
                            job,
                            vm,
                            built_on: None,
                            seq: s.disk.seq,
                        },
                    );
                    return;
                }
                let c = &commits[commit as usize];
                let pos = c.hosts.iter().position(|h| *h == me);
                let next = pos.map(|p| HOSTS[c.hosts[(p + 1) % c.hosts.len()]]);
                let held = s.disk.held.len() as u64;
                let l = limits(me);
                let view = HostView {
                    name: HOSTS[me],
                    next,
                    used: Usage {
                        memory: Size(vm_memory().0 * held),
                        storage: Size(0),
                        vms: held as u32,
                    },
                    reserved: Usage::default(),
                    limits: &l,
                    overload: None,
                    drained: false,
                };
                match placement::decide(&create_job(job, vm, c, hops_left, &visited, pinned), view)
                {
                    Decision::Admit { .. } => {
                        s.disk.held.insert(vm, job);
                        o.save(Store::Host(s.disk.clone()));
                        // The result carries the sequence after the work; the next
                        // inventory, listed after the build, is numbered above it.
                        o.send(
                            Id::from(job.0 as usize),
                            Msg::Result {
                                job,
                                vm,
                                built_on: Some(me as u8),
                                seq: s.disk.seq,
                            },
                        );
                        publish(me, s, o);
                        o.save(Store::Host(s.disk.clone()));
                    }
                    Decision::Forward { to, job: fwd } => {
                        if let Some(to) = HOSTS.iter().position(|h| *h == to) {
                            let mut visited = visited;
                            visited.push(me as u8);
                            o.send(
                                Id::from(to),
                                Msg::Create {
                                    job,
                                    vm,
                                    commit,
                                    hops_left: fwd.hops_left,
                                    visited,
                                    pinned,
                                },
                            );
                        }
                    }
                    Decision::Unplaceable { .. } => {
                        o.send(
                            Id::from(job.0 as usize),
                            Msg::Result {
                                job,
                                vm,
                                built_on: None,
                                seq: s.disk.seq,
                            },
                        );
                    }
                }
                return;
            }
            Msg::Result {
                job,
                vm,
                built_on,
                seq,
            } => {
                let Some(i) = s.disk.intents.get_mut(&vm).filter(|i| i.job == job) else {
                    return;
                };
                if i.status != Status::Sent {
                    return;
                }
                i.status = match built_on {
                    Some(host) => Status::Placed {
                        host,
                        at: T0 + s.offset,
                        seq,
                    },
                    None => Status::Failed,
                };
                o.save(Store::Host(s.disk.clone()));
            }
        }
        let (logic, commits) = (*logic, commits.clone());
        self.host_pass(me, s, o, logic, &commits);
    }
}

/// The model: three hosts running `logic`, the remote pushing the scenario's commits, an
/// unordered duplicating network (lossy with `lossy`), at most `crashes` hosts crashed at
/// a time.
///
/// For the safety properties loss adds nothing: in an unordered duplicating network any
/// message may stay undelivered for ever, which is what a lost one is; a drop only
/// removes futures. It multiplies the states, though (a drop action per message in
/// flight), so the tests run without it and the deep check may turn it on.
pub fn model(logic: Logic, faults: Faults, scenario: Scenario) -> ActorModel<Node, (), ()> {
    let lossy = faults.lossy;
    let mut commits = commits();
    commits.truncate(scenario.commits.max(1));
    let n = commits.len() as u8;
    ActorModel::new((), ())
        .actors((0..HOSTS.len()).map(|h| Node::Host {
            logic,
            skew: faults.skew,
            commits: commits.clone(),
            warm: scenario.warm.contains(&h),
            built: scenario.built,
        }))
        .actor(Node::Remote {
            warm: scenario.warm.to_vec(),
            commits: n,
            head: scenario.head.min(n - 1),
        })
        .init_network(if faults.once {
            Network::new_unordered_nonduplicating([])
        } else {
            Network::new_unordered_duplicating([])
        })
        .lossy_network(if lossy {
            LossyNetwork::Yes
        } else {
            LossyNetwork::No
        })
        .max_crashes(faults.crashes)
        .property(Expectation::Always, NO_TWICE, |_, s| {
            holders(s).values().all(|h| h.len() <= 1)
        })
        .property(Expectation::Always, NO_GONE_WHILE_HELD, |_, s| {
            gone_while_held(s).is_empty()
        })
        .property(Expectation::Sometimes, ALL_PLACED, |_, s| {
            let h = holders(s);
            (0..VMS.len() as u8).all(|v| h.get(&v).is_some_and(|x| !x.is_empty()))
        })
}

/// Property: no VM is held by two hosts.
pub const NO_TWICE: &str = "no VM held by two hosts";
/// Property: no placed intent closes as gone while its builder holds the VM.
pub const NO_GONE_WHILE_HELD: &str =
    "no placed intent closed as gone while its builder holds the VM";
/// Property (non-triviality): every VM gets placed.
pub const ALL_PLACED: &str = "every VM placed";

fn hosts(s: &ActorModelState<Node>) -> impl Iterator<Item = (usize, &HostState)> {
    s.actor_states
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a.as_ref() {
            State::Host(h) => Some((i, h)),
            State::Remote(_) => None,
        })
}

/// Which hosts hold each VM (crashed hosts too: their VMs stay).
pub fn holders(s: &ActorModelState<Node>) -> BTreeMap<u8, BTreeSet<usize>> {
    let mut out: BTreeMap<u8, BTreeSet<usize>> = BTreeMap::new();
    for (i, h) in hosts(s) {
        // A crashed host's state is what it had; its disk (storage) holds the same VMs.
        let held = match s.actor_storages.get(i) {
            Some(Some(Store::Host(d))) if s.crashed[i] => &d.held,
            _ => &h.disk.held,
        };
        for v in held.keys() {
            out.entry(*v).or_default().insert(i);
        }
    }
    out
}

/// The "gone" closes whose builder holds the VM built by that job.
pub fn gone_while_held(s: &ActorModelState<Node>) -> Vec<(u8, u8, Job)> {
    let all: Vec<(usize, &HostState)> = hosts(s).collect();
    all.iter()
        .flat_map(|(_, h)| h.disk.closed_gone.iter().copied())
        .filter(|(vm, b, job)| {
            all.iter()
                .any(|(i, h)| *i == *b as usize && h.disk.held.get(vm) == Some(job))
        })
        .collect()
}

/// Checks `logic` in `scenario` by BFS to `depth` on two threads; the checker is returned
/// joined.
/// With `stop_at_failure`, BFS stops at the first property that fails (at the smallest
/// depth), else it explores every state to `depth`.
pub fn check(
    logic: Logic,
    faults: Faults,
    scenario: Scenario,
    depth: usize,
    stop_at_failure: bool,
) -> impl Checker<ActorModel<Node, (), ()>> {
    let c = model(logic, faults, scenario)
        .checker()
        .threads(2)
        .target_max_depth(depth);
    let c = if stop_at_failure {
        c.finish_when(stateright::HasDiscoveries::AnyFailures)
    } else {
        c
    };
    c.spawn_bfs().join()
}

/// Looks for a failing property by DFS to `depth` on two threads, stopping at the first
/// one: for counterexamples deeper than BFS reaches in a test's time.
pub fn hunt(
    logic: Logic,
    faults: Faults,
    scenario: Scenario,
    depth: usize,
) -> impl Checker<ActorModel<Node, (), ()>> {
    model(logic, faults, scenario)
        .checker()
        .threads(2)
        .target_max_depth(depth)
        .finish_when(stateright::HasDiscoveries::AnyFailures)
        .spawn_dfs()
        .join()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Scenario::built`'s start is the one its two deliveries reach: host1 sent the
    /// create to host2 (its intent open) and host2 holds web1 built by that very job.
    #[test]
    fn the_built_start_has_host1s_create_built_on_host2() {
        let m = model(Logic::default(), Faults::ONCE, Scenario::BUILT_HOST3_COLD);
        let init = m.init_states().pop().expect("an initial state");
        let host = |i: usize| match init.actor_states[i].as_ref() {
            State::Host(h) => h.clone(),
            State::Remote(_) => panic!("actor {i} is not a host"),
        };
        let (h1, h2, h3) = (host(0), host(1), host(2));
        let intent = h1.disk.intents.get(&0).expect("host1's intent");
        assert_eq!((intent.job, intent.first_hop), ((0, 0), 1));
        assert_eq!(h2.disk.held.get(&0), Some(&(0, 0)));
        assert!(h3.disk.held.is_empty() && h3.commit.is_none());
        assert!(init.network.iter_deliverable().any(|e| matches!(
            e.msg,
            Msg::Result {
                job: (0, 0),
                built_on: Some(1),
                ..
            }
        )));
    }

    /// Each commit of the model's branch moves web1's owner: otherwise the model could
    /// not show a create racing an ownership move.
    #[test]
    fn every_commit_moves_the_owner() {
        let c = commits();
        let owners: Vec<String> = c
            .iter()
            .map(|c| c.owners().owner(VMS[0]).unwrap_or_default().to_string())
            .collect();
        for w in owners.windows(2) {
            assert_ne!(w[0], w[1], "{owners:?}");
        }
    }
}
