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
    let store = flotilla::agent::control::SwitchStore::open(&cfg.state_dir)?;
    plan.warnings.extend(suspended_warnings(plan, store.get()));
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
