//! The operator's everyday verbs as messages: `retry`, `host drain`/`undrain`,
//! `suspend`/`resume` and `import`, and the switches some of them leave set.
//!
//! Every verb that changes what the cluster does is a signed [`Control`] message on each
//! host's control tube, like `host forget`: every host that acts on it records it in its
//! event log. The switches ([`Switches`]) are kept in each agent's state directory, so a
//! drain or a suspend survives a restart, and published in its inventory, so `status`
//! and `plan` show them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A verb, with who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// What to do.
    pub verb: Verb,
    /// Who said so (user and machine of the `flotilla` command that sent it).
    pub by: String,
}

/// What an operator asks of every host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verb {
    /// Plan failed and unplaceable creates (and failed ops) again now, rather than at
    /// their retry time: those of these VMs, or all when the list is empty.
    Retry {
        /// The VMs; empty: every one.
        #[serde(default)]
        vms: Vec<String>,
    },
    /// Place no new create on `host`: its worker forwards creates along the chain.
    Drain {
        /// The host.
        host: String,
    },
    /// Undo [`Verb::Drain`].
    Undrain {
        /// The host.
        host: String,
    },
    /// Emit nothing for `vm` (every VM when `None`); passes still run and report.
    Suspend {
        /// The VM; `None`: the whole cluster.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Undo [`Verb::Suspend`] for `vm` (everything when `None`).
    Resume {
        /// The VM; `None`: the whole cluster and every VM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Mark the unmanaged VM `vm` on `host` managed, as imported ([`IMPORTED`]): `host`
    /// writes its marker; the others only log it.
    Import {
        /// The VM.
        vm: String,
        /// The host it is on.
        host: String,
    },
}

/// The `spec_hash` of an imported VM's marker: it was made equal to no spec yet. The
/// planner never destroys such a VM while no VM file desires it (it is blocked,
/// "imported: commit its VM file"), and updates the marker once one does.
pub const IMPORTED: &str = "imported";

/// Whether `vm`'s marker says it was imported and not yet made equal to a spec.
pub fn imported(vm: &crate::actual::ActualVm) -> bool {
    vm.marker.as_ref().is_some_and(|m| m.spec_hash == IMPORTED)
}

/// The VM file `flotilla import` writes for `vm`, found on `host`, from its vm-bhyve
/// config: pinned to `host` (where it is), profile CS0 with the VM's own cpu, memory and
/// disk, and every other key of its config under `config:` but those vm-bhyve generates.
pub fn vm_file(vm: &crate::actual::ActualVm, host: &str) -> String {
    use std::fmt::Write;
    // A JSON string is a YAML double-quoted scalar: every value survives as it is.
    let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Imported by `flotilla import` from its vm-bhyve config on {host}.\n\
         # The profile's template keys are added to `config` below: check the plan first."
    );
    let _ = writeln!(o, "name: {}", q(&vm.name));
    let _ = writeln!(o, "profile: CS0");
    let _ = writeln!(o, "cpu: {}", vm.cpu.max(1));
    let _ = writeln!(o, "memory: {}", vm.memory);
    if let Some(d) = vm
        .disks
        .first()
        .filter(|d| d.growable() && d.size.bytes() > 0)
    {
        let _ = writeln!(o, "disk: {}", d.size);
    }
    let _ = writeln!(o, "host: {}", q(host));
    let running = matches!(
        vm.state,
        crate::actual::RunState::Running | crate::actual::RunState::Bootloader
    );
    let _ = writeln!(o, "state: {}", if running { "running" } else { "stopped" });
    let generated = |k: &str| {
        matches!(k, "cpu" | "memory" | "uuid")
            || (k.starts_with("disk") && k.ends_with("_size"))
            || (k.starts_with("network") && k.ends_with("_mac"))
    };
    let keys: Vec<(&String, &String)> = vm.config.iter().filter(|(k, _)| !generated(k)).collect();
    if !keys.is_empty() {
        let _ = writeln!(o, "config:");
        for (k, v) in keys {
            let _ = writeln!(o, "  {k}: {}", q(v));
        }
    }
    o
}

impl Verb {
    /// The VM the verb is about, when one.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Verb::Suspend { vm } | Verb::Resume { vm } => vm.as_deref(),
            Verb::Import { vm, .. } => Some(vm),
            Verb::Retry { vms } if vms.len() == 1 => Some(&vms[0]),
            _ => None,
        }
    }

    /// The verb's name, as the event log's kind.
    pub fn name(&self) -> &'static str {
        match self {
            Verb::Retry { .. } => "retry",
            Verb::Drain { .. } => "drain",
            Verb::Undrain { .. } => "undrain",
            Verb::Suspend { .. } => "suspend",
            Verb::Resume { .. } => "resume",
            Verb::Import { .. } => "import",
        }
    }
}

/// What drains and suspends leave set, as one host knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switches {
    /// Hosts that place no new creates.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub drained: BTreeSet<String>,
    /// The whole cluster is suspended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend_all: bool,
    /// VMs suspended one by one.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub suspended: BTreeSet<String>,
}

