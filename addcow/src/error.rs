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
