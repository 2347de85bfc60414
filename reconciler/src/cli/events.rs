//! `events`: the local agent's event log, or every host's recent events together
//! (`--cluster`, from the events each agent publishes in its inventory).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use flotilla::agent::events::{self, Event, JsonLine, JSON_VERSION};
use flotilla::agent::status;
use flotilla::message;

use super::cluster::{runtime, status_keys, verify, AgentArgs};
use super::Output;

/// Arguments of `events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Every host's recent events (each agent publishes its last 100 in its inventory),
    /// in time order, instead of the local agent's log.
    #[arg(long)]
    cluster: bool,
    /// Only events about this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only events from this time on: RFC 3339 (2026-11-29T21:00:00Z) or a duration
    /// before now (10m, 1h30m).
    #[arg(long, value_name = "TIME", value_parser = since)]
    since: Option<u64>,
    /// Only the last N events.
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Keep printing events as they come (Ctrl-C ends it).
    #[arg(long)]
    follow: bool,
    /// Output format (json: one JSON object per line, each with `format_version`).
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

fn since(s: &str) -> Result<u64, String> {
    events::parse_since(s, message::now()).ok_or_else(|| {
        format!("`{s}` is neither an RFC 3339 time (2026-11-29T21:00:00Z) nor a duration (10m)")
    })
}

/// `flotilla events`.
pub fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let mut out = Printer {
        output: args.output,
        marks: BTreeMap::new(),
    };
    let mut first = true;
    loop {
        let mut evs = read(&args)?;
        evs.retain(|e| {
            args.vm
                .as_deref()
                .is_none_or(|vm| e.vm.as_deref() == Some(vm))
                && args.since.is_none_or(|t| e.at >= t)
        });
        if first {
            if let Some(n) = args.last {
                let skip = evs.len().saturating_sub(n);
                evs.drain(..skip);
            }
            first = false;
        }
        for e in &evs {
            out.print(e)?;
        }
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Every event there is now: the local log, or every host's published ones.
fn read(args: &EventsArgs) -> anyhow::Result<Vec<Event>> {
    if !args.cluster {
        let path = args.agent.state_dir()?.join("events.jsonl");
        return events::read(&path).with_context(|| format!("reading {}", path.display()));
    }
    let hosts = args.agent.hosts()?;
    let keys = status_keys(&args.agent);
    let (st, invs) = runtime()?.block_on(status::gather(&hosts, verify(&keys)));
    for h in st.hosts.iter().filter(|h| h.error.is_some()) {
        eprintln!(
            "flotilla: {}: {}; its events are missing",
            h.host,
            h.error.as_deref().unwrap_or_default()
        );
    }
    Ok(events::merge(
        invs.iter().map(|i| i.recent_events.as_slice()),
    ))
}

/// Prints each event once, across the reads of `--follow`.
struct Printer {
    output: Output,
    /// Per host (each publishes on its own schedule, by its own clock): the latest
    /// `at_ms` printed, and the events printed at that time (another of the same
    /// millisecond may come in a later read).
    marks: BTreeMap<String, (u64, BTreeSet<(String, String)>)>,
}

impl Printer {
    fn print(&mut self, e: &Event) -> anyhow::Result<()> {
        let key = (e.kind.clone(), e.message.clone());
        let (mark, seen) = self.marks.entry(e.host.clone()).or_default();
        if e.at_ms < *mark || (e.at_ms == *mark && seen.contains(&key)) {
            return Ok(());
        }
        if e.at_ms > *mark {
            *mark = e.at_ms;
            seen.clear();
        }
        seen.insert(key);
        use std::io::Write;
        let line = match self.output {
            Output::Json => serde_json::to_string(&JsonLine {
                format_version: JSON_VERSION,
                event: e,
            })?,
            Output::Text => format!(
                "{} {:<8} {:<9} {:<20} {}",
                e.at,
                e.host,
                e.kind,
                e.vm.as_deref().unwrap_or("-"),
                e.message
            ),
        };
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        Ok(())
    }
}
