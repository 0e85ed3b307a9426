//! The seam between the add-cow logic and the bytes on disk.
//!
//! Everything the library reads or writes goes through [`Storage`]: positioned
//! I/O with `&self`, so one open image can serve several threads, and an
//! explicit `sync_data` so that the order in which data becomes durable is
//! visible in the code (and can be tested by a storage that forgets what was
//! not synced, as a power cut does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positioned, thread-safe byte storage: a file, or a test double of one.
#[allow(clippy::len_without_is_empty)] // a storage is a file, not a collection
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes `len` bytes from `offset` read as zeros, freeing space where it can.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A [`Storage`] on a host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }

    /// The file, for locking and metadata.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Largest run of zeros written at once when the file system cannot punch holes.
const ZERO_CHUNK: u64 = 1 << 20;

impl Storage for FileStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is
        // owned by `self.file` and stays open for the call.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if ret == 0 {
            // A hole punched past the end does not extend the file.
            if offset + len > self.len()? {
                self.file.set_len(offset + len)?;
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zeroes_punches_and_extends() -> io::Result<()> {
        let file = tempfile::tempfile()?;
        let s = FileStorage::new(file);
        s.write_all_at(&[0xaa; 8192], 0)?;
        s.write_zeroes(1000, 3000)?;
        let mut buf = [0u8; 8192];
        s.read_exact_at(&mut buf, 0)?;
        assert!(buf[..1000].iter().all(|&b| b == 0xaa));
        assert!(buf[1000..4000].iter().all(|&b| b == 0));
        assert!(buf[4000..].iter().all(|&b| b == 0xaa));
        s.write_zeroes(8000, 2000)?;
        assert_eq!(s.len()?, 10000);
        Ok(())
    }

    #[test]
    fn read_past_end_is_an_error() -> io::Result<()> {
        let s = FileStorage::new(tempfile::tempfile()?);
        s.write_all_at(&[1; 10], 0)?;
        let mut buf = [0u8; 11];
        let err = s.read_exact_at(&mut buf, 0).expect_err("short read");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        Ok(())
    }
}
