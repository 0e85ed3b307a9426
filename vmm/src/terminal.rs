//! The host terminal: raw while the guest owns the console, then exactly as
//! it was.
//!
//! Raw here means what Firecracker's console does (no line editing, no echo,
//! no signals from ^C/^\\/^Z, which go to the guest instead). The saved
//! settings are put back as they were, not rebuilt from flags: a terminal
//! that had echo off keeps it off.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A terminal in raw mode, restored on drop.
pub struct RawTerminal<'fd> {
    fd: BorrowedFd<'fd>,
    saved: libc::termios,
}

/// The settings of terminal `fd`.
fn get(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    // SAFETY: plain data, filled in by tcgetattr.
    let mut termios: libc::termios = unsafe { mem::zeroed() };
    // SAFETY: `fd` is open; `termios` is writable and large enough.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(termios)
}

/// Sets the settings of terminal `fd`.
fn set(fd: BorrowedFd<'_>, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: `fd` is open; `termios` is initialised.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<'fd> RawTerminal<'fd> {
    /// Puts terminal `fd` in raw mode; `None` when `fd` is no terminal.
    pub fn enter(fd: BorrowedFd<'fd>) -> Option<RawTerminal<'fd>> {
        let saved = get(fd).ok()?;
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        set(fd, &raw).ok()?;
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal<'_> {
    fn drop(&mut self) {
        // Nothing more can be done about a terminal that went away.
        let _ = set(self.fd, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    fn pty() -> io::Result<(OwnedFd, OwnedFd)> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: the out-pointers are valid; name, termios and size are
        // optional and left out.
        let ret = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened and are owned by us.
        Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
    }

    fn same(a: &libc::termios, b: &libc::termios) -> bool {
        (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
            == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
    }

    #[test]
    fn raw_mode_is_undone_exactly() -> io::Result<()> {
        let (_master, slave) = pty()?;
        // A terminal set up unusually: echo off, ^C on another key.
        let mut before = get(slave.as_fd())?;
        before.c_lflag &= !libc::ECHO;
        before.c_cc[libc::VINTR] = 0x07;
        set(slave.as_fd(), &before)?;
        let before = get(slave.as_fd())?;

        let raw = RawTerminal::enter(slave.as_fd()).ok_or(io::ErrorKind::Other)?;
        let during = get(slave.as_fd())?;
        assert_eq!(during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        drop(raw);
        assert!(
            same(&get(slave.as_fd())?, &before),
            "settings restored as saved"
        );
        Ok(())
    }

    #[test]
    fn a_pipe_is_no_terminal() -> io::Result<()> {
        let (reader, _writer) = io::pipe()?;
        assert!(RawTerminal::enter(reader.as_fd()).is_none());
        Ok(())
    }
}
