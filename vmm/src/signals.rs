//! SIGTERM, SIGHUP, SIGQUIT and SIGINT stop the VM as a guest power-off
//! would: vCPUs stopped and joined, every disk flushed, the terminal
//! restored; vmm then exits with 128 + the signal's number.
//!
//! The signals are blocked in every thread (the mask is set before any
//! thread starts and threads inherit it) and read from a signalfd in the
//! event loop, so no handler runs at an awkward moment.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use devices::exit::{ExitSignal, VmExit};
use event_manager::{EventOps, Events, MutEventSubscriber};
use libc::c_int;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::signal::create_sigset;

/// The signals that stop the VM.
pub const STOP_SIGNALS: [c_int; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT];

/// The stop signals, blocked and readable from a signalfd.
pub struct StopSignals {
    fd: OwnedFd,
    exit: Option<Arc<ExitSignal>>,
}

impl StopSignals {
    /// Blocks the stop signals in the calling thread, and so in every thread
    /// it starts later: call it before any thread starts.
    pub fn block() -> io::Result<StopSignals> {
        let set = create_sigset(&STOP_SIGNALS).map_err(io::Error::from)?;
        // SAFETY: `set` is an initialised signal set; the old mask is not
        // asked for.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: a new descriptor for `set`; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor just opened and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(StopSignals { fd, exit: None })
    }

    /// From now on, a stop signal ends the VM through `exit`.
    pub fn stop_through(&mut self, exit: Arc<ExitSignal>) {
        self.exit = Some(exit);
    }

    /// The next pending stop signal, if any.
    fn next(&self) -> Option<c_int> {
        // SAFETY: plain data; zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
        let size = mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which has them.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::from_mut(&mut info).cast(),
                size,
            )
        };
        (usize::try_from(n) == Ok(size)).then_some(info.ssi_signo as c_int)
    }
}

impl MutEventSubscriber for StopSignals {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.fd, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(signal) = self.next() {
            if let Some(exit) = &self.exit {
                exit.signal(VmExit::Signal(signal));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    #[test]
    fn a_blocked_stop_signal_becomes_the_exit_reason() -> io::Result<()> {
        // Each test runs on a thread of its own: the signals are blocked and
        // sent on this thread only, the rest of the test process is untouched.
        let mut signals = StopSignals::block()?;
        let exit = Arc::new(ExitSignal::new()?);
        signals.stop_through(exit.clone());
        // SAFETY: signals this very thread, where SIGHUP is blocked.
        let sent = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
        assert_eq!(sent, 0);
        assert_eq!(signals.next(), Some(libc::SIGHUP));
        assert_eq!(signals.next(), None);

        // SAFETY: as above, for SIGTERM.
        let sent = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(sent, 0);
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| io::Error::other(e.to_string()))?;
        events.add_subscriber(Arc::new(Mutex::new(signals)));
        events
            .run_with_timeout(1000)
            .map_err(|e| io::Error::other(e.to_string()))?;
        assert_eq!(exit.reason(), Some(VmExit::Signal(libc::SIGTERM)));
        assert_eq!(exit.reason().map(|r| r.status()), Some(143));
        Ok(())
    }
}
