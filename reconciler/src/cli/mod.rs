//! Subcommands and their shared arguments.
//!
//! Exit codes follow one rule for every subcommand: 0 success (for `plan`: no changes),
//! 1 error (for `validate`: invalid), 2 changes (`plan` only), 64 bad usage.
//!
//! What every subcommand prints goes through the `print!` family below, which shadows
//! std's in this module and its children: text is written with control characters
//! escaped ([`render::escape_controls`]), and when the reader of stdout has gone
//! (`flotilla events | head -1`) the command ends quietly with exit 0, as the reader
//! got all it asked for.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use flotilla::render::{self, Style};

/// Writes to stdout like std's `print!`, see the module's documentation.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::out(&format!($($arg)*)) };
}
/// Writes a line to stdout like std's `println!`, see the module's documentation.
macro_rules! println {
    () => { $crate::cli::out("\n") };
    ($($arg:tt)*) => { $crate::cli::out(&format!("{}\n", format_args!($($arg)*))) };
}
/// Writes to stderr like std's `eprint!`, with control characters escaped.
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::cli::err(&format!($($arg)*)) };
}
/// Writes a line to stderr like std's `eprintln!`, with control characters escaped.
macro_rules! eprintln {
    ($($arg:tt)*) => { $crate::cli::err(&format!("{}\n", format_args!($($arg)*))) };
}

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
    /// Print a shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, flotilla(1), in roff.
    #[command(hide = true)]
    Man,
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
    /// Exit status: see below.
    #[command(
        after_help = "Exit status:\n  0   triggered; with --wait: converged, nothing left to act on\n  1   an error, a trigger not delivered, a desired tip that does not validate (said at\n      once: commit, file, line, the commit the hosts keep applying), or with --wait\n      not converged within --timeout\n  2   with --wait: converged, but blocked items, destroys held by the prune guard or\n      creates waiting to retry are left (listed)\n  64  bad usage"
    )]
    Apply(cluster::ApplyArgs),
    /// What needs action (hosts that do not answer, a desired commit that does not
    /// validate, blocked VMs, destroys held by the prune guard), then hosts, VMs, jobs in
    /// flight and recent failures; times in RFC 3339.
    ///
    /// Exit 0 when nothing needs action, 1 when a host does not answer (or on error), 2
    /// when every host answers and something needs action. Filters apply to the exit
    /// code too.
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
        Command::Completions { shell } => completions(shell),
        Command::Man => man(),
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
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla: error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Writes `text` to stdout with control characters escaped; exits quietly (0) when the
/// reader has gone.
pub fn out(text: &str) {
    use std::io::Write;
    let style = Style {
        color: std::io::stdout().is_terminal(),
    };
    let text = render::escape_controls(text, style);
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Writes `text` to stderr with control characters escaped. A failed write to stderr
/// has nowhere to be reported.
pub fn err(text: &str) {
    use std::io::Write;
    let style = Style {
        color: std::io::stderr().is_terminal(),
    };
    let _ = std::io::stderr().write_all(render::escape_controls(text, style).as_bytes());
}

/// True when the error comes from writing to a reader that has gone.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, `: `-separated, leaving out a cause whose text is already
/// printed (many errors quote their source in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "flotilla", &mut buf);
    print!("{}", String::from_utf8_lossy(&buf));
    Ok(ExitCode::SUCCESS)
}

fn man() -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    print!("{}", String::from_utf8_lossy(&buf));
    Ok(ExitCode::SUCCESS)
}
