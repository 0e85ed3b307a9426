//! The vCPU run loop: one thread per vCPU, KVM_RUN until the VM stops.
//!
//! Port and MMIO exits go to the buses; an access no device serves reads as
//! all ones and writes nowhere, as on a PC. Everything that ends the VM
//! (shutdown, KVM internal error, failed ioctl) is reported through the exit
//! signal with a one-line reason.

use std::sync::Arc;

use devices::bus::Bus;
use devices::exit::{ExitSignal, VmExit};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A vCPU and what its exits are dispatched to.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    exit: Arc<ExitSignal>,
}

impl Vcpu {
    /// A vCPU ready to run (its registers already set).
    pub fn new(
        fd: VcpuFd,
        id: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Vcpu {
            fd,
            id,
            pio,
            mmio,
            mem,
            exit,
        }
    }

    /// Runs the guest until it stops this VM, then signals why.
    pub fn run(mut self) {
        let reason = loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    break VmExit::Shutdown(format!("vCPU {} halted with interrupts off", self.id))
                }
                Ok(VcpuExit::Shutdown) => {
                    break VmExit::Shutdown(format!("vCPU {}: triple fault (shutdown)", self.id))
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => break VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => {
                        break VmExit::Shutdown(format!("vCPU {}: guest powered off", self.id))
                    }
                    other => {
                        break VmExit::Failed(format!("vCPU {}: system event {other}", self.id))
                    }
                },
                Ok(VcpuExit::InternalError) => {
                    break VmExit::Failed(self.describe_internal_error())
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    break VmExit::Failed(format!(
                        "vCPU {}: KVM entry failed, hardware reason {reason:#x} on host CPU {cpu}",
                        self.id
                    ))
                }
                Ok(other) => {
                    break VmExit::Failed(format!("vCPU {}: unexpected exit {other:?}", self.id))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => break VmExit::Failed(format!("vCPU {}: KVM_RUN: {e}", self.id)),
            }
        };
        self.exit.signal(reason);
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
                if self.mem.read_slice(&mut bytes, GuestAddress(phys)).is_ok() {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    text.push_str(&format!(", code {}", hex.join(" ")));
                }
            }
        }
        text
    }
}
