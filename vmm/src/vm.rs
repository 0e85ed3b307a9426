//! The KVM VM and its memory: the VM file descriptor with the in-kernel
//! interrupt controllers and PIT, and guest RAM registered with KVM.

use kvm_bindings::KVM_PIT_SPEAKER_DUMMY;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use std::os::unix::io::AsRawFd;
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
    mem_size: u64,
}

/// The registration of a VM's RAM with KVM, running on its own thread
/// ([`Vm::register_memory`]). Dropping it waits for the thread, so that the
/// RAM it registers cannot be unmapped under it.
#[derive(Debug)]
pub struct PendingMemory {
    thread: Option<std::thread::JoinHandle<Result<(), VmError>>>,
    mem_size: u64,
}

impl PendingMemory {
    /// Waits for the registration and returns how it went (at once when it
    /// was already waited for).
    pub fn wait(&mut self) -> Result<(), VmError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        thread.join().unwrap_or_else(|_| {
            Err(VmError::Memory {
                size: self.mem_size,
                reason: "the memory registration thread panicked".into(),
            })
        })
    }
}

impl Drop for PendingMemory {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

impl Vm {
    /// Creates the VM with `mem_size` bytes of RAM, the in-kernel PIC,
    /// IOAPIC and PIT, its RAM registered with KVM (the tests' way; the
    /// machine overlaps the registration with loading the guest).
    #[cfg(test)]
    pub fn new(mem_size: u64) -> Result<Vm, VmError> {
        let vm = Vm::create(mem_size)?;
        vm.register_memory()?.wait()?;
        Ok(vm)
    }

    /// Like [`Vm::new`], but the RAM is mapped and not yet registered with
    /// KVM: [`Vm::register_memory`] must be called, and waited for, before
    /// any vCPU is created. Registering 256 MiB takes KVM 4-10 ms on the
    /// project's hosts (it allocates the slot's per-page metadata), which
    /// the caller can overlap with loading the guest.
    pub fn create(mem_size: u64) -> Result<Vm, VmError> {
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

        let memory_error = |e: &dyn std::fmt::Display| VmError::Memory {
            size: mem_size,
            reason: e.to_string(),
        };
        let mem =
            GuestMemoryMmap::from_ranges(&ram_regions(mem_size)).map_err(|e| memory_error(&e))?;
        Ok(Vm {
            kvm,
            fd,
            mem,
            mem_size,
        })
    }

    /// Starts registering the RAM with KVM on a thread of its own (through
    /// a duplicate of the VM descriptor); the returned handle waits for it.
    pub fn register_memory(&self) -> Result<PendingMemory, VmError> {
        let mem_size = self.mem_size;
        let memory_error = move |e: &dyn std::fmt::Display| VmError::Memory {
            size: mem_size,
            reason: e.to_string(),
        };
        let mut regions = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| memory_error(&e))?;
            regions.push(kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            });
        }
        // SAFETY: dup only reads the descriptor number, owned by `self.fd`.
        let dup = unsafe { libc::dup(self.fd.as_raw_fd()) };
        if dup < 0 {
            return Err(memory_error(&format_args!(
                "dup of the VM descriptor: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `dup` is a new descriptor of this VM that nothing else
        // owns; the VmFd made from it closes it.
        let fd = match unsafe { self.kvm.create_vmfd_from_rawfd(dup) } {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: `dup` is ours and was not taken over by a VmFd.
                unsafe { libc::close(dup) };
                return Err(kvm_err("KVM_GET_VCPU_MMAP_SIZE")(e).into());
            }
        };
        let thread = std::thread::Builder::new()
            .name("memslots".into())
            .spawn(move || {
                for region in regions {
                    // SAFETY: the region is a live mapping owned by the Vm's
                    // `mem`, which outlives this thread (the Vm's owner waits
                    // for it, PendingMemory's drop at the latest) and is kept
                    // (and cloned by every vCPU) for as long as the guest
                    // runs. KVM refuses memory beyond the guest physical
                    // address width.
                    unsafe { fd.set_user_memory_region(region) }.map_err(|e| {
                        memory_error(&format_args!("KVM_SET_USER_MEMORY_REGION: {e}"))
                    })?;
                }
                Ok(())
            })
            .map_err(|e| memory_error(&format_args!("memory registration thread: {e}")))?;
        Ok(PendingMemory {
            thread: Some(thread),
            mem_size,
        })
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

    /// The registration runs beside the caller and is waited for once: a
    /// second wait (or the drop) returns at once, and the registered RAM is
    /// the guest's (KVM accepts a vCPU, and a second slot at the same
    /// address is refused because the first exists).
    #[test]
    fn memory_registered_in_the_background_is_waited_for_once() {
        let vm = Vm::create(16 << 20).expect("VM");
        let mut pending = vm.register_memory().expect("registration");
        pending.wait().expect("registered");
        pending.wait().expect("already waited");
        drop(pending);
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
