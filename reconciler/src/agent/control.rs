//! The agent's side of the operator's verbs ([`crate::control`]): the switches kept in
//! the state directory, and what the inbox does with a control message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::control::{Control, Switches, Verb};
use crate::intents::{Intent, IntentStatus};
use crate::message;

use super::events::EventKind;
use super::state::Shared;

/// `<state_dir>/switches.json`: drains and suspends, kept across restarts.
#[derive(Debug)]
pub struct SwitchStore {
    path: PathBuf,
    switches: Switches,
}

/// Why the switches file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}; it holds the drains and suspends operators set, so the agent does not start without it", .path.display())]
pub struct SwitchError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl SwitchStore {
    /// The file's name in the state directory.
    pub const NAME: &'static str = "switches.json";

    /// Reads the file in `state_dir` (none yet: nothing set).
    pub fn open(state_dir: &Path) -> Result<SwitchStore, SwitchError> {
        let path = state_dir.join(Self::NAME);
        let err = |reason: String| SwitchError {
            path: path.clone(),
            reason,
        };
        let switches = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Switches::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(SwitchStore { path, switches })
    }

    /// What is set.
    pub fn get(&self) -> &Switches {
        &self.switches
    }

    /// Applies `verb` and, when a switch changed, writes the file before the change is
    /// acted on (a restart must not forget a drain or a suspend). Returns whether it
    /// changed.
    pub fn apply(&mut self, verb: &Verb) -> std::io::Result<bool> {
        let mut next = self.switches.clone();
        if !next.apply(verb) {
            return Ok(false);
        }
        let bytes = serde_json::to_vec_pretty(&next).unwrap_or_default();
        crate::atomic::write(&self.path, &bytes)?;
        self.switches = next;
        Ok(true)
    }
}

/// Whether a retry of `vms` (every VM when empty) concerns `intent`: a failed or
/// unplaceable create waiting for its retry time.
pub fn retries(intent: &Intent, vms: &[String]) -> bool {
    matches!(intent.status, IntentStatus::Failed { .. })
        && (vms.is_empty() || vms.contains(&intent.vm))
}

/// An operator's verb, from the inbox: acted on, recorded in the event log, and the
/// reconciler woken.
pub(super) fn on_control(shared: &Arc<Shared>, c: &Control, from: &str) {
    let kind = c.verb.name();
    let event_kind = match &c.verb {
        Verb::Retry { .. } => EventKind::Retry,
        Verb::Drain { .. } => EventKind::Drain,
        Verb::Undrain { .. } => EventKind::Undrain,
        Verb::Suspend { .. } => EventKind::Suspend,
        Verb::Resume { .. } => EventKind::Resume,
        Verb::Import { .. } => EventKind::Import,
    };
    let vm = c.verb.vm();
    let said = format!("by {} (sent from {from})", c.by);
    let text = match &c.verb {
        Verb::Retry { vms } => match retry(shared, vms) {
            Ok(retried) if retried.is_empty() => {
                format!("retry asked {said}: no failed create of this host waits to retry")
            }
            Ok(retried) => format!(
                "retry asked {said}: planned again now: {}",
                retried.join(", ")
            ),
            Err(e) => {
                shared.event(
                    EventKind::Error,
                    vm,
                    None,
                    None,
                    format!("retry asked {said}: {e}"),
                );
                return;
            }
        },
        Verb::Import { vm, host } if host != shared.me() => {
            format!("import of {vm} on {host} asked {said}")
        }
        Verb::Import { vm, .. } => match import(shared, vm) {
            Ok(()) => format!(
                "{vm} imported {said}: managed now; it is not destroyed while no VM file desires it"
            ),
            Err(e) => {
                shared.event(
                    EventKind::Error,
                    Some(vm),
                    None,
                    None,
                    format!("import of {vm} asked {said} refused: {e}"),
                );
                return;
            }
        },
        verb => {
            let changed = shared.switches().apply(verb);
            let what = match verb {
                Verb::Drain { host } => {
                    format!("host `{host}` drained: no new creates are placed on it")
                }
                Verb::Undrain { host } => {
                    format!("host `{host}` undrained: creates are placed on it again")
                }
                Verb::Suspend { vm: Some(v) } => {
                    format!("{v} suspended: reconciliation does not act on it")
                }
                Verb::Suspend { vm: None } => {
                    "the cluster suspended: reconciliation acts on no VM".into()
                }
                Verb::Resume { vm: Some(v) } => format!("{v} resumed"),
                Verb::Resume { vm: None } => {
                    "the cluster resumed, and every VM suspended alone".into()
                }
                Verb::Retry { .. } | Verb::Import { .. } => String::new(),
            };
            match changed {
                Ok(true) => format!("{what} ({said})"),
                Ok(false) => format!("{what} ({said}; it already was)"),
                Err(e) => {
                    shared.event(
                        EventKind::Error,
                        vm,
                        None,
                        None,
                        format!("cannot record `{kind}` {said}: {e}; not acted on"),
                    );
                    return;
                }
            }
        }
    };
    // Logged at WARN by its kind: an operator changed the cluster's state.
    shared.event(event_kind, vm, None, None, text);
    shared.wake_reconcile.notify_one();
    shared.wake_publish.notify_one();
}

