//! The request path's own cost: 4 KiB reads and writes served through
//! `serve` on a raw disk in the page cache, with and without I/O-lab
//! options. Prints nanoseconds per request (median of 7 runs).
//!
//! `cargo bench -p devices --bench request_path`

use std::time::Instant;

use devices::virtio::block::request::{serve, types, Disk, Scratch};
use devices::virtio::block::{open_disk, DiskBackend, DiskFormat};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQUESTS: u64 = 50_000;
const DISK: u64 = 64 << 20;

fn run(mem: &GuestMemoryMmap, disk: &dyn DiskBackend, kind: u32) -> f64 {
    let queue = MockSplitQueue::new(mem, 256);
    let flags = if kind == types::IN { 2 } else { 0 };
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x20_0000, 4096, flags, 0)),
        RawDescriptor::from(Descriptor::new(0x30_0000, 1, 2, 0)),
    ];
    let id = [0u8; 20];
    let disk = Disk {
        backend: disk,
        read_only: false,
        write_through: false,
        id: &id,
    };
    let chain = queue.build_desc_chain(&descs).expect("chain");
    let mut scratch = Scratch::default();
    let start = Instant::now();
    for i in 0..REQUESTS {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        let sector = (i * 4099 * 8) % (DISK / 512 - 8);
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x10_0000))
            .expect("header");
        let _ = serve(chain.clone(), mem, &disk, &mut scratch);
    }
    start.elapsed().as_nanos() as f64 / REQUESTS as f64
}

fn main() {
    let dir = std::env::temp_dir().join(format!("request-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![1u8; DISK as usize]).expect("disk");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("memory");
    let disk = open_disk(&path, DiskFormat::Raw, false).expect("open");
    for (name, kind) in [("read 4k", types::IN), ("write 4k", types::OUT)] {
        let mut runs: Vec<f64> = (0..7).map(|_| run(&mem, disk.as_ref(), kind)).collect();
        runs.sort_by(f64::total_cmp);
        println!(
            "{name}: {:.0} ns/request (median of 7, min {:.0})",
            runs[3], runs[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
