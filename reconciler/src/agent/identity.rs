//! A host's identity, and the watch for two agents under one host name (safety rule 8).
//!
//! The identity is a UUID made once and kept in the host's vm_dir (`.flotilla-identity`):
//! it belongs to the VMs' storage, not to an agent process, so a restarted agent keeps it
//! and a second agent with its own vm_dir has another one. Every inventory carries it
//! ([`AgentInfo`]). A host name seen under two identities means two live agents claim
//! it: every create to or from that host stops until only one identity has been seen for
//! [`CONFLICT_HOLD`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The identity file's name in the vm_dir.
pub const FILE: &str = ".flotilla-identity";

/// How long a conflict stands after the last change of identity seen (seconds): two agents
/// that take turns keep it standing; once one is gone it clears.
pub const CONFLICT_HOLD: u64 = 300;

/// The agent behind an inventory or a lease, as others see it. (in the protocol crate: messages carry it).
pub use flotilla_protocol::identity::AgentInfo;

/// Why the identity file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// It holds something other than a UUID: an operator must look, it is not replaced.
    #[error("{path} does not hold a UUID ({content:?}); fix or remove it")]
    Invalid {
        /// The file.
        path: String,
        /// What it holds (the start of it).
        content: String,
    },
}

/// The identity kept in `dir`, made (mode 0644) if there is none yet.
pub fn load_or_create(dir: &Path) -> Result<String, IdentityError> {
    let path = dir.join(FILE);
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    for _ in 0..50 {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                if uuid::Uuid::parse_str(id).is_ok() {
                    return Ok(id.to_string());
                }
                return Err(IdentityError::Invalid {
                    path: path.display().to_string(),
                    content: id.chars().take(60).collect(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Written whole beside it, then linked in: a link fails when the name exists, so
        // two agents starting at once on one vm_dir end with the same identity.
        let id = uuid::Uuid::new_v4().to_string();
        let tmp = tempfile::Builder::new()
            .prefix(".flotilla-identity-")
            .tempfile_in(dir)
            .map_err(io)?;
        {
            use std::io::Write;
            // On disk before it is linked in: after a power loss the name must not
            // stand for an empty file, which no agent could start with.
            let mut f = tmp.as_file();
            f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
                .map_err(io)?;
        }
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                return Ok(id);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(e)),
        }
    }
    Err(io(std::io::Error::other("the file keeps changing")))
}

#[derive(Debug, Clone, Default)]
struct Seen {
    /// The identity of the newest inventory.
    current: String,
    /// Every identity seen under this name, in order of first sight.
    history: Vec<String>,
    /// Identities in conflict, and the time of the last change among them.
    conflict: Option<(BTreeSet<String>, u64)>,
}

/// Which identities each host name has shown: a pure record, fed with every inventory
/// read and asked which hosts are in conflict.
#[derive(Debug, Clone, Default)]
pub struct IdentityWatch {
    hosts: BTreeMap<String, Seen>,
}

impl IdentityWatch {
    /// Records that `host`'s inventory showed `identity` at `now`. One change (a host
    /// rebuilt with a new vm_dir) is not a conflict; an identity coming back after
    /// another is: two agents take turns publishing.
    pub fn observe(&mut self, host: &str, identity: &str, now: u64) {
        let seen = self.hosts.entry(host.to_string()).or_default();
        if seen.history.is_empty() {
            seen.current = identity.to_string();
            seen.history.push(identity.to_string());
            return;
        }
        if seen.current == identity {
            return;
        }
        if seen
            .conflict
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_sub(*at) >= CONFLICT_HOLD)
        {
            // Cleared: what came before no longer counts against a change now.
            seen.conflict = None;
            seen.history = vec![seen.current.clone()];
        }
        let before = std::mem::replace(&mut seen.current, identity.to_string());
        let known = seen.history.iter().any(|h| h == identity);
        if known || seen.conflict.is_some() {
            let (ids, at) = seen.conflict.get_or_insert_with(Default::default);
            ids.insert(before);
            ids.insert(identity.to_string());
            *at = now;
        }
        if !known {
            seen.history.push(identity.to_string());
            // A bounded record: only recent identities can come back.
            if seen.history.len() > 8 {
                seen.history.remove(0);
            }
        }
    }

    /// Records that this agent (`mine`) found an inventory with `other` in its own
    /// host's tube, listed at `listed_at`, while it has held the host's lease since
    /// `since`: another agent published under this host's name.
    pub fn observe_own(
        &mut self,
        host: &str,
        mine: &str,
        other: &str,
        listed_at: u64,
        since: u64,
        now: u64,
    ) {
        if other == mine || listed_at < since {
            // The same agent, or what an earlier agent left before this one took over.
            return;
        }
        let seen = self.hosts.entry(host.to_string()).or_default();
        let (ids, at) = seen.conflict.get_or_insert_with(Default::default);
        ids.insert(mine.to_string());
        ids.insert(other.to_string());
        *at = now;
    }

    /// Hosts in conflict at `now`, with their identities.
    pub fn conflicts(&self, now: u64) -> BTreeMap<String, BTreeSet<String>> {
        self.hosts
            .iter()
            .filter_map(|(h, s)| {
                let (ids, at) = s.conflict.as_ref()?;
                (now.saturating_sub(*at) < CONFLICT_HOLD).then(|| (h.clone(), ids.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Guards issue 11, hole 3: a host name whose inventory alternates between two
    /// identities is in conflict; a single change (a rebuilt host) is not.
    #[test]
    fn an_identity_that_comes_back_is_a_conflict_a_single_change_is_not() {
        let mut w = IdentityWatch::default();
        w.observe("host1", "A", 10);
        w.observe("host1", "A", 11);
        w.observe("host2", "X", 11);
        assert!(w.conflicts(12).is_empty());
        w.observe("host1", "B", 13);
        assert!(w.conflicts(14).is_empty(), "one change is a rebuilt host");
        w.observe("host1", "A", 15);
        assert_eq!(
            w.conflicts(16),
            BTreeMap::from([("host1".to_string(), ids(&["A", "B"]))])
        );
        // Taking turns keeps it standing; it clears once one identity stays alone.
        w.observe("host1", "B", 200);
        assert!(w.conflicts(200 + CONFLICT_HOLD - 1).contains_key("host1"));
        assert!(w.conflicts(200 + CONFLICT_HOLD).is_empty());
        // After it cleared, one change is again only a change.
        w.observe("host1", "C", 600);
        assert!(w.conflicts(600).is_empty());
        w.observe("host1", "B", 601);
        assert_eq!(w.conflicts(602)["host1"], ids(&["B", "C"]));
        // A third identity joining a standing conflict is part of it.
        w.observe("host1", "D", 603);
        assert_eq!(w.conflicts(604)["host1"], ids(&["B", "C", "D"]));
    }

    /// Guards issue 11, hole 3: an inventory under another identity in this host's own
    /// tube, listed after this agent took the lease, is a conflict; one left before is
    /// not.
    #[test]
    fn another_identity_in_the_own_tube_after_taking_the_lease_is_a_conflict() {
        let mut w = IdentityWatch::default();
        w.observe_own("host1", "A", "A", 100, 50, 100);
        w.observe_own("host1", "A", "OLD", 40, 50, 100);
        assert!(w.conflicts(100).is_empty());
        w.observe_own("host1", "A", "B", 60, 50, 100);
        assert_eq!(w.conflicts(101)["host1"], ids(&["A", "B"]));
    }

    /// Guards issue 11, hole 3: the identity is made once, kept in the vm_dir with mode
    /// 0644, and read back the same; a file that is not a UUID is an error, not replaced.
    #[test]
    fn the_identity_is_made_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a, b);
        let meta = std::fs::metadata(dir.path().join(FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        std::fs::write(dir.path().join(FILE), "garbage\n").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Invalid { .. })
        ));
    }
}