impl Switches {
    /// Whether nothing is set (not shown, not published).
    pub fn is_empty(&self) -> bool {
        self == &Switches::default()
    }

    /// Whether reconciliation must not act on `vm`.
    pub fn suspends(&self, vm: &str) -> bool {
        self.suspend_all || self.suspended.contains(vm)
    }

    /// Whether `host` places no new creates.
    pub fn drains(&self, host: &str) -> bool {
        self.drained.contains(host)
    }

    /// Applies `verb`; returns whether a switch changed. A retry sets none.
    pub fn apply(&mut self, verb: &Verb) -> bool {
        let before = self.clone();
        match verb {
            Verb::Retry { .. } | Verb::Import { .. } => {}
            Verb::Drain { host } => {
                self.drained.insert(host.clone());
            }
            Verb::Undrain { host } => {
                self.drained.remove(host);
            }
            Verb::Suspend { vm: None } => self.suspend_all = true,
            Verb::Suspend { vm: Some(vm) } => {
                self.suspended.insert(vm.clone());
            }
            // Resuming the cluster resumes everything: an operator who typed
            // `flotilla resume` means "act again", not "act again on all but these".
            Verb::Resume { vm: None } => {
                self.suspend_all = false;
                self.suspended.clear();
            }
            Verb::Resume { vm: Some(vm) } => {
                self.suspended.remove(vm);
            }
        }
        *self != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards issue 15, verb 3: a VM suspended alone, and the cluster suspended, each
    /// stop actions on it; a cluster-wide resume clears both.
    #[test]
    fn suspend_and_resume_set_and_clear_the_switches() {
        let mut s = Switches::default();
        assert!(s.apply(&Verb::Suspend {
            vm: Some("web".into())
        }));
        assert!(s.suspends("web") && !s.suspends("db"));
        assert!(!s.apply(&Verb::Suspend {
            vm: Some("web".into())
        }));
        assert!(s.apply(&Verb::Suspend { vm: None }));
        assert!(s.suspends("db"));
        assert!(s.apply(&Verb::Resume { vm: None }));
        assert!(s.is_empty());
    }

    /// Guards issue 15, verb 2: drain and undrain of one host leave the others alone.
    #[test]
    fn drain_and_undrain_one_host() {
        let mut s = Switches::default();
        assert!(s.apply(&Verb::Drain {
            host: "host2".into()
        }));
        assert!(s.drains("host2") && !s.drains("host1"));
        assert!(!s.apply(&Verb::Retry { vms: vec![] }));
        assert!(s.apply(&Verb::Undrain {
            host: "host2".into()
        }));
        assert!(s.is_empty());
    }

    /// Guards issue 15, verb 4: the VM file import writes from a vm-bhyve config is a
    /// valid VM file, pinned where the VM is, with its cpu, memory, disk and config,
    /// without the keys vm-bhyve generates.
    #[test]
    fn an_imported_vm_file_validates() {
        let mut vm =
            crate::actual::sample_vm("hand", "1G", &["30G"], crate::actual::RunState::Running);
        vm.cpu = 2;
        for (k, v) in [
            ("cpu", "2"),
            ("memory", "1G"),
            ("uuid", "4a5b"),
            ("disk0_name", "disk0.img"),
            ("disk0_size", "30G"),
            ("network0_mac", "58:9c:fc:00:00:01"),
            ("loader", "bhyveload"),
            ("comment", "made by hand"),
        ] {
            vm.config.insert(k.into(), v.into());
        }
        let text = vm_file(&vm, "host2");
        for absent in ["uuid", "disk0_size", "network0_mac", "  cpu", "  memory"] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        let mut files = crate::desired::FileSet::new();
        files.insert(
            "cluster.yaml",
            "cluster: lab\nhosts:\n  host2:\n    beanstalkd: 127.0.0.1:1\n    limits: { memory: 16G, storage: 400G, vms: 16 }\n",
        );
        files.insert("vms/hand.yaml", text.clone());
        let snap = match crate::desired::load(&files, None) {
            Ok(s) => s,
            Err(e) => panic!("{text}\n{e:?}"),
        };
        let spec = &snap.vms["hand"];
        assert_eq!((spec.cpu, spec.memory.to_string()), (2, "1G".to_string()));
        assert_eq!(spec.disk.to_string(), "30G");
        assert_eq!(spec.host.as_deref(), Some("host2"));
        assert_eq!(spec.config["loader"], "bhyveload");
    }

    /// A verb survives the trip through JSON as the control message carries it.
    #[test]
    fn verbs_round_trip_as_json() {
        for verb in [
            Verb::Retry {
                vms: vec!["a".into()],
            },
            Verb::Drain { host: "h".into() },
            Verb::Suspend { vm: None },
            Verb::Resume {
                vm: Some("b".into()),
            },
        ] {
            let c = Control {
                verb,
                by: "op@box".into(),
            };
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Control>(&text).unwrap(), c);
        }
    }
}
