//! Crash consistency, by fault injection under the library.
//!
//! `CrashStorage` implements the library's `Storage` seam in memory, page by
//! page, as a page cache over a disk: each file has its bytes now and its
//! durable bytes, and every page written since the file's last sync keeps
//! each state it went through. A workload of random writes, zeroings, flushes
//! and streams runs once to count its storage operations (writes, zeroings,
//! syncs), then once more for every count k, with the world stopping at
//! operation k + 1: that operation and every later one fail. At the crash,
//! each unsynced page of each file independently keeps its durable state or
//! any state it had since (seeded): the page cache may have written back any
//! subset of the writes, in any order, to any file. The files are then
//! reopened from those bytes and checked:
//!
//! - the header is valid and the image opens;
//! - every cluster reads either its contents as of the last completed flush
//!   or a version written after it, never anything else (in particular never
//!   backing data mixed with garbage);
//! - every bit set on disk covers a durable cluster holding such a version;
//! - no file of the backing chain was ever written.
//!
//! The workloads come in four kinds: a raw backing file; a raw backing file
//! and one injected image sync failure that drops the unsynced data, as
//! Linux does, followed by syncs that succeed; an add-cow backing file
//! (itself over a raw one) smaller than the top; and a disk whose bitmap has
//! three or more write-back chunks, so that a crash falls between chunk
//! writes. A last test has threads write, read and flush the same
//! unallocated clusters at once and checks the result against a model.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use addcow::header::Header;
use addcow::{Access, AddCow, Backing, BackingFormat, BackingRef, Storage};

const CLUSTER_BITS: u32 = 12;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// A page of the simulated page cache: it reaches the disk whole or not at all.
const PAGE: u64 = 4096;
/// Clusters one 4 KiB chunk of bitmap covers.
const CHUNK_CLUSTERS: u64 = 4096 * 8;

/// The contents of every never-written page of a file (the patterns repeat
/// every 256 bytes, so every page is the same).
type Fill = Arc<Vec<u8>>;

fn fill(f: impl Fn(u64) -> u8) -> Fill {
    Arc::new((0..PAGE).map(f).collect())
}

