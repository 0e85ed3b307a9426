//! The virtio-blk request path: one descriptor chain in, one status byte out.
//!
//! A request is a 16-byte header (type, reserved, sector) in the
//! device-readable part of the chain, data in either part, and a status byte
//! as the last device-writable byte. The chain is walked once, into the
//! pieces of guest memory that hold its device-readable and its
//! device-writable bytes, so any split of these bytes across descriptors is
//! accepted, and anything outside guest memory, a missing header or status,
//! a loop or an over-long chain becomes an error status, never a panic.
//!
//! Every limit the device advertises in its configuration space ([`limits`])
//! is enforced here, so that one request can only cause a bounded amount of
//! work: at most `SEG_MAX` data descriptors, one DISCARD or WRITE_ZEROES
//! segment of at most 4 GiB.
//!
//! The data of a READ or WRITE moves between guest memory and the backend
//! without a buffer in between: the data descriptors become a list of
//! pieces of guest memory ([`addcow::IoBufsMut`] / [`addcow::IoBufs`]) that
//! the backend hands to `preadv`/`pwritev`, as Firecracker and Cloud
//! Hypervisor do.

use std::sync::atomic::Ordering;

use addcow::{IoBufs, IoBufsMut};
use virtio_bindings::virtio_blk;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, Permissions,
    VolatileMemory, VolatileSlice,
};

use super::backend::{DiskBackend, Fate, Op, Served, Status};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by GET_ID.
pub const ID_LEN: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Request types (virtio 1.2, 5.2.6).
pub mod types {
    use virtio_bindings::virtio_blk;

    /// Read.
    pub const IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
    /// Write.
    pub const OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
    /// Flush the write cache.
    pub const FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
    /// Device serial.
    pub const GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
    /// Discard sectors.
    pub const DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Completion statuses (virtio 1.2, 5.2.6).
pub mod status {
    use virtio_bindings::virtio_blk;

    /// Success.
    pub const OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
    /// Device or driver error.
    pub const IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
    /// Request type not supported.
    pub const UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
}

/// The limits advertised in the configuration space, and enforced.
pub mod limits {
    use crate::virtio::block::device::QUEUE_SIZE;

    /// Most data descriptors in one request: the queue minus header and status.
    pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
    /// Most sectors in one DISCARD segment (4 GiB): more than a Linux bio
    /// carries (`UINT_MAX` bytes), so the guest's own limit splits a
    /// whole-disk discard (mkfs, blkdiscard) into 4 GiB requests, not 32 MiB
    /// ones. The backends' cost is in runs of clusters, not in bytes, and
    /// `sector * 512` of a u32 count cannot overflow (the range is checked).
    pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
    /// Segments in one DISCARD request.
    pub const MAX_DISCARD_SEG: u32 = 1;
    /// Most sectors in one WRITE_ZEROES segment (4 GiB, as for DISCARD).
    pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 23;
    /// Segments in one WRITE_ZEROES request.
    pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
}

/// Length of one DISCARD/WRITE_ZEROES segment.
const SEGMENT_LEN: usize = 16;
/// The one defined flag of a DISCARD/WRITE_ZEROES segment.
const FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// What a device needs to serve requests.
pub struct Disk<'a> {
    /// The storage.
    pub backend: &'a dyn DiskBackend,
    /// Writes are refused.
    pub read_only: bool,
    /// Writes must be stable before they complete (no write cache: FLUSH
    /// not negotiated, or `writeback` set to 0).
    pub write_through: bool,
    /// GET_ID answer.
    pub id: &'a [u8; ID_LEN],
}

/// What serving one chain produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The used length: the bytes written from the start of the
    /// device-writable part (see [`serve`]).
    pub used_len: u32,
    /// A host I/O error, for the device's (rate-limited) log.
    pub host_error: Option<String>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("sector range {offset:#x}+{len:#x} is past the end of the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("host I/O error: {0}")]
    Host(String),
    #[error("guest memory: {0}")]
    GuestMemory(std::io::Error),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("{0} segments where one is supported")]
    TooManySegments(usize),
    #[error("{0} sectors in one segment, more than advertised")]
    TooManySectors(u32),
    #[error("{0} descriptors, more than seg_max allows")]
    TooManyDescriptors(usize),
}

impl RequestError {
    /// The status byte (virtio 1.2, 5.2.6.2): unknown types and flags are
    /// UNSUPP, and so (as in QEMU) is a segment count over the maximum.
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_)
            | RequestError::UnsupportedFlags(_)
            | RequestError::TooManySegments(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// Serves one chain.
///
/// The used length is what virtio 1.2, 2.7.8.1 asks ("The device MUST write
/// at least len bytes to descriptor, beginning at the first device-writable
/// buffer"): the data and the status byte when the data part was written
/// whole, the data written alone when unwritten bytes separate it from the
/// status (GET_ID into a longer buffer, a read that failed), 0 when there is
/// no place for a status. For every well-formed request this is QEMU's
/// value (QEMU reports the whole device-writable length in all cases).
///
/// `None` means the request must never complete: the disk lost power
/// (`power-cut-after-writes`), and the device stops serving.
///
/// `scratch` holds the lists the walk fills; one serves every chain of a
/// `drain` call, so that walking allocates nothing once it has room.
pub fn serve<'m>(
    chain: impl IntoIterator<Item = Descriptor>,
    mem: &'m GuestMemoryMmap,
    disk: &Disk<'_>,
    scratch: &mut Scratch<'m>,
) -> Option<Outcome> {
    let nothing = Some(Outcome {
        used_len: 0,
        host_error: None,
    });
    let chain = ChainMemory::walk(chain, mem, scratch);
    if chain.writable_outside {
        return nothing;
    }
    let Some(data_len) = chain.writable.len.checked_sub(1) else {
        return nothing;
    };
    let mut served = Served {
        op: Op::Unsupported,
        sector: 0,
        sectors: 0,
        status: Status::Ok,
    };
    // Bytes of the device-writable part written from its start.
    let mut written = 0;
    let result = if chain.descriptors > limits::SEG_MAX as usize + 2 {
        Err(RequestError::TooManyDescriptors(chain.descriptors))
    } else if chain.readable_outside {
        Err(RequestError::Malformed(
            "device-readable descriptors outside guest memory",
        ))
    } else {
        execute(&chain, data_len, disk, &mut served, &mut written)
    };
    let (status, host_error) = match result {
        Ok(()) => (status::OK, None),
        Err(err) => {
            let host = matches!(err, RequestError::Host(_)).then(|| err.to_string());
            (err.status(), host)
        }
    };
    served.status = match status {
        status::OK => Status::Ok,
        status::UNSUPP => Status::Unsupp,
        _ => Status::IoErr,
    };
    if disk.backend.served(&served) == Fate::Lost {
        return None;
    }
    if !chain.writable.put_last(status) {
        return Some(Outcome {
            used_len: 0,
            host_error,
        });
    }
    let used_len = if written == data_len {
        written + 1
    } else {
        written
    };
    Some(Outcome {
        used_len: u32::try_from(used_len).unwrap_or(u32::MAX),
        host_error,
    })
}

