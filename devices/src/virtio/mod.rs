//! Virtio 1.x devices and the MMIO transport that presents them.
//!
//! A [`VirtioDevice`] knows its features, its configuration space and what to
//! do with its queues once the driver has set them up; [`mmio::MmioTransport`]
//! is the register file the guest driver talks to, and hands the queues over
//! on DRIVER_OK.

pub mod block;
pub mod mmio;
pub mod queue;
pub mod ring;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config;
use virtio_bindings::virtio_mmio;
use virtio_bindings::virtio_ring;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: the device is virtio 1.x, not legacy.
pub const VIRTIO_F_VERSION_1: u32 = virtio_config::VIRTIO_F_VERSION_1;
/// Descriptors may point to tables of descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// InterruptStatus bit: a queue has used buffers.
pub const INT_USED_RING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

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

/// A device's configuration space, shared with its transport so that the
/// driver reads and writes it without waiting for the device (which may be
/// in the middle of a queue pass).
pub trait ConfigSpace: Send + Sync {
    /// Reads `data.len()` bytes at `offset`; what lies outside reads as zeros.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A driver's write at `offset`; returns whether the configuration
    /// changed (the transport then moves ConfigGeneration on).
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

/// A virtio device behind a transport.
///
/// The transport takes the device lock only to negotiate, start, stop and
/// reset the device: device type, features, queue sizes, queue events,
/// interrupt and configuration space are fetched once, when the transport is
/// built, and used without the lock afterwards.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (fixed for the device's life).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The event fd notifying queue `index` (the VMM registers it as an ioeventfd).
    fn queue_event(&self, index: usize) -> Option<&EventFd>;
    /// The interrupt shared with the transport.
    fn interrupt(&self) -> &Arc<Interrupt>;
    /// The configuration space shared with the transport.
    fn config_space(&self) -> Arc<dyn ConfigSpace>;
    /// The driver set FEATURES_OK and the transport accepted `acked`: the
    /// device sets up what depends on it (virtio-blk's `writeback`, which a
    /// driver may read before DRIVER_OK).
    fn features_ok(&mut self, acked: u64);
    /// Starts the device with the driver's queues, in queue index order.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver wrote 0 to QueueReady of the running queue `index`: the
    /// device must no longer touch it.
    fn stop_queue(&mut self, index: usize);
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
