//! The PC devices a Linux guest needs to talk and to stop.

mod exit_port;
mod i8042;
mod serial;

pub use exit_port::{ExitPort, EXIT_PORT};
pub use i8042::I8042;
pub use serial::{ConsoleOutput, EventFdTrigger, Serial};
