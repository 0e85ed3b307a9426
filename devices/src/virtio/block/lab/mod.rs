//! The I/O lab: optional layers over a [`DiskBackend`] that make a disk
//! misbehave on purpose or show every request, in the manner of QEMU's
//! filter drivers. A disk stacks them as trace → faults → power cut → format
//! backend; a disk without lab options has none of them.
//!
//! - [`trace`]: one JSON line per completed request;
//! - [`faults`]: injected I/O errors on sector ranges and failing flushes;
//! - [`power_cut`]: a volatile write cache that loses power after N writes.
//!
//! Every layer delegates every [`DiskBackend`] method to the disk below it,
//! so that a new trait method is one more delegation in each file. The one
//! exception is the power cut's volatile cache, which must hold copies of
//! the data anyway: its vectored reads and writes are the trait's default,
//! a copy through `read_at`/`write_at`.
//!
//! [`DiskBackend`]: super::backend::DiskBackend

pub mod faults;
pub mod power_cut;
pub mod trace;

#[cfg(test)]
mod tests;

pub use faults::{FaultPlan, Faults, SectorRange};
pub use power_cut::{PowerCut, PowerCutPlan};
pub use trace::Trace;
