//! The machine: KVM VM, guest memory, devices on their buses, the loaded
//! kernel, vCPU threads, and the event loop that runs until the guest stops.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use devices::bus::{Bus, BusError};
use devices::exit::{ExitSignal, VmExit};
use devices::legacy::{ConsoleOutput, ExitPort, Serial, EXIT_PORT, I8042};
use devices::virtio::block::{open_disk, Block, DiskFormat};
use devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use devices::virtio::VirtioDevice;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Vcpu;
use crate::x86_64::boot::{self, BootError};
use crate::x86_64::cpuid;
use crate::x86_64::layout::{
    ram_regions, IRQ_MAX, SERIAL_IRQ, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::x86_64::mptable::{self, MptableError};
use crate::x86_64::regs::{self, RegsError};

/// Everything a VM is made from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The full kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// virtio-blk disks, in order: vda, vdb, ...
    pub disks: Vec<DiskConfig>,
    /// Whether the test exit port at 0xf4 is present.
    pub exit_port: bool,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The add-cow or raw file.
    pub path: PathBuf,
    /// How to read it.
    pub format: DiskFormat,
    /// Offer it read-only (VIRTIO_BLK_F_RO) and refuse writes.
    pub read_only: bool,
}

/// Errors building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm ({0}): KVM is required; is the kvm module loaded and /dev/kvm accessible?")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("KVM {ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory cannot be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Requested size.
        size: u64,
        /// The cause.
        reason: String,
    },
    /// An event fd or epoll call failed.
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
        source: addcow::Error,
    },
    /// More disks than free IRQs.
    #[error("{0} disks: at most {max} fit the interrupt controller", max = IRQ_MAX - VIRTIO_IRQ_START + 1)]
    TooManyDisks(usize),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Setting up a vCPU failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
}

fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { ioctl, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Where KVM keeps the TSS for real-mode emulation (in the MMIO gap, unused).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The serial port's I/O range.
const SERIAL_PORT: (u64, u64) = (0x3f8, 8);
/// The i8042's ports 0x60-0x64.
const I8042_PORT: (u64, u64) = (0x60, 5);

/// A VM ready to run.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<Serial>>,
    blocks: Vec<Arc<Mutex<Block>>>,
    config: VmConfig,
}

