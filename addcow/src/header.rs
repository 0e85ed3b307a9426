//! The add-cow header: its byte layout, its rules, and their errors.
//!
//! The header is the first `HEADER_SIZE` bytes of an add-cow file: a 76-byte
//! fixed part, then the backing and image file names, zeros everywhere else.
//! [`Header::decode`] checks every rule of the format text and of our decisions
//! (`FORMAT.md`); [`Header::encode`] writes a header that passes them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The four magic bytes at offset 0.
pub const MAGIC: [u8; 4] = *b"ACOW";
/// Length of the fixed part of the header; names start at or after it.
pub const FIXED_HEADER_LEN: usize = 76;
/// Smallest cluster size: `1 << 12` = 4 KiB.
pub const MIN_CLUSTER_BITS: u32 = 12;
/// Largest cluster size: `1 << 21` = 2 MiB (QEMU's implementation limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Cluster size used when the user names none: 64 KiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Bit 0 of the compatible features: every cluster is in the image file.
pub const COMPAT_ALL_ALLOCATED: u64 = 1;
/// Byte offset of the compatible-features field (rewritten by `stream`).
pub const COMPAT_FEATURES_OFFSET: u64 = 32;

/// Format of the image file; the only one the format allows is raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw file holding the guest's data at the same offsets.
    Raw,
}

impl ImageFormat {
    /// The name stored in the header.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
        }
    }
}

/// Format of the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw file; reads past its end are zeros.
    Raw,
    /// Another add-cow image, whose merged view is the base (a chain).
    AddCow,
}

impl BackingFormat {
    /// The name stored in the header and accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::AddCow => "add-cow",
        }
    }

    /// Parses a stored or user-given format name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(BackingFormat::Raw),
            "add-cow" => Some(BackingFormat::AddCow),
            _ => None,
        }
    }
}

/// The backing file named by a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as stored: relative names resolve against the add-cow file's directory.
    pub name: PathBuf,
    /// How to read it.
    pub format: BackingFormat,
}

/// A header rule that a file breaks.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The file ends before the fixed header or before `HEADER_SIZE`.
    #[error("header: file is {len} bytes, shorter than the {needed}-byte header")]
    Truncated {
        /// Bytes available.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// Bytes 0-3 are not "ACOW".
    #[error("header: magic (bytes 0-3) is {found:02x?}, not \"ACOW\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// cluster_bits outside 12..=21.
    #[error("header: cluster bits (bytes 20-23) is {value}, must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS} (4 KiB to 2 MiB clusters)")]
    ClusterBits {
        /// The value found.
        value: u32,
    },
    /// HEADER_SIZE is not max(4096, cluster size).
    #[error("header: HEADER_SIZE (bytes 40-43) is {value}, must be max(4096, cluster size) = {expected}")]
    HeaderSize {
        /// The value found.
        value: u32,
        /// The only value allowed for this cluster size.
        expected: u32,
    },
    /// An incompatible feature bit this implementation does not know.
    #[error(
        "header: features (bytes 24-31) has unknown incompatible bits {bits:#x}; refusing to open"
    )]
    UnknownFeatures {
        /// The bits set.
        bits: u64,
    },
    /// A name's offset or size breaks a rule.
    #[error("header: {field} {what} is {value}: {rule}")]
    Name {
        /// "backing file name" or "image file name".
        field: &'static str,
        /// "offset" or "size".
        what: &'static str,
        /// The value found.
        value: u64,
        /// The rule it breaks.
        rule: String,
    },
    /// A name holds a NUL byte.
    #[error("header: {field} holds a NUL byte at byte {at}; names must not contain NUL")]
    NulInName {
        /// "backing file name" or "image file name".
        field: &'static str,
        /// Offset of the NUL byte in the header.
        at: u64,
    },
    /// The two names share bytes.
    #[error("header: backing file name (bytes {backing:?}) and image file name (bytes {image:?}) overlap")]
    NamesOverlap {
        /// Byte range of the backing name.
        backing: std::ops::Range<u64>,
        /// Byte range of the image name.
        image: std::ops::Range<u64>,
    },
    /// A format field is not NUL-terminated ASCII padded with zeros.
    #[error("header: {field} (bytes {range}) {rule}")]
    FormatField {
        /// "backing file format" or "image file format".
        field: &'static str,
        /// Byte range of the field.
        range: &'static str,
        /// The rule it breaks.
        rule: String,
    },
    /// The image format is not raw.
    #[error("header: image file format is \"{0}\", only \"raw\" is supported")]
    UnsupportedImageFormat(String),
    /// The backing format is neither raw nor add-cow.
    #[error("header: backing file format is \"{0}\", only \"raw\" and \"add-cow\" are supported")]
    UnsupportedBackingFormat(String),
    /// A byte of the name area that belongs to no name is not zero.
    #[error("header: byte {offset} is {value:#04x}; bytes of the header area outside the file names must be 0")]
    NonZeroPadding {
        /// Offset of the first such byte.
        offset: u64,
        /// Its value.
        value: u8,
    },
}

