//! The MSRs a vCPU starts Linux with.
//!
//! Besides the system-call MSRs (cleared) and fast strings, the MTRRs are
//! enabled with write-back as the default type: a guest that finds MTRRs
//! disabled (`IA32_MTRR_DEF_TYPE` = 0, KVM's reset value) treats all memory
//! as uncacheable in its PAT set-up and disables PAT ("MTRRs disabled,
//! disabling PAT"); hardware firmware enables them, and so do Firecracker
//! and QEMU's SeaBIOS.

use kvm_bindings::kvm_msr_entry;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type 6: write-back.
const MTRR_TYPE_WRBACK: u64 = 6;

/// The MSRs every vCPU is given before it first runs.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrrs_are_enabled_write_back() {
        let msrs = boot_msrs();
        let def_type = msrs
            .iter()
            .find(|m| m.index == MSR_MTRR_DEF_TYPE)
            .map(|m| m.data);
        // Enable bit 11, fixed-range MTRRs (bit 10) off, default type WB.
        assert_eq!(def_type, Some(0x806));
        let mut indices: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), msrs.len(), "each MSR once");
    }
}
