//! Network namespaces are Linux's (`ip netns`); elsewhere the lab has none, and this
//! stands in for [`super::netns`] so the lab still builds and runs its unisolated tests.
//! [`Netns`] has no values here, so no code path can reach a cut or a heal.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::Command;

const WHY: &str = "network namespaces need Linux (ip netns)";

/// Always `Err`: network namespaces need Linux.
pub fn netns_check() -> Result<(), String> {
    Err(WHY.into())
}

/// Always `false` (see [`netns_check`]).
pub fn netns_available() -> bool {
    false
}

/// A network namespace: none exist outside Linux.
#[derive(Debug)]
pub enum Netns {}

impl Netns {
    /// Always `Err` (see [`netns_check`]).
    pub fn create() -> Result<Netns, String> {
        Err(WHY.into())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        match *self {}
    }

    /// The address of the namespace's end of the pair.
    pub fn addr(&self) -> Ipv4Addr {
        match *self {}
    }

    /// The address of this namespace's end of the pair.
    pub fn root_addr(&self) -> Ipv4Addr {
        match *self {}
    }

    /// The prefix that runs a program inside.
    pub fn exec_prefix(&self) -> Vec<OsString> {
        match *self {}
    }

    /// A command that runs `program` inside.
    pub fn command(&self, _program: impl AsRef<std::ffi::OsStr>) -> Command {
        match *self {}
    }

    /// Cuts the namespace off the network.
    pub fn cut(&self) -> Result<(), String> {
        match *self {}
    }

    /// Joins the namespace again.
    pub fn heal(&self) -> Result<(), String> {
        match *self {}
    }
}
