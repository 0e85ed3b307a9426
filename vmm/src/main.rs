//! `vmm`: boot a Linux guest on KVM with a serial console and add-cow disks.

mod cli;
mod vcpu;
mod vm;
mod x86_64;

use std::io::{self, IsTerminal};
use std::process::ExitCode;

use clap::Parser;
use devices::exit::VmExit;
use vmm_sys_util::terminal::Terminal;

use cli::Cli;
use vm::{Vm, VmError};
use x86_64::boot::BootError;

/// Exit status for bad input: arguments, files, sizes.
const EXIT_BAD_INPUT: u8 = 2;

/// Puts a terminal on stdin into raw mode for the guest, and back on drop.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok().map(|()| RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("vmm: {message}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let terminal = RawTerminal::enter();
    let result = Vm::new(config).and_then(Vm::run);
    drop(terminal);
    match result {
        Ok(VmExit::Reset) => ExitCode::SUCCESS,
        Ok(VmExit::Status(status)) => ExitCode::from(status),
        Ok(reason @ (VmExit::Panic(_) | VmExit::Shutdown(_) | VmExit::Failed(_))) => {
            let text = match &reason {
                VmExit::Panic(line) => format!("guest panicked: {line}"),
                VmExit::Shutdown(why) | VmExit::Failed(why) => why.clone(),
                VmExit::Reset | VmExit::Status(_) => String::new(),
            };
            eprintln!("vmm: {text}");
            ExitCode::from(reason.status())
        }
        Err(err) => {
            eprintln!("vmm: {err}");
            let bad_input = matches!(
                err,
                VmError::Boot(
                    BootError::Read { .. }
                        | BootError::NotAKernel(_)
                        | BootError::NoRoomForInitrd { .. }
                ) | VmError::Disk { .. }
                    | VmError::TooManyDisks(_)
            );
            ExitCode::from(if bad_input { EXIT_BAD_INPUT } else { 1 })
        }
    }
}
