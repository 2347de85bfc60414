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
mod events;
mod plan;
mod validate;
mod verbs;

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
    /// Exit 0 when nothing would change, 2 when something would, 1 on error.
    Plan(plan::Args),
    /// Reconcile the cluster now (a trigger to every host); with --wait, show progress
    /// until it has converged.
    ///
    /// Exit 0 when triggered (converged with --wait), 1 otherwise.
    Apply(cluster::ApplyArgs),
    /// Hosts, their capacity and inventory age, every VM, creates in flight, the commit
    /// each host has applied, recent failures.
    Status(cluster::StatusArgs),
    /// The local agent's event log, or with --cluster every host's recent events: what
    /// was done, where, why, with which result.
    ///
    /// Exit 0, or 1 when the log (or with --cluster, a host) cannot be read.
    Events(events::EventsArgs),
    /// Ask hosts to fetch the desired repo and reconcile now (the post-receive hook's
    /// command).
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Trigger(cluster::TriggerArgs),
    /// Hosts as the cluster's agents know them.
    #[command(subcommand)]
    Host(cluster::HostCommand),
    /// Plan failed and unplaceable creates (and failed ops) again now, rather than after
    /// `worker.retry_failed`: every one, or those of the VMs named. Every host is told (a
    /// signed message) and logs it.
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Retry(verbs::RetryArgs),
    /// Stop acting on one VM, or on the whole cluster (as `flux suspend`): no create,
    /// destroy, update, start or stop is sent for it; passes still run and report.
    /// Survives restarts; `status` shows it.
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Suspend(verbs::SuspendArgs),
    /// Undo `suspend`; without a VM, resume the cluster and every VM suspended alone.
    ///
    /// Exit 0 when every host got it, 1 otherwise.
    Resume(verbs::SuspendArgs),
    /// Adopt an unmanaged VM: show the VM file made from its vm-bhyve config; with
    /// --repo DIR --yes, write it to DIR/vms/NAME.yaml and have its host mark it managed.
    /// Until the file is committed the VM is blocked ("imported"), never destroyed.
    /// Refused for a name already managed or on more than one host.
    ///
    /// Exit 0 when shown (or written and marked), 1 otherwise.
    Import(verbs::ImportArgs),
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
        Command::Events(args) => events::run(args),
        Command::Trigger(args) => cluster::trigger(args),
        Command::Host(cluster::HostCommand::Forget(args)) => cluster::host_forget(args),
        Command::Host(cluster::HostCommand::Drain(args)) => verbs::drain(args),
        Command::Host(cluster::HostCommand::Undrain(args)) => verbs::undrain(args),
        Command::Retry(args) => verbs::retry(args),
        Command::Suspend(args) => verbs::suspend(args),
        Command::Resume(args) => verbs::resume(args),
        Command::Import(args) => verbs::import(args),
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
