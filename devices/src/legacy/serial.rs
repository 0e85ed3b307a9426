//! The 8250 UART at 0x3f8 (IRQ 4): the guest's console, on vm-superio.
//!
//! Input is offered to the guest only while its driver listens and only as
//! much as the 64-byte receive FIFO takes; [`Serial::input_ready`] tells the
//! VMM when to offer more, so that nothing the host sends is dropped.
//!
//! The driver listens while the received-data interrupt is enabled (IER
//! bit 0) and the UART is not in loopback (MCR bit 4, which cuts the
//! receiver off the line). Linux enables the interrupt when the port is
//! opened, after the start-up reads that discard whatever the receiver
//! holds. But its probe also sets every IER bit for a moment (the
//! existence test writes 0x0F and then restores IER) and then reads RBR to
//! reset the UART, and the start-up reads RBR twice more: input the VMM
//! put in the FIFO during that moment lost its first three bytes to those
//! reads. So when the driver stops listening, the bytes it has not read
//! are taken back out of the FIFO and held, and they go back in first, in
//! order, when it listens again: no read the guest makes while it does not
//! listen can eat input.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// The panic text of a console line that is the kernel's panic line: the
/// mark at its start, after any printk prefixes (`[    1.234567]`, the
/// caller id `[    T1]`). The same words elsewhere in a line (a command the
/// tty echoes, a log being shown) are no panic.
fn panic_line(line: &[u8]) -> Option<&[u8]> {
    let mut rest = line.trim_ascii_start();
    while let Some(after) = rest.strip_prefix(b"[") {
        let close = after.iter().position(|&b| b == b']')?;
        rest = after[close + 1..].trim_ascii_start();
    }
    rest.starts_with(PANIC_MARK).then_some(rest)
}

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
                if let Some(text) = panic_line(&self.line) {
                    let text = String::from_utf8_lossy(text);
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

/// Tells the VMM when the guest may take more input: it drained the receive
/// FIFO, or its driver began to listen.
#[derive(Debug)]
pub struct InputReady(EventFd);

impl InputReady {
    fn notify(&self) {
        // A full counter is still readable: the wake-up is not lost.
        let _ = self.0.write(1);
    }
}

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.notify();
    }
}

/// The receive buffer (reads) and transmit holding register (writes).
const DATA: u8 = 0;
/// The Interrupt Enable Register, and its received-data-available bit.
const IER: u8 = 1;
const IER_RDA: u8 = 0x01;
/// The Line Control Register, and its divisor-latch bit (IER then holds the
/// divisor's high byte).
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
/// The Modem Control Register, and its loopback bit (the receiver hears
/// only the transmitter, not the line).
const MCR: u8 = 4;
const MCR_LOOP: u8 = 0x10;
/// The Line Status Register, and its data-ready bit.
const LSR: u8 = 5;
const LSR_DR: u8 = 0x01;

/// The serial port as a bus device.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, InputReady, ConsoleOutput>,
    listening: bool,
    /// The received-data interrupt enable (IER bit 0) as last seen with
    /// the divisor latch unselected: while it is selected, offset 1 reads
    /// the divisor, yet MCR (loopback) still changes.
    rx_enabled: bool,
    /// Input the driver had not read when it stopped listening (what was in
    /// the FIFO then); it goes back into the FIFO, before anything newer,
    /// when the driver listens again.
    held: VecDeque<u8>,
}

