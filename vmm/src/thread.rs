//! Threads of the VMM whose end matters to the VM: the reason a thread's
//! body returns goes to the exit signal, and so does its panic, so that a
//! bug on any thread ends the VM with status 1 and the panic's message
//! instead of leaving the main loop waiting.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use devices::exit::{ExitSignal, VmExit};

/// Starts thread `name` running `body`; the reason it returns, or its
/// panic (reported as "`what` panicked: ..."), goes to `exit`.
pub fn spawn(
    name: String,
    what: String,
    exit: Arc<ExitSignal>,
    body: impl FnOnce() -> Option<VmExit> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name).spawn(move || {
        match panic::catch_unwind(AssertUnwindSafe(body)) {
            Ok(Some(reason)) => exit.signal(reason),
            Ok(None) => {}
            Err(payload) => exit.signal(VmExit::Failed(format!(
                "{what} panicked: {}",
                panic_message(payload.as_ref())
            ))),
        }
    })
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_ends_the_vm_with_its_message() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let handle = spawn("vcpu7".into(), "vCPU 7".into(), exit.clone(), || {
            assert_eq!(thread::current().name(), Some("vcpu7"));
            panic!("device exploded at {:#x}", 0x3f8)
        })?;
        assert!(handle.join().is_ok(), "the panic is caught");
        let reason = exit.reason();
        assert_eq!(
            reason,
            Some(VmExit::Failed(
                "vCPU 7 panicked: device exploded at 0x3f8".into()
            ))
        );
        assert_eq!(reason.map(|r| r.status()), Some(1));
        assert_eq!(exit.event().read()?, 1, "the event loop is woken");
        Ok(())
    }

    #[test]
    fn a_thread_reason_reaches_the_exit_signal() -> std::io::Result<()> {
        let exit = Arc::new(ExitSignal::new()?);
        let handle = spawn("vcpu0".into(), "vCPU 0".into(), exit.clone(), || {
            Some(VmExit::Reset)
        })?;
        assert!(handle.join().is_ok());
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        let handle = spawn("vcpu1".into(), "vCPU 1".into(), exit.clone(), || None)?;
        assert!(handle.join().is_ok());
        assert_eq!(exit.reason(), Some(VmExit::Reset), "first reason kept");
        Ok(())
    }

    #[test]
    fn panic_payloads() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&42u32), "(no message)");
    }
}
