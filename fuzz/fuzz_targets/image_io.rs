//! The read/write path on a fuzzed image: a valid header with fuzzed cluster
//! size, disk size and bitmap bytes over a fuzzed backing file, then fuzzed
//! operations. Every write must read back as written; nothing may panic.
#![no_main]

mod mem_storage;

use std::path::Path;

use addcow::{Access, AddCow, Backing, BackingFormat, BackingRef, Header};
use libfuzzer_sys::fuzz_target;
use mem_storage::MemStorage;

fuzz_target!(|data: &[u8]| {
    let [bits, size_lo, size_hi, backing_pct, rest @ ..] = data else {
        return;
    };
    let cluster_bits = 12 + u32::from(bits % 4);
    let size = (u64::from(u16::from_le_bytes([*size_lo, *size_hi])) << 2).max(1);
    let backing_len = size * u64::from(backing_pct % 101) / 100;
    let backing = BackingRef { name: "base.img".into(), format: BackingFormat::Raw };
    let Ok(header) = Header::new(cluster_bits, Path::new("fuzz.raw"), Some(backing)) else {
        return;
    };
    let Ok(mut meta) = header.encode() else { return };
    // The bitmap comes from the input.
    let bitmap_len = size.div_ceil(1 << cluster_bits).div_ceil(8) as usize;
    let (bitmap, ops) = rest.split_at(bitmap_len.min(rest.len()));
    meta.extend_from_slice(bitmap);
    meta.resize(meta.len() + bitmap_len - bitmap.len(), 0);
    // Padded to a cluster multiple, as open requires.
    meta.resize(meta.len().div_ceil(1 << cluster_bits) << cluster_bits, 0);
    let base: Vec<u8> = (0..backing_len).map(|i| i as u8 | 1).collect();
    let backing = Backing::Raw {
        storage: Box::new(MemStorage::new(base)),
        size: backing_len,
        path: "base.img".into(),
    };
    let Ok(disk) = AddCow::open_storage(
        Path::new("fuzz.add-cow"),
        Box::new(MemStorage::new(meta)),
        Box::new(MemStorage::new(vec![0xee; size as usize])),
        Some(backing),
        Access::ReadWrite,
    ) else {
        return;
    };
    for op in ops.chunks(5) {
        let [kind, o1, o2, l1, l2] = *op else { break };
        let offset = u64::from(u16::from_le_bytes([o1, o2])) % size;
        let len = (u64::from(u16::from_le_bytes([l1, l2])) % 20_000).min(size - offset);
        match kind % 4 {
            0 => {
                let bytes = vec![kind; len as usize];
                if disk.write_at(&bytes, offset).is_ok() {
                    let mut back = vec![0; len as usize];
                    disk.read_at(&mut back, offset).expect("read after write");
                    assert_eq!(back, bytes, "write at {offset}+{len} did not read back");
                }
            }
            1 => {
                if disk.write_zeroes(offset, len).is_ok() {
                    let mut back = vec![1; len as usize];
                    disk.read_at(&mut back, offset).expect("read after zeroes");
                    assert!(back.iter().all(|&b| b == 0), "zeroes at {offset}+{len} did not read as zeros");
                }
            }
            2 => {
                let mut buf = vec![0; len as usize];
                let _ = disk.read_at(&mut buf, offset);
            }
            _ => {
                let _ = disk.flush();
            }
        }
    }
});
