//! Benchmark of a whole cluster: three simulated hosts, real beanstalkd servers, real
//! `flotilla agent` processes, a real git repo.
//!
//! Run with `cargo run --release -p flotilla-e2e --example cluster-bench` (or
//! `scripts/bench-cluster`). It commits 300 VMs at once and measures:
//! - commit → first job: the agents' file-system watch is off and their poll interval
//!   is a minute, so the only way to learn of the commit is a `trigger` message, sent
//!   right after the commit as the post-receive hook would;
//! - commit → convergence (every VM built, running and in an inventory), and from it
//!   flotilla's own overhead per VM: convergence time minus the simulator's configured
//!   delays on the busiest host's build slots, divided by the VMs;
//! - each agent's resident memory after a second commit brings the cluster to 1,000 VMs.

use std::time::{Duration, Instant};

use flotilla::message::{tubes, Envelope, Message, Trigger};
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn trigger(c: &Cluster) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let peers = flotilla::agent::peers::Peers::new();
        let keys = c.keys();
        for h in &c.hosts {
            let mut env = Envelope::new(
                "e2e",
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
    });
}

/// Managed, complete, running VMs in the hosts' published inventories (read with a
/// beanstalkd peek, so that watching costs the hosts next to nothing).
fn total_running(c: &Cluster) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let peers = flotilla::agent::peers::Peers::new();
    rt.block_on(async {
        let mut n = 0;
        for h in &c.hosts {
            if let Ok((Some(inv), _)) = peers.inventory(&h.beanstalkd.addr(), &h.name, None).await {
                n += inv
                    .vms
                    .iter()
                    .filter(|v| {
                        v.state == flotilla::actual::RunState::Running
                            && v.marker.as_ref().is_some_and(|m| m.complete)
                    })
                    .count();
            }
        }
        n
    })
}

fn add_vms(c: &Cluster, from: usize, to: usize) -> (String, Instant) {
    let files: Vec<(String, String)> = (from..to)
        .map(|i| {
            (
                format!("vms/vm{i:04}.yaml"),
                vm_yaml(&format!("vm{i:04}"), "CS0", ""),
            )
        })
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    let commit = c.commit(&refs, &format!("vm{from}..vm{to}"));
    let at = Instant::now();
    trigger(c);
    (commit, at)
}

