//! Creating add-cow images, and probing the format of a backing file.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::bitmap::bitmap_len;
use crate::error::{Error, IoContext, Result};
use crate::header::{BackingFormat, BackingRef, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::image::{Access, AddCow};
use crate::open::{lock, resolve_name};

/// What [`create`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Name of the raw image file, stored as given (relative to the add-cow
    /// file's directory unless absolute). Created sparse if missing.
    pub image: PathBuf,
    /// The backing file, stored as given, and its format.
    pub backing: Option<BackingRef>,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Size of the virtual disk; default: the existing image file's, else the
    /// backing file's.
    pub size: Option<u64>,
}

/// What a backing file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// It starts with the add-cow magic.
    AddCow,
    /// No known magic: raw, which is only a guess (probing raw is a
    /// security hole: a guest could write any magic into a raw disk).
    Raw,
}

/// log2 of `cluster_size`, if it is a power of two from 4 KiB to 2 MiB.
pub fn cluster_bits_of(cluster_size: u64) -> Result<u32> {
    let bits = cluster_size.trailing_zeros();
    if cluster_size.is_power_of_two() && (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        Ok(bits)
    } else {
        Err(Error::ClusterSize(cluster_size))
    }
}

/// Looks at a file's magic: add-cow, raw, or a format add-cow cannot use.
pub fn probe_format(path: &Path) -> Result<Probed> {
    let mut head = Vec::with_capacity(72);
    File::open(path)
        .ctx(path, "open")?
        .take(72)
        .read_to_end(&mut head)
        .ctx(path, "read")?;
    let starts = |magic: &[u8]| head.starts_with(magic);
    let format = if starts(b"ACOW") {
        return Ok(Probed::AddCow);
    } else if starts(b"QFI\xfb") {
        "qcow2"
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") {
        "vmdk"
    } else if starts(b"conectix") {
        "vpc"
    } else if starts(b"vhdxfile") {
        "vhdx"
    } else if starts(b"QED\0") {
        "qed"
    } else if starts(b"LUKS\xba\xbe") {
        "luks"
    } else if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        "vdi"
    } else {
        return Ok(Probed::Raw);
    };
    Err(Error::UnsupportedFormat {
        path: path.to_path_buf(),
        format,
    })
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Creates (or overwrites) the add-cow file at `path`. The image file is
/// created sparse when missing and grown to `size` when asked, never shrunk;
/// the backing file is only read. The result is opened once to check it.
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let image_path = resolve_name(path, &options.image);
    let backing_path = options
        .backing
        .as_ref()
        .map(|b| resolve_name(path, &b.name));
    let header = Header::new(
        options.cluster_bits,
        &options.image,
        options.backing.clone(),
    )
    .map_err(|source| Error::Header {
        path: path.to_path_buf(),
        source,
    })?;

    // Roles that resolve to one file make the image invalid: refuse before writing.
    let addcow_id = file_id(path);
    let image_id = file_id(&image_path);
    let backing_id = backing_path.as_deref().and_then(file_id);
    let same = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| a.is_some() && a == b;
    for (a, b, first, second) in [
        (image_id, addcow_id, "image file", "add-cow file"),
        (image_id, backing_id, "image file", "backing file"),
        (backing_id, addcow_id, "backing file", "add-cow file"),
    ] {
        if same(a, b) {
            return Err(Error::SameFile {
                path: path.to_path_buf(),
                first,
                second,
            });
        }
    }

    let backing_size = match (&options.backing, &backing_path) {
        (Some(backing), Some(backing_path)) => Some(match backing.format {
            BackingFormat::Raw => File::open(backing_path)
                .and_then(|f| f.metadata())
                .ctx(backing_path, "open backing file")?
                .len(),
            BackingFormat::AddCow => AddCow::open(backing_path, Access::ReadOnly)?.size(),
        }),
        _ => None,
    };

    let addcow_existed = addcow_id.is_some();
    let image_existed = image_id.is_some();
    // Files this call created are removed again if it fails.
    let cleanup = |err: Error| {
        if !image_existed {
            let _ = std::fs::remove_file(&image_path);
        }
        if !addcow_existed {
            let _ = std::fs::remove_file(path);
        }
        err
    };
    let meta_file = open_for_create(path)?;
    lock(&meta_file, path, Access::ReadWrite).map_err(cleanup)?;
    let image_file = open_for_create(&image_path).map_err(cleanup)?;
    lock(&image_file, &image_path, Access::ReadWrite).map_err(cleanup)?;
    let existing = image_file
        .metadata()
        .ctx(&image_path, "stat image file")
        .map_err(cleanup)?
        .len();
    let size = match (options.size, image_existed, backing_size) {
        (Some(size), true, _) if size < existing => {
            return Err(cleanup(Error::WouldShrink {
                path: image_path.clone(),
                len: existing,
                requested: size,
            }))
        }
        (Some(size), _, _) => size,
        (None, true, _) => existing,
        (None, false, Some(backing_size)) => backing_size,
        (None, false, None) => {
            return Err(cleanup(Error::NoSize {
                path: image_path.clone(),
            }));
        }
    };
    if let (Some(backing_size), Some(backing_path)) = (backing_size, &backing_path) {
        if backing_size > size {
            return Err(cleanup(Error::BackingLarger {
                backing: backing_path.clone(),
                backing_size,
                image: image_path.clone(),
                image_size: size,
            }));
        }
    }
    if size != existing {
        image_file
            .set_len(size)
            .ctx(&image_path, "resize image file")
            .map_err(cleanup)?;
    }
    image_file
        .sync_all()
        .ctx(&image_path, "sync image file")
        .map_err(cleanup)?;
    write_metadata(&meta_file, path, &header, size).map_err(cleanup)?;
    drop((meta_file, image_file));

    // Opening applies every rule, including those about the whole chain.
    AddCow::open(path, Access::ReadOnly).map(drop)
}

/// Opens `path` for writing, creating it if missing, keeping its contents.
fn open_for_create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(path, "create")
}

/// Writes header, all-zero bitmap and padding to a multiple of the cluster size.
fn write_metadata(file: &File, path: &Path, header: &Header, image_size: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes = header.encode().map_err(|source| Error::Header {
        path: path.to_path_buf(),
        source,
    })?;
    let cluster_size = header.cluster_size();
    let bitmap = bitmap_len(image_size.div_ceil(cluster_size));
    let total = (u64::from(header.header_size()) + bitmap).div_ceil(cluster_size) * cluster_size;
    file.set_len(0).ctx(path, "truncate")?;
    file.write_all_at(&bytes, 0).ctx(path, "write header")?;
    file.set_len(total).ctx(path, "size bitmap")?;
    file.sync_all().ctx(path, "sync")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sizes() {
        assert_eq!(cluster_bits_of(4096).ok(), Some(12));
        assert_eq!(cluster_bits_of(65536).ok(), Some(16));
        assert_eq!(cluster_bits_of(2 << 20).ok(), Some(21));
        for bad in [0, 512, 4097, 3 << 12, 4 << 20] {
            assert!(
                matches!(cluster_bits_of(bad), Err(Error::ClusterSize(_))),
                "{bad}"
            );
        }
    }
}
