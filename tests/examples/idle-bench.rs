//! What vm-bhyve calls cost, per host (issue 12, "Measure"): `vm`/`sysrc` invocations per
//! create, per update and per idle hour, and the agent's CPU seconds per idle hour.
//!
//! Run with `cargo run -p flotilla-e2e --example idle-bench` (or `scripts/bench-idle`).
//! Three simulated hosts with vm-sim's realistic timings, each agent watching the local
//! desired repo (the default) and polling every 60 s. Calls are counted by vm-sim
//! itself (`VM_SIM_CALL_LOG`): every `vm` and `sysrc` the agent runs, nothing of its own.
//! The idle figures are measured over `BENCH_IDLE_SECS` (default 300) and scaled to an
//! hour; "per create" and "per update" count from when every agent has listed its host
//! once (its start). CPU time is the agent's own (utime + stime in `/proc/<pid>/stat`)
//! plus that of the commands it waited for (cutime + cstime).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla::actual::RunState;
use flotilla::size::Size;
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

/// VMs per host.
const PER_HOST: usize = 4;

/// (own, children) CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Linux's USER_HZ: 100 on every architecture flotilla's lab runs on.
    let hz = 100.0;
    // Fields after the command: state is 0, utime 11, stime 12, cutime 13, cstime 14.
    ((t(11) + t(12)) as f64 / hz, (t(13) + t(14)) as f64 / hz)
}

fn pid(c: &Cluster, i: usize) -> u32 {
    c.hosts[i].agent.as_ref().map(|a| a.id()).unwrap_or(0)
}

/// Calls so far per host, by command (`vm list`, `vm start`, `sysrc`, ...).
fn calls(c: &Cluster) -> Vec<BTreeMap<String, usize>> {
    (0..c.hosts.len())
        .map(|i| {
            let mut m = BTreeMap::new();
            for l in c.calls(i) {
                let mut w = l.split_whitespace();
                let key = match (w.next(), w.next()) {
                    (Some("vm"), Some(sub)) => format!("vm {sub}"),
                    (Some(p), _) => p.to_string(),
                    _ => continue,
                };
                *m.entry(key).or_default() += 1;
            }
            m
        })
        .collect()
}

fn diff(
    after: &BTreeMap<String, usize>,
    before: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn total(m: &BTreeMap<String, usize>) -> usize {
    m.values().sum()
}

/// Every VM of `names` is running, complete, on some host, with `memory` if given.
fn converged(c: &Cluster, names: &[String], memory: Option<Size>) -> bool {
    let all: Vec<_> = (0..c.hosts.len()).flat_map(|i| c.vms(i)).collect();
    names.iter().all(|n| {
        all.iter().any(|v| {
            &v.name == n
                && v.state == RunState::Running
                && v.marker.as_ref().is_some_and(|m| m.complete)
                && memory.is_none_or(|m| v.memory == m)
        })
    })
}

fn main() {
    let idle_secs: u64 = std::env::var("BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let specs = vec![
        HostSpec::new("host1", Some("host2")),
        HostSpec::new("host2", Some("host3")),
        HostSpec::new("host3", None),
    ];
    let mut c = Cluster::start(
        &specs,
        Options {
            sim_realistic: true,
            poll: "60s",
            ..Options::default()
        },
    );
    // vm-bhyve's default look at a starting guest (every 500 ms), not the lab's fast one.
    for h in &c.hosts {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        std::fs::write(
            &h.config,
            cfg.replace("  poll_interval: 20ms\n", "  poll_interval: 500ms\n"),
        )
        .unwrap();
    }
    c.start_agents();
    let n = PER_HOST * c.hosts.len();
    let names: Vec<String> = (0..n).map(|i| format!("vm{i:02}")).collect();
    let limit = Duration::from_secs(300);

    // Creates. Each agent is up once it has listed its (empty) host: that first
    // listing is the agent's start, not a create's.
    let at = Instant::now();
    while calls(&c).iter().any(|m| !m.contains_key("vm list")) {
        assert!(at.elapsed() < limit, "agents not up\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = calls(&c);
    let files: Vec<(String, String)> = names
        .iter()
        .map(|v| (format!("vms/{v}.yaml"), vm_yaml(v, "CS0", "")))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    c.commit(&refs, "creates");
    let at = Instant::now();
    while !converged(&c, &names, None) {
        assert!(at.elapsed() < limit, "no convergence\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The passes that close the creates' intents come within a second or two.
    std::thread::sleep(Duration::from_secs(3));
    let created = calls(&c);
    let per_host: Vec<usize> = (0..c.hosts.len()).map(|i| c.vms(i).len()).collect();

    // Updates: more memory, which takes a restart.
    let files: Vec<(String, String)> = names
        .iter()
        .map(|v| (format!("vms/{v}.yaml"), vm_yaml(v, "CS0", "memory: 512M\n")))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    c.commit(&refs, "updates");
    let at = Instant::now();
    let mem: Size = "512M".parse().unwrap();
    while !converged(&c, &names, Some(mem)) {
        assert!(
            at.elapsed() < limit,
            "no convergence of the updates\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let updated = calls(&c);

    // Idle.
    let cpu0: Vec<(f64, f64)> = (0..c.hosts.len())
        .map(|i| cpu_seconds(pid(&c, i)))
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let window = t0.elapsed().as_secs_f64();
    let idle = calls(&c);
    let cpu1: Vec<(f64, f64)> = (0..c.hosts.len())
        .map(|i| cpu_seconds(pid(&c, i)))
        .collect();
    let hour = 3600.0 / window;

    println!(
        "idle-bench: 3 hosts, {n} VMs created then updated (memory, with a restart), idle {window:.0} s scaled to an hour; poll interval 60 s, desired.watch on, vm-sim realistic, backend.poll_interval 500 ms"
    );
    for (i, h) in c.hosts.iter().enumerate() {
        let cr = diff(&created[i], &before[i]);
        let up = diff(&updated[i], &created[i]);
        let id = diff(&idle[i], &updated[i]);
        let vms = per_host[i].max(1) as f64;
        let own = cpu1[i].0 - cpu0[i].0;
        let children = cpu1[i].1 - cpu0[i].1;
        println!("  {} ({} VMs):", h.name, per_host[i]);
        println!(
            "    per create: {:.1} calls  {:?}",
            total(&cr) as f64 / vms,
            cr
        );
        println!(
            "    per update: {:.1} calls  {:?}",
            total(&up) as f64 / vms,
            up
        );
        println!(
            "    per idle hour: {:.0} calls ({:.0} vm list)  {:?}",
            total(&id) as f64 * hour,
            id.get("vm list").copied().unwrap_or(0) as f64 * hour,
            id
        );
        println!(
            "    agent CPU per idle hour: {:.2} s own + {:.2} s in vm/sysrc ({:.4} % of a core)",
            own * hour,
            children * hour,
            (own + children) * 100.0 / window
        );
    }
    for i in 0..c.hosts.len() {
        c.stop_agent(i);
    }
    // `BENCH_LOGS=1`: each agent's whole log (debug), to see why it listed.
    if std::env::var_os("BENCH_LOGS").is_some() {
        for h in &c.hosts {
            let log = std::fs::read_to_string(&h.log).unwrap_or_default();
            println!("=== {}\n{log}", h.name);
        }
    }
}