fn main() {
    let delay_ms: u64 = std::env::var("BENCH_SIM_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let max_creates = 4;
    let specs = vec![
        HostSpec::new("host1", Some("host2")).limits("1T", "100T", 2000),
        HostSpec::new("host2", Some("host3")).limits("1T", "100T", 2000),
        HostSpec::new("host3", None).limits("1T", "100T", 2000),
    ];
    let mut c = Cluster::start(
        &specs,
        Options {
            sim_delay_ms: delay_ms,
            // The costs of vm-bhyve's calls are what a benchmark is for.
            sim_realistic: true,
            poll: "60s",
            max_creates,
            extra_config: String::new(),
            policies: String::new(),
            ttr: "60s",
            cluster: "e2e".into(),
            isolate: None,
            ..Options::default()
        },
    );
    // The trigger is the only news of a commit.
    for h in &c.hosts {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        std::fs::write(
            &h.config,
            cfg.replace("  branch: main\n", "  branch: main\n  watch: false\n"),
        )
        .unwrap();
    }
    c.start_agents();
    std::thread::sleep(Duration::from_secs(2));

    let wall = Instant::now();
    let commit_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (_, at) = add_vms(&c, 0, 300);
    while total_running(&c) < 300 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            at.elapsed() < Duration::from_secs(600),
            "no convergence in 10 minutes\n{}",
            c.logs()
        );
    }
    let converge = at.elapsed();
    let first_emit = (0..3)
        .filter_map(|i| {
            c.events(i)
                .into_iter()
                .filter(|e| e.kind == "emit")
                .map(|e| e.at_ms)
                .min()
        })
        .min()
        .unwrap_or(0);
    let per_host: Vec<usize> = (0..3).map(|i| c.vms(i).len()).collect();
    let busiest = *per_host.iter().max().unwrap() as u64;
    // The simulator sleeps create_delay + start_delay per VM; a host builds
    // `max_creates` at once.
    let sim = Duration::from_millis(busiest.div_ceil(max_creates as u64) * 2 * delay_ms);
    let overhead = converge.saturating_sub(sim);
    println!("cluster-bench: 3 hosts, 300 VMs in one commit, simulator delay {delay_ms} ms create + {delay_ms} ms start, {max_creates} builds at once per host");
    println!("  VMs per host:                         {per_host:?}");
    println!(
        "  commit -> first job (trigger):        {} ms",
        first_emit.saturating_sub(commit_ms)
    );
    println!(
        "  commit -> converged:                  {:.2} s",
        converge.as_secs_f64()
    );
    println!(
        "  simulator delays on the busiest host: {:.2} s",
        sim.as_secs_f64()
    );
    println!(
        "  flotilla overhead per VM:             {:.2} ms",
        overhead.as_secs_f64() * 1000.0 / 300.0
    );

    // Errors and retries cost time too: say how many there were, and the first few.
    let errors: Vec<String> = (0..3)
        .flat_map(|i| c.events(i))
        .filter(|e| e.kind == "error")
        .map(|e| format!("{}: {}", e.host, e.message))
        .collect();
    println!("  errors during the run:                {}", errors.len());
    for e in errors.iter().take(5) {
        println!("    {e}");
    }
    if std::env::var_os("BENCH_TIMELINE").is_some() {
        for i in 0..3 {
            let ev = c.events(i);
            let t0 = commit_ms;
            let pick = |kind: &str, text: &str| -> Vec<u64> {
                ev.iter()
                    .filter(|e| e.kind == kind && e.message.contains(text))
                    .map(|e| e.at_ms.saturating_sub(t0))
                    .collect()
            };
            let emits = pick("emit", "");
            let building = pick("job", "building");
            let built = pick("job", "built");
            let results = pick("result", "");
            println!(
                "  host{}: emits {}..{} ms, building {}..{} ms, built {}..{} ms, results {}..{}",
                i + 1,
                emits.first().unwrap_or(&0),
                emits.last().unwrap_or(&0),
                building.first().unwrap_or(&0),
                building.last().unwrap_or(&0),
                built.first().unwrap_or(&0),
                built.last().unwrap_or(&0),
                results.first().unwrap_or(&0),
                results.last().unwrap_or(&0),
            );
            let mut durs: Vec<u64> = Vec::new();
            for e in ev
                .iter()
                .filter(|e| e.kind == "job" && e.message.contains("building"))
            {
                if let Some(b) = ev
                    .iter()
                    .find(|x| x.kind == "job" && x.message.starts_with("built") && x.vm == e.vm)
                {
                    durs.push(b.at_ms - e.at_ms);
                }
            }
            durs.sort();
            if !durs.is_empty() {
                println!(
                    "    build ms: median {} p90 {} max {}",
                    durs[durs.len() / 2],
                    durs[durs.len() * 9 / 10],
                    durs[durs.len() - 1]
                );
            }
        }
        for h in &c.hosts {
            let pid = h.agent.as_ref().map(|a| a.id()).unwrap_or(0);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            println!(
                "    {} cpu: self {} ticks, children {} ticks",
                h.name,
                t(11) + t(12),
                t(13) + t(14)
            );
        }
        if std::env::var_os("BENCH_ONLY_300").is_some() {
            return;
        }
    }
    let (_, at) = add_vms(&c, 300, 1000);
    while total_running(&c) < 1000 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            at.elapsed() < Duration::from_secs(900),
            "no convergence at 1000 VMs\n{}",
            c.logs()
        );
    }
    println!(
        "  commit 700 more -> converged:         {:.2} s",
        at.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    for h in &c.hosts {
        let pid = h.agent.as_ref().map(|a| a.id()).unwrap_or(0);
        println!(
            "  agent {} resident memory, 1000 VMs in the cluster: {:.1} MiB",
            h.name,
            rss_kib(pid) as f64 / 1024.0
        );
    }
    println!("  total wall time: {:.1} s", wall.elapsed().as_secs_f64());
    for i in 0..c.hosts.len() {
        c.stop_agent(i);
    }
}