/// A decoded, valid add-cow header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Compatible features; unknown bits are kept as they are.
    pub compatible_features: u64,
    /// The raw file holding the guest's data.
    pub image_name: PathBuf,
    /// Always raw.
    pub image_format: ImageFormat,
    /// The read-only base, if any.
    pub backing: Option<BackingRef>,
}

/// Byte range of a name inside the header area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameSpan {
    offset: u32,
    size: u32,
}

impl NameSpan {
    fn range(self) -> std::ops::Range<u64> {
        u64::from(self.offset)..u64::from(self.offset) + u64::from(self.size)
    }
}

/// The HEADER_SIZE a file with this cluster size must have.
pub fn header_size_for(cluster_bits: u32) -> u32 {
    (1u32 << cluster_bits).max(4096)
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads the fixed part and returns HEADER_SIZE, after checking the magic,
/// the cluster bits and HEADER_SIZE itself: the caller then knows how many
/// bytes [`Header::decode`] needs, and that it is at most 2 MiB.
pub fn header_size_from_prefix(prefix: &[u8]) -> Result<u32, HeaderError> {
    if prefix.len() < FIXED_HEADER_LEN {
        return Err(HeaderError::Truncated {
            len: prefix.len() as u64,
            needed: FIXED_HEADER_LEN as u64,
        });
    }
    let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
    if magic != MAGIC {
        return Err(HeaderError::BadMagic { found: magic });
    }
    let cluster_bits = le_u32(prefix, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(HeaderError::ClusterBits {
            value: cluster_bits,
        });
    }
    let header_size = le_u32(prefix, 40);
    let expected = header_size_for(cluster_bits);
    if header_size != expected {
        return Err(HeaderError::HeaderSize {
            value: header_size,
            expected,
        });
    }
    Ok(header_size)
}

/// Decodes a NUL-terminated, zero-padded ASCII format field; `None` if empty.
fn decode_format_field(
    bytes: &[u8],
    field: &'static str,
    range: &'static str,
) -> Result<Option<String>, HeaderError> {
    let err = |rule: &str| HeaderError::FormatField {
        field,
        range,
        rule: rule.to_string(),
    };
    let nul = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| err("is not NUL-terminated"))?;
    if bytes[nul..].iter().any(|&b| b != 0) {
        return Err(err("has non-zero bytes after its terminating NUL"));
    }
    let text = &bytes[..nul];
    if !text.iter().all(|b| b.is_ascii_graphic()) {
        return Err(err("is not printable ASCII"));
    }
    if text.is_empty() {
        return Ok(None);
    }
    // Printable ASCII is valid UTF-8.
    Ok(Some(String::from_utf8_lossy(text).into_owned()))
}

/// Checks one name's offset and size against the header size.
fn check_name_span(
    field: &'static str,
    span: NameSpan,
    header_size: u32,
) -> Result<(), HeaderError> {
    let name_err = |what: &'static str, value: u32, rule: String| HeaderError::Name {
        field,
        what,
        value: u64::from(value),
        rule,
    };
    let fixed = FIXED_HEADER_LEN as u32;
    if span.offset < fixed || span.offset > header_size - 2 {
        return Err(name_err(
            "offset",
            span.offset,
            format!(
                "must be between {fixed} and HEADER_SIZE - 2 = {}",
                header_size - 2
            ),
        ));
    }
    if span.size == 0 {
        return Err(name_err(
            "size",
            0,
            "must not be 0 for a present name".into(),
        ));
    }
    if span.size >= header_size - fixed {
        return Err(name_err(
            "size",
            span.size,
            format!(
                "must be less than HEADER_SIZE - 76 = {}",
                header_size - fixed
            ),
        ));
    }
    if u64::from(span.offset) + u64::from(span.size) > u64::from(header_size) {
        return Err(name_err(
            "size",
            span.size,
            format!(
                "offset {} + size must be no more than HEADER_SIZE = {header_size}",
                span.offset
            ),
        ));
    }
    Ok(())
}

