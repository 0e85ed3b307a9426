//! The KVM VM and its memory: the VM file descriptor with the in-kernel
//! interrupt controllers and PIT, and guest RAM registered with KVM.

use kvm_bindings::KVM_PIT_SPEAKER_DUMMY;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::x86_64::layout::ram_regions;

/// A KVM ioctl that failed, by name.
#[derive(Debug, Error)]
#[error("KVM {ioctl} failed: {source}")]
pub struct KvmError {
    /// The ioctl.
    pub ioctl: &'static str,
    /// The cause.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Names the ioctl of a failed KVM call: `fd.x().map_err(kvm_err("KVM_X"))`.
pub fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { ioctl, source }
}

/// Errors creating the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm ({0}): KVM is required; is the kvm module loaded and /dev/kvm accessible?")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory cannot be allocated, or KVM cannot map that much.
    #[error("cannot give the guest {size} bytes of memory ({reason}); give less --mem")]
    Memory {
        /// Requested size.
        size: u64,
        /// The cause.
        reason: String,
    },
}

/// Where KVM keeps the TSS for real-mode emulation (in the MMIO gap, unused).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM with its RAM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM with `mem_size` bytes of RAM, registered with KVM,
    /// and the in-kernel PIC, IOAPIC and PIT.
    ///
    /// The RAM is registered before the interrupt controllers are created:
    /// creating the irqchip leaves KVM something to wait for, and a memory
    /// slot registered right after it waits (on the 2-core EPYC machine of
    /// 2026-12-03, without VT-x/AMD-V: 4-10 ms for 256 MiB, 0.2-0.4 ms
    /// when registered before the irqchip or 20 ms after it, in most runs;
    /// a C program making the same ioctls). The ioctls that follow it here (PIT,
    /// KVM_IRQFD, KVM_IOEVENTFD) do not wait.
    pub fn new(mem_size: u64) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let memory_error = |e: &dyn std::fmt::Display| VmError::Memory {
            size: mem_size,
            reason: e.to_string(),
        };
        let mem =
            GuestMemoryMmap::from_ranges(&ram_regions(mem_size)).map_err(|e| memory_error(&e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| memory_error(&e))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm keeps (and every vCPU clones) for as long as the guest
            // runs. KVM refuses memory beyond the guest physical address
            // width.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| memory_error(&format_args!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
        }
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd, mem })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM system handle (capabilities of this host).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPUID leaves this host's KVM can offer a guest.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registered RAM is the guest's: KVM accepts a vCPU, and a second
    /// slot at the same address is refused because the first exists.
    #[test]
    fn the_ram_is_registered_with_kvm() {
        let vm = Vm::new(16 << 20).expect("VM");
        vm.fd().create_vcpu(0).expect("vCPU");
        let host = vm
            .memory()
            .get_host_address(vm_memory::GuestAddress(0))
            .expect("host address");
        let overlap = kvm_userspace_memory_region {
            slot: 7,
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping is live and owned by `vm`; KVM refuses it.
        assert!(unsafe { vm.fd().set_user_memory_region(overlap) }.is_err());
    }

    /// More guest memory than this host's KVM can map (beyond its guest
    /// physical address width, or than the host can reserve) is the user's
    /// `--mem`, said as such: never a bare ioctl failure.
    #[test]
    fn memory_beyond_what_the_host_can_map_is_a_memory_error() {
        for size in [64u64 << 40, 200 << 40] {
            let err = Vm::new(size).err();
            assert!(
                matches!(err, Some(VmError::Memory { size: s, .. }) if s == size),
                "{size:#x}: {err:?}"
            );
            let err = crate::machine::MachineError::from(err.expect("an error"));
            assert!(err.is_bad_input(), "exit status 2: {err}");
        }
    }
}
