//! The virtio-blk device: features, configuration space, and the loop that
//! drains its queue when the guest notifies it.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
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
        loop {
            if queue.disable_notification(mem).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let len = serve(chain, mem, &disk);
                if queue.add_used(mem, head, len).is_err() {
                    eprintln!("vmm: virtio-blk: cannot add descriptor {head} to the used ring");
                }
            }
            // Requests that arrived while notifications were off.
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
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
