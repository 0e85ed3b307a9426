//! Throughput of the virtio-blk device against its own backend: a mock
//! driver puts requests in a split queue in guest memory, `Block` serves
//! them, and the same requests are also made by calling the backend
//! directly (`DiskBackend::read_vectored_at`/`write_vectored_at`, the call
//! `Block` makes) into and from the same guest-memory buffers, on a second
//! copy of the same disk. Prints MB/s of both and their ratio, for reads and
//! writes of 4 KiB at random offsets, 64 KiB and 1 MiB in sequence, on a raw
//! disk, on allocated add-cow clusters and on unallocated (copy-on-write)
//! ones. Everything is in the host page cache: this measures the request
//! path, not a disk. The two paths swap files from run to run. The driver keeps 16
//! requests in flight and, with EVENT_IDX, asks for one interrupt per 16, as
//! Linux's virtio-blk driver does under load.
//!
//! The two paths take turns batch by batch, so that the slow phases of a
//! shared machine (they last seconds) slow both alike. `ratio` counts the
//! device's time only (`process_queue`: popping chains, walking them, the
//! I/O, the used ring, the interrupt); `with driver` adds the mock driver's
//! ring writes, which a real guest makes on its own vCPU. The runs go in
//! pairs, each path on each file once per pair; both ratios are the median
//! of the pairs' own ratios, the MB/s medians of the pairs.
//!
//! `cargo bench -p devices --bench block_throughput` (5 pairs of runs of
//! each row), or with `-- --smoke` one pair of a few requests, without
//! meaning, as CI runs it;
//! `-- --only "read 4k-rand raw"` runs the rows that contain the text. Last
//! comes the device's own time per 4 KiB request on a disk that moves no
//! data (`--only "device alone"`). The files are made in `TMPDIR` if it is
//! set, else in `/dev/shm` (see `bench_dir`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use addcow::{IoBufs, IoBufsMut};
use devices::virtio::block::backend::BackendError;
use devices::virtio::block::request::types;
use devices::virtio::block::{open_disk, Block, DiskBackend, DiskFormat};
use devices::virtio::{Activation, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
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
    /// Runs of each row: an even number (the paths swap files each run).
    runs: usize,
}

/// The disks, two of each kind: one for each path (a disk is locked by
/// whoever opens it, and the paths must not share copy-on-write state).
struct Files {
    dir: PathBuf,
    raw: [PathBuf; 2],
    base: PathBuf,
    addcow: [PathBuf; 2],
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 7) as u8).collect()
}

