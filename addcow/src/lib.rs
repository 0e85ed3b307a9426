//! add-cow: a copy-on-write disk image format that keeps the guest's data in
//! a plain raw *image file*, the base in a read-only *backing file*, and in a
//! small `.add-cow` file only a header and one bit per cluster saying which
//! of the two holds the cluster's current data.
//!
//! The format, its rules and why it survives a crash are in `FORMAT.md` beside
//! this crate. The modules follow the format's pieces:
//!
//! - [`header`]: the header codec and every rule it must satisfy;
//! - [`bitmap`]: the in-memory COW bitmap and its dirty-chunk write-back;
//! - [`image`]: an open image, its copy-on-write read/write path, flush,
//!   extent map and stream;
//! - [`open`] and [`create`]: files, names, the backing chain and locks;
//! - [`check`]: an offline consistency check;
//! - [`convert`]: the disk flattened into one raw file, copied in the kernel;
//! - [`storage`]: the positioned-I/O seam under all of it;
//! - [`iobuf`]: the scatter/gather buffers its vectored reads and writes take.
//!
//! ```no_run
//! use addcow::{create, Access, AddCow, BackingFormat, BackingRef, CreateOptions};
//! # fn main() -> addcow::Result<()> {
//! create(
//!     "test.add-cow".as_ref(),
//!     &CreateOptions {
//!         image: "test.raw".into(),
//!         backing: Some(BackingRef { name: "base.img".into(), format: BackingFormat::Raw }),
//!         cluster_bits: addcow::header::DEFAULT_CLUSTER_BITS,
//!         size: None,
//!     },
//! )?;
//! let disk = AddCow::open("test.add-cow".as_ref(), Access::ReadWrite)?;
//! disk.write_at(b"hello", 4000)?;
//! disk.flush()?;
//! # Ok(()) }
//! ```

pub mod bitmap;
pub mod check;
pub mod convert;
pub mod create;
pub mod error;
pub mod header;
pub mod image;
pub mod iobuf;
pub mod open;
mod range_lock;
pub mod storage;

pub use create::{cluster_bits_of, create, probe_format, CreateOptions, Probed};
pub use error::{Error, Result};
pub use header::{BackingFormat, BackingRef, Header, HeaderError};
pub use image::{Access, AddCow, Backing, Extent, Source};
pub use iobuf::{IoBufs, IoBufsMut};
pub use open::{lock, open_checked, open_locked, resolve_name, ChainFile, FileId, MAX_CHAIN_DEPTH};
pub use storage::{file_size, FileStorage, Storage};
