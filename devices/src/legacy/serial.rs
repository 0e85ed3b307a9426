//! The 8250 UART at 0x3f8 (IRQ 4): the guest's console, on vm-superio.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::ByteRegisters;
use crate::exit::ExitSignal;

/// Raises an interrupt by writing to an event fd the VMM registered as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: a writer (stdout), watched for the kernel's panic
/// line so that the reset after a panic is reported as one.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit: Arc<ExitSignal>,
}

/// The line prefix the kernel prints when it panics.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept for the panic check.
const MAX_LINE: usize = 512;

impl ConsoleOutput {
    /// Console output to `out`, reporting panics to `exit`.
    pub fn new(out: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        ConsoleOutput {
            out,
            line: Vec::new(),
            exit,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if let Some(at) = self
                    .line
                    .windows(PANIC_MARK.len())
                    .position(|w| w == PANIC_MARK)
                {
                    let text = String::from_utf8_lossy(&self.line[at..]);
                    self.exit.note_panic(text.trim_end().to_string());
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The serial port as a bus device.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
}

impl Serial {
    /// A UART raising `irq` and printing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Feeds host input to the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .unwrap_or_default()
    }
}

impl ByteRegisters for Serial {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // A failed console write (closed stdout) must not stop the guest.
        let _ = self.uart.write(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_spots_a_panic() -> io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let captured = Captured::default();
        let irq = EventFd::new(0)?;
        let mut serial = Serial::new(
            irq,
            ConsoleOutput::new(Box::new(captured.clone()), exit.clone()),
        );
        for &b in b"ok\n[ 1.0] Kernel panic - not syncing: VFS\n" {
            serial.write(0, &[b]);
        }
        assert_eq!(
            captured.0.lock().expect("lock").as_slice(),
            b"ok\n[ 1.0] Kernel panic - not syncing: VFS\n"
        );
        exit.signal(crate::exit::VmExit::Reset);
        assert_eq!(
            exit.reason(),
            Some(crate::exit::VmExit::Panic(
                "Kernel panic - not syncing: VFS".into()
            ))
        );
        Ok(())
    }

    #[test]
    fn input_reaches_the_receive_register() -> io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut serial = Serial::new(
            EventFd::new(0)?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        );
        assert_eq!(serial.enqueue_input(b"hi"), 2);
        let mut byte = [0u8];
        serial.read(0, &mut byte);
        assert_eq!(byte, *b"h");
        Ok(())
    }
}
