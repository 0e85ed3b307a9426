//! `power-cut-after-writes=N[,power-cut-seed=SEED]`: a disk with a volatile
//! write cache that loses power right after the guest's N-th write request
//! (OUT, WRITE_ZEROES or DISCARD) that completed with status OK.
//!
//! The cache is write-back: a write is kept here, in order, and reads see it;
//! a good FLUSH writes the cache to the disk below in order and then flushes
//! that disk. At the cut, every write since the last good flush is dropped,
//! or, with a seed, each whole write request is kept or dropped in order by a
//! seeded generator; the kept ones are written below and flushed. The disk
//! below therefore only ever sees ordinary writes and flushes, so an add-cow
//! image stays valid and its backing file untouched, whatever is dropped.
//!
//! Memory is bounded: at most [`MAX_CACHED_BYTES`] of data and
//! [`MAX_CACHED_WRITES`] writes are held. A write that would pass either bound
//! first writes the whole cache to the disk below (without a flush), as a real
//! disk's cache does under pressure: those writes may then survive the cut.
//! A flush that fails below (a host error) may likewise have written part of
//! the cache. A flush failed above this layer (`fail-flush-after`) never
//! reaches it, so the cache keeps everything since the last good flush.
//!
//! After the cut the disk has no power: every call fails, every request is
//! [`Fate::Lost`] (it never completes), and a flush does nothing.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::virtio::block::backend::{BackendError, DiskBackend, Fate, Op, Served, Status};

/// Most data bytes the cache holds.
pub const MAX_CACHED_BYTES: usize = 64 << 20;
/// Most writes (data or zeroes) the cache holds.
pub const MAX_CACHED_WRITES: usize = 16 << 10;

/// When the power goes, and what survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerCutPlan {
    /// The cut follows the N-th write request that completed OK (N >= 1).
    pub after_writes: u64,
    /// Without a seed every unflushed write is lost; with one, each is kept
    /// or lost by a generator seeded with it.
    pub seed: Option<u64>,
}

/// Called once at the cut with the number of writes counted.
pub type OnCut = Box<dyn Fn(u64) + Send + Sync>;

/// A disk with a volatile write cache that loses power.
pub struct PowerCut {
    inner: Box<dyn DiskBackend>,
    plan: PowerCutPlan,
    on_cut: OnCut,
    state: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Writes since the last good flush, oldest first.
    pending: Vec<Pending>,
    /// Data bytes in `pending`.
    bytes: usize,
    /// Number of the request being served (tags its writes).
    request: u64,
    /// Write requests completed OK.
    writes: u64,
    /// The power is gone.
    cut: bool,
}

struct Pending {
    request: u64,
    offset: u64,
    data: Data,
}

enum Data {
    Bytes(Vec<u8>),
    Zeroes {
        len: u64,
        unmap: bool,
    },
    /// Advisory: reads of the range are unspecified until it reaches the
    /// disk below, so the cache lays nothing over them.
    Discard(u64),
}

impl Pending {
    fn len(&self) -> u64 {
        match &self.data {
            Data::Bytes(bytes) => bytes.len() as u64,
            Data::Zeroes { len, .. } | Data::Discard(len) => *len,
        }
    }

    fn apply(&self, disk: &dyn DiskBackend) -> Result<(), BackendError> {
        match &self.data {
            Data::Bytes(bytes) => disk.write_at(bytes, self.offset),
            Data::Zeroes { len, unmap } => disk.write_zeroes(self.offset, *len, *unmap),
            Data::Discard(len) => disk.discard(self.offset, *len),
        }
    }

    /// Lays this write over `buf`, which holds the disk from `offset`.
    fn overlay(&self, buf: &mut [u8], offset: u64) {
        let start = self.offset.max(offset);
        let end = (self.offset + self.len()).min(offset + buf.len() as u64);
        if start >= end {
            return;
        }
        let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
        match &self.data {
            Data::Bytes(bytes) => dst.copy_from_slice(
                &bytes[(start - self.offset) as usize..(end - self.offset) as usize],
            ),
            Data::Zeroes { .. } => dst.fill(0),
            Data::Discard(_) => {}
        }
    }
}

fn no_power() -> BackendError {
    "the disk has lost power (power-cut-after-writes)".into()
}

