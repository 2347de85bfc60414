//! Create intents, kept durably by the owner of a VM.
//!
//! Safety rule 2 (no VM is created twice) starts here: before the owner puts a create on
//! the queue it records the intent on disk, and while an intent is open it emits no
//! other create for that VM. An intent closes when a result comes back, or when its
//! deadline has passed and no inventory shows the VM. Because the record is written
//! (and synced) before the put, a crash between the two leaves an intent without a job,
//! which only delays the VM until the deadline; the other order could leave a job without
//! an intent and so a second create.
//!
//! One JSON file per VM in the store's directory, replaced atomically (write, fsync,
//! rename, fsync the directory).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One create in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// The VM.
    pub vm: String,
    /// The create job's id.
    pub job_id: String,
    /// The host the create was first sent to.
    pub first_hop: String,
    /// The desired commit it was planned from.
    pub commit: String,
    /// The spec hash it builds.
    pub spec_hash: String,
    /// When it was recorded (seconds since the Unix epoch).
    pub recorded_at: u64,
    /// After this time (seconds since the Unix epoch), an intent with no result and no VM
    /// in any inventory may be dropped and the create planned again.
    pub deadline: u64,
    /// What the owner has heard back.
    #[serde(default)]
    pub status: IntentStatus,
}

/// Where an intent stands. It stays open after a result so that nothing is planned from
/// an inventory older than the result: a placed VM is awaited in its host's inventory, a
/// refused create waits until its retry time or a new spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IntentStatus {
    /// Sent; no result yet.
    #[default]
    Sent,
    /// Built on `host`; closes once an inventory of `host` listed after the build (its
    /// sequence number above `seq`) shows the VM or its absence.
    Placed {
        /// Where.
        host: String,
        /// When the result arrived (seconds since the Unix epoch, by the owner's clock).
        at: u64,
        /// The builder's inventory sequence number when it sent the result
        /// ([`crate::message::JobResult::inventory_seq`]). Absent from older builders
        /// and intents: then only an inventory listed well after `at` decides.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Not built (unplaceable, failed or refused); planned again after `retry_at`, or at
    /// once when the spec changes.
    Failed {
        /// Why.
        reason: String,
        /// When to try again (seconds since the Unix epoch).
        retry_at: u64,
    },
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    /// Reading or writing the store failed.
    #[error("intent store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file in the store is not an intent.
    #[error("intent store {path}: unreadable intent: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A VM name that cannot be a file name.
    #[error("VM name {0:?} cannot name an intent file")]
    BadName(String),
}

