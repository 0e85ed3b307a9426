//! Creating add-cow images, and probing the format of a backing file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::bitmap::{bitmap_len, MAX_BITMAP_BYTES, MAX_CHAIN_BITMAP_BYTES};
use crate::error::{Error, IoContext, Result};
use crate::header::{BackingFormat, BackingRef, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::image::{Access, AddCow};
use crate::open::MAX_CHAIN_DEPTH;
use crate::open::{lock, open_checked, options_for, resolve_name, ChainFile, FileId};
use crate::storage::{file_size, unlock_before_close, FileStorage};

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
    open_checked(path, &options_for(Access::ReadOnly), "open")?
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

/// The backing chain of an image being created, opened read-only (holding
/// its shared locks) and checked whole before anything is written.
struct Base {
    /// Size of the base: a raw file's or device's size, an add-cow's virtual size.
    size: u64,
    /// Every host file of the chain, the backing file first.
    files: Vec<ChainFile>,
    /// Memory the chain's bitmaps take.
    bitmap_bytes: u64,
    /// Open handles: they keep the locks until create is done.
    _raw: Option<FileStorage>,
    _addcow: Option<AddCow>,
}

fn open_base(path: &Path, backing_path: &Path, format: BackingFormat) -> Result<Base> {
    match format {
        BackingFormat::Raw => {
            let file = open_checked(
                backing_path,
                &options_for(Access::ReadOnly),
                "open backing file",
            )?;
            lock(&file, backing_path, Access::ReadOnly)?;
            let size = file_size(&file).ctx(backing_path, "stat backing file")?;
            let files = vec![ChainFile {
                path: backing_path.to_path_buf(),
                role: "backing file",
                id: FileId::of(&file, backing_path)?,
            }];
            Ok(Base {
                size,
                files,
                bitmap_bytes: 0,
                _raw: Some(FileStorage::new(file)),
                _addcow: None,
            })
        }
        BackingFormat::AddCow => {
            let image = AddCow::open(backing_path, Access::ReadOnly)?;
            if image.chain_depth() + 1 > MAX_CHAIN_DEPTH {
                return Err(Error::ChainTooDeep {
                    path: path.to_path_buf(),
                    max: MAX_CHAIN_DEPTH,
                });
            }
            Ok(Base {
                size: image.size(),
                files: image.chain_files(),
                bitmap_bytes: image.chain_bitmap_bytes(),
                _raw: None,
                _addcow: Some(image),
            })
        }
    }
}

/// A file create writes: opened if it exists (nothing changes by that),
/// created empty and exclusively if not.
struct Target {
    file: File,
    created: bool,
}

impl Drop for Target {
    fn drop(&mut self) {
        unlock_before_close(&self.file);
    }
}

fn open_target(path: &Path) -> Result<Target> {
    let mut existing = OpenOptions::new();
    existing.read(true).write(true);
    match open_checked(path, &existing, "open") {
        Ok(file) => Ok(Target {
            file,
            created: false,
        }),
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let mut new = OpenOptions::new();
            new.read(true).write(true).create_new(true);
            Ok(Target {
                file: open_checked(path, &new, "create")?,
                created: true,
            })
        }
        Err(err) => Err(err),
    }
}

/// Refuses a target that is a file of the backing chain: the direct backing
/// file is "the same file", anything further down "in the backing chain".
fn refuse_chain_member(
    path: &Path,
    target: &File,
    target_path: &Path,
    role: &'static str,
    base: &Base,
) -> Result<()> {
    let id = FileId::of(target, target_path)?;
    match base.files.iter().position(|f| f.id == id) {
        None => Ok(()),
        Some(0) => Err(Error::SameFile {
            path: path.to_path_buf(),
            first: role,
            second: "backing file",
        }),
        Some(i) => Err(Error::InBackingChain {
            path: target_path.to_path_buf(),
            role,
            other: base.files[i].path.clone(),
            other_role: base.files[i].role,
        }),
    }
}

/// Makes the new name of `file` durable: fsyncs its directory.
fn sync_parent(file: &Path) -> Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(dir, "sync directory")
}

