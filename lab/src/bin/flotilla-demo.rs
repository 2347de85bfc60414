//! `flotilla-demo` (run by `scripts/demo`): a whole cluster on this machine, from the
//! example desired repo. A development binary of the lab crate, so the shipped `flotilla`
//! links neither the lab nor the simulator; it expects `flotilla` and `vm-sim` beside it.
//!
//! Three hosts (a beanstalkd each on a free loopback port, a simulated vm-bhyve each,
//! an agent each), the example `desired/` turned into a git repo, the plan shown, the
//! first commit converged with a live progress line, then a second commit (one VM
//! removed, one resized, two big VMs starting at one host so that one is forwarded along
//! the chain) converged too, and `status` at the end. Everything it started is stopped
//! and removed at the end, on an error, and on Ctrl-C.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use flotilla::actual::HostActual;
use flotilla::agent::{status, HostsFile};
use flotilla::desired::{self, Snapshot};
use flotilla::planner::{self, PlanOptions};
use flotilla::render::Style;
use flotilla::{render, source};
use flotilla_lab::lab::{Cluster, HostSpec, Options};

/// A whole cluster on this machine: three hosts with beanstalkd, simulated vm-bhyve and
/// agents, the example desired repo committed and changed. Needs beanstalkd and git
/// (scripts/install-deps).
#[derive(Debug, clap::Parser)]
#[command(name = "flotilla-demo", version, max_term_width = 100)]
struct Args {
    /// The desired repo to start from (its cluster.yaml gives the hosts, the chain and
    /// the limits; the beanstalkd addresses are replaced by free local ports).
    #[arg(long, value_name = "DIR", default_value = "desired")]
    desired: PathBuf,
    /// Simulated time vm-bhyve takes to create and to boot a guest, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 400)]
    sim_delay_ms: u64,
    /// How long to wait for each convergence.
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    timeout: u64,
}

