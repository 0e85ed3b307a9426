//! Virtio 1.x devices and the MMIO transport that presents them.
//!
//! A [`VirtioDevice`] knows its features, its configuration space and what to
//! do with its queues once the driver has set them up; [`mmio::MmioTransport`]
//! is the register file the guest driver talks to, and hands the queues over
//! on DRIVER_OK.

pub mod block;
pub mod mmio;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device type numbers (virtio 1.x, 5).
pub const TYPE_BLOCK: u32 = 2;
/// VIRTIO_F_VERSION_1: the device is virtio 1.x, not legacy.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Descriptors may point to tables of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// InterruptStatus bit: a queue has used buffers.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status bits the driver reads and acks, and
/// an event fd the VMM wired to the guest's IRQ (irqfd).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irq`.
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the IRQ.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The event fd behind the IRQ.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

/// What a device needs to run once the driver says DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, as the driver configured them.
    pub queues: Vec<Queue>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot activate the device: {0}")]
pub struct ActivateError(pub String);

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The event fd notifying queue `index` (the VMM registers it as an ioeventfd).
    fn queue_event(&self, index: usize) -> Option<&EventFd>;
    /// The interrupt shared with the transport.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// Reads the configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (ignored by devices with a read-only one).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (device reset).
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of `config` at `offset`; out of range reads as zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
