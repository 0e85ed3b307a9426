//! The i8042 keyboard controller, reduced to its reset line: Linux's
//! `reboot=k` resets the machine through it, which ends the VM cleanly.

use std::sync::Arc;

use vm_superio::Trigger;

use crate::bus::ByteRegisters;
use crate::exit::{ExitSignal, VmExit};

/// Turns the controller's reset into a VM exit.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.signal(VmExit::Reset);
        Ok(())
    }
}

/// Ports 0x60-0x64 (data at offset 0, command/status at offset 4).
pub struct I8042 {
    controller: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            controller: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.controller.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // Writes other than the reset command only change emulated state.
        let _ = self.controller.write(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn reset_command_ends_the_vm() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut kbd = I8042::new(exit.clone());
        kbd.write(4, &[0x20]); // read command byte: no exit
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[0xfe]); // pulse reset line
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        Ok(())
    }
}
