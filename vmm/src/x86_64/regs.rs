//! The state a vCPU starts Linux in: 64-bit long mode with an identity-mapped
//! first GiB, a flat GDT, the zero page in RSI (Linux 64-bit boot protocol).

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

/// Errors of vCPU register set-up.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing GDT or page tables into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM vCPU ioctl failed.
    #[error("KVM {ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Not every MSR was accepted.
    #[error("KVM accepted {set} of {wanted} MSRs")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Given.
        wanted: usize,
    },
}

fn kvm(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { ioctl, source }
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit, as the CPU lays it out.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

/// The KVM segment register a GDT entry at `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
            // Page granularity: the limit counts 4 KiB units.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

/// Null, 64-bit code (0x08), data (0x10) and TSS (0x18) descriptors.
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and identity page tables for the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let write = |what, value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|source| RegsError::Memory { what, source })
    };
    for (i, entry) in boot_gdt().iter().enumerate() {
        write("GDT", *entry, GDT_START + 8 * i as u64)?;
    }
    write("IDT", 0, IDT_START)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 present, writable 2 MiB pages.
    write("PML4", PDPTE_START | 0x03, PML4_START)?;
    write("PDPT", PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        write("PD", (i << 21) | 0x83, PDE_START + 8 * i)?;
    }
    Ok(())
}

/// Long mode with paging on, segments from the boot GDT.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let gdt = boot_gdt();
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
}

/// RIP at the kernel's 64-bit entry, RSI at the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// The MSRs of [`super::msrs::boot_msrs`].
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = super::msrs::boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Local APIC: LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let mut set_delivery = |reg: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (dst, src) in raw.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
            *dst = *src as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (dst, src) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    };
    set_delivery(APIC_LVT0, DELIVERY_EXTINT);
    set_delivery(APIC_LVT1, DELIVERY_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_takes_the_boot_msrs() {
        // Needs /dev/kvm, as the end-to-end tests do.
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("VM");
        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("CPUID");
        vcpu.set_cpuid2(&cpuid).expect("set CPUID");
        setup_msrs(&vcpu).expect("MSRs");
        let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: super::super::msrs::MSR_MTRR_DEF_TYPE,
            ..Default::default()
        }])
        .expect("MSR list");
        assert_eq!(vcpu.get_msrs(&mut msrs).expect("get MSRs"), 1);
        // MTRRs enabled, default type write-back, as written.
        assert_eq!(msrs.as_slice()[0].data, 0x806);
    }

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let code = segment(gdt[1], 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.present, code.type_),
            (0x08, 1, 0, 1, 0xb)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xffff_ffff, 1));
        let data = segment(gdt[2], 2);
        assert_eq!(
            (data.selector, data.l, data.db, data.type_),
            (0x10, 0, 1, 0x3)
        );
        assert_eq!(segment(gdt[0], 0).unusable, 1);
        let tss = segment(gdt[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        write_boot_tables(&mem).expect("tables");
        let read = |at: u64| mem.read_obj::<u64>(GuestAddress(at)).expect("read");
        assert_eq!(read(PML4_START), PDPTE_START | 3);
        assert_eq!(read(PDPTE_START), PDE_START | 3);
        for i in [0u64, 1, 255, 511] {
            // Present, writable, 2 MiB page at i * 2 MiB.
            assert_eq!(read(PDE_START + 8 * i), (i << 21) | 0x83);
        }
        assert_eq!(read(GDT_START + 8), boot_gdt()[1]);
    }
}
