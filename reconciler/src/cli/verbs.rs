//! The everyday verbs (issue 15): `retry`, `host drain`/`undrain`, `suspend`/`resume`.
//! Each is one signed control message to every host of the cluster, which acts on it
//! and records it in its event log.

use std::process::ExitCode;

use flotilla::agent::config::{AgentConfig, Dur};
use flotilla::control::{Control, Verb};
use flotilla::message::{tubes, Envelope, Message};

use super::cluster::{hostname, parse_dur, runtime, AgentArgs};

/// Arguments of `retry`.
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The VMs whose failed or unplaceable create is planned again now. Default: every
    /// one.
    #[arg(value_name = "VM")]
    vms: Vec<String>,
    #[command(flatten)]
    agent: AgentArgs,
    /// Time limit per host.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_dur)]
    timeout: Dur,
}

/// Arguments of `host drain` and `host undrain`.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The host.
    host: String,
    #[command(flatten)]
    agent: AgentArgs,
    /// Time limit per host.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_dur)]
    timeout: Dur,
}

/// Arguments of `suspend` and `resume`.
#[derive(Debug, clap::Args)]
pub struct SuspendArgs {
    /// One VM. Default: the whole cluster (`resume` without a VM also resumes every VM
    /// suspended alone).
    #[arg(value_name = "VM")]
    vm: Option<String>,
    #[command(flatten)]
    agent: AgentArgs,
    /// Time limit per host.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_dur)]
    timeout: Dur,
}

/// `flotilla retry [VM…]`.
pub fn retry(args: RetryArgs) -> anyhow::Result<ExitCode> {
    send(&args.agent, Verb::Retry { vms: args.vms }, args.timeout)
}

/// `flotilla host drain HOST`.
pub fn drain(args: HostArgs) -> anyhow::Result<ExitCode> {
    known_host(&args)?;
    send(&args.agent, Verb::Drain { host: args.host }, args.timeout)
}

/// `flotilla host undrain HOST`.
pub fn undrain(args: HostArgs) -> anyhow::Result<ExitCode> {
    known_host(&args)?;
    send(&args.agent, Verb::Undrain { host: args.host }, args.timeout)
}

/// `flotilla suspend [VM]`.
pub fn suspend(args: SuspendArgs) -> anyhow::Result<ExitCode> {
    send(&args.agent, Verb::Suspend { vm: args.vm }, args.timeout)
}

/// `flotilla resume [VM]`.
pub fn resume(args: SuspendArgs) -> anyhow::Result<ExitCode> {
    send(&args.agent, Verb::Resume { vm: args.vm }, args.timeout)
}

fn known_host(args: &HostArgs) -> anyhow::Result<()> {
    let hosts = args.agent.hosts()?;
    if !hosts.hosts.contains_key(&args.host) {
        anyhow::bail!(
            "host `{}` is not in cluster.yaml (hosts: {})",
            args.host,
            hosts.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Sends `verb` to every host of cluster.yaml. Exit 0 when every host got it, 1
/// otherwise (sending again is harmless: each verb says what to be, not what to flip).
fn send(agent: &AgentArgs, verb: Verb, timeout: Dur) -> anyhow::Result<ExitCode> {
    let hosts = agent.hosts()?;
    let keys = flotilla::auth::Keys::load(&AgentConfig::load(&agent.config)?.key_file)?;
    let by = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "?".into()),
        hostname()
    );
    let name = verb.name();
    let control = Control { verb, by };
    let failed = runtime()?.block_on(async {
        let peers = flotilla::agent::peers::Peers::new();
        let mut failed = Vec::new();
        for (host, addr) in &hosts.hosts {
            let mut env = Envelope::new(
                &hosts.cluster,
                &hostname(),
                host,
                Message::Control(control.clone()),
            );
            keys.seal(&mut env);
            let params = beanstalk::PutParams {
                pri: 0,
                delay: 0,
                ttr: 10,
            };
            let put = peers.put(addr, tubes::CONTROL, &env, params);
            match tokio::time::timeout(timeout.0, put).await {
                Ok(Ok(_)) => println!("{host}: told to {name}"),
                Ok(Err(e)) => failed.push(format!("{host} ({addr}): {e}")),
                Err(_) => failed.push(format!("{host} ({addr}): no answer within {:?}", timeout.0)),
            }
        }
        failed
    });
    for f in &failed {
        eprintln!("flotilla: not told: {f}; run the command again once it answers");
    }
    Ok(ExitCode::from(if failed.is_empty() { 0 } else { 1 }))
}

/// Adds a warning to `plan` for each action the agent of `agent_config` holds back
/// because its VM (or the cluster) is suspended, as its state directory records it.
pub(super) fn mark_suspended(
    plan: &mut flotilla::planner::Plan,
    agent_config: &std::path::Path,
) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(agent_config)?;
    // A user who may plan but not read the agent's state directory still gets the plan.
    match flotilla::agent::control::SwitchStore::open(&cfg.state_dir) {
        Ok(store) => {
            let warnings = suspended_warnings(plan, store.get());
            plan.warnings.extend(warnings);
        }
        Err(e) => plan.warnings.push(format!("suspended VMs not shown: {e}")),
    }
    Ok(())
}

