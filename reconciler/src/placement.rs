//! Where a create goes: admit it here, forward it to the next host, or give up.
//!
//! A pure decision (no I/O): the worker gathers the host's usage, its reservations and
//! any overload reading, and this module says what to do. The rules (docs/design.md): a
//! create is admitted only if used + reserved + requested fits every limit and the host
//! is not overloaded; otherwise it goes to `next` with one hop less and this host added to
//! the visited list, unless the chain ends, loops, or has no hops left, in which case the
//! VM is unplaceable. The hop counter travels in the job; no host resets it.

use crate::capacity::{fits, Limits, Usage};
use crate::message::{CreateJob, Refusal};

/// What a worker does with a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Build it here, holding `reserve` against the host's capacity while building.
    Admit {
        /// What to reserve.
        reserve: Usage,
    },
    /// Put `job` (one hop less, this host recorded) on the `to` host's create tube.
    Forward {
        /// The next host.
        to: String,
        /// The job as the next host gets it.
        job: Box<CreateJob>,
    },
    /// No host can take it.
    Unplaceable {
        /// Every host's refusal and why the chain stopped.
        reason: String,
    },
}

/// What the worker knows about its host when it decides.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a> {
    /// This host's name.
    pub name: &'a str,
    /// The next host on the chain, if any.
    pub next: Option<&'a str>,
    /// What every VM on the host claims (managed or not, stopped too).
    pub used: Usage,
    /// What admitted creates still in progress hold.
    pub reserved: Usage,
    /// The host's limits.
    pub limits: &'a Limits,
    /// An overload threshold crossed, if any (e.g. "memory in use 95% ≥ 90%").
    pub overload: Option<&'a str>,
    /// An operator drained the host (`flotilla host drain`): it places no new create,
    /// whatever room it has.
    pub drained: bool,
}

