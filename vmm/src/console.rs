//! Standard input to the guest's serial port, without losing a byte.
//!
//! Only as much is read from stdin as the UART's receive FIFO can take while
//! the guest listens ([`Serial::input_room`]); the rest stays in stdin (the
//! pipe or terminal buffers it) until the guest drains the FIFO. Meanwhile
//! stdin is not watched, so that a full FIFO does not spin the event loop;
//! the serial port's "input ready" event resumes it. At the end of input
//! (EOF, or a hang-up once everything before it was read) stdin leaves the
//! loop and the guest keeps running.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, PoisonError};

use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// Largest read: the FIFO's size.
const MAX_READ: usize = 64;
/// Event tokens.
const READY: u32 = 1;
const INPUT: u32 = 2;

/// Where input stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Watched for readability.
    Watched,
    /// Not watched until the guest can take more.
    Paused,
    /// End of input.
    Done,
}

/// Moves bytes from an input (stdin) into the serial port's receive FIFO.
pub struct ConsoleInput<R = File> {
    serial: Arc<Mutex<Serial>>,
    input: R,
    state: Input,
    /// epoll cannot watch the input (a regular file, /dev/null): it is read
    /// whenever the guest is ready instead.
    always_ready: bool,
}

impl ConsoleInput {
    /// Console input from the process's stdin.
    pub fn stdin(serial: Arc<Mutex<Serial>>) -> io::Result<Self> {
        // A descriptor of our own: reads bypass `Stdin`'s buffer, so epoll
        // sees every byte still pending.
        let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        Ok(ConsoleInput::new(serial, input))
    }
}

impl<R: Read + AsRawFd> ConsoleInput<R> {
    /// Console input from `input`.
    pub fn new(serial: Arc<Mutex<Serial>>, input: R) -> Self {
        ConsoleInput {
            serial,
            input,
            state: Input::Paused,
            always_ready: false,
        }
    }

    /// Moves what the guest can take now from the input into the FIFO;
    /// returns the state the input should be in next.
    fn transfer(&mut self) -> Input {
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        let room = serial.input_room().min(MAX_READ);
        if room == 0 {
            return Input::Paused;
        }
        let mut buf = [0u8; MAX_READ];
        loop {
            return match self.input.read(&mut buf[..room]) {
                Ok(0) => Input::Done,
                Ok(n) => {
                    serial.enqueue_input(&buf[..n]);
                    Input::Watched
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Input::Watched,
                // A terminal that hung up (EIO) and the like: no more input.
                Err(_) => Input::Done,
            };
        }
    }

    /// Watches the input or stops watching it, to match `next`.
    fn switch(&mut self, next: Input, ops: &mut EventOps) {
        let events = Events::with_data(&self.input, INPUT, EventSet::IN);
        match (self.state, next) {
            (Input::Watched, Input::Paused | Input::Done) => {
                let _ = ops.remove(events);
            }
            (Input::Paused, Input::Watched) => {
                let _ = ops.add(events);
            }
            _ => {}
        }
        self.state = next;
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for ConsoleInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        let serial = self.serial.clone();
        let serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = ops.add(Events::with_data(serial.input_ready(), READY, EventSet::IN));
        drop(serial);
        if ops
            .add(Events::with_data(&self.input, INPUT, EventSet::IN))
            .is_ok()
        {
            self.state = Input::Watched;
        } else {
            self.always_ready = true;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == READY {
            let _ = self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .input_ready()
                .read();
        }
        let next = match (self.state, events.data()) {
            (Input::Done, _) => return,
            (_, INPUT) => self.transfer(),
            (Input::Paused, _) if self.always_ready => match self.transfer() {
                Input::Done => Input::Done,
                _ => Input::Paused,
            },
            (Input::Paused, _) => Input::Watched,
            (Input::Watched, _) => return,
        };
        self.switch(next, ops);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use devices::bus::BusDevice;
    use devices::exit::ExitSignal;
    use devices::legacy::ConsoleOutput;
    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::event_loop::Subscriber;

    /// A guest that reads the UART whenever it has data.
    fn drain(serial: &Mutex<Serial>, got: &mut Vec<u8>) {
        let mut serial = serial.lock().expect("lock");
        let mut lsr = [0u8];
        loop {
            serial.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut byte = [0u8];
            serial.read(0, &mut byte);
            got.push(byte[0]);
        }
    }

    fn machine() -> io::Result<(Arc<Mutex<Serial>>, EventManager<Subscriber>)> {
        let exit = Arc::new(ExitSignal::new()?);
        let serial = Serial::new(
            EventFd::new(0)?,
            ConsoleOutput::new(Box::new(io::sink()), exit),
        )?;
        let events = EventManager::new().map_err(|e| io::Error::other(e.to_string()))?;
        Ok((Arc::new(Mutex::new(serial)), events))
    }

    #[test]
    fn everything_before_the_hang_up_arrives_in_fifo_sized_pieces() -> io::Result<()> {
        let (serial, mut events) = machine()?;
        let (reader, mut writer) = io::pipe()?;
        let script: Vec<u8> = format!("echo hi\n{}\nreboot -f\n", "x".repeat(150)).into_bytes();
        writer.write_all(&script)?;
        drop(writer); // the hang-up comes with the data
        let input = Arc::new(Mutex::new(ConsoleInput::new(serial.clone(), reader)));
        events.add_subscriber(input.clone());

        // The driver does not listen yet: nothing is taken, nothing spins.
        let run = |events: &mut EventManager<_>| {
            events
                .run_with_timeout(10)
                .map_err(|e| io::Error::other(e.to_string()))
        };
        run(&mut events)?;
        run(&mut events)?;
        assert_eq!(serial.lock().expect("lock").input_room(), 0);
        assert_eq!(input.lock().expect("lock").state, Input::Paused);

        serial.lock().expect("lock").write(1, &[1]); // IER: receive interrupt on
        let mut got = Vec::new();
        for _ in 0..20 {
            run(&mut events)?;
            drain(&serial, &mut got);
        }
        assert_eq!(got, script);
        assert_eq!(input.lock().expect("lock").state, Input::Done);
        Ok(())
    }

    #[test]
    fn an_unwatchable_input_is_read_whenever_the_guest_is_ready() -> io::Result<()> {
        let (serial, mut events) = machine()?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("script");
        let script: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
        std::fs::write(&path, &script)?;
        let input = Arc::new(Mutex::new(ConsoleInput::new(
            serial.clone(),
            File::open(&path)?,
        )));
        events.add_subscriber(input.clone());
        assert!(input.lock().expect("lock").always_ready);
        serial.lock().expect("lock").write(1, &[1]);
        let mut got = Vec::new();
        for _ in 0..10 {
            events
                .run_with_timeout(10)
                .map_err(|e| io::Error::other(e.to_string()))?;
            drain(&serial, &mut got);
        }
        assert_eq!(got, script);
        Ok(())
    }
}
