//! An open add-cow image: the copy-on-write read and write path.
//!
//! Reads walk the COW bitmap in runs of clusters that share a source and issue
//! one read per run: the image file for allocated runs, the backing chain
//! (zeros past its end) for the rest. A write into unallocated clusters first
//! completes partly written clusters from the backing chain, so that a set bit
//! always means the whole cluster in the image file is valid; the bits change
//! in memory at once and reach the disk only in [`AddCow::flush`], after the
//! image file has been synced (crash consistency, `FORMAT.md`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bitmap::{bitmap_len, CowBitmap};
use crate::error::{Error, IoContext, Result};
use crate::header::{Header, COMPAT_ALL_ALLOCATED, COMPAT_FEATURES_OFFSET};
use crate::storage::Storage;

/// Largest piece `stream` copies under one lock.
const STREAM_CHUNK: u64 = 4 << 20;
/// `stream` flushes after copying this much, so that an interrupted stream
/// keeps most of its work.
const STREAM_FLUSH_EVERY: u64 = 256 << 20;

/// Where a range of the virtual disk is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The image file (allocated clusters).
    Image,
    /// The backing chain.
    Backing,
    /// Nothing: unallocated and past the backing file's end, or no backing file.
    Zero,
}

/// A run of the virtual disk with one source, as `addcow map` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where its bytes come from.
    pub source: Source,
}

/// Clusters that share one allocation state, and the part of an access in them.
struct Run {
    allocated: bool,
    /// First cluster after the run.
    end_cluster: u64,
    /// First byte of the access in the run.
    from: u64,
    /// End of the access in the run.
    to: u64,
}

/// The base of an add-cow image.
#[derive(Debug)]
pub enum Backing {
    /// A raw file, read-only; reads past `size` are zeros.
    Raw {
        /// The file.
        storage: Box<dyn Storage>,
        /// Its length when opened.
        size: u64,
        /// Its path, for messages.
        path: PathBuf,
    },
    /// Another add-cow image opened read-only: the chain continues.
    AddCow(Box<AddCow>),
}

impl Backing {
    /// Size of the base: the raw file's length or the add-cow's virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::AddCow(image) => image.size(),
        }
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        match self {
            Backing::Raw { path, .. } => path,
            Backing::AddCow(image) => image.path(),
        }
    }

    /// Reads `buf` at `offset`; bytes past the end of the base read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, zeros) = buf.split_at_mut(avail);
        zeros.fill(0);
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { storage, path, .. } => storage
                .read_exact_at(data, offset)
                .ctx(path, "read backing file"),
            Backing::AddCow(image) => image.read_at(data, offset),
        }
    }
}

/// Whether an image may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only; shared locks.
    ReadOnly,
    /// Reads and writes; exclusive locks.
    ReadWrite,
}

/// An open add-cow image: a virtual disk of [`AddCow::size`] bytes.
///
/// All I/O methods take `&self` and are safe to call from several threads.
#[derive(Debug)]
pub struct AddCow {
    path: PathBuf,
    header: Header,
    image_path: PathBuf,
    meta: Box<dyn Storage>,
    image: Box<dyn Storage>,
    backing: Option<Backing>,
    size: u64,
    writable: bool,
    all_allocated: AtomicBool,
    bitmap: RwLock<CowBitmap>,
    /// Serialises flushes, so that a flush returns only once every bit set
    /// before it started is on disk.
    flush_lock: Mutex<()>,
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn mutex_lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The pieces [`AddCow::from_parts`] assembles into an open image.
#[derive(Debug)]
pub(crate) struct Parts {
    /// Path of the add-cow file (for messages and name resolution).
    pub path: PathBuf,
    /// The add-cow file.
    pub meta: Box<dyn Storage>,
    /// The image file, already resolved and opened.
    pub image: Box<dyn Storage>,
    /// Path of the image file, for messages.
    pub image_path: PathBuf,
    /// The backing chain, already opened (ignored when all-allocated is set).
    pub backing: Option<Backing>,
    /// Whether writes are allowed.
    pub access: Access,
}

impl AddCow {
    /// Opens an image from storages already opened and a header already
    /// checked: sizes the disk from the image file and loads the bitmap.
    pub(crate) fn from_parts(header: Header, parts: Parts) -> Result<AddCow> {
        let Parts {
            path,
            meta,
            image,
            image_path,
            backing,
            access,
        } = parts;
        let size = image.len().ctx(&image_path, "stat image file")?;
        let cluster_size = header.cluster_size();
        let clusters = size.div_ceil(cluster_size);
        let needed = bitmap_len(clusters);
        let offset = u64::from(header.header_size());
        let len = meta.len().ctx(&path, "stat")?;
        if len < offset + needed {
            return Err(Error::BitmapTruncated {
                path,
                offset,
                needed,
                len,
                image_size: size,
            });
        }
        // Bounded by the file length checked just above.
        let mut bytes = vec![0u8; needed as usize];
        meta.read_exact_at(&mut bytes, offset)
            .ctx(&path, "read bitmap")?;
        let (bitmap, _stray) = CowBitmap::from_bytes(bytes, clusters);
        let all_allocated = header.all_allocated();
        Ok(AddCow {
            path,
            image_path,
            meta,
            image,
            backing: if all_allocated { None } else { backing },
            size,
            writable: access == Access::ReadWrite,
            all_allocated: AtomicBool::new(all_allocated),
            bitmap: RwLock::new(bitmap),
            flush_lock: Mutex::new(()),
            header,
        })
    }

