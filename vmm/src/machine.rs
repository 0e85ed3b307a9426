//! The whole machine, start to end: the VM and its devices are built, the
//! kernel loaded, the vCPUs started; the event loop runs until there is a
//! reason to stop; then every vCPU is stopped and joined, then every disk's
//! I/O thread, and only then are the disks flushed, so that no guest write
//! can come after the flush.

use std::sync::Arc;

use devices::exit::{ExitSignal, VmExit};
use thiserror::Error;

use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::io_thread::{IoThreadError, IoThreads};
use crate::signals::StopSignals;
use crate::vcpu::{HaltProbe, Vcpu, VcpuContext, VcpuError, Vcpus};
use crate::vm::{Vm, VmError};
use crate::x86_64::acpi::{self, AcpiError};
use crate::x86_64::boot::{self, BootError};
use crate::x86_64::cpuid::HostFeatures;
use crate::x86_64::mptable::{self, MptableError};
use crate::x86_64::regs::{self, RegsError};

/// Errors building or running the machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The KVM VM or its memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A device.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing the MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Writing the ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The boot page tables and GDT.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A disk's I/O thread.
    #[error(transparent)]
    IoThread(#[from] IoThreadError),
    /// Console input cannot be set up.
    #[error("console input: {0}")]
    Console(#[source] std::io::Error),
}

impl MachineError {
    /// Whether the user's input is at fault (exit status 2), not the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            MachineError::Boot(boot) => boot.is_bad_input(),
            MachineError::Vm(VmError::Memory { .. }) => true,
            MachineError::Devices(DeviceError::Disk { .. } | DeviceError::TooManyDisks(_)) => true,
            _ => false,
        }
    }
}

/// A machine ready to run.
pub struct Machine {
    vm: Vm,
    devices: DeviceManager,
    exit: Arc<ExitSignal>,
    config: VmConfig,
}

impl Machine {
    /// Creates the VM, its memory and devices; opens the disks.
    pub fn new(config: VmConfig) -> Result<Machine, MachineError> {
        let vm = Vm::new(config.mem_size)?;
        let exit = Arc::new(ExitSignal::new().map_err(|source| DeviceError::Io {
            what: "exit event",
            source,
        })?);
        let mut devices = DeviceManager::new(&vm, &exit, config.exit_port)?;
        devices.add_disks(&vm, &config.disks)?;
        Ok(Machine {
            vm,
            devices,
            exit,
            config,
        })
    }

    /// Loads the guest, runs it until it stops and returns why; stop
    /// signals end it through `signals`.
    pub fn run(self, mut signals: StopSignals) -> Result<VmExit, MachineError> {
        let cfg = &self.config;
        let mem = self.vm.memory();
        regs::write_boot_tables(mem)?;
        mptable::write(mem, cfg.vcpus)?;
        acpi::write(mem, cfg.vcpus, self.devices.virtio_devices())?;
        let entry = boot::load_linux(
            mem,
            cfg.mem_size,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
            self.devices.virtio_devices(),
        )?;

        let mut events = EventLoop::new(self.exit.clone())?;
        signals.stop_through(self.exit.clone());
        events.add(Arc::new(std::sync::Mutex::new(signals)));
        let console =
            ConsoleInput::stdin(self.devices.serial().clone()).map_err(MachineError::Console)?;
        events.add(Arc::new(std::sync::Mutex::new(console)));

        let ctx = VcpuContext {
            pio: Arc::new(self.devices.pio().clone()),
            mmio: Arc::new(self.devices.mmio().clone()),
            mem: mem.clone(),
            exit: self.exit.clone(),
            halt: Arc::new(HaltProbe::new(cfg.vcpus)),
        };
        let supported = self.vm.supported_cpuid().map_err(VcpuError::from)?;
        let host = HostFeatures::detect(self.vm.kvm());
        let vcpus = (0..cfg.vcpus)
            .map(|id| {
                Vcpu::new(
                    &self.vm,
                    id,
                    cfg.vcpus,
                    &supported,
                    &host,
                    entry.entry,
                    ctx.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let disks = self
            .devices
            .blocks()
            .cloned()
            .map(|block| block as Subscriber);
        let io_threads = IoThreads::start(disks, &self.exit)?;
        let mut vcpus = match Vcpus::start(vcpus, self.exit.clone(), ctx.halt.clone()) {
            Ok(vcpus) => vcpus,
            Err(e) => {
                io_threads.stop();
                return Err(e.into());
            }
        };

        let looped = events.run(&mut vcpus);
        if let Err(e) = &looped {
            self.exit.signal(VmExit::Failed(e.to_string()));
        }
        // Left-behind vCPUs were reported; the disks are flushed anyway,
        // once their threads have served what they were serving.
        let _ = vcpus.stop();
        io_threads.stop();
        self.devices.flush_disks();
        looped?;
        Ok(self
            .exit
            .reason()
            .unwrap_or_else(|| VmExit::Failed("stopped without a reason".into())))
    }
}