/// Creates (or overwrites) the add-cow file at `path`. The image file is
/// created sparse when missing and grown to `size` when asked, never shrunk;
/// the backing file is only read.
///
/// The whole backing chain is opened and checked (loops, depth, every file's
/// identity against the files being written) before any file is written: on
/// failure no existing file has changed and no new file is left behind.
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let image_path = resolve_name(path, &options.image);
    let header = Header::new(
        options.cluster_bits,
        &options.image,
        options.backing.clone(),
    )
    .map_err(|source| Error::Header {
        path: path.to_path_buf(),
        source,
    })?;
    let base = match &options.backing {
        Some(backing) => Some(open_base(
            path,
            &resolve_name(path, &backing.name),
            backing.format,
        )?),
        None => None,
    };

    let meta = open_target(path)?;
    let image = match open_target(&image_path) {
        Ok(image) => image,
        Err(err) => {
            if meta.created {
                let _ = std::fs::remove_file(path);
            }
            return Err(err);
        }
    };
    // Files this call created are removed again if it fails.
    let cleanup = |err: Error| {
        if image.created {
            let _ = std::fs::remove_file(&image_path);
        }
        if meta.created {
            let _ = std::fs::remove_file(path);
        }
        err
    };
    prepare(
        path,
        &image_path,
        &header,
        options,
        base.as_ref(),
        &meta,
        &image,
    )
    .map_err(cleanup)?;
    drop((meta, image, base));
    // Opening once more confirms the result.
    AddCow::open(path, Access::ReadOnly).map(drop)
}

/// Checks everything, then writes: sizes the image file and writes the
/// add-cow file.
fn prepare(
    path: &Path,
    image_path: &Path,
    header: &Header,
    options: &CreateOptions,
    base: Option<&Base>,
    meta: &Target,
    image: &Target,
) -> Result<()> {
    if FileId::of(&meta.file, path)? == FileId::of(&image.file, image_path)? {
        return Err(Error::SameFile {
            path: path.to_path_buf(),
            first: "image file",
            second: "add-cow file",
        });
    }
    if let Some(base) = base {
        refuse_chain_member(path, &image.file, image_path, "image file", base)?;
        refuse_chain_member(path, &meta.file, path, "add-cow file", base)?;
    }
    let meta_kind = meta.file.metadata().ctx(path, "stat")?.file_type();
    if meta_kind.is_block_device() {
        return Err(Error::AddCowOnDevice {
            path: path.to_path_buf(),
        });
    }
    lock(&meta.file, path, Access::ReadWrite)?;
    lock(&image.file, image_path, Access::ReadWrite)?;
    let existing = file_size(&image.file).ctx(image_path, "stat image file")?;
    let backing_size = base.map(|b| b.size);
    let size = match (options.size, image.created, backing_size) {
        (Some(size), false, _) if size < existing => {
            return Err(Error::WouldShrink {
                path: image_path.to_path_buf(),
                len: existing,
                requested: size,
            })
        }
        (Some(size), _, _) => size,
        (None, false, _) => existing,
        (None, true, Some(backing_size)) => backing_size,
        (None, true, None) => {
            return Err(Error::NoSize {
                path: image_path.to_path_buf(),
            });
        }
    };
    let is_device = image
        .file
        .metadata()
        .ctx(image_path, "stat image file")?
        .file_type()
        .is_block_device();
    if is_device && size != existing {
        return Err(Error::DeviceSize {
            path: image_path.to_path_buf(),
            len: existing,
            requested: size,
        });
    }
    if let (Some(base), Some(backing)) = (base, &options.backing) {
        if base.size > size {
            return Err(Error::BackingLarger {
                backing: resolve_name(path, &backing.name),
                backing_size: base.size,
                image: image_path.to_path_buf(),
                image_size: size,
            });
        }
    }
    let needed = bitmap_len(size.div_ceil(header.cluster_size()));
    if needed > MAX_BITMAP_BYTES {
        return Err(Error::BitmapTooLarge {
            path: path.to_path_buf(),
            needed,
            max: MAX_BITMAP_BYTES,
            image_size: size,
        });
    }
    let total = needed + base.map_or(0, |b| b.bitmap_bytes);
    if total > MAX_CHAIN_BITMAP_BYTES {
        return Err(Error::ChainBitmapsTooLarge {
            path: path.to_path_buf(),
            total,
            max: MAX_CHAIN_BITMAP_BYTES,
        });
    }

    // Every check passed: now the files change.
    if size != existing {
        image
            .file
            .set_len(size)
            .ctx(image_path, "resize image file")?;
    }
    let written = image
        .file
        .sync_all()
        .ctx(image_path, "sync image file")
        .and_then(|()| write_metadata(&meta.file, path, header, size));
    if let Err(err) = written {
        // A full disk, say: the existing image file gets its length back.
        if size != existing && !image.created {
            let _ = image.file.set_len(existing);
        }
        return Err(err);
    }
    for (target, target_path) in [(meta, path), (image, image_path)] {
        if target.created {
            sync_parent(target_path)?;
        }
    }
    Ok(())
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
