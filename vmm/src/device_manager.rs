//! Device wiring: the legacy PC devices on the I/O-port bus, one virtio-mmio
//! window per disk on the MMIO bus, their interrupts and queue notifications
//! connected to KVM (irqfd, ioeventfd), and the kernel parameters that
//! announce them.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use devices::acpi::{AcpiPower, ACPI_POWER_PORT, ACPI_POWER_PORTS};
use devices::bus::{Bus, BusError};
use devices::exit::ExitSignal;
use devices::legacy::{ConsoleOutput, ExitPort, Serial, EXIT_PORT, I8042};
use devices::virtio::block::{Block, OpenError};
use devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use devices::virtio::VirtioDevice;
use kvm_ioctls::IoEventAddress;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::DiskConfig;
use crate::vm::{kvm_err, KvmError, Vm};
use crate::x86_64::layout::{
    MmioDevice, IRQ_MAX, SERIAL_IRQ, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};

/// Errors wiring devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// An event fd cannot be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A disk cannot be opened.
    #[error("disk {path}: {source}")]
    Disk {
        /// The `--disk` path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: OpenError,
    },
    /// More disks than free IRQs.
    #[error("{0} disks: at most {max} fit the interrupt controller", max = IRQ_MAX - VIRTIO_IRQ_START + 1)]
    TooManyDisks(usize),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
}

/// The serial port's I/O range.
const SERIAL_PORT: (u64, u64) = (0x3f8, 8);
/// The i8042's ports 0x60-0x64.
const I8042_PORT: (u64, u64) = (0x60, 5);

/// A virtio-blk device and the file behind it.
struct Disk {
    block: Arc<Mutex<Block>>,
    path: PathBuf,
}

/// Every device of the machine, on its bus.
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    disks: Vec<Disk>,
    /// The virtio-mmio windows, for the kernel command line and the DSDT.
    virtio: Vec<MmioDevice>,
    /// Where a disk's power cut ends the VM.
    exit: Arc<ExitSignal>,
}

impl DeviceManager {
    /// The serial console on stdout, the i8042 reset line and, with
    /// `exit_port`, the test exit port; every one ends the VM through `exit`.
    pub fn new(vm: &Vm, exit: &Arc<ExitSignal>, exit_port: bool) -> Result<Self, DeviceError> {
        let serial_irq = EventFd::new(0).map_err(io_err("serial irq event"))?;
        vm.fd()
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Serial::new(
            serial_irq,
            ConsoleOutput::new(Box::new(io::stdout()), exit.clone()),
        )
        .map_err(io_err("serial input event"))?;
        let serial = Arc::new(Mutex::new(serial));
        let mut pio = Bus::new();
        pio.insert(SERIAL_PORT.0, SERIAL_PORT.1, serial.clone())?;
        pio.insert(
            I8042_PORT.0,
            I8042_PORT.1,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        pio.insert(
            u64::from(ACPI_POWER_PORT),
            u64::from(ACPI_POWER_PORTS),
            Arc::new(Mutex::new(AcpiPower::new(exit.clone()))),
        )?;
        if exit_port {
            pio.insert(
                EXIT_PORT,
                1,
                Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
            )?;
        }
        Ok(DeviceManager {
            pio,
            mmio: Bus::new(),
            serial,
            disks: Vec::new(),
            virtio: Vec::new(),
            exit: exit.clone(),
        })
    }

    /// Adds `disks` as virtio-blk devices vda, vdb, ..., each on its own
    /// MMIO window and IRQ.
    pub fn add_disks(&mut self, vm: &Vm, disks: &[DiskConfig]) -> Result<(), DeviceError> {
        let total = self.disks.len() + disks.len();
        if total > (IRQ_MAX - VIRTIO_IRQ_START + 1) as usize {
            return Err(DeviceError::TooManyDisks(total));
        }
        disks.iter().try_for_each(|disk| self.add_disk(vm, disk))
    }

    fn add_disk(&mut self, vm: &Vm, disk: &DiskConfig) -> Result<(), DeviceError> {
        let index = self.disks.len();
        let irq = VIRTIO_IRQ_START + index as u32;
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let backend = disk.open(&self.exit).map_err(|source| DeviceError::Disk {
            path: disk.path.clone(),
            source,
        })?;
        let irq_event = EventFd::new(0).map_err(io_err("virtio irq event"))?;
        let block = Block::new(backend, disk.read_only, disk.serial(), irq_event)
            .map_err(io_err("virtio queue event"))?;
        vm.fd()
            .register_irqfd(block.interrupt().irq(), irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        if let Some(queue_event) = block.queue_event(0) {
            vm.fd()
                .register_ioevent(
                    queue_event,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    0u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let block = Arc::new(Mutex::new(block));
        let transport = MmioTransport::new(block.clone(), vm.memory().clone());
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
        self.virtio.push(MmioDevice {
            base,
            size: VIRTIO_MMIO_SIZE,
            irq,
        });
        self.disks.push(Disk {
            block,
            path: disk.path.clone(),
        });
        Ok(())
    }

    /// The I/O-port bus.
    pub fn pio(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Bus {
        &self.mmio
    }

    /// The serial port, for console input.
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// The virtio-blk devices, for the event loop.
    pub fn blocks(&self) -> impl Iterator<Item = &Arc<Mutex<Block>>> {
        self.disks.iter().map(|disk| &disk.block)
    }

    /// The virtio-mmio windows: the kernel learns of them from the DSDT or,
    /// without ACPI, from `virtio_mmio.device=` on its command line.
    pub fn virtio_devices(&self) -> &[MmioDevice] {
        &self.virtio
    }

    /// Makes every disk consistent on the host, whether or not the guest
    /// flushed it; a failure is reported and the other disks still flushed.
    pub fn flush_disks(&self) {
        for disk in &self.disks {
            let block = disk.block.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = block.flush() {
                eprintln!("vmm: disk {}: final flush failed: {e}", disk.path.display());
            }
        }
    }
}
