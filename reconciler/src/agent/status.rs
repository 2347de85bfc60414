//! The cluster as the hosts' published inventories show it: `flotilla status` and
//! `flotilla apply --wait` read it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::actual::RunState;
use crate::capacity::{Limits, Usage};
use crate::message::{
    self, BlockedItem, DesiredError, InFlightCreate, Inventory, OpInFlightItem, RecentFailure,
};

use super::peers::Peers;
use super::HostsFile;

/// One host as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// Its name.
    pub host: String,
    /// Its beanstalkd.
    pub beanstalkd: String,
    /// Whether its inventory could be read now.
    pub reachable: bool,
    /// Why not, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since it last listed its VMs.
    pub inventory_age: Option<u64>,
    /// When it last listed its VMs (RFC 3339, UTC, by its clock).
    pub listed_at: Option<String>,
    /// The commit it has applied.
    pub applied_commit: Option<String>,
    /// What its VMs claim.
    pub used: Option<Usage>,
    /// What creates in progress hold.
    pub reserved: Option<Usage>,
    /// Its limits.
    pub limits: Option<Limits>,
    /// An overload threshold crossed.
    pub overload: Option<String>,
    /// The host identity its inventory shows (safety rule 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// True for a host that left cluster.yaml: its VMs are held there (safety rule 9)
    /// until it shows them gone or `flotilla host forget` says it is gone for good.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub left_cluster: bool,
    /// A peer clock it sees beyond `max_clock_skew`: no creates are sent meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<String>,
    /// Drained by an operator (`flotilla host drain`): it places no new creates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// A host name seen under two identities: two agents claim it, and no create goes to or
/// from it until one is gone.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdentityConflict {
    /// The host name.
    pub host: String,
    /// The identities seen.
    pub identities: Vec<String>,
    /// The hosts whose agents saw it.
    pub seen_by: Vec<String>,
}

/// One VM as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// Its name.
    pub vm: String,
    /// The host it is on.
    pub host: String,
    /// Its run state.
    pub state: RunState,
    /// Whether this cluster manages it.
    pub managed: bool,
    /// The spec hash in its marker.
    pub spec_hash: Option<String>,
    /// Whether its build finished.
    pub complete: bool,
    /// True when it is on a host that left cluster.yaml: not created elsewhere while
    /// that host holds it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub held_by_removed_host: bool,
}

/// A desired commit that does not validate, as the hosts that fetched it report it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvalidTip {
    /// The commit, file, line, column and first error.
    pub error: DesiredError,
    /// The hosts that fetched it.
    pub hosts: Vec<String>,
    /// The commits those hosts keep applying instead (their last good one).
    pub keep_applying: Vec<String>,
}

/// The version of `status --output json` (schemas/v1/status.schema.json). New keys
/// (`listed_at`, `blocked`, `ops`, `invalid_tips`, `needs_action` came this way) do not
/// raise it; a change that would break a reader does.
pub const FORMAT_VERSION: u32 = 1;

/// The whole cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Format of this document.
    pub format_version: u32,
    /// The cluster id.
    pub cluster: String,
    /// The desired commit the local agent last read.
    pub desired_commit: Option<String>,
    /// Every host.
    pub hosts: Vec<HostStatus>,
    /// Every VM on every reachable host, managed or not.
    pub vms: Vec<VmStatus>,
    /// Creates in flight, by owner.
    pub in_flight: Vec<(String, InFlightCreate)>,
    /// Creates that wait for hosts on another commit (or silent ones), by owner.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<(String, crate::message::WaitingCreate)>,
    /// Recent failures, by the owner that heard of them.
    pub failures: Vec<(String, RecentFailure)>,
    /// Differences the hosts' last passes left alone (each once): an operator must act.
    pub blocked: Vec<BlockedItem>,
    /// Ops (drift repairs, changes, destroys) under way, by the host that sent them.
    pub ops: Vec<(String, OpInFlightItem)>,
    /// Desired commits the hosts fetched that do not validate.
    pub invalid_tips: Vec<InvalidTip>,
    /// What an operator must act on, one line each (hosts that do not answer, invalid
    /// tips, blocked VMs, held-back destroys); empty when nothing.
    pub needs_action: Vec<String>,
    /// Host names seen under two identities.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identity_conflicts: Vec<IdentityConflict>,
    /// Why the inventories' signatures were not checked (the cluster key was not
    /// readable, say); `None` when every inventory shown verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unverified: Option<String>,
    /// Drains and suspends, as any host's inventory shows them (`flotilla host drain`,
    /// `suspend`).
    #[serde(default, skip_serializing_if = "crate::control::Switches::is_empty")]
    pub switches: crate::control::Switches,
}

