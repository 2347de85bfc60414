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

use std::collections::BTreeMap;
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
    /// Per guest name (summed should a name appear twice).
    vms: BTreeMap<String, Claims>,
}

#[derive(Debug)]
struct Built {
    generation: u64,
    vm: String,
    claims: Claims,
}

/// The last listing's claims plus this host's own builds since, and what admitted
/// builds and changes still in progress hold.
#[derive(Debug, Default)]
pub struct UsageView {
    base: Option<Base>,
    generation: u64,
    built: Vec<Built>,
    /// Per VM, what an admitted build or change in progress will claim once done.
    holds: BTreeMap<String, Claims>,
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
        // A build the listing began after is in it, whole; one that ended later may show
        // half-made or not at all, so the build's own claim stands in for it.
        self.built.retain(|b| b.generation > l.generation);
        if self.stale_at.is_some_and(|s| s <= l.generation) {
            self.stale_at = None;
        }
        let mut by_name = BTreeMap::new();
        for v in vms {
            let c: &mut Claims = by_name.entry(v.name.clone()).or_default();
            *c = c.plus(Claims::of(std::slice::from_ref(v)));
        }
        self.base = Some(Base {
            began: l.began,
            vms: by_name,
        });
    }

    /// This host's worker finished building `vm`, which claims `claims`.
    pub fn built(&mut self, vm: &str, claims: Claims) {
        self.holds.remove(vm);
        self.generation += 1;
        self.built.push(Built {
            generation: self.generation,
            vm: vm.to_string(),
            claims,
        });
    }

    /// A build or change of `vm` was admitted: until it ends, `vm` claims `claims`.
    pub fn reserve(&mut self, vm: &str, claims: Claims) {
        self.holds.insert(vm.to_string(), claims);
    }

    /// The build or change of `vm` ended in a way the view cannot follow (failed, or
    /// done with an effect only a listing shows).
    pub fn release(&mut self, vm: &str) {
        self.holds.remove(vm);
        self.changed();
    }

    /// What the builds and changes in progress hold beyond what `vms` (a listing) shows
    /// of the same VMs: a listing's claims plus this count each VM once.
    pub fn reserved_beyond(&self, vms: &[ActualVm]) -> Usage {
        self.holds.iter().fold(Usage::default(), |acc, (vm, c)| {
            let listed = Usage::of(
                &vms.iter()
                    .filter(|v| &v.name == vm)
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            acc + (c.used - listed)
        })
    }

    /// This host's worker changed guests in a way the view cannot follow.
    pub fn changed(&mut self) {
        self.generation += 1;
        self.stale_at = Some(self.generation);
    }

    /// The claims now, or `None` when a listing is needed first.
    pub fn claims(&self, now: Instant) -> Option<Claims> {
        let base = self.base.as_ref()?;
        if now.saturating_duration_since(base.began) > MAX_AGE {
            return None;
        }
        self.claims_vouched()
    }

    /// The claims, whatever the last listing's age: for when the vm_dir watch vouches
    /// that nothing changed since it began but this host's own builds and changes
    /// (see `listing::Listing::kept_since`). `None` when a listing is needed first.
    pub fn claims_vouched(&self) -> Option<Claims> {
        let base = self.base.as_ref()?;
        if self.stale_at.is_some() {
            return None;
        }
        // Each guest once: a hold (what it will claim) over a build since the listing
        // (what it claimed when built) over what the listing showed.
        let mut each: BTreeMap<&str, Claims> =
            base.vms.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        for b in &self.built {
            each.insert(&b.vm, b.claims);
        }
        for (vm, c) in &self.holds {
            each.insert(vm, *c);
        }
        Some(each.values().fold(Claims::default(), |acc, c| acc.plus(*c)))
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

    /// Guards issue 14, case 8: a VM being built counted twice (in the listing's `used`
    /// and in the reservations), so with `vms: 2` and one VM building a second create
    /// was refused as "3 VMs would exceed the limit of 2".
    #[test]
    fn a_vm_being_built_counts_once_whatever_the_listing_shows() {
        let t0 = Instant::now();
        let mut v = UsageView::default();
        let l = v.begin(t0);
        v.listed(l, &[vm("a", 512, true)]);
        v.reserve("b", one(256));
        // Half-made b in a listing: still one b, at its full claim.
        let l = v.begin(t0);
        let half = vm("b", 0, false);
        v.listed(l, &[vm("a", 512, true), half.clone()]);
        let c = v.claims(t0).unwrap();
        assert_eq!((c.used.vms, c.used.memory), (2, Size(768 << 20)));
        assert_eq!(v.reserved_beyond(&[vm("a", 512, true), half]).vms, 0);
        // A listing that began while b was half-made, and ends after the build.
        let early = v.begin(t0);
        v.built("b", one(256));
        v.listed(early, &[vm("a", 512, true), vm("b", 0, false)]);
        let c = v.claims(t0).unwrap();
        assert_eq!((c.used.vms, c.used.memory), (2, Size(768 << 20)));
        // With `vms: 2` and b building, a third fits only when the limit is 3.
        let mut w = UsageView::default();
        let l = w.begin(t0);
        w.reserve("b", one(256));
        w.listed(l, &[vm("a", 512, true), vm("b", 0, false)]);
        let limits = crate::capacity::Limits {
            vms: Some(3),
            ..Default::default()
        };
        let used = w.claims(t0).unwrap().used;
        assert_eq!(
            crate::capacity::fits(
                used,
                Usage::default(),
                Usage::one(Size(0), Size(0)),
                &limits
            ),
            Ok(())
        );
    }

    /// One step of the admission model below.
    #[derive(Debug, Clone)]
    enum Step {
        /// A create of VM `n` asks for room (memory units `m`, storage units `s`).
        Admit(u8, u8, u8),
        /// VM `n`, being built, appears half-made on the host.
        Appear(u8),
        /// VM `n`'s build ends well.
        Finish(u8),
        /// VM `n`'s build fails and its leftovers are removed.
        Fail(u8),
        /// VM `n`, built, is destroyed.
        Destroy(u8),
        /// A listing begins.
        Begin,
        /// The `k`-th open listing reads the host.
        Read(u8),
        /// The `k`-th open listing ends.
        End(u8),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..6, 1u8..4, 1u8..4).prop_map(|(n, m, s)| Step::Admit(n, m, s)),
            2 => (0u8..6).prop_map(Step::Appear),
            2 => (0u8..6).prop_map(Step::Finish),
            1 => (0u8..6).prop_map(Step::Fail),
            1 => (0u8..6).prop_map(Step::Destroy),
            2 => Just(Step::Begin),
            2 => (0u8..4).prop_map(Step::Read),
            2 => (0u8..4).prop_map(Step::End),
        ]
    }

    /// Where a VM of the model is.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Stage {
        Admitted,
        HalfMade,
        Built,
    }

    const UNIT: u64 = 1 << 30;

    fn guest(name: &str, claims: Usage, stage: Stage) -> ActualVm {
        let mut v = crate::actual::sample_vm(name, "1M", &["1M"], RunState::Stopped);
        // A half-made guest shows less than it will take: no disk grown yet, no memory.
        let full = stage == Stage::Built;
        v.memory = if full { claims.memory } else { Size(0) };
        v.disks[0].size = if full { claims.storage } else { Size(4096) };
        v
    }

    proptest::proptest! {
        /// Guards issue 14, cases 6 to 8, as a property of admission: under any
        /// interleaving of listings, builds, failures and destroys, the view counts each
        /// VM once at what it will take (a half-made VM at its full claim), and nothing
        /// is admitted past a limit.
        #[test]
        fn admission_counts_each_vm_once_and_never_admits_past_a_limit(
            steps in proptest::collection::vec(step(), 1..60)
        ) {
            let t0 = Instant::now();
            let limits = crate::capacity::Limits {
                memory: Some(Size(6 * UNIT)),
                storage: Some(Size(7 * UNIT)),
                vms: Some(3),
            };
            let mut view = UsageView::default();
            let mut host: BTreeMap<String, (Usage, Stage)> = BTreeMap::new();
            let mut open: Vec<(Listing, Option<Vec<ActualVm>>)> = Vec::new();
            let listing = |host: &BTreeMap<String, (Usage, Stage)>| -> Vec<ActualVm> {
                host.iter()
                    .filter(|(_, (_, st))| *st != Stage::Admitted)
                    .map(|(n, (u, st))| guest(n, *u, *st))
                    .collect()
            };
            for (i, st) in steps.into_iter().enumerate() {
                let now = t0 + Duration::from_micros(i as u64);
                match st {
                    Step::Admit(n, m, s) => {
                        let name = format!("v{n}");
                        if host.contains_key(&name) {
                            continue;
                        }
                        let claims = match view.claims(now) {
                            Some(c) => c,
                            None => {
                                let l = view.begin(now);
                                let vms = listing(&host);
                                view.listed(l, &vms);
                                view.claims(now).expect("a fresh listing serves")
                            }
                        };
                        let want = Usage::one(Size(m as u64 * UNIT), Size(s as u64 * UNIT));
                        if crate::capacity::fits(claims.used, Usage::default(), want, &limits).is_ok() {
                            view.reserve(&name, Claims { used: want, running_memory: Size(0) });
                            host.insert(name, (want, Stage::Admitted));
                        }
                    }
                    Step::Appear(n) => {
                        if let Some((_, st @ Stage::Admitted)) = host.get_mut(&format!("v{n}")) {
                            *st = Stage::HalfMade;
                        }
                    }
                    Step::Finish(n) => {
                        let name = format!("v{n}");
                        if let Some((u, st @ (Stage::Admitted | Stage::HalfMade))) = host.get_mut(&name) {
                            *st = Stage::Built;
                            let u = *u;
                            view.built(&name, Claims { used: u, running_memory: Size(0) });
                        }
                    }
                    Step::Fail(n) => {
                        let name = format!("v{n}");
                        if matches!(host.get(&name), Some((_, Stage::Admitted | Stage::HalfMade))) {
                            host.remove(&name);
                            view.release(&name);
                        }
                    }
                    Step::Destroy(n) => {
                        let name = format!("v{n}");
                        if matches!(host.get(&name), Some((_, Stage::Built))) {
                            host.remove(&name);
                            view.changed();
                        }
                    }
                    Step::Begin => open.push((view.begin(now), None)),
                    Step::Read(k) => {
                        if let Some((_, seen @ None)) = open.get_mut(k as usize) {
                            *seen = Some(listing(&host));
                        }
                    }
                    Step::End(k) => {
                        if matches!(open.get(k as usize), Some((_, Some(_)))) {
                            let (l, seen) = open.remove(k as usize);
                            view.listed(l, &seen.unwrap_or_default());
                        }
                    }
                }
                let truth = host.values().fold(Usage::default(), |acc, (u, _)| acc + *u);
                proptest::prop_assert!(
                    crate::capacity::fits(truth, Usage::default(), Usage::default(), &limits).is_ok(),
                    "admitted past a limit: {truth:?}"
                );
                if let Some(c) = view.claims(now) {
                    proptest::prop_assert_eq!(c.used, truth, "each VM once, at its full claim");
                }
            }
        }
    }
}
