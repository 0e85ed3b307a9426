//! Throughput of the virtio-blk device against its own backend: a mock
//! driver puts requests in a split queue in guest memory, `Block` serves
//! them, and the same requests are also made by calling the backend
//! directly (`DiskBackend::read_at`/`write_at` on one reused buffer) on the
//! same files. Prints MB/s of both and their ratio (and the ratio of the
//! CPU time the thread spent, steadier on a shared machine, as the work is
//! CPU-bound in the page cache), for reads and writes of
//! 4 KiB at random offsets, 64 KiB and 1 MiB in sequence, on a raw disk, on
//! allocated add-cow clusters and on unallocated (copy-on-write) ones.
//! Everything is in the host page cache: this measures the request path,
//! not a disk. The driver keeps 16 requests in flight and, with EVENT_IDX,
//! asks for one interrupt per 16, as Linux's virtio-blk driver does under
//! load; the direct calls cycle through 16 buffers likewise.
//!
//! `cargo bench -p devices --bench block_throughput` (median of 7 runs of
//! each, the two paths alternating), or with `-- --smoke` a few requests
//! once, without meaning, as CI runs it; `-- --only "read 4k-rand raw"`
//! runs the rows that contain the text.

use std::path::PathBuf;
use std::time::Instant;

use devices::virtio::block::request::types;
use devices::virtio::block::{open_disk, Block, DiskBackend, DiskFormat};
use devices::virtio::{Activation, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Requests in flight: chains in the queue per notification.
const BATCH: u16 = 16;
/// Queue size of the mock driver.
const QUEUE: u16 = 256;
/// The rings.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Where the headers, data buffers and status bytes of the chains are.
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x18_0000;
const BUFFERS: u64 = 0x20_0000;
/// Room per chain for the largest request.
const MAX_REQUEST: u64 = 1 << 20;
const CLUSTER_BITS: u32 = 16;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Raw,
    Allocated,
    Cow,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Allocated => "add-cow allocated",
            Kind::Cow => "add-cow copy-on-write",
        }
    }
}

struct Scale {
    disk: u64,
    /// Bytes moved per measured run (fewer for 4 KiB copy-on-write writes,
    /// bounded by the clusters of the disk).
    bytes: u64,
    runs: usize,
}

struct Files {
    dir: PathBuf,
    raw: PathBuf,
    base: PathBuf,
    addcow: PathBuf,
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 7) as u8).collect()
}

