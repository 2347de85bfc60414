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
    /// What kind of thing: `snapshot`, `plan`, `emit`, `job`, `result`, `forward`,
    /// `hook`, `error`, …
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
