//! `flotilla plan`: a dry run.
//!
//! Actual state comes from sources gathered here, so that more can be added without
//! touching the planner: saved state files (`--inventory`), the local vm-bhyve
//! (`--local`, `--vm-command`, `--vm-dir` for the simulator, `--agent-config` for the
//! backend an agent uses, real or simulated), and later the hosts' published
//! inventories.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

use flotilla::actual::HostActual;
use flotilla::backend::{Backend, VmBhyve, VmBhyveConfig};
use flotilla::desired::Snapshot;
use flotilla::planner::{self, InFlight, PlanOptions, StateFile};
use flotilla::render;

use super::desired::{self, DesiredArgs};
use super::Output;

/// Arguments of `plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    desired: DesiredArgs,

    /// Actual state saved to a JSON file ({"format_version": 1, "hosts": [...],
    /// "in_flight": [...]}). May be repeated; a host in a later file replaces the same
    /// host of an earlier one.
    #[arg(long, value_name = "FILE")]
    inventory: Vec<PathBuf>,

    /// Read this host's actual state from vm-bhyve.
    #[arg(long)]
    local: bool,

    /// The `vm` command for --local (the `vm-sim` simulator in tests and demos).
    #[arg(long, value_name = "PATH", default_value = "/usr/local/sbin/vm")]
    vm_command: PathBuf,

    /// The simulator's vm_dir (sets VM_SIM_DIR for the `vm` command); implies --local.
    /// The real `vm` reads its vm_dir from rc.conf: use --agent-config for it.
    #[arg(long, value_name = "DIR")]
    vm_dir: Option<PathBuf>,

    /// Read this host's actual state through the backend an agent.yaml describes (its
    /// `backend:` section: the real `vm` and `sysrc`, or the simulator), as that
    /// agent sees it, and take the host name from it; implies --local.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vm_dir", "vm_command"])]
    agent_config: Option<PathBuf>,

    /// Which host of cluster.yaml the local state belongs to. Default: this machine's
    /// short host name.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,

    /// Write the actual state gathered (all sources) to FILE, for a later --inventory.
    #[arg(long, value_name = "FILE")]
    save_inventory: Option<PathBuf>,

    /// Destroy more than the prune-guard share of a host's managed VMs.
    #[arg(long)]
    allow_prune: bool,

    /// Destroy even though the desired state lists no VMs at all.
    #[arg(long)]
    allow_empty: bool,

    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,

    /// No colours, even on a terminal.
    #[arg(long)]
    no_color: bool,
}

fn short_hostname() -> Option<String> {
    let out = std::process::Command::new("hostname").output().ok()?;
    let name = String::from_utf8(out.stdout).ok()?;
    let name = name.trim().split('.').next()?.to_string();
    (!name.is_empty()).then_some(name)
}

/// Every host's actual state and the jobs in flight, from all sources given.
fn gather(args: &Args, snapshot: &Snapshot) -> anyhow::Result<(Vec<HostActual>, Vec<InFlight>)> {
    let mut hosts: BTreeMap<String, HostActual> = BTreeMap::new();
    let mut in_flight = Vec::new();
    for path in &args.inventory {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = StateFile::from_json(&text)
            .with_context(|| format!("{} is not a flotilla state file", path.display()))?;
        if file.format_version > StateFile::FORMAT_VERSION {
            bail!(
                "{} has format_version {}, newer than this flotilla reads ({})",
                path.display(),
                file.format_version,
                StateFile::FORMAT_VERSION
            );
        }
        for h in file.hosts {
            hosts.insert(h.host.clone(), h);
        }
        in_flight.extend(file.in_flight);
    }
    if args.local || args.vm_dir.is_some() || args.agent_config.is_some() {
        let agent = match &args.agent_config {
            Some(path) => Some(flotilla::agent::config::AgentConfig::load(path)?),
            None => None,
        };
        let name = match (&args.host, &agent) {
            (Some(h), _) => h.clone(),
            (None, Some(a)) => a.host.clone(),
            (None, None) => {
                short_hostname().context("cannot tell this host's name; pass --host")?
            }
        };
        if !snapshot.cluster.hosts.contains_key(&name) {
            bail!(
                "host `{name}` is not in cluster.yaml (hosts: {}); pass --host NAME",
                snapshot
                    .cluster
                    .hosts
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let backend = match &agent {
            Some(a) => flotilla::agent::backend_for(a),
            None => {
                let mut cfg = VmBhyveConfig {
                    vm: args.vm_command.clone(),
                    ..VmBhyveConfig::default()
                };
                if let Some(dir) = &args.vm_dir {
                    let dir =
                        std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
                    cfg.env.push(("VM_SIM_DIR".into(), dir.clone().into()));
                    cfg.rc_conf = Some(dir.join(".config/rc.conf"));
                }
                VmBhyve::new(cfg)
            }
        };
        let vms = backend.list().with_context(|| {
            format!(
                "listing the VMs of {name} through {}",
                backend.config().vm.display()
            )
        })?;
        hosts.insert(name.clone(), HostActual { host: name, vms });
    }
    if hosts.is_empty() && args.inventory.is_empty() {
        bail!("no actual state given: pass --inventory FILE (a saved state), or --local / --agent-config / --vm-dir for this host");
    }
    Ok((hosts.into_values().collect(), in_flight))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (result, read) = desired::load(&args.desired)?;
    let snapshot = match result {
        Ok(s) => s,
        Err(invalid) => {
            let diags = Err(invalid.0);
            match args.output {
                Output::Json => print!(
                    "{}",
                    render::validation_json(&diags, read.commit.as_deref())
                ),
                Output::Text => eprint!(
                    "{}",
                    render::validation_text(&diags, super::style(args.no_color))
                ),
            }
            eprintln!(
                "flotilla: error: {} is not valid; nothing planned",
                read.label
            );
            return Ok(ExitCode::from(1));
        }
    };
    let (actual, in_flight) = gather(&args, &snapshot)?;
    if let Some(path) = &args.save_inventory {
        let file = StateFile {
            format_version: StateFile::FORMAT_VERSION,
            hosts: actual.clone(),
            in_flight: in_flight.clone(),
        };
        let json = serde_json::to_string_pretty(&file)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let options = PlanOptions {
        allow_prune: args.allow_prune,
        allow_empty: args.allow_empty,
    };
    let mut plan = planner::plan(&snapshot, &actual, &in_flight, &options);
    if let Some(path) = &args.agent_config {
        super::verbs::mark_suspended(&mut plan, path)?;
    }
    let text = match args.output {
        Output::Json => render::plan_json(&plan),
        Output::Text => render::plan_text(&plan, super::style(args.no_color)),
    };
    print!("{text}");
    // Blocked items alone change nothing: they are shown, and the exit says "no changes"
    // (issue 15, truth 4).
    let changes = plan.actions().next().is_some();
    Ok(ExitCode::from(if changes { 2 } else { 0 }))
}
