//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! A real-time signal sent to the thread interrupts `KVM_RUN` (which then
//! fails with EINTR). A signal that arrives while the thread is outside the
//! guest would be missed by the next `KVM_RUN`, so its handler also sets
//! `immediate_exit` in the thread's `kvm_run`: that `KVM_RUN` returns EINTR at
//! once, and the thread looks again at why it was kicked. The run loop clears
//! the flag after each EINTR, before looking.

use std::cell::Cell;
use std::io;
use std::ptr;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, while it runs one.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The kick signal: the first real-time signal the C library leaves free.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_signal: c_int, _info: *mut siginfo_t, _context: *mut c_void) {
    let run = KVM_RUN.get();
    if !run.is_null() {
        // SAFETY: `Armed` set this pointer on this thread to the `kvm_run`
        // mapping of the vCPU the thread runs, and clears it before that
        // mapping can go away. The handler interrupts this very thread, so
        // the only other access is the run loop's, which reads the flag
        // through the kernel; a volatile byte store cannot tear.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = *INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    installed.map_err(io::Error::from_raw_os_error)
}

/// While alive, kicks sent to this thread set `immediate_exit` of `fd`.
///
/// Keep it on the thread that runs the vCPU, and drop it before `fd`.
pub struct Armed(());

impl Armed {
    /// Arms kicks for `fd` on the calling thread.
    pub fn new(fd: &mut VcpuFd) -> Armed {
        KVM_RUN.set(ptr::from_mut(fd.get_kvm_run()));
        Armed(())
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        KVM_RUN.set(ptr::null_mut());
    }
}