fn name_from_bytes(
    field: &'static str,
    span: NameSpan,
    bytes: &[u8],
) -> Result<PathBuf, HeaderError> {
    let name = &bytes[span.range().start as usize..span.range().end as usize];
    if let Some(pos) = name.iter().position(|&b| b == 0) {
        return Err(HeaderError::NulInName {
            field,
            at: u64::from(span.offset) + pos as u64,
        });
    }
    Ok(PathBuf::from(OsStr::from_bytes(name)))
}

impl Header {
    /// The header of a new image; fails if the names do not fit.
    pub fn new(
        cluster_bits: u32,
        image_name: &Path,
        backing: Option<BackingRef>,
    ) -> Result<Header, HeaderError> {
        let header = Header {
            cluster_bits,
            compatible_features: 0,
            image_name: image_name.to_path_buf(),
            image_format: ImageFormat::Raw,
            backing,
        };
        // Encoding then decoding applies every rule to the new header.
        Header::decode(&header.encode()?)?;
        Ok(header)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// HEADER_SIZE: where the bitmap starts.
    pub fn header_size(&self) -> u32 {
        header_size_for(self.cluster_bits)
    }

    /// True when every cluster is in the image file (compatible feature bit 0).
    pub fn all_allocated(&self) -> bool {
        self.compatible_features & COMPAT_ALL_ALLOCATED != 0
    }

    /// Where the names go: the backing name at 76, the image name after it.
    fn spans(&self) -> (Option<NameSpan>, NameSpan) {
        let fixed = FIXED_HEADER_LEN as u32;
        let backing = self.backing.as_ref().map(|b| NameSpan {
            offset: fixed,
            size: b.name.as_os_str().len() as u32,
        });
        let image = NameSpan {
            offset: fixed + backing.map_or(0, |b| b.size),
            size: self.image_name.as_os_str().len() as u32,
        };
        (backing, image)
    }

    /// The HEADER_SIZE bytes of this header.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let header_size = self.header_size();
        let limit = u64::from(header_size) - FIXED_HEADER_LEN as u64;
        let image_len = self.image_name.as_os_str().len() as u64;
        let backing_len = self
            .backing
            .as_ref()
            .map_or(0, |b| b.name.as_os_str().len() as u64);
        if image_len + backing_len >= limit {
            // Blame the longer name: it is the one to shorten.
            let (field, value) = if backing_len > image_len {
                ("backing file name", backing_len)
            } else {
                ("image file name", image_len)
            };
            return Err(HeaderError::Name {
                field,
                what: "size",
                value,
                rule: format!(
                    "the names together ({} bytes) must be shorter than HEADER_SIZE - 76 = {limit}",
                    image_len + backing_len
                ),
            });
        }
        let (backing_span, image_span) = self.spans();
        let mut out = vec![0u8; header_size as usize];
        out[0..4].copy_from_slice(&MAGIC);
        if let (Some(span), Some(backing)) = (backing_span, &self.backing) {
            out[4..8].copy_from_slice(&span.offset.to_le_bytes());
            out[8..12].copy_from_slice(&span.size.to_le_bytes());
            out[span.range().start as usize..span.range().end as usize]
                .copy_from_slice(backing.name.as_os_str().as_bytes());
            let fmt = backing.format.name().as_bytes();
            out[44..44 + fmt.len()].copy_from_slice(fmt);
        }
        out[12..16].copy_from_slice(&image_span.offset.to_le_bytes());
        out[16..20].copy_from_slice(&image_span.size.to_le_bytes());
        out[image_span.range().start as usize..image_span.range().end as usize]
            .copy_from_slice(self.image_name.as_os_str().as_bytes());
        out[20..24].copy_from_slice(&self.cluster_bits.to_le_bytes());
        // Bytes 24-31: no incompatible features.
        out[32..40].copy_from_slice(&self.compatible_features.to_le_bytes());
        out[40..44].copy_from_slice(&header_size.to_le_bytes());
        let fmt = self.image_format.name().as_bytes();
        out[60..60 + fmt.len()].copy_from_slice(fmt);
        Ok(out)
    }

    /// Decodes and validates a header from the first HEADER_SIZE (or more)
    /// bytes of an add-cow file.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let header_size = header_size_from_prefix(bytes)?;
        if bytes.len() < header_size as usize {
            return Err(HeaderError::Truncated {
                len: bytes.len() as u64,
                needed: u64::from(header_size),
            });
        }
        let bytes = &bytes[..header_size as usize];
        let cluster_bits = le_u32(bytes, 20);

