//! Any bytes as an add-cow file: decoding and opening must answer with a
//! value or an error, never a panic or an allocation the bytes do not justify.
#![no_main]

mod mem_storage;

use std::path::Path;

use addcow::{Access, AddCow, Header};
use libfuzzer_sys::fuzz_target;
use mem_storage::MemStorage;

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    // The first two bytes size the image file (up to 1 MiB), the rest is the add-cow file.
    if data.len() < 2 {
        return;
    }
    let image_len = u64::from(u16::from_le_bytes([data[0], data[1]])) << 4;
    let image = MemStorage::new(vec![0; image_len as usize]);
    let meta = MemStorage::new(data[2..].to_vec());
    if let Ok(disk) = AddCow::open_storage(Path::new("fuzz.add-cow"), Box::new(meta), Box::new(image), None, Access::ReadOnly) {
        let mut buf = [0u8; 512];
        let _ = disk.read_at(&mut buf, 0);
        let _ = disk.map();
    }
});
