//! What a virtio-blk device reads and writes: an add-cow image or a raw file.
//!
//! The format is chosen by the host (`format=` or the `.add-cow` extension),
//! never from bytes the guest can write: a raw disk whose first bytes a guest
//! set to "ACOW" stays a raw disk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use addcow::{Access, AddCow, FileStorage, IoBufs, IoBufsMut, Storage};

use super::request::SECTOR_SIZE;

/// A host I/O error, as text for the log line.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Positioned block storage behind a virtio-blk device.
///
/// Callers check ranges against [`size`](DiskBackend::size) first.
pub trait DiskBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError>;
    /// Fills `bufs` (guest memory, for the request path) from `offset`. The
    /// default reads into a buffer of its own with
    /// [`read_at`](DiskBackend::read_at) and copies; the format backends
    /// read straight into `bufs`.
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<(), BackendError> {
        let mut buf = vec![0u8; bufs.len()];
        self.read_at(&mut buf, offset)?;
        bufs.copy_from(&buf);
        Ok(())
    }
    /// Writes `bufs` (guest memory, for the request path) at `offset`. The
    /// default copies into a buffer of its own for
    /// [`write_at`](DiskBackend::write_at); the format backends write
    /// straight from `bufs`.
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<(), BackendError> {
        let mut buf = vec![0u8; bufs.len()];
        bufs.copy_to(&mut buf);
        self.write_at(&buf, offset)
    }
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// WRITE_ZEROES: makes `len` bytes at `offset` read as zeros. With
    /// `unmap` the range may be deallocated on the host; without it
    /// (a guest preallocating with BLKZEROOUT or `fallocate -z`) it must
    /// stay allocated, so that later writes cannot fail for lack of space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError>;
    /// DISCARD: the guest no longer needs the range. Advisory: frees what
    /// it can in whole units of [`discard_alignment`](DiskBackend::discard_alignment),
    /// never allocates; what the range reads afterwards is unspecified
    /// (virtio 1.2, 5.2.6.1).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// The unit in bytes that discards free (advertised to the guest as
    /// `discard_sector_alignment`, its discard granularity).
    fn discard_alignment(&self) -> u64;

    /// The request path is about to move `len` bytes at `offset` for a
    /// request of kind `op` (READ, WRITE, each DISCARD or WRITE_ZEROES
    /// segment; a FLUSH with 0, 0): a layer may refuse it before any of its
    /// data moves (injected errors, a disk without power). Format backends
    /// accept everything.
    fn admit(&self, op: Op, offset: u64, len: u64) -> Result<(), BackendError> {
        let _ = (op, offset, len);
        Ok(())
    }

    /// The request path served `request` and is about to complete it: layers
    /// count, trace or cut the power here. Format backends let it complete.
    fn served(&self, request: &Served) -> Fate {
        let _ = request;
        Fate::Completes
    }
}

/// Largest run of zeros written at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Writes `len` zero bytes at `offset` through `write`, a chunk at a time.
fn write_zero_chunks(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        write(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// A request's kind, as the request path and the trace name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// IN.
    Read,
    /// OUT.
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
    /// GET_ID.
    GetId,
    /// Any other type, or no readable header at all.
    Unsupported,
}

impl Op {
    /// The name used in traces.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::GetId => "get_id",
            Op::Unsupported => "unsupported",
        }
    }

    /// Whether a request of this kind changes the disk (what the power cut
    /// counts and `fail-write` refuses).
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// How a request completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

impl Status {
    /// The name used in traces.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
        }
    }
}

/// One request the request path served, as the layers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Its kind.
    pub op: Op,
    /// First sector: the header's, or the first segment's for DISCARD and
    /// WRITE_ZEROES.
    pub sector: u64,
    /// Sectors of data (all segments together for DISCARD and WRITE_ZEROES;
    /// 0 for FLUSH, GET_ID and requests refused before their length was known).
    pub sectors: u64,
    /// How it completes.
    pub status: Status,
}