/// How `gather` treats the inventories' signatures.
pub enum Verify<'a> {
    /// Check each under the cluster keys and the message window (seconds); one that
    /// does not verify is shown as an error, and its contents are not.
    With(&'a crate::auth::Keys, u64),
    /// Show them unchecked, saying why.
    Without(String),
}

impl ClusterStatus {
    /// True when every host answered, has applied `commit`, listed its VMs after
    /// `since`, and no create or op is under way (failed creates waiting to retry are
    /// reported by [`ClusterStatus::retrying`], blocked items by `blocked`, not waited
    /// for).
    pub fn converged(&self, commit: &str, since: u64, inventories: &[Inventory]) -> bool {
        self.converged_on(since, inventories, |c| c == commit)
            .is_some()
    }

    /// The commit every member host has applied, when they all applied the same one,
    /// `accept` takes it, each finished a reconcile pass and listed its VMs after
    /// `since`, and nothing is under way (see [`ClusterStatus::converged`]).
    pub fn converged_on(
        &self,
        since: u64,
        inventories: &[Inventory],
        mut accept: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let members = self.hosts.iter().filter(|h| !h.left_cluster);
        if !members.clone().all(|h| h.reachable) || inventories.len() != members.count() {
            return None;
        }
        let commit = inventories.first()?.applied_commit.clone()?;
        let settled = inventories.iter().all(|i| {
            i.applied_commit.as_deref() == Some(commit.as_str())
                && i.listed_at >= since
                && i.reconciled_at >= since
                && i.ops.is_empty()
        }) && self.in_flight.iter().all(|(_, f)| f.retry_at.is_some())
            && self.waiting.is_empty();
        (settled && accept(&commit)).then_some(commit)
    }

    /// Creates that failed (unplaceable, say) and wait to be sent again, by owner.
    pub fn retrying(&self) -> Vec<&(String, InFlightCreate)> {
        self.in_flight
            .iter()
            .filter(|(_, f)| f.retry_at.is_some())
            .collect()
    }
}

