//! A test exit port in the manner of QEMU's isa-debug-exit: the byte the
//! guest writes becomes the VMM's exit status (QEMU reports `(byte << 1) | 1`;
//! this VMM reports the byte itself).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// The conventional port, as QEMU's isa-debug-exit uses by default.
pub const EXIT_PORT: u64 = 0xf4;

/// One write-only port.
#[derive(Debug)]
pub struct ExitPort {
    exit: Arc<ExitSignal>,
}

impl ExitPort {
    /// A port that ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        ExitPort { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.exit.signal(VmExit::Status(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_written_is_the_status() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        ExitPort::new(exit.clone()).write(0, &[42]);
        assert_eq!(exit.reason().map(|r| r.status()), Some(42));
        Ok(())
    }
}
