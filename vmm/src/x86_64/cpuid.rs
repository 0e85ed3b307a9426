//! The CPUID a vCPU shows: what KVM supports, minus what must stay hidden.
//!
//! On hosts without hardware virtualization (KVM's PVM shadow-paging
//! backend) KVM's instruction emulator fails on some instructions, measured as
//! "KVM internal error. Suberror: 1 / emulation failure": XSAVE/XRSTOR/XSAVES,
//! CMPXCHG16B, POPCNT, CLAC/STAC (SMAP). A guest that sees these features
//! uses them, so they are hidden here, with everything that depends on XSAVE
//! (AVX, AVX-512, AMX, PKU). Some host bits still leak through on such hosts,
//! which is why the guest's command line from `resources/` also carries
//! `clearcpuid=`. The same filter is harmless on hosts with VT-x or AMD-V.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A register of a CPUID leaf and the bits to clear in it.
struct Hide {
    function: u32,
    index: Option<u32>,
    reg: Reg,
    bits: u32,
}

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
    Eax,
}

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

/// Leaf 1 ECX: FMA 12, CX16 13, POPCNT 23, XSAVE 26, OSXSAVE 27, AVX 28, F16C 29.
const LEAF1_ECX: u32 = bits(&[12, 13, 23, 26, 27, 28, 29]);
/// Leaf 7.0 EBX: AVX2 5, AVX512F 16, DQ 17, SMAP 20, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31.
const LEAF7_EBX: u32 = bits(&[5, 16, 17, 20, 21, 26, 27, 28, 30, 31]);
/// Leaf 7.0 ECX: AVX512_VBMI 1, PKU 3, OSPKE 4, VBMI2 6, VAES 9, VPCLMULQDQ 10,
/// VNNI 11, BITALG 12, VPOPCNTDQ 14.
const LEAF7_ECX: u32 = bits(&[1, 3, 4, 6, 9, 10, 11, 12, 14]);
/// Leaf 7.0 EDX: AVX512_4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23,
/// AMX_TILE 24, AMX_INT8 25.
const LEAF7_EDX: u32 = bits(&[2, 3, 8, 22, 23, 24, 25]);
/// Leaf 7.1 EAX: AVX_VNNI 4, AVX512_BF16 5.
const LEAF7_1_EAX: u32 = bits(&[4, 5]);

const HIDDEN: &[Hide] = &[
    Hide {
        function: 1,
        index: None,
        reg: Reg::Ecx,
        bits: LEAF1_ECX,
    },
    Hide {
        function: 7,
        index: Some(0),
        reg: Reg::Ebx,
        bits: LEAF7_EBX,
    },
    Hide {
        function: 7,
        index: Some(0),
        reg: Reg::Ecx,
        bits: LEAF7_ECX,
    },
    Hide {
        function: 7,
        index: Some(0),
        reg: Reg::Edx,
        bits: LEAF7_EDX,
    },
    Hide {
        function: 7,
        index: Some(1),
        reg: Reg::Eax,
        bits: LEAF7_1_EAX,
    },
];

/// Leaf 1 ECX bit 31: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 0xD describes XSAVE state, which is hidden.
const XSAVE_LEAF: u32 = 0xd;

fn reg(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Filters KVM's supported CPUID for vCPU `cpu_id` of `cpu_count`.
pub fn filter(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        for hide in HIDDEN {
            if entry.function == hide.function && hide.index.is_none_or(|i| i == entry.index) {
                *reg(entry, hide.reg) &= !hide.bits;
            }
        }
        match entry.function {
            1 => {
                entry.ecx |= HYPERVISOR_BIT;
                // EBX[31:24] initial APIC ID, [23:16] logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(cpu_count) << 16);
                // EDX bit 28 (HTT): the count in EBX[23:16] is valid.
                entry.edx |= 1 << 28;
            }
            XSAVE_LEAF => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            // Extended topology: EDX is the x2APIC ID.
            0xb | 0x1f => entry.edx = u32::from(cpu_id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn hides_what_the_emulator_cannot_run() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(1, 0),
            leaf(7, 0),
            leaf(7, 1),
            leaf(0xd, 0),
            leaf(0xb, 0),
            leaf(0x8000_0001, 0),
        ])
        .expect("cpuid");
        filter(&mut cpuid, 1, 2);
        let e = cpuid.as_slice();
        for bit in [13, 23, 26, 27, 28] {
            assert_eq!(e[0].ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(e[0].ebx >> 24, 1, "APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical CPUs");
        assert_eq!(e[1].ebx & (1 << 20), 0, "SMAP");
        assert_eq!(e[1].ebx & (1 << 5), 0, "AVX2");
        assert_ne!(e[1].ebx & 1, 0, "FSGSBASE stays");
        assert_eq!(e[2].eax & (1 << 4), 0, "AVX-VNNI");
        assert_eq!(
            (e[3].eax, e[3].ebx, e[3].ecx, e[3].edx),
            (0, 0, 0, 0),
            "XSAVE leaf"
        );
        assert_eq!(e[4].edx, 1, "x2APIC ID");
        assert_eq!(e[5].ecx, u32::MAX, "other leaves untouched");
    }
}
