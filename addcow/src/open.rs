//! Opening an add-cow image from its path: name resolution, the backing
//! chain (loops, depth, aliasing) and advisory locks.

use std::fs::{File, FileType, OpenOptions, TryLockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bitmap::{bitmap_len, MAX_BITMAP_BYTES, MAX_CHAIN_BITMAP_BYTES};
use crate::error::{Error, IoContext, Result};
use crate::header::{header_size_from_prefix, BackingFormat, Header, FIXED_HEADER_LEN};
use crate::image::{Access, AddCow, Backing, Parts};
use crate::storage::{file_size, FileStorage, Storage};

/// Longest backing chain accepted: this many add-cow files below the top one.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Identity of a file on the host, whatever name reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file. A loop device is the file it is
    /// attached to: writing one writes the other.
    pub fn of(file: &File, path: &Path) -> Result<FileId> {
        let meta = file.metadata().ctx(path, "stat")?;
        if is_loop_device(&meta) {
            if let Ok(id) = loop_backing(file) {
                return Ok(id);
            }
        }
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The major number of loop devices (Linux `LOOP_MAJOR`).
const LOOP_MAJOR: u32 = 7;
/// `LOOP_GET_STATUS64` of `<linux/loop.h>`.
const LOOP_GET_STATUS64: libc::c_ulong = 0x4c05;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

fn is_loop_device(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_block_device() && libc::major(meta.rdev()) == LOOP_MAJOR
}

/// Identity of the file a loop device is attached to; `ENXIO` when it is
/// attached to nothing.
fn loop_backing(file: &File) -> std::io::Result<FileId> {
    // SAFETY: all-zero bytes are a valid `LoopInfo64` (integers and arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, which
    // `info` is (repr(C), same layout), into memory it borrows mutably for
    // the call; the descriptor is owned by `file` and open.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(FileId {
        dev: info.lo_device,
        ino: info.lo_inode,
    })
}

/// A file an open image reads or writes: its name, role and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    /// The path it was opened by.
    pub path: PathBuf,
    /// "add-cow file", "image file" or "backing file".
    pub role: &'static str,
    /// Its identity.
    pub id: FileId,
}

/// The files met so far while opening one chain, with their roles.
#[derive(Debug, Default)]
struct Chain {
    files: Vec<ChainFile>,
    depth: usize,
    /// Bitmap bytes of the layers met so far.
    bitmap_bytes: u64,
}

impl Chain {
    /// Records `file` in `role`; the same file in two roles makes the image invalid.
    fn enter(
        &mut self,
        file: &File,
        role: &'static str,
        addcow: &Path,
        path: &Path,
    ) -> Result<ChainFile> {
        let id = FileId::of(file, path)?;
        if let Some(first) = self.files.iter().find(|f| f.id == id) {
            if role == "add-cow file" {
                return Err(Error::ChainLoop {
                    path: path.to_path_buf(),
                });
            }
            return Err(Error::SameFile {
                path: addcow.to_path_buf(),
                first: first.role,
                second: role,
            });
        }
        let entry = ChainFile {
            path: path.to_path_buf(),
            role,
            id,
        };
        self.files.push(entry.clone());
        Ok(entry)
    }
}

/// What a file type is called in messages, unless it is one add-cow uses
/// (a regular file or a block device).
fn unusable_kind(kind: FileType) -> Option<&'static str> {
    if kind.is_file() || kind.is_block_device() {
        None
    } else if kind.is_dir() {
        Some("directory")
    } else if kind.is_fifo() {
        Some("FIFO")
    } else if kind.is_socket() {
        Some("socket")
    } else if kind.is_char_device() {
        Some("character device")
    } else {
        Some("special file")
    }
}