/// One line per action on a suspended VM.
fn suspended_warnings(
    plan: &flotilla::planner::Plan,
    switches: &flotilla::control::Switches,
) -> Vec<String> {
    let mut out: Vec<String> = plan
        .actions()
        .filter(|a| switches.suspends(a.vm()))
        .map(|a| {
            format!(
                "suspended: {} is not acted on until `flotilla resume{}`",
                a.vm(),
                if switches.suspend_all {
                    String::new()
                } else {
                    format!(" {}", a.vm())
                }
            )
        })
        .collect();
    out.dedup();
    out
}

/// Arguments of `import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The unmanaged VM.
    #[arg(value_name = "NAME")]
    vm: String,
    /// The desired repo's checkout to write `vms/NAME.yaml` into (with --yes).
    #[arg(long, value_name = "DIR")]
    repo: Option<std::path::PathBuf>,
    /// Write the file and mark the VM managed; without it, only show the file.
    #[arg(long, requires = "repo")]
    yes: bool,
    #[command(flatten)]
    agent: AgentArgs,
    /// How long to wait for the VM's host to mark it managed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_dur)]
    timeout: Dur,
}

/// `flotilla import NAME`: shows the VM file of an unmanaged VM; with `--yes`, writes it
/// into `--repo` and asks the VM's host to mark it managed (as imported: never
/// destroyed before the file is committed).
pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    use flotilla::agent::status;
    let hosts = args.agent.hosts()?;
    let keys = super::cluster::status_keys(&args.agent);
    let (st, invs) = runtime()?.block_on(status::gather(&hosts, super::cluster::verify(&keys)));
    let silent: Vec<&str> = st
        .hosts
        .iter()
        .filter(|h| h.error.is_some())
        .map(|h| h.host.as_str())
        .collect();
    if !silent.is_empty() {
        // A silent host may hold a VM of the same name: importing could make two.
        anyhow::bail!(
            "hosts {} do not answer; import needs every host's inventory to know the name is free",
            silent.join(", ")
        );
    }
    let found: Vec<(&str, &flotilla::actual::ActualVm)> = invs
        .iter()
        .flat_map(|inv| {
            inv.vms
                .iter()
                .filter(|v| v.name == args.vm)
                .map(move |v| (inv.host.as_str(), v))
        })
        .collect();
    let (host, vm) = match found.as_slice() {
        [] => anyhow::bail!("no host has a VM named `{}`", args.vm),
        [(h, v)] => (*h, *v),
        more => anyhow::bail!(
            "`{}` is taken elsewhere in the cluster: VMs of that name are on {}",
            args.vm,
            more.iter().map(|(h, _)| *h).collect::<Vec<_>>().join(", ")
        ),
    };
    match &vm.marker {
        Some(m) if m.cluster == hosts.cluster => {
            anyhow::bail!("`{}` on {host} is managed already", args.vm)
        }
        Some(m) => anyhow::bail!(
            "`{}` on {host} is managed by cluster `{}`, not this one",
            args.vm,
            m.cluster
        ),
        None => {}
    }
    let text = flotilla::control::vm_file(vm, host);
    print!("{text}");
    let Some(repo) = args.repo.as_ref().filter(|_| args.yes) else {
        eprintln!(
            "flotilla: not written: run again with --repo DIR --yes to write vms/{}.yaml and mark {} on {host} managed",
            args.vm, args.vm
        );
        return Ok(ExitCode::SUCCESS);
    };
    let path = repo.join("vms").join(format!("{}.yaml", args.vm));
    std::fs::create_dir_all(repo.join("vms"))?;
    // Never over another file: the name must be free in the desired repo too.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    eprintln!("flotilla: wrote {}", path.display());
    let code = send(
        &args.agent,
        Verb::Import {
            vm: args.vm.clone(),
            host: host.to_string(),
        },
        Dur(std::time::Duration::from_secs(5)),
    )?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let started = std::time::Instant::now();
    let checked = keys;
    while started.elapsed() < args.timeout.0 {
        let (_, invs) =
            runtime()?.block_on(status::gather(&hosts, super::cluster::verify(&checked)));
        let managed = invs.iter().filter(|i| i.host == host).any(|i| {
            i.vms
                .iter()
                .any(|v| v.name == args.vm && v.is_managed_by(&hosts.cluster))
        });
        if managed {
            eprintln!(
                "flotilla: {} on {host} is managed now (imported: never destroyed before its file is committed); commit and push {}",
                args.vm,
                path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    eprintln!(
        "flotilla: {host} has not shown {} managed within {:?}; its event log says why",
        args.vm, args.timeout.0
    );
    Ok(ExitCode::from(1))
}
