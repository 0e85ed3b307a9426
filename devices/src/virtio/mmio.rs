//! The virtio-mmio transport (virtio 1.2, 4.2, register layout version 2):
//! the 4 KiB window a driver configures a device through.
//!
//! It keeps the device-status state machine (ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK, in that order; 0 resets), the feature and queue
//! registers, and hands the queues to the device at DRIVER_OK. Queue
//! notifications normally arrive on the device's ioeventfd without passing
//! here; a QueueNotify write that does reach the transport is forwarded to
//! that event fd.
//!
//! A vCPU must never wait here behind the device, which holds its lock for a
//! whole queue pass (an fdatasync included): InterruptStatus, InterruptACK,
//! QueueNotify, the features and the configuration space are served without
//! the device lock, from what the transport took from the device when it was
//! built. Only status changes (negotiation, start, stop, reset) lock it.

use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ConfigSpace, Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING};
use crate::bus::BusDevice;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x).
const VERSION: u32 = 2;
/// Vendor ID: "ACOW".
const VENDOR_ID: u32 = 0x574f_4341;

// Register offsets (virtio-bindings' `virtio_mmio`).
const REG_MAGIC: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
/// Offset of QueueNotify, where the VMM puts the ioeventfds.
pub const REG_QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const CONFIG_SPACE: u64 = reg::VIRTIO_MMIO_CONFIG as u64;
/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    use virtio_bindings::virtio_config;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// One queue's registers as the driver set them.
struct QueueRegs {
    queue: Queue,
    /// The last QueueNum written was not a size this queue can have: the
    /// queue cannot start (never silently run with another size).
    bad_size: bool,
}

/// A virtio device's MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    // Taken from the device once, used without its lock.
    device_type: u32,
    device_features: u64,
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<Option<EventFd>>,
    interrupt: Arc<Interrupt>,
    config: Arc<dyn ConfigSpace>,
    // The registers.
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    /// Indexed by queue number; `None` for a queue the device declared with
    /// a size no queue can have (it reads QueueNumMax 0).
    queues: Vec<Option<QueueRegs>>,
    config_generation: u32,
}

/// The steps of driver initialization (virtio 1.2, 3.1.1), each needing the
/// one before it.
const STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// Whether a status value sets its steps in order (no step without the
/// ones before it).
fn steps_in_order(value: u32) -> bool {
    STEPS
        .windows(2)
        .all(|pair| value & pair[1] == 0 || value & pair[0] != 0)
}