/// Where the files go: `TMPDIR` when it is set, else `/dev/shm` if it has
/// room for `need` bytes, else the system's temporary directory. On tmpfs
/// every page stays in memory; on a disk file system a host that reclaims
/// cold page cache (the CI machine runs DAMON with a `pageout` scheme) or
/// writes it back makes some requests of either path wait for the disk
/// (4 KiB raw writes came out at 0.47-0.81 of direct from run to run on
/// ext4, 0.89-0.94 on tmpfs).
fn bench_dir(need: u64) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none() && free_bytes(shm).is_some_and(|free| free > need) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// Bytes free for an unprivileged writer in the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid statvfs
    // that the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn create_files(scale: &Scale) -> Files {
    // Two raw disks, the backing file, two add-cow images and their image
    // files, with room to spare.
    let dir = bench_dir(6 * scale.disk).join(format!("block-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let data = pattern(scale.disk);
    let raw = [dir.join("disk0.img"), dir.join("disk1.img")];
    for path in &raw {
        std::fs::write(path, &data).expect("raw disk");
    }
    let base = dir.join("base.img");
    std::fs::write(&base, &data).expect("backing file");
    Files {
        addcow: [dir.join("disk0.add-cow"), dir.join("disk1.add-cow")],
        dir,
        raw,
        base,
    }
}

/// A new add-cow image at `path` over the backing file: every cluster
/// unallocated.
fn fresh_addcow(files: &Files, path: &Path) {
    let image = path.with_extension("raw");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&image);
    addcow::create(
        path,
        &addcow::CreateOptions {
            image: image.file_name().expect("name").into(),
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
fn allocated_addcow(files: &Files, path: &Path, scale: &Scale) {
    fresh_addcow(files, path);
    let disk = open_disk(path, DiskFormat::AddCow, false).expect("open");
    let data = pattern(1 << 20);
    let mut at = 0;
    while at < scale.disk {
        let n = (scale.disk - at).min(1 << 20);
        disk.write_at(&data[..n as usize], at).expect("allocate");
        at += n;
    }
    disk.flush().expect("flush");
}

/// Disk `path` (0 or 1) of `kind`.
fn open(files: &Files, kind: Kind, path: usize) -> Box<dyn DiskBackend> {
    match kind {
        Kind::Raw => open_disk(&files.raw[path], DiskFormat::Raw, false),
        _ => open_disk(&files.addcow[path], DiskFormat::AddCow, false),
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

/// The mock driver and the device of one run: requests go in BATCH at a
/// time, and only the device's share (`process_queue`) is timed, as a real
/// driver runs on the guest's vCPU, not on the device's thread. The
/// driver's share is timed apart.
struct Device<'m> {
    mem: &'m GuestMemoryMmap,
    block: Block,
    kind: u32,
    idx: u16,
}

impl<'m> Device<'m> {
    /// The queue of a driver that reuses BATCH chains, each a header, a
    /// `len`-byte buffer and a status byte, and a device serving `disk`.
    fn new(mem: &'m GuestMemoryMmap, disk: Box<dyn DiskBackend>, len: u64, write: bool) -> Self {
        // The rings of the previous run must not look like requests.
        mem.write_slice(&vec![0u8; HEADERS as usize], GuestAddress(0))
            .expect("clear the rings");
        let data_flags = if write { 0 } else { 2 };
        for chain in 0..BATCH {
            let c = u64::from(chain);
            let descs = [
                (HEADERS + 16 * c, 16, 0),
                (buffer(chain, len), len as u32, data_flags),
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
        Device {
            mem,
            block,
            kind: if write { types::OUT } else { types::IN },
            idx: 0,
        }
    }

    /// Publishes one request per offset (at most BATCH) and lets the device
    /// serve them: (the driver's time, the device's time), in seconds.
    fn batch(&mut self, offsets: &[u64]) -> (f64, f64) {
        let mem = self.mem;
        let driver = Instant::now();
        for (chain, &at) in offsets.iter().enumerate() {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&self.kind.to_le_bytes());
            header[8..].copy_from_slice(&(at / 512).to_le_bytes());
            mem.write_slice(&header, GuestAddress(HEADERS + 16 * chain as u64))
                .expect("header");
            // The device must write it (checked below).
            mem.write_obj(0xffu8, GuestAddress(STATUSES + chain as u64))
                .expect("status");
            let slot = u64::from(self.idx % QUEUE);
            mem.write_obj(chain as u16 * 3, GuestAddress(AVAIL_RING + 4 + 2 * slot))
                .expect("avail ring");
            self.idx = self.idx.wrapping_add(1);
        }
        // As a Linux driver does (EVENT_IDX): one interrupt for the batch,
        // when its last request is used.
        mem.write_obj(
            self.idx.wrapping_sub(1),
            GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE)),
        )
        .expect("used event");
        mem.write_obj(self.idx, GuestAddress(AVAIL_RING + 2))
            .expect("avail idx");
        let driver = driver.elapsed().as_secs_f64();
        let device = Instant::now();
        self.block.process_queue();
        let device = device.elapsed().as_secs_f64();
        for chain in 0..offsets.len() as u64 {
            let status: u8 = mem
                .read_obj(GuestAddress(STATUSES + chain))
                .expect("status");
            assert_eq!(status, 0, "request failed");
        }
        (driver, device)
    }
}

/// Where chain `chain`'s data buffer is: the direct calls use the same
/// guest memory, so that both paths move data through the same pages.
fn buffer(chain: u16, len: u64) -> u64 {
    BUFFERS + len * u64::from(chain)
}

/// Makes the requests of one batch by calling the backend directly, with
/// the same vectored call `Block` makes, into or from the chains' buffers:
/// seconds.
fn direct(
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    offsets: &[u64],
    len: u64,
    write: bool,
) -> f64 {
    let start = Instant::now();
    for (chain, &at) in offsets.iter().enumerate() {
        let slice = mem
            .get_slice(GuestAddress(buffer(chain as u16, len)), len as usize)
            .expect("buffer");
        if write {
            let mut bufs = IoBufs::new();
            // SAFETY: the slice is this benchmark's guest memory, mapped for
            // as long as `mem` lives, and nothing holds a reference into it.
            unsafe { bufs.push_raw(slice.ptr_guard().as_ptr(), slice.len()) };
            disk.write_vectored_at(&bufs, at).expect("write");
        } else {
            let mut bufs = IoBufsMut::new();
            // SAFETY: as above; nothing else reads or writes it meanwhile.
            unsafe { bufs.push_raw(slice.ptr_guard_mut().as_ptr(), slice.len()) };
            disk.read_vectored_at(&mut bufs, at).expect("read");
        }
    }
    start.elapsed().as_secs_f64()
}

/// Seconds of one run of each path: the device's share, the direct calls,
/// and the mock driver's share.
#[derive(Clone, Copy, Default)]
struct Run {
    device: f64,
    direct: f64,
    driver: f64,
}

/// One run of the row: the two paths take turns batch by batch (which one
/// goes first alternating), so that a shared machine's slow phases slow
/// both alike.
fn run(
    mem: &GuestMemoryMmap,
    block_disk: Box<dyn DiskBackend>,
    direct_disk: &dyn DiskBackend,
    offsets: &[u64],
    len: u64,
    write: bool,
) -> Run {
    let mut device = Device::new(mem, block_disk, len, write);
    let data = pattern(len);
    for chain in 0..BATCH {
        mem.write_slice(&data, GuestAddress(buffer(chain, len)))
            .expect("data");
    }
    let mut total = Run::default();
    for (i, batch) in offsets.chunks(usize::from(BATCH)).enumerate() {
        let mut block_turn = |total: &mut Run| {
            let (driver, dev) = device.batch(batch);
            total.driver += driver;
            total.device += dev;
        };
        if i % 2 == 0 {
            block_turn(&mut total);
            total.direct += direct(mem, direct_disk, batch, len, write);
        } else {
            total.direct += direct(mem, direct_disk, batch, len, write);
            block_turn(&mut total);
        }
    }
    total
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

fn median(v: &[Run], field: fn(&Run) -> f64) -> f64 {
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
            runs: 2,
        }
    } else {
        Scale {
            disk: 256 << 20,
            bytes: 32 << 20,
            runs: 10,
        }
    };
    let files = create_files(&scale);
    let mem = GuestMemoryMmap::from_ranges(&[(
        GuestAddress(0),
        (BUFFERS + MAX_REQUEST * u64::from(BATCH)) as usize,
    )])
    .expect("guest memory");
    println!(
        "{:<6} {:<7} {:<22} {:>11} {:>11} {:>6} {:>12}",
        "op", "size", "disk", "block MB/s", "direct MB/s", "ratio", "with driver"
    );
    for kind in [Kind::Raw, Kind::Allocated, Kind::Cow] {
        for path in &files.addcow {
            match kind {
                Kind::Raw => {}
                Kind::Allocated => allocated_addcow(&files, path, &scale),
                Kind::Cow => fresh_addcow(&files, path),
            }
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
                let runs: Vec<Run> = (0..scale.runs)
                    .map(|r| {
                        // Copy-on-write writes: fresh images, so that both
                        // paths copy every cluster.
                        if kind == Kind::Cow && write {
                            for path in &files.addcow {
                                fresh_addcow(&files, path);
                            }
                        }
                        // The paths swap files run by run: on ext4 the same
                        // 4 KiB writes ran 0.90-1.05 of direct with one
                        // assignment and 0.96-1.10 with the other.
                        let direct_disk = open(&files, kind, 1 - r % 2);
                        run(
                            &mem,
                            open(&files, kind, r % 2),
                            direct_disk.as_ref(),
                            &offs,
                            len,
                            write,
                        )
                    })
                    .collect();
                // Runs in pairs, the paths on each file once per pair
                // (two files of one kind may differ in speed: the same
                // reads ran 1.4x faster from one of two tmpfs copies), and
                // ratios within a pair, whose paths took turns batch by
                // batch, then their median: a slow phase of the machine that
                // fell on one path moves one pair's ratio, not the row's.
                let pairs: Vec<Run> = runs
                    .chunks(2)
                    .map(|pair| Run {
                        device: pair.iter().map(|r| r.device).sum(),
                        direct: pair.iter().map(|r| r.direct).sum(),
                        driver: pair.iter().map(|r| r.driver).sum(),
                    })
                    .collect();
                let mb = (2 * offs.len() as u64 * len) as f64 / 1e6;
                let (device, direct) = (median(&pairs, |r| r.device), median(&pairs, |r| r.direct));
                let ratio = median(&pairs, |r| r.direct / r.device);
                let with_driver = median(&pairs, |r| r.direct / (r.device + r.driver));
                println!(
                    "{:<6} {:<7} {:<22} {:>11.0} {:>11.0} {:>6.2} {:>12.2}",
                    op,
                    size_name,
                    kind.name(),
                    mb / device,
                    mb / direct,
                    ratio,
                    with_driver
                );
            }
        }
    }
    if only
        .as_ref()
        .is_none_or(|only| "device alone".contains(only.as_str()))
    {
        device_cost(&mem, &scale);
    }
    let _ = std::fs::remove_dir_all(&files.dir);
}

/// A disk that moves no data: what `Block` costs per request by itself.
struct NullDisk(u64);

impl DiskBackend for NullDisk {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn read_vectored_at(&self, _: &mut IoBufsMut<'_>, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_vectored_at(&self, _: &IoBufs<'_>, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn discard_alignment(&self) -> u64 {
        512
    }
}

/// Prints the device's own time per 4 KiB request on a disk that moves no
/// data (the median of the runs): the part of each row's `block` time that
/// is not the backend's.
fn device_cost(mem: &GuestMemoryMmap, scale: &Scale) {
    let len = 4u64 << 10;
    for write in [false, true] {
        let offs = offsets(scale, len, Kind::Raw, write);
        let mut runs: Vec<f64> = (0..scale.runs)
            .map(|_| {
                let mut device = Device::new(mem, Box::new(NullDisk(scale.disk)), len, write);
                let total: f64 = offs
                    .chunks(usize::from(BATCH))
                    .map(|batch| device.batch(batch).1)
                    .sum();
                total / offs.len() as f64
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        println!(
            "device alone (a disk that moves no data), {} 4k: {:.0} ns/request",
            if write { "write" } else { "read" },
            runs[runs.len() / 2] * 1e9
        );
    }
}
