//! How the VM ends: the first reason given wins, and the VMM's event loop is
//! woken through an event fd.

use std::io;
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`).
    Reset,
    /// The guest wrote its status to the exit port.
    Status(u8),
    /// The guest kernel panicked; the console's panic line.
    Panic(String),
    /// A vCPU hit a triple fault or another shutdown.
    Shutdown(String),
    /// The VMM could not go on (KVM internal error, failed ioctl, ...).
    Failed(String),
}

impl VmExit {
    /// The process exit status this reason maps to.
    pub fn status(&self) -> u8 {
        match self {
            VmExit::Reset => 0,
            VmExit::Status(status) => *status,
            VmExit::Panic(_) | VmExit::Shutdown(_) | VmExit::Failed(_) => 1,
        }
    }
}

/// Shared by every device and vCPU that may end the VM.
#[derive(Debug)]
pub struct ExitSignal {
    event: EventFd,
    reason: Mutex<Option<VmExit>>,
    panic_line: Mutex<Option<String>>,
}

impl ExitSignal {
    /// A signal with its own (non-blocking) event fd.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            event: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            panic_line: Mutex::new(None),
        })
    }

    /// The event fd that becomes readable once the VM should stop.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Asks the VMM to stop for `reason`, unless a reason was already given.
    pub fn signal(&self, reason: VmExit) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A full counter still wakes the loop; nothing else can be done here.
        let _ = self.event.write(1);
    }

    /// Records that the console printed a kernel panic: the reset that
    /// follows (`panic=-1`) is then reported as the panic.
    pub fn note_panic(&self, line: String) {
        let mut slot = self
            .panic_line
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(line);
    }

    /// The reason the VM stopped, if it has.
    pub fn reason(&self) -> Option<VmExit> {
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let panic = self
            .panic_line
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match (reason, panic) {
            (Some(VmExit::Reset), Some(line)) => Some(VmExit::Panic(line)),
            (reason, _) => reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() -> io::Result<()> {
        let exit = ExitSignal::new()?;
        assert_eq!(exit.reason(), None);
        exit.signal(VmExit::Status(3));
        exit.signal(VmExit::Reset);
        assert_eq!(exit.reason(), Some(VmExit::Status(3)));
        assert_eq!(exit.event().read()?, 2);
        Ok(())
    }

    #[test]
    fn a_reset_after_a_panic_is_the_panic() -> io::Result<()> {
        let exit = ExitSignal::new()?;
        exit.note_panic("Kernel panic - not syncing: boom".into());
        exit.signal(VmExit::Reset);
        let reason = exit.reason();
        assert_eq!(
            reason,
            Some(VmExit::Panic("Kernel panic - not syncing: boom".into()))
        );
        assert_eq!(reason.map(|r| r.status()), Some(1));
        Ok(())
    }
}