/// The owner's intents, one file per VM under a directory.
#[derive(Debug, Clone)]
pub struct IntentStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IntentError + '_ {
    move |source| IntentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl IntentStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<IntentStore, IntentError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(IntentStore { dir })
    }

    fn path(&self, vm: &str) -> Result<PathBuf, IntentError> {
        // VM names are validated by the desired-state loader; this guards the file system
        // against anything that slipped through.
        if vm.is_empty() || vm.starts_with('.') || vm.contains(['/', '\\', '\0']) {
            return Err(IntentError::BadName(vm.to_string()));
        }
        Ok(self.dir.join(format!("{vm}.json")))
    }

    /// Records `intent`, durably, replacing any earlier one for the same VM.
    pub fn record(&self, intent: &Intent) -> Result<(), IntentError> {
        let path = self.path(&intent.vm)?;
        let bytes = serde_json::to_vec_pretty(intent).unwrap_or_default();
        crate::atomic::write(&path, &bytes).map_err(io(&path))
    }

    /// The open intent for `vm`, if any.
    pub fn get(&self, vm: &str) -> Result<Option<Intent>, IntentError> {
        let path = self.path(vm)?;
        match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Closes the intent for `vm` (absent is fine).
    pub fn remove(&self, vm: &str) -> Result<(), IntentError> {
        let path = self.path(vm)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Records that `built`'s intent closed because the VM was seen built, durably,
    /// replacing an earlier record for the VM (a later build has a later sequence). Called
    /// before the intent is removed, so a crash between the two leaves both, never
    /// neither; kept (one per VM) so that a restart publishes them again.
    pub fn record_built(&self, built: &crate::message::BuiltCreate) -> Result<(), IntentError> {
        let path = self
            .built_dir()?
            .join(self.path(&built.vm)?.file_name().unwrap_or_default());
        let bytes = serde_json::to_vec_pretty(built).unwrap_or_default();
        crate::atomic::write(&path, &bytes).map_err(io(&path))
    }

    /// Every create closed as built ([`IntentStore::record_built`]), sorted by VM.
    pub fn built(&self) -> Result<Vec<crate::message::BuiltCreate>, IntentError> {
        let dir = self.built_dir()?;
        let mut out: Vec<crate::message::BuiltCreate> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            out.push(
                serde_json::from_slice(&bytes).map_err(|e| IntentError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
            );
        }
        out.sort();
        Ok(out)
    }

    /// The records of creates closed as built: a directory beside the intents, which
    /// [`IntentStore::all`] skips (not a `.json` file).
    fn built_dir(&self) -> Result<PathBuf, IntentError> {
        let dir = self.dir.join("built");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Every open intent, sorted by VM name.
    pub fn all(&self) -> Result<Vec<Intent>, IntentError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            out.push(parse(&path, &bytes)?);
        }
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(out)
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Intent, IntentError> {
    serde_json::from_slice(bytes).map_err(|e| IntentError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(vm: &str) -> Intent {
        Intent {
            vm: vm.into(),
            job_id: format!("job-{vm}"),
            first_hop: "host1".into(),
            commit: "abc".into(),
            spec_hash: "h".into(),
            recorded_at: 100,
            deadline: 700,
            status: IntentStatus::Sent,
        }
    }

    #[test]
    fn recorded_intents_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::open(dir.path().join("intents")).unwrap();
        store.record(&intent("web02")).unwrap();
        store.record(&intent("web01")).unwrap();
        let again = IntentStore::open(dir.path().join("intents")).unwrap();
        assert_eq!(again.all().unwrap(), vec![intent("web01"), intent("web02")]);
        assert_eq!(again.get("web01").unwrap(), Some(intent("web01")));
        again.remove("web01").unwrap();
        again.remove("web01").unwrap();
        assert_eq!(again.get("web01").unwrap(), None);
        assert_eq!(again.all().unwrap().len(), 1);
    }

    #[test]
    fn a_second_record_replaces_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::open(dir.path()).unwrap();
        store.record(&intent("a")).unwrap();
        let newer = Intent {
            job_id: "job-2".into(),
            ..intent("a")
        };
        store.record(&newer).unwrap();
        assert_eq!(store.all().unwrap(), vec![newer]);
    }

    /// Guards the double build through a closed intent (model test
    /// `a_closed_intent_guards_its_vm_until_the_builder_is_seen`): the record of a create
    /// closed as built survives a restart, one per VM, the newest kept, and is no intent.
    #[test]
    fn built_records_survive_reopening_one_per_vm() {
        use crate::message::BuiltCreate;
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::open(dir.path()).unwrap();
        let b = |seq| BuiltCreate {
            vm: "web01".into(),
            host: "host2".into(),
            seq,
        };
        store.record_built(&b(2)).unwrap();
        store.record_built(&b(5)).unwrap();
        store.record(&intent("db01")).unwrap();
        let again = IntentStore::open(dir.path()).unwrap();
        assert_eq!(again.built().unwrap(), vec![b(5)]);
        assert_eq!(again.all().unwrap(), vec![intent("db01")]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_not_a_silent_gap() {
        // Dropping it silently would reopen the door to a second create.
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("web01.json"), b"{ half").unwrap();
        let err = store.all().unwrap_err();
        assert!(err.to_string().contains("web01.json"), "{err}");
    }

    #[test]
    fn names_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::open(dir.path()).unwrap();
        for bad in ["../x", "", ".hidden", "a/b"] {
            assert!(
                matches!(store.get(bad), Err(IntentError::BadName(_))),
                "{bad}"
            );
        }
    }
}
