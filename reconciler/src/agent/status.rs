//! The cluster as the hosts' published inventories show it: `flotilla status` and
//! `flotilla apply --wait` read it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::actual::RunState;
use crate::capacity::{Limits, Usage};
use crate::message::{self, InFlightCreate, Inventory, RecentFailure};

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
    /// `since`, and no create is under way (failed ones waiting to retry are reported by
    /// [`ClusterStatus::retrying`], not waited for).
    pub fn converged(&self, commit: &str, since: u64, inventories: &[Inventory]) -> bool {
        self.hosts
            .iter()
            .filter(|h| !h.left_cluster)
            .all(|h| h.reachable)
            && inventories.len() == self.hosts.len()
            && inventories
                .iter()
                .all(|i| i.applied_commit.as_deref() == Some(commit) && i.listed_at >= since)
            && self.in_flight.iter().all(|(_, f)| f.retry_at.is_some())
            && self.waiting.is_empty()
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
        format_version: 1,
        cluster: hosts.cluster.clone(),
        desired_commit: hosts.commit.clone(),
        hosts: Vec::new(),
        vms: Vec::new(),
        in_flight: Vec::new(),
        waiting: Vec::new(),
        failures: Vec::new(),
        identity_conflicts: Vec::new(),
        unverified,
        switches: Default::default(),
    };
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
    (out, invs)
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

/// `status` for people.
pub fn render_text(s: &ClusterStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  desired commit {}",
        s.cluster,
        short(s.desired_commit.as_deref())
    );
    if let Some(why) = &s.unverified {
        let _ = writeln!(o, "inventories NOT verified: {why}");
    }
    let _ = writeln!(o, "\nHOSTS");
    for h in &s.hosts {
        let state = match (&h.error, h.inventory_age) {
            (Some(e), _) => format!("UNREACHABLE: {e}"),
            (None, Some(age)) => format!("inventory {age}s old"),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "  {:<10} {:<21} applied {:<10}  {}  {}{}{}{}{}",
            h.host,
            h.beanstalkd,
            short(h.applied_commit.as_deref()),
            usage(h.used, h.limits),
            state,
            h.overload
                .as_ref()
                .map(|x| format!("  OVERLOADED: {x}"))
                .unwrap_or_default(),
            h.clock_skew
                .as_ref()
                .map(|x| format!("  CLOCK SKEW, no creates: {x}"))
                .unwrap_or_default(),
            if h.left_cluster {
                "  LEFT cluster.yaml: its VMs are held there until it shows them gone or `flotilla host forget`"
            } else {
                ""
            },
            if h.draining {
                "  DRAINING: no new creates (`flotilla host undrain`)"
            } else {
                ""
            }
        );
    }
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
    for v in &managed {
        let _ = writeln!(
            o,
            "  {:<24} {:<10} {:<10}{}{}",
            v.vm,
            v.host,
            format!("{:?}", v.state).to_lowercase(),
            match (v.complete, v.held_by_removed_host) {
                (_, true) => "  held by a host that left cluster.yaml",
                (false, false) => "  half-made",
                (true, false) => "",
            },
            if s.switches.suspends(&v.vm) {
                "  suspended"
            } else {
                ""
            }
        );
    }
    if !s.waiting.is_empty() {
        let _ = writeln!(o, "\nCREATES WAITING FOR OTHER HOSTS");
        for (owner, w) in &s.waiting {
            let _ = writeln!(
                o,
                "  create {:<24} owner {:<10} waits for {} (on another commit under which it owns the VM, or silent; `flotilla host forget` if gone for good)",
                w.vm,
                owner,
                w.for_hosts.join(", ")
            );
        }
    }
    if !s.in_flight.is_empty() {
        let _ = writeln!(o, "\nIN FLIGHT");
        for (owner, f) in &s.in_flight {
            let _ = writeln!(o, "  create {:<24} owner {:<10} {}", f.vm, owner, f.status);
        }
    }
    if !s.failures.is_empty() {
        let _ = writeln!(o, "\nRECENT FAILURES");
        for (owner, f) in &s.failures {
            let _ = writeln!(
                o,
                "  {} {} on {} (owner {owner}): {}",
                f.job_kind, f.vm, f.host, f.reason
            );
        }
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