        let features = le_u64(bytes, 24);
        if features != 0 {
            return Err(HeaderError::UnknownFeatures { bits: features });
        }
        let compatible_features = le_u64(bytes, 32);

        let backing_format = decode_format_field(&bytes[44..60], "backing file format", "44-59")?;
        let image_format = decode_format_field(&bytes[60..76], "image file format", "60-75")?
            .ok_or_else(|| HeaderError::FormatField {
                field: "image file format",
                range: "60-75",
                rule: "must not be empty".into(),
            })?;
        if image_format != ImageFormat::Raw.name() {
            return Err(HeaderError::UnsupportedImageFormat(image_format));
        }

        let backing_span = NameSpan {
            offset: le_u32(bytes, 4),
            size: le_u32(bytes, 8),
        };
        let image_span = NameSpan {
            offset: le_u32(bytes, 12),
            size: le_u32(bytes, 16),
        };
        let backing = if backing_span.offset == 0 {
            if backing_span.size != 0 {
                return Err(HeaderError::Name {
                    field: "backing file name",
                    what: "size",
                    value: u64::from(backing_span.size),
                    rule: "must be 0 when the backing file name offset is 0".into(),
                });
            }
            if let Some(fmt) = backing_format {
                return Err(HeaderError::FormatField {
                    field: "backing file format",
                    range: "44-59",
                    rule: format!(
                        "is \"{fmt}\" but there is no backing file name; it must be empty"
                    ),
                });
            }
            None
        } else {
            check_name_span("backing file name", backing_span, header_size)?;
            let fmt = backing_format.ok_or_else(|| HeaderError::FormatField {
                field: "backing file format",
                range: "44-59",
                rule: "must not be empty when a backing file name is present".into(),
            })?;
            let format =
                BackingFormat::from_name(&fmt).ok_or(HeaderError::UnsupportedBackingFormat(fmt))?;
            Some((
                backing_span,
                BackingRef {
                    name: name_from_bytes("backing file name", backing_span, bytes)?,
                    format,
                },
            ))
        };
        check_name_span("image file name", image_span, header_size)?;
        if let Some((span, _)) = &backing {
            let (b, i) = (span.range(), image_span.range());
            if b.start < i.end && i.start < b.end {
                return Err(HeaderError::NamesOverlap {
                    backing: b,
                    image: i,
                });
            }
        }
        let image_name = name_from_bytes("image file name", image_span, bytes)?;

        // Everything in 76..HEADER_SIZE that is not a name must be zero.
        let in_name = |at: u64| {
            image_span.range().contains(&at)
                || backing
                    .as_ref()
                    .is_some_and(|(s, _)| s.range().contains(&at))
        };
        if let Some((offset, &value)) = bytes
            .iter()
            .enumerate()
            .skip(FIXED_HEADER_LEN)
            .find(|&(at, &b)| b != 0 && !in_name(at as u64))
        {
            return Err(HeaderError::NonZeroPadding {
                offset: offset as u64,
                value,
            });
        }

        Ok(Header {
            cluster_bits,
            compatible_features,
            image_name,
            image_format: ImageFormat::Raw,
            backing: backing.map(|(_, b)| b),
        })
    }
}

/// The raw fields of a header, as `addcow info` shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RawFields {
    /// Bytes 4-7.
    pub backing_name_offset: u32,
    /// Bytes 8-11.
    pub backing_name_size: u32,
    /// Bytes 12-15.
    pub image_name_offset: u32,
    /// Bytes 16-19.
    pub image_name_size: u32,
    /// Bytes 20-23.
    pub cluster_bits: u32,
    /// Bytes 24-31.
    pub features: u64,
    /// Bytes 32-39.
    pub compatible_features: u64,
    /// Bytes 40-43.
    pub header_size: u32,
}

