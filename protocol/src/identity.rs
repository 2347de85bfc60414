//! Who publishes an inventory or holds a lease: the agent as other hosts see it.
//! Kept and checked by the runtime (`flotilla::agent::identity`); it travels in
//! messages, so its type is here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The agent behind an inventory or a lease, as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The host identity (a UUID kept in the vm_dir).
    pub identity: String,
    /// The agent's process id.
    pub pid: u32,
    /// The machine it runs on (`hostname`).
    pub machine: String,
    /// Its state directory.
    pub state_dir: String,
    /// When it started, in seconds since the Unix epoch.
    pub started_at: u64,
    /// The id of the lease job it holds on its beanstalkd (tube `flotilla.lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_job: Option<u64>,
    /// Host names this agent saw under two identities, with the identities.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, BTreeSet<String>>,
}

impl fmt::Display for AgentInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} on {}, state_dir {}, identity {}, started at {}",
            self.pid, self.machine, self.state_dir, self.identity, self.started_at
        )
    }
}
