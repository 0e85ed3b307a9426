//! Flattening an image into one raw file (`addcow convert`).
//!
//! The disk is walked in pieces that each come from one host file at the
//! same offset (the image file, or a raw file anywhere down the backing
//! chain) or read as zeros. A piece from a file is copied by the kernel
//! (`copy_file_range`), never through this process's memory, skipping the
//! holes of the source file; zero pieces are not written at all. The output
//! must read as zeros where nothing is written (a file truncated to 0), or
//! be told it does not (a block device), in which case every byte is written.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::image::AddCow;
use crate::storage::Storage;

/// Largest piece copied at once (progress is reported between pieces).
const PIECE: u64 = 64 << 20;
/// Largest buffer of zeros written at once into an output that is not sparse.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where the output reads zeros without being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A new or truncated regular file: holes stay holes.
    Sparse,
    /// A block device or other storage with old contents: zeros are written.
    Dense,
}

/// Writes the virtual disk of `disk` into `out` (named `out_path` in
/// messages) at the same offsets. `progress(bytes)` is called as pieces are
/// done. The caller sets the output's length and syncs it.
pub fn convert(
    disk: &AddCow,
    out: &File,
    out_path: &Path,
    output: Output,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut holes = HoleCache::default();
    let mut zeros = Vec::new();
    disk.for_each_piece(0, disk.size(), &mut |offset, len, file| {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            let at = offset + done;
            match (file, output) {
                (Some((storage, path)), Output::Sparse) => {
                    copy_data(storage, path, at, n, out, &mut holes)?
                }
                (Some((storage, path)), Output::Dense) => storage
                    .copy_to(at, n, out, at)
                    .ctx(path, "copy to the output")?,
                (None, Output::Sparse) => {}
                (None, Output::Dense) => write_zeros(out, out_path, at, n, &mut zeros)?,
            }
            progress(n);
            done += n;
        }
        Ok(())
    })
}

/// Copies the data extents of `[offset, offset + len)` of `storage` into
/// `out`, leaving its holes unwritten.
fn copy_data(
    storage: &dyn Storage,
    path: &Path,
    offset: u64,
    len: u64,
    out: &File,
    holes: &mut HoleCache,
) -> Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let data_end = holes.data_end(storage, at).ctx(path, "find holes")?;
        if data_end > at {
            let to = data_end.min(end);
            storage
                .copy_to(at, to - at, out, at)
                .ctx(path, "copy to the output")?;
            at = to;
            continue;
        }
        match storage.next_data(at).ctx(path, "find data")? {
            Some(data) if data > at => at = data,
            _ => break,
        }
    }
    Ok(())
}

fn write_zeros(out: &File, path: &Path, offset: u64, len: u64, zeros: &mut Vec<u8>) -> Result<()> {
    zeros.resize(len.min(ZERO_CHUNK) as usize, 0);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        out.write_all_at(&zeros[..n], offset + done)
            .ctx(path, "write")?;
        done += n as u64;
    }
    Ok(())
}

/// The last run of data found in each source file, so that pieces that
/// alternate between files ask the file system once per run of data, not
/// once per piece.
#[derive(Default)]
struct HoleCache {
    known: HashMap<*const (), Range<u64>>,
}

impl HoleCache {
    /// [`Storage::data_end`], from what is known when it can.
    fn data_end(&mut self, storage: &dyn Storage, offset: u64) -> std::io::Result<u64> {
        let key = storage as *const dyn Storage as *const ();
        if let Some(known) = self.known.get(&key) {
            if known.contains(&offset) {
                return Ok(known.end);
            }
        }
        let end = storage.data_end(offset)?;
        if end > offset {
            self.known.insert(key, offset..end);
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create, CreateOptions};
    use crate::header::{BackingFormat, BackingRef};
    use crate::image::Access;
    use std::os::unix::fs::MetadataExt;

    /// A chain raw <- add-cow <- add-cow with data, holes and zero pieces.
    #[test]
    fn converts_a_chain_byte_for_byte_with_holes() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let cs = 64u64 << 10;
        // A 1 MiB raw base with data in its first 512 KiB (the rest a hole).
        let base: Vec<u8> = (0..512 << 10).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(d.join("base.raw"), &base).expect("base");
        let mid_opts = CreateOptions {
            image: "mid.raw".into(),
            backing: Some(BackingRef {
                name: "base.raw".into(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 16,
            size: Some(1 << 20),
        };
        create(&d.join("mid.add-cow"), &mid_opts)?;
        let top_opts = CreateOptions {
            image: "top.raw".into(),
            backing: Some(BackingRef {
                name: "mid.add-cow".into(),
                format: BackingFormat::AddCow,
            }),
            cluster_bits: 16,
            size: Some(3 << 20),
        };
        {
            let mid = AddCow::open(&d.join("mid.add-cow"), Access::ReadWrite)?;
            mid.write_at(&[0xaa; 100], 3 * cs + 5)?;
            mid.write_zeroes(5 * cs, cs)?;
            mid.close()?;
        }
        create(&d.join("top.add-cow"), &top_opts)?;
        let top = AddCow::open(&d.join("top.add-cow"), Access::ReadWrite)?;
        top.write_at(&[0xbb; 200_000], cs + 17)?;
        top.write_at(&[0xcc; 10], (2 << 20) + 1)?;
        top.write_zeroes(7 * cs, cs)?;
        top.flush()?;

        let mut expected = vec![0u8; top.size() as usize];
        top.read_at(&mut expected, 0)?;
        let out_path = d.join("out.raw");
        let out = File::create(&out_path).expect("out");
        let mut reported = 0;
        convert(&top, &out, &out_path, Output::Sparse, |n| reported += n)?;
        out.set_len(top.size()).expect("set_len");
        assert_eq!(reported, top.size());
        assert!(std::fs::read(&out_path).expect("read") == expected);
        // Only what the chain holds as data was written: the base's 512 KiB
        // and the clusters written above it, not the 3 MiB.
        let allocated = out.metadata().expect("stat").blocks() * 512;
        assert!(allocated <= 1 << 20, "{allocated} bytes allocated");

        // A dense output with old contents gets every byte, zeros included.
        let dense = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.join("dense.raw"))
            .expect("dense");
        dense.write_all_at(&vec![0x5a; 3 << 20], 0).expect("fill");
        convert(&top, &dense, &d.join("dense.raw"), Output::Dense, |_| {})?;
        assert!(std::fs::read(d.join("dense.raw")).expect("read") == expected);
        Ok(())
    }
}
