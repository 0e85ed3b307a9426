//! The virtio-blk device: features, configuration space, and the loop that
//! drains its queue when the guest notifies it.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::DiskBackend;
use super::request::{serve, Disk, ID_LEN, SECTOR_SIZE};
use crate::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, INT_USED_RING,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Feature bits (virtio 1.x, 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (the queue minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most sectors in one DISCARD or WRITE_ZEROES segment.
const MAX_ZERO_SECTORS: u32 = 1 << 16;

/// A virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    queue_event: EventFd,
    interrupt: Arc<Interrupt>,
    active: Option<(GuestMemoryMmap, Queue)>,
    /// A broken ring (bad head index, avail index out of range) was reported
    /// since activation: a guest that keeps doing it must not flood the log.
    reported_bad_ring: bool,
}

/// The configuration space (struct virtio_blk_config) for a disk.
fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    // num_queues
    c[34..36].copy_from_slice(&1u16.to_le_bytes());
    // max_discard_sectors, max_discard_seg, discard_sector_alignment
    c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes());
    // max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
    c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&1u32.to_le_bytes());
    c[56] = 1;
    c
}

impl Block {
    /// A device serving `disk`, answering GET_ID with `id`, raising `irq`.
    pub fn new(
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        id: [u8; ID_LEN],
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let config = config_space(disk.size() / SECTOR_SIZE);
        Ok(Block {
            disk,
            read_only,
            id,
            config,
            queue_event: EventFd::new(EFD_NONBLOCK)?,
            interrupt: Arc::new(Interrupt::new(irq)),
            active: None,
            reported_bad_ring: false,
        })
    }

    /// Serves every available request, then interrupts the guest if it
    /// asked to be told (EVENT_IDX).
    pub fn process_queue(&mut self) {
        let Some((mem, queue)) = &mut self.active else {
            return;
        };
        let disk = Disk {
            backend: self.disk.as_ref(),
            read_only: self.read_only,
            id: &self.id,
        };
        // A guest can make this loop endless (requests whose data lands on
        // the rings keep the avail index ahead), so one pass serves at most a
        // queue's worth and then yields to the event loop, which comes back.
        let reported = &mut self.reported_bad_ring;
        let mut report = |what: String| {
            if !std::mem::replace(reported, true) {
                eprintln!("vmm: virtio-blk: {what}; ignoring such requests");
            }
        };
        let mut budget = usize::from(QUEUE_SIZE);
        let mut yielded = false;
        'passes: loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            let mut served = 0;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                if budget == 0 {
                    // Not served yet: step back so the next pass takes it.
                    queue.go_to_previous_position();
                    yielded = true;
                    break 'passes;
                }
                budget -= 1;
                served += 1;
                let head = chain.head_index();
                let len = serve(chain, mem, &disk);
                if queue.add_used(mem, head, len).is_err() {
                    report(format!(
                        "the guest offered descriptor {head}, outside the queue"
                    ));
                }
            }
            // Requests that arrived while notifications were off.
            match queue.enable_notification(mem) {
                Ok(true) if served > 0 => continue,
                // More is announced but nothing could be taken: the avail
                // index is out of range, until the driver resets the device.
                Ok(true) => {
                    report("the guest's avail index is out of range".to_string());
                    break;
                }
                _ => break,
            }
        }
        if yielded {
            // The counter wakes the event loop again after other events.
            if let Err(e) = self.queue_event.write(1) {
                eprintln!("vmm: virtio-blk: cannot re-arm the queue event: {e}");
            }
        }
        if queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(INT_USED_RING) {
                eprintln!("vmm: virtio-blk: cannot raise the interrupt: {e}");
            }
        }
    }
}

