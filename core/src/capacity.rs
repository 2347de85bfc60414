//! Capacity accounting from actual state.
//!
//! A host's usage is what its VMs claim, not what they happen to touch: every VM counts,
//! stopped or running, managed or not, with its configured memory and the apparent size
//! of its disk images (a sparse image can fill up at any time). Admission then asks
//! whether used + reserved + requested fits each limit.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::actual::ActualVm;
use crate::size::Size;

/// Resources claimed by a set of VMs (or requested by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Sum of the VMs' `memory`.
    pub memory: Size,
    /// Sum of the VMs' disk image sizes.
    pub storage: Size,
    /// Number of VMs.
    pub vms: u32,
}

impl Usage {
    /// What all of `vms` claim, stopped and unmanaged ones included.
    pub fn of(vms: &[ActualVm]) -> Usage {
        vms.iter().fold(Usage::default(), |acc, vm| {
            acc + Usage {
                memory: vm.memory,
                storage: vm.storage(),
                vms: 1,
            }
        })
    }

    /// What one new VM of this memory and total disk size asks for.
    pub fn one(memory: Size, storage: Size) -> Usage {
        Usage {
            memory,
            storage,
            vms: 1,
        }
    }
}

/// What `vm create` size a disk without `diskN_size` gets.
const DEFAULT_DISK: Size = Size::gib(20);

/// The disk space a VM built from `template_conf` with `disk0` of this size takes: disk0
/// with the guest builder's pad ([`crate::planner::BUILDER_PAD`]), and every further disk
/// `vm create` makes from the template (`diskN_name` with no gap; a file image or a zvol
/// of `diskN_size`). A custom or iSCSI device is made by someone else and takes nothing
/// from the host's storage here. disk0 counts even when the template does not name it:
/// too much is safe, too little is not.
pub fn storage_of(template_conf: &str, disk0: Size) -> Size {
    let conf = crate::conf::Conf::parse(template_conf);
    let mut total = disk0
        .bytes()
        .saturating_add(crate::planner::BUILDER_PAD.bytes());
    for n in 1u32.. {
        if conf
            .get(&format!("disk{n}_name"))
            .is_none_or(|d| d.is_empty())
        {
            break;
        }
        let dev = conf.get(&format!("disk{n}_dev")).unwrap_or("");
        if matches!(dev, "custom" | "iscsi") {
            continue;
        }
        // An unreadable size makes `vm create` fail: then nothing is taken at all.
        let size = match conf.get(&format!("disk{n}_size")) {
            None | Some("") => DEFAULT_DISK,
            Some(s) => s.parse().unwrap_or(Size(0)),
        };
        total = total.saturating_add(size.bytes());
    }
    Size(total)
}

impl std::ops::Add for Usage {
    type Output = Usage;
    /// Saturating, so absurd inputs fail admission instead of wrapping round to "fits".
    fn add(self, o: Usage) -> Usage {
        Usage {
            memory: Size(self.memory.0.saturating_add(o.memory.0)),
            storage: Size(self.storage.0.saturating_add(o.storage.0)),
            vms: self.vms.saturating_add(o.vms),
        }
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    /// Saturating: releasing more than was reserved leaves zero, never a wrap-around.
    fn sub(self, o: Usage) -> Usage {
        Usage {
            memory: Size(self.memory.0.saturating_sub(o.memory.0)),
            storage: Size(self.storage.0.saturating_sub(o.storage.0)),
            vms: self.vms.saturating_sub(o.vms),
        }
    }
}

impl From<&crate::desired::HostLimits> for Limits {
    /// A host's limits as cluster.yaml states them (all set).
    fn from(l: &crate::desired::HostLimits) -> Limits {
        Limits {
            memory: Some(l.memory),
            storage: Some(l.storage),
            vms: Some(l.vms),
        }
    }
}

/// A host's limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Memory all VMs together may claim.
    pub memory: Option<Size>,
    /// Disk space all VMs' images together may claim.
    pub storage: Option<Size>,
    /// How many VMs the host may hold.
    pub vms: Option<u32>,
}

/// One limit that a request would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "resource", rename_all = "lowercase")]
pub enum Exceeded {
    /// Memory: what would be claimed and the limit.
    Memory {
        /// used + reserved + requested.
        needed: Size,
        /// The host's limit.
        limit: Size,
    },
    /// Storage: what would be claimed and the limit.
    Storage {
        /// used + reserved + requested.
        needed: Size,
        /// The host's limit.
        limit: Size,
    },
    /// VM count: what there would be and the limit.
    Vms {
        /// used + reserved + requested.
        needed: u32,
        /// The host's limit.
        limit: u32,
    },
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Memory { needed, limit } => {
                write!(f, "memory {needed} would exceed the limit {limit}")
            }
            Exceeded::Storage { needed, limit } => {
                write!(f, "storage {needed} would exceed the limit {limit}")
            }
            Exceeded::Vms { needed, limit } => {
                write!(f, "{needed} VMs would exceed the limit of {limit}")
            }
        }
    }
}

