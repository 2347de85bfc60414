//! Hosts that left cluster.yaml while they may still hold VMs, and hosts an operator
//! declared gone for good (safety rule 9).
//!
//! A VM that some host's inventory shows exists, whether or not that host is still in
//! cluster.yaml: a commit that removes a host does not remove its guests. So when a
//! host leaves cluster.yaml, every agent keeps its address and its last inventory here,
//! on disk, and goes on reading it: the VMs it shows are not created elsewhere until it
//! shows them gone, or until an operator runs `flotilla host forget HOST`. Forgetting
//! also tells the agents to stop waiting for a host that does not answer (its creates
//! under an older commit, see [`super::decide::waits_for`]); a forgotten host that answers
//! again is waited for again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::message::Inventory;

/// A host that left cluster.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepartedHost {
    /// Its beanstalkd, as the last cluster.yaml that listed it said.
    pub addr: String,
    /// The first commit without it.
    pub left_at: Option<String>,
    /// Its last inventory read (verified), if any.
    pub inventory: Option<Inventory>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    hosts: BTreeMap<String, DepartedHost>,
    #[serde(default)]
    forgotten: BTreeSet<String>,
}

/// `<state_dir>/departed.json`: the departed and the forgotten hosts.
#[derive(Debug)]
pub struct Departed {
    path: PathBuf,
    state: State,
}

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}; it says which hosts that left the cluster still hold VMs, so the agent does not start without it (move it away only if those hosts are gone for good)", .path.display())]
pub struct DepartedError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl Departed {
    /// The file's name in the state directory.
    pub const NAME: &'static str = "departed.json";

    /// Reads the file in `state_dir` (none yet: nobody departed).
    pub fn open(state_dir: &Path) -> Result<Departed, DepartedError> {
        let path = state_dir.join(Self::NAME);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DepartedError {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(DepartedError {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        Ok(Departed { path, state })
    }

    fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        crate::atomic::write(&self.path, &bytes)
    }

    /// A new snapshot's host set (`now`: name → beanstalkd) after `before`: hosts that
    /// left are kept with their last inventory (from `last`), hosts listed again are no
    /// longer departed nor forgotten. Returns the hosts that just left.
    pub fn hosts_changed(
        &mut self,
        before: &BTreeMap<String, String>,
        now: &BTreeMap<String, String>,
        commit: Option<&str>,
        me: &str,
        last: &BTreeMap<String, Inventory>,
    ) -> std::io::Result<Vec<String>> {
        let mut left = Vec::new();
        let mut changed = false;
        for (host, addr) in before {
            if now.contains_key(host) || host == me || self.state.hosts.contains_key(host) {
                continue;
            }
            self.state.hosts.insert(
                host.clone(),
                DepartedHost {
                    addr: addr.clone(),
                    left_at: commit.map(str::to_string),
                    inventory: last.get(host).cloned(),
                },
            );
            left.push(host.clone());
            changed = true;
        }
        for host in now.keys() {
            changed |= self.state.hosts.remove(host).is_some();
            changed |= self.state.forgotten.remove(host);
        }
        if changed {
            self.save()?;
        }
        Ok(left)
    }

    /// `host`'s inventory was read (verified): keep it as its last.
    pub fn saw(&mut self, host: &str, inv: &Inventory) -> std::io::Result<()> {
        let mut changed = self.state.forgotten.remove(host);
        if let Some(d) = self.state.hosts.get_mut(host) {
            if d.inventory.as_ref() != Some(inv) {
                d.inventory = Some(inv.clone());
                changed = true;
            }
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    /// An operator declared `host` gone for good: drop its last inventory and stop
    /// waiting for it. Returns false when it was forgotten already.
    pub fn forget(&mut self, host: &str) -> std::io::Result<bool> {
        let was = self.state.hosts.remove(host).is_some();
        let new = self.state.forgotten.insert(host.to_string());
        if was || new {
            self.save()?;
        }
        Ok(was || new)
    }

    /// The departed hosts that are not forgotten.
    pub fn hosts(&self) -> &BTreeMap<String, DepartedHost> {
        &self.state.hosts
    }

    /// The hosts an operator declared gone, until they answer again.
    pub fn forgotten(&self) -> &BTreeSet<String> {
        &self.state.forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(host: &str, vms: &[&str]) -> Inventory {
        let mut i: Inventory = serde_json::from_value(serde_json::json!({
            "host": host, "listed_at": 1,
            "used": {"memory": "0", "storage": "0", "vms": 0},
            "reserved": {"memory": "0", "storage": "0", "vms": 0},
            "limits": {}, "vms": []
        }))
        .unwrap();
        for v in vms {
            i.vms.push(
                serde_json::from_value(serde_json::json!({
                    "name": v, "datastore": "default", "config": {}, "cpu": 1,
                    "memory": "512M", "disks": [], "state": "running"
                }))
                .unwrap(),
            );
        }
        i
    }

    fn hosts(names: &[&str]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|h| (h.to_string(), format!("{h}:11300")))
            .collect()
    }

    /// Guards issue 11, hole 1: a host removed from cluster.yaml is remembered with its
    /// last inventory, across agent restarts, until it is listed again or forgotten.
    #[test]
    fn a_removed_host_is_remembered_until_listed_again_or_forgotten() {
        let t = tempfile::tempdir().unwrap();
        let mut d = Departed::open(t.path()).unwrap();
        let last = BTreeMap::from([("host3".to_string(), inv("host3", &["vm07", "vm11"]))]);
        let left = d
            .hosts_changed(
                &hosts(&["host1", "host2", "host3"]),
                &hosts(&["host1", "host2"]),
                Some("c2"),
                "host1",
                &last,
            )
            .unwrap();
        assert_eq!(left, vec!["host3".to_string()]);
        // A restart reads it back.
        let mut d = Departed::open(t.path()).unwrap();
        let h3 = &d.hosts()["host3"];
        assert_eq!(
            (h3.addr.as_str(), h3.left_at.as_deref()),
            ("host3:11300", Some("c2"))
        );
        assert_eq!(h3.inventory.as_ref().unwrap().vms.len(), 2);
        // A newer inventory replaces the last one.
        d.saw("host3", &inv("host3", &["vm07"])).unwrap();
        assert_eq!(d.hosts()["host3"].inventory.as_ref().unwrap().vms.len(), 1);
        // Listed again: an ordinary host once more.
        d.hosts_changed(
            &hosts(&["host1", "host2"]),
            &hosts(&["host1", "host2", "host3"]),
            Some("c3"),
            "host1",
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(d.hosts().is_empty());
        // Removed again, then forgotten: gone, and stays so after a restart.
        d.hosts_changed(
            &hosts(&["host1", "host2", "host3"]),
            &hosts(&["host1", "host2"]),
            Some("c4"),
            "host1",
            &last,
        )
        .unwrap();
        assert!(d.forget("host3").unwrap());
        let mut d = Departed::open(t.path()).unwrap();
        assert!(d.hosts().is_empty());
        assert!(d.forgotten().contains("host3"));
        // A forgotten host that answers again is waited for again.
        d.saw("host3", &inv("host3", &[])).unwrap();
        assert!(d.forgotten().is_empty());
    }

    #[test]
    fn a_corrupt_file_stops_the_agent_with_the_path() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(Departed::NAME), "{not json").unwrap();
        let e = Departed::open(t.path()).unwrap_err().to_string();
        assert!(
            e.contains("departed.json") && e.contains("gone for good"),
            "{e}"
        );
    }
}
