//! flotilla's pure core: the desired state and the rules over it, with no I/O and no
//! clock (no tokio, git2, notify or beanstalk below this crate; CI checks it).
//!
//! - [`desired`]: loading and checking the desired repo's files into a [`desired::Snapshot`];
//! - [`planner`]: the plan from desired and actual state; [`render`]: showing it;
//! - [`owner`]: rendezvous ownership; [`capacity`]: limits and what fits;
//! - [`actual`]: what vm-bhyve has on a host; [`size`]: sizes in vm-bhyve's notation;
//! - [`conf`]: vm-bhyve's conf files; [`names`]: the VM-name rule;
//! - [`control`]: the operator's verbs (retry, drain, suspend, import) and what they leave set.

pub mod actual;
pub mod capacity;
pub mod conf;
pub mod control;
pub mod desired;
pub mod names;
pub mod owner;
pub mod planner;
pub mod render;
pub mod size;
