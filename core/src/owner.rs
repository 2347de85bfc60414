//! The owner of a VM: the one host whose reconciler may emit its create.
//!
//! Every host must arrive at the same owner without talking to the others, so the
//! owner depends only on the VM's name and the set of host names: the `host` pin when
//! there is one, else rendezvous (highest-random-weight) hashing. Rendezvous hashing
//! moves only the VMs of a host that joins or leaves, and needs no ring or table.
//!
//! The hash is FNV-1a followed by the splitmix64 finalizer, written out here because
//! std's `DefaultHasher` may change between Rust releases, and a changed hash would
//! move every VM's ownership at an upgrade.

/// The weight of `host` for `vm`; the host with the highest weight owns the VM.
pub fn weight(vm: &str, host: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // 0xff never occurs in UTF-8, so ("ab", "c") and ("a", "bc") hash apart.
    for &b in vm.as_bytes().iter().chain(&[0xff]).chain(host.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // FNV's low bits mix poorly; the finalizer spreads every input bit over the output.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The host among `hosts` that owns `vm` by rendezvous hashing, whatever the order of
/// `hosts`; `None` when there are none. Ties (astronomically rare) go to the smaller
/// name.
pub fn rendezvous<'a, I>(vm: &str, hosts: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    hosts
        .into_iter()
        .map(|h| (weight(vm, h), h))
        .max_by(|(wa, ha), (wb, hb)| wa.cmp(wb).then_with(|| hb.cmp(ha)))
        .map(|(_, h)| h)
}

/// The owner of `vm`: `pin` if given, else [`rendezvous`] over `hosts`.
pub fn owner<'a, I>(vm: &str, pin: Option<&'a str>, hosts: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    pin.or_else(|| rendezvous(vm, hosts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn weights_are_stable_across_releases() {
        // Pinned values: a change here moves VMs between owners on upgrade.
        assert_eq!(weight("web1", "host1"), 0xae9a_aafd_4235_9792);
        assert_eq!(
            rendezvous("web1", ["host1", "host2", "host3"]),
            Some("host3")
        );
    }

    #[test]
    fn spreads_vms_over_hosts() {
        let hosts = ["host1", "host2", "host3", "host4"];
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let name = format!("vm{i}");
            let o = rendezvous(&name, hosts).unwrap();
            counts[hosts.iter().position(|h| *h == o).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_pin_wins() {
        assert_eq!(owner("web1", Some("host9"), ["host1"]), Some("host9"));
        assert_eq!(owner("web1", None, []), None);
    }

    proptest::proptest! {
        #[test]
        fn order_of_hosts_does_not_matter(vm in "[a-z0-9]{2,12}", mut hosts in proptest::collection::btree_set("[a-z]{1,6}", 1..8).prop_map(|s| s.into_iter().collect::<Vec<_>>()), seed in 0usize..100) {
            let a = rendezvous(&vm, hosts.iter().map(String::as_str)).map(str::to_string);
            let n = hosts.len();
            hosts.rotate_left(seed % n);
            hosts.reverse();
            let b = rendezvous(&vm, hosts.iter().map(String::as_str)).map(str::to_string);
            proptest::prop_assert_eq!(a, b);
        }

        #[test]
        fn removing_a_host_moves_only_its_vms(vm in "[a-z0-9]{2,12}") {
            let all = ["h1", "h2", "h3", "h4"];
            let before = rendezvous(&vm, all).unwrap();
            let without: Vec<&str> = all.iter().copied().filter(|h| *h != "h4").collect();
            let after = rendezvous(&vm, without).unwrap();
            if before != "h4" {
                proptest::prop_assert_eq!(before, after);
            }
        }
    }
}
