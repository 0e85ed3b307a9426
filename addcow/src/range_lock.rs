//! Locks over ranges of clusters: a copy-on-write, a zeroing or a stream of
//! some clusters excludes every other one that touches the same clusters,
//! and nothing else. Reads and rewrites of allocated clusters take no range
//! lock at all; the bitmap's own lock is only held to look up or set bits,
//! never across I/O.

use std::sync::{Condvar, Mutex, PoisonError};

/// The ranges `[start, end)` held now.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// A held range; released when dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(at);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn disjoint_ranges_do_not_wait_and_overlapping_ones_do() {
        let locks = RangeLocks::default();
        let first = locks.lock(0, 4);
        // Touching at the edge is no overlap.
        let _next = locks.lock(4, 8);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _g = locks.lock(3, 5);
                tx.send(()).expect("send");
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(200)).is_err(),
                "an overlapping range waits"
            );
            drop(first);
            // [3, 5) still overlaps [4, 8): it waits on.
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
            drop(_next);
            assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        assert!(locks.held.lock().expect("lock").is_empty());
    }
}