impl Block {
    /// Makes everything the guest wrote durable, as a clean power-off does:
    /// the VMM calls it when the VM stops.
    pub fn flush(&self) -> Result<(), super::backend::BackendError> {
        self.disk.flush()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
        ];
        if self.read_only {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
        }
        bits.iter().fold(0, |acc, bit| acc | (1u64 << bit))
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_event(&self, index: usize) -> Option<&EventFd> {
        (index == 0).then_some(&self.queue_event)
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in virtio-blk's configuration is writable here (no
        // writeback toggle is offered).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            acked_features,
        } = activation;
        let Some(mut queue) = queues.into_iter().next() else {
            return Err(ActivateError("no queue".into()));
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError(
                "queue 0 is not valid (size, addresses or not ready)".into(),
            ));
        }
        queue.set_event_idx(acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some((mem, queue));
        self.reported_bad_ring = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_event, EventSet::IN)) {
            eprintln!("vmm: virtio-blk: cannot watch the queue event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The counter only says "look at the queue"; its value does not matter.
        let _ = self.queue_event.read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::request::tests::{
        desc, guest_memory, write_header, MemDisk, DATA, F_WRITE, HEADER, STATUS,
    };
    use crate::virtio::block::request::{status, types};

    fn block(disk: MemDisk) -> Block {
        Block::new(
            Box::new(disk),
            false,
            [b'x'; ID_LEN],
            EventFd::new(EFD_NONBLOCK).expect("irq"),
        )
        .expect("block")
    }

    fn activate(block: &mut Block, mem: &GuestMemoryMmap, queue: Queue, event_idx: bool) {
        let acked = if event_idx {
            1 << VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue],
                acked_features: acked,
            })
            .expect("activate");
    }

    #[test]
    fn serves_the_queue_fills_the_used_ring_and_interrupts() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut dev = block(MemDisk::new(4096));
        write_header(&mem, types::IN, 1);
        // Puts the chain in the descriptor table and the avail ring.
        mock.build_desc_chain(&[
            desc(HEADER, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ])
        .expect("chain");
        activate(&mut dev, &mem, mock.create_queue().expect("queue"), false);
        dev.process_queue();
        let used_idx: u16 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx");
        assert_eq!(used_idx, 1);
        let used_len: u32 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 8))
            .expect("used len");
        assert_eq!(used_len, 513);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            status::OK
        );
        assert_eq!(dev.interrupt().status() & INT_USED_RING, INT_USED_RING);
        assert_eq!(dev.interrupt().irq().read().expect("irq raised"), 1);
    }

    #[test]
    fn a_queue_that_is_not_ready_is_refused() {
        let mem = guest_memory();
        let mut dev = block(MemDisk::new(4096));
        let queue = Queue::new(QUEUE_SIZE).expect("queue");
        let result = dev.activate(Activation {
            mem,
            queues: vec![queue],
            acked_features: 0,
        });
        assert!(result.is_err());
        // Notifications before activation are ignored.
        dev.process_queue();
    }

    #[test]
    fn a_looping_chain_ends_and_gets_no_status() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        write_header(&mem, types::IN, 0);
        // Descriptor 0 says NEXT and points at itself.
        let looped = virtio_queue::desc::split::Descriptor::new(HEADER, 16, 1, 0);
        mock.desc_table()
            .store(0, virtio_queue::desc::RawDescriptor::from(looped))
            .expect("store");
        mock.avail().ring().ref_at(0).expect("ring").store(0);
        mock.avail().idx().store(1u16.to_le());
        let mut dev = block(MemDisk::new(4096));
        activate(&mut dev, &mem, mock.create_queue().expect("queue"), false);
        dev.process_queue();
        let used_idx: u16 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx");
        let used_len: u32 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 8))
            .expect("used len");
        assert_eq!(
            (used_idx, used_len),
            (1, 0),
            "the chain is returned, with nothing written"
        );
    }

    /// Regression (found by the virtio_blk fuzzer as a timeout): an avail
    /// index more than a queue ahead made pop return nothing while
    /// enable_notification kept announcing more, and the loop never ended.
    #[test]
    fn an_avail_index_out_of_range_does_not_hang_the_device() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.avail().idx().store(100u16.to_le());
        let mut dev = block(MemDisk::new(4096));
        activate(&mut dev, &mem, mock.create_queue().expect("queue"), true);
        dev.process_queue();
        let used_idx: u16 = mem
            .read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx");
        assert_eq!(used_idx, 0, "nothing served");
        assert!(dev.reported_bad_ring);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
        /// A hostile guest: random descriptor tables (addresses anywhere,
        /// loops, zero lengths, indirect flags) and random avail entries. The
        /// device must finish, never panic, and keep the disk's size.
        #[test]
        fn garbage_queues_never_crash_the_device(
            table in proptest::collection::vec((any::<u64>(), 0u32..70000, 0u16..8, 0u16..20), 16),
            heads in proptest::collection::vec(0u16..20, 1..16),
            headers in proptest::collection::vec((0u32..16, 0u64..20), 4),
        ) {
            let mem = guest_memory();
            let mock = MockSplitQueue::new(&mem, 16);
            for (i, &(kind, sector)) in headers.iter().enumerate() {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&kind.to_le_bytes());
                h[8..].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&h, GuestAddress(HEADER + 0x1000 * i as u64)).expect("header");
            }
            for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
                // Half the descriptors point into guest memory, near the headers.
                let addr = if addr % 2 == 0 { HEADER + (addr >> 1) % 0x8000 } else { addr };
                let d = virtio_queue::desc::split::Descriptor::new(addr, len, flags, next);
                mock.desc_table().store(i as u16, virtio_queue::desc::RawDescriptor::from(d)).expect("store");
            }
            for (i, &head) in heads.iter().enumerate() {
                mock.avail().ring().ref_at(i).expect("ring").store(head.to_le());
            }
            mock.avail().idx().store((heads.len() as u16).to_le());
            let mut dev = block(MemDisk::new(8192));
            activate(&mut dev, &mem, mock.create_queue().expect("queue"), heads.len() % 2 == 0);
            dev.process_queue();
            prop_assert_eq!(dev.disk.size(), 8192);
        }
    }
}