/// The byte offset of a sector range inside the disk, once the backend's
/// layers admitted it.
fn check_range(disk: &Disk<'_>, op: Op, sector: u64, len: u64) -> Result<u64, RequestError> {
    let size = disk.backend.size();
    let offset = sector.checked_mul(SECTOR_SIZE);
    match offset {
        Some(offset) if offset.checked_add(len).is_some_and(|end| end <= size) => {
            disk.backend.admit(op, offset, len).map_err(host)?;
            Ok(offset)
        }
        _ => Err(RequestError::OutOfRange {
            offset: offset.unwrap_or(u64::MAX),
            len,
            size,
        }),
    }
}

fn host(err: super::backend::BackendError) -> RequestError {
    RequestError::Host(err.to_string())
}

/// Completes a write the way the cache mode asks: in writethrough mode the
/// data is synced before the request completes (virtio 1.2, 5.2.6.2).
fn stable(disk: &Disk<'_>) -> Result<(), RequestError> {
    if disk.write_through {
        disk.backend.flush().map_err(host)?;
    }
    Ok(())
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

/// The lists of guest memory pieces that [`serve`] fills for each chain,
/// kept from chain to chain by its caller: no per-chain lists to build,
/// move and drop (about as many instructions as `SmallVec`s made per chain,
/// but 57-62 -> 48-51 ns per 4 KiB request in the device-alone benchmark).
#[derive(Default)]
pub struct Scratch<'m> {
    readable: Vec<VolatileSlice<'m>>,
    writable: Vec<VolatileSlice<'m>>,
}

/// One chain's guest memory, found in one walk over its descriptors: the
/// device-readable bytes and the device-writable bytes, each in order.
struct ChainMemory<'s, 'm> {
    readable: Pieces<'s, 'm>,
    writable: Pieces<'s, 'm>,
    /// Descriptors in the chain (an indirect table's count as its own).
    descriptors: usize,
    /// A device-readable descriptor lies (partly) outside guest memory.
    readable_outside: bool,
    /// A device-writable descriptor lies (partly) outside guest memory.
    writable_outside: bool,
}

impl<'s, 'm> ChainMemory<'s, 'm> {
    /// Walks `chain` once. The chain's iterator ends the walk at a loop, a
    /// too-long chain or a bad indirect table.
    fn walk(
        chain: impl IntoIterator<Item = Descriptor>,
        mem: &'m GuestMemoryMmap,
        scratch: &'s mut Scratch<'m>,
    ) -> Self {
        let Scratch { readable, writable } = scratch;
        readable.clear();
        writable.clear();
        let mut walked = ChainMemory {
            readable: Pieces {
                slices: readable,
                len: 0,
            },
            writable: Pieces {
                slices: writable,
                len: 0,
            },
            descriptors: 0,
            readable_outside: false,
            writable_outside: false,
        };
        let mut region: Option<&GuestRegionMmap> = None;
        for desc in chain {
            walked.descriptors += 1;
            let (pieces, outside, access) = if desc.is_write_only() {
                (
                    &mut walked.writable,
                    &mut walked.writable_outside,
                    Permissions::Write,
                )
            } else {
                (
                    &mut walked.readable,
                    &mut walked.readable_outside,
                    Permissions::Read,
                )
            };
            if *outside {
                continue;
            }
            let len = desc.len() as usize;
            // A descriptor inside one region (every one, but for buffers
            // that straddle two regions): no iterator, and no lookup when
            // it is in the region of the one before.
            let at = desc.addr();
            if region.is_none_or(|r| r.to_region_addr(at).is_none()) {
                region = vm_memory::GuestMemoryBackend::find_region(mem, at);
            }
            if let Some(slice) = region.and_then(|r| r.get_slice(r.to_region_addr(at)?, len).ok()) {
                pieces.push(slice);
                continue;
            }
            match mem.get_slices(desc.addr(), len, access) {
                Ok(slices) => {
                    let before = pieces.len;
                    for slice in slices {
                        match slice {
                            Ok(slice) => pieces.push(slice),
                            Err(_) => *outside = true,
                        }
                    }
                    *outside |= pieces.len - before != len;
                }
                Err(_) => *outside = true,
            }
        }
        walked
    }
}

/// Bytes of guest memory in order, as the pieces that hold them.
struct Pieces<'s, 'm> {
    slices: &'s mut Vec<VolatileSlice<'m>>,
    len: usize,
}

