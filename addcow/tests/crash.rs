//! Crash consistency, by fault injection under the library.
//!
//! `CrashStorage` implements the library's `Storage` seam in memory and keeps,
//! for each file, what a power cut would leave: the bytes as of its last sync.
//! A workload of random writes, zeroings, flushes and streams runs once to
//! count its storage operations (writes, zeroings, syncs), then once more for
//! every count k, with the world stopping at operation k + 1: that operation
//! and every later one fail, and all un-synced writes are lost. The files are
//! then reopened from their durable bytes and checked:
//!
//! - the header is valid and the image opens;
//! - every cluster reads either its contents as of the last completed flush
//!   or a version written after it, never anything else (in particular never
//!   backing data mixed with garbage);
//! - every bit set on disk covers a durable cluster holding such a version;
//! - the backing file is untouched.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use addcow::header::Header;
use addcow::{Access, AddCow, Backing, Storage};

/// A file's bytes now, and as a power cut would leave them.
#[derive(Debug, Default, Clone)]
struct FileState {
    current: Vec<u8>,
    durable: Vec<u8>,
}

/// How many mutating operations may still happen before the world stops.
#[derive(Debug, Default)]
struct World {
    ops: u64,
    crash_after: Option<u64>,
    crashed: bool,
}

#[derive(Clone)]
struct CrashStorage {
    file: Arc<Mutex<FileState>>,
    world: Arc<Mutex<World>>,
}

impl std::fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashStorage")
    }
}

fn stopped() -> io::Error {
    io::Error::other("the world stopped (injected crash)")
}

impl CrashStorage {
    fn new(bytes: Vec<u8>, world: &Arc<Mutex<World>>) -> Self {
        CrashStorage {
            file: Arc::new(Mutex::new(FileState {
                current: bytes.clone(),
                durable: bytes,
            })),
            world: world.clone(),
        }
    }

    /// Counts a mutating operation; fails it if the world has stopped.
    fn tick(&self) -> io::Result<()> {
        let mut world = self.world.lock().expect("world");
        if world.crashed || world.crash_after == Some(world.ops) {
            world.crashed = true;
            return Err(stopped());
        }
        world.ops += 1;
        Ok(())
    }

    fn durable(&self) -> Vec<u8> {
        self.file.lock().expect("file").durable.clone()
    }

    fn mutate(&self, offset: u64, len: usize, f: impl FnOnce(&mut [u8])) -> io::Result<()> {
        self.tick()?;
        let mut file = self.file.lock().expect("file");
        let end = offset as usize + len;
        if file.current.len() < end {
            file.current.resize(end, 0);
        }
        f(&mut file.current[offset as usize..end]);
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.world.lock().expect("world").crashed {
            return Err(stopped());
        }
        let file = self.file.lock().expect("file");
        let src = file
            .current
            .get(offset as usize..offset as usize + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(offset, buf.len(), |dst| dst.copy_from_slice(buf))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.tick()?;
        let mut file = self.file.lock().expect("file");
        file.durable = file.current.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.lock().expect("file").current.len() as u64)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(offset, len as usize, |dst| dst.fill(0))
    }
}

/// xorshift64*: a deterministic generator, so a failure names its seed.
struct Rng(u64);

impl Rng {
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

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Flush,
    Stream,
}

const CLUSTER_BITS: u32 = 12;
const CLUSTER: u64 = 1 << CLUSTER_BITS;

struct Workload {
    size: u64,
    backing: Vec<u8>,
    ops: Vec<Op>,
}

fn workload(seed: u64) -> Workload {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let size = CLUSTER * (4 + rng.below(12)) + rng.below(CLUSTER);
    let backing_len = rng.below(size + 1);
    let backing = (0..backing_len).map(|i| (i as u8) | 0x80).collect();
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
            7 if rng.below(4) == 0 => Op::Stream,
            _ => Op::Flush,
        });
    }
    Workload { size, backing, ops }
}

/// Every cluster's contents since the last completed flush, oldest first.
struct History {
    model: Vec<u8>,
    versions: Vec<Vec<Vec<u8>>>,
}

impl History {
    fn new(model: Vec<u8>) -> Self {
        let mut h = History {
            versions: Vec::new(),
            model,
        };
        h.flushed();
        h
    }

    fn cluster(&self, c: u64) -> Vec<u8> {
        let end = ((c + 1) * CLUSTER).min(self.model.len() as u64);
        self.model[(c * CLUSTER) as usize..end as usize].to_vec()
    }

    fn flushed(&mut self) {
        let clusters = (self.model.len() as u64).div_ceil(CLUSTER);
        self.versions = (0..clusters).map(|c| vec![self.cluster(c)]).collect();
    }