/// Marks the unmanaged VM `vm` of this host managed, as imported: refused when it
/// carries a marker (managed here or by another cluster), when another host shows a VM
/// of that name, or while a build or op holds it.
fn import(shared: &Shared, vm: &str) -> Result<(), String> {
    let snap = shared
        .snapshot()
        .ok_or("no desired state read yet; try again")?;
    let elsewhere: Vec<String> = shared
        .inventories
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(h, inv)| h.as_str() != shared.me() && inv.vms.iter().any(|v| v.name == vm))
        .map(|(h, _)| h.clone())
        .collect();
    if !elsewhere.is_empty() {
        return Err(format!(
            "a VM of that name is on {} too",
            elsewhere.join(", ")
        ));
    }
    let mut adm = shared.admission();
    if adm.building.contains(vm) || adm.operating.contains(vm) {
        return Err("a build or change of it is under way".into());
    }
    match shared.backend.read_marker(vm) {
        Ok(None) => {}
        Ok(Some(m)) if m.cluster == snap.cluster.id => return Err("it is managed already".into()),
        Ok(Some(m)) => return Err(format!("it is managed by cluster `{}`", m.cluster)),
        Err(e) => return Err(e.to_string()),
    }
    // Held as an op, so no other slot acts on it while the marker is written.
    adm.operating.insert(vm.to_string());
    drop(adm);
    let marker = crate::actual::Marker {
        format_version: crate::actual::Marker::FORMAT_VERSION,
        cluster: snap.cluster.id.clone(),
        job_id: format!("import-{}", message::now()),
        spec_hash: crate::control::IMPORTED.into(),
        commit: snap.commit.clone().unwrap_or_default(),
        owner: shared.me().to_string(),
        protect: false,
        complete: true,
        placed_from: None,
    };
    let res = shared.backend.write_marker(vm, &marker);
    shared.admission().operating.remove(vm);
    res.map_err(|e| e.to_string())
}

/// Brings the retry time of this host's failed creates of `vms` (all when empty), and
/// of its failed ops, to now. Returns the VMs whose create is planned again.
fn retry(shared: &Shared, vms: &[String]) -> Result<Vec<String>, String> {
    let now = message::now();
    let mut retried = Vec::new();
    for mut intent in shared.intents.all().map_err(|e| e.to_string())? {
        if !retries(&intent, vms) {
            continue;
        }
        if let IntentStatus::Failed { retry_at, .. } = &mut intent.status {
            *retry_at = now;
        }
        shared.intents.record(&intent).map_err(|e| e.to_string())?;
        retried.push(intent.vm);
    }
    shared
        .retry_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(vm, _), _| !(vms.is_empty() || vms.contains(vm)));
    Ok(retried)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(vm: &str, status: IntentStatus) -> Intent {
        Intent {
            vm: vm.into(),
            job_id: "j".into(),
            first_hop: "h".into(),
            commit: "c".into(),
            spec_hash: "s".into(),
            recorded_at: 0,
            deadline: 0,
            status,
        }
    }

    /// Guards issue 15, verb 1: a retry takes failed creates only (never one still
    /// sent: that could send a second create), all of them or the named ones.
    #[test]
    fn retry_takes_failed_creates_only() {
        let failed = intent(
            "a",
            IntentStatus::Failed {
                reason: "unplaceable".into(),
                retry_at: 99,
            },
        );
        let sent = intent("b", IntentStatus::Sent);
        assert!(retries(&failed, &[]));
        assert!(retries(&failed, &["a".into()]));
        assert!(!retries(&failed, &["b".into()]));
        assert!(!retries(&sent, &[]));
        assert!(!retries(&sent, &["b".into()]));
    }

    /// Guards issue 15, verbs 2 and 3: a drain is on disk before it is acted on and
    /// survives a restart (a new store on the same directory).
    #[test]
    fn switches_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SwitchStore::open(dir.path()).unwrap();
        assert!(s
            .apply(&Verb::Drain {
                host: "host2".into()
            })
            .unwrap());
        assert!(s.apply(&Verb::Suspend { vm: None }).unwrap());
        let again = SwitchStore::open(dir.path()).unwrap();
        assert!(again.get().drains("host2") && again.get().suspend_all);
        std::fs::write(dir.path().join(SwitchStore::NAME), b"{oops").unwrap();
        assert!(SwitchStore::open(dir.path()).is_err());
    }
}
