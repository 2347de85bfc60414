//! The event log: what the agent did, where, why, and how it ended.
//!
//! One JSON object per line in `<state_dir>/events.jsonl`, appended and flushed per
//! event, so `flotilla events` can read it while the agent runs and nothing is lost when
//! the agent dies. The log is rotated to `events.jsonl.1` past [`MAX_LOG`] bytes.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Size past which the log is rotated.
pub const MAX_LOG: u64 = 16 * 1024 * 1024;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Milliseconds since the Unix epoch (for timing).
    #[serde(default)]
    pub at_ms: u64,
    /// The host that logged it.
    pub host: String,
    /// What kind of thing: the name of an [`EventKind`] (`snapshot`, `emit`, `job`,
    /// `result`, `forward`, `hook`, `error`, …); a string, so that a log written by
    /// another version still reads.
    pub kind: String,
    /// The VM concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The job concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The desired commit concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// What happened, for people.
    pub message: String,
}

/// The append-only log of one agent.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    lock: Mutex<()>,
}

impl EventLog {
    /// The log in `state_dir`.
    pub fn new(state_dir: &Path) -> EventLog {
        EventLog {
            path: state_dir.join("events.jsonl"),
            lock: Mutex::new(()),
        }
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event`; a failure to write is logged, never fatal.
    pub fn append(&self, event: &Event) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > MAX_LOG) {
            let _ = fs::rename(&self.path, self.path.with_extension("jsonl.1"));
        }
        let line = match serde_json::to_string(event) {
            Ok(l) => l + "\n",
            Err(_) => return,
        };
        let res = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = res {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the event log");
        }
    }
}

/// What kind of thing an event records: the `kind` field of its line in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// The agent starts.
    Start,
    /// The agent stops, or was asked to.
    Stop,
    /// A desired state was loaded, or this host is in cluster.yaml again.
    Snapshot,
    /// A host left cluster.yaml.
    Departed,
    /// A trigger came in.
    Trigger,
    /// A create intent closed.
    Intent,
    /// A create or an op was sent.
    Emit,
    /// A job ran here (built, changed, refused, failed).
    Job,
    /// A create went on to the next host.
    Forward,
    /// A hook ran.
    Hook,
    /// A result came back for a job this host sent.
    Result,
    /// An op was dropped: the desired state moved on before it ran.
    Dropped,
    /// A job or message was buried.
    Buried,
    /// A message was refused (unsigned, forged, replayed, misaddressed).
    Rejected,
    /// This agent refused to run: another one holds its host's lease.
    Refused,
    /// A host was declared gone for good.
    Forget,
    /// The host's lease was taken.
    Lease,
    /// A peer's clock is beyond `max_clock_skew`: creates are held back.
    ClockSkew,
    /// The clocks agree again after a [`EventKind::ClockSkew`].
    ClockAgreed,
    /// agent.yaml was read again on SIGHUP and differs from the running one: it takes
    /// effect at the next start.
    ConfigChanged,
    /// agent.yaml was read again on SIGHUP and is what the agent runs with.
    ConfigUnchanged,
    /// Something failed.
    Error,
}

/// How much an event matters to an operator: the `tracing` level it is logged at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The ordinary course of things.
    Info,
    /// Not a failure, but something an operator should look at.
    Warn,
    /// A failure.
    Error,
}

impl EventKind {
    /// The name written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::Stop => "stop",
            EventKind::Snapshot => "snapshot",
            EventKind::Departed => "departed",
            EventKind::Trigger => "trigger",
            EventKind::Intent => "intent",
            EventKind::Emit => "emit",
            EventKind::Job => "job",
            EventKind::Forward => "forward",
            EventKind::Hook => "hook",
            EventKind::Result => "result",
            EventKind::Dropped => "dropped",
            EventKind::Buried => "buried",
            EventKind::Rejected => "rejected",
            EventKind::Refused => "refused",
            EventKind::Forget => "forget",
            EventKind::Lease => "lease",
            EventKind::ClockSkew | EventKind::ClockAgreed => "clock",
            EventKind::ConfigChanged | EventKind::ConfigUnchanged => "config",
            EventKind::Error => "error",
        }
    }

    /// The level the event is logged at (issue 15, truth 3: `FLOTILLA_LOG=warn` must
    /// show failures).
    pub fn level(self) -> Level {
        match self {
            EventKind::Error => Level::Error,
            // Messages refused or buried, an agent that will not run, and hosts that
            // left or were forgotten (VMs may be created elsewhere) want a look.
            EventKind::Rejected
            | EventKind::Refused
            | EventKind::Buried
            | EventKind::Departed
            | EventKind::Forget
            | EventKind::ClockSkew
            | EventKind::ConfigChanged => Level::Warn,
            _ => Level::Info,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Logs an event through `tracing` at its kind's level, beside the event log.
pub fn trace(
    kind: EventKind,
    vm: Option<&str>,
    job: Option<&str>,
    commit: Option<&str>,
    message: &str,
) {
    let level = kind.level();
    let kind = kind.as_str();
    match level {
        Level::Error => tracing::error!(kind, vm, job, commit, "{message}"),
        Level::Warn => tracing::warn!(kind, vm, job, commit, "{message}"),
        Level::Info => tracing::info!(kind, vm, job, commit, "{message}"),
    }
}

/// Reads the events of the log at `path` (and its rotated predecessor), oldest first.
/// Lines that do not parse (a torn last line after a crash) are skipped.
pub fn read(path: &Path) -> std::io::Result<Vec<Event>> {
    let mut out = Vec::new();
    for p in [path.with_extension("jsonl.1"), path.to_path_buf()] {
        let f = match fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(f).lines() {
            if let Ok(ev) = serde_json::from_str::<Event>(&line?) {
                out.push(ev);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the level of every `tracing` event.
    struct Levels(std::sync::Arc<Mutex<Vec<tracing::Level>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Levels {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(*event.metadata().level());
        }
    }

    /// Guards issue 15, truth 3: events of kind error are logged at ERROR and warnings at
    /// WARN, so `FLOTILLA_LOG=warn` shows failures; the rest stays at INFO.
    #[test]
    fn error_events_log_at_error_and_warnings_at_warn() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sub = tracing_subscriber::registry().with(Levels(seen.clone()));
        tracing::subscriber::with_default(sub, || {
            trace(EventKind::Error, None, None, None, "reconcile failed");
            trace(EventKind::Rejected, None, None, None, "a forged message");
            trace(
                EventKind::Emit,
                Some("web1"),
                None,
                None,
                "create web1 sent",
            );
        });
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                tracing::Level::ERROR,
                tracing::Level::WARN,
                tracing::Level::INFO
            ]
        );
    }

    #[test]
    fn events_survive_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(dir.path());
        let ev = Event {
            at: 1,
            at_ms: 1000,
            host: "host1".into(),
            kind: "job".into(),
            vm: Some("web1".into()),
            job: None,
            commit: None,
            message: "created".into(),
        };
        log.append(&ev);
        fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap()
            .write_all(b"{\"at\":2,\"ho")
            .unwrap();
        assert_eq!(read(log.path()).unwrap(), vec![ev]);
    }
}