/// Why a request does not fit: every limit it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("does not fit: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct DoesNotFit(pub Vec<Exceeded>);

/// Whether `requested` fits next to `used` and `reserved` (admitted but not yet created)
/// under `limits`. A limit is met when the total is at most the limit.
pub fn fits(
    used: Usage,
    reserved: Usage,
    requested: Usage,
    limits: &Limits,
) -> Result<(), DoesNotFit> {
    let total = used + reserved + requested;
    let mut broken = Vec::new();
    if let Some(limit) = limits.memory.filter(|l| total.memory > *l) {
        broken.push(Exceeded::Memory {
            needed: total.memory,
            limit,
        });
    }
    if let Some(limit) = limits.storage.filter(|l| total.storage > *l) {
        broken.push(Exceeded::Storage {
            needed: total.storage,
            limit,
        });
    }
    if let Some(limit) = limits.vms.filter(|l| total.vms > *l) {
        broken.push(Exceeded::Vms {
            needed: total.vms,
            limit,
        });
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(DoesNotFit(broken))
    }
}

/// Whether a change in place that claims `grows` more fits next to `used` (everything
/// claimed, reservations included) under `limits`: admitted like a create, but only the
/// limits it adds to are checked, so a host already past a limit (lowered since) still
/// takes changes that do not add to it.
pub fn fits_growth(used: Usage, grows: Usage, limits: &Limits) -> Result<(), DoesNotFit> {
    let raised = Limits {
        memory: limits.memory.filter(|_| grows.memory.0 > 0),
        storage: limits.storage.filter(|_| grows.storage.0 > 0),
        vms: limits.vms.filter(|_| grows.vms > 0),
    };
    fits(used, Usage::default(), grows, &raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actual::RunState;

    fn vm(name: &str, memory: &str, disks: &[&str], state: RunState) -> ActualVm {
        crate::actual::sample_vm(name, memory, disks, state)
    }

    #[test]
    fn counts_stopped_and_unmanaged_vms() {
        let vms = [
            vm("a", "256M", &["8G"], RunState::Running),
            vm("b", "1G", &["20G", "4G"], RunState::Stopped),
            vm("c", "512M", &[], RunState::Locked),
        ];
        let u = Usage::of(&vms);
        assert_eq!(u.memory, "1792M".parse().unwrap());
        assert_eq!(u.storage, "32G".parse().unwrap());
        assert_eq!(u.vms, 3);
    }

    #[test]
    fn fits_at_the_limit_and_names_every_broken_one() {
        let limits = Limits {
            memory: Some(Size::gib(4)),
            storage: Some(Size::gib(100)),
            vms: Some(3),
        };
        let used = Usage {
            memory: Size::gib(2),
            storage: Size::gib(50),
            vms: 1,
        };
        let reserved = Usage::one(Size::gib(1), Size::gib(20));
        assert_eq!(
            fits(
                used,
                reserved,
                Usage::one(Size::gib(1), Size::gib(30)),
                &limits
            ),
            Ok(())
        );
        let err = fits(
            used,
            reserved,
            Usage::one(Size::mib(1025), Size::gib(31)),
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            vec![
                Exceeded::Memory {
                    needed: Size::mib(4097),
                    limit: Size::gib(4)
                },
                Exceeded::Storage {
                    needed: Size::gib(101),
                    limit: Size::gib(100)
                },
            ]
        );
        assert_eq!(
            err.to_string(),
            "does not fit: memory 4097M would exceed the limit 4G; storage 101G would exceed the limit 100G"
        );
        let full = Usage { vms: 3, ..used };
        let err = fits(
            full,
            Usage::default(),
            Usage::one(Size(0), Size(0)),
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            vec![Exceeded::Vms {
                needed: 4,
                limit: 3
            }]
        );
    }

    #[test]
    fn no_limits_means_anything_fits_and_sums_saturate() {
        let huge = Usage {
            memory: Size(u64::MAX),
            storage: Size(u64::MAX),
            vms: u32::MAX,
        };
        assert_eq!(fits(huge, huge, huge, &Limits::default()), Ok(()));
        let limits = Limits {
            memory: Some(Size(u64::MAX - 1)),
            ..Limits::default()
        };
        assert!(fits(huge, huge, Usage::default(), &limits).is_err());
    }
}
