//! The room on this host as admission sees it: what its guests claim, from the usage
//! view, the kept listing or a new listing.

use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError};

use super::super::usage::Claims;
use super::super::Shared;

/// How old a kept listing may be (`backend.list_interval`).
pub(super) fn max_age(shared: &Shared) -> Duration {
    shared
        .cfg
        .backend
        .list_interval
        .map_or(super::listing::MAX_AGE, |d| d.0)
}

/// What this host's guests claim now, each once, from the view or else from a listing
/// taken under the admission lock (so no other slot admits against the same room).
/// A view older than its own age limit is as good as new while the kept listing is
/// (`kept`, at most `max_age` old): the vm_dir watch vouches that nothing changed since
/// but this agent's own jobs, which the view follows. Else the first create after a
/// few idle seconds listed the host once more (issue 12, Measure).
pub(super) fn claims_now(
    adm: &mut super::Admission,
    backend: &dyn Backend,
    kept: &super::listing::Listing,
    max_age: Duration,
) -> Result<Claims, BackendError> {
    if let Some(c) = adm.usage.claims(Instant::now()) {
        return Ok(c);
    }
    if let Some((began, vms)) = kept.kept_since(max_age) {
        adm.usage.listed(began, &vms);
        if let Some(c) = adm.usage.claims_vouched() {
            return Ok(c);
        }
    }
    let token = kept.begin();
    let listing = adm.usage.begin(Instant::now());
    let vms = backend.list()?;
    adm.usage.listed(listing, &vms);
    kept.keep(token, listing, &vms);
    // Just listed, so the view serves; the listing alone is the fallback.
    Ok(adm
        .usage
        .claims(Instant::now())
        .unwrap_or_else(|| Claims::of(&vms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::listing::{tests::Counting, Listing};
    use crate::agent::usage::UsageView;
    use std::sync::atomic::Ordering;

    /// An admission whose view comes from a listing begun 30 s ago (older than the
    /// view's own limit), kept in `listing` as well.
    fn listed_long_ago(listing: &Listing) -> super::super::Admission {
        let mut adm = super::super::Admission {
            building: Default::default(),
            operating: Default::default(),
            usage: UsageView::default(),
        };
        let at = Instant::now()
            .checked_sub(Duration::from_secs(30))
            .unwrap_or_else(Instant::now);
        let token = listing.begin();
        let began = adm.usage.begin(at);
        adm.usage.listed(began, &[]);
        listing.keep(token, began, &[]);
        adm
    }

    /// Guards issue 12, Measure (calls per create): admission trusted its view of the
    /// host for 3 s after a listing, then listed again, so the first create of a commit
    /// after an idle spell listed the host though the kept listing, which the vm_dir
    /// watch vouches for, was as good. A view that cannot follow a change, a change the
    /// watch saw and a host without a watch still make it list.
    #[test]
    fn admission_takes_the_kept_listing_the_watch_vouches_for() {
        let backend = Counting::default();
        let lists = || backend.lists.load(Ordering::SeqCst);
        let age = Duration::from_secs(300);
        let listing = Listing::default();
        listing.watch_for_tests();

        let mut adm = listed_long_ago(&listing);
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 0, "the kept listing serves");

        let mut adm = listed_long_ago(&listing);
        adm.usage.changed();
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 1, "a change the view cannot follow");

        let mut adm = listed_long_ago(&listing);
        listing.changed();
        claims_now(&mut adm, &backend, &listing, age).unwrap();
        assert_eq!(lists(), 2, "a change the watch saw");

        let unwatched = Listing::default();
        let mut adm = listed_long_ago(&unwatched);
        claims_now(&mut adm, &backend, &unwatched, age).unwrap();
        assert_eq!(lists(), 3, "no watch");
    }
}
