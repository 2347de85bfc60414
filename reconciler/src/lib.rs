//! flotilla: a GitOps reconciler for FreeBSD bhyve virtual machines spread over several
//! hosts.
//!
//! The crate is laid out by concept; each module owns one:
//! - [`size`]: byte sizes in vm-bhyve's notation;
//! - [`actual`]: what vm-bhyve really has on a host.

pub mod actual;
pub mod agent;
pub mod atomic;
pub mod auth;
pub mod backend;
pub mod capacity;
pub mod conf;
pub mod control;
pub mod desired;
pub mod intents;
pub mod message;
pub mod names;
pub mod owner;
pub mod placement;
pub mod planner;
pub mod render;
pub mod size;
pub mod source;
