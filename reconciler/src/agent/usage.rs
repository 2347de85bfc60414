//! What this host's guests claim, as admission sees it between listings.
//!
//! Admitting a create needs the room every guest on the host claims. Listing the host for
//! each create costs a `vm list`, which reads every guest; on a busy host that was most of
//! a create's cost (issue 5's overhead benchmark). Admission instead starts from the last
//! listing, whoever took it (the reconciler, the publisher or admission itself), and adds
//! what this host's own worker built since: that it knows exactly. Anything else the
//! worker does (destroy, update, stop, a failed build) makes the view stale, and so does
//! age, which bounds how long a VM made by hand goes unseen; then admission lists.
//!
//! The name check of a create never uses this view: it looks at the guest's own files.
//!
//! Listings overlap builds, so each change carries a generation: a listing that began at
//! generation `g` shows every change up to `g`, and may or may not show later ones, which
//! are kept until a listing shows their VM or begins after them.

use std::time::{Duration, Instant};

use crate::actual::{ActualVm, RunState};
use crate::capacity::Usage;
use crate::size::Size;

/// How long a listing serves admission on its own.
pub const MAX_AGE: Duration = Duration::from_secs(3);

/// The claims of a set of guests that admission needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claims {
    /// Memory, storage and count of every guest, stopped and unmanaged ones included.
    pub used: Usage,
    /// Memory of the running guests (the overload check's default reading).
    pub running_memory: Size,
}

impl Claims {
    /// The claims of `vms`.
    pub fn of(vms: &[ActualVm]) -> Claims {
        Claims {
            used: Usage::of(vms),
            running_memory: Size(
                vms.iter()
                    .filter(|v| v.state == RunState::Running)
                    .map(|v| v.memory.bytes())
                    .fold(0u64, u64::saturating_add),
            ),
        }
    }

    fn plus(self, o: Claims) -> Claims {
        Claims {
            used: self.used + o.used,
            running_memory: Size(self.running_memory.0.saturating_add(o.running_memory.0)),
        }
    }
}

#[derive(Debug)]
struct Base {
    began: Instant,
    claims: Claims,
}

#[derive(Debug)]
struct Built {
    generation: u64,
    vm: String,
    claims: Claims,
}

/// The last listing's claims plus this host's own builds since.
#[derive(Debug, Default)]
pub struct UsageView {
    base: Option<Base>,
    generation: u64,
    built: Vec<Built>,
    /// The generation of the latest change whose effect is unknown.
    stale_at: Option<u64>,
}

/// A listing in progress: from [`UsageView::begin`] to [`UsageView::listed`].
#[derive(Debug, Clone, Copy)]
pub struct Listing {
    began: Instant,
    generation: u64,
}

impl UsageView {
    /// A listing begins now (`now` is when).
    pub fn begin(&self, now: Instant) -> Listing {
        Listing {
            began: now,
            generation: self.generation,
        }
    }

    /// The listing begun as `l` found `vms`.
    pub fn listed(&mut self, l: Listing, vms: &[ActualVm]) {
        if self.base.as_ref().is_some_and(|b| b.began > l.began) {
            // A newer listing finished first.
            return;
        }
        self.built
            .retain(|b| b.generation > l.generation && !vms.iter().any(|v| v.name == b.vm));
        if self.stale_at.is_some_and(|s| s <= l.generation) {
            self.stale_at = None;
        }
        self.base = Some(Base {
            began: l.began,
            claims: Claims::of(vms),
        });
    }

    /// This host's worker finished building `vm`, which claims `claims`.
    pub fn built(&mut self, vm: &str, claims: Claims) {
        self.generation += 1;
        self.built.push(Built {
            generation: self.generation,
            vm: vm.to_string(),
            claims,
        });
    }

    /// This host's worker changed guests in a way the view cannot follow.
    pub fn changed(&mut self) {
        self.generation += 1;
        self.stale_at = Some(self.generation);
    }

    /// The claims now, or `None` when a listing is needed first.
    pub fn claims(&self, now: Instant) -> Option<Claims> {
        let base = self.base.as_ref()?;
        if self.stale_at.is_some() || now.saturating_duration_since(base.began) > MAX_AGE {
            return None;
        }
        Some(self.built.iter().fold(base.claims, |c, b| c.plus(b.claims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, mib: u64, running: bool) -> ActualVm {
        let state = if running {
            RunState::Running
        } else {
            RunState::Stopped
        };
        crate::actual::sample_vm(name, &format!("{mib}M"), &[], state)
    }

    fn one(mib: u64) -> Claims {
        Claims {
            used: Usage::one(Size(mib << 20), Size(0)),
            running_memory: Size(mib << 20),
        }
    }

    #[test]
    fn nothing_is_known_before_the_first_listing() {
        assert_eq!(UsageView::default().claims(Instant::now()), None);
    }

    #[test]
    fn a_listing_serves_until_it_is_too_old() {
        let t0 = Instant::now();
        let mut v = UsageView::default();
        let l = v.begin(t0);
        v.listed(l, &[vm("a", 512, true), vm("b", 256, false)]);
        let c = v.claims(t0).unwrap();
        assert_eq!(c.used.vms, 2);
        assert_eq!(c.used.memory, Size(768 << 20));
        assert_eq!(c.running_memory, Size(512 << 20));
        assert_eq!(v.claims(t0 + MAX_AGE + Duration::from_millis(1)), None);
    }

    #[test]
    fn own_builds_count_until_a_listing_shows_them_once() {
        let t0 = Instant::now();
        let mut v = UsageView::default();
        let l = v.begin(t0);
        v.listed(l, &[vm("a", 512, true)]);
        v.built("b", one(256));
        assert_eq!(v.claims(t0).unwrap().used.vms, 2);
        // A listing that began before the build finished but saw b: counted once.
        let mut w = UsageView::default();
        let early = w.begin(t0);
        w.built("b", one(256));
        w.listed(early, &[vm("a", 512, true), vm("b", 256, true)]);
        assert_eq!(w.claims(t0).unwrap().used.vms, 2);
        // One that began before and did not see it: still counted.
        let mut x = UsageView::default();
        let early = x.begin(t0);
        x.built("b", one(256));
        x.listed(early, &[vm("a", 512, true)]);
        assert_eq!(x.claims(t0).unwrap().used.vms, 2);
        // One that began after: the listing has it, whatever it shows.
        let late = x.begin(t0);
        x.listed(late, &[vm("a", 512, true), vm("b", 256, true)]);
        assert_eq!(x.claims(t0).unwrap().used.vms, 2);
    }

    #[test]
    fn another_change_needs_a_listing_that_began_after_it() {
        let t0 = Instant::now();
        let mut v = UsageView::default();
        let l = v.begin(t0);
        v.listed(l, &[vm("a", 512, true)]);
        let before = v.begin(t0);
        v.changed();
        assert_eq!(v.claims(t0), None);
        v.listed(before, &[]);
        assert_eq!(v.claims(t0), None, "began before the change");
        let after = v.begin(t0);
        v.listed(after, &[]);
        assert_eq!(v.claims(t0).unwrap().used.vms, 0);
    }

    #[test]
    fn a_slow_listing_does_not_replace_a_newer_one() {
        let t0 = Instant::now();
        let mut v = UsageView::default();
        let old = v.begin(t0);
        let new = v.begin(t0 + Duration::from_millis(5));
        v.listed(new, &[vm("a", 512, true)]);
        v.listed(old, &[]);
        assert_eq!(v.claims(t0 + Duration::from_millis(5)).unwrap().used.vms, 1);
    }
}