    /// Path of the add-cow file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of the image file.
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    /// The header as opened (the all-allocated bit may have been set since:
    /// see [`AddCow::all_allocated`]).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing chain, unless there is none or all clusters are allocated.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// Virtual disk size in bytes: the image file's length.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Number of clusters of the virtual disk.
    pub fn cluster_count(&self) -> u64 {
        self.size.div_ceil(self.cluster_size())
    }

    /// True once every cluster is in the image file and the backing is unused.
    pub fn all_allocated(&self) -> bool {
        self.all_allocated.load(Ordering::Acquire)
    }

    /// True when cluster `cluster` reads from the image file.
    pub fn is_allocated(&self, cluster: u64) -> bool {
        self.all_allocated()
            || (cluster < self.cluster_count() && read_lock(&self.bitmap).is_allocated(cluster))
    }

    /// Number of clusters read from the image file.
    pub fn allocated_clusters(&self) -> u64 {
        if self.all_allocated() {
            return self.cluster_count();
        }
        read_lock(&self.bitmap).count_allocated()
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len: len as u64,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Byte range `[start, end)` of clusters `first..last` on the virtual disk.
    fn cluster_span(&self, first: u64, last: u64) -> (u64, u64) {
        let bits = self.header.cluster_bits;
        (first << bits, (last << bits).min(self.size))
    }

    fn read_image(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image
            .read_exact_at(buf, offset)
            .ctx(&self.image_path, "read image file")
    }

    fn write_image(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.image
            .write_all_at(buf, offset)
            .ctx(&self.image_path, "write image file")
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Fills `buf` with the virtual disk's bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.all_allocated() {
            return self.read_image(buf, offset);
        }
        let end = offset + buf.len() as u64;
        let bitmap = read_lock(&self.bitmap);
        let mut cluster = offset >> self.header.cluster_bits;
        while let Some(run) = self.next_run(&bitmap, cluster, offset, end) {
            let piece = &mut buf[(run.from - offset) as usize..(run.to - offset) as usize];
            if run.allocated {
                self.read_image(piece, run.from)?;
            } else {
                self.read_backing(piece, run.from)?;
            }
            cluster = run.end_cluster;
        }
        Ok(())
    }

