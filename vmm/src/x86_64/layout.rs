//! Guest physical memory layout and the E820 map that describes it.
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)          0x0000_a000  PDPT
//! 0x0000_7000  zero page            0x0000_b000  PD (1 GiB in 2 MiB pages)
//! 0x0000_8ff0  boot stack top       0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)      0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  kernel
//! ...          initrd, as high as fits below the MMIO gap
//! 0xc000_0000  MMIO gap: virtio-mmio windows, IOAPIC, LAPIC (to 4 GiB)
//! 0x1_0000_0000 the rest of RAM, if any
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty; the kernel sets its own).
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line passed to the kernel (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// End of low ("real mode") memory.
pub const LOW_MEMORY_END: u64 = 0xa0000;
/// ACPI tables, in the BIOS area where Linux looks for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI tables' area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded, and the start of high memory.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio window; each device takes [`VIRTIO_MMIO_SIZE`] after it.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ given to virtio devices (0-4 are timer, keyboard, cascade, serial).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IRQ the IOAPIC has.
pub const IRQ_MAX: u32 = 23;
/// The serial port's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// The serial port's first I/O port (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of the serial port's I/O ports.
pub const SERIAL_PORTS: u16 = 8;
/// The local APICs' MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// Where one virtio-mmio device sits: its register window and its IRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest physical address of the window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// IOAPIC pin.
    pub irq: u32,
}

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = usable RAM, 2 = reserved.
    pub kind: u32,
}

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// The RAM regions of a guest with `mem_size` bytes: below the MMIO gap, and
/// the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// The E820 map of a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: LOW_MEMORY_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push(E820Entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820_RAM,
    });
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_a_hole_for_the_bios_areas() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x100000,
                size: (256 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn large_guest_splits_around_the_mmio_gap() {
        let mem = 5u64 << 30;
        let regions = ram_regions(mem);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        let map = e820_map(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the EBDA..1 MiB hole is usable, and nothing overlaps the gap.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }
}
