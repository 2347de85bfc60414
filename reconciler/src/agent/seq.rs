//! The inventory sequence: a number that orders one host's inventories without its clock.
//!
//! Each host numbers its inventories; a result carries the number current when it was
//! sent, after the job's work, so an owner tells "listed after the build" from
//! "listed before" by comparing numbers, whatever the two hosts' clocks say (issue 14,
//! case 4). The number is `generation << 32 | count`: the generation, kept in the state
//! directory, grows by one at every start, so the numbers never go back across restarts
//! while the counter itself lives in memory.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The file in the state directory holding the last generation.
pub const GENERATION_FILE: &str = "inventory-generation";

/// One host's inventory numbers.
#[derive(Debug)]
pub struct InventorySeq {
    generation: u64,
    count: AtomicU64,
}

impl InventorySeq {
    /// Starts a new generation in `state_dir` (one past the last one recorded there),
    /// durably, before any number of it is given out.
    pub fn open(state_dir: &Path) -> std::io::Result<InventorySeq> {
        let path = state_dir.join(GENERATION_FILE);
        let last = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a generation number: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        // A generation past 32 bits would overflow into nothing sensible; 4 billion
        // restarts do not happen.
        let generation = last.saturating_add(1).min(u64::from(u32::MAX));
        crate::atomic::write(&path, format!("{generation}\n").as_bytes())?;
        Ok(InventorySeq {
            generation,
            count: AtomicU64::new(0),
        })
    }

    /// The number for an inventory about to be listed: greater than every number given
    /// out or read by [`InventorySeq::current`] before.
    pub fn next(&self) -> u64 {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        (self.generation << 32) | (n & u64::from(u32::MAX))
    }

    /// The last number given out (or the generation's start): what a result carries.
    pub fn current(&self) -> u64 {
        let n = self.count.load(Ordering::SeqCst);
        (self.generation << 32) | (n & u64::from(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards issue 14, case 4: an owner orders a builder's inventories against a result
    /// by these numbers, so they must grow across restarts of the builder's agent.
    #[test]
    fn numbers_grow_and_never_go_back_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = InventorySeq::open(dir.path()).unwrap();
        let at_result = first.current();
        let a = first.next();
        assert!(a > at_result);
        assert!(first.next() > a);
        assert_eq!(first.current(), a + 1);
        let last = first.current();
        let again = InventorySeq::open(dir.path()).unwrap();
        assert!(again.current() > last);
        assert!(again.next() > last);
    }

    #[test]
    fn an_unreadable_generation_is_an_error_not_a_restart_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(GENERATION_FILE), "x").unwrap();
        assert!(InventorySeq::open(dir.path()).is_err());
    }
}