    /// The run of clusters from `cluster` that share one allocation state,
    /// clipped to the access `[offset, end)`; `None` past the access.
    fn next_run(&self, bitmap: &CowBitmap, cluster: u64, offset: u64, end: u64) -> Option<Run> {
        let last = (end - 1) >> self.header.cluster_bits;
        if cluster > last {
            return None;
        }
        let (allocated, end_cluster) = bitmap.run(cluster, last + 1);
        let (run_start, run_stop) = self.cluster_span(cluster, end_cluster);
        Some(Run {
            allocated,
            end_cluster,
            from: run_start.max(offset),
            to: run_stop.min(end),
        })
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// Writes `buf` to the virtual disk at `offset`, copying the rest of any
    /// partly written unallocated cluster from the backing chain first.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.all_allocated() {
            return self.write_image(buf, offset);
        }
        let bits = self.header.cluster_bits;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset >> bits, (end - 1) >> bits);
        {
            // Rewrites of allocated clusters need no change to the bitmap.
            let bitmap = read_lock(&self.bitmap);
            if bitmap.run(first, last + 1) == (true, last + 1) {
                drop(bitmap);
                return self.write_image(buf, offset);
            }
        }
        let mut bitmap = write_lock(&self.bitmap);
        let mut cluster = first;
        while let Some(run) = self.next_run(&bitmap, cluster, offset, end) {
            let piece = &buf[(run.from - offset) as usize..(run.to - offset) as usize];
            if run.allocated {
                self.write_image(piece, run.from)?;
            } else {
                self.copy_on_write(cluster, run.end_cluster, piece, run.from)?;
                bitmap.set_range(cluster, run.end_cluster);
            }
            cluster = run.end_cluster;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the unallocated clusters `first..end`,
    /// which it overlaps; the parts of the first and last cluster that `data`
    /// does not cover are filled from the backing chain.
    fn copy_on_write(&self, first: u64, end: u64, data: &[u8], offset: u64) -> Result<()> {
        let data_end = offset + data.len() as u64;
        let (head_start, head_end) = self.cluster_span(first, first + 1);
        let (tail_start, tail_end) = self.cluster_span(end - 1, end);
        if first == end - 1 {
            if offset == head_start && data_end == head_end {
                return self.write_image(data, offset);
            }
            return self.fill_cluster(head_start, head_end, data, offset);
        }
        let mut whole_from = offset;
        let mut whole_to = data_end;
        if offset > head_start {
            let split = (head_end - offset) as usize;
            self.fill_cluster(head_start, head_end, &data[..split], offset)?;
            whole_from = head_end;
        }
        if data_end < tail_end {
            let split = (tail_start - offset) as usize;
            self.fill_cluster(tail_start, tail_end, &data[split..], tail_start)?;
            whole_to = tail_start;
        }
        if whole_from < whole_to {
            let piece = &data[(whole_from - offset) as usize..(whole_to - offset) as usize];
            self.write_image(piece, whole_from)?;
        }
        Ok(())
    }

    /// Writes the cluster `[start, end)` as the backing chain's bytes with
    /// `data` laid over them at `offset`.
    fn fill_cluster(&self, start: u64, end: u64, data: &[u8], offset: u64) -> Result<()> {
        let mut cluster = vec![0u8; (end - start) as usize];
        self.read_backing(&mut cluster, start)?;
        let at = (offset - start) as usize;
        cluster[at..at + data.len()].copy_from_slice(data);
        self.write_image(&cluster, start)
    }

    /// Makes `len` bytes at `offset` read as zeros, never as the backing
    /// file's data: whole clusters become allocated holes in the image file,
    /// partial ones are written with zeros (copy-on-write).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.ensure_writable()?;
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        self.check_range(offset, len_usize)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let punch = |from: u64, to: u64| {
            self.image
                .write_zeroes(from, to - from)
                .ctx(&self.image_path, "write zeroes to image file")
        };
        if self.all_allocated() {
            return punch(offset, end);
        }
        let cs = self.cluster_size();
        let first_whole = offset.div_ceil(cs);
        let last_whole = if end == self.size {
            self.cluster_count()
        } else {
            end / cs
        };
        if first_whole >= last_whole {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        let (whole_start, whole_end) = self.cluster_span(first_whole, last_whole);
        if offset < whole_start {
            self.write_at(&vec![0u8; (whole_start - offset) as usize], offset)?;
        }
        {
            let mut bitmap = write_lock(&self.bitmap);
            punch(whole_start, whole_end)?;
            bitmap.set_range(first_whole, last_whole);
        }
        if whole_end < end {
            self.write_at(&vec![0u8; (end - whole_end) as usize], whole_end)?;
        }
        Ok(())
    }

    /// Makes every completed write durable: syncs the image file, then writes
    /// back the changed parts of the bitmap and syncs the add-cow file. A bit
    /// therefore never reaches the disk before its cluster's data.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _serial = mutex_lock(&self.flush_lock);
        let chunks = write_lock(&self.bitmap).take_dirty();
        let result = self.persist_bitmap_chunks(&chunks);
        if result.is_err() {
            write_lock(&self.bitmap).mark_dirty(&chunks);
        }
        result
    }

