//! virtio-blk: a block device over an add-cow image or a raw file.
//!
//! - [`backend`]: the storage a device serves (add-cow or raw) and how the
//!   format is chosen;
//! - [`config`]: the configuration space (`virtio_blk_config`);
//! - [`request`]: parsing and serving one request (the request path);
//! - [`device`]: the virtio device itself: features, configuration space,
//!   the queue and its notifications;
//! - [`lab`]: optional layers that trace requests, inject errors and cut
//!   the power;
//! - [`spec`]: the `--disk` syntax, and opening a disk with its layers.

pub mod backend;
pub mod config;
pub mod device;
pub mod lab;
pub mod request;
pub mod spec;

pub use backend::{open_disk, DiskBackend, DiskFormat};
pub use device::Block;
pub use spec::{DiskSpec, OpenError, SpecError};
