//! Hostile and broken images: each is refused with a clear error, without an
//! allocation proportional to what the file claims, and without a write.

use std::fs;
use std::path::{Path, PathBuf};

use addcow::{create, Access, AddCow, BackingFormat, BackingRef, CreateOptions, Error, Header};

fn make(
    dir: &Path,
    name: &str,
    image: &str,
    backing: Option<(&str, BackingFormat)>,
    size: u64,
) -> PathBuf {
    let path = dir.join(name);
    create(
        &path,
        &CreateOptions {
            image: image.into(),
            backing: backing.map(|(name, format)| BackingRef {
                name: name.into(),
                format,
            }),
            cluster_bits: 12,
            size: Some(size),
        },
    )
    .expect("create");
    path
}

/// Rewrites the header of `path` in place (same cluster size, so same length).
fn rewrite_header(path: &Path, image: &str, backing: Option<(&str, BackingFormat)>) {
    let header = Header::new(
        12,
        Path::new(image),
        backing.map(|(name, format)| BackingRef {
            name: name.into(),
            format,
        }),
    )
    .expect("header");
    let mut bytes = fs::read(path).expect("read");
    let encoded = header.encode().expect("encode");
    bytes[..encoded.len()].copy_from_slice(&encoded);
    fs::write(path, bytes).expect("write");
}

fn open_err(path: &Path) -> Error {
    AddCow::open(path, Access::ReadOnly).expect_err("must be refused")
}

#[test]
fn chain_loop_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    make(
        dir.path(),
        "b.add-cow",
        "b.raw",
        Some(("a.add-cow", BackingFormat::AddCow)),
        1 << 20,
    );
    rewrite_header(&a, "a.raw", Some(("b.add-cow", BackingFormat::AddCow)));
    assert!(
        matches!(open_err(&a), Error::ChainLoop { .. }),
        "{}",
        open_err(&a)
    );
}

#[test]
fn image_that_is_the_addcow_file_itself_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    rewrite_header(&a, "a.add-cow", None);
    let err = open_err(&a);
    assert!(
        matches!(
            err,
            Error::SameFile {
                first: "add-cow file",
                second: "image file",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn image_equal_to_backing_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("base.img"), vec![1u8; 1 << 20]).expect("base");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    rewrite_header(&a, "base.img", Some(("./base.img", BackingFormat::Raw)));
    let err = open_err(&a);
    assert!(
        matches!(
            err,
            Error::SameFile {
                first: "image file",
                second: "backing file",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_huge_bitmap_claim_is_refused_without_allocating_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    // 8 TiB of sparse image file: 2^31 clusters, a 256 MiB bitmap the
    // 8 KiB add-cow file does not have.
    let image = fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("a.raw"))
        .expect("image");
    image.set_len(1 << 43).expect("sparse 8 TiB");
    match open_err(&a) {
        Error::BitmapTruncated { needed, len, .. } => {
            assert_eq!(needed, 1 << 28);
            assert_eq!(len, 8192);
        }
        other => panic!("expected BitmapTruncated, got {other}"),
    }
}

#[test]
fn header_size_past_the_end_of_the_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    let bytes = fs::read(&a).expect("read");
    fs::write(&a, &bytes[..1000]).expect("truncate");
    let err = open_err(&a);
    assert!(
        err.to_string()
            .contains("shorter than the 4096-byte header"),
        "{err}"
    );
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make(dir.path(), "0.add-cow", "0.raw", None, 1 << 16);
    let mut depth = 1;
    let err = loop {
        let below = format!("{}.add-cow", depth - 1);
        let result = create(
            &dir.path().join(format!("{depth}.add-cow")),
            &CreateOptions {
                image: format!("{depth}.raw").into(),
                backing: Some(BackingRef {
                    name: below.into(),
                    format: BackingFormat::AddCow,
                }),
                cluster_bits: 12,
                size: Some(1 << 16),
            },
        );
        match result {
            Ok(()) => depth += 1,
            Err(err) => break err,
        }
        assert!(depth < 40, "no depth limit");
    };
    assert!(matches!(err, Error::ChainTooDeep { max: 16, .. }), "{err}");
    assert_eq!(depth, addcow::MAX_CHAIN_DEPTH + 1);
    // The refused create left nothing behind.
    assert!(!dir.path().join(format!("{depth}.add-cow")).exists());
    assert!(!dir.path().join(format!("{depth}.raw")).exists());
}

#[test]
fn an_add_cow_file_not_padded_to_a_cluster_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 KiB clusters: header 4096, bitmap 32 bytes, file padded to 8192.
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    let bytes = fs::read(&a).expect("read");
    assert_eq!(bytes.len(), 8192);
    // Long enough for the bitmap, but not padded.
    fs::write(&a, &bytes[..4096 + 32]).expect("cut the padding");
    let err = open_err(&a);
    assert!(
        matches!(
            err,
            Error::NotPadded {
                len: 4128,
                cluster_size: 4096,
                ..
            }
        ),
        "{err}"
    );
    let report = addcow::check::check(&a).expect("check runs");
    assert!(!report.is_clean());
}

#[test]
fn missing_backing_file_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("base.img"), vec![1u8; 4096]).expect("base");
    let a = make(
        dir.path(),
        "a.add-cow",
        "a.raw",
        Some(("base.img", BackingFormat::Raw)),
        1 << 20,
    );
    fs::remove_file(dir.path().join("base.img")).expect("remove base");
    let err = open_err(&a);
    assert!(
        err.to_string().contains("base.img") && err.to_string().contains("No such file"),
        "{err}"
    );
}

#[test]
fn writes_stay_inside_the_image_file_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    let before = fs::read(&a).expect("read");
    let disk = AddCow::open(&a, Access::ReadWrite).expect("open");
    for (offset, len) in [((1u64 << 20) - 1, 2usize), (u64::MAX - 1, 4), (1 << 21, 1)] {
        assert!(matches!(
            disk.write_at(&vec![7; len], offset),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(&mut vec![0; len], offset),
            Err(Error::OutOfRange { .. })
        ));
    }
    disk.close().expect("close");
    assert_eq!(
        fs::read(&a).expect("read"),
        before,
        "the add-cow file changed"
    );
    assert_eq!(
        fs::metadata(dir.path().join("a.raw")).expect("stat").len(),
        1 << 20
    );
}

#[test]
fn locks_keep_a_second_writer_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make(dir.path(), "a.add-cow", "a.raw", None, 1 << 20);
    let reader = AddCow::open(&a, Access::ReadOnly).expect("reader");
    let second_reader = AddCow::open(&a, Access::ReadOnly).expect("readers share");
    assert!(matches!(
        AddCow::open(&a, Access::ReadWrite),
        Err(Error::Locked { .. })
    ));
    assert!(matches!(
        reader.write_at(b"x", 0),
        Err(Error::ReadOnly { .. })
    ));
    drop((reader, second_reader));
    let writer = AddCow::open(&a, Access::ReadWrite).expect("writer");
    assert!(matches!(
        AddCow::open(&a, Access::ReadWrite),
        Err(Error::Locked { .. })
    ));
    assert!(matches!(
        AddCow::open(&a, Access::ReadOnly),
        Err(Error::Locked { .. })
    ));
    drop(writer);
}
