//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA IRQs reach it (MP spec 1.4).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX, LOW_MEMORY_END};

/// Most vCPUs the table (and the EBDA it lives in) holds.
pub const MAX_CPUS: u8 = 32;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Errors writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs: the MP table holds at most {MAX_CPUS}")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)))
}

/// The entries of the configuration table, after its header.
fn entries(cpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = cpus;
    let mut out = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        // Processor: enabled, BSP flag on CPU 0; family 6 signature; FPU|APIC.
        out.extend_from_slice(&[0, cpu, APIC_VERSION, 1 | if cpu == 0 { 2 } else { 0 }]);
        out.extend_from_slice(&0x600u32.to_le_bytes());
        out.extend_from_slice(&0x201u32.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC, enabled.
    out.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    out.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, polarity and trigger as the bus defines.
    for irq in 0..=IRQ_MAX as u8 {
        out.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every CPU.
    out.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (out, count)
}

/// The MP floating pointer and configuration table, as laid at `EBDA_START`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = EBDA_START as u32 + FLOATING_LEN as u32;

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4
    floating[10] = checksum(&floating);

    let (body, count) = entries(cpus);
    let mut table = Vec::with_capacity(HEADER_LEN + body.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec 1.4, checksum later
    table.extend_from_slice(b"ADDCOW  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 6]); // no OEM table
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs into the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    debug_assert!(EBDA_START + bytes.len() as u64 <= LOW_MEMORY_END);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let t = build(cpus).expect("table");
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
            let processors = table[44..].chunks(20).take(cpus as usize);
            for (i, p) in processors.enumerate() {
                assert_eq!((p[0], p[1]), (0, i as u8));
            }
            assert!(EBDA_START + t.len() as u64 <= LOW_MEMORY_END);
        }
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }
}
