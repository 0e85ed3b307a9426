//! `addcow check`: an offline look at every rule an add-cow file must keep,
//! reporting all problems found rather than stopping at the first.

use std::io;
use std::path::Path;

use crate::bitmap::bitmap_len;
use crate::error::{Error, IoContext, Result};
use crate::header::Header;
use crate::image::{Access, AddCow};
use crate::open::{open_checked, open_locked, options_for, read_header, resolve_name};
use crate::storage::{file_size, FileStorage, Storage};

/// What [`check`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Each rule broken, with where.
    pub problems: Vec<String>,
    /// Clusters of the virtual disk (when the header could be read).
    pub clusters: u64,
    /// Of which allocated in the image file.
    pub allocated: u64,
}

impl CheckReport {
    /// True when no rule is broken.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Largest piece of padding read at once.
const PADDING_CHUNK: u64 = 1 << 20;

/// Checks the add-cow file at `path`, its image file and its backing chain.
/// `Err` means the check itself could not run (the file cannot be opened or
/// read); a damaged image gives `Ok` with problems.
pub fn check(path: &Path) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let meta = FileStorage::new(open_locked(path, Access::ReadOnly)?);
    let header = match read_header(&meta, path) {
        Ok(header) => header,
        Err(Error::Header { source, .. }) => {
            report.problems.push(source.to_string());
            return Ok(report);
        }
        Err(other) => return Err(other),
    };
    let image_path = resolve_name(path, &header.image_name);
    let image_size = match open_checked(&image_path, &options_for(Access::ReadOnly), "open") {
        Ok(file) => file_size(&file).ctx(&image_path, "stat image file")?,
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            report
                .problems
                .push(format!("image file {}: missing", image_path.display()));
            return Ok(report);
        }
        Err(err @ Error::NotAFile { .. }) => {
            report.problems.push(err.to_string());
            return Ok(report);
        }
        Err(err) => return Err(err),
    };

    let cluster_size = header.cluster_size();
    report.clusters = image_size.div_ceil(cluster_size);
    let len = meta.len().ctx(path, "stat")?;
    if header.all_allocated() {
        // The bitmap is not used: the image file may have outgrown it.
        if !len.is_multiple_of(cluster_size) {
            report.problems.push(format!(
                "add-cow file is {len} bytes, not a multiple of the {cluster_size}-byte cluster"
            ));
        }
    } else if !check_bitmap(&meta, path, &header, image_size, len, &mut report.problems)? {
        return Ok(report);
    }
    drop(meta);

    // Opening applies the remaining rules: names, the chain, the locks.
    match AddCow::open(path, Access::ReadOnly) {
        Ok(image) => report.allocated = image.allocated_clusters(),
        Err(Error::Io { source, .. }) if source.kind() != io::ErrorKind::NotFound => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                op: "open",
                source,
            })
        }
        Err(err @ Error::Locked { .. }) => return Err(err),
        Err(err) => report.problems.push(err.to_string()),
    }
    Ok(report)
}

/// Checks the bitmap's length, padding and unused bits; `false` when the
/// file is too short for the bitmap (nothing more can be checked).
fn check_bitmap(
    meta: &FileStorage,
    path: &Path,
    header: &Header,
    image_size: u64,
    len: u64,
    problems: &mut Vec<String>,
) -> Result<bool> {
    let cluster_size = header.cluster_size();
    let clusters = image_size.div_ceil(cluster_size);
    let bitmap_start = u64::from(header.header_size());
    let bitmap_bytes = bitmap_len(clusters);
    let expected_len = (bitmap_start + bitmap_bytes).div_ceil(cluster_size) * cluster_size;
    if len < bitmap_start + bitmap_bytes {
        problems.push(format!(
            "add-cow file is {len} bytes; the bitmap of a {image_size}-byte image file needs {}",
            bitmap_start + bitmap_bytes
        ));
        return Ok(false);
    }
    if len != expected_len {
        problems.push(format!(
            "add-cow file is {len} bytes, expected {expected_len} (bitmap padded to a multiple of the {cluster_size}-byte cluster)"
        ));
    }
    let unused_bits = (clusters % 8) as u32;
    if unused_bits != 0 {
        let mut last = [0u8; 1];
        meta.read_exact_at(&mut last, bitmap_start + bitmap_bytes - 1)
            .ctx(path, "read bitmap")?;
        if last[0] >> unused_bits != 0 {
            problems.push(format!(
                "bitmap byte {} has bits set past the last cluster ({:#04x}); they must be 0",
                bitmap_start + bitmap_bytes - 1,
                last[0]
            ));
        }
    }
    // Only the padding proper is read: a wrong length is reported above, and
    // a hostile sparse length (terabytes of holes) would take hours to read.
    let padding_end = len.min(expected_len);
    let mut offset = bitmap_start + bitmap_bytes;
    let mut buf = Vec::new();
    while offset < padding_end {
        let n = (padding_end - offset).min(PADDING_CHUNK);
        buf.resize(n as usize, 0);
        meta.read_exact_at(&mut buf, offset)
            .ctx(path, "read padding")?;
        if let Some(at) = buf.iter().position(|&b| b != 0) {
            problems.push(format!(
                "byte {} after the bitmap is not zero",
                offset + at as u64
            ));
            break;
        }
        offset += n;
    }
    Ok(true)
}
