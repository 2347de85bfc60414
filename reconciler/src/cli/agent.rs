//! `flotilla agent`: the host's long-running process (under supervisord).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use flotilla::agent::{self, config::AgentConfig, config::LogFormat, Shared};

/// `EX_CONFIG` from sysexits(3): supervisord is told not to restart on it.
pub const EX_CONFIG: u8 = 78;

/// Arguments of `agent`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's configuration file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/usr/local/etc/flotilla/agent.yaml"
    )]
    pub config: PathBuf,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flotilla: error: bad agent configuration: {e}");
            return Ok(ExitCode::from(EX_CONFIG));
        }
    };
    init_logging(cfg.log_format);
    let keys = match flotilla::auth::Keys::load(&cfg.key_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("flotilla: error: {e}");
            return Ok(ExitCode::from(EX_CONFIG));
        }
    };
    let backend = Arc::new(agent::backend_for(&cfg));
    let shared = match Shared::new(cfg, keys, backend) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flotilla: error: {e}");
            return Ok(ExitCode::from(EX_CONFIG));
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Backend calls block; a few threads serve them (builds are bounded by the
        // worker's slots) and keep the agent's memory small.
        .max_blocking_threads(16)
        .enable_all()
        .build()?;
    // SIGHUP would kill the process by default; the handler is in place before the
    // agent starts, so a hangup at any time after this is harmless.
    let hangups = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) });
    match hangups {
        Ok(mut hup) => {
            let (shared, path) = (shared.clone(), args.config.clone());
            rt.spawn(async move {
                while hup.recv().await.is_some() {
                    let fresh = AgentConfig::load(&path).map_err(|e| format!("{e:#}"));
                    shared.hangup(fresh);
                }
            });
        }
        Err(e) => eprintln!("flotilla: warning: no SIGHUP handler ({e}): a hangup stops the agent"),
    }
    if let Some(why) = rt.block_on(agent::run(shared)) {
        // Another agent is live for this host name: restarting would not help.
        eprintln!("flotilla: error: {why}");
        return Ok(ExitCode::from(EX_CONFIG));
    }
    Ok(ExitCode::SUCCESS)
}
