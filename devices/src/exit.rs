//! How the VM ends: the first reason given wins, and the VMM's event loop is
//! woken through an event fd. vCPUs check [`ExitSignal::is_set`] before
//! every entry into the guest, so that none runs on once a reason is given.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`) or
    /// the ACPI reset register.
    Reset,
    /// The guest powered the machine off (ACPI S5, or every vCPU halted for
    /// good: Linux's `poweroff` and `halt` without ACPI).
    PowerOff,
    /// The VMM received this signal (SIGTERM, SIGHUP, ...).
    Signal(i32),
    /// The guest wrote its status to the exit port.
    Status(u8),
    /// The guest kernel panicked; the console's panic line.
    Panic(String),
    /// A vCPU hit a triple fault or another shutdown.
    Shutdown(String),
    /// The VMM could not go on (KVM internal error, failed ioctl, ...).
    Failed(String),
    /// A disk with `power-cut-after-writes` lost power after that many writes.
    PowerCut {
        /// The disk's path.
        disk: std::path::PathBuf,
        /// Write requests it completed.
        writes: u64,
    },
}

impl VmExit {
    /// The process exit status this reason maps to.
    pub fn status(&self) -> u8 {
        match self {
            VmExit::Reset | VmExit::PowerOff => 0,
            VmExit::Status(status) => *status,
            // 128 + n, as a shell reports a process killed by signal n.
            VmExit::Signal(signal) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
            VmExit::Panic(_) | VmExit::Shutdown(_) | VmExit::Failed(_) => 1,
            VmExit::PowerCut { .. } => 3,
        }
    }

    /// The one line the VMM prints for this reason, if it prints one: none
    /// for a clean end or a status the guest chose.
    pub fn message(&self) -> Option<String> {
        match self {
            VmExit::Reset | VmExit::PowerOff | VmExit::Status(_) => None,
            VmExit::Signal(signal) => Some(format!("stopped by signal {signal}")),
            VmExit::Panic(line) => Some(format!("guest panicked: {line}")),
            VmExit::Shutdown(why) | VmExit::Failed(why) => Some(why.clone()),
            VmExit::PowerCut { disk, writes } => Some(format!(
                "power cut on disk {} after {writes} writes",
                disk.display()
            )),
        }
    }
}

/// Shared by every device and vCPU that may end the VM.
#[derive(Debug)]
pub struct ExitSignal {
    event: EventFd,
    set: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    panic_line: Mutex<Option<String>>,
}

impl ExitSignal {
    /// A signal with its own (non-blocking) event fd.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            event: EventFd::new(EFD_NONBLOCK)?,
            set: AtomicBool::new(false),
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
        self.set.store(true, Ordering::SeqCst);
        // A full counter still wakes the loop; nothing else can be done here.
        let _ = self.event.write(1);
    }

    /// Whether a reason was given: cheap enough to ask before every guest
    /// entry.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
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
        assert!(!exit.is_set());
        exit.signal(VmExit::Status(3));
        assert!(exit.is_set());
        exit.signal(VmExit::Reset);
        assert_eq!(exit.reason(), Some(VmExit::Status(3)));
        assert_eq!(exit.event().read()?, 2);
        Ok(())
    }

    #[test]
    fn statuses_and_messages() {
        let cases = [
            (VmExit::Reset, 0, None),
            (VmExit::PowerOff, 0, None),
            (VmExit::Status(7), 7, None),
            (VmExit::Signal(15), 143, Some("stopped by signal 15")),
            (VmExit::Signal(1), 129, Some("stopped by signal 1")),
            (
                VmExit::Panic("boom".into()),
                1,
                Some("guest panicked: boom"),
            ),
            (VmExit::Failed("KVM_RUN: x".into()), 1, Some("KVM_RUN: x")),
        ];
        for (reason, status, message) in cases {
            assert_eq!(reason.status(), status, "{reason:?}");
            assert_eq!(reason.message().as_deref(), message, "{reason:?}");
        }
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