fn create_files(scale: &Scale) -> Files {
    let dir = std::env::temp_dir().join(format!("block-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let data = pattern(scale.disk);
    let raw = dir.join("disk.img");
    std::fs::write(&raw, &data).expect("raw disk");
    let base = dir.join("base.img");
    std::fs::write(&base, &data).expect("backing file");
    let files = Files {
        addcow: dir.join("disk.add-cow"),
        dir,
        raw,
        base,
    };
    fresh_addcow(&files);
    files
}

/// A new add-cow image over the backing file: every cluster unallocated.
fn fresh_addcow(files: &Files) {
    let _ = std::fs::remove_file(&files.addcow);
    let _ = std::fs::remove_file(files.dir.join("disk.raw"));
    addcow::create(
        &files.addcow,
        &addcow::CreateOptions {
            image: "disk.raw".into(),
            backing: Some(addcow::BackingRef {
                name: files.base.file_name().expect("name").into(),
                format: addcow::BackingFormat::Raw,
            }),
            cluster_bits: CLUSTER_BITS,
            size: None,
        },
    )
    .expect("create add-cow");
}

/// An add-cow image whose every cluster is allocated (by writes, so the
/// bitmap is consulted, not the all-allocated bit).
fn allocated_addcow(files: &Files, scale: &Scale) {
    fresh_addcow(files);
    let disk = open_disk(&files.addcow, DiskFormat::AddCow, false).expect("open");
    let data = pattern(1 << 20);
    let mut at = 0;
    while at < scale.disk {
        let n = (scale.disk - at).min(1 << 20);
        disk.write_at(&data[..n as usize], at).expect("allocate");
        at += n;
    }
    disk.flush().expect("flush");
}

fn open(files: &Files, kind: Kind) -> Box<dyn DiskBackend> {
    match kind {
        Kind::Raw => open_disk(&files.raw, DiskFormat::Raw, false),
        _ => open_disk(&files.addcow, DiskFormat::AddCow, false),
    }
    .expect("open disk")
}

/// The byte offsets of a run's requests: random 4 KiB-aligned ones for
/// 4 KiB (distinct clusters for copy-on-write writes, so that each one
/// copies), in sequence otherwise.
fn offsets(scale: &Scale, len: u64, kind: Kind, write: bool) -> Vec<u64> {
    let slots = scale.disk / len;
    if len >= 64 << 10 {
        let n = (scale.bytes / len).min(slots);
        return (0..n).map(|i| i * len).collect();
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if kind == Kind::Cow && write {
        let clusters = scale.disk >> CLUSTER_BITS;
        let n = (scale.bytes / len).min(clusters);
        // Cluster i*stride mod clusters with an odd stride visits each once.
        let per = (1u64 << CLUSTER_BITS) / len;
        return (0..n)
            .map(|i| {
                let cluster = (i * 2_654_435_761) % clusters;
                (cluster << CLUSTER_BITS) + (next() % per) * len
            })
            .collect();
    }
    (0..scale.bytes / len)
        .map(|_| (next() % slots) * len)
        .collect()
}

/// Wall and CPU time of the calling thread, in seconds.
#[derive(Clone, Copy)]
struct Times {
    wall: f64,
    cpu: f64,
}

/// A started clock.
struct Clock {
    wall: Instant,
    cpu: f64,
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, a local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl Clock {
    fn start() -> Clock {
        Clock {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }
    fn stop(&self) -> Times {
        Times {
            wall: self.wall.elapsed().as_secs_f64(),
            cpu: thread_cpu() - self.cpu,
        }
    }
}

/// Seconds to make the requests by calling the backend directly, into or
/// from BATCH buffers in turn, as many as the requests in flight through
/// `Block` use (so that both move data through the same amount of memory:
/// one buffer would stay in the CPU's cache).
fn direct(disk: &dyn DiskBackend, offsets: &[u64], len: u64, write: bool) -> Times {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| pattern(len)).collect();
    let start = Clock::start();
    for (i, &at) in offsets.iter().enumerate() {
        let buf = &mut bufs[i % usize::from(BATCH)];
        if write {
            disk.write_at(buf, at).expect("write");
        } else {
            disk.read_at(buf, at).expect("read");
        }
    }
    start.stop()
}

/// Seconds to make the requests through `Block`, BATCH at a time.
fn through_block(
    mem: &GuestMemoryMmap,
    disk: Box<dyn DiskBackend>,
    offsets: &[u64],
    len: u64,
    write: bool,
) -> Times {
    // The rings of the previous run must not look like requests.
    mem.write_slice(&vec![0u8; HEADERS as usize], GuestAddress(0))
        .expect("clear the rings");
    let data_flags = if write { 0 } else { 2 };
    for chain in 0..BATCH {
        let c = u64::from(chain);
        let descs = [
            (HEADERS + 16 * c, 16, 0),
            (BUFFERS + len * c, len as u32, data_flags),
            (STATUSES + c, 1, 2),
        ];
        for (i, (addr, l, flags)) in descs.into_iter().enumerate() {
            let index = chain * 3 + i as u16;
            let (flags, next) = if i < 2 {
                (flags | 1, index + 1)
            } else {
                (flags, 0)
            };
            let d = RawDescriptor::from(Descriptor::new(addr, l, flags, next));
            mem.write_obj(d, GuestAddress(DESC_TABLE + 16 * u64::from(index)))
                .expect("descriptor");
        }
    }
    let data = pattern(len);
    for chain in 0..u64::from(BATCH) {
        mem.write_slice(&data, GuestAddress(BUFFERS + len * chain))
            .expect("data");
    }
    let mut block = Block::new(
        disk,
        false,
        [0; 20],
        EventFd::new(EFD_NONBLOCK).expect("irq"),
    )
    .expect("block");
    block
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![queue()],
            acked_features: 1 << VIRTIO_RING_F_EVENT_IDX,
        })
        .expect("activate");
    let kind = if write { types::OUT } else { types::IN };
    let avail = AVAIL_RING;
    let mut idx: u16 = 0;
    let start = Clock::start();
    for batch in offsets.chunks(usize::from(BATCH)) {
        for (chain, &at) in batch.iter().enumerate() {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&(at / 512).to_le_bytes());
            mem.write_slice(&header, GuestAddress(HEADERS + 16 * chain as u64))
                .expect("header");
            let slot = u64::from(idx % QUEUE);
            mem.write_obj(chain as u16 * 3, GuestAddress(avail + 4 + 2 * slot))
                .expect("avail ring");
            idx = idx.wrapping_add(1);
        }
        // As a Linux driver does (EVENT_IDX): one interrupt for the batch,
        // when its last request is used.
        mem.write_obj(
            idx.wrapping_sub(1),
            GuestAddress(avail + 4 + 2 * u64::from(QUEUE)),
        )
        .expect("used event");
        mem.write_obj(idx, GuestAddress(avail + 2))
            .expect("avail idx");
        block.process_queue();
    }
    let elapsed = start.stop();
    for chain in 0..BATCH.min(offsets.len() as u16) {
        let status: u8 = mem
            .read_obj(GuestAddress(STATUSES + u64::from(chain)))
            .expect("status");
        assert_eq!(status, 0, "request failed");
    }
    elapsed
}

/// The split queue as a driver set it up (virtio-queue's mock lays out
/// a 256-entry avail ring shorter than it is, under the used ring).
fn queue() -> Queue {
    let mut q = Queue::new(QUEUE).expect("queue");
    q.set_size(QUEUE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q
}

fn median(v: &[Times], field: fn(&Times) -> f64) -> f64 {
    let mut v: Vec<f64> = v.iter().map(field).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    // `--only TEXT`: the rows whose "op size disk" contains TEXT.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let scale = if smoke {
        Scale {
            disk: 8 << 20,
            bytes: 4 << 20,
            runs: 1,
        }
    } else {
        Scale {
            disk: 256 << 20,
            bytes: 32 << 20,
            runs: 7,
        }
    };
    let files = create_files(&scale);
    let mem = GuestMemoryMmap::from_ranges(&[(
        GuestAddress(0),
        (BUFFERS + MAX_REQUEST * u64::from(BATCH)) as usize,
    )])
    .expect("guest memory");
    println!(
        "{:<6} {:<7} {:<22} {:>11} {:>11} {:>6} {:>9}",
        "op", "size", "disk", "block MB/s", "direct MB/s", "ratio", "cpu ratio"
    );
    for kind in [Kind::Raw, Kind::Allocated, Kind::Cow] {
        if kind == Kind::Allocated {
            allocated_addcow(&files, &scale);
        }
        if kind == Kind::Cow {
            fresh_addcow(&files);
        }
        for write in [false, true] {
            for (size_name, len) in [("4k-rand", 4u64 << 10), ("64k", 64 << 10), ("1m", 1 << 20)] {
                let op = if write { "write" } else { "read" };
                let row = format!("{op} {size_name} {}", kind.name());
                if only
                    .as_ref()
                    .is_some_and(|only| !row.contains(only.as_str()))
                {
                    continue;
                }
                let offs = offsets(&scale, len, kind, write);
                let (mut block_s, mut direct_s) = (Vec::new(), Vec::new());
                for run in 0..scale.runs {
                    // Alternate which path goes first.
                    for path in [run % 2, 1 - run % 2] {
                        if kind == Kind::Cow && write {
                            fresh_addcow(&files);
                        }
                        let disk = open(&files, kind);
                        if path == 0 {
                            block_s.push(through_block(&mem, disk, &offs, len, write));
                        } else {
                            direct_s.push(direct(disk.as_ref(), &offs, len, write));
                        }
                    }
                }
                let mb = (offs.len() as u64 * len) as f64 / 1e6;
                let wall = |t: &Times| t.wall;
                let cpu = |t: &Times| t.cpu;
                let (b, d) = (mb / median(&block_s, wall), mb / median(&direct_s, wall));
                let cpu_ratio = median(&direct_s, cpu) / median(&block_s, cpu);
                println!(
                    "{:<6} {:<7} {:<22} {:>11.0} {:>11.0} {:>6.2} {:>9.2}",
                    op,
                    size_name,
                    kind.name(),
                    b,
                    d,
                    b / d,
                    cpu_ratio
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&files.dir);
}