    fn changed(&mut self, offset: u64, len: u64) {
        for c in offset / CLUSTER..=(offset + len - 1) / CLUSTER {
            let now = self.cluster(c);
            self.versions[c as usize].push(now);
        }
    }
}

struct Files {
    meta: CrashStorage,
    image: CrashStorage,
    backing: CrashStorage,
}

fn open(files: &Files) -> addcow::Result<AddCow> {
    let backing = Backing::Raw {
        storage: Box::new(files.backing.clone()),
        size: files.backing.len().expect("len"),
        path: "base.img".into(),
    };
    AddCow::open_storage(
        Path::new("crash.add-cow"),
        Box::new(files.meta.clone()),
        Box::new(files.image.clone()),
        Some(backing),
        Access::ReadWrite,
    )
}

fn fresh_files(w: &Workload, world: &Arc<Mutex<World>>) -> Files {
    let header = Header::new(
        CLUSTER_BITS,
        Path::new("crash.raw"),
        Some(addcow::BackingRef {
            name: "base.img".into(),
            format: addcow::BackingFormat::Raw,
        }),
    )
    .expect("header");
    let mut meta = header.encode().expect("encode");
    let clusters = w.size.div_ceil(CLUSTER);
    let total = (meta.len() as u64 + clusters.div_ceil(8)).div_ceil(CLUSTER) * CLUSTER;
    meta.resize(total as usize, 0);
    // The image file holds stale garbage: only set bits may expose it.
    let image = (0..w.size)
        .map(|i| (i as u8).wrapping_mul(7) ^ 0x5a)
        .collect();
    Files {
        meta: CrashStorage::new(meta, world),
        image: CrashStorage::new(image, world),
        backing: CrashStorage::new(w.backing.clone(), world),
    }
}

/// Runs the workload until it ends or the world stops; returns the history
/// of what completed.
fn run(w: &Workload, files: &Files) -> History {
    let mut model = w.backing.clone();
    model.resize(w.size as usize, 0);
    let mut history = History::new(model);
    let Ok(disk) = open(files) else {
        return history;
    };
    for op in &w.ops {
        let done = match op {
            Op::Write { offset, data } => disk.write_at(data, *offset).map(|()| {
                history.model[*offset as usize..*offset as usize + data.len()]
                    .copy_from_slice(data);
                history.changed(*offset, data.len() as u64);
            }),
            Op::Zero { offset, len } => disk.write_zeroes(*offset, *len).map(|()| {
                history.model[*offset as usize..(*offset + len) as usize].fill(0);
                history.changed(*offset, *len);
            }),
            Op::Flush => disk.flush().map(|()| history.flushed()),
            Op::Stream => disk.stream(|_, _| {}).map(|()| history.flushed()),
        };
        if done.is_err() {
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
    let world = Arc::new(Mutex::new(World::default()));
    let after = Files {
        meta: CrashStorage::new(files.meta.durable(), &world),
        image: CrashStorage::new(files.image.durable(), &world),
        backing: CrashStorage::new(files.backing.durable(), &world),
    };
    let ctx = format!("seed {seed}, crash after {k} operations");
    assert_eq!(
        after.backing.durable(),
        w.backing,
        "{ctx}: backing file changed"
    );
    let disk = open(&after).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    let clusters = w.size.div_ceil(CLUSTER);
    let meta = after.meta.durable();
    let image = after.image.durable();
    for c in 0..clusters {
        let start = c * CLUSTER;
        let end = ((c + 1) * CLUSTER).min(w.size);
        let mut got = vec![0u8; (end - start) as usize];
        disk.read_at(&mut got, start)
            .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
        let versions = &history.versions[c as usize];
        assert!(
            versions.contains(&got),
            "{ctx}: cluster {c} reads neither its flushed nor a later version"
        );
        let bit = meta[CLUSTER as usize + (c / 8) as usize] >> (c % 8) & 1 == 1;
        if bit || disk.all_allocated() {
            let durable = &image[start as usize..end as usize];
            assert!(
                versions.iter().any(|v| v == durable),
                "{ctx}: bit of cluster {c} over non-durable data"
            );
        }
    }
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    let mut crash_points = 0u64;
    let mut seed = 0;
    while crash_points < 10_000 {
        seed += 1;
        let w = workload(seed);
        // A dry run counts the operations the workload makes.
        let world = Arc::new(Mutex::new(World::default()));
        let files = fresh_files(&w, &world);
        run(&w, &files);
        let total = world.lock().expect("world").ops;
        for k in 0..=total {
            let world = Arc::new(Mutex::new(World {
                crash_after: Some(k),
                ..World::default()
            }));
            let files = fresh_files(&w, &world);
            let history = run(&w, &files);
            verify(&w, &files, &history, seed, k);
            crash_points += 1;
        }
    }
    assert!(crash_points >= 10_000);
}