impl Header {
    /// The stored fields of this header.
    pub fn raw_fields(&self) -> RawFields {
        let (backing, image) = self.spans();
        RawFields {
            backing_name_offset: backing.map_or(0, |s| s.offset),
            backing_name_size: backing.map_or(0, |s| s.size),
            image_name_offset: image.offset,
            image_name_size: image.size,
            cluster_bits: self.cluster_bits,
            features: 0,
            compatible_features: self.compatible_features,
            header_size: self.header_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        Header::new(
            16,
            Path::new("test.raw"),
            Some(BackingRef {
                name: PathBuf::from("base.img"),
                format: BackingFormat::Raw,
            }),
        )
        .and_then(|h| h.encode())
        .expect("sample header encodes")
    }

    fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn golden_bytes_of_a_created_header() {
        let bytes = sample();
        assert_eq!(bytes.len(), 65536);
        let mut expected = vec![0u8; 65536];
        expected[0..4].copy_from_slice(b"ACOW");
        expected[4..8].copy_from_slice(&76u32.to_le_bytes());
        expected[8..12].copy_from_slice(&8u32.to_le_bytes());
        expected[12..16].copy_from_slice(&84u32.to_le_bytes());
        expected[16..20].copy_from_slice(&8u32.to_le_bytes());
        expected[20..24].copy_from_slice(&16u32.to_le_bytes());
        expected[40..44].copy_from_slice(&65536u32.to_le_bytes());
        expected[44..47].copy_from_slice(b"raw");
        expected[60..63].copy_from_slice(b"raw");
        expected[76..84].copy_from_slice(b"base.img");
        expected[84..92].copy_from_slice(b"test.raw");
        assert_eq!(bytes, expected);
        // The same in hex for the fixed part, as a reader would check it by eye.
        let hex: String = bytes[..92].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "41434f574c000000080000005400000008000000100000000000000000000000\
             0000000000000000000001007261770000000000000000000000000072617700\
             00000000000000000000000062617365 2e696d67746573742e726177"
                .replace(' ', "")
        );
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let header = Header::decode(&bytes).expect("valid");
        assert_eq!(header.cluster_bits, 16);
        assert_eq!(header.image_name, PathBuf::from("test.raw"));
        assert_eq!(
            header.backing,
            Some(BackingRef {
                name: "base.img".into(),
                format: BackingFormat::Raw
            })
        );
        assert_eq!(header.encode().expect("encodes"), bytes);
    }

    #[test]
    fn small_clusters_use_a_4k_header() {
        let h = Header::new(12, Path::new("i"), None).expect("valid");
        assert_eq!(h.header_size(), 4096);
        let bytes = h.encode().expect("encodes");
        assert_eq!(bytes.len(), 4096);
        assert_eq!(Header::decode(&bytes), Ok(h));
    }

