//! The real-scale benchmark of issue 13: H hosts on this machine (a beanstalkd, a
//! `flotilla agent` and a simulated vm-bhyve each), one commit of 10 VMs per host and
//! one trigger per host, for each H in `BENCH_HOSTS` (default `10,40,100`).
//!
//! Run with `scripts/bench-scale` (release build). Per H it prints:
//! - seconds from the commit until every VM runs (complete, in its host's inventory);
//! - seconds until converged, as `apply --wait` sees it ([`ClusterStatus::converged`]'s
//!   conditions, checked on the inventories read here);
//! - the agents' CPU seconds from the commit to convergence (their own, not their `vm`
//!   children's);
//! - the `peek-ready` commands the agents sent in that time (every beanstalkd's count,
//!   less this benchmark's own reads);
//! - the agents' peeks per minute while idle, over `BENCH_IDLE_SECS` (default 60) after
//!   convergence.
//!
//! The simulator runs fast (no delays, none of vm-bhyve's measured slowness): what is
//! measured is flotilla's own cost of a commit as the cluster grows.
//!
//! [`ClusterStatus::converged`]: flotilla::agent::status::ClusterStatus::converged

use std::time::{Duration, Instant};

use flotilla::actual::RunState;
use flotilla::agent::peers::Peers;
use flotilla::message::{self, tubes, Envelope, Inventory, Message, Trigger};
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const VMS_PER_HOST: usize = 10;

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) the agents used so far.
fn agents_cpu(c: &Cluster, ticks: f64) -> f64 {
    c.hosts
        .iter()
        .filter_map(|h| h.agent.as_ref().map(|a| a.id()))
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / ticks
        })
        .sum()
}

/// `peek-ready` commands every beanstalkd answered so far.
async fn server_peeks(c: &Cluster) -> u64 {
    let mut n = 0;
    for h in &c.hosts {
        if let Ok(mut client) = beanstalk::Client::connect(h.beanstalkd.addr()).await {
            if let Ok(st) = client.stats().await {
                n += st.cmd_peek_ready;
            }
        }
    }
    n
}

async fn trigger(c: &Cluster, peers: &Peers) {
    let keys = c.keys();
    for h in &c.hosts {
        let mut env = Envelope::new(
            &c.options.cluster,
            "bench",
            &h.name,
            Message::Trigger(Trigger {
                reason: "bench".into(),
            }),
        );
        keys.seal(&mut env);
        peers
            .put(
                &h.beanstalkd.addr(),
                tubes::CONTROL,
                &env,
                beanstalk::PutParams::default(),
            )
            .await
            .expect("trigger");
    }
}

/// Every host's inventory, or `None` while one is missing.
async fn inventories(c: &Cluster, peers: &Peers) -> Option<Vec<Inventory>> {
    let mut out = Vec::new();
    for h in &c.hosts {
        match peers.inventory(&h.beanstalkd.addr(), &h.name, None).await {
            Ok((Some(inv), _)) => out.push(inv),
            _ => return None,
        }
    }
    Some(out)
}

fn running(invs: &[Inventory]) -> usize {
    invs.iter()
        .flat_map(|i| &i.vms)
        .filter(|v| v.state == RunState::Running && v.marker.as_ref().is_some_and(|m| m.complete))
        .count()
}

/// What [`flotilla::agent::status::ClusterStatus::converged`] asks of every member
/// host's inventory, for `commit` applied after `since`.
fn converged(invs: &[Inventory], commit: &str, since: u64) -> bool {
    invs.iter().all(|i| {
        i.applied_commit.as_deref() == Some(commit)
            && i.listed_at >= since
            && i.reconciled_at >= since
            && i.ops.is_empty()
            && i.in_flight.iter().all(|f| f.retry_at.is_some())
            && i.waiting.is_empty()
    })
}

struct Row {
    hosts: usize,
    running: f64,
    converged: f64,
    cpu: f64,
    peeks: u64,
    idle_peeks_per_min: f64,
    idle_cpu_per_min: f64,
}

