//! `fail-read=S:N`, `fail-write=S:N`, `fail-flush-after=K`: injected I/O
//! errors; `flush-delay-ms=MS`: a disk whose cache flush is slow.
//!
//! A request that touches a failing range is refused whole when the request
//! path admits its range, before any of its data moves, so it completes with
//! VIRTIO_BLK_S_IOERR and changes nothing; reads and writes elsewhere are
//! served. The data calls check again, so the layer holds on its own too.
//! After K good FLUSH requests every FLUSH request is refused when admitted,
//! without reaching the disk below: a power-cut layer there keeps everything
//! written since the last good one. (The VMM's own flush as the VM stops is
//! not a FLUSH request: it goes through.) With a flush delay, every FLUSH
//! request waits that long when admitted, as a disk with a large volatile
//! cache does; it holds up the requests queued behind it on its disk, and
//! nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use addcow::{IoBufs, IoBufsMut};

use crate::virtio::block::backend::{BackendError, DiskBackend, Fate, Op, Served};
use crate::virtio::block::request::SECTOR_SIZE;

/// Sectors `[start, start + count)`, 512 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub start: u64,
    /// Number of sectors (at least 1).
    pub count: u64,
}

impl SectorRange {
    /// Whether `len` bytes at byte `offset` touch this range.
    pub fn touches(&self, offset: u64, len: u64) -> bool {
        let sector = u128::from(SECTOR_SIZE);
        let (start, end) = (
            u128::from(self.start) * sector,
            (u128::from(self.start) + u128::from(self.count)) * sector,
        );
        let (offset, len) = (u128::from(offset), u128::from(len));
        len > 0 && offset < end && start < offset + len
    }
}

/// Which requests fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Reads touching any of these fail.
    pub fail_read: Vec<SectorRange>,
    /// Writes, write-zeroes and discards touching any of these fail.
    pub fail_write: Vec<SectorRange>,
    /// FLUSH requests after this many good ones fail.
    pub fail_flush_after: Option<u64>,
    /// Every FLUSH request waits this long before it is served.
    pub flush_delay: Option<Duration>,
}

impl FaultPlan {
    /// Whether the plan injects anything at all.
    pub fn is_empty(&self) -> bool {
        self.fail_read.is_empty()
            && self.fail_write.is_empty()
            && self.fail_flush_after.is_none()
            && self.flush_delay.is_none()
    }
}

/// A disk with injected errors.
pub struct Faults {
    inner: Box<dyn DiskBackend>,
    plan: FaultPlan,
    /// FLUSH requests admitted or refused so far.
    flushes: AtomicU64,
}

impl Faults {
    /// `inner` failing as `plan` says.
    pub fn new(inner: Box<dyn DiskBackend>, plan: FaultPlan) -> Self {
        Faults {
            inner,
            plan,
            flushes: AtomicU64::new(0),
        }
    }

    fn check(&self, writes: bool, offset: u64, len: u64) -> Result<(), BackendError> {
        let (ranges, what, option) = if writes {
            (&self.plan.fail_write, "write", "fail-write")
        } else {
            (&self.plan.fail_read, "read", "fail-read")
        };
        match ranges.iter().find(|r| r.touches(offset, len)) {
            Some(r) => Err(format!(
                "injected error: {what} of {len} bytes at {offset} touches {option}={}:{}",
                r.start, r.count
            )
            .into()),
            None => Ok(()),
        }
    }
}

