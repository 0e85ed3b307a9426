//! `vhost-user-blk`: serves an add-cow or raw disk to a VMM (QEMU, Cloud
//! Hypervisor, crosvm) over a vhost-user socket, with the same virtio-blk
//! request path as vmm's in-process device.

mod backend;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use devices::exit::{ExitSignal, VmExit};
use devices::virtio::block::{DiskBackend, DiskSpec};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use backend::{BlkBackend, RESUME_EVENT};

/// Exit status for bad input: arguments, files.
const EXIT_BAD_INPUT: u8 = 2;

/// Serve a virtio-blk disk (add-cow or raw) over a vhost-user socket.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version, about, long_about = None)]
struct Cli {
    /// The Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
    /// The disk, exactly as vmm's --disk: PATH[,ro][,format=add-cow|raw][,...].
    #[arg(long, value_name = "SPEC")]
    disk: DiskSpec,
    /// Serve the next frontend after one disconnects, instead of exiting.
    #[arg(long)]
    keep_listening: bool,
}

/// Why serving stopped early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot set up the backend: {0}")]
    Setup(std::io::Error),
    #[error("connection: {0}")]
    Connection(vhost_user_backend::Error),
    #[error("flush of {path} failed: {source}")]
    Flush {
        path: PathBuf,
        source: devices::virtio::block::backend::BackendError,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread takes SIGTERM, SIGINT and SIGHUP.
    let signals = match signals::block_termination() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("vhost-user-blk: cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exit = match ExitSignal::new() {
        Ok(exit) => Arc::new(exit),
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let disk: Arc<dyn DiskBackend> = match cli.disk.open(&exit) {
        Ok(disk) => Arc::from(disk),
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let on_stop = {
        let (disk, exit) = (disk.clone(), exit.clone());
        Box::new(move || {
            // The power is gone: this completes the trace, nothing else.
            let _ = disk.flush();
            let status = exit.reason().map_or(1, |reason| {
                if let VmExit::PowerCut { disk, writes } = &reason {
                    eprintln!(
                        "vhost-user-blk: power cut on disk {} after {writes} writes",
                        disk.display()
                    );
                }
                reason.status()
            });
            std::process::exit(i32::from(status));
        })
    };
    let backend = match BlkBackend::new(disk, cli.disk.read_only, cli.disk.serial(), exit, on_stop)
    {
        Ok(backend) => backend,
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let on_signal = backend.clone();
    let path = cli.disk.path.clone();
    signals.spawn_handler(move |signal| {
        let status = match on_signal.flush() {
            Ok(()) => {
                eprintln!("vhost-user-blk: signal {signal}: disk flushed, exiting");
                128 + signal
            }
            Err(e) => {
                eprintln!(
                    "vhost-user-blk: signal {signal}: flush of {} failed: {e}",
                    path.display()
                );
                1
            }
        };
        std::process::exit(status);
    });
    match serve(&cli, &backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-blk: {e}");
            match e {
                ServeError::Listen { .. } => ExitCode::from(EXIT_BAD_INPUT),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Serves one frontend, or one after another with `--keep-listening`,
/// flushing the disk whenever a frontend goes away.
fn serve(cli: &Cli, backend: &BlkBackend) -> Result<(), ServeError> {
    let mut listener = Listener::new(&cli.socket, true).map_err(|source| ServeError::Listen {
        path: cli.socket.clone(),
        source,
    })?;
    eprintln!(
        "vhost-user-blk: serving {} on {}",
        cli.disk.path.display(),
        cli.socket.display()
    );
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-blk".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(ServeError::Daemon)?;
        for handler in daemon.get_epoll_handlers() {
            use std::os::fd::AsRawFd;
            handler
                .register_listener(
                    backend.resume_event().as_raw_fd(),
                    EventSet::IN,
                    u64::from(RESUME_EVENT),
                )
                .map_err(ServeError::Setup)?;
        }
        daemon
            .start(&mut listener)
            .map_err(ServeError::Connection)?;
        eprintln!("vhost-user-blk: frontend connected");
        let result = daemon.wait();
        backend.disconnected();
        let flushed = backend.flush().map_err(|source| ServeError::Flush {
            path: cli.disk.path.clone(),
            source,
        });
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => eprintln!("vhost-user-blk: frontend disconnected"),
            Err(e) => {
                flushed?;
                return Err(ServeError::Connection(e));
            }
        }
        flushed?;
        if !cli.keep_listening {
            return Ok(());
        }
    }
}