impl<'m> Pieces<'_, 'm> {
    fn push(&mut self, slice: VolatileSlice<'m>) {
        if !slice.is_empty() {
            self.len += slice.len();
            self.slices.push(slice);
        }
    }

    /// The first 16 bytes (a request header): one load from the first
    /// piece when it holds them, as every driver lays a header out, else
    /// gathered from the pieces; `None` if there are fewer.
    fn head(&self) -> Option<[u8; 16]> {
        let first = self.slices.first()?;
        if let Ok(head) = first.get_ref::<[u8; 16]>(0) {
            return Some(head.load());
        }
        let mut head = [0u8; 16];
        self.read(0, &mut head).then_some(head)
    }

    /// Stores `byte` as the last byte (a request's status); false if there
    /// is none.
    fn put_last(&self, byte: u8) -> bool {
        self.slices
            .last()
            .is_some_and(|last| last.store(byte, last.len() - 1, Ordering::Relaxed).is_ok())
    }

    /// Calls `f(piece, at)` for each piece of the bytes `[start, start +
    /// len)`, `at` being its offset in the range; false, before any call,
    /// when the range runs past the end. Walks the pieces in place, so the
    /// header and status byte of a request are copied without a list.
    fn each(&self, start: usize, len: usize, mut f: impl FnMut(VolatileSlice<'m>, usize)) -> bool {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        let (mut skip, mut at) = (start, 0);
        for slice in self.slices.iter() {
            if at == len {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let take = (slice.len() - skip).min(len - at);
            match slice.subslice(skip, take) {
                Ok(piece) => f(piece, at),
                Err(_) => return false,
            }
            skip = 0;
            at += take;
        }
        true
    }

    /// Copies the bytes from `start` into `buf`; false if there are fewer.
    fn read(&self, start: usize, buf: &mut [u8]) -> bool {
        self.each(start, buf.len(), |piece, at| {
            piece.copy_to(&mut buf[at..at + piece.len()]);
        })
    }

    /// Copies `bytes` to the bytes from `start`; false if there is no room.
    fn write(&self, start: usize, bytes: &[u8]) -> bool {
        self.each(start, bytes.len(), |piece, at| {
            piece.copy_from(&bytes[at..at + piece.len()]);
        })
    }
}

/// Serves a request whose memory was found: `data_len` is the length of the
/// device-writable part before the status byte; `written` counts what was
/// written from its start.
fn execute(
    chain: &ChainMemory<'_, '_>,
    data_len: usize,
    disk: &Disk<'_>,
    served: &mut Served,
    written: &mut usize,
) -> Result<(), RequestError> {
    let Some(header) = chain.readable.head() else {
        return Err(RequestError::Malformed("header shorter than 16 bytes"));
    };
    let kind = le_u32(&header[0..4]);
    let sector = le_u64(&header[8..16]);
    served.op = op_of(kind);
    served.sector = sector;
    let writes = matches!(kind, types::OUT | types::DISCARD | types::WRITE_ZEROES);
    if writes && disk.read_only {
        return Err(RequestError::ReadOnly);
    }
    // The device-readable bytes after the header.
    let payload = chain.readable.len - header.len();
    match kind {
        types::IN => {
            let len = data_len;
            if !(len as u64).is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed("read length not a multiple of 512"));
            }
            served.sectors = len as u64 / SECTOR_SIZE;
            let offset = check_range(disk, Op::Read, sector, len as u64)?;
            let mut bufs = IoBufsMut::new();
            let inside = chain.writable.each(0, len, |piece, _| {
                // SAFETY: the piece is guest memory that `mem` keeps mapped
                // and writable while borrowed, which outlives `bufs` (a
                // guard maps nothing without vm-memory's `xen` feature,
                // which the workspace does not enable and an assertion
                // below checks, so its pointer is the mapping's own); the
                // data descriptors of one request may overlap each other
                // (a guest's choice: the bytes there are then the last
                // written), but nothing in the VMM holds a Rust reference
                // to guest memory. The guest may access it concurrently,
                // which only makes what it sees of a read in progress
                // unspecified. Guest memory tracks no dirty pages
                // (`GuestMemoryMmap<()>`), so none are marked.
                unsafe { bufs.push_raw(piece.ptr_guard_mut().as_ptr(), piece.len()) };
            });
            if !inside {
                return Err(outside());
            }
            disk.backend
                .read_vectored_at(&mut bufs, offset)
                .map_err(host)?;
            *written = len;
            Ok(())
        }
        types::OUT => {
            let len = payload;
            if !(len as u64).is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed(
                    "write length not a multiple of 512",
                ));
            }
            served.sectors = len as u64 / SECTOR_SIZE;
            let offset = check_range(disk, Op::Write, sector, len as u64)?;
            let mut bufs = IoBufs::new();
            let inside = chain.readable.each(header.len(), len, |piece, _| {
                // SAFETY: the piece is guest memory that `mem` keeps mapped
                // and readable while borrowed, which outlives `bufs` (a
                // guard maps nothing without vm-memory's `xen` feature, as
                // for reads), and nothing in the VMM holds a `&mut` to
                // guest memory. A guest changing it meanwhile only changes
                // what is written.
                unsafe { bufs.push_raw(piece.ptr_guard().as_ptr(), piece.len()) };
            });
            if !inside {
                return Err(outside());
            }
            disk.backend
                .write_vectored_at(&bufs, offset)
                .map_err(host)?;
            stable(disk)
        }
        types::FLUSH => {
            disk.backend.admit(Op::Flush, 0, 0).map_err(host)?;
            disk.backend.flush().map_err(host)
        }
        types::GET_ID => {
            let n = data_len.min(ID_LEN);
            if !chain.writable.write(0, &disk.id[..n]) {
                return Err(outside());
            }
            *written = n;
            Ok(())
        }
        types::DISCARD | types::WRITE_ZEROES => discard_or_write_zeroes(
            &chain.readable,
            payload,
            disk,
            kind == types::DISCARD,
            served,
        ),
        other => Err(RequestError::Unsupported(other)),
    }
}