impl Vm {
    /// Creates the VM, its memory and legacy devices.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = GuestMemoryMmap::from_ranges(&ram_regions(config.mem_size)).map_err(|e| {
            VmError::Memory {
                size: config.mem_size,
                reason: e.to_string(),
            }
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Memory {
                    size: config.mem_size,
                    reason: e.to_string(),
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VM keeps (and every vCPU clones) for as long as the guest runs.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let exit = Arc::new(ExitSignal::new().map_err(io_err("exit event"))?);
        let serial_irq = EventFd::new(0).map_err(io_err("serial irq event"))?;
        fd.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            ConsoleOutput::new(Box::new(io::stdout()), exit.clone()),
        )));
        let mut pio = Bus::new();
        pio.insert(SERIAL_PORT.0, SERIAL_PORT.1, serial.clone())?;
        pio.insert(
            I8042_PORT.0,
            I8042_PORT.1,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        if config.exit_port {
            pio.insert(
                EXIT_PORT,
                1,
                Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
            )?;
        }
        let mut vm = Vm {
            kvm,
            fd,
            mem,
            pio,
            mmio: Bus::new(),
            exit,
            serial,
            blocks: Vec::new(),
            config,
        };
        for (index, disk) in vm.config.disks.clone().iter().enumerate() {
            vm.add_disk(index, disk)?;
        }
        Ok(vm)
    }

    /// Adds disk number `index` as a virtio-blk device on its own MMIO window
    /// and IRQ, announced on the kernel command line.
    fn add_disk(&mut self, index: usize, disk: &DiskConfig) -> Result<(), VmError> {
        let irq = u32::try_from(index)
            .ok()
            .map(|i| VIRTIO_IRQ_START + i)
            .filter(|&irq| irq <= IRQ_MAX)
            .ok_or(VmError::TooManyDisks(self.config.disks.len()))?;
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let backend =
            open_disk(&disk.path, disk.format, disk.read_only).map_err(|source| VmError::Disk {
                path: disk.path.clone(),
                source,
            })?;
        let irq_event = EventFd::new(0).map_err(io_err("virtio irq event"))?;
        let block = Block::new(backend, disk.read_only, disk_id(&disk.path), irq_event)
            .map_err(io_err("virtio queue event"))?;
        self.fd
            .register_irqfd(block.interrupt().irq(), irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        if let Some(queue_event) = block.queue_event(0) {
            self.fd
                .register_ioevent(
                    queue_event,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    0u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let block = Arc::new(Mutex::new(block));
        let transport = MmioTransport::new(block.clone(), self.mem.clone());
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
        self.config
            .cmdline
            .push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.blocks.push(block);
        Ok(())
    }

    /// Loads the guest, starts the vCPUs and runs the event loop until the
    /// guest stops; returns why it stopped.
    pub fn run(self) -> Result<VmExit, VmError> {
        let cfg = &self.config;
        regs::write_boot_tables(&self.mem)?;
        mptable::write(&self.mem, cfg.vcpus)?;
        let entry = boot::load_linux(
            &self.mem,
            cfg.mem_size,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
        )?;

        let pio = Arc::new(self.pio);
        let mmio = Arc::new(self.mmio);
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::filter(&mut cpuid, id, cfg.vcpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&fd)?;
            regs::setup_lapic(&fd)?;
            if id == 0 {
                // Other vCPUs wait for the kernel's INIT/SIPI in KVM.
                regs::setup_sregs(&fd)?;
                regs::setup_regs(&fd, entry.entry)?;
                regs::setup_fpu(&fd)?;
            }
            vcpus.push(Vcpu::new(
                fd,
                id,
                pio.clone(),
                mmio.clone(),
                self.mem.clone(),
                self.exit.clone(),
            ));
        }
        for vcpu in vcpus {
            thread::Builder::new()
                .name("vcpu".into())
                .spawn(move || vcpu.run())
                .map_err(io_err("spawn vCPU thread"))?;
        }

        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmError::EventLoop(e.to_string()))?;
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            serial: self.serial.clone(),
        })));
        events.add_subscriber(Arc::new(Mutex::new(ExitWatch(self.exit.clone()))));
        for block in &self.blocks {
            events.add_subscriber(block.clone());
        }
        while self.exit.reason().is_none() {
            events
                .run_with_timeout(100)
                .map_err(|e| VmError::EventLoop(e.to_string()))?;
        }
        let _ = io::stdout().flush();
        // The guest is done: make its disks consistent on the host, whether or
        // not it flushed them itself.
        for (block, disk) in self.blocks.iter().zip(&cfg.disks) {
            let block = block.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = block.flush() {
                eprintln!("vmm: disk {}: final flush failed: {e}", disk.path.display());
            }
        }
        Ok(self
            .exit
            .reason()
            .unwrap_or_else(|| VmExit::Failed("stopped without a reason".into())))
    }
}

/// A stable 20-byte serial for GET_ID: "acow-" and a hash of the disk's path.
fn disk_id(path: &std::path::Path) -> [u8; 20] {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    // FNV-1a: stable across runs and Rust versions.
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let mut id = [0u8; 20];
    let text = format!("acow-{hash:015x}");
    id.copy_from_slice(&text.as_bytes()[..20]);
    id
}

/// Standard input to the serial port.
struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Without a readable stdin (a closed one, or /dev/null in epoll's
        // eyes) the guest simply gets no input.
        let _ = ops.add(Events::new(&io::stdin(), EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // At least as large as stdin's own buffer, so that reads bypass it
        // and epoll sees every byte that is still pending.
        let mut buf = [0u8; 16 << 10];
        let stdin = io::stdin();
        let n = match stdin.lock().read(&mut buf) {
            Ok(n) if n > 0 && !events.event_set().contains(EventSet::HANG_UP) => n,
            _ => {
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
                return;
            }
        };
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        // What does not fit in the UART's FIFO is dropped, as on a real port.
        serial.enqueue_input(&buf[..n]);
    }
}

/// Wakes the event loop as soon as the VM should stop.
struct ExitWatch(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.0.event(), EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only clears the counter; the loop checks the reason itself.
        let _ = self.0.event().read();
    }
}