fn run(hosts: usize, idle: Duration, ticks: f64, rt: &tokio::runtime::Runtime) -> Row {
    let names: Vec<String> = (1..=hosts).map(|i| format!("host{i:03}")).collect();
    let specs: Vec<HostSpec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            HostSpec::new(n, names.get(i + 1).map(String::as_str)).limits("1T", "100T", 2000)
        })
        .collect();
    let mut c = Cluster::start(
        &specs,
        Options {
            // Fast, asked for explicitly: no create or start delay, none of vm-bhyve's
            // measured slowness.
            sim_delay_ms: 0,
            sim_realistic: false,
            poll: "60s",
            max_creates: 4,
            ttr: "60s",
            ..Options::default()
        },
    );
    // The trigger is the only news of a commit, as with the post-receive hook.
    for h in &c.hosts {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        std::fs::write(
            &h.config,
            cfg.replace("  branch: main\n", "  branch: main\n  watch: false\n"),
        )
        .unwrap();
    }
    c.start_agents();
    let peers = Peers::new();
    let up = Instant::now();
    while rt.block_on(inventories(&c, &peers)).is_none() {
        assert!(
            up.elapsed() < Duration::from_secs(300),
            "not every agent published in 5 minutes\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the start-up passes settle.
    std::thread::sleep(Duration::from_secs(3));

    let total = hosts * VMS_PER_HOST;
    let files: Vec<(String, String)> = (0..total)
        .map(|i| {
            (
                format!("vms/vm{i:05}.yaml"),
                vm_yaml(&format!("vm{i:05}"), "CS0", ""),
            )
        })
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    let peeks0 = rt.block_on(server_peeks(&c));
    let own0 = peers.peeks();
    let cpu0 = agents_cpu(&c, ticks);
    let since = message::now();
    let commit = c.commit(&refs, "scale");
    let at = Instant::now();
    rt.block_on(trigger(&c, &peers));
    let (mut all_running, mut all_converged) = (None, None);
    while all_converged.is_none() {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            at.elapsed() < Duration::from_secs(900),
            "no convergence in 15 minutes\n{}",
            c.logs()
        );
        let Some(invs) = rt.block_on(inventories(&c, &peers)) else {
            continue;
        };
        if all_running.is_none() && running(&invs) >= total {
            all_running = Some(at.elapsed());
        }
        if all_running.is_some() && converged(&invs, &commit, since) {
            all_converged = Some(at.elapsed());
        }
    }
    let cpu = agents_cpu(&c, ticks) - cpu0;
    let peeks1 = rt.block_on(server_peeks(&c));
    let peeks = (peeks1 - peeks0).saturating_sub(peers.peeks() - own0);

    // Idle: this benchmark reads nothing meanwhile.
    let cpu1 = agents_cpu(&c, ticks);
    std::thread::sleep(idle);
    let idle_peeks = rt.block_on(server_peeks(&c)) - peeks1;
    let idle_cpu = agents_cpu(&c, ticks) - cpu1;
    let minutes = idle.as_secs_f64() / 60.0;
    // Dropping the cluster kills the agents and powers the guests off.
    drop(c);
    Row {
        hosts,
        running: all_running.unwrap_or_default().as_secs_f64(),
        converged: all_converged.unwrap_or_default().as_secs_f64(),
        cpu,
        peeks,
        idle_peeks_per_min: idle_peeks as f64 / minutes,
        idle_cpu_per_min: idle_cpu / minutes,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_HOSTS")
        .unwrap_or_else(|_| "10,40,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let idle = Duration::from_secs(
        std::env::var("BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let ticks = clock_ticks();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "scale-bench: {VMS_PER_HOST} VMs per host in one commit, one trigger per host, fast simulator, 4 builds at once per host; idle {} s",
        idle.as_secs()
    );
    println!(
        "{:>5} {:>6} {:>11} {:>13} {:>13} {:>9} {:>9} {:>16} {:>16}",
        "hosts",
        "VMs",
        "running s",
        "converged s",
        "agent CPU s",
        "peeks",
        "peeks/VM",
        "idle peeks/min",
        "idle CPU s/min"
    );
    for h in sizes {
        let r = run(h, idle, ticks, &rt);
        println!(
            "{:>5} {:>6} {:>11.2} {:>13.2} {:>13.2} {:>9} {:>9.1} {:>16.0} {:>16.2}",
            r.hosts,
            r.hosts * VMS_PER_HOST,
            r.running,
            r.converged,
            r.cpu,
            r.peeks,
            r.peeks as f64 / (r.hosts * VMS_PER_HOST) as f64,
            r.idle_peeks_per_min,
            r.idle_cpu_per_min,
        );
    }
}
