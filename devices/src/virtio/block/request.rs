//! The virtio-blk request path: one descriptor chain in, one status byte out.
//!
//! A request is a 16-byte header (type, reserved, sector) in the
//! device-readable part of the chain, data in either part, and a status byte
//! as the last device-writable byte. The chain is read through virtio-queue's
//! `Reader` and `Writer`, so any split of these bytes across descriptors is
//! accepted, and anything outside guest memory, a missing header or status,
//! a loop or an over-long chain becomes an error status, never a panic.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::backend::DiskBackend;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by GET_ID.
pub const ID_LEN: usize = 20;

/// Request types (virtio 1.x, 5.2.6).
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Device serial.
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Completion statuses.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// Largest piece of data staged at once between guest memory and the disk.
const STAGE_LEN: usize = 1 << 20;
/// Length of one DISCARD/WRITE_ZEROES segment.
const SEGMENT_LEN: usize = 16;

/// What a device needs to serve requests.
pub struct Disk<'a> {
    /// The storage.
    pub backend: &'a dyn DiskBackend,
    /// Writes are refused.
    pub read_only: bool,
    /// GET_ID answer.
    pub id: &'a [u8; ID_LEN],
}

/// Why a request failed, for the log line.
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
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// Serves one chain; returns the number of bytes written into the
/// device-writable part (0 when there is not even a status byte to write).
pub fn serve(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &Disk<'_>,
) -> u32 {
    let Ok(mut writer) = chain.clone().writer(mem) else {
        return 0;
    };
    let Some(data_len) = writer.available_bytes().checked_sub(1) else {
        return 0;
    };
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        return 0;
    };
    let result = match chain.reader(mem) {
        Ok(mut reader) => execute(&mut reader, &mut writer, disk),
        Err(_) => Err(RequestError::Malformed(
            "device-readable descriptors outside guest memory",
        )),
    };
    let status = match result {
        Ok(()) => status::OK,
        Err(err) => {
            if matches!(err, RequestError::Host(_)) {
                eprintln!("vmm: virtio-blk: {err}");
            }
            err.status()
        }
    };
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (writer.bytes_written() + 1) as u32
}

fn check_range(disk: &Disk<'_>, sector: u64, len: u64) -> Result<u64, RequestError> {
    let size = disk.backend.size();
    let offset = sector.checked_mul(SECTOR_SIZE);
    match offset {
        Some(offset) if offset.checked_add(len).is_some_and(|end| end <= size) => Ok(offset),
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

fn execute(
    reader: &mut virtio_queue::Reader<'_>,
    writer: &mut virtio_queue::Writer<'_>,
    disk: &Disk<'_>,
) -> Result<(), RequestError> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::Malformed("header shorter than 16 bytes"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let writes = matches!(kind, types::OUT | types::DISCARD | types::WRITE_ZEROES);
    if writes && disk.read_only {
        return Err(RequestError::ReadOnly);
    }
    match kind {
        types::IN => {
            let len = writer.available_bytes();
            if !(len as u64).is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed("read length not a multiple of 512"));
            }
            let offset = check_range(disk, sector, len as u64)?;
            let mut stage = vec![0u8; len.min(STAGE_LEN)];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(STAGE_LEN);
                disk.backend
                    .read_at(&mut stage[..n], offset + done as u64)
                    .map_err(host)?;
                writer
                    .write_all(&stage[..n])
                    .map_err(RequestError::GuestMemory)?;
                done += n;
            }
            Ok(())
        }
        types::OUT => {
            let len = reader.available_bytes();
            if !(len as u64).is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed(
                    "write length not a multiple of 512",
                ));
            }
            let offset = check_range(disk, sector, len as u64)?;
            let mut stage = vec![0u8; len.min(STAGE_LEN)];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(STAGE_LEN);
                reader
                    .read_exact(&mut stage[..n])
                    .map_err(RequestError::GuestMemory)?;
                disk.backend
                    .write_at(&stage[..n], offset + done as u64)
                    .map_err(host)?;
                done += n;
            }
            Ok(())
        }
        types::FLUSH => disk.backend.flush().map_err(host),
        types::GET_ID => {
            let n = writer.available_bytes().min(ID_LEN);
            writer
                .write_all(&disk.id[..n])
                .map_err(RequestError::GuestMemory)
        }
        types::DISCARD | types::WRITE_ZEROES => {
            if reader.available_bytes() < SEGMENT_LEN {
                return Err(RequestError::Malformed("no discard/write-zeroes segment"));
            }
            while reader.available_bytes() >= SEGMENT_LEN {
                let mut segment = [0u8; SEGMENT_LEN];
                reader
                    .read_exact(&mut segment)
                    .map_err(RequestError::GuestMemory)?;
                let mut first = [0u8; 8];
                first.copy_from_slice(&segment[..8]);
                let sectors =
                    u32::from_le_bytes([segment[8], segment[9], segment[10], segment[11]]);
                let len = u64::from(sectors) * SECTOR_SIZE;
                let offset = check_range(disk, u64::from_le_bytes(first), len)?;
                disk.backend.write_zeroes(offset, len).map_err(host)?;
            }
            Ok(())
        }
        other => Err(RequestError::Unsupported(other)),
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
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.check()?;
            self.bytes.lock().expect("lock")[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
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
                id: &id,
            },
        );
        (
            len,
            mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
        )
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
