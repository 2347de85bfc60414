//! End-to-end benchmark of `flotilla plan`.
//!
//! ```text
//! cargo run --release -p flotilla --example plan-bench [-- 1000 10000 100000]
//! ```
//!
//! For each size it writes a desired repo of that many VMs over 10 hosts, commits it to
//! a real git repo, saves the matching actual state, and times the release `flotilla
//! plan --repo file://… --inventory …` binary: once with an empty clone cache (fetch
//! of every object), then three times with the clone in place (the steady state of a
//! host that re-plans on a timer or a push), reporting the median. Every run must exit
//! 0: the actual state matches, so the whole desired state is parsed, validated and
//! compared and nothing is planned.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla::actual::{ActualVm, Disk, HostActual, Marker, RunState};
use flotilla::desired::DesiredState;
use flotilla::planner::StateFile;

const HOSTS: usize = 10;

fn flotilla_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "flotilla",
            "--bin",
            "flotilla",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building flotilla failed");
    let exe = std::env::current_exe().expect("current exe");
    // target/release/examples/plan-bench -> target/release/flotilla
    exe.parent()
        .and_then(Path::parent)
        .map(|p| p.join("flotilla"))
        .expect("target dir")
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the desired repo: varied profiles, overrides, pins, tags and config keys, in
/// directories of 1,000 files.
fn write_repo(dir: &Path, n: usize) {
    let mut cluster = String::from("cluster: bench\nhosts:\n");
    for h in 0..HOSTS {
        let next = if h + 1 < HOSTS {
            format!("host{:02}", h + 1)
        } else {
            "null".into()
        };
        cluster.push_str(&format!(
            "  host{h:02}:\n    beanstalkd: 10.0.0.{}:11300\n    next: {next}\n    limits:\n      memory: 4T\n      storage: 400T\n      vms: 20000\n",
            h + 1
        ));
    }
    cluster.push_str("policies:\n  prune_guard: 0.5\n  hop_limit: 9\n");
    std::fs::write(dir.join("cluster.yaml"), cluster).unwrap();
    for i in 0..n {
        let sub = dir.join(format!("vms/{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        let mut y = format!(
            "# generated VM {i}\nname: vm{i:06}\nprofile: CS{}\ntags: [team{}, env{}]\n",
            i % 6,
            i % 17,
            i % 3
        );
        if i % 5 == 0 {
            y.push_str(&format!(
                "cpu: {}\nmemory: {}M\n",
                1 + i % 4,
                512 * (1 + i % 4)
            ));
        }
        if i % 7 == 0 {
            y.push_str(&format!("host: host{:02}\n", i % HOSTS));
        }
        if i % 11 == 0 {
            y.push_str("state: stopped\n");
        }
        if i % 13 == 0 {
            y.push_str("config:\n  network0_switch: lan\n  utctime: \"no\"\n");
        }
        if i % 19 == 0 {
            y.push_str("hooks:\n  timezone: Europe/Berlin\nsecrets: [tailscale-authkey]\n");
        }
        std::fs::write(sub.join(format!("vm{i:06}.yaml")), y).unwrap();
    }
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "bench"]);
}

