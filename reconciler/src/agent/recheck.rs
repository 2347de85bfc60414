//! The check an op passes just before it runs: does the VM's marker still name the VM it
//! was planned for, and does the newest desired state still ask for it?
//!
//! An op can wait in the ops tube for a while (behind other ops, a busy worker, a paused
//! tube), and the desired state moves on meanwhile: six files deleted by mistake and
//! reverted a second later must not destroy six VMs (issue 14, case 1), and a destroy
//! retried after its VM was built again must not destroy the rebuild (case 2). Dropping
//! a stale op is always safe: the next reconcile pass plans from the newest state.

use crate::actual::Marker;
use crate::desired::{DesiredState, ReplacePolicy, Snapshot};
use crate::message::Message;

/// `Ok` when `op` is still asked for, else why it is dropped. `marker` is the VM's
/// marker as read just now, `snap` the newest desired state. Pure: no I/O, no clock.
pub fn recheck(op: &Message, marker: &Marker, snap: &Snapshot) -> Result<(), String> {
    let (vm, expected) = match op {
        Message::Destroy(j) | Message::Start(j) | Message::Stop(j) => (&j.vm, &j.expect_job),
        Message::Update(u) => (&u.vm, &u.expect_job),
        other => return Err(format!("a `{}` message is not an op", other.kind())),
    };
    let kind = op.kind();
    if marker.job_id != *expected {
        return Err(format!(
            "{vm} now is the VM built by job {}, not the one of job {expected} this {kind} was planned for",
            marker.job_id
        ));
    }
    let at = snap.commit.as_deref().unwrap_or("the newest commit");
    let spec = snap.vms.get(vm);
    let not_desired = || format!("{vm} is not desired at {at} any more");
    match op {
        Message::Destroy(j) if !j.replace => match spec {
            Some(_) => Err(format!("{vm} is desired again at {at}")),
            // Safety rule 3, as the planner applies it: an empty desired state destroys
            // nothing.
            None if snap.vms.is_empty() => Err(format!(
                "the desired state at {at} lists no VMs at all; nothing is destroyed"
            )),
            None => Ok(()),
        },
        // A replace destroys the VM to build it again from the spec it was planned from.
        // A half-made VM is rebuilt where it belongs whatever `replace` says (as the
        // planner does): nothing in it is worth keeping.
        Message::Destroy(j) => match spec {
            None => Err(not_desired()),
            Some(s) if s.replace != ReplacePolicy::Allow && marker.complete => {
                Err(format!("{vm} does not allow a replace at {at} any more"))
            }
            Some(s) if j.spec_hash.as_deref() != Some(s.spec_hash.as_str()) => Err(format!(
                "the spec of {vm} changed at {at} since the replace was planned"
            )),
            Some(_) => Ok(()),
        },
        Message::Update(u) => match spec {
            None => Err(not_desired()),
            Some(s) if s.spec_hash != u.spec_hash => Err(format!(
                "the spec of {vm} changed at {at} since the update was planned"
            )),
            Some(_) => Ok(()),
        },
        Message::Start(_) | Message::Stop(_) => {
            let want = if matches!(op, Message::Start(_)) {
                DesiredState::Running
            } else {
                DesiredState::Stopped
            };
            let state = |s: DesiredState| match s {
                DesiredState::Running => "running",
                DesiredState::Stopped => "stopped",
            };
            match spec {
                None => Err(not_desired()),
                Some(s) if s.state != want => {
                    Err(format!("{vm} is desired {} at {at}", state(s.state)))
                }
                Some(_) => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{load, FileSet};
    use crate::message::{Origin, UpdateJob, VmJob};

    fn snap(vms: &[&str]) -> Snapshot {
        let mut files = FileSet::new();
        files.insert(
            "cluster.yaml",
            "cluster: lab\nhosts:\n  host1:\n    beanstalkd: 127.0.0.1:11300\n    limits: { memory: 64G, storage: 2T, vms: 100 }\n",
        );
        for (i, v) in vms.iter().enumerate() {
            files.insert(format!("vms/{i}.yaml"), *v);
        }
        load(&files, Some("c2".into())).unwrap_or_else(|e| panic!("{}", e.render()))
    }

    fn marker(job: &str) -> Marker {
        Marker {
            format_version: Marker::FORMAT_VERSION,
            cluster: "lab".into(),
            job_id: job.into(),
            spec_hash: "h".into(),
            commit: "c1".into(),
            owner: "host1".into(),
            protect: false,
            placed_from: None,
            complete: true,
        }
    }

    fn job(vm: &str, expect: &str) -> VmJob {
        VmJob {
            vm: vm.into(),
            host: "host1".into(),
            expect_job: expect.into(),
            spec_hash: None,
            replace: false,
            origin: Origin {
                commit: "c1".into(),
                owner: "host1".into(),
                reply_to: "127.0.0.1:11300".into(),
            },
        }
    }

    /// Guards issue 14, case 1: six VM files deleted and reverted a second later; the
    /// destroys still queued ran after the revert. A destroy of a VM that the newest
    /// desired state has again is dropped; one of a VM still gone from it runs.
    #[test]
    fn a_destroy_of_a_vm_desired_again_is_dropped() {
        let again = snap(&["name: db1\nprofile: CS0\n"]);
        let gone = snap(&["name: other\nprofile: CS0\n"]);
        let destroy = Message::Destroy(job("db1", "j1"));
        let why = recheck(&destroy, &marker("j1"), &again).unwrap_err();
        assert_eq!(why, "db1 is desired again at c2");
        assert_eq!(recheck(&destroy, &marker("j1"), &gone), Ok(()));
        // Nor when the newest desired state is empty (safety rule 3).
        assert!(recheck(&destroy, &marker("j1"), &snap(&[])).is_err());
    }

    /// Guards issue 14, case 2: a destroy of a replace, retried after the VM was built
    /// again by another job, destroyed the rebuild. An op whose expected job id is not
    /// the marker's is dropped, whatever its kind.
    #[test]
    fn an_op_for_another_build_of_its_vm_is_dropped() {
        let s = snap(&[
            "name: db1\nprofile: CS0\nstate: stopped\nreplace: allow\n",
            "name: db2\nprofile: CS0\n",
        ]);
        let hash = s.vms["db1"].spec_hash.clone();
        let replace = Message::Destroy(VmJob {
            replace: true,
            spec_hash: Some(hash.clone()),
            ..job("db1", "j1")
        });
        assert_eq!(recheck(&replace, &marker("j1"), &s), Ok(()));
        let why = recheck(&replace, &marker("j2"), &s).unwrap_err();
        assert!(why.contains("built by job j2"), "{why}");
        let gone = Message::Destroy(job("db3", "j1"));
        assert_eq!(recheck(&gone, &marker("j1"), &s), Ok(()));
        assert!(recheck(&gone, &marker("j9"), &s).is_err());
        let stop = Message::Stop(job("db1", "j1"));
        assert_eq!(recheck(&stop, &marker("j1"), &s), Ok(()));
        assert!(recheck(&stop, &marker("j2"), &s).is_err());
        let update = Message::Update(UpdateJob {
            vm: "db1".into(),
            host: "host1".into(),
            expect_job: "j1".into(),
            set: Default::default(),
            unset: vec![],
            grow_disk: None,
            restart: false,
            protect: None,
            autostart: None,
            spec_hash: hash,
            origin: job("db1", "j1").origin,
        });
        assert_eq!(recheck(&update, &marker("j1"), &s), Ok(()));
        assert!(recheck(&update, &marker("j2"), &s).is_err());
    }

    /// An op planned from a desired state that has moved on is dropped: a replace or an
    /// update whose spec changed, a start of a VM now desired stopped, anything for a VM
    /// no longer desired but a destroy.
    #[test]
    fn an_op_the_newest_desired_state_does_not_ask_for_is_dropped() {
        let s = snap(&[
            "name: db1\nprofile: CS0\nstate: stopped\nreplace: allow\n",
            "name: db2\nprofile: CS0\n",
        ]);
        let stale = Message::Destroy(VmJob {
            replace: true,
            spec_hash: Some("older".into()),
            ..job("db1", "j1")
        });
        assert!(recheck(&stale, &marker("j1"), &s)
            .unwrap_err()
            .contains("changed"));
        let denied = Message::Destroy(VmJob {
            replace: true,
            spec_hash: Some(s.vms["db2"].spec_hash.clone()),
            ..job("db2", "j1")
        });
        assert!(recheck(&denied, &marker("j1"), &s).is_err());
        let half_made = Marker {
            complete: false,
            ..marker("j1")
        };
        assert_eq!(recheck(&denied, &half_made, &s), Ok(()));
        assert_eq!(
            recheck(&Message::Start(job("db1", "j1")), &marker("j1"), &s),
            Err("db1 is desired stopped at c2".into())
        );
        assert_eq!(
            recheck(&Message::Start(job("db2", "j1")), &marker("j1"), &s),
            Ok(())
        );
        assert!(recheck(&Message::Stop(job("db2", "j1")), &marker("j1"), &s).is_err());
        assert!(recheck(&Message::Start(job("db9", "j1")), &marker("j1"), &s).is_err());
    }
}