/// Sparse bytes: the pages written so far over generated contents.
#[derive(Clone)]
struct Pages {
    len: u64,
    /// Bytes below `fill_len` not in `pages` are `fill[offset % PAGE]`; above, zeros.
    fill: Fill,
    fill_len: u64,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Pages {
    fn new(len: u64, fill: Fill) -> Self {
        Pages::with_fill(len, fill, len)
    }

    fn with_fill(len: u64, fill: Fill, fill_len: u64) -> Self {
        Pages {
            len,
            fill,
            fill_len,
            pages: BTreeMap::new(),
        }
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut pages = Pages::new(0, fill(|_| 0));
        pages.write(bytes, 0);
        pages
    }

    fn page(&self, p: u64) -> Vec<u8> {
        if let Some(page) = self.pages.get(&p) {
            return page.clone();
        }
        let mut page = self.fill.as_ref().clone();
        let keep = self.fill_len.saturating_sub(p * PAGE).min(PAGE) as usize;
        page[keep..].fill(0);
        page
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (p, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            match self.pages.get(&p) {
                Some(page) => buf[done..done + n].copy_from_slice(&page[within..within + n]),
                None => {
                    let keep = self.fill_len.saturating_sub(at).min(n as u64) as usize;
                    buf[done..done + keep].copy_from_slice(&self.fill[within..within + keep]);
                    buf[done + keep..done + n].fill(0);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn to_vec(&self, start: u64, end: u64) -> Vec<u8> {
        let mut buf = vec![0u8; (end - start) as usize];
        self.read(&mut buf, start).expect("in range");
        buf
    }

    /// Applies `f` to `len` bytes at `offset`; returns the pages touched.
    fn mutate(&mut self, offset: u64, len: u64, mut f: impl FnMut(u64) -> u8) -> Vec<u64> {
        let end = offset + len;
        self.len = self.len.max(end);
        let mut touched = Vec::new();
        if len == 0 {
            return touched;
        }
        for p in offset / PAGE..=(end - 1) / PAGE {
            let mut page = self.page(p);
            let from = offset.max(p * PAGE);
            let to = end.min((p + 1) * PAGE);
            for o in from..to {
                page[(o - p * PAGE) as usize] = f(o);
            }
            self.pages.insert(p, page);
            touched.push(p);
        }
        touched
    }

    fn write(&mut self, data: &[u8], offset: u64) -> Vec<u64> {
        self.mutate(offset, data.len() as u64, |o| data[(o - offset) as usize])
    }
}

/// A file's bytes now, as durable, and every state of each unsynced page.
struct FileState {
    current: Pages,
    durable: Pages,
    unsynced: BTreeMap<u64, Vec<Vec<u8>>>,
    writes: u64,
}

/// The operations so far, when the world stops, and which sync fails.
#[derive(Debug, Default)]
struct World {
    ops: u64,
    crash_after: Option<u64>,
    crashed: bool,
    /// The operation (a sync) that fails once, dropping the unsynced pages.
    fail_sync_at: Option<u64>,
    /// Operation numbers of the syncs of the image file, in order.
    image_syncs: Vec<u64>,
}

#[derive(Clone)]
struct CrashStorage {
    file: Arc<Mutex<FileState>>,
    world: Arc<Mutex<World>>,
    is_image: bool,
}

impl std::fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashStorage")
    }
}

fn stopped() -> io::Error {
    io::Error::other("the world stopped (injected crash)")
}

/// xorshift64*: a deterministic generator, so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl CrashStorage {
    fn new(pages: Pages, world: &Arc<Mutex<World>>) -> Self {
        CrashStorage {
            file: Arc::new(Mutex::new(FileState {
                current: pages.clone(),
                durable: pages,
                unsynced: BTreeMap::new(),
                writes: 0,
            })),
            world: world.clone(),
            is_image: false,
        }
    }

    fn image(pages: Pages, world: &Arc<Mutex<World>>) -> Self {
        CrashStorage {
            is_image: true,
            ..CrashStorage::new(pages, world)
        }
    }

    /// Counts an operation; fails it if the world has stopped. `Ok(true)`:
    /// this is the sync chosen to fail.
    fn tick(&self, sync: bool) -> io::Result<bool> {
        let mut world = self.world.lock().expect("world");
        if world.crashed || world.crash_after == Some(world.ops) {
            world.crashed = true;
            return Err(stopped());
        }
        let n = world.ops;
        world.ops += 1;
        if sync && self.is_image {
            world.image_syncs.push(n);
        }
        Ok(sync && world.fail_sync_at == Some(n))
    }

    fn writes(&self) -> u64 {
        self.file.lock().expect("file").writes
    }

    /// What the disk holds after a power cut: each unsynced page in its
    /// durable state or in any state it had since, as `rng` picks.
    fn after_crash(&self, rng: &mut Rng) -> Pages {
        let file = self.file.lock().expect("file");
        let mut disk = file.durable.clone();
        disk.len = file.current.len;
        for (&p, states) in &file.unsynced {
            let k = rng.below(states.len() as u64 + 1) as usize;
            if k > 0 {
                disk.pages.insert(p, states[k - 1].clone());
            }
        }
        disk
    }

    fn mutate(&self, offset: u64, len: u64, f: impl FnMut(u64) -> u8) -> io::Result<()> {
        self.tick(false)?;
        let mut file = self.file.lock().expect("file");
        file.writes += 1;
        for p in file.current.mutate(offset, len, f) {
            let state = file.current.page(p);
            file.unsynced.entry(p).or_default().push(state);
        }
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.world.lock().expect("world").crashed {
            return Err(stopped());
        }
        self.file.lock().expect("file").current.read(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(offset, buf.len() as u64, |o| buf[(o - offset) as usize])
    }

    fn sync_data(&self) -> io::Result<()> {
        let fail = self.tick(true)?;
        let mut file = self.file.lock().expect("file");
        if fail {
            // Linux reports the write-back error once and marks the pages
            // clean: their data never reaches the disk, and the next sync
            // succeeds without writing it.
            file.unsynced.clear();
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // Only the dirty pages are written: dropped ones stay lost.
        let unsynced = std::mem::take(&mut file.unsynced);
        for &p in unsynced.keys() {
            let page = file.current.page(p);
            file.durable.pages.insert(p, page);
        }
        file.durable.len = file.current.len;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.lock().expect("file").current.len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(offset, len, |_| 0)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Flush,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A raw backing file.
    Raw,
    /// A raw backing file, and one sync of the image file fails.
    SyncError,
    /// An add-cow backing file, smaller than the top, over a raw one.
    Chain,
    /// A bitmap of three or more write-back chunks.
    BigBitmap,
}

/// The middle layer of a `Chain` workload: never written.
struct Mid {
    size: u64,
    meta: Vec<u8>,
    image_fill: Fill,
}

struct Workload {
    kind: Kind,
    size: u64,
    /// Length of the raw file at the bottom of the chain.
    base_len: u64,
    mid: Option<Mid>,
    ops: Vec<Op>,
    /// Which sync of the image file fails (SyncError), by order.
    failing_sync: Option<u64>,
}

fn base_fill() -> Fill {
    fill(|i| (i as u8) | 0x80)
}

fn garbage_fill() -> Fill {
    fill(|i| (i as u8).wrapping_mul(7) ^ 0x5a)
}

/// A header and a bitmap of `clusters` clusters, padded; `bits` set.
fn meta_bytes(image: &str, backing: BackingRef, clusters: u64, bits: &[u64]) -> Vec<u8> {
    let header = Header::new(CLUSTER_BITS, Path::new(image), Some(backing)).expect("header");
    let mut meta = header.encode().expect("encode");
    let total = (meta.len() as u64 + clusters.div_ceil(8)).div_ceil(CLUSTER) * CLUSTER;
    meta.resize(total as usize, 0);
    for &c in bits {
        meta[(CLUSTER + c / 8) as usize] |= 1 << (c % 8);
    }
    meta
}

fn workload(seed: u64) -> Workload {
    let mut rng = Rng::new(seed);
    let kind = match seed % 4 {
        0 => Kind::Raw,
        1 => Kind::SyncError,
        2 => Kind::Chain,
        _ => Kind::BigBitmap,
    };
    let clusters = match kind {
        Kind::BigBitmap => 3 * CHUNK_CLUSTERS + 1 + rng.below(CHUNK_CLUSTERS),
        _ => 4 + rng.below(12),
    };
    let size = CLUSTER * (clusters - 1) + 1 + rng.below(CLUSTER);
    let mut base_len = rng.below(size + 1);
    let mid = (kind == Kind::Chain).then(|| {
        let mid_size = 1 + rng.below(size - 1);
        base_len = rng.below(mid_size + 1);
        let mid_clusters = mid_size.div_ceil(CLUSTER);
        let bits: Vec<u64> = (0..mid_clusters).filter(|_| rng.below(2) == 0).collect();
        let backing = BackingRef {
            name: "base.img".into(),
            format: BackingFormat::Raw,
        };
        Mid {
            size: mid_size,
            meta: meta_bytes("mid.raw", backing, mid_clusters, &bits),
            image_fill: fill(|i| ((i as u8) ^ 0x3c) | 0x80),
        }
    });
    // Offsets anywhere on the disk: on a big one, in every bitmap chunk.
    let mut ops = Vec::new();
    for n in 0..(8 + rng.below(16)) {
        ops.push(match rng.below(10) {
            0..=5 => {
                let offset = rng.below(size);
                let len = 1 + rng.below((size - offset).min(3 * CLUSTER));
                Op::Write {
                    offset,
                    data: (0..len)
                        .map(|i| (i as u8).wrapping_add((n as u8).wrapping_mul(17)) & 0x7f)
                        .collect(),
                }
            }
            6 => {
                let offset = rng.below(size);
                Op::Zero {
                    offset,
                    len: 1 + rng.below((size - offset).min(3 * CLUSTER)),
                }
            }
            // Streaming a 400 MiB disk through this storage would be slow.
            7 if rng.below(4) == 0 && kind != Kind::BigBitmap => Op::Stream,
            _ => Op::Flush,
        });
    }
    let failing_sync = (kind == Kind::SyncError).then(|| rng.below(4));
    Workload {
        kind,
        size,
        base_len,
        mid,
        ops,
        failing_sync,
    }
}

/// Every cluster's contents since the last completed flush, oldest first.
struct History {
    model: Pages,
    flushed: Pages,
    versions: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Clusters any operation touched.
    touched: BTreeSet<u64>,
}

fn cluster_range(size: u64, c: u64) -> (u64, u64) {
    (c * CLUSTER, ((c + 1) * CLUSTER).min(size))
}

impl History {
    fn new(model: Pages) -> Self {
        History {
            flushed: model.clone(),
            model,
            versions: BTreeMap::new(),
            touched: BTreeSet::new(),
        }
    }

    fn cluster(&self, pages: &Pages, c: u64) -> Vec<u8> {
        let (start, end) = cluster_range(self.model.len, c);
        pages.to_vec(start, end)
    }

    fn flushed(&mut self) {
        self.flushed = self.model.clone();
        self.versions.clear();
    }

    fn changed(&mut self, offset: u64, len: u64) {
        for c in offset / CLUSTER..=(offset + len - 1) / CLUSTER {
            let old = self.cluster(&self.flushed, c);
            let now = self.cluster(&self.model, c);
            self.versions
                .entry(c)
                .or_insert_with(|| vec![old])
                .push(now);
            self.touched.insert(c);
        }
    }

    /// True when `bytes` is a version of cluster `c` since the last flush.
    fn allows(&self, c: u64, bytes: &[u8]) -> bool {
        match self.versions.get(&c) {
            Some(versions) => versions.iter().any(|v| v == bytes),
            None => self.cluster(&self.flushed, c) == bytes,
        }
    }
}

/// The files of one run: the top's, and the backing chain's (never written).
struct Files {
    meta: CrashStorage,
    image: CrashStorage,
    base: CrashStorage,
    mid: Option<(CrashStorage, CrashStorage)>,
}

fn backing_of(w: &Workload, files: &Files) -> Backing {
    let raw = Backing::Raw {
        storage: Box::new(files.base.clone()),
        size: files.base.len().expect("len"),
        path: "base.img".into(),
    };
    match &files.mid {
        None => raw,
        Some((meta, image)) => {
            let mid = AddCow::open_storage(
                Path::new("mid.add-cow"),
                Box::new(meta.clone()),
                Box::new(image.clone()),
                Some(raw),
                Access::ReadOnly,
            )
            .expect("open mid");
            assert_eq!(mid.size(), w.mid.as_ref().map_or(0, |m| m.size));
            Backing::AddCow(Box::new(mid))
        }
    }
}

fn open(w: &Workload, files: &Files) -> addcow::Result<AddCow> {
    AddCow::open_storage(
        Path::new("crash.add-cow"),
        Box::new(files.meta.clone()),
        Box::new(files.image.clone()),
        Some(backing_of(w, files)),
        Access::ReadWrite,
    )
}

fn fresh_files(w: &Workload, world: &Arc<Mutex<World>>) -> Files {
    let backing = BackingRef {
        name: if w.mid.is_some() {
            "mid.add-cow".into()
        } else {
            "base.img".into()
        },
        format: if w.mid.is_some() {
            BackingFormat::AddCow
        } else {
            BackingFormat::Raw
        },
    };
    let meta = meta_bytes("crash.raw", backing, w.size.div_ceil(CLUSTER), &[]);
    Files {
        meta: CrashStorage::new(Pages::from_bytes(&meta), world),
        // The image file holds stale garbage: only set bits may expose it.
        image: CrashStorage::image(Pages::new(w.size, garbage_fill()), world),
        base: CrashStorage::new(Pages::new(w.base_len, base_fill()), world),
        mid: w.mid.as_ref().map(|mid| {
            (
                CrashStorage::new(Pages::from_bytes(&mid.meta), world),
                CrashStorage::new(Pages::new(mid.size, mid.image_fill.clone()), world),
            )
        }),
    }
}

/// What the top's backing chain reads, as the model's starting point.
fn initial_model(w: &Workload) -> Pages {
    let fill_len = if w.mid.is_some() { 0 } else { w.base_len };
    let mut model = Pages::with_fill(w.size, base_fill(), fill_len);
    if let Some(mid) = &w.mid {
        let world = Arc::new(Mutex::new(World::default()));
        let files = fresh_files(w, &world);
        let backing = backing_of(w, &files);
        let mut view = vec![0u8; mid.size as usize];
        backing.read_at(&mut view, 0).expect("read mid");
        model.write(&view, 0);
    }
    model
}

/// Runs the workload until it ends or the world stops; returns the history
/// of what completed.
fn run(w: &Workload, files: &Files) -> History {
    let mut history = History::new(initial_model(w));
    let Ok(disk) = open(w, files) else {
        return history;
    };
    let crashed = || files.meta.world.lock().expect("world").crashed;
    for op in &w.ops {
        // A write the crash interrupts may have reached some of its clusters
        // (each whole: a cluster is one storage write), so its new contents
        // count as a version either way.
        let done = match op {
            Op::Write { offset, data } => {
                let done = disk.write_at(data, *offset);
                history.model.write(data, *offset);
                history.changed(*offset, data.len() as u64);
                done
            }
            Op::Zero { offset, len } => {
                let done = disk.write_zeroes(*offset, *len);
                history.model.mutate(*offset, *len, |_| 0);
                history.changed(*offset, *len);
                done
            }
            Op::Flush => disk.flush().map(|()| history.flushed()),
            Op::Stream => disk.stream(|_, _| {}).map(|()| history.flushed()),
        };
        // A failed sync is not the end: later operations must keep the promise too.
        if done.is_err() && crashed() {
            break;
        }
    }
    // A clean close flushes; if the world stopped, this fails like the rest.
    if disk.close().is_ok() {
        history.flushed();
    }
    history
}

fn verify(w: &Workload, files: &Files, history: &History, seed: u64, k: u64) {
    let ctx = format!("seed {seed} ({:?}), crash after {k} operations", w.kind);
    let mut chain_writes = files.base.writes();
    if let Some((meta, image)) = &files.mid {
        chain_writes += meta.writes() + image.writes();
    }
    assert_eq!(
        chain_writes, 0,
        "{ctx}: a file of the backing chain was written"
    );
    let world = Arc::new(Mutex::new(World::default()));
    let mut rng = Rng::new(seed ^ (k << 32) ^ 0xc0ff_ee00);
    let fresh = fresh_files(w, &world);
    let after = Files {
        meta: CrashStorage::new(files.meta.after_crash(&mut rng), &world),
        image: CrashStorage::new(files.image.after_crash(&mut rng), &world),
        ..fresh
    };
    let disk = open(w, &after).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    let clusters = w.size.div_ceil(CLUSTER);
    let meta = after.meta.file.lock().expect("meta").durable.clone();
    let image = after.image.file.lock().expect("image").durable.clone();
    let bitmap = meta.to_vec(CLUSTER, CLUSTER + clusters.div_ceil(8));
    let bit = |c: u64| bitmap[(c / 8) as usize] >> (c % 8) & 1 == 1;
    // Every cluster of a small disk; of a big one, those written or with a
    // bit set (the others were never touched and read the base).
    let mut check: BTreeSet<u64> = history.touched.clone();
    if clusters <= 64 {
        check.extend(0..clusters);
    } else {
        for (i, &byte) in bitmap.iter().enumerate() {
            if byte != 0 {
                check.extend((0..8).map(|b| i as u64 * 8 + b).filter(|&c| bit(c)));
            }
        }
        check.extend([0, clusters - 1]);
    }
    for c in check {
        let (start, end) = cluster_range(w.size, c);
        let mut got = vec![0u8; (end - start) as usize];
        disk.read_at(&mut got, start)
            .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
        assert!(
            history.allows(c, &got),
            "{ctx}: cluster {c} reads neither its flushed nor a later version"
        );
        if bit(c) || disk.all_allocated() {
            let durable = image.to_vec(start, end);
            assert!(
                history.allows(c, &durable),
                "{ctx}: bit of cluster {c} over non-durable data"
            );
        }
    }
}

/// Runs workloads of every kind until `min_points` crash points are checked.
fn crash_points(min_points: u64, kinds: &[Kind]) -> u64 {
    let mut points = 0u64;
    let mut seed = 0;
    while points < min_points {
        seed += 1;
        let w = workload(seed);
        if !kinds.contains(&w.kind) {
            continue;
        }
        // A dry run counts the operations the workload makes (and finds the
        // image syncs, one of which is then made to fail).
        let world = Arc::new(Mutex::new(World::default()));
        let files = fresh_files(&w, &world);
        run(&w, &files);
        let (mut total, syncs) = {
            let world = world.lock().expect("world");
            (world.ops, world.image_syncs.clone())
        };
        let fail_sync_at = w
            .failing_sync
            .and_then(|i| syncs.get(i as usize % syncs.len().max(1)).copied());
        if fail_sync_at.is_some() {
            let world = Arc::new(Mutex::new(World {
                fail_sync_at,
                ..World::default()
            }));
            run(&w, &fresh_files(&w, &world));
            total = world.lock().expect("world").ops;
        }
        for k in 0..=total {
            let world = Arc::new(Mutex::new(World {
                crash_after: Some(k),
                fail_sync_at,
                ..World::default()
            }));
            let files = fresh_files(&w, &world);
            let history = run(&w, &files);
            verify(&w, &files, &history, seed, k);
            points += 1;
        }
    }
    points
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    assert!(crash_points(6_000, &[Kind::Raw, Kind::SyncError, Kind::Chain]) >= 6_000);
}

#[test]
fn crashes_between_bitmap_chunk_writes_leave_a_consistent_image() {
    assert!(crash_points(2_500, &[Kind::BigBitmap]) >= 2_500);
}

/// Threads write, read and flush the same unallocated clusters at once. Each
/// thread owns every fourth 256-byte slot of them, so the final contents are
/// known: each slot holds its owner's last write, or the base where none
/// wrote. Concurrent copy-on-write of one cluster must lose no one's data.
#[test]
fn threads_on_the_same_unallocated_clusters_lose_nothing() {
    const THREADS: u64 = 4;
    const SLOT: u64 = 256;
    const CLUSTERS: u64 = 6;
    let size = CLUSTERS * CLUSTER;
    let w = Workload {
        kind: Kind::Raw,
        size,
        base_len: size,
        mid: None,
        ops: Vec::new(),
        failing_sync: None,
    };
    let base = Pages::new(size, base_fill());
    for round in 0..8u64 {
        let world = Arc::new(Mutex::new(World::default()));
        let files = fresh_files(&w, &world);
        let disk = Arc::new(open(&w, &files).expect("open"));
        let finals: Vec<BTreeMap<u64, u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let disk = disk.clone();
                    s.spawn(move || {
                        let mut rng = Rng::new(round * 100 + t + 1);
                        let mut last = BTreeMap::new();
                        for i in 0..40u64 {
                            // All threads walk the clusters in step.
                            let c = i % CLUSTERS;
                            let slot = rng.below(CLUSTER / SLOT / THREADS) * THREADS + t;
                            let offset = c * CLUSTER + slot * SLOT;
                            let value = 0x80 | (t as u8) << 5 | (i as u8 & 0x1f);
                            disk.write_at(&[value; SLOT as usize], offset)
                                .expect("write");
                            last.insert(offset, value);
                            let mut back = [0u8; SLOT as usize];
                            disk.read_at(&mut back, offset).expect("read");
                            assert!(back.iter().all(|&b| b == value), "own write lost");
                            if rng.below(5) == 0 {
                                disk.flush().expect("flush");
                            }
                        }
                        last
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        Arc::try_unwrap(disk)
            .expect("threads done")
            .close()
            .expect("close");
        let mut model = base.clone();
        for last in &finals {
            for (&offset, &value) in last {
                model.write(&[value; SLOT as usize], offset);
            }
        }
        // What is durable after the last flush equals the model.
        let after = Files {
            meta: CrashStorage::new(files.meta.file.lock().expect("m").durable.clone(), &world),
            image: CrashStorage::new(files.image.file.lock().expect("i").durable.clone(), &world),
            ..fresh_files(&w, &world)
        };
        let reopened = open(&w, &after).expect("reopen");
        let mut got = vec![0u8; size as usize];
        reopened.read_at(&mut got, 0).expect("read");
        assert!(
            got == model.to_vec(0, size),
            "round {round}: the disk differs from the model of the threads' writes"
        );
        assert_eq!(reopened.allocated_clusters(), CLUSTERS, "round {round}");
    }
}
