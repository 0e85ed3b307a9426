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