impl Serial {
    /// A UART raising `irq` and printing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> io::Result<Self> {
        let ready = InputReady(EventFd::new(EFD_NONBLOCK)?);
        Ok(Serial {
            uart: vm_superio::Serial::with_events(EventFdTrigger(irq), ready, out),
            listening: false,
            rx_enabled: false,
            held: VecDeque::new(),
        })
    }

    /// Readable when the guest may take more input than [`Serial::input_room`]
    /// said last time; read it to re-arm.
    pub fn input_ready(&self) -> &EventFd {
        &self.uart.events().0
    }

    /// How many bytes of input the guest can take now: the free room in the
    /// FIFO while its driver listens and nothing held waits to go first,
    /// otherwise none.
    pub fn input_room(&self) -> usize {
        if self.listening && self.held.is_empty() {
            self.uart.fifo_capacity()
        } else {
            0
        }
    }

    /// Feeds host input to the guest; returns how many bytes fitted (at most
    /// [`Serial::input_room`]).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.input_room().min(bytes.len());
        self.push_to_fifo(&bytes[..room])
    }

    /// Puts `bytes` (no more than the FIFO's free room) in the FIFO and
    /// raises the received-data interrupt; returns how many went in (none
    /// in loopback, where the UART drops what it is given).
    fn push_to_fifo(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            // The bytes are in the FIFO even if the interrupt could not be
            // raised (a failed eventfd write): room was checked.
            Err(_) => bytes.len(),
        }
    }

    /// Moves held input into the FIFO, as much as fits, while the driver
    /// listens.
    fn refill(&mut self) {
        if !self.listening || self.held.is_empty() {
            return;
        }
        let n = self.uart.fifo_capacity().min(self.held.len());
        let bytes: Vec<u8> = self.held.iter().take(n).copied().collect();
        let pushed = self.push_to_fifo(&bytes);
        self.held.drain(..pushed);
    }

    /// Follows whether the driver listens: when it starts, what was held
    /// goes back into the FIFO and the VMM is told; when it stops, the bytes
    /// it has not read are taken back out, ahead of anything still held.
    fn track_listening(&mut self) {
        if self.uart.read(LCR) & LCR_DLAB == 0 {
            self.rx_enabled = self.uart.read(IER) & IER_RDA != 0;
        }
        // With the divisor latch selected offset 1 is the divisor, not IER,
        // so the enable last seen stands; loopback is followed either way.
        let listening = self.rx_enabled && self.uart.read(MCR) & MCR_LOOP == 0;
        match (self.listening, listening) {
            (false, true) => {
                self.listening = true;
                self.refill();
                self.uart.events().notify();
            }
            (true, false) => {
                self.listening = false;
                // Offset 0 is the FIFO only with the divisor latch
                // unselected: it is unselected for the drain, then restored.
                let lcr = self.uart.read(LCR);
                if lcr & LCR_DLAB != 0 {
                    let _ = self.uart.write(LCR, lcr & !LCR_DLAB);
                }
                let mut unread = Vec::new();
                while self.uart.read(LSR) & LSR_DR != 0 {
                    unread.push(self.uart.read(DATA));
                }
                if lcr & LCR_DLAB != 0 {
                    let _ = self.uart.write(LCR, lcr);
                }
                for byte in unread.into_iter().rev() {
                    self.held.push_front(byte);
                }
            }
            _ => {}
        }
    }
}

impl ByteRegisters for Serial {
    fn read_register(&mut self, offset: u8) -> u8 {
        let value = self.uart.read(offset);
        if offset == DATA {
            self.refill();
        }
        value
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // A failed console write (closed stdout) must not stop the guest.
        let _ = self.uart.write(offset, value);
        if offset == IER || offset == LCR || offset == MCR {
            self.track_listening();
        }
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
        )?;
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

