//! End-to-end tests of flotilla across processes. The cluster they run on is
//! [`flotilla_lab::lab`], shared with `flotilla-demo` (`scripts/demo`) and the cluster
//! benchmark.

pub use flotilla_lab::lab::*;
