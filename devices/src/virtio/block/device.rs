//! The virtio-blk device: features, configuration space, and the loop that
//! drains its queue when the guest notifies it.

use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::DiskBackend;
use super::config::{features, BlockConfig};
use super::request::{serve, Disk, Scratch, ID_LEN};
use crate::log_limit::LogLimit;
use crate::virtio::queue::{drain, BadHead, Drained};
use crate::virtio::{
    ActivateError, Activation, ConfigSpace, Interrupt, VirtioDevice, INT_USED_RING,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    id: [u8; ID_LEN],
    config: Arc<BlockConfig>,
    queue_event: EventFd,
    interrupt: Arc<Interrupt>,
    active: Option<(GuestMemoryMmap, Queue)>,
    /// A broken ring (bad head index, avail index out of range) was reported
    /// since activation: a guest that keeps doing it must not flood the log.
    reported_bad_ring: bool,
    /// Host I/O errors are logged, but not a line per failing request.
    host_errors: LogLimit,
}

impl Block {
    /// A device serving `disk`, answering GET_ID with `id`, raising `irq`.
    pub fn new(
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        id: [u8; ID_LEN],
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let config = Arc::new(BlockConfig::new(disk.size(), disk.discard_alignment()));
        Ok(Block {
            disk,
            read_only,
            id,
            config,
            queue_event: EventFd::new(EFD_NONBLOCK)?,
            interrupt: Arc::new(Interrupt::new(irq)),
            active: None,
            reported_bad_ring: false,
            host_errors: LogLimit::new(10, Duration::from_secs(5)),
        })
    }

    /// Serves every available request, interrupting the guest after each
    /// one it wants to hear of (EVENT_IDX, or the avail ring's flags).
    pub fn process_queue(&mut self) {
        let Some((mem, queue)) = &mut self.active else {
            return;
        };
        let disk = Disk {
            backend: self.disk.as_ref(),
            read_only: self.read_only,
            write_through: self.config.write_through(),
            id: &self.id,
        };
        let interrupt = &self.interrupt;
        let host_errors = &mut self.host_errors;
        let mut bad_head = None;
        let mut scratch = Scratch::default();
        // A guest can make this loop endless (requests whose data lands on
        // the rings keep the avail index ahead), so one call serves at most
        // a queue's worth and then yields to the event loop, which comes back.
        let drained = drain(
            queue,
            mem,
            usize::from(QUEUE_SIZE),
            |chain| {
                // None: the disk lost power, nothing more completes.
                let outcome = serve(chain, mem, &disk, &mut scratch)?;
                if let Some(err) = outcome.host_error {
                    host_errors.eprint(&format!("vmm: virtio-blk: {err}"));
                }
                Some(outcome.used_len)
            },
            || {
                if let Err(e) = interrupt.trigger(INT_USED_RING) {
                    eprintln!("vmm: virtio-blk: cannot raise the interrupt: {e}");
                }
            },
            |BadHead(head)| bad_head = Some(head),
            |_| {},
        );
        if let Some(head) = bad_head {
            self.report_bad_ring(&format!(
                "the guest offered descriptor {head}, outside the queue"
            ));
        }
        match drained {
            Drained::Empty | Drained::Stopped => {}
            Drained::Yielded => {
                // The counter wakes the event loop again after other events.
                if let Err(e) = self.queue_event.write(1) {
                    eprintln!("vmm: virtio-blk: cannot re-arm the queue event: {e}");
                }
            }
            Drained::BadAvailIndex => {
                self.report_bad_ring("the guest's avail index is out of range")
            }
            Drained::RingInaccessible => {
                self.report_bad_ring("the guest's rings are not in guest memory")
            }
        }
    }

    fn report_bad_ring(&mut self, what: &str) {
        if !std::mem::replace(&mut self.reported_bad_ring, true) {
            eprintln!("vmm: virtio-blk: {what}; ignoring such requests");
        }
    }