    /// Why the VM stopped when the guest printed `line` and then reset.
    fn reason_after(line: &[u8]) -> io::Result<Option<crate::exit::VmExit>> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut out = ConsoleOutput::new(Box::new(io::sink()), exit.clone());
        out.write_all(line)?;
        exit.signal(crate::exit::VmExit::Reset);
        Ok(exit.reason())
    }

    /// The kernel prints its panic line at the start of a line (after the
    /// printk timestamp, if any). A user who types or greps for the text
    /// (the tty echoes it on the console) and then reboots did not panic.
    #[test]
    fn the_panic_text_elsewhere_in_a_line_is_no_panic() -> io::Result<()> {
        for line in [
            &b"/ # grep 'Kernel panic - not syncing' /var/log/messages\r\n"[..],
            b"log.txt:3:Kernel panic - not syncing: old\n",
            b"/ # echo Kernel panic - not syncing\n",
        ] {
            let what = String::from_utf8_lossy(line);
            assert_eq!(
                reason_after(line)?,
                Some(crate::exit::VmExit::Reset),
                "{what}"
            );
        }
        // Timestamps and a caller id before it, or none, are still a panic.
        let panic = crate::exit::VmExit::Panic("Kernel panic - not syncing: VFS".into());
        for line in [
            &b"[    1.234567] Kernel panic - not syncing: VFS\r\n"[..],
            b"[    1.2][    T1] Kernel panic - not syncing: VFS\n",
            b"Kernel panic - not syncing: VFS\n",
        ] {
            let what = String::from_utf8_lossy(line);
            assert_eq!(reason_after(line)?, Some(panic.clone()), "{what}");
        }
        Ok(())
    }

    fn listening_serial() -> io::Result<Serial> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut serial = Serial::new(
            EventFd::new(0)?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        )?;
        serial.write(u64::from(IER), &[IER_RDA]);
        Ok(serial)
    }

    #[test]
    fn input_waits_until_the_driver_listens() -> io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut serial = Serial::new(
            EventFd::new(0)?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        )?;
        assert_eq!(serial.input_room(), 0);
        assert_eq!(serial.enqueue_input(b"lost?"), 0);
        assert!(serial.input_ready().read().is_err(), "not ready yet");
        // With the divisor latch open, offset 1 is the divisor, not IER.
        serial.write(u64::from(LCR), &[LCR_DLAB]);
        serial.write(u64::from(IER), &[IER_RDA]);
        assert_eq!(serial.input_room(), 0);
        serial.write(u64::from(LCR), &[0x03]);
        serial.write(u64::from(IER), &[IER_RDA]);
        assert_eq!(serial.input_room(), 64);
        assert_eq!(serial.input_ready().read()?, 1);
        // The console masks IER while it prints: input is held meanwhile.
        serial.write(u64::from(IER), &[0]);
        assert_eq!(serial.input_room(), 0);
        serial.write(u64::from(IER), &[IER_RDA]);
        assert_eq!(serial.input_ready().read()?, 1);
        Ok(())
    }

    #[test]
    fn input_fills_the_fifo_and_a_drained_fifo_asks_for_more() -> io::Result<()> {
        let mut serial = listening_serial()?;
        let _ = serial.input_ready().read();
        let line: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        assert_eq!(serial.enqueue_input(&line), 64);
        assert_eq!(serial.input_room(), 0);
        assert_eq!(serial.enqueue_input(&line[64..]), 0);
        let mut got = Vec::new();
        for _ in 0..64 {
            let mut byte = [0u8];
            serial.read(0, &mut byte);
            got.push(byte[0]);
        }
        assert_eq!(got, line[..64]);
        assert_eq!(
            serial.input_ready().read()?,
            1,
            "drained FIFO wakes the VMM"
        );
        assert_eq!(serial.enqueue_input(&line[64..]), 36);
        Ok(())
    }

    /// One register access of a guest driver.
    #[derive(Clone, Copy)]
    enum Access {
        Read(u8),
        Write(u8, u8),
    }
    use Access::{Read, Write as W};

    /// What Linux 6.1's 8250 driver does to the port from its probe
    /// (`autoconfig`) to the end of the first open (`serial8250_do_startup`
    /// and `set_termios`), register by register, with a console message
    /// printed in between (`serial8250_console_write`).
    const LINUX_PROBE_AND_OPEN: &[Access] = &[
        // autoconfig: the IER existence test sets every enable bit ...
        Read(IER),
        W(IER, 0),
        Read(IER),
        W(IER, 0x0f),
        Read(IER),
        W(IER, 0),
        // ... the loopback test, the EFR and FIFO probes ...
        Read(MCR),
        Read(LCR),
        W(MCR, MCR_LOOP | 0x0a),
        Read(6),
        W(MCR, 0),
        W(LCR, 0xbf),
        W(2, 0),
        W(LCR, 0),
        W(2, 0x01),
        Read(2),
        W(LCR, 0),
        // ... and "reset the UART": clear the FIFOs, read RBR, clear IER.
        W(MCR, 0),
        W(2, 0x07),
        W(2, 0),
        Read(DATA),
        W(IER, 0),
        // A console message: IER saved, masked, restored.
        Read(IER),
        W(IER, 0),
        W(DATA, b'>'),
        Read(LSR),
        W(IER, 0),
        // serial8250_do_startup: clear the FIFOs and the interrupt registers.
        W(2, 0x07),
        W(2, 0),
        Read(LSR),
        Read(DATA),
        Read(2),
        Read(6),
        Read(LSR),
        W(LCR, 0x03),
        W(MCR, 0x0b),
        // The THRE test.
        Read(LSR),
        W(IER, 0x02),
        Read(2),
        W(IER, 0),
        W(IER, 0x02),
        Read(2),
        W(IER, 0),
        W(IER, 0x02),
        Read(LSR),
        Read(2),
        W(IER, 0),
        // "Clear the interrupt registers again for luck".
        Read(LSR),
        Read(DATA),
        Read(2),
        Read(6),
        // set_termios: divisor, FIFOs, then the receive interrupts on.
        W(LCR, LCR_DLAB | 0x03),
        W(DATA, 1),
        W(IER, 0),
        W(LCR, 0x03),
        W(2, 0xc1),
        W(IER, 0x05),
    ];

    /// Replays `accesses` while a VMM offers `input` at every step it may
    /// (the most eager VMM: every race the event loop could win, it wins),
    /// then reads what the guest's interrupt handler would; returns the
    /// bytes the guest read after the replay.
    fn guest_reads(accesses: &[Access], input: &[u8]) -> io::Result<Vec<u8>> {
        let exit = Arc::new(ExitSignal::new()?);
        let mut serial = Serial::new(
            EventFd::new(EFD_NONBLOCK)?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        )?;
        let mut sent = 0;
        let mut offer = |serial: &mut Serial| {
            sent += serial.enqueue_input(&input[sent..]);
        };
        for access in accesses {
            offer(&mut serial);
            match *access {
                Read(offset) => {
                    let mut byte = [0u8];
                    serial.read(u64::from(offset), &mut byte);
                }
                W(offset, value) => serial.write(u64::from(offset), &[value]),
            }
        }
        Ok(read_all(&mut serial, offer))
    }

    /// What the guest reads while the line status shows data, calling
    /// `before_each` (a VMM offering input) before each look.
    fn read_all(serial: &mut Serial, mut before_each: impl FnMut(&mut Serial)) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            before_each(serial);
            let mut byte = [0u8];
            serial.read(u64::from(LSR), &mut byte);
            if byte[0] & LSR_DR == 0 {
                return got;
            }
            serial.read(u64::from(DATA), &mut byte);
            got.push(byte[0]);
        }
    }

    /// The bug: "o hi" reached the shell for "echo hi". Input offered while
    /// the probe's IER test had the receive interrupt on was in the FIFO
    /// when the probe and the start-up read RBR three times.
    #[test]
    fn no_byte_is_lost_to_the_drivers_probe_and_start_up_reads() -> io::Result<()> {
        let script = format!("echo hi\n{}\nreboot -f\n", "x".repeat(100)).into_bytes();
        let got = guest_reads(LINUX_PROBE_AND_OPEN, &script)?;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&script)
        );
        Ok(())
    }

    #[test]
    fn unread_input_is_held_while_the_driver_does_not_listen() -> io::Result<()> {
        let irq = EventFd::new(EFD_NONBLOCK)?;
        let exit = Arc::new(ExitSignal::new()?);
        let mut serial = Serial::new(
            irq.try_clone()?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        )?;
        serial.write(u64::from(IER), &[IER_RDA]);
        assert_eq!(serial.enqueue_input(b"abcdef"), 6);
        let mut byte = [0u8];
        serial.read(u64::from(DATA), &mut byte);
        assert_eq!(byte[0], b'a');
        let _ = irq.read();

        // The console masks IER to print: the rest is held, and reads see
        // no data and take none.
        serial.write(u64::from(IER), &[0]);
        assert_eq!(serial.input_room(), 0);
        serial.read(u64::from(LSR), &mut byte);
        assert_eq!(byte[0] & LSR_DR, 0);
        serial.read(u64::from(DATA), &mut byte);
        assert_eq!(byte[0], 0, "nothing to read while not listening");

        // Restored: the held bytes come back first, with an interrupt.
        serial.write(u64::from(IER), &[IER_RDA]);
        assert_eq!(irq.read()?, 1, "the receive interrupt is raised again");
        assert_eq!(serial.input_room(), 64 - 5);
        assert_eq!(serial.enqueue_input(b"gh"), 2);
        assert_eq!(read_all(&mut serial, |_| {}), b"bcdefgh");
        Ok(())
    }

    /// In loopback the receiver hears the transmitter only: host input
    /// waits, and what the driver sends itself is what it reads back.
    #[test]
    fn loopback_keeps_host_input_out_of_the_fifo() -> io::Result<()> {
        let mut serial = listening_serial()?;
        assert_eq!(serial.enqueue_input(b"host"), 4);
        serial.write(u64::from(MCR), &[MCR_LOOP]);
        assert_eq!(serial.input_room(), 0);
        assert_eq!(serial.enqueue_input(b"more"), 0);
        serial.write(u64::from(DATA), b"L");
        let mut byte = [0u8];
        serial.read(u64::from(DATA), &mut byte);
        assert_eq!(byte[0], b'L');
        serial.read(u64::from(LSR), &mut byte);
        assert_eq!(byte[0] & LSR_DR, 0, "only the looped byte was there");
        serial.write(u64::from(MCR), &[0]);
        let mut got = Vec::new();
        for _ in 0..4 {
            serial.read(u64::from(DATA), &mut byte);
            got.push(byte[0]);
        }
        assert_eq!(got, b"host");
        Ok(())
    }

    /// More held than the FIFO has room for (the driver left its own
    /// loopback bytes in it): the rest follows as the guest reads, before
    /// any newer input.
    #[test]
    fn held_input_that_does_not_fit_follows_as_the_guest_reads() -> io::Result<()> {
        let mut serial = listening_serial()?;
        let line: Vec<u8> = (0..64u8).collect();
        assert_eq!(serial.enqueue_input(&line), 64);
        serial.write(u64::from(MCR), &[MCR_LOOP]);
        for _ in 0..10 {
            serial.write(u64::from(DATA), &[0xee]);
        }
        serial.write(u64::from(MCR), &[0]);
        assert_eq!(serial.input_room(), 0, "held bytes go first");
        let mut offered = false;
        let got = read_all(&mut serial, |serial| {
            // Newer input, offered as soon as the guest can take it.
            if !offered && serial.input_room() >= 3 {
                assert_eq!(serial.enqueue_input(b"new"), 3);
                offered = true;
            }
        });
        assert_eq!(&got[..10], &[0xee; 10]);
        assert_eq!(&got[10..74], &line[..]);
        assert_eq!(&got[74..], b"new");
        assert_eq!(serial.input_room(), 64);
        Ok(())
    }

    /// A driver that turns the receive interrupt, loopback and the divisor
    /// latch on and off at random (never clearing the FIFO, never sending
    /// in loopback) and reads data only when the line status shows some
    /// while it listens: what it reads is the input, in order, no byte lost
    /// or doubled, and it gets all of it once it listens for good.
    #[test]
    fn random_listening_changes_neither_lose_nor_double_input() -> io::Result<()> {
        let input: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        for seed in 1..200u64 {
            let exit = Arc::new(ExitSignal::new()?);
            let mut serial = Serial::new(
                EventFd::new(EFD_NONBLOCK)?,
                ConsoleOutput::new(Box::new(io::sink()), exit),
            )?;
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut ier, mut mcr, mut lcr) = (0u8, 0u8, 0u8);
            let (mut sent, mut got) = (0usize, Vec::new());
            for _ in 0..400 {
                let n = (next() % 40) as usize;
                let end = (sent + n).min(input.len());
                sent += serial.enqueue_input(&input[sent..end]);
                let reg = |serial: &mut Serial, offset: u8| {
                    let mut b = [0u8];
                    serial.read(u64::from(offset), &mut b);
                    b[0]
                };
                match next() % 8 {
                    0 => {
                        let value = (next() % 16) as u8;
                        if lcr & LCR_DLAB == 0 {
                            ier = value;
                            serial.write(u64::from(IER), &[ier]);
                        }
                    }
                    1 => {
                        mcr = if next() % 2 == 0 { MCR_LOOP } else { 0 } | 0x0b;
                        serial.write(u64::from(MCR), &[mcr]);
                    }
                    2 => {
                        lcr = if next() % 3 == 0 { LCR_DLAB } else { 0 } | 0x03;
                        serial.write(u64::from(LCR), &[lcr]);
                    }
                    3 => {
                        // A read of RBR while the driver does not listen
                        // (the probe's and the start-up's).
                        let listens = ier & IER_RDA != 0 && mcr & MCR_LOOP == 0;
                        if lcr & LCR_DLAB != 0 || !listens {
                            let _ = reg(&mut serial, DATA);
                        }
                    }
                    _ => {
                        let listens = ier & IER_RDA != 0 && mcr & MCR_LOOP == 0;
                        if lcr & LCR_DLAB == 0 && listens {
                            while reg(&mut serial, LSR) & LSR_DR != 0 {
                                got.push(reg(&mut serial, DATA));
                            }
                        }
                    }
                }
            }
            // A stray RBR read while not listening must not have eaten any
            // byte: got is a prefix of the input ...
            assert!(got == input[..got.len()], "seed {seed}: lost or doubled");
            // ... and listening for good delivers the rest.
            serial.write(u64::from(LCR), &[0x03]);
            serial.write(u64::from(MCR), &[0x0b]);
            serial.write(u64::from(IER), &[IER_RDA]);
            loop {
                sent += serial.enqueue_input(&input[sent..]);
                let mut b = [0u8];
                serial.read(u64::from(LSR), &mut b);
                if b[0] & LSR_DR == 0 {
                    if sent == input.len() {
                        break;
                    }
                    continue;
                }
                serial.read(u64::from(DATA), &mut b);
                got.push(b[0]);
            }
            assert!(
                got == input,
                "seed {seed}: {} of {} bytes",
                got.len(),
                input.len()
            );
        }
        Ok(())
    }

    /// The bug the random driver found: loopback turned on while the
    /// divisor latch is selected was not seen (IER cannot be read then, so
    /// nothing was looked at), input was still offered, and the UART in
    /// loopback drops what it is given: 'hello' lost its last three bytes.
    #[test]
    fn loopback_turned_on_under_the_divisor_latch_loses_no_input() -> io::Result<()> {
        let mut serial = listening_serial()?;
        assert_eq!(serial.enqueue_input(b"he"), 2);
        serial.write(u64::from(LCR), &[LCR_DLAB | 0x03]);
        serial.write(u64::from(MCR), &[MCR_LOOP | 0x0b]);
        let taken = serial.enqueue_input(b"llo");
        serial.write(u64::from(LCR), &[0x03]);
        serial.write(u64::from(MCR), &[0x0b]);
        let taken = taken + serial.enqueue_input(&b"llo"[taken..]);
        assert_eq!(taken, 3);
        let got = read_all(&mut serial, |_| {});
        assert_eq!(String::from_utf8_lossy(&got), "hello");
        Ok(())
    }
}