/// What becomes of a served request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It completes as usual.
    Completes,
    /// It completes, and right after it the disk loses power.
    CompletesThenPowerCut,
    /// The disk has no power any more: the request never completes.
    Lost,
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
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<(), BackendError> {
        Ok(AddCow::read_vectored_at(self, bufs, offset)?)
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<(), BackendError> {
        Ok(AddCow::write_vectored_at(self, bufs, offset)?)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(AddCow::flush(self)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        if unmap {
            // Whole clusters become allocated holes, partial ones zeros.
            return Ok(AddCow::write_zeroes(self, offset, len)?);
        }
        // Real zeros: the clusters are allocated in the image file and the
        // bytes are there, as a preallocating guest expects.
        write_zero_chunks(offset, len, |zeros, at| {
            Ok(AddCow::write_at(self, zeros, at)?)
        })
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        // Whole allocated clusters only, a run at a time (see AddCow::discard).
        Ok(AddCow::discard(self, offset, len)?)
    }
    fn discard_alignment(&self) -> u64 {
        self.cluster_size()
    }
}

/// A raw disk image file.
///
/// Like an add-cow image (and QEMU's file-posix), once a sync has failed
/// every later flush fails: Linux reports a write-back error once and may
/// drop the pages, so a later sync that succeeds proves nothing.
#[derive(Debug)]
pub struct RawDisk {
    file: Box<dyn Storage>,
    size: u64,
    path: PathBuf,
    sync_failed: AtomicBool,
    /// The unit discards free: the file system's block.
    discard_alignment: u64,
}

impl RawDisk {
    /// A raw disk on `file`, opened from `path` (for messages), of the
    /// file's size; discards free whole units of `discard_alignment` bytes.
    pub fn new(
        path: &Path,
        file: Box<dyn Storage>,
        discard_alignment: u64,
    ) -> addcow::Result<RawDisk> {
        let size = file.len().map_err(|source| addcow::Error::Io {
            path: path.to_path_buf(),
            op: "stat",
            source,
        })?;
        Ok(RawDisk {
            file,
            size,
            path: path.to_path_buf(),
            sync_failed: AtomicBool::new(false),
            discard_alignment: discard_alignment.max(SECTOR_SIZE),
        })
    }
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
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<(), BackendError> {
        Ok(self.file.read_vectored_exact_at(bufs, offset)?)
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<(), BackendError> {
        Ok(self.file.write_vectored_all_at(bufs, offset)?)
    }
    fn flush(&self) -> Result<(), BackendError> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(Box::new(addcow::Error::SyncFailed {
                path: self.path.clone(),
            }));
        }
        self.file
            .sync_data()
            .inspect_err(|_| self.sync_failed.store(true, Ordering::Release))?;
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        if unmap {
            Ok(self.file.write_zeroes(offset, len)?)
        } else {
            Ok(self.file.zero_allocated(offset, len)?)
        }
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        Ok(self.file.discard(offset, len)?)
    }
    fn discard_alignment(&self) -> u64 {
        self.discard_alignment
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
            let block = file.file().metadata().map_err(|source| addcow::Error::Io {
                path: path.to_path_buf(),
                op: "stat",
                source,
            })?;
            Box::new(RawDisk::new(path, Box::new(file), block.blksize())?)
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

    use std::os::unix::fs::MetadataExt;

    use crate::virtio::block::request::tests::zero_request;
    use crate::virtio::block::request::{status, types};

    const CLUSTER: u64 = 64 << 10;

    /// Bytes the host file system has allocated for `path`.
    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    fn read(disk: &dyn DiskBackend, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, offset).expect("read");
        buf
    }

    /// An add-cow disk of 1 MiB, 64 KiB clusters, over a backing file of 0xcd
    /// bytes; returns (directory, add-cow path, image file path).
    fn addcow_disk() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, image) = addcow_over(dir.path(), &vec![0xcdu8; 1 << 20], None);
        (dir, path, image)
    }

    /// Creates `disk.add-cow` (64 KiB clusters, image file `disk.raw`, of
    /// `size` or the backing file's size) in `dir` over a backing file
    /// `base.img` holding `base`; returns the add-cow and image file paths.
    pub(super) fn addcow_over(
        dir: &Path,
        base: &[u8],
        size: Option<u64>,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        std::fs::write(dir.join("base.img"), base).expect("base");
        let path = dir.join("disk.add-cow");
        addcow::create(
            &path,
            &addcow::CreateOptions {
                image: "disk.raw".into(),
                backing: Some(addcow::BackingRef {
                    name: "base.img".into(),
                    format: addcow::BackingFormat::Raw,
                }),
                cluster_bits: 16,
                size,
            },
        )
        .expect("create");
        (path, dir.join("disk.raw"))
    }

    /// virtio 1.2, 5.2.6.2 (Device Operation, device requirements): "For
    /// write zeroes commands, if the unmap is set, the device MAY deallocate
    /// the specified range ... After a write zeroes command is completed,
    /// reads of the specified ranges of sectors MUST return zeroes." With
    /// unmap clear (Linux's BLKZEROOUT and fallocate -z) the range must
    /// read zeros AND stay allocated on the host, on a raw file as on an
    /// add-cow image file; on add-cow never backing data.
    #[test]
    fn write_zeroes_without_unmap_keeps_the_range_allocated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0xabu8; 1 << 20]).expect("raw");
        let disk = open_disk(&raw, DiskFormat::Raw, false).expect("open raw");
        let before = allocated(&raw);
        assert!(before >= 1 << 20);
        let st = zero_request(disk.as_ref(), types::WRITE_ZEROES, 0, 1 << 20, 0);
        assert_eq!(st, status::OK);
        assert!(read(disk.as_ref(), 0, 1 << 20).iter().all(|&b| b == 0));
        assert!(allocated(&raw) >= 1 << 20, "raw range stays allocated");
        // unmap set: zeros, holes allowed.
        let st = zero_request(disk.as_ref(), types::WRITE_ZEROES, 0, 1 << 19, 1);
        assert_eq!(st, status::OK);
        assert!(read(disk.as_ref(), 0, 1 << 20).iter().all(|&b| b == 0));
        drop(disk);

        let (_dir, path, image) = addcow_disk();
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open add-cow");
        assert_eq!(allocated(&image), 0);
        // Four whole clusters and a piece of a fifth, none allocated before.
        let (offset, len) = (2 * CLUSTER, 4 * CLUSTER + 4096);
        let st = zero_request(disk.as_ref(), types::WRITE_ZEROES, offset, len, 0);
        assert_eq!(st, status::OK);
        assert!(read(disk.as_ref(), offset, len as usize)
            .iter()
            .all(|&b| b == 0));
        // The rest of the fifth cluster still reads the backing file.
        let tail = read(disk.as_ref(), offset + len, (CLUSTER - 4096) as usize);
        assert!(tail.iter().all(|&b| b == 0xcd));
        disk.flush().expect("flush");
        assert!(
            allocated(&image) >= len,
            "image file allocated: {} < {len}",
            allocated(&image)
        );
    }

    /// virtio 1.2, 5.2.6.2: "For discard commands, the device MAY deallocate
    /// the specified range of sectors": discard is advisory. A discard
    /// smaller than a cluster on an unallocated add-cow cluster must not
    /// copy the cluster in (fstrim must never grow an overlay); a discard of
    /// a whole allocated cluster frees it on the host.
    #[test]
    fn discard_never_allocates_and_frees_whole_clusters() {
        let (_dir, path, image) = addcow_disk();
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open");
        let st = zero_request(disk.as_ref(), types::DISCARD, 4096, 8192, 0);
        assert_eq!(st, status::OK);
        disk.flush().expect("flush");
        assert_eq!(allocated(&image), 0, "a partial discard allocated nothing");
        assert!(read(disk.as_ref(), 0, CLUSTER as usize)
            .iter()
            .all(|&b| b == 0xcd));

        disk.write_at(&vec![7u8; 3 * CLUSTER as usize], 4 * CLUSTER)
            .expect("write");
        disk.flush().expect("flush");
        let before = allocated(&image);
        assert!(before >= 3 * CLUSTER);
        // Covers cluster 5 whole and halves of 4 and 6.
        let st = zero_request(
            disk.as_ref(),
            types::DISCARD,
            4 * CLUSTER + CLUSTER / 2,
            2 * CLUSTER,
            0,
        );
        assert_eq!(st, status::OK);
        disk.flush().expect("flush");
        assert!(
            allocated(&image) <= before - CLUSTER,
            "the whole cluster is freed: {} > {}",
            allocated(&image),
            before - CLUSTER
        );
        // The partial clusters keep their data.
        let half = (CLUSTER / 2) as usize;
        assert!(read(disk.as_ref(), 4 * CLUSTER, half)
            .iter()
            .all(|&b| b == 7));
        assert!(read(disk.as_ref(), 6 * CLUSTER + CLUSTER / 2, half)
            .iter()
            .all(|&b| b == 7));
    }

    /// A file whose first sync fails, as a write-back error reports once.
    #[derive(Debug, Default)]
    struct SyncFailsOnce {
        syncs: std::sync::atomic::AtomicUsize,
    }

    impl Storage for SyncFailsOnce {
        fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_all_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            use std::sync::atomic::Ordering;
            if self.syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(1 << 20)
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_raw_sync_fails_every_later_flush() {
        let disk = RawDisk::new(
            Path::new("raw.img"),
            Box::new(SyncFailsOnce::default()),
            4096,
        )
        .expect("size");
        disk.write_at(&[1; 512], 0).expect("write");
        assert!(disk.flush().is_err(), "the failing sync");
        // The host may have dropped the written pages: a later sync that
        // succeeds does not make them durable.
        disk.write_at(&[2; 512], 512).expect("write");
        assert!(disk.flush().is_err(), "a flush after a failed sync");
        assert!(disk.flush().is_err(), "every later flush");
    }
}