/// The actual state that matches the repo: every VM built on its owner.
fn write_state(repo: &Path, path: &Path) -> usize {
    let files = flotilla::source::read_dir(repo).unwrap();
    let snap = flotilla::desired::load(&files, None).unwrap_or_else(|e| panic!("{}", e.render()));
    let names: Vec<&str> = snap.cluster.hosts.keys().map(String::as_str).collect();
    let mut hosts: Vec<HostActual> = names
        .iter()
        .map(|h| HostActual {
            host: h.to_string(),
            vms: vec![],
        })
        .collect();
    for spec in snap.vms.values() {
        let owner = flotilla::owner::owner(&spec.name, spec.host.as_deref(), names.iter().copied())
            .unwrap();
        let mut config = spec.config.clone();
        config.insert("uuid".into(), "6f1c5e0a-0000-4000-8000-000000000000".into());
        config.insert("network0_mac".into(), "58:9c:fc:01:02:03".into());
        let vm = ActualVm {
            name: spec.name.clone(),
            datastore: "default".into(),
            config,
            cpu: spec.cpu,
            memory: spec.memory,
            disks: vec![Disk {
                name: "disk0.img".into(),
                dev: "file".into(),
                size: spec.disk,
            }],
            state: if spec.state == DesiredState::Running {
                RunState::Running
            } else {
                RunState::Stopped
            },
            autostart: None,
            marker: Some(Marker {
                format_version: Marker::FORMAT_VERSION,
                cluster: snap.cluster.id.clone(),
                job_id: "bench".into(),
                spec_hash: spec.spec_hash.clone(),
                commit: "0".repeat(40),
                owner: owner.to_string(),
                protect: spec.protect,
                complete: true,
                placed_from: None,
            }),
        };
        hosts
            .iter_mut()
            .find(|h| h.host == owner)
            .unwrap()
            .vms
            .push(vm);
    }
    let file = StateFile {
        format_version: StateFile::FORMAT_VERSION,
        hosts,
        in_flight: vec![],
    };
    std::fs::write(path, serde_json::to_vec(&file).unwrap()).unwrap();
    snap.vms.len()
}

fn time_plan(bin: &Path, url: &str, cache: &Path, state: &Path) -> Duration {
    let start = Instant::now();
    let out = Command::new(bin)
        .args(["plan", "--repo", url, "--ref", "main", "--cache-dir"])
        .arg(cache)
        .arg("--inventory")
        .arg(state)
        .env("NO_COLOR", "1")
        .output()
        .expect("run flotilla");
    let took = start.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "plan did not come out empty:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn main() {
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() {
            vec![1_000, 10_000, 100_000]
        } else {
            args
        }
    };
    let bin = flotilla_binary();
    println!("flotilla plan, end to end (fetch, parse, validate, plan, render); {HOSTS} hosts; matching actual state");
    println!("binary: {}", bin.display());
    println!();
    println!(
        "{:>8}  {:>10}  {:>10}  {:>12}  {:>12}",
        "VMs", "cold (s)", "warm (s)", "warm µs/VM", "state (MiB)"
    );
    let mut warm_times = Vec::new();
    for &n in &sizes {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("desired");
        std::fs::create_dir(&repo).unwrap();
        write_repo(&repo, n);
        let state = tmp.path().join("state.json");
        let count = write_state(&repo, &state);
        assert_eq!(count, n);
        let url = format!("file://{}", repo.display());
        let cache = tmp.path().join("cache");
        let cold = time_plan(&bin, &url, &cache, &state);
        let mut warm: Vec<Duration> = (0..3)
            .map(|_| time_plan(&bin, &url, &cache, &state))
            .collect();
        warm.sort();
        let median = warm[1];
        let mib = std::fs::metadata(&state)
            .map(|m| m.len() as f64 / (1024.0 * 1024.0))
            .unwrap_or(0.0);
        println!(
            "{n:>8}  {:>10.3}  {:>10.3}  {:>12.1}  {mib:>12.1}",
            cold.as_secs_f64(),
            median.as_secs_f64(),
            median.as_secs_f64() * 1e6 / n as f64
        );
        warm_times.push((n, median, cold));
    }
    println!();
    if let Some((_, t, _)) = warm_times.iter().find(|(n, _, _)| *n == 10_000) {
        let ok = t.as_secs_f64() < 1.0;
        println!(
            "target 10,000 VMs under 1 s (warm): {:.3} s: {}",
            t.as_secs_f64(),
            if ok { "met" } else { "MISSED" }
        );
    }
    if let (Some(first), Some(last)) = (warm_times.first(), warm_times.last()) {
        if last.0 > first.0 {
            let size_ratio = last.0 as f64 / first.0 as f64;
            let warm_ratio = last.1.as_secs_f64() / first.1.as_secs_f64();
            let cold_ratio = last.2.as_secs_f64() / first.2.as_secs_f64();
            println!(
                "growth {}→{} VMs (×{size_ratio:.0}): warm time ×{warm_ratio:.1}, cold time ×{cold_ratio:.1} ({})",
                first.0,
                last.0,
                if warm_ratio <= size_ratio && cold_ratio <= size_ratio { "no faster than linear" } else { "FASTER THAN LINEAR" }
            );
        }
    }
}
