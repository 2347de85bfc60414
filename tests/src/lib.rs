//! End-to-end tests of flotilla across processes. The cluster they run on is
//! [`flotilla::lab`], shared with `flotilla demo` and the cluster benchmark.

pub use flotilla::lab::*;
