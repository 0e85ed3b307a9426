//! vCPUs: their set-up (CPUID, MSRs, local APIC, boot registers), the run
//! loop on each vCPU's own thread, and the set of threads the VMM starts,
//! kicks and joins.
//!
//! The loop enters the guest only while no exit reason is set: a reason given
//! by a device this vCPU serves stops it right after that exit, one given
//! elsewhere reaches it through a kick ([`kick`]). Everything that ends the
//! VM (shutdown, KVM internal error, failed ioctl, a panic) is reported
//! through the exit signal with a one-line reason.

mod exit;
mod halt;
mod kick;
mod threads;

use std::sync::Arc;

use devices::bus::Bus;
use devices::exit::{ExitSignal, VmExit};
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use halt::{HaltProbe, PROBE_PERIOD};
pub use threads::Vcpus;

use crate::vm::{kvm_err, KvmError, Vm};
use crate::x86_64::cpuid::{self, CpuidError, HostFeatures};
use crate::x86_64::regs::{self, RegsError};
use exit::{handle_kvm_exit, Emulation};

/// Errors setting up or starting vCPUs.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Registers or MSRs cannot be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The vCPU's CPUID cannot be built.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(#[source] std::io::Error),
    /// A vCPU thread cannot be started.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// The vCPU.
        id: u8,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where a vCPU's exits go and what it reports to.
#[derive(Clone)]
pub struct VcpuContext {
    /// The I/O-port bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// Guest memory (to show the code at a failing RIP).
    pub mem: GuestMemoryMmap,
    /// How the VM stops.
    pub exit: Arc<ExitSignal>,
    /// Where a kicked vCPU reports whether it is parked for good.
    pub halt: Arc<HaltProbe>,
}

