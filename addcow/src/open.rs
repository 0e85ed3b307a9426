//! Opening an add-cow image from its path: name resolution, the backing
//! chain (loops, depth, aliasing) and advisory locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::header::{header_size_from_prefix, BackingFormat, Header, FIXED_HEADER_LEN};
use crate::image::{Access, AddCow, Backing, Parts};
use crate::storage::{FileStorage, Storage};

/// Longest backing chain accepted: this many add-cow files below the top one.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Identity of a file on the host, whatever name reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The files met so far while opening one chain, with their roles.
#[derive(Debug, Default)]
struct Chain {
    files: Vec<(FileId, &'static str)>,
    depth: usize,
}

impl Chain {
    /// Records `file` in `role`; the same file in two roles makes the image invalid.
    fn enter(&mut self, file: &File, role: &'static str, addcow: &Path, path: &Path) -> Result<()> {
        let meta = file.metadata().ctx(path, "stat")?;
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some(&(_, first)) = self.files.iter().find(|(f, _)| *f == id) {
            if role == "add-cow file" {
                return Err(Error::ChainLoop {
                    path: path.to_path_buf(),
                });
            }
            return Err(Error::SameFile {
                path: addcow.to_path_buf(),
                first,
                second: role,
            });
        }
        self.files.push((id, role));
        Ok(())
    }
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
/// for writers, shared for readers) without waiting.
pub fn open_locked(path: &Path, access: Access) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .open(path)
        .ctx(path, "open")?;
    lock(&file, path, access)?;
    Ok(file)
}

/// Takes an exclusive (read-write) or shared (read-only) lock without waiting.
pub(crate) fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    let taken = match access {
        Access::ReadWrite => file.try_lock(),
        Access::ReadOnly => file.try_lock_shared(),
    };
    match taken {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(source)) => Err(Error::Io {
            path: path.to_path_buf(),
            op: "lock",
            source,
        }),
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
    let meta_file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .open(path)
        .ctx(path, "open")?;
    chain.enter(&meta_file, "add-cow file", path, path)?;
    lock(&meta_file, path, access)?;
    let meta = FileStorage::new(meta_file);
    let header = read_header(&meta, path)?;

    let image_path = resolve_name(path, &header.image_name);
    let image_file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .open(&image_path)
        .ctx(&image_path, "open image file")?;
    chain.enter(&image_file, "image file", path, &image_path)?;
    lock(&image_file, &image_path, access)?;

    let backing = match &header.backing {
        Some(backing) if !header.all_allocated() => {
            let backing_path = resolve_name(path, &backing.name);
            Some(match backing.format {
                BackingFormat::Raw => {
                    let file = File::open(&backing_path).ctx(&backing_path, "open backing file")?;
                    chain.enter(&file, "backing file", path, &backing_path)?;
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
        _ => None,
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