/// Reads every host's inventory.
pub async fn gather(hosts: &HostsFile, verify: Verify<'_>) -> (ClusterStatus, Vec<Inventory>) {
    let peers = Peers::new();
    let (keys, unverified) = match verify {
        Verify::With(k, window) => (Some((k, window)), None),
        Verify::Without(why) => (None, Some(why)),
    };
    let now = message::now();
    let mut out = ClusterStatus {
        format_version: FORMAT_VERSION,
        cluster: hosts.cluster.clone(),
        desired_commit: hosts.commit.clone(),
        hosts: Vec::new(),
        vms: Vec::new(),
        in_flight: Vec::new(),
        waiting: Vec::new(),
        failures: Vec::new(),
        blocked: Vec::new(),
        ops: Vec::new(),
        invalid_tips: Vec::new(),
        needs_action: Vec::new(),
        identity_conflicts: Vec::new(),
        unverified,
        switches: Default::default(),
    };
    let mut blocked = std::collections::BTreeSet::new();
    let mut invs = Vec::new();
    let listed = hosts.hosts.iter().map(|(n, a)| (n, a, false));
    let departed = hosts.departed.iter().map(|(n, a)| (n, a, true));
    for (name, addr, left_cluster) in listed.chain(departed) {
        let r =
            tokio::time::timeout(Duration::from_secs(3), peers.inventory(addr, name, keys)).await;
        let mut h = HostStatus {
            host: name.clone(),
            beanstalkd: addr.clone(),
            reachable: false,
            error: None,
            inventory_age: None,
            listed_at: None,
            applied_commit: None,
            used: None,
            reserved: None,
            limits: None,
            overload: None,
            identity: None,
            left_cluster,
            clock_skew: None,
            draining: false,
        };
        match r {
            Ok(Ok((Some(inv), _))) => {
                h.reachable = true;
                h.inventory_age = Some(now.saturating_sub(inv.listed_at));
                h.listed_at = Some(rfc3339(inv.listed_at));
                blocked.extend(inv.blocked.iter().cloned());
                out.ops
                    .extend(inv.ops.iter().map(|o| (name.clone(), o.clone())));
                if let Some(e) = &inv.desired_error {
                    note_invalid(
                        &mut out.invalid_tips,
                        name,
                        e,
                        inv.applied_commit.as_deref(),
                    );
                }
                h.applied_commit = inv.applied_commit.clone();
                h.used = Some(inv.used);
                h.reserved = Some(inv.reserved);
                h.limits = Some(inv.limits);
                h.overload = inv.overload.clone();
                h.clock_skew = inv.clock_skew.clone();
                h.identity = inv.agent.as_ref().map(|a| a.identity.clone());
                h.draining = inv.switches.drains(name);
                out.switches
                    .drained
                    .extend(inv.switches.drained.iter().cloned());
                out.switches.suspend_all |= inv.switches.suspend_all;
                out.switches
                    .suspended
                    .extend(inv.switches.suspended.iter().cloned());
                for vm in &inv.vms {
                    out.vms.push(VmStatus {
                        vm: vm.name.clone(),
                        host: name.clone(),
                        state: vm.state,
                        managed: vm.is_managed_by(&hosts.cluster),
                        spec_hash: vm.marker.as_ref().map(|m| m.spec_hash.clone()),
                        complete: vm.marker.as_ref().is_some_and(|m| m.complete),
                        held_by_removed_host: left_cluster,
                    });
                }
                out.waiting
                    .extend(inv.waiting.iter().map(|w| (name.clone(), w.clone())));
                out.in_flight
                    .extend(inv.in_flight.iter().map(|f| (name.clone(), f.clone())));
                out.failures
                    .extend(inv.failures.iter().map(|f| (name.clone(), f.clone())));
                if !left_cluster {
                    invs.push(inv);
                }
            }
            Ok(Ok((None, _))) => {
                h.reachable = true;
                h.error = Some("no inventory published yet".into());
            }
            Ok(Err(e)) => h.error = Some(e.to_string()),
            Err(_) => h.error = Some("no answer within 3s".into()),
        }
        out.hosts.push(h);
    }
    out.vms
        .sort_by(|a, b| a.vm.cmp(&b.vm).then(a.host.cmp(&b.host)));
    out.identity_conflicts = identity_conflicts(&invs);
    // A host that missed the drain message still shows as draining when others know.
    for h in &mut out.hosts {
        h.draining |= out.switches.drains(&h.host);
    }
    out.blocked = blocked.into_iter().collect();
    out.needs_action = needs_action(&out);
    (out, invs)
}

fn note_invalid(tips: &mut Vec<InvalidTip>, host: &str, e: &DesiredError, applied: Option<&str>) {
    let i = match tips.iter().position(|t| t.error.commit == e.commit) {
        Some(i) => i,
        None => {
            tips.push(InvalidTip {
                error: e.clone(),
                hosts: Vec::new(),
                keep_applying: Vec::new(),
            });
            tips.len() - 1
        }
    };
    let t = &mut tips[i];
    t.hosts.push(host.to_string());
    if let Some(a) = applied {
        if !t.keep_applying.iter().any(|k| k == a) {
            t.keep_applying.push(a.to_string());
        }
    }
}

/// What a blocked reason asks of an operator, in words.
pub fn reason_text(reason: &str) -> &'static str {
    match reason {
        "name_taken" => "name taken by a VM this cluster does not manage (rename one, or destroy or adopt the other)",
        "protected" => "protected but not desired: the destroy is refused (unprotect it first)",
        "prune_guard" => "destroy held back by the prune guard (more than its share of the host's VMs)",
        "drift" => "drift only a rebuild fixes and the VM does not allow one (a disk shrink, say)",
        "empty_desired" => "destroy held back: the desired state lists no VMs",
        "held_by_removed_host" => "held by a host that left cluster.yaml (`flotilla host forget` once it is gone)",
        "duplicate" => "the same managed VM exists on more than one host",
        "locked" => "run lock without a process: its state is unknown",
        "unknown_host" => "on a host that is not in cluster.yaml",
        "resource_taken" => "a disk, MAC or VNC port it needs is held by another VM",
        _ => "blocked",
    }
}