    #[test]
    fn rejects_truncated() {
        assert!(matches!(
            Header::decode(&sample()[..75]),
            Err(HeaderError::Truncated {
                len: 75,
                needed: 76
            })
        ));
        assert!(matches!(
            Header::decode(&sample()[..4096]),
            Err(HeaderError::Truncated {
                len: 4096,
                needed: 65536
            })
        ));
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = sample();
        b[0..4].copy_from_slice(b"QFI\xfb");
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::BadMagic { .. })
        ));
    }

    #[test]
    fn rejects_cluster_bits_out_of_range() {
        for bits in [0, 11, 22, 63, u32::MAX] {
            let mut b = sample();
            put_u32(&mut b, 20, bits);
            assert_eq!(
                Header::decode(&b),
                Err(HeaderError::ClusterBits { value: bits }),
                "bits {bits}"
            );
        }
    }

    #[test]
    fn rejects_wrong_header_size() {
        let mut b = sample();
        put_u32(&mut b, 40, 4096);
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::HeaderSize {
                value: 4096,
                expected: 65536
            })
        );
    }

    #[test]
    fn rejects_unknown_incompatible_features() {
        let mut b = sample();
        b[24] = 1;
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::UnknownFeatures { bits: 1 })
        );
    }

    #[test]
    fn keeps_unknown_compatible_features() {
        let mut b = sample();
        b[32..40].copy_from_slice(&0x8000_0000_0000_0002u64.to_le_bytes());
        let h = Header::decode(&b).expect("compatible bits are ignored");
        assert_eq!(h.compatible_features, 0x8000_0000_0000_0002);
        assert!(!h.all_allocated());
        assert_eq!(h.encode().expect("encodes"), b);
    }

    fn name_error(b: &[u8]) -> (&'static str, &'static str) {
        match Header::decode(b) {
            Err(HeaderError::Name { field, what, .. }) => (field, what),
            other => panic!("expected a name error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_name_offsets_out_of_range() {
        for (at, field) in [(4, "backing file name"), (12, "image file name")] {
            for offset in [1, 75, 65535, 70000] {
                let mut b = sample();
                put_u32(&mut b, at, offset);
                assert_eq!(name_error(&b), (field, "offset"), "{field} offset {offset}");
            }
        }
        let mut b = sample();
        put_u32(&mut b, 12, 0);
        assert_eq!(name_error(&b), ("image file name", "offset"));
    }

    #[test]
    fn rejects_name_sizes() {
        // Zero size with a non-zero offset.
        let mut b = sample();
        put_u32(&mut b, 8, 0);
        assert_eq!(name_error(&b), ("backing file name", "size"));
        let mut b = sample();
        put_u32(&mut b, 16, 0);
        assert_eq!(name_error(&b), ("image file name", "size"));
        // Size not below HEADER_SIZE - 76.
        let mut b = sample();
        put_u32(&mut b, 16, 65536 - 76);
        assert_eq!(name_error(&b), ("image file name", "size"));
        // Offset + size past HEADER_SIZE.
        let mut b = sample();
        put_u32(&mut b, 12, 65530);
        put_u32(&mut b, 16, 8);
        assert_eq!(name_error(&b), ("image file name", "size"));
        // A backing size without a backing offset.
        let mut b = sample();
        put_u32(&mut b, 4, 0);
        assert_eq!(name_error(&b), ("backing file name", "size"));
    }

    #[test]
    fn rejects_overlapping_names() {
        let mut b = sample();
        put_u32(&mut b, 12, 80); // image name 80..88 overlaps backing 76..84
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::NamesOverlap { .. })
        ));
    }

    #[test]
    fn rejects_nul_inside_a_name() {
        let mut b = sample();
        b[86] = 0;
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::NulInName {
                field: "image file name",
                at: 86
            })
        );
        let message = HeaderError::NulInName {
            field: "image file name",
            at: 86,
        }
        .to_string();
        assert!(!message.contains("offset"), "{message}");
    }

    #[test]
    fn rejects_non_zero_bytes_outside_names() {
        let mut b = sample();
        b[1000] = 7;
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::NonZeroPadding {
                offset: 1000,
                value: 7
            })
        );
    }

    fn format_error(b: &[u8]) -> &'static str {
        match Header::decode(b) {
            Err(HeaderError::FormatField { field, .. }) => field,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_format_fields() {
        // Not NUL-terminated.
        let mut b = sample();
        b[60..76].copy_from_slice(b"rawrawrawrawrawr");
        assert_eq!(format_error(&b), "image file format");
        // Garbage after the NUL.
        let mut b = sample();
        b[70] = b'x';
        assert_eq!(format_error(&b), "image file format");
        // Empty image format.
        let mut b = sample();
        b[60..63].copy_from_slice(&[0, 0, 0]);
        assert_eq!(format_error(&b), "image file format");
        // Not printable.
        let mut b = sample();
        b[44] = 0x80;
        assert_eq!(format_error(&b), "backing file format");
        // Backing name without format.
        let mut b = sample();
        b[44..47].copy_from_slice(&[0, 0, 0]);
        assert_eq!(format_error(&b), "backing file format");
        // Backing format without name.
        let h = Header::new(16, Path::new("i.raw"), None).expect("valid");
        let mut b = h.encode().expect("encodes");
        b[44..47].copy_from_slice(b"raw");
        assert_eq!(format_error(&b), "backing file format");
    }

    #[test]
    fn rejects_unsupported_formats() {
        let mut b = sample();
        b[60..65].copy_from_slice(b"qcow2");
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::UnsupportedImageFormat("qcow2".into()))
        );
        let mut b = sample();
        b[44..48].copy_from_slice(b"vmdk");
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::UnsupportedBackingFormat("vmdk".into()))
        );
    }

    #[test]
    fn names_that_do_not_fit_are_refused_at_creation() {
        let long = "x".repeat(4096);
        assert!(Header::new(12, Path::new(&long), None).is_err());
        assert!(Header::new(16, Path::new(&long), None).is_ok());
    }

    #[test]
    fn the_long_name_is_the_one_blamed() {
        let long = "b".repeat(4096);
        let backing = |name: &str| {
            Some(BackingRef {
                name: name.into(),
                format: BackingFormat::Raw,
            })
        };
        match Header::new(12, Path::new("i.raw"), backing(&long)) {
            Err(HeaderError::Name {
                field, what, value, ..
            }) => {
                assert_eq!((field, what, value), ("backing file name", "size", 4096));
            }
            other => panic!("expected a name error, got {other:?}"),
        }
        match Header::new(12, Path::new(&long), backing("base.img")) {
            Err(HeaderError::Name { field, value, .. }) => {
                assert_eq!((field, value), ("image file name", 4096));
            }
            other => panic!("expected a name error, got {other:?}"),
        }
    }
}