    /// Makes everything the guest wrote durable, as a clean power-off does:
    /// the VMM calls it when the VM stops.
    pub fn flush(&self) -> Result<(), super::backend::BackendError> {
        self.disk.flush()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        features(self.read_only)
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

    fn config_space(&self) -> Arc<dyn ConfigSpace> {
        self.config.clone()
    }

    fn features_ok(&mut self, acked: u64) {
        self.config.negotiate(acked);
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

    fn stop_queue(&mut self, index: usize) {
        if index == 0 {
            self.active = None;
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.config.reset();
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
pub(crate) mod tests {
    use proptest::prelude::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

    use crate::virtio::block::backend::BackendError;
    use crate::virtio::block::request::tests::{
        desc, guest_memory, write_header, MemDisk, DATA, F_WRITE, HEADER, STATUS,
    };
    use crate::virtio::block::request::{status, types};
    use crate::virtio::VIRTIO_F_VERSION_1;

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

    /// A MemDisk shared with the test, which keeps looking at its counters.
    pub(crate) struct Shared(pub(crate) Arc<MemDisk>);

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

    fn shared_block(disk: &Arc<MemDisk>) -> Block {
        Block::new(
            Box::new(Shared(disk.clone())),
            false,
            [b'x'; ID_LEN],
            EventFd::new(EFD_NONBLOCK).expect("irq"),
        )
        .expect("block")
    }

    /// Publishes one request chain at descriptor `at` (NEXT flags and links
    /// set), as a driver does: descriptors, then the avail ring and index.
    pub(crate) fn publish(
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        at: u16,
        descs: &[RawDescriptor],
    ) {
        let n = descs.len();
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let (flags, next) = if i + 1 == n {
                    (d.flags() & !1, 0)
                } else {
                    (d.flags() | 1, at + i as u16 + 1)
                };
                RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        mock.add_desc_chains(&linked, at).expect("publish");
    }

    fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj(GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx")
    }

    /// A 512-byte write of sector 0, with its header at `header`.
    pub(crate) fn write_request(mem: &GuestMemoryMmap, header: u64) -> Vec<RawDescriptor> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&types::OUT.to_le_bytes());
        mem.write_slice(&h, GuestAddress(header)).expect("header");
        vec![
            desc(header, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ]
    }

    /// virtio 1.2, 5.2.6.2 (Device Operation, device requirements): a write
    /// is stable once completed when "neither VIRTIO_BLK_F_CONFIG_WCE nor
    /// VIRTIO_BLK_F_FLUSH feature were negotiated, but VIRTIO_BLK_F_FLUSH was
    /// offered by the device", and "the device MUST ensure that stable
    /// writes are committed to it, before reporting completion". With FLUSH
    /// negotiated the guest's FLUSH does it, and nothing else syncs.
    #[test]
    fn writes_are_synced_before_completion_unless_flush_is_negotiated() {
        for (acked, syncs) in [(0u64, 1usize), (1 << VIRTIO_BLK_F_FLUSH, 0)] {
            let mem = guest_memory();
            let mock = MockSplitQueue::new(&mem, 16);
            let disk = Arc::new(MemDisk::new(4096));
            let mut dev = shared_block(&disk);
            assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
            publish(&mock, 0, &write_request(&mem, HEADER));
            dev.features_ok(acked | (1 << VIRTIO_F_VERSION_1));
            dev.activate(Activation {
                mem: mem.clone(),
                queues: vec![mock.create_queue().expect("queue")],
                acked_features: acked | (1 << VIRTIO_F_VERSION_1),
            })
            .expect("activate");
            dev.process_queue();
            assert_eq!(used_idx(&mem, &mock), 1);
            assert_eq!(
                disk.flushes.load(std::sync::atomic::Ordering::SeqCst),
                syncs,
                "acked features {acked:#x}"
            );
        }
    }

    /// virtio 1.2, 2.7.7.2 (used buffer notification suppression, device
    /// requirements): without VIRTIO_F_EVENT_IDX, "if flags is 1, the device
    /// SHOULD NOT send a notification"; and 4.2.2.1 (MMIO device
    /// requirements): InterruptStatus bits "which do not represent events
    /// which took place MUST be zero", so a pass that used nothing must not
    /// interrupt.
    #[test]
    fn interrupts_only_for_used_buffers_the_driver_wants_to_hear_of() {
        let mem = guest_memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut dev = block(MemDisk::new(4096));
        activate(&mut dev, &mem, mock.create_queue().expect("queue"), false);
        // A stale kick: nothing to serve, nothing to tell.
        dev.process_queue();
        assert_eq!(dev.interrupt().status(), 0, "no used buffer, no interrupt");
        assert!(dev.interrupt().irq().read().is_err(), "irq not raised");
        // The driver suppresses interrupts (VRING_AVAIL_F_NO_INTERRUPT).
        mem.write_obj(1u16.to_le(), mock.avail_addr())
            .expect("avail flags");
        publish(&mock, 0, &write_request(&mem, HEADER));
        dev.process_queue();
        assert_eq!(used_idx(&mem, &mock), 1);
        assert!(dev.interrupt().irq().read().is_err(), "suppressed");
        // And wants them again.
        mem.write_obj(0u16.to_le(), mock.avail_addr())
            .expect("avail flags");
        publish(&mock, 3, &write_request(&mem, HEADER));
        dev.process_queue();
        assert_eq!(used_idx(&mem, &mock), 2);
        assert_eq!(dev.interrupt().irq().read().expect("raised"), 1);
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
