//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! 4 KiB window a driver configures a device through.
//!
//! It keeps the device-status state machine (ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK; 0 resets), the feature and queue registers, and
//! hands the queues to the device at DRIVER_OK. Queue notifications normally
//! arrive on the device's ioeventfd without passing here; a QueueNotify write
//! that does reach the transport is forwarded to that event fd.

use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, VirtioDevice, INT_CONFIG, INT_USED_RING};
use crate::bus::BusDevice;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x).
const VERSION: u32 = 2;
/// Vendor ID: "ACOW".
const VENDOR_ID: u32 = 0x574f_4341;

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of QueueNotify, where the VMM puts the ioeventfds.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;
/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// A virtio device's MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device` in a guest with memory `mem`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &Arc<Mutex<dyn VirtioDevice>>) -> Vec<Queue> {
        let device = device.lock().unwrap_or_else(PoisonError::into_inner);
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
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

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn reset(&mut self) {
        self.with_device(|d| {
            d.reset();
            d.interrupt().ack(INT_USED_RING | INT_CONFIG);
        });
        self.queues = Self::fresh_queues(&self.device);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        // Bits may only be added, except by a reset.
        if value & self.status != self.status {
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.with_device(|d| d.features());
            if self.acked_features & !offered != 0
                || self.acked_features & (1 << super::VIRTIO_F_VERSION_1) == 0
            {
                // Refused: the driver sees FEATURES_OK missing and gives up.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            let activation = Activation {
                mem: self.mem.clone(),
                queues: self
                    .queues
                    .iter()
                    .filter_map(|q| Queue::try_from(q.state()).ok())
                    .collect(),
                acked_features: self.acked_features,
            };
            if self.with_device(|d| d.activate(activation)).is_err() {
                self.status |= status::DEVICE_NEEDS_RESET;
                let _ = self.with_device(|d| d.interrupt().trigger(INT_CONFIG));
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.with_device(|d| d.device_type()),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.with_device(|d| d.features());
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.with_device(|d| d.interrupt().status()),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let allowed = self.queue_config_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES
                if self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER =>
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
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY if allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
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
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY if self.status & status::DRIVER_OK != 0 => {
                let _ = self.with_device(|d| d.queue_event(value as usize).map(|e| e.write(1)));
            }
            REG_INTERRUPT_ACK => self.with_device(|d| d.interrupt().ack(value)),
            REG_STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.with_device(|d| d.read_config(offset - CONFIG_SPACE, data));
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
            self.with_device(|d| d.write_config(offset - CONFIG_SPACE, data));
            self.config_generation = self.config_generation.wrapping_add(1);
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
        assert_eq!(read(&mut t, REG_DEVICE_ID), super::super::TYPE_BLOCK);
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
}