impl PowerCut {
    /// `inner` behind a cache that loses power as `plan` says; `on_cut` is
    /// told when it does.
    pub fn new(inner: Box<dyn DiskBackend>, plan: PowerCutPlan, on_cut: OnCut) -> Self {
        PowerCut {
            inner,
            plan,
            on_cut,
            state: Mutex::new(Cache::default()),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the cache below, oldest first; what was written leaves it.
    fn write_back(&self, cache: &mut Cache) -> Result<(), BackendError> {
        let mut done = 0;
        let result = cache.pending.iter().try_for_each(|p| {
            p.apply(self.inner.as_ref())?;
            done += 1;
            Ok(())
        });
        for p in cache.pending.drain(..done) {
            if let Data::Bytes(bytes) = &p.data {
                cache.bytes -= bytes.len();
            }
        }
        result
    }

    /// Keeps a write of `len` bytes at `offset` in the cache.
    fn store(&self, offset: u64, data: Data) -> Result<(), BackendError> {
        let mut cache = self.cache();
        if cache.cut {
            return Err(no_power());
        }
        let pending = Pending {
            request: cache.request,
            offset,
            data,
        };
        if offset
            .checked_add(pending.len())
            .is_none_or(|end| end > self.inner.size())
        {
            return Err(format!(
                "{} bytes at {offset} are past the end of the disk",
                pending.len()
            )
            .into());
        }
        let bytes = match &pending.data {
            Data::Bytes(b) => b.len(),
            Data::Zeroes { .. } | Data::Discard(_) => 0,
        };
        if cache.bytes + bytes > MAX_CACHED_BYTES || cache.pending.len() >= MAX_CACHED_WRITES {
            self.write_back(&mut cache)?;
        }
        if bytes > MAX_CACHED_BYTES {
            // Larger than the whole cache: it goes straight through.
            return pending.apply(self.inner.as_ref());
        }
        cache.bytes += bytes;
        cache.pending.push(pending);
        Ok(())
    }

    /// The cut: the surviving writes go below and are flushed; then the
    /// power is gone for good.
    fn cut(&self, cache: &mut Cache) {
        let mut rng = self.plan.seed.map(SplitMix64::new);
        let mut request = None;
        let mut keep = false;
        let pending = std::mem::take(&mut cache.pending);
        cache.bytes = 0;
        let kept = pending.into_iter().filter(|p| {
            // One choice per write request: its pieces share its fate.
            if request != Some(p.request) {
                request = Some(p.request);
                keep = rng.as_mut().is_some_and(|rng| rng.next() >> 63 == 1);
            }
            keep
        });
        let mut result = Ok(());
        for p in kept {
            result = result.and_then(|()| p.apply(self.inner.as_ref()));
        }
        if let Err(e) = result.and_then(|()| self.inner.flush()) {
            eprintln!("vmm: power cut: writing the surviving writes failed: {e}");
        }
        cache.cut = true;
        (self.on_cut)(cache.writes);
    }
}

impl DiskBackend for PowerCut {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let cache = self.cache();
        if cache.cut {
            return Err(no_power());
        }
        self.inner.read_at(buf, offset)?;
        for p in &cache.pending {
            p.overlay(buf, offset);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.store(offset, Data::Bytes(buf.to_vec()))
    }
    fn flush(&self) -> Result<(), BackendError> {
        let mut cache = self.cache();
        if cache.cut {
            // Nothing is left to make durable.
            return Ok(());
        }
        self.write_back(&mut cache)?;
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.store(offset, Data::Zeroes { len, unmap })
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.store(offset, Data::Discard(len))
    }
    fn discard_alignment(&self) -> u64 {
        self.inner.discard_alignment()
    }
    fn admit(&self, op: Op, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.cache().cut {
            return Err(no_power());
        }
        self.inner.admit(op, offset, len)
    }
    fn served(&self, request: &Served) -> Fate {
        let below = self.inner.served(request);
        let mut cache = self.cache();
        if cache.cut {
            return Fate::Lost;
        }
        let current = cache.request;
        cache.request += 1;
        if request.op.writes() && request.status != Status::Ok {
            // A failed write changes nothing: its cached pieces go.
            let mut freed = 0;
            cache.pending.retain(|p| {
                let keep = p.request != current;
                if let (false, Data::Bytes(bytes)) = (keep, &p.data) {
                    freed += bytes.len();
                }
                keep
            });
            cache.bytes -= freed;
        }
        if request.op.writes() && request.status == Status::Ok {
            cache.writes += 1;
            if cache.writes == self.plan.after_writes {
                self.cut(&mut cache);
                return Fate::CompletesThenPowerCut;
            }
        }
        below
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): fixed here rather than taken
/// from a crate, because the same seed must give the same disk in every
/// version of this program.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::virtio::block::lab::tests::{served, Shared};
    use crate::virtio::block::request::tests::MemDisk;

    const SIZE: usize = 64 << 10;

    fn layer(after_writes: u64, seed: Option<u64>) -> (PowerCut, Arc<MemDisk>, Arc<AtomicU64>) {
        let (below, mem) = Shared::disk(SIZE);
        let cuts = Arc::new(AtomicU64::new(0));
        let seen = cuts.clone();
        let on_cut = Box::new(move |n| {
            seen.fetch_add(1, Ordering::SeqCst);
            assert!(n > 0);
        });
        let plan = PowerCutPlan { after_writes, seed };
        (PowerCut::new(below, plan, on_cut), mem, cuts)
    }

    fn bytes(mem: &MemDisk) -> Vec<u8> {
        mem.bytes.lock().expect("lock").clone()
    }

    /// One guest write request of `data` at `offset`, completed OK.
    fn write(disk: &PowerCut, offset: u64, data: &[u8]) -> Fate {
        disk.write_at(data, offset).expect("write");
        disk.served(&served(
            Op::Write,
            offset / 512,
            data.len() as u64 / 512,
            true,
        ))
    }

    #[test]
    fn unflushed_writes_are_lost_and_flushed_ones_kept() -> Result<(), BackendError> {
        let (disk, mem, cuts) = layer(3, None);
        let before = bytes(&mem);
        assert_eq!(write(&disk, 0, &[1; 512]), Fate::Completes);
        // Nothing reaches the disk below before a flush, but reads see it.
        assert!(bytes(&mem) == before);
        let mut buf = [0u8; 1024];
        disk.read_at(&mut buf, 0)?;
        assert_eq!(&buf[..512], &[1; 512]);
        assert_eq!(&buf[512..], &before[512..1024]);
        disk.flush()?;
        assert_eq!(mem.flushes.load(Ordering::SeqCst), 1);
        assert_eq!(&bytes(&mem)[..512], &[1; 512]);
        // Two writes after the flush, the second overlapping the first.
        assert_eq!(write(&disk, 256, &[2; 1024]), Fate::Completes);
        assert_eq!(cuts.load(Ordering::SeqCst), 0);
        disk.write_zeroes(512, 512, false)?;
        let third = disk.served(&served(Op::WriteZeroes, 1, 1, true));
        assert_eq!(third, Fate::CompletesThenPowerCut);
        assert_eq!(cuts.load(Ordering::SeqCst), 1);
        let mut model = before;
        model[..512].fill(1);
        assert!(bytes(&mem) == model, "only the flushed write survives");
        // No power: every call fails, nothing completes, flush is a no-op.
        assert!(disk.read_at(&mut buf, 0).is_err());
        assert!(disk.write_at(&buf, 0).is_err());
        assert!(disk.write_zeroes(0, 512, false).is_err());
        assert!(disk.admit(Op::Read, 0, 512).is_err());
        assert_eq!(disk.served(&served(Op::Read, 0, 1, true)), Fate::Lost);
        assert!(disk.flush().is_ok());
        assert!(bytes(&mem) == model);
        assert_eq!(cuts.load(Ordering::SeqCst), 1);
        Ok(())
    }

    #[test]
    fn failed_and_non_write_requests_are_not_counted() -> Result<(), BackendError> {
        let (disk, mem, cuts) = layer(1, None);
        let before = bytes(&mem);
        // A write request whose second piece failed above: its first piece
        // is dropped with it, and it does not count.
        disk.write_at(&[5; 512], 0)?;
        assert_eq!(
            disk.served(&served(Op::Write, 0, 2, false)),
            Fate::Completes
        );
        for op in [Op::Read, Op::Flush, Op::GetId, Op::Unsupported] {
            assert_eq!(disk.served(&served(op, 0, 0, true)), Fate::Completes);
        }
        disk.flush()?;
        assert!(bytes(&mem) == before, "the failed write left nothing");
        assert_eq!(cuts.load(Ordering::SeqCst), 0);
        assert_eq!(
            disk.served(&served(Op::Discard, 0, 0, true)),
            Fate::CompletesThenPowerCut
        );
        Ok(())
    }

    #[test]
    fn a_failing_flush_below_is_reported() -> Result<(), BackendError> {
        let (disk, mem, _) = layer(10, None);
        write(&disk, 0, &[1; 512]);
        mem.fail.store(true, Ordering::SeqCst);
        assert!(disk.flush().is_err());
        mem.fail.store(false, Ordering::SeqCst);
        // The next good flush makes it durable.
        disk.flush()?;
        assert_eq!(&bytes(&mem)[..512], &[1; 512]);
        Ok(())
    }

    #[test]
    fn the_cache_is_bounded() -> Result<(), BackendError> {
        let (disk, mem, _) = layer(u64::MAX, None);
        for i in 0..MAX_CACHED_WRITES {
            disk.write_at(&[7; 512], (i % 64) as u64 * 512)?;
        }
        assert_eq!(
            &bytes(&mem)[..512],
            &MemDisk::new(SIZE).bytes.lock().expect("lock")[..512]
        );
        // One more: the whole cache goes below, without a flush.
        disk.write_at(&[8; 512], 0)?;
        assert_eq!(&bytes(&mem)[512..1024], &[7; 512]);
        assert_eq!(mem.flushes.load(Ordering::SeqCst), 0);
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, 0)?;
        assert_eq!(buf, [8; 512]);
        // Past the end is refused, not cached.
        assert!(disk.write_at(&[1; 512], SIZE as u64 - 256).is_err());
        assert!(disk.write_zeroes(u64::MAX, 2, false).is_err());
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write {
            offset: u64,
            len: u64,
            pieces: u8,
            fill: u8,
        },
        Zeroes {
            offset: u64,
            len: u64,
        },
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..60, 1u64..8, 1u8..3, any::<u8>()).prop_map(|(s, n, pieces, fill)| Step::Write {
                offset: s * 512, len: n * 512, pieces, fill
            }),
            1 => (0u64..60, 1u64..8).prop_map(|(s, n)| Step::Zeroes { offset: s * 512, len: n * 512 }),
            1 => Just(Step::Flush),
        ]
    }

    /// Applies one request (all its pieces) to a model.
    fn apply(model: &mut [u8], step: &Step) {
        match *step {
            Step::Write {
                offset, len, fill, ..
            } => model[offset as usize..(offset + len) as usize].fill(fill),
            Step::Zeroes { offset, len } => model[offset as usize..(offset + len) as usize].fill(0),
            Step::Flush => {}
        }
    }

    proptest! {
        /// Random overlapping writes, zeroings and flushes, then the cut:
        /// reads always see every write; after the cut the disk is the
        /// flushed state plus, in order, exactly the requests the seed keeps
        /// (each whole); the same seed gives the same disk.
        #[test]
        fn the_disk_after_a_cut_is_the_flushed_state_plus_whole_kept_writes(
            steps in proptest::collection::vec(step(), 1..40),
            seed in proptest::option::of(any::<u64>()),
        ) {
            let writes = steps.iter().filter(|s| !matches!(s, Step::Flush)).count() as u64;
            prop_assume!(writes > 0);
            let mut disks = Vec::new();
            for _ in 0..2 {
                let (disk, mem, cuts) = layer(writes, seed);
                let mut model = bytes(&mem);
                let mut flushed = model.clone();
                let mut since_flush = Vec::new();
                for s in &steps {
                    let fate = match *s {
                        Step::Write { offset, len, pieces, fill } => {
                            // A request staged in pieces, as the request path does.
                            let half = if pieces == 2 { (len / 1024) * 512 } else { len };
                            disk.write_at(&vec![fill; half as usize], offset).expect("write");
                            if half < len {
                                disk.write_at(&vec![fill; (len - half) as usize], offset + half).expect("write");
                            }
                            disk.served(&served(Op::Write, offset / 512, len / 512, true))
                        }
                        Step::Zeroes { offset, len } => {
                            disk.write_zeroes(offset, len, false).expect("zeroes");
                            disk.served(&served(Op::Discard, offset / 512, len / 512, true))
                        }
                        Step::Flush => {
                            disk.flush().expect("flush");
                            flushed = model.clone();
                            since_flush.clear();
                            Fate::Completes
                        }
                    };
                    if !matches!(s, Step::Flush) {
                        apply(&mut model, s);
                        since_flush.push(s.clone());
                    }
                    if fate == Fate::CompletesThenPowerCut {
                        break;
                    }
                    let mut seen = vec![0u8; SIZE];
                    disk.read_at(&mut seen, 0).expect("read");
                    prop_assert!(seen == model, "reads see every write");
                }
                prop_assert_eq!(cuts.load(Ordering::SeqCst), 1);
                // The expected disk: the same generator, one draw per request.
                let mut expected = flushed;
                let mut rng = seed.map(SplitMix64::new);
                for s in &since_flush {
                    if rng.as_mut().is_some_and(|r| r.next() >> 63 == 1) {
                        apply(&mut expected, s);
                    }
                }
                let got = bytes(&mem);
                prop_assert!(got == expected);
                disks.push(got);
            }
            prop_assert!(disks[0] == disks[1], "same seed, same disk");
        }
    }

    #[test]
    fn the_generator_is_splitmix64() {
        // The reference implementation's first outputs for seed 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn a_seed_keeps_some_writes_and_drops_others() {
        let (disk, mem, _) = layer(64, Some(42));
        for i in 0..64u64 {
            write(&disk, i * 512, &[0xa5; 512]);
        }
        let got = bytes(&mem);
        let kept = (0..64)
            .filter(|i| got[i * 512..(i + 1) * 512] == [0xa5; 512])
            .count();
        assert!(kept > 8 && kept < 56, "{kept} of 64 kept");
    }
}