/// Decides what to do with `job` on `host`.
pub fn decide(job: &CreateJob, host: HostView<'_>) -> Decision {
    let requested = job.order.usage();
    let refusal = match (
        fits(host.used, host.reserved, requested, host.limits),
        host.overload,
    ) {
        _ if host.drained => "drained".to_string(),
        (Ok(()), None) => return Decision::Admit { reserve: requested },
        (Err(e), _) => e.to_string(),
        (Ok(()), Some(o)) => format!("overloaded: {o}"),
    };
    let mut visited = job.visited.clone();
    visited.push(Refusal {
        host: host.name.to_string(),
        reason: refusal,
    });
    let history = visited
        .iter()
        .map(|r| format!("{}: {}", r.host, r.reason))
        .collect::<Vec<_>>()
        .join("; ");
    let stop = |why: String| Decision::Unplaceable {
        reason: format!("{history}; {why}"),
    };
    if job.pinned {
        return stop(format!(
            "it must run on {} (`host:`), so it is not forwarded; `start_at: {}` lets the hop chain place it further",
            host.name, host.name
        ));
    }
    let Some(next) = host.next else {
        return stop(format!("{} has no next host", host.name));
    };
    if visited.iter().any(|r| r.host == next) {
        return stop(format!(
            "next host {next} was already tried (the chain loops)"
        ));
    }
    if job.hops_left == 0 {
        return stop("no hops left".to_string());
    }
    Decision::Forward {
        to: next.to_string(),
        job: Box::new(CreateJob {
            hops_left: job.hops_left - 1,
            visited,
            ..job.clone()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::Size;

    fn job(hops_left: u32) -> CreateJob {
        CreateJob {
            hops_left,
            ..crate::message::sample_create()
        }
    }

    fn limits(mem_gib: u64) -> Limits {
        Limits {
            memory: Some(Size::gib(mem_gib)),
            storage: Some(Size::gib(1000)),
            vms: Some(100),
        }
    }

    fn view<'a>(
        name: &'a str,
        next: Option<&'a str>,
        l: &'a Limits,
        used_gib: u64,
    ) -> HostView<'a> {
        HostView {
            name,
            next,
            used: Usage {
                memory: Size::gib(used_gib),
                storage: Size::gib(0),
                vms: used_gib as u32,
            },
            reserved: Usage::default(),
            limits: l,
            overload: None,
            drained: false,
        }
    }

    /// Guards issue 15, verb 2: a drained host with room forwards a create along the
    /// chain; a create pinned to it is unplaceable, saying "drained".
    #[test]
    fn a_drained_host_forwards_and_refuses_a_pinned_create() {
        let l = limits(64);
        let mut v = view("host1", Some("host2"), &l, 1);
        v.drained = true;
        let Decision::Forward { to, job: fwd } = decide(&job(3), v) else {
            panic!("a drained host admitted a create")
        };
        assert_eq!(to, "host2");
        assert_eq!(fwd.visited[0].reason, "drained");
        let pinned = CreateJob {
            pinned: true,
            ..job(3)
        };
        let Decision::Unplaceable { reason } = decide(&pinned, v) else {
            panic!("a pinned create was not refused")
        };
        assert!(reason.contains("host1: drained"), "{reason}");
    }

    #[test]
    fn admits_what_fits_and_reserves_the_request() {
        let l = limits(8);
        assert_eq!(
            decide(&job(3), view("host1", Some("host2"), &l, 1)),
            Decision::Admit {
                reserve: job(3).order.usage()
            }
        );
    }

    #[test]
    fn counts_the_request_itself_not_just_current_use() {
        // cloud-machine compared only current totals, so a full host took one VM more.
        let l = limits(8);
        let mut v = view("host1", Some("host2"), &l, 7);
        v.reserved.memory = Size::mib(768);
        assert!(matches!(decide(&job(3), v), Decision::Forward { .. }));
    }

    #[test]
    fn forwards_with_one_hop_less_and_this_host_recorded() {
        let l = limits(1);
        let Decision::Forward { to, job: fwd } =
            decide(&job(3), view("host1", Some("host2"), &l, 1))
        else {
            panic!()
        };
        assert_eq!(to, "host2");
        assert_eq!(fwd.hops_left, 2);
        assert_eq!(fwd.visited.len(), 1);
        assert_eq!(fwd.visited[0].host, "host1");
        assert!(
            fwd.visited[0].reason.contains("memory"),
            "{:?}",
            fwd.visited
        );
        // The next host builds on the travelled counter, never on its own configuration.
        let Decision::Forward { job: fwd2, .. } = decide(&fwd, view("host2", Some("host3"), &l, 1))
        else {
            panic!()
        };
        assert_eq!(fwd2.hops_left, 1);
        assert_eq!(
            fwd2.visited
                .iter()
                .map(|r| r.host.as_str())
                .collect::<Vec<_>>(),
            ["host1", "host2"]
        );
    }

    #[test]
    fn unplaceable_at_the_end_of_the_chain_on_a_loop_or_without_hops() {
        let l = limits(1);
        let end = decide(&job(3), view("host3", None, &l, 1));
        assert!(
            matches!(&end, Decision::Unplaceable { reason } if reason.contains("host3 has no next host")),
            "{end:?}"
        );

        let mut looped = job(3);
        looped.visited.push(Refusal {
            host: "host1".into(),
            reason: "full".into(),
        });
        let d = decide(&looped, view("host2", Some("host1"), &l, 1));
        assert!(
            matches!(&d, Decision::Unplaceable { reason } if reason.contains("already tried") && reason.starts_with("host1: full; host2: ")),
            "{d:?}"
        );

        let d = decide(&job(0), view("host1", Some("host2"), &l, 1));
        assert!(
            matches!(&d, Decision::Unplaceable { reason } if reason.ends_with("no hops left")),
            "{d:?}"
        );
    }

    #[test]
    fn an_overloaded_host_forwards_even_with_room() {
        let l = limits(8);
        let mut v = view("host1", Some("host2"), &l, 1);
        v.overload = Some("memory in use 95% >= 90%");
        let Decision::Forward { job, .. } = decide(&job(3), v) else {
            panic!()
        };
        assert_eq!(
            job.visited[0].reason,
            "overloaded: memory in use 95% >= 90%"
        );
    }

    /// Issue 11, hole 5: a VM that must run on its host (`host:`) is never forwarded; it
    /// is unplaceable with the host's reason and a hint.
    #[test]
    fn a_pinned_create_is_never_forwarded() {
        let l = limits(8);
        let pinned = CreateJob {
            pinned: true,
            ..job(3)
        };
        match decide(&pinned, view("host1", Some("host2"), &l, 8)) {
            Decision::Unplaceable { reason } => {
                assert!(
                    reason.starts_with("host1: does not fit: memory"),
                    "{reason}"
                );
                assert!(reason.contains("not forwarded"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&pinned, view("host1", Some("host2"), &l, 0)),
            Decision::Admit { .. }
        ));
    }
}
