//! The ACPI tables that describe the machine to a kernel with ACPI, built
//! with rust-vmm's `acpi_tables`: RSDP → XSDT → FADT (hardware-reduced, with
//! the DSDT) and MADT.
//!
//! - The FADT points the sleep control/status registers and the reset
//!   register at the VMM's power device (`devices::acpi`, I/O ports
//!   0x600-0x602): S5 powers the VM off, the reset value resets it.
//! - The MADT lists every vCPU's local APIC (APIC ID = vCPU index) and the
//!   IOAPIC, whose pins take ISA IRQs one to one, as in the MP table.
//! - The DSDT has the serial port (`PNP0501`), each virtio-mmio device
//!   (`LNRO0005`, its window and edge-triggered IRQ) and `_S5`.
//!
//! The tables live in the BIOS area at 0xE0000, where Linux finds the RSDP
//! by scanning. Kernels without ACPI use the MP table and the
//! `virtio_mmio.device=` command line instead, which are kept: a kernel
//! with ACPI keeps the DSDT's devices and fails to probe the command line's
//! copies of them (`-EBUSY`, harmless).

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi::{
    ACPI_POWER_PORT, RESET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL, SLEEP_STATUS,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    MmioDevice, ACPI_END, ACPI_START, APIC_ADDR, IOAPIC_ADDR, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORTS,
};

const OEM_ID: [u8; 6] = *b"ADDCOW";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: integers are 64-bit.
const DSDT_REVISION: u8 = 2;
/// Tables start on this alignment.
const TABLE_ALIGN: u64 = 16;

/// Errors writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit their area.
    #[error("the ACPI tables take {0} bytes, more than the {max} bytes of their area", max = ACPI_END - ACPI_START)]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(offset: u8) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_POWER_PORT) + u64::from(offset),
    )
}

/// A device's AML: `Device(path) { _HID, _UID, _CRS }`.
fn device(path: &str, hid: &dyn Aml, uid: u32, resources: Vec<&dyn Aml>) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), hid);
    let uid = Name::new(Path::new("_UID"), &uid);
    let crs = ResourceTemplate::new(resources);
    let crs = Name::new(Path::new("_CRS"), &crs);
    aml_bytes(&Device::new(Path::new(path), vec![&hid, &uid, &crs]))
}

/// The DSDT: the serial port, the virtio-mmio devices and `_S5`.
fn dsdt(virtio: &[MmioDevice]) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let serial_io = IO::new(SERIAL_PORT, SERIAL_PORT, 1, SERIAL_PORTS as u8);
    let serial_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1 = EISAName::new("PNP0501");
    table.append_slice(&device(
        "_SB_.COM1",
        &com1,
        0,
        vec![&serial_io, &serial_irq],
    ));
    for (index, dev) in virtio.iter().enumerate() {
        let window = Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = Interrupt::new(true, true, false, false, dev.irq);
        let path = format!("_SB_.V{index:03X}");
        table.append_slice(&device(
            &path,
            &"LNRO0005",
            index as u32,
            vec![&window, &irq],
        ));
    }
    // \_S5: SLP_TYPa, SLP_TYPb, two reserved bytes.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]);
    table.append_slice(&aml_bytes(&Name::new(Path::new("_S5_"), &s5)));
    table.as_slice().to_vec()
}

/// The hardware-reduced FADT with the DSDT at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.reset_reg = io_register(RESET);
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = io_register(SLEEP_CONTROL);
    builder.sleep_status_reg = io_register(SLEEP_STATUS);
    // "KVMKVMKVM": the hypervisor vendor, as the FADT 6.x field allows.
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"KVMKVMKV").into();
    aml_bytes(&builder.finalize())
}

/// The MADT: one enabled local APIC per vCPU, then the IOAPIC.
fn madt(cpus: u8) -> Vec<u8> {
    let mut table = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR),
    );
    for cpu in 0..cpus {
        table.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The IOAPIC's ID follows the CPUs' (as in the MP table); GSIs from 0.
    table.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    aml_bytes(&table)
}