/// One line per thing an operator must act on.
fn needs_action(s: &ClusterStatus) -> Vec<String> {
    let mut out = Vec::new();
    for h in s.hosts.iter().filter(|h| h.error.is_some()) {
        out.push(format!(
            "host {} ({}) does not answer: {}",
            h.host,
            h.beanstalkd,
            h.error.as_deref().unwrap_or_default()
        ));
    }
    for t in &s.invalid_tips {
        let e = &t.error;
        out.push(format!(
            "desired commit {} does not validate: {}:{}:{}: {}{}; hosts keep applying {} ({})",
            short(Some(&e.commit)),
            e.file,
            e.line,
            e.column,
            e.message,
            if e.errors > 1 {
                format!(
                    " (and {} more; `flotilla validate` lists them)",
                    e.errors - 1
                )
            } else {
                String::new()
            },
            t.keep_applying
                .iter()
                .map(|c| short(Some(c)))
                .collect::<Vec<_>>()
                .join(", "),
            t.hosts.join(", ")
        ));
    }
    for b in &s.blocked {
        out.push(blocked_line(b));
    }
    out
}

/// A blocked item for people: VM, host, what it asks for, the planner's detail.
pub fn blocked_line(b: &BlockedItem) -> String {
    format!(
        "{} {} on {} ({}): {}; {}",
        if b.reason == "prune_guard" || b.reason == "empty_desired" {
            "held destroy"
        } else {
            "blocked"
        },
        b.vm,
        b.host,
        b.reason,
        reason_text(&b.reason),
        b.detail
    )
}

/// Which parts of the cluster `status` shows: `None` shows all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this host.
    pub host: Option<String>,
    /// Only this VM.
    pub vm: Option<String>,
    /// Only VMs in this run state (`running`, `stopped`, `bootloader`, `locked`).
    pub state: Option<String>,
}

fn state_name(s: RunState) -> String {
    format!("{s:?}").to_lowercase()
}

impl ClusterStatus {
    /// Keeps what `f` selects, and what needs action among it.
    pub fn filter(&mut self, f: &Filter) {
        let host = |h: &str| f.host.as_deref().is_none_or(|x| x == h);
        let vm = |v: &str| f.vm.as_deref().is_none_or(|x| x == v);
        self.hosts.retain(|h| host(&h.host));
        self.vms.retain(|v| {
            host(&v.host)
                && vm(&v.vm)
                && f.state.as_deref().is_none_or(|s| s == state_name(v.state))
        });
        self.in_flight.retain(|(o, c)| vm(&c.vm) && host(o));
        self.waiting.retain(|(o, w)| vm(&w.vm) && host(o));
        self.failures.retain(|(_, x)| vm(&x.vm) && host(&x.host));
        self.blocked.retain(|b| vm(&b.vm) && host(&b.host));
        self.ops.retain(|(h, o)| vm(&o.vm) && host(h));
        if f.vm.is_some() {
            self.invalid_tips.clear();
        }
        self.invalid_tips.retain_mut(|t| {
            t.hosts.retain(|h| host(h));
            !t.hosts.is_empty()
        });
        self.needs_action = needs_action(self);
    }

    /// True when some host does not answer.
    pub fn unanswered(&self) -> bool {
        self.hosts.iter().any(|h| h.error.is_some())
    }
}

/// `secs` since the Unix epoch as RFC 3339, UTC (`2026-01-31T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil: the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The identity conflicts the inventories report, merged per host name.
pub fn identity_conflicts(invs: &[Inventory]) -> Vec<IdentityConflict> {
    let mut by: BTreeMap<String, (std::collections::BTreeSet<String>, Vec<String>)> =
        BTreeMap::new();
    for inv in invs {
        for (host, ids) in inv.agent.iter().flat_map(|a| &a.conflicts) {
            let e = by.entry(host.clone()).or_default();
            e.0.extend(ids.iter().cloned());
            e.1.push(inv.host.clone());
        }
    }
    by.into_iter()
        .map(|(host, (ids, seen_by))| IdentityConflict {
            host,
            identities: ids.into_iter().collect(),
            seen_by,
        })
        .collect()
}

fn short(commit: Option<&str>) -> String {
    commit.map_or("-".to_string(), |c| c.chars().take(10).collect())
}

fn usage(u: Option<Usage>, l: Option<Limits>) -> String {
    match (u, l) {
        (Some(u), Some(l)) => format!(
            "mem {}/{}  disk {}/{}  vms {}/{}",
            u.memory,
            l.memory.map_or("-".into(), |m| m.to_string()),
            u.storage,
            l.storage.map_or("-".into(), |m| m.to_string()),
            u.vms,
            l.vms.map_or("-".into(), |m| m.to_string()),
        ),
        _ => "-".into(),
    }
}