#[cfg(test)]
mod zero_copy_tests {
    use std::path::PathBuf;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::block::request::tests::{
        desc, guest_memory, run_on, write_header, F_WRITE, HEADER, STATUS,
    };
    use crate::virtio::block::request::{status, types};

    const CLUSTER: usize = 64 << 10;

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7 + i / 4099) as u8) ^ salt)
            .collect()
    }

    /// An add-cow disk of 8 clusters over a backing file of 5.5 clusters
    /// (the rest reads zeros), with cluster 2 already written; returns the
    /// directory, the add-cow path, the image file path and the model of
    /// the disk's bytes.
    fn disk() -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = pattern(CLUSTER * 11 / 2, 0);
        let (path, image) = super::tests::addcow_over(dir.path(), &base, Some(8 * CLUSTER as u64));
        let mut model = base;
        model.resize(8 * CLUSTER, 0);
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open");
        let two = pattern(CLUSTER, 0x5a);
        disk.write_at(&two, 2 * CLUSTER as u64).expect("allocate");
        model[2 * CLUSTER..3 * CLUSTER].copy_from_slice(&two);
        disk.flush().expect("flush");
        (dir, path, image, model)
    }

    /// Lays `len` bytes of guest memory out as the data descriptors
    /// `pieces` (address, length), in order, from `data`.
    fn scatter(mem: &GuestMemoryMmap, pieces: &[(u64, u32)], data: &[u8]) {
        let mut at = 0;
        for &(addr, len) in pieces {
            mem.write_slice(&data[at..at + len as usize], GuestAddress(addr))
                .expect("data");
            at += len as usize;
        }
    }

    fn gather(mem: &GuestMemoryMmap, pieces: &[(u64, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len) in pieces {
            let mut part = vec![0u8; len as usize];
            mem.read_slice(&mut part, GuestAddress(addr)).expect("data");
            out.extend_from_slice(&part);
        }
        out
    }

    /// A WRITE and a READ whose data is split over several descriptors at
    /// odd lengths (the first sharing its descriptor with the header) and
    /// whose range crosses a partly written unallocated cluster (a
    /// copy-on-write fill), an allocated one, whole unallocated ones and
    /// the backing file's end, move exactly the model's bytes between
    /// guest memory and the disk, and the image file holds them.
    #[test]
    fn a_request_over_several_descriptors_and_runs_moves_the_right_bytes() {
        let (_dir, path, image, mut model) = disk();
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open");
        let mem = guest_memory();
        // Sector 1.5 KiB into cluster 1 up to 3.5 KiB into cluster 5.
        let offset = CLUSTER + 1536;
        let len = 4 * CLUSTER + 2048;
        let data = pattern(len, 0xa7);
        // Header and 512 data bytes share the first descriptor.
        let pieces = [
            (HEADER + 16, 512u32),
            (0x20_0000, 3 * 4096 + 512),
            (0x40_0000, 100_000),
            (0x60_0000, (len - 512 - 12_800 - 100_000) as u32),
        ];
        scatter(&mem, &pieces, &data);
        write_header(&mem, types::OUT, offset as u64 / 512);
        let mut descs = vec![desc(HEADER, 16 + pieces[0].1, 0)];
        descs.extend(pieces[1..].iter().map(|&(a, l)| desc(a, l, 0)));
        descs.push(desc(STATUS, 1, F_WRITE));
        assert_eq!(run_on(&mem, &descs, disk.as_ref()), (1, status::OK));
        model[offset..offset + len].copy_from_slice(&data);

        // Read clusters 0..8 back in five pieces of odd sizes.
        let pieces = [
            (0x20_0000, 4096u32),
            (0x30_0000, 70_000 - 70_000 % 512),
            (0x40_0000, 3 * CLUSTER as u32),
            (0x60_0000, 512),
            (
                0x70_0000,
                (8 * CLUSTER - 4096 - 69_632 - 3 * CLUSTER - 512) as u32,
            ),
        ];
        for &(addr, l) in &pieces {
            mem.write_slice(&vec![0xeeu8; l as usize], GuestAddress(addr))
                .expect("poison");
        }
        write_header(&mem, types::IN, 0);
        let mut descs = vec![desc(HEADER, 16, 0)];
        descs.extend(pieces.iter().map(|&(a, l)| desc(a, l, F_WRITE)));
        descs.push(desc(STATUS, 1, F_WRITE));
        assert_eq!(
            run_on(&mem, &descs, disk.as_ref()),
            (8 * CLUSTER as u32 + 1, status::OK)
        );
        let got = gather(&mem, &pieces);
        assert!(got == model, "the read differs from the model");

        // On disk: clusters 1..6 are in the image file whole, cluster 1's
        // head and cluster 5's tail filled from the backing file (whose end
        // is inside cluster 5: zeros after it).
        disk.flush().expect("flush");
        let file = std::fs::read(&image).expect("image file");
        assert!(
            file[CLUSTER..6 * CLUSTER] == model[CLUSTER..6 * CLUSTER],
            "the image file differs from the model"
        );
        drop(disk);
        let reopened = AddCow::open(&path, Access::ReadOnly).expect("reopen");
        let map: Vec<_> = reopened
            .map()
            .into_iter()
            .map(|e| (e.start, e.length, e.source))
            .collect();
        let c = CLUSTER as u64;
        assert_eq!(
            map,
            vec![
                (0, c, addcow::Source::Backing),
                (c, 5 * c, addcow::Source::Image),
                (6 * c, 2 * c, addcow::Source::Zero),
            ]
        );
    }

    /// A data descriptor partly outside guest memory is IOERR, and nothing
    /// is written to the disk: on a READ and on a WRITE.
    #[test]
    fn a_data_descriptor_outside_guest_memory_is_ioerr() {
        let (_dir, path, _image, model) = disk();
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open");
        let mem = guest_memory();
        // Guest memory ends at 16 MiB: the last piece crosses the end.
        let end = 0x100_0000u64;
        for (kind, flags) in [(types::OUT, 0), (types::IN, F_WRITE)] {
            write_header(&mem, kind, 0);
            let descs = [
                desc(HEADER, 16, 0),
                desc(0x20_0000, 4096, flags),
                desc(end - 512, 1024, flags),
                desc(STATUS, 1, F_WRITE),
            ];
            let (_, st) = run_on(&mem, &descs, disk.as_ref());
            // A writable part outside memory leaves no place the device
            // may trust for a status: none is written (0xff stays).
            let expected = if kind == types::OUT {
                status::IOERR
            } else {
                0xff
            };
            assert_eq!(st, expected, "type {kind}");
        }
        let mut now = vec![0u8; model.len()];
        disk.read_at(&mut now, 0).expect("read");
        assert!(now == model, "nothing was written");
    }

    /// A hostile guest's data descriptors: two writable pieces of one READ
    /// on the same memory, one on the header, one ending on the status
    /// byte, a WRITE whose data is its own header. Served with no panic;
    /// the overlapping READ leaves the bytes of the piece read last, and the
    /// status byte is written after the data.
    #[test]
    fn overlapping_data_header_and_status_are_served() {
        let (_dir, path, _image, model) = disk();
        let disk = open_disk(&path, DiskFormat::AddCow, false).expect("open");
        let mem = guest_memory();
        write_header(&mem, types::IN, 0);
        let descs = [
            desc(HEADER, 16, 0),
            desc(0x20_0000, 4096, F_WRITE),
            desc(0x20_0000, 4096, F_WRITE),
            desc(HEADER, 512, F_WRITE),
            desc(STATUS - 511, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ];
        assert_eq!(
            run_on(&mem, &descs, disk.as_ref()),
            (4096 * 2 + 1024 + 1, status::OK)
        );
        assert_eq!(gather(&mem, &[(0x20_0000, 4096)]), model[4096..8192]);
        assert_eq!(gather(&mem, &[(HEADER, 512)]), model[8192..8704]);
        write_header(&mem, types::OUT, 1);
        let descs = [
            desc(HEADER, 16, 0),
            desc(HEADER, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ];
        assert_eq!(run_on(&mem, &descs, disk.as_ref()), (1, status::OK));
        let mut back = vec![0u8; 512];
        disk.read_at(&mut back, 512).expect("read");
        assert_eq!(back, gather(&mem, &[(HEADER, 512)]));
    }
}
