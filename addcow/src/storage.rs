//! The seam between the add-cow logic and the bytes on disk.
//!
//! Everything the library reads or writes goes through [`Storage`]: positioned
//! I/O with `&self`, so one open image can serve several threads, and an
//! explicit `sync_data` so that the order in which data becomes durable is
//! visible in the code (and can be tested by a storage that forgets what was
//! not synced, as a power cut does).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;

use crate::iobuf::{IoBufs, IoBufsMut};

/// Size in bytes of an open file: a regular file's length, or a block
/// device's size (its metadata says 0, so it is asked by seeking to the end).
/// Positioned I/O ignores the file offset this moves.
pub fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut handle = file;
        return handle.seek(SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Positioned, thread-safe byte storage: a file, or a test double of one.
#[allow(clippy::len_without_is_empty)] // a storage is a file, not a collection
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills every byte of `bufs` from `offset` on, in order; reading past
    /// the end is an `UnexpectedEof` error. The default reads into a
    /// buffer and copies; a file reads straight into `bufs` (`preadv`).
    fn read_vectored_exact_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        let mut buf = vec![0u8; bufs.len()];
        self.read_exact_at(&mut buf, offset)?;
        bufs.copy_from(&buf);
        Ok(())
    }
    /// Writes every byte of `bufs` in order from `offset` on, growing the
    /// storage if needed. The default copies into a buffer and writes it;
    /// a file writes straight from `bufs` (`pwritev`).
    fn write_vectored_all_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        let mut buf = vec![0u8; bufs.len()];
        bufs.copy_to(&mut buf);
        self.write_all_at(&buf, offset)
    }
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes `len` bytes from `offset` read as zeros, freeing space where it can.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes from `offset` read as zeros and stay allocated, so
    /// that later writes there cannot fail for lack of space (a guest that
    /// preallocates). The default writes the zeros.
    fn zero_allocated(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_chunks(self, offset, len)
    }
    /// Frees what it can of the range; what it reads afterwards is
    /// unspecified (a hint, like TRIM). The default frees nothing.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// The end of the data that starts at `offset`: the next hole, or
    /// `offset` itself when it is in a hole. A storage that knows no holes
    /// answers `u64::MAX`.
    fn data_end(&self, _offset: u64) -> io::Result<u64> {
        Ok(u64::MAX)
    }

    /// The first byte of data at or after `offset`, `None` when only holes
    /// follow (holes read as zeros).
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }

    /// Copies `len` bytes from `offset` into `out` at `out_offset`. This
    /// one reads and writes through a buffer; a file copies in the kernel.
    fn copy_to(&self, offset: u64, len: u64, out: &File, out_offset: u64) -> io::Result<()> {
        copy_through_buffer(self, offset, len, out, out_offset)
    }
}

/// Writes `len` zero bytes at `offset`, a chunk at a time.
fn write_zero_chunks<S: Storage + ?Sized>(storage: &S, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        storage.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// `fallocate(2)` on `file`; `Ok(false)` when the file system does not
/// support `mode`.
fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // owned by `file` and stays open for the call.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(false);
    }
    Err(err)
}

/// Largest buffer [`Storage::copy_to`] reads into at once.
const COPY_CHUNK: u64 = 1 << 20;

/// [`Storage::copy_to`] by reading into memory and writing from it.
fn copy_through_buffer<S: Storage + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    out: &File,
    out_offset: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_CHUNK) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        out.write_all_at(&buf[..n], out_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A [`Storage`] on a host file. Dropping it releases the file's lock
/// before closing it (see [`unlock_before_close`]).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        unlock_before_close(&self.file);
    }
}

