//! Devices of the addcow micro-VMM.
//!
//! Nothing here knows KVM: devices are reached through a [`bus::Bus`] that
//! the VMM's vCPU loop dispatches port and MMIO exits to, and they signal the
//! guest through event file descriptors the VMM has wired to KVM (irqfd,
//! ioeventfd).
//!
//! - [`legacy`]: the 8250 serial console, the i8042 reset line and the exit port;
//! - [`acpi`]: the ACPI sleep and reset registers (power-off and reset);
//! - [`virtio`]: the virtio-mmio transport and the virtio-blk device;
//! - [`exit`]: how any of them (or a vCPU) asks the VMM to stop, and why;
//! - [`log_limit`]: rate-limited log lines for what a guest can repeat.

pub mod acpi;
pub mod bus;
pub mod exit;
pub mod legacy;
pub mod log_limit;
pub mod virtio;