/// Rows as columns: each as wide as its widest cell, two spaces apart, indented.
fn table(o: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |o: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (c, w) in cells.zip(&widths) {
            let _ = write!(l, " {c:<w$}");
        }
        let _ = writeln!(o, "{}", l.trim_end());
    };
    line(o, &mut header.iter().copied());
    for r in rows {
        line(o, &mut r.iter().map(String::as_str));
    }
}

/// `status` for people.
pub fn render_text(s: &ClusterStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  desired commit {} (the local agent's last good one)",
        s.cluster,
        short(s.desired_commit.as_deref())
    );
    if let Some(why) = &s.unverified {
        let _ = writeln!(o, "inventories NOT verified: {why}");
    }
    if s.needs_action.is_empty() {
        let _ = writeln!(o, "\nNothing needs action.");
    } else {
        let _ = writeln!(o, "\nNEEDS ACTION");
        for line in &s.needs_action {
            let _ = writeln!(o, "  {line}");
        }
    }
    let _ = writeln!(o, "\nHOSTS");
    let rows: Vec<Vec<String>> = s
        .hosts
        .iter()
        .map(|h| {
            let mut notes = Vec::new();
            if let Some(e) = &h.error {
                notes.push(format!("DOES NOT ANSWER: {e}"));
            }
            if let Some(x) = &h.overload {
                notes.push(format!("OVERLOADED: {x}"));
            }
            if let Some(x) = &h.clock_skew {
                notes.push(format!("CLOCK SKEW, no creates: {x}"));
            }
            if h.left_cluster {
                notes.push("LEFT cluster.yaml: its VMs are held there until it shows them gone or `flotilla host forget`".into());
            }
            if h.draining {
                notes.push("DRAINING: no new creates (`flotilla host undrain`)".into());
            }
            vec![
                h.host.clone(),
                h.beanstalkd.clone(),
                short(h.applied_commit.as_deref()),
                usage(h.used, h.limits),
                match (&h.listed_at, h.inventory_age) {
                    (Some(at), Some(age)) => format!("{at} ({age}s ago)"),
                    _ => "-".into(),
                },
                notes.join("; "),
            ]
        })
        .collect();
    table(
        &mut o,
        &[
            "HOST",
            "BEANSTALKD",
            "APPLIED",
            "USED/LIMIT",
            "LISTED",
            "NOTES",
        ],
        &rows,
    );
    if s.switches.suspend_all {
        let _ = writeln!(
            o,
            "\nSUSPENDED: the whole cluster; nothing is acted on until `flotilla resume`"
        );
    }
    if !s.switches.suspended.is_empty() {
        let names: Vec<&str> = s.switches.suspended.iter().map(String::as_str).collect();
        let _ = writeln!(
            o,
            "\nSUSPENDED VMS (`flotilla resume VM`): {}",
            names.join(", ")
        );
    }
    if !s.identity_conflicts.is_empty() {
        let _ = writeln!(
            o,
            "\nTWO AGENTS UNDER ONE HOST NAME (no create goes to or from it)"
        );
        for c in &s.identity_conflicts {
            let _ = writeln!(
                o,
                "  {:<10} identities {}  (seen by {})",
                c.host,
                c.identities.join(", "),
                c.seen_by.join(", ")
            );
        }
    }
    let managed: Vec<&VmStatus> = s.vms.iter().filter(|v| v.managed).collect();
    let _ = writeln!(
        o,
        "\nVMS ({} managed, {} other)",
        managed.len(),
        s.vms.len() - managed.len()
    );
    let rows: Vec<Vec<String>> = managed
        .iter()
        .map(|v| {
            let mut notes: Vec<String> = s
                .blocked
                .iter()
                .filter(|b| b.vm == v.vm)
                .map(|b| format!("blocked ({})", b.reason))
                .collect();
            if v.held_by_removed_host {
                notes.push("held by a host that left cluster.yaml".into());
            } else if !v.complete {
                notes.push("half-made".into());
            }
            if s.switches.suspends(&v.vm) {
                notes.push("suspended".into());
            }
            vec![
                v.vm.clone(),
                v.host.clone(),
                state_name(v.state),
                notes.join("; "),
            ]
        })
        .collect();
    table(&mut o, &["VM", "HOST", "STATE", "NOTES"], &rows);
    if !s.waiting.is_empty() {
        let _ = writeln!(o, "\nCREATES WAITING FOR OTHER HOSTS (on another commit under which they own the VM, or silent; `flotilla host forget` if gone for good)");
        let rows: Vec<Vec<String>> = s
            .waiting
            .iter()
            .map(|(owner, w)| vec![w.vm.clone(), owner.clone(), w.for_hosts.join(", ")])
            .collect();
        table(&mut o, &["VM", "OWNER", "WAITS FOR"], &rows);
    }
    if !s.in_flight.is_empty() || !s.ops.is_empty() {
        let _ = writeln!(o, "\nIN FLIGHT");
        let mut rows: Vec<Vec<String>> = s
            .in_flight
            .iter()
            .map(|(owner, f)| {
                vec![
                    "create".into(),
                    f.vm.clone(),
                    owner.clone(),
                    rfc3339(f.sent_at),
                    f.status.clone(),
                ]
            })
            .collect();
        rows.extend(s.ops.iter().map(|(host, op)| {
            let kind = serde_json::to_value(op.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            vec![kind, op.vm.clone(), host.clone(), "-".into(), "sent".into()]
        }));
        table(&mut o, &["JOB", "VM", "OWNER", "SENT", "STATUS"], &rows);
    }
    if !s.failures.is_empty() {
        let _ = writeln!(o, "\nRECENT FAILURES");
        let rows: Vec<Vec<String>> = s
            .failures
            .iter()
            .map(|(owner, f)| {
                vec![
                    rfc3339(f.at),
                    f.job_kind.clone(),
                    f.vm.clone(),
                    f.host.clone(),
                    owner.clone(),
                    f.reason.clone(),
                ]
            })
            .collect();
        table(
            &mut o,
            &["AT", "JOB", "VM", "HOST", "OWNER", "REASON"],
            &rows,
        );
    }
    o
}

/// Counts of managed VMs per host, for progress lines.
pub fn per_host(s: &ClusterStatus) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in s.vms.iter().filter(|v| v.managed) {
        *m.entry(v.host.clone()).or_default() += 1;
    }
    m
}

