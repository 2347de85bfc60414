//! flotilla: a GitOps reconciler for FreeBSD bhyve virtual machines spread over several
//! hosts.
//!
//! This crate is the agent runtime, the git source and the CLI; the pure core
//! (flotilla-core), the protocol (flotilla-protocol), the vm-bhyve backend
//! (flotilla-vm-bhyve) and atomic file replacement (flotilla-atomic) are crates of
//! their own, re-exported here under their old module paths. Among them:
//! - [`size`]: byte sizes in vm-bhyve's notation;
//! - [`actual`]: what vm-bhyve really has on a host.

pub mod agent;
pub mod intents;
pub mod source;

// The crates below the runtime, under the paths they had when they were modules here.
pub use flotilla_atomic as atomic;
pub use flotilla_core::{
    actual, capacity, conf, control, desired, names, owner, planner, render, size,
};
pub use flotilla_protocol::{auth, message, placement};
pub use flotilla_vm_bhyve as backend;

#[cfg(test)]
mod hop_chain;
