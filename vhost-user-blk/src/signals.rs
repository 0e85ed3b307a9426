//! SIGTERM, SIGINT and SIGHUP, taken by one thread so that the disk can be
//! flushed before the process exits.

use std::io;

/// The signals that end the backend.
const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The termination signals, blocked in every thread created after
/// [`block_termination`] and waited for by [`Signals::spawn_handler`].
pub struct Signals {
    set: libc::sigset_t,
}

/// Blocks the termination signals in the calling thread (and so in every
/// thread it creates later).
pub fn block_termination() -> io::Result<Signals> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in TERMINATION {
        // SAFETY: `set` is initialized and `signal` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    // SAFETY: `set` is initialized; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Signals { set })
}

impl Signals {
    /// Runs `on_signal` with the number of the first termination signal, on
    /// a thread of its own.
    pub fn spawn_handler(self, on_signal: impl FnOnce(i32) + Send + 'static) {
        let set = self.set;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is an initialized sigset_t and `signal` a
                // valid place for the result.
                if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                    on_signal(signal);
                    return;
                }
            })
            .map(drop)
            .unwrap_or_else(|e| eprintln!("vhost-user-blk: no signal thread: {e}"));
    }
}