// The read and write paths keep a data piece's pointer after its guard is
// gone. That is sound where a guard maps nothing and so has nothing to drop:
// vm-memory without its `xen` feature, whose guards unmap on drop. Turning
// that feature on anywhere in the build makes this fail to compile.
const _: () = assert!(
    !std::mem::needs_drop::<vm_memory::volatile_memory::PtrGuard>()
        && !std::mem::needs_drop::<vm_memory::volatile_memory::PtrGuardMut>(),
    "guest memory guards that unmap on drop: keep them until the I/O is done"
);

/// The error of data that is not in guest memory.
fn outside() -> RequestError {
    RequestError::GuestMemory(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "a data descriptor is outside guest memory",
    ))
}

/// DISCARD and WRITE_ZEROES (virtio 1.2, 5.2.6): one segment (sector,
/// num_sectors, flags), checked against the advertised limits and the
/// spec's flag rules before anything is done.
fn discard_or_write_zeroes(
    readable: &Pieces<'_, '_>,
    len: usize,
    disk: &Disk<'_>,
    discard: bool,
    served: &mut Served,
) -> Result<(), RequestError> {
    let (max_seg, max_sectors) = if discard {
        (limits::MAX_DISCARD_SEG, limits::MAX_DISCARD_SECTORS)
    } else {
        (
            limits::MAX_WRITE_ZEROES_SEG,
            limits::MAX_WRITE_ZEROES_SECTORS,
        )
    };
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::Malformed(
            "discard/write-zeroes data is not whole 16-byte segments",
        ));
    }
    let segments = len / SEGMENT_LEN;
    if segments > max_seg as usize {
        return Err(RequestError::TooManySegments(segments));
    }
    let mut segment = [0u8; SEGMENT_LEN];
    if !readable.read(readable.len - len, &mut segment) {
        return Err(outside());
    }
    let sector = le_u64(&segment[0..8]);
    let sectors = le_u32(&segment[8..12]);
    let flags = le_u32(&segment[12..16]);
    // "The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for
    // discard, secure erase and write zeroes commands if any unknown flag is
    // set. Furthermore, ... for discard commands if the unmap flag is set."
    if flags & !FLAG_UNMAP != 0 || (discard && flags & FLAG_UNMAP != 0) {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    if sectors > max_sectors {
        return Err(RequestError::TooManySectors(sectors));
    }
    served.sector = sector;
    served.sectors = u64::from(sectors);
    let len = u64::from(sectors) * SECTOR_SIZE;
    let offset = check_range(disk, served.op, sector, len)?;
    if discard {
        disk.backend.discard(offset, len).map_err(host)?;
    } else {
        let unmap = flags & FLAG_UNMAP != 0;
        disk.backend
            .write_zeroes(offset, len, unmap)
            .map_err(host)?;
    }
    stable(disk)
}

