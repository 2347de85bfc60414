//! `status`, `apply`, `events` and `trigger`: the operator's view of a running cluster,
//! through the hosts' beanstalkd servers and the local agent's state directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use flotilla::agent::config::{AgentConfig, Dur};
use flotilla::agent::{status, HostsFile};
use flotilla::message::{self, tubes, Envelope, Message, Trigger};

use super::Output;

/// Where the local agent keeps its state.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The local agent's configuration file (its state directory tells where the
    /// cluster's hosts are).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/usr/local/etc/flotilla/agent.yaml"
    )]
    pub config: PathBuf,
}

/// How long `apply`, `status` and `trigger` wait for a starting agent's hosts file.
const HOSTS_FILE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

impl AgentArgs {
    pub(super) fn state_dir(&self) -> anyhow::Result<PathBuf> {
        let cfg = AgentConfig::load(&self.config)?;
        Ok(cfg.state_dir)
    }

    pub(super) fn hosts(&self) -> anyhow::Result<HostsFile> {
        let path = self.state_dir()?.join(HostsFile::NAME);
        // An agent that has just started writes the file once it has read the desired
        // repo: give it that moment rather than failing on "No such file".
        let deadline = std::time::Instant::now() + HOSTS_FILE_WAIT;
        let text = loop {
            match std::fs::read_to_string(&path) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::bail!(
                        "{} does not exist after {}s: the agent writes it once it has read \
                         the desired repo. Is the agent running with --config {}? Its log \
                         says why it has not read the repo yet",
                        path.display(),
                        HOSTS_FILE_WAIT.as_secs(),
                        self.config.display()
                    )
                }
                r => {
                    break r.with_context(|| {
                        format!(
                            "reading {} (written by the agent once it has read the desired repo)",
                            path.display()
                        )
                    })?
                }
            }
        };
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a hosts file", path.display()))
    }
}

/// The cluster keys and message window that inventories are checked with, or why they
/// cannot be had: `status` may run as a user who cannot read the key, and then shows
/// the inventories unverified, saying so.
pub(super) fn status_keys(agent: &AgentArgs) -> Result<(flotilla::auth::Keys, u64), String> {
    let cfg = AgentConfig::load(&agent.config).map_err(|e| format!("{e:#}"))?;
    let keys = flotilla::auth::Keys::load(&cfg.key_file).map_err(|e| format!("{e:#}"))?;
    Ok((keys, cfg.message_window.0.as_secs()))
}

pub(super) fn verify(keys: &Result<(flotilla::auth::Keys, u64), String>) -> status::Verify<'_> {
    match keys {
        Ok((k, window)) => status::Verify::With(k, *window),
        Err(why) => status::Verify::Without(why.clone()),
    }
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Only this host (its row, its VMs, what needs action on it).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Only this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only VMs in this run state.
    #[arg(long, value_name = "STATE", value_parser = ["running", "stopped", "bootloader", "locked"])]
    state: Option<String>,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let hosts = args.agent.hosts()?;
    let keys = status_keys(&args.agent);
    let (mut st, _) = runtime()?.block_on(status::gather(&hosts, verify(&keys)));
    st.filter(&status::Filter {
        host: args.host,
        vm: args.vm,
        state: args.state,
    });
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Output::Text => print!("{}", status::render_text(&st)),
    }
    Ok(ExitCode::from(if st.unanswered() {
        1
    } else if !st.needs_action.is_empty() {
        2
    } else {
        0
    }))
}

