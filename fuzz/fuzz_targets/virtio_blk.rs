//! virtio-blk from a hostile guest: fuzzed descriptor tables, avail rings
//! and request headers in guest memory. The device must serve or refuse every
//! request and never panic or touch memory outside the guest, whatever
//! features and notification flags the driver picked.
#![no_main]

use std::sync::Mutex;

use devices::virtio::block::{Block, DiskBackend};
use devices::virtio::{Activation, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

struct MemDisk(Mutex<Vec<u8>>);

type Error = Box<dyn std::error::Error + Send + Sync>;

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().map(|b| b.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let b = self.0.lock().map_err(|_| "poisoned")?;
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let mut b = self.0.lock().map_err(|_| "poisoned")?;
        b[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), Error> {
        let mut b = self.0.lock().map_err(|_| "poisoned")?;
        b[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.write_zeroes(offset, len, true)
    }
    fn discard_alignment(&self) -> u64 {
        4096
    }
}

const QUEUE: u16 = 16;
const DATA_AREA: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]) else {
        return;
    };
    let mock = MockSplitQueue::new(&mem, QUEUE);
    let (table, rest) = data.split_at((QUEUE as usize * 16).min(data.len()));
    for (i, d) in table.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
        // Most descriptors point into the data area, some anywhere.
        let addr = if addr & 1 == 0 { DATA_AREA + (addr >> 1) % 0x10_0000 } else { addr };
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default()) % 0x2_0000;
        let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
        let next = u16::from_le_bytes([d[14], d[15]]) % (QUEUE + 4);
        let _ = mock.desc_table().store(i as u16, RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
    }
    let (heads, contents) = rest.split_at(rest.len().min(16));
    for (i, &h) in heads.iter().enumerate() {
        if let Ok(slot) = mock.avail().ring().ref_at(i) {
            slot.store(u16::from(h % 20).to_le());
        }
    }
    mock.avail().idx().store((heads.len() as u16).to_le());
    let _ = mem.write_slice(&contents[..contents.len().min(0x10_0000)], GuestAddress(DATA_AREA));

    let Ok(irq) = EventFd::new(0) else { return };
    let disk = MemDisk(Mutex::new(vec![0u8; 64 << 10]));
    let Ok(mut block) = Block::new(Box::new(disk), heads.first() == Some(&0), [0; 20], irq) else {
        return;
    };
    let Ok(queue) = mock.create_queue() else { return };
    // The first content byte picks the driver: EVENT_IDX, FLUSH (else every
    // write is synced), CONFIG_WCE, and VRING_AVAIL_F_NO_INTERRUPT.
    let driver = contents.first().copied().unwrap_or(0);
    let mut features = 1u64 << 32;
    for (bit, feature) in [(1u8, 29u64), (2, 9), (4, 11)] {
        if driver & bit != 0 {
            features |= 1 << feature;
        }
    }
    if driver & 8 != 0 {
        let _ = mem.write_obj(1u16.to_le(), mock.avail_addr());
    }
    block.features_ok(features);
    if block.activate(Activation { mem: mem.clone(), queues: vec![queue], acked_features: features }).is_ok() {
        block.process_queue();
        // A second kick, as a driver that published more would send.
        block.process_queue();
    }
});
