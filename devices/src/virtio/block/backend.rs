//! What a virtio-blk device reads and writes: an add-cow image or a raw file.
//!
//! The format is chosen by the host (`format=` or the `.add-cow` extension),
//! never from bytes the guest can write: a raw disk whose first bytes a guest
//! set to "ACOW" stays a raw disk.

use std::path::Path;

use addcow::{Access, AddCow, FileStorage, Storage};

/// A host I/O error, as text for the log line.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Positioned block storage behind a virtio-blk device.
pub trait DiskBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// Makes a range read as zeros (WRITE_ZEROES and DISCARD).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError>;
}

impl DiskBackend for AddCow {
    fn size(&self) -> u64 {
        AddCow::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        Ok(AddCow::read_at(self, buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        Ok(AddCow::write_at(self, buf, offset)?)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(AddCow::flush(self)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        Ok(AddCow::write_zeroes(self, offset, len)?)
    }
}

/// A raw disk image file.
#[derive(Debug)]
pub struct RawDisk {
    file: FileStorage,
    size: u64,
}

impl DiskBackend for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        Ok(self.file.read_exact_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        Ok(self.file.write_all_at(buf, offset)?)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(self.file.sync_data()?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        Ok(self.file.write_zeroes(offset, len)?)
    }
}

/// How to read a disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// An add-cow image (with its image file and backing chain).
    AddCow,
    /// A raw file.
    Raw,
}

impl DiskFormat {
    /// add-cow for a `.add-cow` file name, raw for anything else.
    pub fn from_extension(path: &Path) -> DiskFormat {
        match path.extension() {
            Some(ext) if ext == "add-cow" => DiskFormat::AddCow,
            _ => DiskFormat::Raw,
        }
    }
}

/// Opens a disk with the locks its use needs (exclusive unless read-only).
pub fn open_disk(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
) -> addcow::Result<Box<dyn DiskBackend>> {
    let access = if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    Ok(match format {
        DiskFormat::AddCow => Box::new(AddCow::open(path, access)?),
        DiskFormat::Raw => {
            let file = FileStorage::new(addcow::open_locked(path, access)?);
            let size = file.len().map_err(|source| addcow::Error::Io {
                path: path.to_path_buf(),
                op: "stat",
                source,
            })?;
            Box::new(RawDisk { file, size })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_comes_from_the_name_never_the_bytes() -> Result<(), BackendError> {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("disk.img");
        // A raw disk a guest filled with an add-cow header naming a host file.
        let mut bytes = vec![0u8; 1 << 16];
        bytes[..4].copy_from_slice(b"ACOW");
        std::fs::write(&raw, &bytes)?;
        assert_eq!(DiskFormat::from_extension(&raw), DiskFormat::Raw);
        let disk = open_disk(&raw, DiskFormat::from_extension(&raw), false)?;
        assert_eq!(disk.size(), 1 << 16);
        let mut head = [0u8; 4];
        disk.read_at(&mut head, 0)?;
        assert_eq!(&head, b"ACOW");
        assert_eq!(
            DiskFormat::from_extension(Path::new("x.add-cow")),
            DiskFormat::AddCow
        );
        Ok(())
    }
}