/// One line of progress towards `commit`: per host whether it has applied it and how
/// many managed VMs it holds, creates in flight, failures.
pub fn progress(st: &ClusterStatus, commit: &str) -> String {
    let per = per_host(st);
    let hosts: Vec<String> = st
        .hosts
        .iter()
        .map(|h| {
            let mark = if h.applied_commit.as_deref() == Some(commit) {
                "✓"
            } else {
                "…"
            };
            format!(
                "{}{} {} VMs",
                h.host,
                mark,
                per.get(&h.host).copied().unwrap_or(0)
            )
        })
        .collect();
    format!(
        "{}; {} creates in flight; {} failures",
        hosts.join(", "),
        st.in_flight.len(),
        st.failures.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::identity::AgentInfo;

    fn inv(host: &str, conflicts: &[(&str, &[&str])]) -> Inventory {
        let json = format!(
            r#"{{"host":"{host}","listed_at":1,"used":{{"memory":"0","storage":"0","vms":0}},
            "reserved":{{"memory":"0","storage":"0","vms":0}},"limits":{{}},"vms":[]}}"#
        );
        let mut inv: Inventory = serde_json::from_str(&json).expect("an inventory");
        inv.agent = Some(AgentInfo {
            identity: format!("id-{host}"),
            pid: 1,
            machine: "m".into(),
            state_dir: "/s".into(),
            started_at: 0,
            lease_job: None,
            conflicts: conflicts
                .iter()
                .map(|(h, ids)| (h.to_string(), ids.iter().map(|i| i.to_string()).collect()))
                .collect(),
        });
        inv
    }

    fn empty_status() -> ClusterStatus {
        ClusterStatus {
            format_version: FORMAT_VERSION,
            cluster: "c".into(),
            desired_commit: None,
            hosts: vec![],
            vms: vec![],
            in_flight: vec![],
            waiting: vec![],
            failures: vec![],
            blocked: vec![],
            ops: vec![],
            invalid_tips: vec![],
            needs_action: vec![],
            identity_conflicts: vec![],
            unverified: None,
            switches: Default::default(),
        }
    }

    fn answering(host: &str) -> HostStatus {
        HostStatus {
            host: host.into(),
            beanstalkd: "127.0.0.1:1".into(),
            reachable: true,
            error: None,
            inventory_age: Some(0),
            listed_at: Some(rfc3339(10)),
            applied_commit: Some("c1".into()),
            used: None,
            reserved: None,
            limits: None,
            overload: None,
            identity: None,
            left_cluster: false,
            clock_skew: None,
            draining: false,
        }
    }

    /// Guards issue 15, truth 1: a host whose last pass sent a drift repair (an op) that
    /// has not ended is not converged, though it applied the commit and listed since.
    #[test]
    fn ops_in_flight_are_not_converged() {
        let mut st = empty_status();
        st.hosts = vec![answering("host1")];
        let mut i = inv("host1", &[]);
        i.applied_commit = Some("c1".into());
        i.listed_at = 10;
        i.reconciled_at = 10;
        assert!(st.converged("c1", 10, std::slice::from_ref(&i)));
        i.ops.push(OpInFlightItem {
            vm: "web1".into(),
            kind: crate::planner::Kind::Start,
        });
        assert!(!st.converged("c1", 10, std::slice::from_ref(&i)));
        // A pass that ended before `since` says nothing of the commit pushed since.
        i.ops.clear();
        i.reconciled_at = 9;
        assert!(!st.converged("c1", 10, &[i]));
    }

    /// Guards issue 15, truth 2: `status` lists what needs action first (a host that does
    /// not answer, an invalid tip, a blocked VM), with column headers and RFC 3339 times,
    /// and its filters keep only the host or VM asked for.
    #[test]
    fn status_lists_what_needs_action_and_filters() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
        let mut st = empty_status();
        let mut down = answering("host2");
        down.reachable = false;
        down.error = Some("no answer within 3s".into());
        st.hosts = vec![answering("host1"), down];
        st.blocked = vec![BlockedItem {
            host: "host1".into(),
            vm: "db".into(),
            reason: "protected".into(),
            detail: "db is protected".into(),
        }];
        note_invalid(
            &mut st.invalid_tips,
            "host1",
            &DesiredError {
                commit: "abcdef0123456789".into(),
                file: "vms/x.yaml".into(),
                line: 3,
                column: 1,
                message: "unknown field".into(),
                errors: 2,
            },
            Some("c1"),
        );
        st.needs_action = needs_action(&st);
        let text = render_text(&st);
        for want in [
            "NEEDS ACTION",
            "host host2 (127.0.0.1:1) does not answer: no answer within 3s",
            "desired commit abcdef0123 does not validate: vms/x.yaml:3:1: unknown field (and 1 more",
            "hosts keep applying c1 (host1)",
            "blocked db on host1 (protected): protected but not desired",
            "HOST  BEANSTALKD",
            "1970-01-01T00:00:10Z",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        assert!(st.unanswered());
        st.filter(&Filter {
            host: Some("host1".into()),
            ..Filter::default()
        });
        assert!(!st.unanswered());
        assert_eq!(st.needs_action.len(), 2, "{:?}", st.needs_action);
        st.filter(&Filter {
            vm: Some("web".into()),
            ..Filter::default()
        });
        assert!(st.needs_action.is_empty(), "{:?}", st.needs_action);
    }

    /// Guards issue 11, hole 3: a host name that some agent saw under two identities is
    /// shown by `status`, merged over the hosts that saw it.
    #[test]
    fn status_shows_a_host_seen_under_two_identities() {
        let invs = vec![
            inv("host1", &[]),
            inv("host2", &[("host1", &["A", "B"])]),
            inv("host3", &[("host1", &["B", "C"])]),
        ];
        let found = identity_conflicts(&invs);
        assert_eq!(
            found,
            vec![IdentityConflict {
                host: "host1".into(),
                identities: vec!["A".into(), "B".into(), "C".into()],
                seen_by: vec!["host2".into(), "host3".into()],
            }]
        );
        let st = ClusterStatus {
            format_version: 1,
            cluster: "c".into(),
            desired_commit: None,
            hosts: vec![],
            vms: vec![],
            in_flight: vec![],
            waiting: vec![],
            failures: vec![],
            blocked: vec![],
            ops: vec![],
            invalid_tips: vec![],
            needs_action: vec![],
            identity_conflicts: found,
            unverified: None,
            switches: Default::default(),
        };
        let text = render_text(&st);
        assert!(text.contains("TWO AGENTS UNDER ONE HOST NAME"), "{text}");
        assert!(
            text.contains("host1      identities A, B, C  (seen by host2, host3)"),
            "{text}"
        );
    }
}