/// A vCPU ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    ctx: VcpuContext,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` in `vm` with CPUID from `supported`,
    /// filtered for `host`;
    /// vCPU 0 starts at `entry` in 64-bit mode, the others wait for the
    /// guest's INIT/SIPI in KVM.
    pub fn new(
        vm: &Vm,
        id: u8,
        count: u8,
        supported: &CpuId,
        host: &HostFeatures,
        entry: u64,
        ctx: VcpuContext,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::filter(&mut cpuid, id, count, host)?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd)?;
        regs::setup_lapic(&fd)?;
        if id == 0 {
            regs::setup_sregs(&fd)?;
            regs::setup_regs(&fd, entry)?;
            regs::setup_fpu(&fd)?;
        }
        Ok(Vcpu { fd, id, ctx })
    }

    /// This vCPU's number.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until the VM stops: returns this vCPU's reason to stop
    /// it, or `None` when the reason was given elsewhere.
    pub fn run(mut self) -> Option<VmExit> {
        // Dropped before `self`, which owns the `kvm_run` it points to.
        let _armed = kick::Armed::new(&mut self.fd);
        while !self.ctx.exit.is_set() {
            let result = self.fd.run();
            match handle_kvm_exit(self.id, &self.ctx.pio, &self.ctx.mmio, result) {
                Emulation::Handled => {}
                Emulation::Interrupted => {
                    // Cleared before the exit reason is looked at again, so
                    // that a kick from now on is not lost.
                    self.fd.set_kvm_immediate_exit(0);
                    self.report_halt();
                }
                Emulation::InternalError => {
                    return Some(VmExit::Failed(self.describe_internal_error()))
                }
                Emulation::Stop(reason) => return Some(reason),
            }
        }
        None
    }

    /// Answers the halt probe after a kick.
    fn report_halt(&self) {
        let parked = match (self.fd.get_mp_state(), self.fd.get_regs()) {
            (Ok(state), Ok(regs)) => halt::is_parked(state.mp_state, regs.rflags),
            _ => false,
        };
        self.ctx.halt.report(self.id, parked);
    }

    /// "KVM internal error" with the suberror, RIP and the instruction bytes.
    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the union for this
        // exit reason (KVM_EXIT_INTERNAL_ERROR), and it is plain data.
        let (suberror, ndata, data) = unsafe {
            let internal = run.__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata, internal.data)
        };
        let extra: Vec<String> = data
            .iter()
            .take(ndata.min(data.len() as u32) as usize)
            .map(|d| format!("{d:#x}"))
            .collect();
        let mut text = format!(
            "vCPU {}: KVM internal error, suberror {suberror} (1 = emulation failure), data [{}]",
            self.id,
            extra.join(", ")
        );
        if let Ok(regs) = self.fd.get_regs() {
            text.push_str(&format!(", RIP {:#x}", regs.rip));
            let phys = self
                .fd
                .translate_gva(regs.rip)
                .ok()
                .filter(|t| t.valid != 0)
                .map(|t| t.physical_address);
            let mut bytes = [0u8; 16];
            if let Some(phys) = phys {
                if self
                    .ctx
                    .mem
                    .read_slice(&mut bytes, GuestAddress(phys))
                    .is_ok()
                {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    text.push_str(&format!(", code {}", hex.join(" ")));
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    //! Tiny 64-bit guests on real KVM: the run loop, kicks and the halt
    //! probe, without booting Linux.

    use std::sync::Mutex;
    use std::thread;
    use std::time::{Duration, Instant};

    use devices::bus::BusDevice;
    use devices::legacy::{ExitPort, EXIT_PORT};

    use super::*;
    use crate::x86_64::layout::HIMEM_START;

    /// Counts writes to its port.
    #[derive(Default)]
    struct Counter(usize);

    impl BusDevice for Counter {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.0 += 1;
        }
    }

    /// A one-vCPU machine running `code` at 1 MiB, with the exit port and a
    /// counter at port 0x80.
    fn start(code: &[u8]) -> (Vcpus, Arc<ExitSignal>, Arc<Mutex<Counter>>) {
        let vm = Vm::new(16 << 20).expect("KVM VM");
        regs::write_boot_tables(vm.memory()).expect("boot tables");
        vm.memory()
            .write_slice(code, GuestAddress(HIMEM_START))
            .expect("code");
        let exit = Arc::new(ExitSignal::new().expect("exit signal"));
        let counter = Arc::new(Mutex::new(Counter::default()));
        let mut pio = Bus::new();
        pio.insert(
            EXIT_PORT,
            1,
            Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
        )
        .expect("exit port");
        pio.insert(0x80, 1, counter.clone()).expect("counter");
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            mem: vm.memory().clone(),
            exit: exit.clone(),
            halt: Arc::new(HaltProbe::new(1)),
        };
        let supported = vm.supported_cpuid().expect("CPUID");
        let vcpu = Vcpu::new(
            &vm,
            0,
            1,
            &supported,
            &HostFeatures::detect(vm.kvm()),
            HIMEM_START,
            ctx.clone(),
        )
        .expect("vCPU");
        let vcpus = Vcpus::start(vec![vcpu], exit.clone(), ctx.halt).expect("start");
        (vcpus, exit, counter)
    }

    /// Probes until the guest is found halted for good or `limit` passes.
    fn halted_within(vcpus: &mut Vcpus, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if vcpus.probe_halt() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// mov al, 42; out 0xf4, al; out 0x80, al; jmp $
    const EXIT_THEN_WRITE: [u8; 8] = [0xb0, 42, 0xe6, 0xf4, 0xe6, 0x80, 0xeb, 0xfe];
    /// jmp $
    const SPIN: [u8; 2] = [0xeb, 0xfe];
    /// cli; hlt; jmp back to hlt
    const CLI_HLT: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
    /// sti; hlt; jmp back to hlt (idle: an interrupt would wake it)
    const STI_HLT: [u8; 4] = [0xfb, 0xf4, 0xeb, 0xfd];

    #[test]
    fn no_vcpu_reenters_the_guest_once_its_device_set_the_reason() {
        let (vcpus, exit, counter) = start(&EXIT_THEN_WRITE);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !exit.is_set() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(vcpus.stop(), 0);
        assert_eq!(exit.reason(), Some(VmExit::Status(42)));
        assert_eq!(counter.lock().expect("lock").0, 0, "the guest ran on");
    }

    #[test]
    fn a_spinning_vcpu_is_kicked_out_and_joined() {
        let (mut vcpus, exit, _) = start(&SPIN);
        assert!(!halted_within(&mut vcpus, Duration::from_millis(600)));
        exit.signal(VmExit::Reset);
        assert_eq!(vcpus.stop(), 0);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn halted_with_interrupts_off_is_a_power_off_and_idle_is_not() {
        let (mut vcpus, exit, _) = start(&CLI_HLT);
        assert!(halted_within(&mut vcpus, Duration::from_secs(20)));
        exit.signal(VmExit::PowerOff);
        assert_eq!(vcpus.stop(), 0);

        let (mut vcpus, exit, _) = start(&STI_HLT);
        assert!(!halted_within(&mut vcpus, Duration::from_millis(600)));
        exit.signal(VmExit::Reset);
        assert_eq!(vcpus.stop(), 0);
    }
}