/// Sends a trigger to each `(host, address)`; returns the ones that failed. A trigger is
/// addressed to its host by name when the name is known, else to any host: the
/// post-receive hook knows only addresses, and a trigger only asks for a fetch.
async fn send_triggers(
    addrs: &[(Option<String>, String)],
    cluster: &str,
    reason: &str,
    timeout: Duration,
    keys: &flotilla::auth::Keys,
) -> Vec<String> {
    let peers = flotilla::agent::peers::Peers::new();
    let from = hostname();
    let mut failed = Vec::new();
    for (host, addr) in addrs {
        let mut env = Envelope::new(
            cluster,
            &from,
            host.as_deref().unwrap_or_default(),
            Message::Trigger(Trigger {
                reason: reason.to_string(),
            }),
        );
        env.to.host = host.clone();
        keys.seal(&mut env);
        let put = peers.put(
            addr,
            tubes::CONTROL,
            &env,
            beanstalk::PutParams {
                pri: 0,
                delay: 0,
                ttr: 10,
            },
        );
        match tokio::time::timeout(timeout, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push(format!("{addr}: {e}")),
            Err(_) => failed.push(format!("{addr}: no answer within {timeout:?}")),
        }
    }
    failed
}

/// Every host of the hosts file with its address, for triggers addressed by name.
fn addressed(hosts: &HostsFile) -> Vec<(Option<String>, String)> {
    hosts
        .hosts
        .iter()
        .map(|(name, addr)| (Some(name.clone()), addr.clone()))
        .collect()
}

pub(super) fn hostname() -> String {
    std::process::Command::new("hostname")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cli".into())
}

/// Arguments of `trigger`.
#[derive(Debug, clap::Args)]
pub struct TriggerArgs {
    /// A host's beanstalkd (host:port); may be repeated. Default: every host the local
    /// agent knows (from --config), each addressed by name; a trigger sent by address
    /// names no host and is taken from the control tube of whichever host reads it.
    #[arg(long, value_name = "ADDR")]
    beanstalkd: Vec<String>,
    /// The local agent's configuration (used when no --beanstalkd is given).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/usr/local/etc/flotilla/agent.yaml"
    )]
    config: PathBuf,
    /// The cluster id written in the message.
    #[arg(long, default_value = "")]
    cluster: String,
    /// The cluster key file (mode 0600) to sign with. Default: the one --config names.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Why, for the event log.
    #[arg(long, default_value = "flotilla trigger")]
    reason: String,
    /// Time limit per host.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_dur)]
    timeout: Dur,
}

pub(super) fn parse_dur(s: &str) -> Result<Dur, String> {
    flotilla::desired::parse_duration(s)
        .map(Dur)
        .ok_or_else(|| format!("`{s}` is not a duration (e.g. 500ms, 5s, 2m, 1h30m)"))
}

pub fn trigger(args: TriggerArgs) -> anyhow::Result<ExitCode> {
    let (addrs, cluster) = if args.beanstalkd.is_empty() {
        let hosts = AgentArgs {
            config: args.config.clone(),
        }
        .hosts()?;
        (addressed(&hosts), hosts.cluster)
    } else {
        let any = args.beanstalkd.iter().map(|a| (None, a.clone())).collect();
        (any, args.cluster.clone())
    };
    let key_file = match &args.key_file {
        Some(k) => k.clone(),
        None => AgentConfig::load(&args.config)?.key_file,
    };
    let keys = flotilla::auth::Keys::load(&key_file)?;
    let failed = runtime()?.block_on(send_triggers(
        &addrs,
        &cluster,
        &args.reason,
        args.timeout.0,
        &keys,
    ));
    for f in &failed {
        eprintln!("flotilla: trigger not delivered to {f}");
    }
    Ok(ExitCode::from(if failed.is_empty() { 0 } else { 1 }))
}

/// Arguments of `apply`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Wait until the cluster has converged, showing progress.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_dur)]
    timeout: Dur,
}

/// The tip of the desired branch as `apply --wait` found it when it started.
struct Tip {
    commit: String,
    /// The first error, and how many there are, when it does not validate.
    invalid: Option<(flotilla::desired::Diagnostic, usize)>,
    src: flotilla::source::GitSource,
    /// The clone `src` lives in, removed on drop.
    _dir: tempfile::TempDir,
}

