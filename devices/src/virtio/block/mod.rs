//! virtio-blk: a block device over an add-cow image or a raw file.
//!
//! - [`backend`]: the storage a device serves (add-cow or raw) and how the
//!   format is chosen;
//! - [`request`]: parsing and serving one request (the request path);
//! - [`device`]: the virtio device itself: features, configuration space,
//!   the queue and its notifications.

pub mod backend;
pub mod device;
pub mod request;

pub use backend::{open_disk, DiskBackend, DiskFormat};
pub use device::Block;
