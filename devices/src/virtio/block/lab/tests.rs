//! The layers composed (trace over faults over power cut over a memory
//! disk), driven through the real request path; and the test doubles the
//! layers' own tests share.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{FaultPlan, Faults, PowerCut, PowerCutPlan, SectorRange, Trace};
use crate::virtio::block::backend::{BackendError, DiskBackend, Fate, Op, Served};
use crate::virtio::block::request::tests::{
    desc, guest_memory, write_header, MemDisk, DATA, F_WRITE, HEADER, STATUS,
};
use crate::virtio::block::request::{serve, status, types, Disk, Scratch};

/// A memory disk the test keeps a handle on while a layer owns it.
pub struct Shared(pub Arc<MemDisk>);

impl Shared {
    /// A patterned disk of `size` bytes, and the handle.
    pub fn disk(size: usize) -> (Box<dyn DiskBackend>, Arc<MemDisk>) {
        let disk = Arc::new(MemDisk::new(size));
        (Box::new(Shared(disk.clone())), disk)
    }
}

impl DiskBackend for Shared {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.0.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.discard(offset, len)
    }
    fn discard_alignment(&self) -> u64 {
        self.0.discard_alignment()
    }
}

/// A trace sink the test can read.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Sink {
    /// The lines written out so far.
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().expect("sink"))
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A served request for the layers' own tests.
pub fn served(op: Op, sector: u64, sectors: u64, ok: bool) -> Served {
    use crate::virtio::block::backend::Status;
    Served {
        op,
        sector,
        sectors,
        status: if ok { Status::Ok } else { Status::IoErr },
    }
}

/// Serves one request through the real request path; `None`: it never
/// completes.
fn request(
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    kind: u32,
    sector: u64,
    data: &[u8],
) -> Option<u8> {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    write_header(mem, kind, sector);
    let flags = if kind == types::IN { F_WRITE } else { 0 };
    mem.write_slice(data, GuestAddress(DATA)).expect("data");
    let mut descs = vec![desc(HEADER, 16, 0)];
    if !data.is_empty() {
        descs.push(desc(DATA, data.len() as u32, flags));
    }
    descs.push(desc(STATUS, 1, F_WRITE));
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_desc_chain(&descs).expect("chain");
    let id = [b'i'; 20];
    serve(
        chain,
        mem,
        &Disk {
            backend: disk,
            read_only: false,
            write_through: false,
            id: &id,
        },
        &mut Scratch::default(),
    )?;
    Some(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"))
}

fn segment(sector: u64, sectors: u32) -> Vec<u8> {
    let mut s = vec![0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s
}

#[test]
fn trace_over_faults_over_power_cut_through_the_request_path() {
    let mem = guest_memory();
    let (base, memdisk) = Shared::disk(64 * 512);
    let original = memdisk.bytes.lock().expect("lock").clone();
    let cuts = Arc::new(AtomicU64::new(0));
    let seen = cuts.clone();
    let cut = PowerCut::new(
        base,
        PowerCutPlan {
            after_writes: 4,
            seed: None,
        },
        Box::new(move |n| seen.store(n, Ordering::SeqCst)),
    );
    let faults = Faults::new(
        Box::new(cut),
        FaultPlan {
            fail_read: vec![SectorRange {
                start: 10,
                count: 2,
            }],
            fail_write: vec![SectorRange {
                start: 20,
                count: 1,
            }],
            fail_flush_after: Some(1),
            ..FaultPlan::default()
        },
    );
    let sink = Sink::default();
    let disk = Trace::new(Box::new(faults), Box::new(sink.clone()));

    let ok = Some(status::OK);
    let ioerr = Some(status::IOERR);
    // Write 1 (kept by the one good flush), then a flush.
    assert_eq!(request(&mem, &disk, types::OUT, 0, &[1u8; 1024]), ok);
    assert_eq!(request(&mem, &disk, types::FLUSH, 0, &[]), ok);
    // A refused write: not counted, changes nothing.
    assert_eq!(request(&mem, &disk, types::OUT, 19, &[2u8; 1024]), ioerr);
    // A refused read, and a read next to the range.
    assert_eq!(request(&mem, &disk, types::IN, 11, &[0u8; 512]), ioerr);
    assert_eq!(request(&mem, &disk, types::IN, 12, &[0u8; 512]), ok);
    // Write 2, then a flush that fails: write 2 is not promised.
    assert_eq!(request(&mem, &disk, types::OUT, 4, &[3u8; 512]), ok);
    assert_eq!(request(&mem, &disk, types::FLUSH, 0, &[]), ioerr);
    // Reads see the unflushed write.
    assert_eq!(request(&mem, &disk, types::IN, 4, &[0u8; 512]), ok);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
    assert_eq!(got, [3u8; 512]);
    // Write 3 (a discard), a GET_ID, an unsupported type, then write 4: the cut.
    assert_eq!(request(&mem, &disk, types::DISCARD, 0, &segment(30, 4)), ok);
    assert_eq!(request(&mem, &disk, types::GET_ID, 0, &[0u8; 20]), ok);
    assert_eq!(
        request(&mem, &disk, 77, 0, &[0u8; 512]),
        Some(status::UNSUPP)
    );
    assert_eq!(cuts.load(Ordering::SeqCst), 0);
    assert_eq!(
        request(&mem, &disk, types::WRITE_ZEROES, 0, &segment(40, 1)),
        ok
    );
    assert_eq!(cuts.load(Ordering::SeqCst), 4);
    // Nothing completes after the cut, and the trace says nothing more.
    assert_eq!(request(&mem, &disk, types::IN, 0, &[0u8; 512]), None);
    assert_eq!(request(&mem, &disk, types::FLUSH, 0, &[]), None);

    let expected = [
        ("write", 0, 2, "ok"),
        ("flush", 0, 0, "ok"),
        ("write", 19, 2, "ioerr"),
        ("read", 11, 1, "ioerr"),
        ("read", 12, 1, "ok"),
        ("write", 4, 1, "ok"),
        ("flush", 0, 0, "ioerr"),
        ("read", 4, 1, "ok"),
        ("discard", 30, 4, "ok"),
        ("get_id", 0, 0, "ok"),
        ("unsupported", 0, 0, "unsupp"),
        ("write_zeroes", 40, 1, "ok"),
    ];
    let lines = sink.lines();
    assert_eq!(lines.len(), expected.len() + 1, "{lines:#?}");
    for (i, ((op, sector, sectors, status), line)) in expected.iter().zip(&lines).enumerate() {
        let prefix = format!(
            "{{\"seq\":{},\"op\":\"{op}\",\"sector\":{sector},\"sectors\":{sectors},\"status\":\"{status}\",\"us\":",
            i + 1
        );
        assert!(
            line.starts_with(&prefix) && line.ends_with('}'),
            "{line} vs {prefix}"
        );
    }
    assert_eq!(
        lines.last().map(String::as_str),
        Some("{\"event\":\"power_cut\",\"seq\":13}")
    );

    // The disk: write 1 only; the rest never happened.
    let mut model = original;
    model[..1024].fill(1);
    assert!(*memdisk.bytes.lock().expect("lock") == model);
    // The VMM's final flush on a disk without power does nothing and fails nothing.
    assert!(disk.flush().is_ok());
    assert_eq!(disk.served(&served(Op::Read, 0, 1, true)), Fate::Lost);
}