/// Opens `path` with `options` without blocking (a FIFO would wait for a
/// writer forever) and refuses anything but a regular file or a block device,
/// by its name before opening and by the opened file after, and a loop
/// device attached to no file (it would read as an empty disk).
/// Every file of an image is opened through here.
pub fn open_checked(path: &Path, options: &OpenOptions, op: &'static str) -> Result<File> {
    // Opening a device can act (a watchdog arms, a tape rewinds): look first.
    // The opened file is checked again below, whatever happens in between.
    if let Some(kind) = std::fs::metadata(path)
        .ok()
        .and_then(|m| unusable_kind(m.file_type()))
    {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let mut options = options.clone();
    let opened = options.custom_flags(libc::O_NONBLOCK).open(path);
    let file = match opened {
        Ok(file) => file,
        Err(source) => {
            // A socket (or a FIFO opened for writing alone) cannot be opened at all.
            let kind = std::fs::metadata(path)
                .ok()
                .and_then(|m| unusable_kind(m.file_type()));
            return Err(match kind {
                Some(kind) => Error::NotAFile {
                    path: path.to_path_buf(),
                    kind,
                },
                None => Error::Io {
                    path: path.to_path_buf(),
                    op,
                    source,
                },
            });
        }
    };
    let meta = file.metadata().ctx(path, "stat")?;
    if let Some(kind) = unusable_kind(meta.file_type()) {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    if is_loop_device(&meta) {
        if let Err(err) = loop_backing(&file) {
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Err(Error::LoopDetached {
                    path: path.to_path_buf(),
                });
            }
        }
    }
    // SAFETY: fcntl only reads and sets the status flags of a descriptor
    // that `file` owns and keeps open for the calls.
    let cleared = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(std::io::Error::last_os_error()).ctx(path, "fcntl");
    }
    Ok(file)
}

/// Options to open an existing file for `access`.
pub(crate) fn options_for(access: Access) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(access == Access::ReadWrite);
    options
}

/// Resolves a name stored in `addcow`'s header: relative names are relative
/// to the add-cow file's directory, never to the working directory.
pub fn resolve_name(addcow: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match addcow.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

/// Opens `path` for `access` and takes the matching advisory lock (exclusive
/// for writers, shared for readers), see [`lock`].
pub fn open_locked(path: &Path, access: Access) -> Result<File> {
    let file = open_checked(path, &options_for(access), "open")?;
    lock(&file, path, access)?;
    Ok(file)
}

/// How long [`lock`] keeps trying a lock that is held: long enough to outlast
/// a `fork`-to-`exec` window, short enough that a real holder is reported at
/// once to a person.
const LOCK_PATIENCE: Duration = Duration::from_millis(250);

/// Takes an exclusive (read-write) or shared (read-only) lock, or reports
/// [`Error::Locked`] when another holder keeps it.
///
/// A held lock is tried again for [`LOCK_PATIENCE`]: `flock` locks belong to
/// the open file, and a child forked by any thread of this process holds a
/// copy of every descriptor until its `exec` closes them. For that window a
/// file this process has already closed still looks locked, and a program
/// that spawns processes while it opens images (a test harness, a VMM with
/// helpers) would see its own images "in use".
pub fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    let mut pause = Duration::from_millis(1);
    loop {
        let taken = match access {
            Access::ReadWrite => file.try_lock(),
            Access::ReadOnly => file.try_lock_shared(),
        };
        match taken {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(32));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    op: "lock",
                    source,
                })
            }
        }
    }
}

/// Reads and validates the header of an open add-cow file.
pub(crate) fn read_header(meta: &dyn Storage, path: &Path) -> Result<Header> {
    let header_err = |source| Error::Header {
        path: path.to_path_buf(),
        source,
    };
    let len = meta.len().ctx(path, "stat")?;
    let mut prefix = [0u8; FIXED_HEADER_LEN];
    let prefix_len = len.min(FIXED_HEADER_LEN as u64) as usize;
    meta.read_exact_at(&mut prefix[..prefix_len], 0)
        .ctx(path, "read header")?;
    let header_size = header_size_from_prefix(&prefix[..prefix_len]).map_err(header_err)?;
    if len < u64::from(header_size) {
        return Err(header_err(crate::header::HeaderError::Truncated {
            len,
            needed: u64::from(header_size),
        }));
    }
    // At most 2 MiB, and present in the file.
    let mut bytes = vec![0u8; header_size as usize];
    meta.read_exact_at(&mut bytes, 0).ctx(path, "read header")?;
    Header::decode(&bytes).map_err(header_err)
}

impl AddCow {
    /// Opens the add-cow file at `path` with its image file and backing chain.
    pub fn open(path: &Path, access: Access) -> Result<AddCow> {
        open_in_chain(path, access, &mut Chain::default())
    }

