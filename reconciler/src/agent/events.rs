//! The event log: what the agent did, where, why, and how it ended.
//!
//! One JSON object per line in `<state_dir>/events.jsonl`, appended and flushed per
//! event, so `flotilla events` can read it while the agent runs and nothing is lost when
//! the agent dies. The log is rotated to `events.jsonl.1` past [`MAX_LOG`] bytes.

use std::collections::VecDeque;
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
    /// Held while appending; keeps the latest events this process logged, for its
    /// inventory ([`EventLog::recent`]).
    lock: Mutex<VecDeque<Event>>,
}

/// How many events [`EventLog::recent`] can give.
const KEEP: usize = 200;

impl EventLog {
    /// The log in `state_dir`.
    pub fn new(state_dir: &Path) -> EventLog {
        EventLog {
            path: state_dir.join("events.jsonl"),
            lock: Mutex::new(VecDeque::new()),
        }
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last `n` events this process logged (at most 200), oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let kept = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter()
            .skip(kept.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Appends `event`; a failure to write is logged, never fatal.
    pub fn append(&self, event: &Event) {
        let mut kept = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        kept.push_back(event.clone());
        while kept.len() > KEEP {
            kept.pop_front();
        }
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
    /// `flotilla retry`: failed creates and ops planned again now.
    Retry,
    /// `flotilla host drain`: no new creates placed on a host.
    Drain,
    /// `flotilla host undrain`.
    Undrain,
    /// `flotilla suspend`: reconciliation stops acting on a VM or the cluster.
    Suspend,
    /// `flotilla resume`.
    Resume,
    /// `flotilla import`: an unmanaged VM adopted.
    Import,
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
            EventKind::Retry => "retry",
            EventKind::Drain => "drain",
            EventKind::Undrain => "undrain",
            EventKind::Suspend => "suspend",
            EventKind::Resume => "resume",
            EventKind::Import => "import",
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
            | EventKind::ConfigChanged
            // An operator changed the cluster's state: worth seeing at WARN.
            | EventKind::Retry
            | EventKind::Drain
            | EventKind::Undrain
            | EventKind::Suspend
            | EventKind::Resume
            | EventKind::Import => Level::Warn,
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

/// The version of `flotilla events --output json` lines (each carries it as
/// `format_version`, like the other JSON outputs; schemas/v1/events.schema.json).
pub const JSON_VERSION: u32 = 1;

/// One line of `flotilla events --output json`: the event with [`JSON_VERSION`].
#[derive(Debug, Serialize)]
pub struct JsonLine<'a> {
    /// [`JSON_VERSION`].
    pub format_version: u32,
    /// The event.
    #[serde(flatten)]
    pub event: &'a Event,
}

/// The time `--since` means, in seconds since the Unix epoch: an RFC 3339 time
/// (`2026-11-29T21:00:00Z`, `…+01:00`, fractions ignored) or a duration before `now`
/// (`10m`, `1h`). `None` when it is neither.
pub fn parse_since(s: &str, now: u64) -> Option<u64> {
    if let Some(d) = crate::desired::parse_duration(s) {
        return Some(now.saturating_sub(d.as_secs()));
    }
    rfc3339(s)
}

fn rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let r = rest.as_bytes();
            if r.len() != 6 || r[3] != b':' {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).ok()
}

/// Every host's events together, oldest first (by the hosts' clocks), each once.
pub fn merge<'a>(lists: impl IntoIterator<Item = &'a [Event]>) -> Vec<Event> {
    let mut all: Vec<Event> = lists.into_iter().flatten().cloned().collect();
    all.sort_by(|a, b| {
        (a.at_ms, &a.host, &a.kind, &a.message).cmp(&(b.at_ms, &b.host, &b.kind, &b.message))
    });
    all.dedup();
    all
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

    /// Guards issue 15, verb 5: `--since` takes RFC 3339 times (any offset) and
    /// durations; anything else is refused.
    #[test]
    fn since_reads_rfc3339_and_durations() {
        assert_eq!(parse_since("1970-01-01T00:00:00Z", 0), Some(0));
        assert_eq!(parse_since("2026-11-29T21:00:00Z", 0), Some(1_795_986_000));
        assert_eq!(
            parse_since("2026-11-29T22:00:00.25+01:00", 0),
            Some(1_795_986_000)
        );
        assert_eq!(
            parse_since("2000-02-29T00:00:00-00:30", 0),
            Some(951_784_200)
        );
        assert_eq!(parse_since("10m", 1000), Some(400));
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-29T21:00:00",
            "",
        ] {
            assert_eq!(parse_since(bad, 1000), None, "{bad}");
        }
    }

    /// Guards issue 15, verb 5: events of several hosts come out in time order, an
    /// event seen twice (two reads of one inventory) once.
    #[test]
    fn merge_orders_and_dedups() {
        let ev = |host: &str, at_ms: u64| Event {
            at: at_ms / 1000,
            at_ms,
            host: host.into(),
            kind: "job".into(),
            vm: None,
            job: None,
            commit: None,
            message: "m".into(),
        };
        let a = vec![ev("h1", 1000), ev("h1", 3000)];
        let b = vec![ev("h2", 2000), ev("h1", 3000)];
        let m = merge([a.as_slice(), b.as_slice()]);
        let order: Vec<(String, u64)> = m.iter().map(|e| (e.host.clone(), e.at_ms)).collect();
        assert_eq!(
            order,
            vec![
                ("h1".into(), 1000),
                ("h2".into(), 2000),
                ("h1".into(), 3000)
            ]
        );
        let line = serde_json::to_value(JsonLine {
            format_version: JSON_VERSION,
            event: &m[0],
        })
        .unwrap();
        assert_eq!(line["format_version"], 1);
        assert_eq!(line["host"], "h1");
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
