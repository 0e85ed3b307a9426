//! `vmm`: boot a Linux guest on KVM with a serial console and add-cow disks.

mod cli;
mod config;
mod console;
mod device_manager;
mod event_loop;
mod io_thread;
mod machine;
mod signals;
mod terminal;
mod thread;
mod vcpu;
mod vm;
mod x86_64;

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use clap::Parser;

use cli::Cli;
use machine::Machine;
use signals::StopSignals;
use terminal::RawTerminal;

/// Exit status for bad input: arguments, files, sizes.
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("vmm: {message}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    // Before any thread starts (they inherit the mask), and before the
    // terminal goes raw (so that no signal can leave it so).
    let signals = match StopSignals::block() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("vmm: cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdin = io::stdin();
    let terminal = RawTerminal::enter(stdin.as_fd());
    let result = Machine::new(config).and_then(|machine| machine.run(signals));
    let _ = io::stdout().flush();
    drop(terminal);
    match result {
        Ok(reason) => {
            if let Some(message) = reason.message() {
                eprintln!("vmm: {message}");
            }
            ExitCode::from(reason.status())
        }
        Err(err) => {
            eprintln!("vmm: {err}");
            ExitCode::from(if err.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                1
            })
        }
    }
}
