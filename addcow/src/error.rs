//! Errors of the add-cow library.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::header::HeaderError;

/// What went wrong with an add-cow image or one of its files.
#[derive(Debug, Error)]
pub enum Error {
    /// A host I/O call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The header breaks a rule of the format.
    #[error("{path}: {source}")]
    Header {
        /// The add-cow file.
        path: PathBuf,
        /// The rule broken.
        #[source]
        source: HeaderError,
    },
    /// The add-cow file is too short for the bitmap its image file needs.
    #[error("{path}: the bitmap needs {needed} bytes from offset {offset} for an image file of {image_size} bytes, but the file is only {len} bytes")]
    BitmapTruncated {
        /// The add-cow file.
        path: PathBuf,
        /// Where the bitmap starts (HEADER_SIZE).
        offset: u64,
        /// Bitmap bytes needed.
        needed: u64,
        /// Length of the add-cow file.
        len: u64,
        /// Length of the image file.
        image_size: u64,
    },
    /// The bitmap an image file of this size needs is larger than the cap.
    #[error("{path}: an image file of {image_size} bytes needs a {needed}-byte bitmap, more than the {max}-byte limit; use larger clusters")]
    BitmapTooLarge {
        /// The add-cow file.
        path: PathBuf,
        /// Bitmap bytes needed.
        needed: u64,
        /// The cap, [`crate::bitmap::MAX_BITMAP_BYTES`].
        max: u64,
        /// Length of the image file.
        image_size: u64,
    },
    /// The bitmaps of a backing chain together are larger than the cap.
    #[error("{path}: the bitmaps of its backing chain need {total} bytes, more than the {max}-byte limit; use larger clusters or a shorter chain")]
    ChainBitmapsTooLarge {
        /// The add-cow file whose bitmap crosses the cap.
        path: PathBuf,
        /// Bitmap bytes of the chain from the top down to this file.
        total: u64,
        /// The cap, [`crate::bitmap::MAX_CHAIN_BITMAP_BYTES`].
        max: u64,
    },
    /// The add-cow file's length is not a multiple of the cluster size.
    #[error("{path}: the add-cow file is {len} bytes, not padded to a multiple of the {cluster_size}-byte cluster")]
    NotPadded {
        /// The add-cow file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A name leads to something that is neither a regular file nor a block device.
    #[error("{path}: is a {kind}, not a regular file or block device")]
    NotAFile {
        /// The path opened.
        path: PathBuf,
        /// What it is ("FIFO", "socket", "directory", "character device", ...).
        kind: &'static str,
    },
    /// A loop device attached to no file (after a reboot, say): it would
    /// read as an empty disk.
    #[error("{path}: loop device attached to no file (losetup it first)")]
    LoopDetached {
        /// The device.
        path: PathBuf,
    },
    /// `create` was asked to write an add-cow file onto a block device,
    /// which cannot be truncated and sized as the file must be.
    #[error("{path}: is a block device; create writes the add-cow file as a regular file")]
    AddCowOnDevice {
        /// The add-cow path given.
        path: PathBuf,
    },
    /// A sync of the image file failed earlier: the host may have dropped
    /// data it had accepted, so no later flush of this open image may succeed.
    #[error("{path}: an earlier sync of the image file failed and writes may have been lost; flushes fail until the image is reopened")]
    SyncFailed {
        /// The image file.
        path: PathBuf,
    },
    /// A file `create` would write is a file of the backing chain.
    #[error("{path}: the {role} to create is {other}, the {other_role} in the backing chain; refusing to change it")]
    InBackingChain {
        /// The file create would write.
        path: PathBuf,
        /// Its role in the new image ("image file" or "add-cow file").
        role: &'static str,
        /// The chain's name for it.
        other: PathBuf,
        /// Its role in the chain.
        other_role: &'static str,
    },
    /// A block device as image file cannot take another size.
    #[error(
        "image file {path} is a block device of {len} bytes; it cannot be resized to {requested}"
    )]
    DeviceSize {
        /// The image file.
        path: PathBuf,
        /// The device's size.
        len: u64,
        /// The size asked for.
        requested: u64,
    },
    /// Another process holds a conflicting lock.
    #[error("{path}: in use by another process (it holds the lock); close it first")]
    Locked {
        /// The locked file.
        path: PathBuf,
    },
    /// Two roles of the same image resolve to the same file.
    #[error("{path}: invalid image: the {first} and the {second} are the same file")]
    SameFile {
        /// The add-cow file.
        path: PathBuf,
        /// One role ("image file", "backing file", "add-cow file", ...).
        first: &'static str,
        /// The other role.
        second: &'static str,
    },
    /// The backing chain comes back to a file already in it.
    #[error("{path}: backing chain loops back to this file")]
    ChainLoop {
        /// The file met twice.
        path: PathBuf,
    },
    /// The backing chain is longer than [`crate::MAX_CHAIN_DEPTH`].
    #[error("{path}: backing chain is deeper than {max} files")]
    ChainTooDeep {
        /// The file at which the limit was reached.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// The backing file is larger than the image file (at create).
    #[error("backing file {backing} is {backing_size} bytes, larger than image file {image} of {image_size} bytes; give a --size of at least {backing_size}")]
    BackingLarger {
        /// The backing file.
        backing: PathBuf,
        /// Its size.
        backing_size: u64,
        /// The image file.
        image: PathBuf,
        /// Its size.
        image_size: u64,
    },
    /// An existing image file is larger than the size asked for (never shrunk).
    #[error("image file {path} is already {len} bytes; add-cow never shrinks it to {requested}")]
    WouldShrink {
        /// The image file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The size asked for.
        requested: u64,
    },
    /// Neither a size nor a backing file to take it from.
    #[error("image file {path} does not exist: give a size or a backing file to size it from")]
    NoSize {
        /// The missing image file.
        path: PathBuf,
    },
    /// The cluster size is not a power of two from 4 KiB to 2 MiB.
    #[error("cluster size {0} is not a power of two from 4 KiB to 2 MiB")]
    ClusterSize(u64),
    /// A file's format is one add-cow cannot use.
    #[error("{path}: format {format} is not supported as a backing file (use raw or add-cow)")]
    UnsupportedFormat {
        /// The file probed.
        path: PathBuf,
        /// The format its magic shows.
        format: &'static str,
    },
    /// An access outside the virtual disk.
    #[error(
        "{path}: access of {len} bytes at offset {offset} is past the end of the {size}-byte disk"
    )]
    OutOfRange {
        /// The add-cow file.
        path: PathBuf,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A piece of an I/O buffer list outside it (a bug of this library:
    /// every caller keeps its ranges inside).
    #[error("buffer range {start}+{len} is outside the I/O buffers")]
    BufferRange {
        /// First byte asked for.
        start: u64,
        /// Length asked for.
        len: u64,
    },
    /// A write to an image opened read-only.
    #[error("{path}: opened read-only")]
    ReadOnly {
        /// The add-cow file.
        path: PathBuf,
    },
}

/// Result of the add-cow library.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a path and an operation to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        })
    }
}
