//! One thing that happened on a host, as its event log and its inventory's recent
//! events carry it. The log itself is the runtime's (`flotilla::agent::events`).

use serde::{Deserialize, Serialize};

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