/// Releases `file`'s advisory lock, if it holds one, ahead of its close.
///
/// `flock` locks belong to the open file, and a child that any thread of
/// this process forks holds a copy of every descriptor until its `exec`: a
/// lock merely closed lives on in that copy, and the next open of the file,
/// here or in another process, would find it "in use". An unlock releases
/// the lock for every copy. No descriptor of a disk file is ever
/// duplicated, so no other handle loses a lock it needs.
pub(crate) fn unlock_before_close(file: &File) {
    // Nothing to do on failure: the close releases the lock anyway.
    let _ = file.unlock();
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

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE`: `None` when nothing of that
    /// kind follows `offset` (`ENXIO`). A file system that cannot tell
    /// reports data up to the end of the file, as Linux does generically.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let Ok(off) = i64::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek only reads its integer arguments; the descriptor is
        // owned by `self.file`. Positioned I/O ignores the offset it moves.
        let ret = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if ret >= 0 {
            return Ok(Some(ret as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    }
}

/// Most pieces one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// `preadv` (`write == false`) or `pwritev` of all of `list` at `offset`
/// (`pread`/`pwrite` for one piece), again after short transfers and
/// `EINTR`. The list is only copied when a transfer comes back short.
///
/// # Safety
///
/// Every piece of `list` must be valid for the transfer (writable for
/// `preadv`, readable for `pwritev`) for the whole call.
unsafe fn transfer_all(
    file: &File,
    list: &[libc::iovec],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    let mut owned: Option<Vec<libc::iovec>> = None;
    let mut offset = offset;
    let mut first = 0;
    loop {
        let iov = owned.as_deref().unwrap_or(list);
        if first == iov.len() {
            return Ok(());
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let count = (iov.len() - first).min(IOV_MAX);
        let fd = file.as_raw_fd();
        // SAFETY: `iov[first..first + count]` are initialised iovecs; the
        // memory they describe is valid for this transfer (the caller's
        // contract); the descriptor is owned by `file` and open. One piece
        // goes to `pread`/`pwrite`, which skip copying in an iovec array
        // (most requests have one data piece).
        let ret = unsafe {
            match (count, write) {
                (1, true) => libc::pwrite(fd, iov[first].iov_base, iov[first].iov_len, off),
                (1, false) => libc::pread(fd, iov[first].iov_base, iov[first].iov_len, off),
                (_, true) => libc::pwritev(fd, iov[first..].as_ptr(), count as libc::c_int, off),
                (_, false) => libc::preadv(fd, iov[first..].as_ptr(), count as libc::c_int, off),
            }
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            return Err(io::Error::from(if write {
                io::ErrorKind::WriteZero
            } else {
                io::ErrorKind::UnexpectedEof
            }));
        }
        let mut done = ret as usize;
        offset += done as u64;
        // Whole pieces done are skipped in place; only a piece done in part
        // needs its start moved, in a copy of the list.
        while first < iov.len() && done >= iov[first].iov_len {
            done -= iov[first].iov_len;
            first += 1;
        }
        if done > 0 {
            let piece = &mut owned.get_or_insert_with(|| list.to_vec())[first];
            piece.iov_base = piece.iov_base.cast::<u8>().wrapping_add(done).cast();
            piece.iov_len -= done;
        }
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

    fn read_vectored_exact_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: the pieces of `bufs` are writable while it is mutably
        // borrowed, which lasts the call.
        unsafe { transfer_all(&self.file, bufs.iovecs(), offset, false) }
    }

    fn write_vectored_all_at(&self, bufs: &IoBufs<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: the pieces of `bufs` are readable while it is borrowed,
        // which lasts the call.
        unsafe { transfer_all(&self.file, bufs.iovecs(), offset, true) }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        file_size(&self.file)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A hole punched past the end does not extend the file. It is
        // extended first by a zero byte written at the range's last byte,
        // never by `set_len`: a size read here may be stale by the time it
        // is set, and `set_len` would then cut off a write past the range
        // that completed meanwhile. The byte is inside the range, so the
        // punch frees it again.
        if end > self.len()? {
            self.file.write_all_at(&[0], end - 1)?;
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, punch, offset, len)? {
            return Ok(());
        }
        write_zero_chunks(self, offset, len)
    }

    fn zero_allocated(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // ZERO_RANGE, else a hole filled with allocated blocks, else the
        // zeros themselves.
        if fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, offset, len)? {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, punch, offset, len)? && fallocate(&self.file, 0, offset, len)? {
            return Ok(());
        }
        write_zero_chunks(self, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // A file system that cannot punch holes frees nothing: fine for a hint.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(&self.file, punch, offset, len).map(drop)
    }

    fn data_end(&self, offset: u64) -> io::Result<u64> {
        match self.seek(offset, libc::SEEK_HOLE) {
            // Past the end (ENXIO) there is no data: the end is here.
            Ok(hole) => Ok(hole.unwrap_or(offset)),
            // A file that cannot tell is all data.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(u64::MAX),
            Err(err) => Err(err),
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.seek(offset, libc::SEEK_DATA) {
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            other => other,
        }
    }

    fn copy_to(&self, offset: u64, len: u64, out: &File, out_offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let (Ok(mut from), Ok(mut to)) = (
                i64::try_from(offset + done),
                i64::try_from(out_offset + done),
            ) else {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            };
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both descriptors stay open for the call, and the two
            // offsets are locals the kernel reads and updates.
            let ret = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut from,
                    out.as_raw_fd(),
                    &mut to,
                    n,
                    0,
                )
            };
            match ret {
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                n if n > 0 => done += n as u64,
                _ => {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // Not two files the kernel can copy between (a block
                        // device, another file system, an old kernel).
                        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                            let rest = len - done;
                            return copy_through_buffer(
                                self,
                                offset + done,
                                rest,
                                out,
                                out_offset + done,
                            );
                        }
                        _ => return Err(err),
                    }
                }
            }
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

    /// Vectored reads and writes move exactly the bytes of each piece, in
    /// order, also when the kernel transfers less than asked (checked
    /// against the file's bytes read back with plain reads).
    #[test]
    fn vectored_io_moves_each_piece_at_its_place() -> io::Result<()> {
        let s = FileStorage::new(tempfile::tempfile()?);
        let (a, b, c) = (vec![1u8; 1000], vec![2u8; 5000], vec![3u8; 96]);
        let mut w = IoBufs::from_slice(&a);
        w.push(&b);
        w.push(&c);
        s.write_vectored_all_at(&w, 100)?;
        let mut plain = vec![0u8; 6196];
        s.read_exact_at(&mut plain, 0)?;
        assert!(plain[..100].iter().all(|&x| x == 0));
        assert!(plain[100..1100].iter().all(|&x| x == 1));
        assert!(plain[1100..6100].iter().all(|&x| x == 2));
        assert!(plain[6100..].iter().all(|&x| x == 3));
        let (mut x, mut y) = (vec![0u8; 1050], vec![0u8; 46]);
        let mut r = IoBufsMut::from_slice(&mut x);
        r.push(&mut y);
        s.read_vectored_exact_at(&mut r, 5100)?;
        assert!(x[..1000].iter().all(|&v| v == 2) && x[1000..].iter().all(|&v| v == 3));
        assert!(y.iter().all(|&v| v == 3));
        // More pieces than one call takes: the rest go in further calls.
        let many = vec![7u8; 3000];
        let mut w = IoBufs::new();
        for chunk in many.chunks(1) {
            w.push(chunk);
        }
        s.write_vectored_all_at(&w, 0)?;
        let mut back = vec![0u8; 3000];
        s.read_exact_at(&mut back, 0)?;
        assert_eq!(back, many);
        let mut r = IoBufsMut::from_slice(&mut back);
        let err = s
            .read_vectored_exact_at(&mut r, 6000)
            .expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        Ok(())
    }

    /// A zeroing past the end of the file must never shrink it: a write
    /// beyond the zeroed range that completed meanwhile (another cluster's
    /// copy-on-write, which no range lock orders against it) keeps its
    /// bytes. The size check and `set_len` after the punch raced with it.
    #[test]
    fn zeroing_past_the_end_never_truncates_a_concurrent_write() -> io::Result<()> {
        let s = FileStorage::new(tempfile::tempfile()?);
        let data = [0x5au8; 4096];
        let barrier = std::sync::Barrier::new(2);
        for i in 0..4000u64 {
            let base = i * 8192;
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    barrier.wait();
                    s.write_zeroes(base, 4096).expect("zeroes");
                });
                barrier.wait();
                s.write_all_at(&data, base + 4096).expect("write");
            });
            let mut back = [0u8; 4096];
            s.read_exact_at(&mut back, base + 4096)?;
            assert!(
                back == data,
                "iteration {i}: the completed write was cut off"
            );
        }
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
