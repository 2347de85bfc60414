//! Subcommands and their shared arguments.
//!
//! Exit codes follow one rule for every subcommand: 0 success (for `plan`: no changes),
//! 1 error (for `validate`: invalid), 2 changes (`plan` only), 64 bad usage.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use flotilla::render::Style;

mod agent;
mod cluster;
mod desired;
mod plan;
mod validate;

/// GitOps reconciler for FreeBSD bhyve VMs.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a desired repo: every error with file, line, column and a hint.
    ///
    /// Exit 0 when valid, 1 when not (or when it cannot be read).
    Validate(validate::Args),
    /// Show what it takes to make the hosts equal to a desired repo (a dry run).
    ///
    /// Exit 0 when nothing would change (blocked items alone change nothing), 2 when
    /// something would, 1 on error.
    Plan(plan::Args),
    /// Reconcile the cluster now (a trigger to every host); with --wait, read the tip of
    /// the desired branch from git and show progress until every host has applied it (or
    /// a descendant pushed meanwhile), then say which commit converged.
    ///
    /// Exit 0 when triggered (with --wait: converged, nothing left to act on); 1 on error,
    /// a trigger not delivered, a tip that does not validate (said at once: commit, file,
    /// line, the commit the hosts keep applying) or no convergence within --timeout; 2
    /// when converged but blocked items, destroys held by the prune guard or creates
    /// waiting to retry are left (listed).
    Apply(cluster::ApplyArgs),
    /// What needs action (hosts that do not answer, a desired commit that does not
    /// validate, blocked VMs, destroys held by the prune guard), then hosts, VMs, jobs in
    /// flight and recent failures; times in RFC 3339.
    ///
    /// Exit 0 when nothing needs action, 1 when a host does not answer (or on error), 2
    /// when every host answers and something needs action. Filters apply to the exit
    /// code too.
    Status(cluster::StatusArgs),
    /// The local agent's event log: what was done, where, why, with which result.
    Events(cluster::EventsArgs),
    /// Ask hosts to fetch the desired repo and reconcile now (the post-receive hook's
    /// command).
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Trigger(cluster::TriggerArgs),
    /// Hosts as the cluster's agents know them.
    #[command(subcommand)]
    Host(cluster::HostCommand),
    /// Run this host's agent: source, reconciler, worker, inbox, inventory. Exit 0 on
    /// SIGTERM, 78 on a bad configuration.
    Agent(agent::Args),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For programs: one JSON document with a `format_version`.
    Json,
}

/// Colours only on a terminal, and never with `NO_COLOR` set (to anything non-empty).
fn style(no_color: bool) -> Style {
    let disabled = no_color || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    Style {
        color: !disabled && std::io::stdout().is_terminal(),
    }
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Apply(args) => cluster::apply(args),
        Command::Status(args) => cluster::status(args),
        Command::Events(args) => cluster::events(args),
        Command::Trigger(args) => cluster::trigger(args),
        Command::Host(cluster::HostCommand::Forget(args)) => cluster::host_forget(args),
        Command::Agent(args) => agent::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
