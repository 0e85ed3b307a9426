//! An open add-cow image: the copy-on-write read and write path.
//!
//! Reads walk the COW bitmap in runs of clusters that share a source and issue
//! one read per run: the image file for allocated runs, the backing chain
//! (zeros past its end) for the rest. A write into unallocated clusters first
//! completes partly written clusters from the backing chain, so that a set bit
//! always means the whole cluster in the image file is valid; the bits change
//! in memory at once and reach the disk only in [`AddCow::flush`], after the
//! image file has been synced (crash consistency, `FORMAT.md`).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bitmap::{bitmap_len, CowBitmap, MAX_BITMAP_BYTES};
use crate::error::{Error, IoContext, Result};
use crate::header::{Header, COMPAT_ALL_ALLOCATED, COMPAT_FEATURES_OFFSET};
use crate::iobuf::{IoBufs, IoBufsMut};
use crate::open::ChainFile;
use crate::range_lock::RangeLocks;
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

thread_local! {
    /// The buffer a copy-on-write fill reads the backing chain's bytes of
    /// a partly written cluster into: one per thread, so that concurrent
    /// writers never share it, grown to the largest cluster seen and then
    /// reused (never allocated per request).
    static COW_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The range `[start, start + len)` of `bufs`, which callers keep inside.
fn sub_mut<'b>(bufs: &'b mut IoBufsMut<'_>, start: u64, len: u64) -> Result<IoBufsMut<'b>> {
    bufs.range(start as usize, len as usize)
        .ok_or(Error::BufferRange { start, len })
}

/// The range `[start, start + len)` of `bufs`, which callers keep inside.
fn sub<'b>(bufs: &'b IoBufs<'_>, start: u64, len: u64) -> Result<IoBufs<'b>> {
    bufs.range(start as usize, len as usize)
        .ok_or(Error::BufferRange { start, len })
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

/// A host file holding a piece of the virtual disk at the same offset, and its path.
pub(crate) type HostFile<'a> = Option<(&'a dyn Storage, &'a Path)>;

/// What [`AddCow::for_each_piece`] calls: offset, length and where the bytes are.
pub(crate) type PieceFn<'f> = dyn FnMut(u64, u64, HostFile<'_>) -> Result<()> + 'f;

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
        self.read_vectored_at(&mut IoBufsMut::from_slice(buf), offset)
    }

    /// Fills `bufs` from `offset`; bytes past the end of the base read as zeros.
    pub fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        let len = bufs.len() as u64;
        let avail = self.size().saturating_sub(offset).min(len);
        if avail < len {
            sub_mut(bufs, avail, len - avail)?.fill_zero();
        }
        if avail == 0 {
            Ok(())
        } else if avail == len {
            self.read_data(bufs, offset)
        } else {
            self.read_data(&mut sub_mut(bufs, 0, avail)?, offset)
        }
    }

    /// Fills `data`, which is all before the base's end, from `offset`.
    fn read_data(&self, data: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        match self {
            Backing::Raw { storage, path, .. } => storage
                .read_vectored_exact_at(data, offset)
                .ctx(path, "read backing file"),
            Backing::AddCow(image) => image.read_vectored_at(data, offset),
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
    /// Held over the clusters a copy-on-write, zeroing or stream is
    /// allocating, so that two of them never fill the same cluster at once
    /// while requests on other clusters go on.
    allocating: RangeLocks,
    /// Serialises flushes, so that a flush returns only once every bit set
    /// before it started is on disk.
    flush_lock: Mutex<()>,
    /// Set for good when a sync of the image file fails: the host may have
    /// dropped the data, and a later sync would falsely report it durable.
    sync_failed: AtomicBool,
    /// The host files of this layer (add-cow, image, raw backing file).
    files: Vec<ChainFile>,
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
    /// The host files of this layer, for [`AddCow::chain_files`].
    pub files: Vec<ChainFile>,
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
            files,
        } = parts;
        let size = image.len().ctx(&image_path, "stat image file")?;
        let cluster_size = header.cluster_size();
        let len = meta.len().ctx(&path, "stat")?;
        if !len.is_multiple_of(cluster_size) {
            return Err(Error::NotPadded {
                path,
                len,
                cluster_size,
            });
        }
        let all_allocated = header.all_allocated();
        let bitmap = if all_allocated {
            // The bitmap is not used, and the image file may have grown past it.
            CowBitmap::new(0)
        } else {
            load_bitmap(meta.as_ref(), &path, &header, size, len)?
        };
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
            allocating: RangeLocks::default(),
            flush_lock: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            files,
            header,
        })
    }

    /// Every host file this image and its backing chain read or write,
    /// top first (empty for images opened with [`AddCow::open_storage`]).
    pub fn chain_files(&self) -> Vec<ChainFile> {
        let mut files = self.files.clone();
        if let Some(Backing::AddCow(below)) = &self.backing {
            files.extend(below.chain_files());
        }
        files
    }

    /// Bytes of memory the bitmaps of this image and its backing chain take.
    pub fn chain_bitmap_bytes(&self) -> u64 {
        let own = if self.header.all_allocated() {
            0
        } else {
            bitmap_len(self.cluster_count())
        };
        match &self.backing {
            Some(Backing::AddCow(below)) => own + below.chain_bitmap_bytes(),
            _ => own,
        }
    }

    /// Number of add-cow files below this one in its backing chain.
    pub fn chain_depth(&self) -> usize {
        match &self.backing {
            Some(Backing::AddCow(below)) => 1 + below.chain_depth(),
            _ => 0,
        }
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

    fn read_image(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        self.image
            .read_vectored_exact_at(bufs, offset)
            .ctx(&self.image_path, "read image file")
    }

    fn write_image(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<()> {
        self.image
            .write_vectored_all_at(bufs, offset)
            .ctx(&self.image_path, "write image file")
    }

    fn read_backing(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.read_vectored_at(bufs, offset),
            None => {
                bufs.fill_zero();
                Ok(())
            }
        }
    }

    /// Fills `buf` with the virtual disk's bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_vectored_at(&mut IoBufsMut::from_slice(buf), offset)
    }

    /// Fills `bufs` with the virtual disk's bytes at `offset`: each run of
    /// clusters is read straight into its part of `bufs` from the image
    /// file or the backing chain, through no buffer of its own.
    pub fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        let len = bufs.len();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.all_allocated() {
            return self.read_image(bufs, offset);
        }
        let end = offset + len as u64;
        // The bitmap is locked only to find each run, never across I/O: a
        // run being allocated meanwhile reads as it was (the backing chain's
        // bytes) until its copy-on-write has completed.
        let mut cluster = offset >> self.header.cluster_bits;
        loop {
            let found = self.next_run(&read_lock(&self.bitmap), cluster, offset, end);
            let Some(run) = found else {
                return Ok(());
            };
            if run.from == offset && run.to == end {
                self.read_run(run.allocated, bufs, run.from)?;
            } else {
                let mut piece = sub_mut(bufs, run.from - offset, run.to - run.from)?;
                self.read_run(run.allocated, &mut piece, run.from)?;
            }
            cluster = run.end_cluster;
        }
    }

    /// Reads a run from the image file (allocated) or the backing chain.
    fn read_run(&self, allocated: bool, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<()> {
        if allocated {
            self.read_image(bufs, offset)
        } else {
            self.read_backing(bufs, offset)
        }
    }

    /// Calls `f(offset, len, file)` for consecutive pieces that cover
    /// `[start, end)` of the virtual disk, in order: `file` is the host file
    /// (and its path) holding the piece's bytes at the same offset, anywhere
    /// down the backing chain, or `None` where the disk reads zeros.
    pub(crate) fn for_each_piece(&self, start: u64, end: u64, f: &mut PieceFn<'_>) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let image = Some((self.image.as_ref(), self.image_path.as_path()));
        if self.all_allocated() {
            return f(start, end - start, image);
        }
        // The bitmap is locked only to find each run, never across `f`: a
        // long copy does not hold up writers (a piece being allocated
        // meanwhile is seen in its state when its run was found).
        let mut cluster = start >> self.header.cluster_bits;
        loop {
            let found = self.next_run(&read_lock(&self.bitmap), cluster, start, end);
            let Some(run) = found else {
                return Ok(());
            };
            let (from, to) = (run.from, run.to);
            match &self.backing {
                _ if run.allocated => f(from, to - from, image)?,
                None => f(from, to - from, None)?,
                Some(backing) => {
                    let split = backing.size().clamp(from, to);
                    match backing {
                        Backing::Raw { storage, path, .. } if from < split => {
                            f(from, split - from, Some((storage.as_ref(), path.as_path())))?
                        }
                        Backing::Raw { .. } => {}
                        Backing::AddCow(below) => below.for_each_piece(from, split, f)?,
                    }
                    if split < to {
                        f(split, to - split, None)?;
                    }
                }
            }
            cluster = run.end_cluster;
        }
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
        self.write_vectored_at(&IoBufs::from_slice(buf), offset)
    }

    /// Writes `bufs` to the virtual disk at `offset`: runs of allocated
    /// clusters and whole unallocated clusters are written straight from
    /// `bufs`; the rest of a partly written unallocated cluster is read from
    /// the backing chain into a reused per-thread buffer and written around
    /// the data in the same vectored write.
    pub fn write_vectored_at(&self, buf: &IoBufs<'_>, offset: u64) -> Result<()> {
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
        // Other writers of these clusters wait; the bitmap is locked only to
        // find each run and to set its bits once its data is written.
        let _allocating = self.allocating.lock(first, last + 1);
        let mut cluster = first;
        loop {
            let found = self.next_run(&read_lock(&self.bitmap), cluster, offset, end);
            let Some(run) = found else {
                return Ok(());
            };
            let part;
            let piece = if run.from == offset && run.to == end {
                buf
            } else {
                part = sub(buf, run.from - offset, run.to - run.from)?;
                &part
            };
            if run.allocated {
                self.write_image(piece, run.from)?;
            } else {
                self.copy_on_write(cluster, run.end_cluster, piece, run.from)?;
                write_lock(&self.bitmap).set_range(cluster, run.end_cluster);
            }
            cluster = run.end_cluster;
        }
    }

    /// Writes `data` at `offset` into the unallocated clusters `first..end`,
    /// which it overlaps; the parts of the first and last cluster that `data`
    /// does not cover are filled from the backing chain.
    fn copy_on_write(&self, first: u64, end: u64, data: &IoBufs<'_>, offset: u64) -> Result<()> {
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
            let split = head_end - offset;
            self.fill_cluster(head_start, head_end, &sub(data, 0, split)?, offset)?;
            whole_from = head_end;
        }
        if data_end < tail_end {
            let split = tail_start - offset;
            let tail = sub(data, split, data_end - tail_start)?;
            self.fill_cluster(tail_start, tail_end, &tail, tail_start)?;
            whole_to = tail_start;
        }
        if whole_from < whole_to {
            let piece = sub(data, whole_from - offset, whole_to - whole_from)?;
            self.write_image(&piece, whole_from)?;
        }
        Ok(())
    }

    /// Writes the cluster `[start, end)` as the backing chain's bytes with
    /// `data` laid over them at `offset`: one vectored write of the
    /// backing's bytes before `data`, `data` itself and the backing's bytes
    /// after it, the backing's read into this thread's reused scratch buffer.
    fn fill_cluster(&self, start: u64, end: u64, data: &IoBufs<'_>, offset: u64) -> Result<()> {
        let n = (end - start) as usize;
        COW_SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => {
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                self.fill_cluster_with(&mut scratch[..n], start, data, offset)
            }
            // Not reentered today (fills only read below this layer); a
            // buffer of its own if it ever is.
            Err(_) => self.fill_cluster_with(&mut vec![0u8; n], start, data, offset),
        })
    }

    fn fill_cluster_with(
        &self,
        cluster: &mut [u8],
        start: u64,
        data: &IoBufs<'_>,
        offset: u64,
    ) -> Result<()> {
        let at = (offset - start) as usize;
        let after = at + data.len();
        let (head, rest) = cluster.split_at_mut(at);
        let tail = &mut rest[data.len()..];
        if !head.is_empty() {
            self.read_backing(&mut IoBufsMut::from_slice(head), start)?;
        }
        if !tail.is_empty() {
            self.read_backing(&mut IoBufsMut::from_slice(tail), start + after as u64)?;
        }
        let mut whole = IoBufs::from_slice(head);
        whole.append(data);
        whole.push(tail);
        self.write_image(&whole, start)
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
            let _allocating = self.allocating.lock(first_whole, last_whole);
            punch(whole_start, whole_end)?;
            write_lock(&self.bitmap).set_range(first_whole, last_whole);
        }
        if whole_end < end {
            self.write_at(&vec![0u8; (end - whole_end) as usize], whole_end)?;
        }
        Ok(())
    }

    /// DISCARD: frees the allocated whole clusters of `[offset, offset +
    /// len)` (they become allocated holes that read as zeros). Partial
    /// clusters and unallocated ones are left as they are: a discard is a
    /// hint, and freeing them would take a copy-on-write. Costs one step per
    /// run of clusters, not per cluster.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let end = offset + len;
        let first = offset.div_ceil(self.cluster_size());
        let last = if end == self.size {
            self.cluster_count()
        } else {
            end / self.cluster_size()
        };
        if first >= last {
            return Ok(());
        }
        if self.all_allocated() {
            let (from, to) = self.cluster_span(first, last);
            return self.write_zeroes(from, to - from);
        }
        let mut cluster = first;
        while cluster < last {
            let (allocated, run_end) = read_lock(&self.bitmap).run(cluster, last);
            if allocated {
                let (from, to) = self.cluster_span(cluster, run_end);
                self.write_zeroes(from, to - from)?;
            }
            cluster = run_end;
        }
        Ok(())
    }

    /// Makes every completed write durable: syncs the image file, then writes
    /// back the changed parts of the bitmap and syncs the add-cow file. A bit
    /// therefore never reaches the disk before its cluster's data.
    ///
    /// Once a sync of the image file has failed, this and every later flush
    /// of this open image fail and no bit is written: Linux reports a
    /// write-back error once and may drop the data, so a retried sync that
    /// succeeds would not mean the data is on disk.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _serial = mutex_lock(&self.flush_lock);
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(Error::SyncFailed {
                path: self.image_path.clone(),
            });
        }
        let chunks = write_lock(&self.bitmap).take_dirty();
        let result = self.persist_bitmap_chunks(&chunks);
        if result.is_err() {
            write_lock(&self.bitmap).mark_dirty(&chunks);
        }
        result
    }

    fn persist_bitmap_chunks(&self, chunks: &[crate::bitmap::DirtyChunk]) -> Result<()> {
        if let Err(err) = self.image.sync_data() {
            self.sync_failed.store(true, Ordering::Release);
            return Err(err).ctx(&self.image_path, "sync image file");
        }
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
            let allocating = self.allocating.lock(cluster, limit);
            let (allocated, run_end) = read_lock(&self.bitmap).run(cluster, limit);
            if !allocated {
                let (start, end) = self.cluster_span(cluster, run_end);
                if start >= backing_size {
                    self.image
                        .write_zeroes(start, end - start)
                        .ctx(&self.image_path, "write zeroes to image file")?;
                } else {
                    buf.resize((end - start) as usize, 0);
                    self.read_backing(&mut IoBufsMut::from_slice(&mut buf), start)?;
                    self.write_image(&IoBufs::from_slice(&buf), start)?;
                }
                write_lock(&self.bitmap).set_range(cluster, run_end);
                since_flush += end - start;
            }
            drop(allocating);
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

/// Reads the bitmap of an image file of `size` bytes from the add-cow file
/// (`len` bytes long), refusing one the file does not hold or larger than
/// [`MAX_BITMAP_BYTES`] before allocating anything.
fn load_bitmap(
    meta: &dyn Storage,
    path: &Path,
    header: &Header,
    size: u64,
    len: u64,
) -> Result<CowBitmap> {
    let clusters = size.div_ceil(header.cluster_size());
    let needed = bitmap_len(clusters);
    let offset = u64::from(header.header_size());
    if len < offset + needed {
        return Err(Error::BitmapTruncated {
            path: path.to_path_buf(),
            offset,
            needed,
            len,
            image_size: size,
        });
    }
    if needed > MAX_BITMAP_BYTES {
        return Err(Error::BitmapTooLarge {
            path: path.to_path_buf(),
            needed,
            max: MAX_BITMAP_BYTES,
            image_size: size,
        });
    }
    let mut bytes = vec![0u8; needed as usize];
    meta.read_exact_at(&mut bytes, offset)
        .ctx(path, "read bitmap")?;
    Ok(CowBitmap::from_bytes(bytes, clusters).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, BackingFormat, BackingRef, CreateOptions};

    const CLUSTER: usize = 4096;

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ salt)
            .collect()
    }

    /// 64 clusters of 4 KiB over a backing file of 40 clusters.
    fn image(dir: &Path) -> (AddCow, Vec<u8>) {
        let base = pattern(40 * CLUSTER, 0x11);
        std::fs::write(dir.join("base.img"), &base).expect("base");
        let path = dir.join("disk.add-cow");
        create(
            &path,
            &CreateOptions {
                image: "disk.raw".into(),
                backing: Some(BackingRef {
                    name: "base.img".into(),
                    format: BackingFormat::Raw,
                }),
                cluster_bits: 12,
                size: Some(64 * CLUSTER as u64),
            },
        )
        .expect("create");
        let mut model = base;
        model.resize(64 * CLUSTER, 0);
        (AddCow::open(&path, Access::ReadWrite).expect("open"), model)
    }

    /// Vectored writes from several threads at once, each piece list cut at
    /// odd places and each write partly covering unallocated clusters
    /// (copy-on-write fills, each thread with its own scratch buffer), then
    /// a vectored read of the whole disk in odd pieces: the bytes are the
    /// model's, backing and zeros past its end included.
    #[test]
    fn concurrent_vectored_writes_and_reads_match_the_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (disk, mut model) = image(dir.path());
        // Thread t writes 3 clusters' worth starting 1000 bytes into
        // cluster 8t + 1: a head fill, a whole cluster, a tail fill.
        let writes: Vec<(usize, Vec<u8>)> = (0..8)
            .map(|t| {
                (
                    (8 * t + 1) * CLUSTER + 1000,
                    pattern(3 * CLUSTER, t as u8 + 0x40),
                )
            })
            .collect();
        std::thread::scope(|scope| {
            for (offset, data) in &writes {
                let disk = &disk;
                scope.spawn(move || {
                    let (a, rest) = data.split_at(777);
                    let (b, c) = rest.split_at(5000);
                    let mut bufs = IoBufs::from_slice(a);
                    bufs.push(b);
                    bufs.push(c);
                    disk.write_vectored_at(&bufs, *offset as u64)
                        .expect("write");
                });
            }
        });
        for (offset, data) in &writes {
            model[*offset..*offset + data.len()].copy_from_slice(data);
        }
        let mut whole = vec![0xeeu8; 64 * CLUSTER];
        {
            let (a, rest) = whole.split_at_mut(100);
            let (b, c) = rest.split_at_mut(150_001);
            let mut bufs = IoBufsMut::from_slice(a);
            bufs.push(b);
            bufs.push(c);
            disk.read_vectored_at(&mut bufs, 0).expect("read");
        }
        assert!(whole == model, "the disk differs from the model");
        // The image file holds every written cluster whole, fills included.
        disk.flush().expect("flush");
        let file = std::fs::read(dir.path().join("disk.raw")).expect("image file");
        for t in 0..8 {
            let (from, to) = ((8 * t + 1) * CLUSTER, (8 * t + 5) * CLUSTER);
            assert!(file[from..to] == model[from..to], "clusters of thread {t}");
            assert!(disk.is_allocated((8 * t + 1) as u64) && !disk.is_allocated((8 * t) as u64));
        }
    }

    /// Threads that each own a quarter of every cluster write, zero and
    /// read their quarters at random while another flushes: partial
    /// copy-on-writes of one cluster by several threads at once must never
    /// lay a backing fill over a quarter another thread wrote, and after a
    /// flush and a reopen every byte is the model's.
    #[test]
    fn threads_sharing_clusters_never_overwrite_each_other() {
        const THREADS: usize = 4;
        const QUARTER: usize = CLUSTER / THREADS;
        let dir = tempfile::tempdir().expect("tempdir");
        let (disk, base) = image(dir.path());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let flusher = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    disk.flush().expect("flush");
                }
            });
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (disk, base) = (&disk, &base);
                    scope.spawn(move || {
                        let mut model = base.clone();
                        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                        let mut next = || {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed
                        };
                        for round in 0..400 {
                            let cluster = (next() % 64) as usize;
                            let at = cluster * CLUSTER + t * QUARTER;
                            match next() % 3 {
                                0 => {
                                    let data = pattern(QUARTER, (round as u8) ^ (t as u8 * 50));
                                    disk.write_at(&data, at as u64).expect("write");
                                    model[at..at + QUARTER].copy_from_slice(&data);
                                }
                                1 => {
                                    disk.write_zeroes(at as u64, QUARTER as u64)
                                        .expect("zeroes");
                                    model[at..at + QUARTER].fill(0);
                                }
                                _ => {
                                    let mut got = vec![0u8; QUARTER];
                                    disk.read_at(&mut got, at as u64).expect("read");
                                    assert!(
                                        got == model[at..at + QUARTER],
                                        "thread {t} round {round}: cluster {cluster}"
                                    );
                                }
                            }
                        }
                        model
                    })
                })
                .collect();
            let models = workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect();
            stop.store(true, Ordering::Relaxed);
            flusher.join().expect("flusher");
            models
        });
        let mut model = base;
        for (t, m) in models.iter().enumerate() {
            for cluster in 0..64 {
                let at = cluster * CLUSTER + t * QUARTER;
                model[at..at + QUARTER].copy_from_slice(&m[at..at + QUARTER]);
            }
        }
        let mut whole = vec![0u8; 64 * CLUSTER];
        disk.read_at(&mut whole, 0).expect("read");
        assert!(whole == model, "the disk differs from the model");
        disk.close().expect("close");
        let path = dir.path().join("disk.add-cow");
        let reopened = AddCow::open(&path, Access::ReadOnly).expect("reopen");
        reopened.read_at(&mut whole, 0).expect("read");
        assert!(whole == model, "the reopened disk differs from the model");
    }

    /// A backing file whose reads of `[gate, gate + CLUSTER)` stop until
    /// released: a slow copy-on-write source.
    #[derive(Debug)]
    struct GatedBacking {
        bytes: Vec<u8>,
        gate: u64,
        entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl crate::storage::Storage for GatedBacking {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let end = offset + buf.len() as u64;
            if offset < self.gate + CLUSTER as u64 && self.gate < end {
                let _ = self.entered.lock().expect("lock").send(());
                let _ = self.release.lock().expect("lock").recv();
            }
            let from = usize::try_from(offset).expect("offset");
            let src = self
                .bytes
                .get(from..from + buf.len())
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write_all_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::PermissionDenied.into())
        }
    }

    /// While a copy-on-write of cluster 0 waits for its backing read, reads
    /// and writes of other clusters (a read of the backing file, a rewrite,
    /// another copy-on-write, a zeroing) complete; a second write to the
    /// stalled cluster waits for the first and both land.
    #[test]
    fn a_stalled_copy_on_write_holds_up_only_its_own_cluster() {
        use std::sync::mpsc;
        use std::time::Duration;

        let dir = tempfile::tempdir().expect("tempdir");
        let (disk, mut model) = image(dir.path());
        disk.write_at(&[0x77; CLUSTER], 9 * CLUSTER as u64)
            .expect("allocate cluster 9");
        model[9 * CLUSTER..10 * CLUSTER].fill(0x77);
        drop(disk);
        let path = dir.path().join("disk.add-cow");
        let open_file = |name: &str| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.path().join(name))
                .expect("open");
            Box::new(crate::storage::FileStorage::new(file))
        };
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let backing = Backing::Raw {
            storage: Box::new(GatedBacking {
                bytes: model[..40 * CLUSTER].to_vec(),
                gate: 0,
                entered: std::sync::Mutex::new(entered_tx),
                release: std::sync::Mutex::new(release_rx),
            }),
            size: 40 * CLUSTER as u64,
            path: "base.img".into(),
        };
        let disk = AddCow::open_storage(
            &path,
            open_file("disk.add-cow"),
            open_file("disk.raw"),
            Some(backing),
            Access::ReadWrite,
        )
        .expect("open");

        std::thread::scope(|scope| {
            let disk = &disk;
            let stalled = scope.spawn(move || disk.write_at(&[0xa1; 100], 10));
            entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the copy-on-write reads its backing cluster");
            // A second writer of cluster 0 waits for the first.
            let second = scope.spawn(move || disk.write_at(&[0xb2; 50], 2000));
            let (done_tx, done) = mpsc::channel();
            scope.spawn(move || {
                let mut buf = vec![0u8; CLUSTER];
                let read = disk.read_at(&mut buf, 5 * CLUSTER as u64);
                let rewrite = disk.write_at(&[0x99; 10], 9 * CLUSTER as u64 + 7);
                let cow = disk.write_at(&[0xc3; 30], 7 * CLUSTER as u64 + 100);
                let zero = disk.write_zeroes(20 * CLUSTER as u64, 2 * CLUSTER as u64);
                let _ = done_tx.send((read.map(|()| buf), rewrite, cow, zero));
            });
            let others = done.recv_timeout(Duration::from_secs(10));
            // Released whatever happened, so that a failure does not hang.
            let _ = release.send(());
            let _ = release.send(());
            let (read, rewrite, cow, zero) = others.expect("other clusters were held up");
            assert!(read.expect("read") == model[5 * CLUSTER..6 * CLUSTER]);
            rewrite.expect("rewrite");
            cow.expect("copy-on-write");
            zero.expect("zeroing");
            stalled.join().expect("join").expect("stalled write");
            second.join().expect("join").expect("second write");
        });
        model[10..110].fill(0xa1);
        model[2000..2050].fill(0xb2);
        model[9 * CLUSTER + 7..9 * CLUSTER + 17].fill(0x99);
        model[7 * CLUSTER + 100..7 * CLUSTER + 130].fill(0xc3);
        model[20 * CLUSTER..22 * CLUSTER].fill(0);
        let mut whole = vec![0u8; 64 * CLUSTER];
        disk.read_at(&mut whole, 0).expect("read back");
        assert!(whole == model, "the disk differs from the model");
    }

    /// DISCARD frees exactly the allocated whole clusters of its range: they
    /// read zeros; unallocated and partial clusters keep their bytes.
    #[test]
    fn discard_zeroes_allocated_whole_clusters_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (disk, mut model) = image(dir.path());
        for cluster in [2, 3, 4, 10, 20, 21] {
            disk.write_at(&[0x5a; 10], cluster * CLUSTER as u64 + 1)
                .expect("write");
            let at = cluster as usize * CLUSTER + 1;
            model[at..at + 10].fill(0x5a);
        }
        // Clusters 3..21 are whole in the range; 2 and 21 are partial.
        let (from, to) = (2 * CLUSTER as u64 + 100, 21 * CLUSTER as u64 + 5);
        disk.discard(from, to - from).expect("discard");
        for cluster in [3, 4, 10, 20] {
            model[cluster * CLUSTER..(cluster + 1) * CLUSTER].fill(0);
        }
        let mut whole = vec![0u8; 64 * CLUSTER];
        disk.read_at(&mut whole, 0).expect("read");
        assert!(whole == model, "the disk differs from the model");
        assert!((0..64).all(|c| disk.is_allocated(c) == [2, 3, 4, 10, 20, 21].contains(&c)));
        // The end of the disk counts as a cluster boundary; an empty or
        // sub-cluster range does nothing.
        disk.discard(63 * CLUSTER as u64, CLUSTER as u64)
            .expect("last");
        disk.discard(5, 0).expect("empty");
        disk.discard(2 * CLUSTER as u64 + 1, 10).expect("partial");
        disk.read_at(&mut whole, 0).expect("read");
        assert!(whole == model);
        assert!(disk
            .discard(63 * CLUSTER as u64, 2 * CLUSTER as u64)
            .is_err());
    }
}