/// Runs the demo: exit 0 when both commits converged, 1 on an error, 64 on bad usage
/// (the exit codes of `flotilla`).
fn main() -> ExitCode {
    let args = match <Args as clap::Parser>::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set (as `flotilla plan`).
fn style() -> Style {
    let disabled = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    Style {
        color: !disabled && std::io::stdout().is_terminal(),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn load(dir: &Path) -> anyhow::Result<Snapshot> {
    let files = source::read_dir(dir)?;
    match desired::load(&files, None) {
        Ok(s) => Ok(s),
        Err(invalid) => {
            let text: Vec<String> = invalid.0.iter().map(|d| d.to_string()).collect();
            bail!("{} is not valid:\n{}", dir.display(), text.join("\n"))
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for sub in ["vms", "profiles", "templates"] {
        let src = from.join(sub);
        let Ok(entries) = std::fs::read_dir(&src) else {
            continue;
        };
        std::fs::create_dir_all(to.join(sub))?;
        for e in entries {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name()))?;
            }
        }
    }
    Ok(())
}

/// Every host's actual state, listed from the simulated hosts.
fn actual(lab: &Cluster) -> Vec<HostActual> {
    (0..lab.hosts.len())
        .map(|i| HostActual {
            host: lab.hosts[i].name.clone(),
            vms: lab.vms(i),
        })
        .collect()
}

fn show_plan(lab: &Cluster) -> anyhow::Result<()> {
    let snap = load(&lab.repo)?;
    let plan = planner::plan(&snap, &actual(lab), &[], &PlanOptions::default());
    println!("\n$ flotilla plan   (what the commit will do)");
    print!("{}", render::plan_text(&plan, style()));
    Ok(())
}

fn hosts_file(lab: &Cluster) -> anyhow::Result<HostsFile> {
    let path = lab.hosts[0].state_dir.join(HostsFile::NAME);
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

/// Waits until every host has applied `commit`, printing progress lines.
fn converge(
    lab: &Cluster,
    commit: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let since = flotilla::message::now();
    let mut last = String::new();
    let keys = lab.keys();
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if let Ok(hosts) = hosts_file(lab) {
            if hosts.commit.as_deref() == Some(commit) {
                let (st, invs) = rt.block_on(status::gather(
                    &hosts,
                    status::Verify::With(
                        &keys,
                        flotilla::agent::config::default_window().0.as_secs(),
                    ),
                ));
                let line = status::progress(&st, commit);
                if line != last {
                    println!("  [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
                    last = line;
                }
                if st.converged(commit, since, &invs) {
                    println!("  converged in {:.1}s", started.elapsed().as_secs_f64());
                    return Ok(());
                }
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "the cluster did not converge within {timeout:?}\n{}",
                lab.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn print_status(lab: &Cluster) -> anyhow::Result<()> {
    let (code, out, err) = lab.flotilla(&[
        "status",
        "--config",
        &lab.hosts[0].config.display().to_string(),
    ]);
    println!("\n$ flotilla status");
    print!("{out}");
    if code != 0 {
        bail!("flotilla status failed: {err}");
    }
    Ok(())
}

fn edit(lab: &Cluster, file: &str, f: impl FnOnce(&str) -> String) -> anyhow::Result<()> {
    let path = lab.repo.join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    std::fs::write(&path, f(&text))?;
    Ok(())
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    for program in ["beanstalkd", "git"] {
        if !on_path(program) {
            bail!("`{program}` is not installed; run scripts/install-deps first");
        }
    }
    let example = load(&args.desired).with_context(|| {
        format!(
            "reading the example desired repo {}",
            args.desired.display()
        )
    })?;
    let specs: Vec<HostSpec> = example
        .cluster
        .hosts
        .values()
        .map(|h| {
            HostSpec::new(&h.name, h.next.as_deref()).limits(
                &h.limits.memory.to_string(),
                &h.limits.storage.to_string(),
                h.limits.vms,
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    {
        // Ctrl-C: stop waiting; dropping the lab stops everything it started.
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::signal::ctrl_c().await;
                });
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    println!(
        "flotilla demo: {} hosts ({}), simulated vm-bhyve ({} ms per create and boot)",
        specs.len(),
        specs
            .iter()
            .map(|s| format!("{} -> {}", s.name, s.next.as_deref().unwrap_or("end")))
            .collect::<Vec<_>>()
            .join(", "),
        args.sim_delay_ms
    );
    let mut lab = Cluster::start(
        &specs,
        Options {
            sim_delay_ms: args.sim_delay_ms,
            // The demo shows vm-bhyve as it behaves.
            sim_realistic: true,
            poll: "5s",
            max_creates: 2,
            extra_config: String::new(),
            policies: String::new(),
            ttr: "60s",
            cluster: example.cluster.id.clone(),
            isolate: None,
            ..Options::default()
        },
    );
    for h in &lab.hosts {
        // The example VMs name secrets; each host keeps its own copy (demo values).
        for s in example.vms.values().flat_map(|v| v.secrets.iter()) {
            std::fs::write(h.secrets_dir().join(s), format!("demo-value-of-{s}\n"))?;
        }
        println!(
            "  {}: beanstalkd {}, vm_dir {}",
            h.name,
            h.beanstalkd.addr(),
            h.vm_dir.display()
        );
    }
    println!(
        "  desired repo: {} (a git repo on branch main)",
        lab.repo.display()
    );
    lab.start_agents();

    copy_tree(&args.desired, &lab.repo)?;
    show_plan(&lab)?;
    let first = lab.commit(&[], "the example VMs");
    println!(
        "\n$ git commit   ({})  — the agents see it and converge:",
        &first[..10]
    );
    converge(&lab, &first, Duration::from_secs(args.timeout), &stop)?;
    print_status(&lab)?;

    // The second commit: remove one, resize one, fill host1 so a create is forwarded.
    println!("\nSecond commit: staging removed, web2 resized to 1G, two 8G batch VMs starting at host1 (16G):");
    std::fs::remove_file(lab.repo.join("vms/staging.yaml"))?;
    edit(&lab, "vms/web2.yaml", |t| format!("{t}memory: 1G\n"))?;
    for n in ["batch1", "batch2"] {
        std::fs::write(
            lab.repo.join(format!("vms/{n}.yaml")),
            format!("name: {n}\nprofile: CS5\nstart_at: host1\n"),
        )?;
    }
    show_plan(&lab)?;
    let second = lab.commit(&[], "remove staging, resize web2, two batch VMs on host1");
    println!("\n$ git commit   ({})", &second[..10]);
    converge(&lab, &second, Duration::from_secs(args.timeout), &stop)?;
    for i in 0..lab.hosts.len() {
        for e in lab.events(i).iter().filter(|e| e.kind == "forward") {
            println!(
                "  {}: {} {}",
                e.host,
                e.vm.as_deref().unwrap_or("-"),
                e.message
            );
        }
    }
    print_status(&lab)?;
    for i in 0..lab.hosts.len() {
        lab.stop_agent(i);
    }
    println!("\nflotilla demo: done; everything it started is stopped and removed.");
    Ok(ExitCode::SUCCESS)
}