fn op_of(kind: u32) -> Op {
    match kind {
        types::IN => Op::Read,
        types::OUT => Op::Write,
        types::FLUSH => Op::Flush,
        types::GET_ID => Op::GetId,
        types::DISCARD => Op::Discard,
        types::WRITE_ZEROES => Op::WriteZeroes,
        _ => Op::Unsupported,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::backend::BackendError;

    /// Device-writable descriptor flag.
    pub const F_WRITE: u16 = 2;
    pub const HEADER: u64 = 0x10_0000;
    pub const DATA: u64 = 0x20_0000;
    pub const STATUS: u64 = 0x30_0000;

    /// An in-memory disk that counts flushes and can be made to fail.
    #[derive(Default)]
    pub struct MemDisk {
        pub bytes: Mutex<Vec<u8>>,
        pub flushes: AtomicUsize,
        pub fail: AtomicBool,
    }

    impl MemDisk {
        pub fn new(size: usize) -> Self {
            MemDisk {
                bytes: Mutex::new((0..size).map(|i| (i % 253) as u8).collect()),
                ..Default::default()
            }
        }
        fn check(&self) -> Result<(), BackendError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err("injected: No space left on device".into());
            }
            Ok(())
        }
    }

    impl DiskBackend for MemDisk {
        fn size(&self) -> u64 {
            self.bytes.lock().expect("lock").len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
            self.check()?;
            let bytes = self.bytes.lock().expect("lock");
            buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
            self.check()?;
            self.bytes.lock().expect("lock")[offset as usize..offset as usize + buf.len()]
                .copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            self.check()?;
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
            self.check()?;
            self.bytes.lock().expect("lock")[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.write_zeroes(offset, len, true)
        }
        fn discard_alignment(&self) -> u64 {
            SECTOR_SIZE
        }
    }

    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("guest memory")
    }

    pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    pub fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).expect("header");
    }

    /// Serves the chain `descs` and returns (used length, status byte).
    fn run(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        disk: &MemDisk,
        read_only: bool,
    ) -> (u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).expect("chain");
        let id = *b"acow-test-serial-id0";
        let len = serve(
            chain,
            mem,
            &Disk {
                backend: disk,
                read_only,
                write_through: false,
                id: &id,
            },
            &mut Scratch::default(),
        )
        .expect("a disk with power completes every request")
        .used_len;
        (
            len,
            mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        )
    }

    /// Serves the chain `descs` on any backend; returns (used length, status).
    pub fn run_on(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        backend: &dyn DiskBackend,
    ) -> (u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).expect("chain");
        let id = [0u8; ID_LEN];
        let len = serve(
            chain,
            mem,
            &Disk {
                backend,
                read_only: false,
                write_through: false,
                id: &id,
            },
            &mut Scratch::default(),
        )
        .expect("a disk with power completes every request")
        .used_len;
        (
            len,
            mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        )
    }

    /// Serves a one-segment DISCARD or WRITE_ZEROES of `len` bytes at `offset`.
    pub fn zero_request(
        backend: &dyn DiskBackend,
        kind: u32,
        offset: u64,
        len: u64,
        flags: u32,
    ) -> u8 {
        let mem = guest_memory();
        write_header(&mem, kind, 0);
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&(offset / SECTOR_SIZE).to_le_bytes());
        s[8..12].copy_from_slice(&((len / SECTOR_SIZE) as u32).to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(DATA)).expect("segment");
        let descs = [
            desc(HEADER, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ];
        run_on(&mem, &descs, backend).1
    }

    fn standard(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HEADER, 16, 0),
            desc(DATA, data_len, data_flags),
            desc(STATUS, 1, F_WRITE),
        ]
    }

    #[test]
    fn read_copies_disk_bytes_into_guest_memory() {
        let mem = guest_memory();
        let disk = MemDisk::new(8192);
        write_header(&mem, types::IN, 2);
        assert_eq!(
            run(&mem, &standard(1024, F_WRITE), &disk, false),
            (1025, status::OK)
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
        assert!(got == disk.bytes.lock().expect("lock")[1024..2048]);
    }

    #[test]
    fn write_copies_guest_bytes_to_the_disk_in_any_framing() {
        let mem = guest_memory();
        let disk = MemDisk::new(8192);
        mem.write_slice(&[7u8; 512], GuestAddress(DATA))
            .expect("data");
        write_header(&mem, types::OUT, 1);
        assert_eq!(run(&mem, &standard(512, 0), &disk, false), (1, status::OK));
        assert!(disk.bytes.lock().expect("lock")[512..1024]
            .iter()
            .all(|&b| b == 7));
        // Header and data in one descriptor, status after them.
        mem.write_slice(&[9u8; 512], GuestAddress(HEADER + 16))
            .expect("data");
        write_header(&mem, types::OUT, 3);
        let descs = [desc(HEADER, 16 + 512, 0), desc(STATUS, 1, F_WRITE)];
        assert_eq!(run(&mem, &descs, &disk, false), (1, status::OK));
        assert!(disk.bytes.lock().expect("lock")[1536..2048]
            .iter()
            .all(|&b| b == 9));
    }

    #[test]
    fn flush_get_id_discard_and_write_zeroes() {
        let mem = guest_memory();
        let disk = MemDisk::new(8192);
        write_header(&mem, types::FLUSH, 0);
        let flush = [desc(HEADER, 16, 0), desc(STATUS, 1, F_WRITE)];
        assert_eq!(run(&mem, &flush, &disk, false), (1, status::OK));
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);

        write_header(&mem, types::GET_ID, 0);
        assert_eq!(
            run(&mem, &standard(20, F_WRITE), &disk, false),
            (21, status::OK)
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"acow-test-serial-id0");

        for (kind, sector) in [(types::DISCARD, 1u64), (types::WRITE_ZEROES, 4)] {
            write_header(&mem, kind, 0);
            let mut segment = [0u8; 16];
            segment[..8].copy_from_slice(&sector.to_le_bytes());
            segment[8..12].copy_from_slice(&2u32.to_le_bytes());
            mem.write_slice(&segment, GuestAddress(DATA))
                .expect("segment");
            assert_eq!(run(&mem, &standard(16, 0), &disk, false), (1, status::OK));
            let start = sector as usize * 512;
            assert!(disk.bytes.lock().expect("lock")[start..start + 1024]
                .iter()
                .all(|&b| b == 0));
        }
    }

    #[test]
    fn read_only_disks_refuse_every_kind_of_write() {
        let mem = guest_memory();
        let disk = MemDisk::new(4096);
        let before = disk.bytes.lock().expect("lock").clone();
        for kind in [types::OUT, types::DISCARD, types::WRITE_ZEROES] {
            write_header(&mem, kind, 0);
            assert_eq!(
                run(&mem, &standard(512, 0), &disk, true),
                (1, status::IOERR),
                "type {kind}"
            );
        }
        assert!(*disk.bytes.lock().expect("lock") == before);
        // Reads still work.
        write_header(&mem, types::IN, 0);
        assert_eq!(
            run(&mem, &standard(512, F_WRITE), &disk, true).1,
            status::OK
        );
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let mem = guest_memory();
        let disk = MemDisk::new(4096);
        let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>, u8)> = vec![
            ("unknown type", 99, 0, standard(512, 0), status::UNSUPP),
            (
                "sector past the end",
                types::IN,
                8,
                standard(512, F_WRITE),
                status::IOERR,
            ),
            (
                "range crossing the end",
                types::OUT,
                7,
                standard(1024, 0),
                status::IOERR,
            ),
            (
                "sector overflow",
                types::IN,
                u64::MAX,
                standard(512, F_WRITE),
                status::IOERR,
            ),
            (
                "length not a multiple of 512",
                types::IN,
                0,
                standard(100, F_WRITE),
                status::IOERR,
            ),
            (
                "short header",
                types::IN,
                0,
                vec![desc(HEADER, 8, 0), desc(STATUS, 1, F_WRITE)],
                status::IOERR,
            ),
            (
                "data outside guest memory",
                types::OUT,
                0,
                vec![
                    desc(HEADER, 16, 0),
                    desc(0xffff_0000_0000, 512, 0),
                    desc(STATUS, 1, F_WRITE),
                ],
                status::IOERR,
            ),
            (
                "zero-length data",
                types::OUT,
                0,
                standard(0, 0),
                status::OK,
            ),
            (
                "discard without a segment",
                types::DISCARD,
                0,
                standard(8, 0),
                status::IOERR,
            ),
        ];
        for (what, kind, sector, descs, expected) in cases {
            write_header(&mem, kind, sector);
            assert_eq!(run(&mem, &descs, &disk, false).1, expected, "{what}");
        }
    }

    #[test]
    fn no_status_byte_means_nothing_is_written_back() {
        let mem = guest_memory();
        let disk = MemDisk::new(4096);
        write_header(&mem, types::IN, 0);
        // Everything device-readable: there is no place for a status.
        let descs = [desc(HEADER, 16, 0), desc(DATA, 512, 0)];
        assert_eq!(run(&mem, &descs, &disk, false), (0, 0xff));
        // Writable part outside guest memory.
        let descs = [desc(HEADER, 16, 0), desc(0xffff_0000_0000, 1, F_WRITE)];
        assert_eq!(run(&mem, &descs, &disk, false), (0, 0xff));
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    /// virtio 1.2, 5.2.6.2 (Device Operation, device requirements): "The
    /// device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard,
    /// secure erase and write zeroes commands if any unknown flag is set",
    /// and for discard commands with `unmap` set. Nothing may be changed.
    #[test]
    fn unknown_flags_and_discard_with_unmap_are_unsupported() {
        let mem = guest_memory();
        let disk = MemDisk::new(8192);
        let before = disk.bytes.lock().expect("lock").clone();
        for (kind, flags) in [
            (types::WRITE_ZEROES, 2u32),
            (types::WRITE_ZEROES, 0x8000_0001),
            (types::DISCARD, 1),
            (types::DISCARD, 4),
        ] {
            write_header(&mem, kind, 0);
            mem.write_slice(&segment(0, 4, flags), GuestAddress(DATA))
                .expect("segment");
            assert_eq!(
                run(&mem, &standard(16, 0), &disk, false).1,
                status::UNSUPP,
                "type {kind} flags {flags:#x}"
            );
        }
        assert!(*disk.bytes.lock().expect("lock") == before);
        // unmap is a valid flag of WRITE_ZEROES.
        write_header(&mem, types::WRITE_ZEROES, 0);
        mem.write_slice(&segment(0, 4, 1), GuestAddress(DATA))
            .expect("segment");
        assert_eq!(run(&mem, &standard(16, 0), &disk, false).1, status::OK);
    }

    /// virtio 1.2, 5.2.6.1 (driver requirements: "VIRTIO_BLK_T_DISCARD
    /// requests MUST NOT contain more than max_discard_seg segments", the
    /// same for write zeroes) and 5.2.4/5.2.5 (the advertised
    /// max_discard_sectors, max_write_zeroes_sectors): the device enforces
    /// what it advertises, as QEMU does: too many segments is UNSUPP, a
    /// segment over the sector limit or a torn segment is IOERR.
    #[test]
    fn advertised_discard_and_write_zeroes_limits_are_enforced() {
        let mem = guest_memory();
        let disk = MemDisk::new(40 << 20);
        let before_len = disk.bytes.lock().expect("lock").len();
        for kind in [types::DISCARD, types::WRITE_ZEROES] {
            // Two segments where one is advertised.
            write_header(&mem, kind, 0);
            mem.write_slice(&segment(0, 1, 0), GuestAddress(DATA))
                .expect("segment");
            mem.write_slice(&segment(8, 1, 0), GuestAddress(DATA + 16))
                .expect("segment");
            assert_eq!(
                run(&mem, &standard(32, 0), &disk, false).1,
                status::UNSUPP,
                "type {kind}: two segments"
            );
            // A segment followed by 8 stray bytes.
            assert_eq!(
                run(&mem, &standard(24, 0), &disk, false).1,
                status::IOERR,
                "type {kind}: trailing bytes"
            );
            // More sectors than max_*_sectors (2^23) in one segment.
            let over = limits::MAX_DISCARD_SECTORS.max(limits::MAX_WRITE_ZEROES_SECTORS) + 1;
            mem.write_slice(&segment(0, over, 0), GuestAddress(DATA))
                .expect("segment");
            assert_eq!(
                run(&mem, &standard(16, 0), &disk, false).1,
                status::IOERR,
                "type {kind}: too many sectors"
            );
        }
        assert_eq!(disk.bytes.lock().expect("lock").len(), before_len);
        assert!(disk.bytes.lock().expect("lock")[..4096]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 253) as u8));
    }

    /// The advertised 4 GiB limits in use: a whole 64 MiB disk in one
    /// DISCARD or WRITE_ZEROES request is served; a full-size segment that
    /// runs past the end, or whose sector overflows `sector * 512`, is
    /// IOERR and changes nothing (never a panic).
    #[test]
    fn the_largest_segments_are_served_or_refused_by_range() {
        let mem = guest_memory();
        let size = 64usize << 20;
        let disk = MemDisk::new(size);
        let sectors = (size / 512) as u32;
        let max = limits::MAX_DISCARD_SECTORS.min(limits::MAX_WRITE_ZEROES_SECTORS);
        assert!(max >= sectors, "a 64 MiB disk fits one request");
        for kind in [types::DISCARD, types::WRITE_ZEROES] {
            for (sector, n) in [
                (1u64, sectors),          // one sector past the end
                (0, max),                 // far past the end
                (u64::MAX / 512 + 1, 1),  // sector * 512 overflows
                (u64::MAX - 1, max),      // and the end too
                ((size / 512) as u64, 1), // starts at the end
            ] {
                disk.bytes.lock().expect("lock")[size - 1] = 0xee;
                write_header(&mem, kind, 0);
                mem.write_slice(&segment(sector, n, 0), GuestAddress(DATA))
                    .expect("segment");
                assert_eq!(
                    run(&mem, &standard(16, 0), &disk, false),
                    (1, status::IOERR),
                    "type {kind}: sector {sector}, {n} sectors"
                );
                assert_eq!(disk.bytes.lock().expect("lock")[size - 1], 0xee);
            }
            write_header(&mem, kind, 0);
            mem.write_slice(&segment(0, sectors, 0), GuestAddress(DATA))
                .expect("segment");
            assert_eq!(
                run(&mem, &standard(16, 0), &disk, false),
                (1, status::OK),
                "type {kind}: the whole disk"
            );
            assert!(disk.bytes.lock().expect("lock").iter().all(|&b| b == 0));
        }
        assert_eq!(disk.bytes.lock().expect("lock").len(), size);
    }

    /// virtio 1.2, 5.2.3/5.2.4 (VIRTIO_BLK_F_SEG_MAX: "Maximum number of
    /// segments in a request is in seg_max"): the advertised maximum is
    /// enforced, also through an indirect table (which can hold far more
    /// descriptors than the queue): one more is IOERR and writes nothing.
    #[test]
    fn more_data_descriptors_than_seg_max_is_an_error() {
        let mem = guest_memory();
        let table = 0x40_0000u64;
        for (extra, expected) in [(1u16, status::IOERR), (0, status::OK)] {
            let disk = MemDisk::new(1 << 20);
            write_header(&mem, types::OUT, 0);
            let n = limits::SEG_MAX as u16 + 2 + extra;
            for i in 0..n {
                let (addr, len, flags) = match i {
                    0 => (HEADER, 16, 0),
                    _ if i == n - 1 => (STATUS, 1, F_WRITE),
                    _ => (DATA + 512 * u64::from(i - 1), 512, 0),
                };
                let flags = if i + 1 < n { flags | 1 } else { flags };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
                mem.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
                    .expect("indirect descriptor");
            }
            let descs = [desc(table, 16 * u32::from(n), 4)];
            assert_eq!(
                run(&mem, &descs, &disk, false).1,
                expected,
                "{n} descriptors"
            );
            let untouched = disk.bytes.lock().expect("lock")[..512]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 253) as u8);
            assert_eq!(untouched, expected != status::OK);
        }
    }

    /// virtio 1.2, 2.7.8.1 (split virtqueue, used ring, device
    /// requirements): "The device MUST write at least len bytes to descriptor,
    /// beginning at the first device-writable buffer, prior to updating the
    /// used idx." The used length is the prefix the device really wrote:
    /// data and status when the data part was written whole (what QEMU
    /// reports for every well-formed request), the data written alone when
    /// a gap separates it from the status byte (QEMU reports the whole
    /// writable length even then).
    #[test]
    fn the_used_length_counts_only_bytes_written() {
        let mem = guest_memory();
        let disk = MemDisk::new(4096);
        // GET_ID into a 512-byte buffer writes 20 bytes, then the status.
        write_header(&mem, types::GET_ID, 0);
        assert_eq!(
            run(&mem, &standard(512, F_WRITE), &disk, false),
            (20, status::OK)
        );
        // A read that fails before writing data writes only the status.
        disk.fail.store(true, Ordering::SeqCst);
        write_header(&mem, types::IN, 0);
        assert_eq!(
            run(&mem, &standard(512, F_WRITE), &disk, false),
            (0, status::IOERR)
        );
        disk.fail.store(false, Ordering::SeqCst);
        // The well-formed cases count data and status.
        assert_eq!(
            run(&mem, &standard(512, F_WRITE), &disk, false),
            (513, status::OK)
        );
        write_header(&mem, types::GET_ID, 0);
        assert_eq!(
            run(&mem, &standard(20, F_WRITE), &disk, false),
            (21, status::OK)
        );
    }

    /// One walk finds every byte: the pieces are exactly the chain's
    /// device-readable and device-writable bytes, in order, whatever the
    /// framing; a descriptor outside guest memory (wholly or in part) is
    /// flagged, never a panic; ranges past the end are refused.
    #[test]
    fn one_walk_finds_the_pieces_and_flags_memory_outside() {
        let mem = guest_memory();
        let mut scratch = Scratch::default();
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[
                desc(HEADER, 16 + 100, 0),
                desc(DATA, 412, 0),
                desc(0xff_0000, 0x2_0000, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ])
            .expect("chain");
        let walked = ChainMemory::walk(chain, &mem, &mut scratch);
        assert_eq!(walked.descriptors, 4);
        assert!(!walked.readable_outside);
        assert!(
            walked.writable_outside,
            "0xff_0000 + 128 KiB ends past 16 MiB"
        );
        assert_eq!(walked.readable.len, 16 + 512);
        let mut lens = Vec::new();
        assert!(walked
            .readable
            .each(16, 512, |s, at| lens.push((at, s.len()))));
        assert_eq!(lens, [(0, 100), (100, 412)]);
        assert!(
            !walked.readable.each(16, 513, |_, _| panic!("called")),
            "one byte too many"
        );
        assert!(
            !walked.readable.each(usize::MAX, 2, |_, _| panic!("called")),
            "overflow"
        );

        // Bytes split across descriptors read and write back in order.
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(DATA + 410))
            .expect("bytes");
        let chain = queue
            .build_desc_chain(&[
                desc(DATA, 411, 0),
                desc(DATA + 411, 3, 0),
                desc(STATUS, 1, F_WRITE),
                desc(STATUS + 1, 2, F_WRITE),
            ])
            .expect("chain");
        let walked = ChainMemory::walk(chain, &mem, &mut scratch);
        let mut got = [0u8; 4];
        assert!(walked.readable.read(410, &mut got));
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(!walked.readable.read(411, &mut got), "only 3 bytes left");
        assert!(walked.writable.write(0, &[7, 8, 9]));
        let mut status = [0u8; 3];
        mem.read_slice(&mut status, GuestAddress(STATUS))
            .expect("status");
        assert_eq!(status, [7, 8, 9]);
        assert!(!walked.writable.write(1, &[0; 3]), "no room");
        assert!(walked.writable.put_last(5), "the status byte");
        mem.read_slice(&mut status, GuestAddress(STATUS))
            .expect("status");
        assert_eq!(status, [7, 8, 5], "the last byte of the last piece");

        // A header split across descriptors is gathered; one in a single
        // descriptor is loaded from it; fewer than 16 bytes are none.
        let header: Vec<u8> = (1..=16).collect();
        mem.write_slice(&header, GuestAddress(HEADER))
            .expect("header");
        for framing in [&[16u32][..], &[20], &[3, 13], &[1, 1, 14], &[15, 5]] {
            let mut at = HEADER;
            let descs: Vec<_> = framing
                .iter()
                .map(|&len| {
                    let d = desc(at, len, 0);
                    at += u64::from(len);
                    d
                })
                .collect();
            let walked = ChainMemory::walk(
                queue.build_desc_chain(&descs).expect("chain"),
                &mem,
                &mut scratch,
            );
            assert_eq!(
                walked.readable.head().map(Vec::from),
                Some(header.clone()),
                "{framing:?}"
            );
        }
        let walked = ChainMemory::walk(
            queue
                .build_desc_chain(&[desc(HEADER, 15, 0)])
                .expect("chain"),
            &mem,
            &mut scratch,
        );
        assert_eq!(walked.readable.head(), None, "15 bytes");
        assert!(!walked.writable.put_last(0), "no device-writable byte");
    }

    /// Guest RAM in three mappings, adjacent in guest-physical space, and a
    /// gap after them: a header that straddles the first boundary and data
    /// that straddle the second are served in pieces (the walk's one-region
    /// fast path falls back), and a data buffer that runs into the gap is an
    /// error that moves nothing.
    #[test]
    fn descriptors_across_regions_are_served_in_pieces() {
        let mib = 0x10_0000u64;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib as usize),
            (GuestAddress(mib), mib as usize),
            (GuestAddress(2 * mib), mib as usize),
        ])
        .expect("three regions");
        assert_eq!(vm_memory::GuestMemoryBackend::num_regions(&mem), 3);
        // The mock queue's rings are at 0.
        let (header, data, status) = (mib - 8, 2 * mib - 0x800, 3 * mib - 1);
        let disk = MemDisk::new(16 << 10);
        let serve_chain = |kind: u32, descs: &[RawDescriptor]| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&4u64.to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).expect("header");
            mem.write_obj(0xffu8, GuestAddress(status)).expect("status");
            let queue = MockSplitQueue::new(&mem, 16);
            let chain = queue.build_desc_chain(descs).expect("chain");
            let disk = Disk {
                backend: &disk,
                read_only: false,
                write_through: false,
                id: &[0; ID_LEN],
            };
            let outcome = serve(chain, &mem, &disk, &mut Scratch::default()).expect("completes");
            let status: u8 = mem.read_obj(GuestAddress(status)).expect("status");
            (outcome.used_len, status)
        };
        let chain = |flags| {
            [
                desc(header, 16, 0),
                desc(data, 4096, flags),
                desc(status, 1, F_WRITE),
            ]
        };
        assert_eq!(serve_chain(types::IN, &chain(F_WRITE)), (4097, status::OK));
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(data)).expect("data");
        assert!(got == disk.bytes.lock().expect("lock")[2048..2048 + 4096]);

        mem.write_slice(&[0x5a; 4096], GuestAddress(data))
            .expect("data");
        assert_eq!(serve_chain(types::OUT, &chain(0)), (1, status::OK));
        let bytes = disk.bytes.lock().expect("lock").clone();
        assert!(bytes[2048..2048 + 4096].iter().all(|&b| b == 0x5a));
        assert!(bytes[2048 + 4096..]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((i + 6144) % 253) as u8));

        // Data that runs past the last region into unmapped space: no
        // status can be trusted to the guest, nothing is written (neither
        // the data nor the status descriptor's byte).
        mem.write_slice(&[0x77; 512], GuestAddress(3 * mib - 512))
            .expect("last bytes");
        let gap_status = mib + 0x1000;
        mem.write_obj(0xeeu8, GuestAddress(gap_status))
            .expect("status byte");
        let gap = [
            desc(header, 16, 0),
            desc(3 * mib - 512, 1024, F_WRITE),
            desc(gap_status, 1, F_WRITE),
        ];
        assert_eq!(serve_chain(types::IN, &gap), (0, 0xff));
        let mut last = [0u8; 511];
        mem.read_slice(&mut last, GuestAddress(3 * mib - 512))
            .expect("last bytes");
        assert!(last.iter().all(|&b| b == 0x77));
        let untouched: u8 = mem.read_obj(GuestAddress(gap_status)).expect("s");
        assert_eq!(untouched, 0xee);
    }

    #[test]
    fn host_errors_become_ioerr_and_the_device_goes_on() {
        let mem = guest_memory();
        let disk = MemDisk::new(4096);
        disk.fail.store(true, Ordering::SeqCst);
        for (kind, flags) in [(types::IN, F_WRITE), (types::OUT, 0)] {
            write_header(&mem, kind, 0);
            assert_eq!(
                run(&mem, &standard(512, flags), &disk, false).1,
                status::IOERR
            );
        }
        disk.fail.store(false, Ordering::SeqCst);
        write_header(&mem, types::IN, 0);
        assert_eq!(
            run(&mem, &standard(512, F_WRITE), &disk, false).1,
            status::OK
        );
    }
}