impl DiskBackend for Faults {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.check(false, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.check(true, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<(), BackendError> {
        self.check(false, offset, bufs.len() as u64)?;
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<(), BackendError> {
        self.check(true, offset, bufs.len() as u64)?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.check(true, offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check(true, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn discard_alignment(&self) -> u64 {
        self.inner.discard_alignment()
    }
    fn admit(&self, op: Op, offset: u64, len: u64) -> Result<(), BackendError> {
        if op == Op::Flush {
            let earlier = self.flushes.fetch_add(1, Ordering::SeqCst);
            if let Some(good) = self.plan.fail_flush_after.filter(|&good| earlier >= good) {
                return Err(format!("injected error: flush after fail-flush-after={good}").into());
            }
            if let Some(delay) = self.plan.flush_delay {
                std::thread::sleep(delay);
            }
        } else {
            self.check(op.writes(), offset, len)?;
        }
        self.inner.admit(op, offset, len)
    }
    fn served(&self, request: &Served) -> Fate {
        self.inner.served(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::lab::tests::Shared;

    fn layer(
        plan: FaultPlan,
    ) -> (
        Faults,
        std::sync::Arc<crate::virtio::block::request::tests::MemDisk>,
    ) {
        let (below, mem) = Shared::disk(64 * 512);
        (Faults::new(below, plan), mem)
    }

    #[test]
    fn a_range_touches_exactly_its_sectors() {
        let r = SectorRange { start: 2, count: 3 };
        assert!(!r.touches(0, 1024));
        assert!(r.touches(0, 1025));
        assert!(r.touches(5 * 512 - 1, 1));
        assert!(!r.touches(5 * 512, 4096));
        assert!(!r.touches(1024, 0));
        // Sector numbers past any byte offset neither overflow nor match.
        let top = SectorRange {
            start: u64::MAX - 1,
            count: 1,
        };
        assert!(!top.touches(u64::MAX - 512, 512));
        let last = SectorRange {
            start: u64::MAX / 512,
            count: 1,
        };
        assert!(last.touches(u64::MAX - 1, 1));
    }

    #[test]
    fn reads_and_writes_touching_a_range_fail_and_change_nothing() {
        let plan = FaultPlan {
            fail_read: vec![SectorRange { start: 4, count: 1 }],
            fail_write: vec![
                SectorRange { start: 8, count: 2 },
                SectorRange {
                    start: 20,
                    count: 1,
                },
            ],
            fail_flush_after: None,
            flush_delay: None,
        };
        let (disk, mem) = layer(plan);
        let before = mem.bytes.lock().expect("lock").clone();
        let mut buf = [0u8; 1024];
        assert!(disk.read_at(&mut buf, 3 * 512).is_err());
        assert!(disk.admit(Op::Read, 4 * 512, 512).is_err());
        assert!(disk.read_at(&mut buf, 5 * 512).is_ok());
        // Writes may read the failing read range, and the reverse.
        assert!(disk.admit(Op::Write, 4 * 512, 512).is_ok());
        assert!(disk.admit(Op::Read, 8 * 512, 512).is_ok());
        for op in [Op::Write, Op::Discard, Op::WriteZeroes] {
            assert!(disk.admit(op, 19 * 512, 1024).is_err(), "{op:?}");
            assert!(disk.admit(op, 10 * 512, 512).is_ok(), "{op:?}");
        }
        assert!(disk.write_at(&[1; 512], 9 * 512).is_err());
        assert!(disk.write_zeroes(0, 64 * 512, false).is_err());
        assert!(*mem.bytes.lock().expect("lock") == before);
        assert!(disk.write_at(&[1; 512], 10 * 512).is_ok());
        assert!(disk.write_zeroes(0, 8 * 512, false).is_ok());
    }

    #[test]
    fn flush_requests_fail_after_k_and_reach_nothing() {
        let plan = FaultPlan {
            fail_flush_after: Some(2),
            ..FaultPlan::default()
        };
        let (disk, mem) = layer(plan);
        let flush = |disk: &Faults| disk.admit(Op::Flush, 0, 0).and_then(|()| disk.flush());
        assert!(flush(&disk).is_ok());
        assert!(flush(&disk).is_ok());
        for _ in 0..3 {
            assert!(flush(&disk).is_err());
        }
        use std::sync::atomic::Ordering;
        assert_eq!(mem.flushes.load(Ordering::SeqCst), 2);
        // The VMM's own flush as the VM stops still reaches the disk.
        assert!(disk.flush().is_ok());
        assert_eq!(mem.flushes.load(Ordering::SeqCst), 3);
        let none = FaultPlan::default();
        assert!(none.is_empty());
    }

    #[test]
    fn a_flush_delay_holds_up_flush_requests_only() {
        let delay = std::time::Duration::from_millis(300);
        let plan = FaultPlan {
            flush_delay: Some(delay),
            ..FaultPlan::default()
        };
        assert!(!plan.is_empty());
        let (disk, mem) = layer(plan);
        let started = std::time::Instant::now();
        assert!(disk.admit(Op::Write, 0, 512).is_ok());
        assert!(disk.write_at(&[7; 512], 0).is_ok());
        assert!(started.elapsed() < delay, "a write is not delayed");
        let started = std::time::Instant::now();
        assert!(disk.admit(Op::Flush, 0, 0).is_ok());
        assert!(started.elapsed() >= delay, "a FLUSH request waits");
        assert!(disk.flush().is_ok());
        assert_eq!(mem.bytes.lock().expect("lock")[..512], [7; 512]);
    }
}