    /// Opens an image on storages the caller provides instead of host files
    /// (the seam for fault-injection tests): reads and checks the header
    /// from `meta`; `image` and `backing` stand for the files it names, and
    /// `path` is used for messages. No locks or name checks apply.
    pub fn open_storage(
        path: &Path,
        meta: Box<dyn Storage>,
        image: Box<dyn Storage>,
        backing: Option<Backing>,
        access: Access,
    ) -> Result<AddCow> {
        let header = read_header(meta.as_ref(), path)?;
        let image_path = resolve_name(path, &header.image_name);
        AddCow::from_parts(
            header,
            Parts {
                path: path.to_path_buf(),
                meta,
                image,
                image_path,
                backing,
                access,
                files: Vec::new(),
            },
        )
    }
}

fn open_in_chain(path: &Path, access: Access, chain: &mut Chain) -> Result<AddCow> {
    if chain.depth > MAX_CHAIN_DEPTH {
        return Err(Error::ChainTooDeep {
            path: path.to_path_buf(),
            max: MAX_CHAIN_DEPTH,
        });
    }
    chain.depth += 1;
    let mut files = Vec::new();
    let meta_file = open_checked(path, &options_for(access), "open")?;
    files.push(chain.enter(&meta_file, "add-cow file", path, path)?);
    lock(&meta_file, path, access)?;
    let meta = FileStorage::new(meta_file);
    let header = read_header(&meta, path)?;

    let image_path = resolve_name(path, &header.image_name);
    let image_file = open_checked(&image_path, &options_for(access), "open image file")?;
    files.push(chain.enter(&image_file, "image file", path, &image_path)?);
    lock(&image_file, &image_path, access)?;
    if !header.all_allocated() {
        // Counted before the layers below are opened: a hostile chain is
        // refused before any of its bitmaps is in memory.
        let size = file_size(&image_file).ctx(&image_path, "stat image file")?;
        let needed = bitmap_len(size.div_ceil(header.cluster_size()));
        chain.bitmap_bytes = chain.bitmap_bytes.saturating_add(needed);
        if needed <= MAX_BITMAP_BYTES && chain.bitmap_bytes > MAX_CHAIN_BITMAP_BYTES {
            return Err(Error::ChainBitmapsTooLarge {
                path: path.to_path_buf(),
                total: chain.bitmap_bytes,
                max: MAX_CHAIN_BITMAP_BYTES,
            });
        }
    }

    let backing = match &header.backing {
        Some(backing) if header.all_allocated() => {
            // Not read, but it may still not be the image file or this file.
            let backing_path = resolve_name(path, &backing.name);
            if let Ok(file) = open_checked(&backing_path, &options_for(Access::ReadOnly), "open") {
                let id = FileId::of(&file, &backing_path)?;
                if let Some(first) = files.iter().find(|f| f.id == id) {
                    return Err(Error::SameFile {
                        path: path.to_path_buf(),
                        first: first.role,
                        second: "backing file",
                    });
                }
            }
            None
        }
        Some(backing) => {
            let backing_path = resolve_name(path, &backing.name);
            Some(match backing.format {
                BackingFormat::Raw => {
                    let file = open_checked(
                        &backing_path,
                        &options_for(Access::ReadOnly),
                        "open backing file",
                    )?;
                    files.push(chain.enter(&file, "backing file", path, &backing_path)?);
                    lock(&file, &backing_path, Access::ReadOnly)?;
                    let storage = FileStorage::new(file);
                    let size = storage.len().ctx(&backing_path, "stat backing file")?;
                    Backing::Raw {
                        storage: Box::new(storage),
                        size,
                        path: backing_path,
                    }
                }
                BackingFormat::AddCow => Backing::AddCow(Box::new(open_in_chain(
                    &backing_path,
                    Access::ReadOnly,
                    chain,
                )?)),
            })
        }
        None => None,
    };

    AddCow::from_parts(
        header,
        Parts {
            path: path.to_path_buf(),
            meta: Box::new(meta),
            image: Box::new(FileStorage::new(image_file)),
            image_path,
            backing,
            access,
            files,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_addcow_directory() {
        assert_eq!(
            resolve_name(Path::new("/vm/disks/a.add-cow"), Path::new("a.raw")),
            PathBuf::from("/vm/disks/a.raw")
        );
        assert_eq!(
            resolve_name(Path::new("/vm/disks/a.add-cow"), Path::new("/base/b.img")),
            PathBuf::from("/base/b.img")
        );
        assert_eq!(
            resolve_name(Path::new("a.add-cow"), Path::new("a.raw")),
            PathBuf::from("a.raw")
        );
    }
}
