//! `cluster.yaml`: the cluster id, its hosts and their hop chain, its policies.

use std::collections::{BTreeMap, BTreeSet};

use super::super::diag::Diagnostic;
use super::super::locate;
use super::super::rules;
use super::super::schema::RawCluster;
use super::super::spec::{Cluster, Host, HostLimits, Policies};
use super::join;

pub(crate) fn cluster(
    path: &str,
    src: &str,
    raw: RawCluster,
    diags: &mut Vec<Diagnostic>,
) -> Cluster {
    if !rules::is_host_name(&raw.cluster) {
        diags.push(Diagnostic::new(
            path,
            locate::value_pos(src, &["cluster"]),
            format!("invalid cluster id `{}`", raw.cluster),
            rules::HOST_NAME_HINT,
        ));
    }
    if raw.hosts.0.is_empty() {
        diags.push(Diagnostic::new(
            path,
            locate::key_pos(src, &["hosts"]),
            "no hosts",
            "name at least one host under `hosts:`",
        ));
    }
    let names: BTreeSet<&str> = raw.hosts.0.iter().map(|(n, _)| n.as_str()).collect();
    let mut hosts = BTreeMap::new();
    for (name, h) in &raw.hosts.0 {
        if !rules::is_host_name(name) {
            diags.push(Diagnostic::new(
                path,
                locate::key_pos(src, &["hosts", name]),
                format!("invalid host name `{name}`"),
                rules::HOST_NAME_HINT,
            ));
        }
        if !rules::is_address(&h.beanstalkd) {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["hosts", name, "beanstalkd"]),
                format!("`{}` is not a beanstalkd address", h.beanstalkd),
                "write host:port, e.g. 10.0.0.1:11300",
            ));
        }
        if let Some(next) = &h.next {
            if next == name {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["hosts", name, "next"]),
                    format!("host `{name}` names itself as next"),
                    "name another host, or null to end the hop chain here",
                ));
            } else if !names.contains(next.as_str()) {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["hosts", name, "next"]),
                    format!("hop chain: unknown host `{next}`"),
                    format!(
                        "next must be one of the hosts ({}) or null",
                        join(names.iter())
                    ),
                ));
            }
        }
        hosts.insert(
            name.clone(),
            Host {
                name: name.clone(),
                beanstalkd: h.beanstalkd.clone(),
                next: h.next.clone(),
                limits: HostLimits {
                    memory: h.limits.memory,
                    storage: h.limits.storage,
                    vms: h.limits.vms,
                },
            },
        );
    }

    let mut policies = Policies::default();
    let p = &raw.policies;
    if let Some(share) = p.prune_guard {
        if share.is_finite() && (0.0..=1.0).contains(&share) {
            policies.prune_guard = share;
        } else {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["policies", "prune_guard"]),
                format!("prune_guard {share} is not a share"),
                "write a number from 0 (destroy nothing without override) to 1 (no guard), e.g. 0.5",
            ));
        }
    }
    if let Some(hops) = p.hop_limit {
        if hops <= 64 {
            policies.hop_limit = hops;
        } else {
            diags.push(Diagnostic::new(
                path,
                locate::value_pos(src, &["policies", "hop_limit"]),
                format!("hop_limit {hops} is more than 64"),
                "a create needs at most as many hops as there are hosts",
            ));
        }
    }
    for (key, value, slot) in [
        (
            "reconcile_interval",
            p.reconcile_interval,
            &mut policies.reconcile_interval,
        ),
        ("ttr", p.ttr, &mut policies.ttr),
    ] {
        if let Some(v) = value {
            if v.0.as_secs() == 0 {
                diags.push(Diagnostic::new(
                    path,
                    locate::value_pos(src, &["policies", key]),
                    format!("{key} must be at least one second"),
                    "write a duration such as 30s, 5m or 1h",
                ));
            } else {
                *slot = v.0;
            }
        }
    }

    Cluster {
        id: raw.cluster,
        hosts,
        policies,
    }
}