/// Every table of a machine with `cpus` vCPUs and the `virtio` devices,
/// each with the guest address it goes to; the RSDP first, at [`ACPI_START`].
pub fn build(cpus: u8, virtio: &[MmioDevice]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut next = ACPI_START;
    let mut place = |len: usize| {
        let at = next;
        next = (next + len as u64).next_multiple_of(TABLE_ALIGN);
        at
    };
    let rsdp_addr = place(Rsdp::len());
    let dsdt = dsdt(virtio);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (rsdp_addr, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ])
}

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, virtio: &[MmioDevice]) -> Result<(), AcpiError> {
    for (addr, bytes) in build(cpus, virtio)? {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    fn devices(n: u32) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: 0xc000_0000 + u64::from(i) * 0x1000,
                size: 0x1000,
                irq: 5 + i,
            })
            .collect()
    }

    /// Follows the pointers from the RSDP as a kernel does.
    fn table_at(tables: &[(u64, Vec<u8>)], addr: u64) -> &[u8] {
        let found = tables.iter().find(|(at, _)| *at == addr);
        &found.unwrap_or_else(|| panic!("no table at {addr:#x}")).1
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        for (cpus, disks) in [(1u8, 0u32), (2, 1), (8, 19)] {
            let tables = build(cpus, &devices(disks)).expect("tables");
            let (rsdp_addr, rsdp) = &tables[0];
            assert_eq!(*rsdp_addr, ACPI_START);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            for (addr, table) in &tables[1..] {
                assert_eq!(
                    u32_at(table, 4) as usize,
                    table.len(),
                    "length at {addr:#x}"
                );
                assert_eq!(sum(table), 0, "checksum of {:?}", &table[..4]);
                assert!(addr + table.len() as u64 <= ACPI_END);
            }
            let xsdt = table_at(&tables, u64_at(rsdp, 24));
            assert_eq!(&xsdt[..4], b"XSDT");
            let entries: Vec<&[u8]> = xsdt[36..]
                .chunks(8)
                .map(|e| &table_at(&tables, u64_at(e, 0))[..4])
                .collect();
            assert_eq!(entries, [b"FACP", b"APIC"]);

            let fadt = table_at(&tables, u64_at(xsdt, 36));
            let dsdt = table_at(&tables, u64_at(fadt, 140));
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(count(dsdt, b"LNRO0005"), disks as usize);
            assert_eq!(count(dsdt, b"_S5_"), 1);
            assert_eq!(count(dsdt, b"COM1"), 1);

            let madt = table_at(&tables, u64_at(xsdt, 44));
            assert_eq!(u32_at(madt, 36), APIC_ADDR);
            let mut apic_ids = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], usize::from(madt[at + 1]));
                if kind == 0 {
                    assert_eq!(u32_at(madt, at + 4), 1, "local APIC enabled");
                    apic_ids.push(madt[at + 3]);
                } else {
                    assert_eq!((kind, madt[at + 2]), (1, cpus), "IOAPIC after the CPUs");
                    assert_eq!(u32_at(madt, at + 4), IOAPIC_ADDR);
                }
                at += len;
            }
            assert_eq!(apic_ids, (0..cpus).collect::<Vec<_>>());
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_the_power_device() {
        let fadt = fadt(0xe0100);
        const HW_REDUCED: u32 = 1 << 20;
        const RESET_REG_SUP: u32 = 1 << 10;
        let flags = u32_at(&fadt, 112);
        assert_eq!(
            flags & (HW_REDUCED | RESET_REG_SUP),
            HW_REDUCED | RESET_REG_SUP
        );
        // Generic address structures: space 1 (I/O), 8 bits, byte access.
        let gas = |at: usize| (fadt[at], fadt[at + 1], fadt[at + 3], u64_at(&fadt, at + 4));
        let port = |offset: u8| u64::from(ACPI_POWER_PORT) + u64::from(offset);
        assert_eq!(gas(116), (1, 8, 1, port(RESET)), "RESET_REG");
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(
            gas(244),
            (1, 8, 1, port(SLEEP_CONTROL)),
            "SLEEP_CONTROL_REG"
        );
        assert_eq!(gas(256), (1, 8, 1, port(SLEEP_STATUS)), "SLEEP_STATUS_REG");
        assert_eq!(u64_at(&fadt, 140), 0xe0100, "X_DSDT");
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");
    }
}
