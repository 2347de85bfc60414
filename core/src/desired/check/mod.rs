//! The checks of the desired repo's values in context: names, references between files,
//! ranges, and what must be unique across VMs. The predicates they apply are in `rules`.

mod classes;
mod cluster;
mod vms;

pub(crate) use classes::{profiles, templates};
pub(crate) use cluster::cluster;
pub(crate) use vms::{vms, VmCtx};

use super::diag::quote;

pub(crate) fn join<'a>(items: impl Iterator<Item = &'a (impl AsRef<str> + ?Sized + 'a)>) -> String {
    let all: Vec<&str> = items.map(|s| s.as_ref()).collect();
    let v: Vec<String> = all.iter().take(12).map(|s| quote(s)).collect();
    if all.len() > 12 {
        format!("{}, … ({} in all)", v.join(", "), all.len())
    } else if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}