    fn persist_bitmap_chunks(&self, chunks: &[crate::bitmap::DirtyChunk]) -> Result<()> {
        self.image
            .sync_data()
            .ctx(&self.image_path, "sync image file")?;
        if chunks.is_empty() {
            return Ok(());
        }
        let base = u64::from(self.header.header_size());
        for chunk in chunks {
            self.meta
                .write_all_at(&chunk.bytes, base + chunk.offset)
                .ctx(&self.path, "write bitmap")?;
        }
        self.meta.sync_data().ctx(&self.path, "sync")
    }

    /// Where each byte of the virtual disk comes from, in order, adjacent runs
    /// of one source merged.
    pub fn map(&self) -> Vec<Extent> {
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |start: u64, end: u64, source: Source| {
            if start >= end {
                return;
            }
            match extents.last_mut() {
                Some(last) if last.source == source && last.start + last.length == start => {
                    last.length += end - start;
                }
                _ => extents.push(Extent {
                    start,
                    length: end - start,
                    source,
                }),
            }
        };
        if self.all_allocated() {
            push(0, self.size, Source::Image);
            return extents;
        }
        let backing_size = self.backing.as_ref().map_or(0, Backing::size);
        let bitmap = read_lock(&self.bitmap);
        let clusters = self.cluster_count();
        let mut cluster = 0;
        while cluster < clusters {
            let (allocated, run_end) = bitmap.run(cluster, clusters);
            let (start, end) = self.cluster_span(cluster, run_end);
            if allocated {
                push(start, end, Source::Image);
            } else {
                let split = backing_size.clamp(start, end);
                push(start, split, Source::Backing);
                push(split, end, Source::Zero);
            }
            cluster = run_end;
        }
        extents
    }

    /// Copies every unallocated cluster from the backing chain into the image
    /// file, flushes, then sets the all-allocated bit: afterwards the image
    /// file alone is the disk. `progress(done, total)` is called in bytes.
    /// Interrupted, it keeps what it copied; run again, it resumes.
    pub fn stream(&self, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        self.ensure_writable()?;
        if self.all_allocated() {
            // Nothing to copy, but the promise holds: on return, the image
            // file alone is the disk, durably.
            self.flush()?;
            progress(self.size, self.size);
            return Ok(());
        }
        let clusters = self.cluster_count();
        let chunk_clusters = (STREAM_CHUNK / self.cluster_size()).max(1);
        let backing_size = self.backing.as_ref().map_or(0, Backing::size);
        let mut buf = Vec::new();
        let mut since_flush = 0;
        let mut cluster = 0;
        while cluster < clusters {
            let limit = (cluster + chunk_clusters).min(clusters);
            let mut bitmap = write_lock(&self.bitmap);
            let (allocated, run_end) = bitmap.run(cluster, limit);
            if !allocated {
                let (start, end) = self.cluster_span(cluster, run_end);
                if start >= backing_size {
                    self.image
                        .write_zeroes(start, end - start)
                        .ctx(&self.image_path, "write zeroes to image file")?;
                } else {
                    buf.resize((end - start) as usize, 0);
                    self.read_backing(&mut buf, start)?;
                    self.write_image(&buf, start)?;
                }
                bitmap.set_range(cluster, run_end);
                since_flush += end - start;
            }
            drop(bitmap);
            cluster = run_end;
            progress(self.cluster_span(0, cluster).1, self.size);
            if since_flush >= STREAM_FLUSH_EVERY {
                self.flush()?;
                since_flush = 0;
            }
        }
        self.flush()?;
        let features = self.header.compatible_features | COMPAT_ALL_ALLOCATED;
        self.meta
            .write_all_at(&features.to_le_bytes(), COMPAT_FEATURES_OFFSET)
            .ctx(&self.path, "write header")?;
        self.meta.sync_data().ctx(&self.path, "sync")?;
        self.all_allocated.store(true, Ordering::Release);
        Ok(())
    }

    /// Flushes and closes, reporting any error (dropping flushes too, but
    /// cannot report a failure).
    pub fn close(self) -> Result<()> {
        self.flush()
    }
}

impl Drop for AddCow {
    fn drop(&mut self) {
        // Best effort: `close` is the way to learn whether this failed.
        let _ = self.flush();
    }
}