impl MmioTransport {
    /// A transport for `device` in a guest with memory `mem`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        let (device_type, device_features, queue_max_sizes, queue_events, interrupt, config) = {
            let d = device.lock().unwrap_or_else(PoisonError::into_inner);
            let sizes = d.queue_max_sizes().to_vec();
            let events = (0..sizes.len())
                .map(|i| d.queue_event(i).and_then(|e| e.try_clone().ok()))
                .collect();
            (
                d.device_type(),
                d.features(),
                sizes,
                events,
                d.interrupt().clone(),
                d.config_space(),
            )
        };
        let mut transport = MmioTransport {
            device,
            mem,
            device_type,
            device_features,
            queue_max_sizes,
            queue_events,
            interrupt,
            config,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues: Vec::new(),
            config_generation: 0,
        };
        transport.queues = transport.fresh_queues();
        transport
    }

    fn fresh_queues(&self) -> Vec<Option<QueueRegs>> {
        self.queue_max_sizes
            .iter()
            .map(|&max| {
                Queue::new(max).ok().map(|queue| QueueRegs {
                    queue,
                    bad_size: false,
                })
            })
            .collect()
    }

    fn with_device<T>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> T) -> T {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut *device)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues
            .get_mut(self.queue_sel as usize)
            .and_then(Option::as_mut)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status
            & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
            == VIRTIO_CONFIG_S_FEATURES_OK
    }

    fn reset(&mut self) {
        self.with_device(|d| d.reset());
        self.interrupt.ack(INT_USED_RING | INT_CONFIG);
        self.queues = self.fresh_queues();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
    }

    /// The device cannot go on: DEVICE_NEEDS_RESET and a configuration
    /// change notification (virtio 1.2, 2.1.2).
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(INT_CONFIG) {
            eprintln!("vmm: virtio-mmio: cannot raise the interrupt: {e}");
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's: a driver can neither set nor
        // clear it.
        let value =
            (value & !VIRTIO_CONFIG_S_NEEDS_RESET) | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        // Bits may only be added, except by a reset (2.1.1), and in the
        // order of the initialization steps (3.1.1); other writes are
        // ignored.
        if value & self.status != self.status || !steps_in_order(value) {
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device_features;
            if self.acked_features & !offered != 0
                || self.acked_features & (1 << super::VIRTIO_F_VERSION_1) == 0
            {
                // Refused: the driver sees FEATURES_OK missing and gives up.
                self.status = value & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
                return;
            }
            let acked = self.acked_features;
            self.with_device(|d| d.features_ok(acked));
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// DRIVER_OK: hands the queues over, in index order, or asks for a reset
    /// if one of them cannot be used as the driver set it.
    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            let queue = regs
                .as_ref()
                .filter(|r| !r.bad_size)
                .and_then(|r| Queue::try_from(r.queue.state()).ok());
            match queue {
                Some(queue) => queues.push(queue),
                None => {
                    eprintln!("vmm: virtio-mmio: queue {index} cannot be used as set up");
                    self.needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
        };
        if let Err(e) = self.with_device(|d| d.activate(activation)) {
            eprintln!("vmm: virtio-mmio: {e}");
            self.needs_reset();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map_or(0, |r| u32::from(r.queue.max_size())),
            REG_QUEUE_READY => self.selected().map_or(0, |r| u32::from(r.queue.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    /// QueueReady (virtio 1.2, 4.2.2): 1 between FEATURES_OK and DRIVER_OK
    /// makes the queue ready; 0 at any time makes it not ready, and a running
    /// queue stops ("The device MUST NOT access virtual queue contents when
    /// QueueReady is zero").
    fn write_queue_ready(&mut self, value: u32) {
        let allowed = self.queue_config_allowed();
        let running = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let index = self.queue_sel as usize;
        let Some(regs) = self.selected() else {
            return;
        };
        if value == 0 {
            let was_ready = regs.queue.ready();
            regs.queue.set_ready(false);
            if running && was_ready {
                self.with_device(|d| d.stop_queue(index));
            }
        } else if allowed {
            regs.queue.set_ready(value == 1);
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let allowed = self.queue_config_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES
                if self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
                    == VIRTIO_CONFIG_S_DRIVER =>
            {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features = (self.acked_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if allowed => {
                if let Some(regs) = self.selected() {
                    // 0, above QueueNumMax or not a power of two (virtio 1.2,
                    // 2.7): remembered as invalid, so that DRIVER_OK fails.
                    regs.bad_size = u16::try_from(value)
                        .map_err(|_| ())
                        .and_then(|size| regs.queue.try_set_size(size).map_err(|_| ()))
                        .is_err();
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if allowed =>
            {
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                if let Some(regs) = self.selected() {
                    let q = &mut regs.queue;
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 => {
                if let Some(Some(event)) = self.queue_events.get(value as usize) {
                    if let Err(e) = event.write(1) {
                        eprintln!("vmm: virtio-mmio: cannot notify queue {value}: {e}");
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.config.read(offset - CONFIG_SPACE, data);
            return;
        }
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                data.copy_from_slice(&self.read_register(offset).to_le_bytes())
            }
            // Registers are 32-bit; other widths read as zeros.
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.config.write(offset - CONFIG_SPACE, data) {
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::request::tests::{guest_memory, MemDisk};
    use crate::virtio::block::Block;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    fn transport() -> (MmioTransport, GuestMemoryMmap) {
        let mem = guest_memory();
        let block = Block::new(
            Box::new(MemDisk::new(1 << 20)),
            false,
            [0; 20],
            EventFd::new(0).expect("irq"),
        )
        .expect("block");
        (
            MmioTransport::new(Arc::new(Mutex::new(block)), mem.clone()),
            mem,
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn identifies_itself_and_its_config() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 2, "block");
        // capacity: 1 MiB = 2048 sectors, read as two 32-bit halves.
        assert_eq!(read(&mut t, CONFIG_SPACE), 2048);
        assert_eq!(read(&mut t, CONFIG_SPACE + 4), 0);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(&mut t, REG_DEVICE_FEATURES) & 1,
            1,
            "VIRTIO_F_VERSION_1"
        );
        // Odd widths and unaligned registers read as zeros.
        let mut byte = [0xffu8; 1];
        t.read(REG_MAGIC, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn negotiation_and_activation_follow_the_status_machine() {
        let (mut t, mem) = transport();
        let mock = MockSplitQueue::new(&mem, 16);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // A driver that does not accept VERSION_1 cannot reach FEATURES_OK.
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0, "reset");

        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1); // VERSION_1
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(&mut t, REG_STATUS, ok);
        assert_eq!(read(&mut t, REG_STATUS), ok);
        // Queue setup.
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 256);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, mock.desc_table_addr().0 as u32);
        write(&mut t, REG_QUEUE_DRIVER_LOW, mock.avail_addr().0 as u32);
        write(&mut t, REG_QUEUE_DEVICE_LOW, mock.used_addr().0 as u32);
        write(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1);
        write(&mut t, REG_STATUS, ok | status::DRIVER_OK);
        assert_eq!(
            read(&mut t, REG_STATUS),
            ok | status::DRIVER_OK,
            "activated"
        );
        // Queue registers are frozen once running.
        write(&mut t, REG_QUEUE_NUM, 8);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0, "reset clears the queue");
    }

    #[test]
    fn activation_with_a_broken_queue_asks_for_a_reset() {
        let (mut t, _) = transport();
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(&mut t, REG_STATUS, ok);
        // No queue configured: DRIVER_OK must not start the device.
        write(&mut t, REG_STATUS, ok | status::DRIVER_OK);
        assert_ne!(read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    /// A transport over a block device the test keeps a handle on.
    fn transport_and_block(
        disk: Box<dyn crate::virtio::block::DiskBackend>,
    ) -> (MmioTransport, Arc<Mutex<Block>>, GuestMemoryMmap) {
        let mem = guest_memory();
        let block = Arc::new(Mutex::new(
            Block::new(disk, false, [0; 20], EventFd::new(0).expect("irq")).expect("block"),
        ));
        let t = MmioTransport::new(block.clone(), mem.clone());
        (t, block, mem)
    }

    const NEGOTIATED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    /// Negotiates VERSION_1 and configures queue 0 over `mock` with `size`.
    fn configure(t: &mut MmioTransport, mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u32) {
        configure_with(t, mock, size, 0);
    }

    /// Like `configure`, also accepting the feature bits `low` (0..32).
    fn configure_with(
        t: &mut MmioTransport,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        size: u32,
        low: u32,
    ) {
        write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, low);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(t, REG_STATUS, NEGOTIATED);
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, mock.desc_table_addr().0 as u32);
        write(t, REG_QUEUE_DRIVER_LOW, mock.avail_addr().0 as u32);
        write(t, REG_QUEUE_DEVICE_LOW, mock.used_addr().0 as u32);
        write(t, REG_QUEUE_READY, 1);
    }

    fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        vm_memory::Bytes::read_obj(mem, vm_memory::GuestAddress(mock.used_addr().0 + 2))
            .expect("used idx")
    }

    /// Puts a one-sector write at descriptor `at` in the avail ring.
    fn publish_write(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>, at: u16) {
        use crate::virtio::block::device::tests::{publish, write_request};
        use crate::virtio::block::request::tests::HEADER;
        publish(mock, at, &write_request(mem, HEADER));
    }

    /// virtio 1.2, 2.7 (split virtqueues: "Queue Size value is always a
    /// power of 2") and 4.2.2.2 (MMIO driver requirements: "The driver MUST
    /// NOT write a value larger than QueueNumMax"); 2.1.2: "The device
    /// SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a
    /// reset is needed." An invalid QueueNum must never leave the device
    /// running with another size (it would write used entries past the
    /// driver's ring).
    #[test]
    fn an_invalid_queue_num_fails_activation() {
        for size in [0u32, 3, 100, 512, 0x1_0010] {
            let (mut t, block, mem) = transport_and_block(Box::new(MemDisk::new(4096)));
            let mock = MockSplitQueue::new(&mem, 16);
            configure(&mut t, &mock, size);
            write(&mut t, REG_STATUS, NEGOTIATED | status::DRIVER_OK);
            assert_ne!(
                read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "QueueNum {size:#x}"
            );
            publish_write(&mem, &mock, 0);
            block.lock().expect("lock").process_queue();
            assert_eq!(used_idx(&mem, &mock), 0, "QueueNum {size:#x}: not running");
        }
    }

    /// virtio 1.2, 4.2.2.1 (MMIO device requirements): "The device MUST NOT
    /// access virtual queue contents when QueueReady is zero", and
    /// QueueReady reads back the last value written.
    #[test]
    fn queue_ready_zero_stops_a_running_queue() {
        let (mut t, block, mem) = transport_and_block(Box::new(MemDisk::new(4096)));
        let mock = MockSplitQueue::new(&mem, 16);
        configure(&mut t, &mock, 16);
        write(&mut t, REG_STATUS, NEGOTIATED | status::DRIVER_OK);
        publish_write(&mem, &mock, 0);
        block.lock().expect("lock").process_queue();
        assert_eq!(used_idx(&mem, &mock), 1, "running");
        write(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        publish_write(&mem, &mock, 3);
        block.lock().expect("lock").process_queue();
        assert_eq!(used_idx(&mem, &mock), 1, "stopped");
    }

    /// virtio 1.2, 3.1.1 (driver requirements: the initialization steps in
    /// order, FEATURES_OK before DRIVER_OK) and 2.1.2 (device requirements:
    /// "The device MUST NOT consume buffers ... before DRIVER_OK";
    /// DEVICE_NEEDS_RESET is the device's to set, 2.1.1: "The driver MUST
    /// NOT clear a device status bit"). DRIVER_OK without FEATURES_OK is not
    /// accepted; a driver cannot set DEVICE_NEEDS_RESET.
    #[test]
    fn the_status_machine_refuses_skipped_steps_and_device_bits() {
        let (mut t, block, mem) = transport_and_block(Box::new(MemDisk::new(4096)));
        let mock = MockSplitQueue::new(&mem, 16);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            read(&mut t, REG_STATUS) & status::DRIVER_OK,
            0,
            "DRIVER_OK needs FEATURES_OK"
        );
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "the driver cannot set DEVICE_NEEDS_RESET"
        );
        // The proper sequence still works afterwards.
        configure(&mut t, &mock, 16);
        write(&mut t, REG_STATUS, NEGOTIATED | status::DRIVER_OK);
        assert_eq!(read(&mut t, REG_STATUS), NEGOTIATED | status::DRIVER_OK);
        publish_write(&mem, &mock, 0);
        block.lock().expect("lock").process_queue();
        assert_eq!(used_idx(&mem, &mock), 1);
    }

    /// virtio 1.2, 4.2.2.1 (MMIO device requirements): "The device MUST
    /// change value returned in ConfigGeneration if there is any risk of a
    /// driver seeing an inconsistent configuration state" — and only then:
    /// a write that changes nothing (a read-only field) leaves it alone.
    #[test]
    fn config_generation_changes_only_with_the_config() {
        let (mut t, _block, _mem) = transport_and_block(Box::new(MemDisk::new(4096)));
        let generation = read(&mut t, REG_CONFIG_GENERATION);
        let capacity = read(&mut t, CONFIG_SPACE);
        write(&mut t, CONFIG_SPACE, 12345);
        assert_eq!(
            read(&mut t, CONFIG_SPACE),
            capacity,
            "capacity is read-only"
        );
        assert_eq!(read(&mut t, REG_CONFIG_GENERATION), generation);
    }

    use crate::virtio::block::backend::BackendError;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};

    /// virtio 1.2, 5.2.6.1 ("If the VIRTIO_BLK_F_CONFIG_WCE feature is
    /// negotiated, the driver MAY switch to writethrough or writeback mode by
    /// writing respectively 0 and 1 to the writeback field") and 5.2.6.2 (a
    /// write completed while writeback is 0 is stable: the device commits
    /// it before completing). ConfigGeneration moves, as the configuration
    /// changed (4.2.2.1).
    #[test]
    fn writeback_zero_through_the_transport_makes_writes_stable() {
        let disk = Arc::new(MemDisk::new(4096));
        let (mut t, block, mem) = transport_and_block(Box::new(
            crate::virtio::block::device::tests::Shared(disk.clone()),
        ));
        let mock = MockSplitQueue::new(&mem, 16);
        let wce = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        configure_with(&mut t, &mock, 16, wce);
        assert_eq!(
            read(&mut t, REG_STATUS),
            NEGOTIATED,
            "CONFIG_WCE is offered"
        );
        let mut writeback = [0u8; 1];
        t.read(CONFIG_SPACE + 32, &mut writeback);
        assert_eq!(writeback, [1], "FLUSH negotiated: writeback");
        let generation = read(&mut t, REG_CONFIG_GENERATION);
        t.write(CONFIG_SPACE + 32, &[0]);
        t.read(CONFIG_SPACE + 32, &mut writeback);
        assert_eq!(writeback, [0]);
        assert_ne!(read(&mut t, REG_CONFIG_GENERATION), generation);
        write(&mut t, REG_STATUS, NEGOTIATED | status::DRIVER_OK);
        publish_write(&mem, &mock, 0);
        block.lock().expect("lock").process_queue();
        assert_eq!(used_idx(&mem, &mock), 1);
        assert_eq!(disk.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A disk whose flush blocks until the test lets it go.
    struct GatedFlush {
        inner: MemDisk,
        gate: Arc<std::sync::Barrier>,
    }

    impl crate::virtio::block::DiskBackend for GatedFlush {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> Result<(), BackendError> {
            self.gate.wait(); // the flush has started
            self.gate.wait(); // the test lets it finish
            self.inner.flush()
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.inner.discard(offset, len)
        }
        fn discard_alignment(&self) -> u64 {
            self.inner.discard_alignment()
        }
    }

    /// Issue 12, item 8, against virtio 1.2, 4.2.2.1 (MMIO device
    /// requirements): "The device MUST present each event by setting the
    /// corresponding bit in InterruptStatus from the moment it takes place".
    /// While the event loop is inside a queue pass, blocked in a flush that
    /// does not return, a vCPU's InterruptStatus read (every interrupt
    /// handler does one) must return at once, and already show the write
    /// completed before the flush.
    #[test]
    fn interrupt_status_reads_do_not_wait_behind_a_blocked_flush() {
        use std::sync::mpsc;
        let gate = Arc::new(std::sync::Barrier::new(2));
        let (mut t, block, mem) = transport_and_block(Box::new(GatedFlush {
            inner: MemDisk::new(4096),
            gate: gate.clone(),
        }));
        let mock = MockSplitQueue::new(&mem, 16);
        // FLUSH negotiated: only the guest's FLUSH request syncs.
        configure_with(&mut t, &mock, 16, 1 << VIRTIO_BLK_F_FLUSH);
        write(&mut t, REG_STATUS, NEGOTIATED | status::DRIVER_OK);
        assert_eq!(
            read(&mut t, REG_STATUS) & status::DRIVER_OK,
            status::DRIVER_OK
        );
        publish_write(&mem, &mock, 0);
        // Then a FLUSH.
        {
            use crate::virtio::block::device::tests::publish;
            use crate::virtio::block::request::tests::{desc, F_WRITE, STATUS};
            let header = 0x18_0000u64;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&crate::virtio::block::request::types::FLUSH.to_le_bytes());
            vm_memory::Bytes::write_slice(&mem, &h, vm_memory::GuestAddress(header))
                .expect("header");
            publish(
                &mock,
                3,
                &[desc(header, 16, 0), desc(STATUS + 8, 1, F_WRITE)],
            );
        }
        let worker = {
            let block = block.clone();
            std::thread::spawn(move || block.lock().expect("lock").process_queue())
        };
        gate.wait(); // the flush has started, the device lock is held
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let status = read(&mut t, REG_INTERRUPT_STATUS);
            write(&mut t, REG_INTERRUPT_ACK, status);
            let after = read(&mut t, REG_INTERRUPT_STATUS);
            let _ = tx.send((status, after));
        });
        // A hang guard, not a timing assertion: the read either returns or
        // waits for the flush, which waits for this test.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        gate.wait(); // let the flush finish
        worker.join().expect("worker");
        reader.join().expect("reader");
        let (status, after) = got.expect("InterruptStatus returned while the flush was blocked");
        assert_eq!(
            status & INT_USED_RING,
            INT_USED_RING,
            "the write was signalled before the flush"
        );
        assert_eq!(after & INT_USED_RING, 0, "InterruptACK cleared it");
        assert_eq!(used_idx(&mem, &mock), 2);
    }

    /// A device with two queues, the first of which cannot exist.
    struct TwoQueues {
        interrupt: Arc<crate::virtio::Interrupt>,
    }

    impl VirtioDevice for TwoQueues {
        fn device_type(&self) -> u32 {
            99
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3, 16]
        }
        fn queue_event(&self, _index: usize) -> Option<&EventFd> {
            None
        }
        fn interrupt(&self) -> &Arc<crate::virtio::Interrupt> {
            &self.interrupt
        }
        fn config_space(&self) -> Arc<dyn ConfigSpace> {
            Arc::new(crate::virtio::block::config::BlockConfig::new(0, 512))
        }
        fn features_ok(&mut self, _acked: u64) {}
        fn activate(
            &mut self,
            _activation: Activation,
        ) -> Result<(), crate::virtio::ActivateError> {
            Ok(())
        }
        fn stop_queue(&mut self, _index: usize) {}
        fn reset(&mut self) {}
    }

    /// virtio 1.2, 4.2.2 (MMIO register layout: QueueSel "selects the
    /// virtual queue that QueueNumMax, QueueNum, QueueReady ... apply to";
    /// QueueNumMax reads 0x0 for a queue that is not available): a queue
    /// the device cannot create must not shift the others' indices.
    #[test]
    fn queue_indices_do_not_shift_past_a_missing_queue() {
        let device = TwoQueues {
            interrupt: Arc::new(crate::virtio::Interrupt::new(EventFd::new(0).expect("irq"))),
        };
        let mut t = MmioTransport::new(Arc::new(Mutex::new(device)), guest_memory());
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
    }
}