/// Reads the tip of the desired branch the agent config names, from git, into a clone
/// of its own: the agent's cache is the agent's to write.
fn read_tip(cfg: &AgentConfig) -> anyhow::Result<Tip> {
    let dir = tempfile::tempdir().context("a directory for a clone of the desired repo")?;
    let src = flotilla::source::GitSource::open(&cfg.desired.url, dir.path())?;
    src.fetch()?;
    let oid = src
        .resolve(&cfg.desired.branch)
        .with_context(|| format!("the branch `{}` of {}", cfg.desired.branch, cfg.desired.url))?;
    let commit = oid.to_string();
    let files = src.read(oid)?;
    let invalid = match flotilla::desired::load(&files, Some(commit.clone())) {
        Ok(_) => None,
        Err(e) => {
            let n = e.0.len();
            e.0.into_iter().next().map(|d| (d, n))
        }
    };
    Ok(Tip {
        commit,
        invalid,
        src,
        _dir: dir,
    })
}

impl Tip {
    /// Whether `commit` is the tip or a descendant of it; a commit this clone does not
    /// have yet (pushed since) is fetched first.
    fn reached_by(&self, commit: &str) -> bool {
        if commit == self.commit {
            return true;
        }
        let (Ok(c), Ok(tip)) = (
            git2::Oid::from_str(commit),
            git2::Oid::from_str(&self.commit),
        ) else {
            return false;
        };
        match self.src.is_descendant(c, tip) {
            Ok(d) => d,
            Err(_) => self.src.fetch().is_ok() && self.src.is_descendant(c, tip).unwrap_or(false),
        }
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let cfg = AgentConfig::load(&args.agent.config)?;
    // The commit to wait for is the branch's tip now, read from git: the local agent's
    // hosts file names the last one it read, which right after a push is the previous one.
    let tip = if args.wait {
        Some(read_tip(&cfg)?)
    } else {
        None
    };
    let hosts = args.agent.hosts()?;
    if let Some(Tip {
        commit,
        invalid: Some((d, n)),
        ..
    }) = &tip
    {
        eprintln!(
            "flotilla: the tip of {} ({}), {}, does not validate: {}:{}:{}: {}{}; \
             nothing of it is applied, the hosts keep applying {}",
            cfg.desired.branch,
            cfg.desired.url,
            short(commit),
            d.file,
            d.line,
            d.column,
            d.message,
            if *n > 1 {
                format!(" (and {} more; `flotilla validate` lists them)", n - 1)
            } else {
                String::new()
            },
            hosts.commit.as_deref().map_or("-", short)
        );
        return Ok(ExitCode::from(1));
    }
    let rt = runtime()?;
    let addrs = addressed(&hosts);
    let keys = flotilla::auth::Keys::load(&cfg.key_file)?;
    let checked = Ok((keys.clone(), cfg.message_window.0.as_secs()));
    let since = message::now();
    let failed = rt.block_on(send_triggers(
        &addrs,
        &hosts.cluster,
        "flotilla apply",
        Duration::from_secs(5),
        &keys,
    ));
    for f in &failed {
        eprintln!("flotilla: trigger not delivered to {f}");
    }
    let Some(tip) = tip else {
        return Ok(ExitCode::from(if failed.is_empty() { 0 } else { 1 }));
    };
    println!(
        "waiting for {} (the tip of {})",
        short(&tip.commit),
        cfg.desired.branch
    );
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let hosts = args.agent.hosts()?;
        let (st, invs) = rt.block_on(status::gather(&hosts, verify(&checked)));
        let line = status::progress(&st, &tip.commit);
        if line != last_line {
            println!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
            last_line = line;
        }
        if let Some(commit) = st.converged_on(since, &invs, |c| tip.reached_by(c)) {
            if commit == tip.commit {
                println!("converged at {}", short(&commit));
            } else {
                println!(
                    "converged at {}, a descendant of {} (pushed meanwhile)",
                    short(&commit),
                    short(&tip.commit)
                );
            }
            return Ok(ExitCode::from(report_leftovers(&st)));
        }
        if started.elapsed() > args.timeout.0 {
            eprintln!(
                "flotilla: {} not converged within {:?}",
                short(&tip.commit),
                args.timeout.0
            );
            print!("{}", status::render_text(&st));
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a converged cluster still leaves to an operator: blocked items, destroys the
/// prune guard holds back, creates waiting to retry. Returns the exit code: 2 when
/// there is any, 0 otherwise.
fn report_leftovers(st: &status::ClusterStatus) -> u8 {
    let retrying = st.retrying();
    if !st.blocked.is_empty() {
        println!("left for an operator to act on ({}):", st.blocked.len());
        for b in &st.blocked {
            println!("  {}", status::blocked_line(b));
        }
    }
    if !retrying.is_empty() {
        // Everything that can be done is done; these wait for room or a fix.
        println!("{} creates failed and wait to retry:", retrying.len());
        for (owner, f) in &retrying {
            println!("  {} (owner {owner}): {}", f.vm, f.status);
        }
    }
    if st.blocked.is_empty() && retrying.is_empty() {
        0
    } else {
        2
    }
}

/// `flotilla host …`.
#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Declare a host gone for good, after it was removed from cluster.yaml or when it
    /// will never answer again: the VMs its last inventory showed may then be created
    /// elsewhere, and creates no longer wait for it. Every other host is told (a signed
    /// message) and logs it. If the host still runs its VMs, they will exist twice: stop
    /// or destroy them there first.
    ///
    /// Exit 0 when every other host got it, 1 otherwise.
    Forget(ForgetArgs),
    /// Place no new creates on a host (Nomad's node drain): its worker forwards them
    /// along the hop chain, and a create pinned to it (`host:`) is unplaceable,
    /// "drained". Its VMs stay. Every host is told (a signed message) and logs it; the
    /// drain survives restarts, and `status` shows the host as DRAINING.
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Drain(super::verbs::HostArgs),
    /// Undo `host drain`: creates are placed on the host again.
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Undrain(super::verbs::HostArgs),
}

/// Arguments of `host forget`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The host.
    host: String,
    #[command(flatten)]
    agent: AgentArgs,
    /// Time limit per host.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_dur)]
    timeout: Dur,
}

pub fn host_forget(args: ForgetArgs) -> anyhow::Result<ExitCode> {
    let hosts = args.agent.hosts()?;
    let known = hosts.hosts.contains_key(&args.host) || hosts.departed.contains_key(&args.host);
    if !known {
        anyhow::bail!(
            "host `{}` is neither in cluster.yaml nor among the hosts that left it (known: {})",
            args.host,
            hosts
                .hosts
                .keys()
                .chain(hosts.departed.keys())
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let keys = flotilla::auth::Keys::load(&AgentConfig::load(&args.agent.config)?.key_file)?;
    let by = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "?".into()),
        hostname()
    );
    let to: Vec<(String, String)> = hosts
        .hosts
        .iter()
        .chain(hosts.departed.iter())
        .filter(|(h, _)| **h != args.host)
        .map(|(h, a)| (h.clone(), a.clone()))
        .collect();
    let failed = runtime()?.block_on(async {
        let peers = flotilla::agent::peers::Peers::new();
        let mut failed = Vec::new();
        for (host, addr) in &to {
            let mut env = Envelope::new(
                &hosts.cluster,
                &hostname(),
                host,
                Message::Forget(message::Forget {
                    host: args.host.clone(),
                    by: by.clone(),
                }),
            );
            keys.seal(&mut env);
            let params = beanstalk::PutParams {
                pri: 0,
                delay: 0,
                ttr: 10,
            };
            let put = peers.put(addr, tubes::CONTROL, &env, params);
            match tokio::time::timeout(args.timeout.0, put).await {
                Ok(Ok(_)) => println!("{host}: told that {} is gone", args.host),
                Ok(Err(e)) => failed.push(format!("{host} ({addr}): {e}")),
                Err(_) => failed.push(format!(
                    "{host} ({addr}): no answer within {:?}",
                    args.timeout.0
                )),
            }
        }
        failed
    });
    for f in &failed {
        eprintln!("flotilla: not told: {f}; run the command again once it answers");
    }
    Ok(ExitCode::from(if failed.is_empty() { 0 } else { 1 }))
}
