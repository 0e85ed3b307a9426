//! The power-management registers of a hardware-reduced ACPI platform: the
//! sleep control and status registers and the reset register that the FADT
//! points the guest at. Writing S5 to the sleep control register powers the
//! VM off; writing the reset value to the reset register resets it. Both end
//! the VM through the exit signal.

use std::sync::Arc;

use crate::bus::ByteRegisters;
use crate::exit::{ExitSignal, VmExit};

/// First I/O port of the registers.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// Number of ports: one byte register each.
pub const ACPI_POWER_PORTS: u16 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u8 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u8 = 1;
/// Offset of the reset register.
pub const RESET: u8 = 2;
/// The SLP_TYP value the DSDT's `_S5` package gives for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;

/// Sleep control register: SLP_TYPx in bits 4:2, SLP_EN in bit 5 (ACPI 6.5, 4.8.3.7).
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_ENABLE: u8 = 1 << 5;

/// The sleep and reset registers of one VM.
pub struct AcpiPower {
    exit: Arc<ExitSignal>,
}

impl AcpiPower {
    /// Registers that end the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPower { exit }
    }
}

impl ByteRegisters for AcpiPower {
    fn read_register(&mut self, _offset: u8) -> u8 {
        // Sleep status: WAK_STS (bit 7) stays clear, the VM never wakes from
        // a sleep it does not offer; the other registers read as zero.
        0
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        match offset {
            SLEEP_CONTROL
                if value & SLEEP_ENABLE != 0
                    && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE =>
            {
                self.exit.signal(VmExit::PowerOff);
            }
            RESET if value == RESET_VALUE => self.exit.signal(VmExit::Reset),
            // Other sleep types are not offered, and writing WAK_STS to
            // clear it changes nothing.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn device() -> std::io::Result<(AcpiPower, Arc<ExitSignal>)> {
        let exit = Arc::new(ExitSignal::new()?);
        Ok((AcpiPower::new(exit.clone()), exit))
    }

    #[test]
    fn s5_with_sleep_enable_powers_off() -> std::io::Result<()> {
        let (mut dev, exit) = device()?;
        // What Linux writes first (clear WAK_STS), then S5 without SLP_EN,
        // then another sleep type: none of them ends the VM.
        dev.write(u64::from(SLEEP_STATUS), &[0x80]);
        dev.write(u64::from(SLEEP_CONTROL), &[S5_SLEEP_TYPE << 2]);
        dev.write(u64::from(SLEEP_CONTROL), &[(3 << 2) | SLEEP_ENABLE]);
        assert_eq!(exit.reason(), None);
        // acpi_hw_extended_sleep(): (SLP_TYP << 2) | SLP_EN.
        dev.write(u64::from(SLEEP_CONTROL), &[(S5_SLEEP_TYPE << 2) | 0x20]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
        assert_eq!(exit.reason().map(|r| r.status()), Some(0));
        Ok(())
    }

    #[test]
    fn the_reset_value_resets() -> std::io::Result<()> {
        let (mut dev, exit) = device()?;
        dev.write(u64::from(RESET), &[RESET_VALUE + 1]);
        // Wider accesses are not the byte registers the FADT describes.
        dev.write(u64::from(RESET), &[RESET_VALUE, 0]);
        assert_eq!(exit.reason(), None);
        let mut status = [0xffu8];
        dev.read(u64::from(SLEEP_STATUS), &mut status);
        assert_eq!(status, [0]);
        dev.write(u64::from(RESET), &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        Ok(())
    }
}
