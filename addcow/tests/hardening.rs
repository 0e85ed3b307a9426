//! Ways to lose data that a new user, a hostile header or a failing disk
//! find (issue 11): the chain is checked before create writes, block devices
//! have sizes, special files are refused at once, a failed image sync stays
//! failed, and an all-allocated image needs no bitmap.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use addcow::{
    create, Access, AddCow, Backing, BackingFormat, BackingRef, CreateOptions, Error, FileStorage,
    Header, Storage,
};

fn options(
    image: &str,
    backing: Option<(&str, BackingFormat)>,
    size: Option<u64>,
) -> CreateOptions {
    CreateOptions {
        image: image.into(),
        backing: backing.map(|(name, format)| BackingRef {
            name: name.into(),
            format,
        }),
        cluster_bits: 12,
        size,
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let len = fs::metadata(&path).expect("stat").len();
            // The big sparse files are compared by size alone.
            let bytes = if len <= 1 << 24 {
                fs::read(&path).expect("read")
            } else {
                Vec::new()
            };
            (path, len, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn create_checks_the_whole_chain_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::write(d.join("base.raw"), pattern(1 << 16, 1)).expect("base");
    create(
        &d.join("mid.add-cow"),
        &options(
            "mid.raw",
            Some(("base.raw", BackingFormat::Raw)),
            Some(1 << 17),
        ),
    )
    .expect("mid");
    create(
        &d.join("top.add-cow"),
        &options(
            "top.raw",
            Some(("mid.add-cow", BackingFormat::AddCow)),
            Some(1 << 18),
        ),
    )
    .expect("top");
    let disk = AddCow::open(&d.join("mid.add-cow"), Access::ReadWrite).expect("open mid");
    disk.write_at(&pattern(5000, 9), 3000).expect("write mid");
    disk.close().expect("close mid");
    let before = snapshot(d);

    // The image file of a lower layer as the new image file: it would grow to 40 GiB.
    let err = create(
        &d.join("x.add-cow"),
        &options(
            "mid.raw",
            Some(("mid.add-cow", BackingFormat::AddCow)),
            Some(40 << 30),
        ),
    )
    .expect_err("mid.raw is in the chain");
    assert!(matches!(err, Error::InBackingChain { .. }), "{err}");
    assert!(err.to_string().contains("mid.raw"), "{err}");
    // A file two layers down, and a hard link to it.
    fs::hard_link(d.join("base.raw"), d.join("link.raw")).expect("link");
    let before_linked = snapshot(d);
    for image in ["base.raw", "link.raw"] {
        let err = create(
            &d.join("x.add-cow"),
            &options(
                image,
                Some(("top.add-cow", BackingFormat::AddCow)),
                Some(40 << 30),
            ),
        )
        .expect_err("base.raw is in the chain");
        assert!(
            matches!(err, Error::InBackingChain { .. }),
            "{image}: {err}"
        );
    }
    // A loop: mid.add-cow rewritten with its child as backing.
    let err = create(
        &d.join("mid.add-cow"),
        &options(
            "mid.raw",
            Some(("top.add-cow", BackingFormat::AddCow)),
            Some(1 << 18),
        ),
    )
    .expect_err("a loop");
    assert!(matches!(err, Error::InBackingChain { .. }), "{err}");
    assert_eq!(
        snapshot(d),
        before_linked,
        "a refused create changed a file"
    );
    fs::remove_file(d.join("link.raw")).expect("unlink");
    assert_eq!(snapshot(d), before);
    // The chain still opens and reads what was written.
    let top = AddCow::open(&d.join("top.add-cow"), Access::ReadOnly).expect("chain intact");
    let mut got = vec![0u8; 5000];
    top.read_at(&mut got, 3000).expect("read");
    assert_eq!(got, pattern(5000, 9));
}

#[test]
fn an_all_allocated_image_opens_without_its_bitmap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::write(d.join("base.img"), pattern(1 << 20, 3)).expect("base");
    let path = d.join("a.add-cow");
    create(
        &path,
        &options("a.raw", Some(("base.img", BackingFormat::Raw)), None),
    )
    .expect("create");
    let disk = AddCow::open(&path, Access::ReadWrite).expect("open");
    disk.stream(|_, _| {}).expect("stream");
    disk.close().expect("close");
    // Grow the image file far past what the bitmap covers (`truncate -s 1G`).
    let image = fs::OpenOptions::new()
        .write(true)
        .open(d.join("a.raw"))
        .expect("image");
    image.set_len(1 << 30).expect("grow");
    drop(image);
    fs::remove_file(d.join("base.img")).expect("the base is no longer needed");
    let disk = AddCow::open(&path, Access::ReadWrite).expect("opens without the bitmap");
    assert_eq!(disk.size(), 1 << 30);
    let mut got = vec![0u8; 1 << 20];
    disk.read_at(&mut got, 0).expect("read");
    assert_eq!(got, pattern(1 << 20, 3));
    disk.write_at(b"tail", (1 << 30) - 4)
        .expect("write the grown part");
    disk.close().expect("close");
    let report = addcow::check::check(&path).expect("check runs");
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn image_name_equal_to_backing_name_is_refused_even_when_all_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::write(d.join("base.img"), pattern(1 << 16, 3)).expect("base");
    let path = d.join("a.add-cow");
    create(&path, &options("a.raw", None, Some(1 << 16))).expect("create");
    let mut header = Header::new(
        12,
        Path::new("base.img"),
        Some(BackingRef {
            name: "./base.img".into(),
            format: BackingFormat::Raw,
        }),
    )
    .expect("header");
    header.compatible_features |= addcow::header::COMPAT_ALL_ALLOCATED;
    let mut bytes = fs::read(&path).expect("read");
    let encoded = header.encode().expect("encode");
    bytes[..encoded.len()].copy_from_slice(&encoded);
    fs::write(&path, bytes).expect("write");
    let err = AddCow::open(&path, Access::ReadOnly).expect_err("same file");
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

/// A file whose sync can be made to fail once the way Linux fails it: the
/// error is reported once, the unsynced data is dropped (it never reaches
/// the disk), and the next sync succeeds.
#[derive(Debug, Clone, Default)]
struct FlakyFile {
    state: Arc<Mutex<FlakyState>>,
}

#[derive(Debug, Default)]
struct FlakyState {
    current: Vec<u8>,
    durable: Vec<u8>,
    fail_next_sync: bool,
}

impl FlakyFile {
    fn new(bytes: Vec<u8>) -> Self {
        let file = FlakyFile::default();
        {
            let mut s = file.state.lock().expect("state");
            s.current = bytes.clone();
            s.durable = bytes;
        }
        file
    }
    fn durable(&self) -> Vec<u8> {
        self.state.lock().expect("state").durable.clone()
    }
    fn fail_next_sync(&self) {
        self.state.lock().expect("state").fail_next_sync = true;
    }
}

impl Storage for FlakyFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().expect("state");
        let src = s
            .current
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("state");
        let end = offset as usize + buf.len();
        if s.current.len() < end {
            s.current.resize(end, 0);
        }
        s.current[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock().expect("state");
        if std::mem::take(&mut s.fail_next_sync) {
            // The pages are clean now, their data lost: the disk keeps the old bytes.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.durable = s.current.clone();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().expect("state").current.len() as u64)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_all_at(&vec![0; len as usize], offset)
    }
}

#[test]
fn a_failed_image_sync_fails_every_later_flush() {
    let header = Header::new(
        12,
        Path::new("t.raw"),
        Some(BackingRef {
            name: "base.img".into(),
            format: BackingFormat::Raw,
        }),
    )
    .expect("header");
    let mut meta = header.encode().expect("encode");
    meta.resize(8192, 0);
    let size = 16 * 4096;
    let meta = FlakyFile::new(meta);
    let image = FlakyFile::new(vec![0xee; size]);
    let base = pattern(size, 5);
    let open = |meta: &FlakyFile, image: &FlakyFile| {
        AddCow::open_storage(
            Path::new("t.add-cow"),
            Box::new(meta.clone()),
            Box::new(image.clone()),
            Some(Backing::Raw {
                storage: Box::new(FlakyFile::new(base.clone())),
                size: size as u64,
                path: "base.img".into(),
            }),
            Access::ReadWrite,
        )
        .expect("open")
    };
    let disk = open(&meta, &image);
    disk.write_at(&[1; 100], 4096 + 10).expect("write");
    image.fail_next_sync();
    assert!(disk.flush().is_err(), "the injected sync error is reported");
    // The retry would succeed at the storage level: it must not be believed.
    for _ in 0..3 {
        let err = disk.flush().expect_err("a later flush must fail too");
        assert!(matches!(err, Error::SyncFailed { .. }), "{err}");
    }
    disk.write_at(&[2; 100], 8 * 4096)
        .expect("writes still go to the image file");
    assert!(disk.flush().is_err());
    assert!(disk.close().is_err());
    assert_eq!(
        &meta.durable()[4096..4098],
        &[0, 0],
        "a bit reached the disk over data that never did"
    );
    // After a power cut the disk reads the base: the write was lost, not corrupted.
    let after = open(
        &FlakyFile::new(meta.durable()),
        &FlakyFile::new(image.durable()),
    );
    let mut got = vec![0u8; size];
    after.read_at(&mut got, 0).expect("read");
    assert_eq!(got, base);
}

/// A loop device over a file, detached on drop.
struct Loop {
    device: PathBuf,
}

impl Loop {
    /// Attaches `file`; `None` (with the reason printed) where losetup cannot run.
    fn attach(file: &Path) -> Option<Loop> {
        let out = match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
        {
            Ok(out) => out,
            Err(err) => {
                eprintln!("SKIPPED: losetup cannot run here: {err}");
                return None;
            }
        };
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup -f --show failed (root and /dev/loop-control needed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { device })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn block_devices_work_as_backing_image_and_raw_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = pattern(1 << 20, 7);
    fs::write(d.join("base.img"), &base).expect("base");
    fs::write(d.join("image.img"), vec![0xee; 2 << 20]).expect("image");
    let Some(base_dev) = Loop::attach(&d.join("base.img")) else {
        return;
    };
    let Some(image_dev) = Loop::attach(&d.join("image.img")) else {
        return;
    };
    // What vmm's `--disk /dev/loopN,format=raw` does: the size comes from the device.
    let raw =
        FileStorage::new(addcow::open_locked(&base_dev.device, Access::ReadOnly).expect("open"));
    assert_eq!(raw.len().expect("size"), 1 << 20);
    drop(raw);

    let path = d.join("t.add-cow");
    create(
        &path,
        &CreateOptions {
            image: image_dev.device.clone(),
            backing: Some(BackingRef {
                name: base_dev.device.clone(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 12,
            size: None,
        },
    )
    .expect("create over two block devices");
    // A block device cannot be resized.
    let err = create(
        &d.join("u.add-cow"),
        &CreateOptions {
            image: image_dev.device.clone(),
            backing: None,
            cluster_bits: 12,
            size: Some(4 << 20),
        },
    )
    .expect_err("resize");
    assert!(matches!(err, Error::DeviceSize { .. }), "{err}");

    let mut model = base.clone();
    model.resize(2 << 20, 0);
    let disk = AddCow::open(&path, Access::ReadWrite).expect("open");
    assert_eq!(disk.size(), 2 << 20);
    let mut got = vec![0u8; 2 << 20];
    disk.read_at(&mut got, 0).expect("read");
    assert!(
        got == model,
        "unallocated clusters do not read the base device"
    );
    let data = pattern(10_000, 0x55);
    disk.write_at(&data, 1_000_000)
        .expect("write across the base's end");
    model[1_000_000..1_010_000].copy_from_slice(&data);
    // Zeroing whole clusters punches (or writes) zeros on the device.
    disk.write_zeroes(8192, 3 * 4096).expect("write zeroes");
    model[8192..8192 + 3 * 4096].fill(0);
    disk.close().expect("close");

    let disk = AddCow::open(&path, Access::ReadOnly).expect("reopen");
    disk.read_at(&mut got, 0).expect("read");
    assert!(got == model, "the merged disk differs from the model");
    drop(disk);
    drop((base_dev, image_dev));
    // The bytes are on the image device's file, whole clusters copied from the base.
    let image = fs::read(d.join("image.img")).expect("image");
    let (first, end) = (
        1_000_000 / 4096 * 4096,
        1_010_000usize.div_ceil(4096) * 4096,
    );
    assert!(image[first..end] == model[first..end]);
    assert_eq!(fs::read(d.join("base.img")).expect("base"), base);
}

#[test]
fn a_loop_device_over_a_chain_file_is_that_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = pattern(1 << 20, 3);
    fs::write(d.join("base.img"), &base).expect("base");
    create(
        &d.join("t.add-cow"),
        &options("t.raw", Some(("base.img", BackingFormat::Raw)), None),
    )
    .expect("create");
    let Some(base_dev) = Loop::attach(&d.join("base.img")) else {
        return;
    };
    let Some(image_dev) = Loop::attach(&d.join("t.raw")) else {
        return;
    };
    let before = snapshot(d);

    // A backing device over the image file: the base would change under
    // every write.
    let err = create(
        &d.join("u.add-cow"),
        &CreateOptions {
            image: d.join("base.img"),
            backing: Some(BackingRef {
                name: base_dev.device.clone(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 12,
            size: None,
        },
    )
    .expect_err("backing device over the image file");
    assert!(
        matches!(err, Error::SameFile { .. } | Error::InBackingChain { .. }),
        "{err}"
    );
    let err = create(
        &d.join("u.add-cow"),
        &CreateOptions {
            image: base_dev.device.clone(),
            backing: Some(BackingRef {
                name: d.join("base.img"),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 12,
            size: None,
        },
    )
    .expect_err("image device over the backing file");
    assert!(matches!(err, Error::SameFile { .. }), "{err}");

    // convert onto a loop device over the image file the source reads.
    let out = Command::new(env!("CARGO_BIN_EXE_addcow"))
        .arg("convert")
        .arg(d.join("t.add-cow"))
        .arg(&image_dev.device)
        .output()
        .expect("run addcow");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A hostile header naming the base's loop device as image file.
    let header = Header::new(
        12,
        &base_dev.device,
        Some(BackingRef {
            name: d.join("base.img"),
            format: BackingFormat::Raw,
        }),
    )
    .expect("header");
    let mut bytes = header.encode().expect("encode");
    bytes.resize(bytes.len().div_ceil(4096) * 4096 + 4096, 0);
    let hostile = tempfile::tempdir().expect("tempdir");
    fs::write(hostile.path().join("h.add-cow"), &bytes).expect("write");
    let err = AddCow::open(&hostile.path().join("h.add-cow"), Access::ReadWrite)
        .expect_err("image device over the backing file");
    assert!(matches!(err, Error::SameFile { .. }), "{err}");
    drop((base_dev, image_dev));
    assert!(snapshot(d) == before, "a file of the chain changed");
}

#[test]
fn create_refuses_a_block_device_as_addcow_file_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::write(d.join("meta.img"), vec![0x77; 1 << 20]).expect("meta");
    fs::write(d.join("t.raw"), pattern(1 << 20, 9)).expect("image");
    let Some(meta_dev) = Loop::attach(&d.join("meta.img")) else {
        return;
    };
    let before = snapshot(d);
    // The add-cow file is truncated and rewritten: a device cannot be.
    let err = create(
        &meta_dev.device,
        &options(&d.join("t.raw").display().to_string(), None, Some(2 << 20)),
    )
    .expect_err("a block device as add-cow file");
    assert!(matches!(err, Error::AddCowOnDevice { .. }), "{err}");
    drop(meta_dev);
    assert!(snapshot(d) == before, "a file changed though create failed");
}

#[test]
fn a_loop_device_attached_to_nothing_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // After a reboot a header's /dev/loopN still opens, as an empty device:
    // unallocated clusters would read (and copy-on-write would keep) zeros.
    let out = match Command::new("losetup").arg("-f").output() {
        Ok(out) if out.status.success() => out,
        _ => {
            eprintln!("SKIPPED: losetup -f cannot run here");
            return;
        }
    };
    let free = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !free.exists() {
        eprintln!("SKIPPED: {} does not exist", free.display());
        return;
    }
    let err = create(
        &d.join("t.add-cow"),
        &CreateOptions {
            image: "t.raw".into(),
            backing: Some(BackingRef {
                name: free.clone(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 12,
            size: Some(1 << 20),
        },
    )
    .expect_err("a detached loop device as backing");
    assert!(matches!(err, Error::LoopDetached { .. }), "{err}");
    assert!(
        err.to_string().contains(&free.display().to_string()),
        "{err}"
    );
    assert!(fs::read_dir(d).expect("dir").next().is_none(), "files left");
}

/// A small tmpfs, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` bytes; `None` (with the reason printed) where mount cannot run.
    fn mount(size: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (root needed)");
            return None;
        }
        Some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn create_on_a_full_disk_leaves_the_image_file_as_it_was() {
    let Some(fs_) = SmallFs::mount(1 << 20) else {
        return;
    };
    let d = fs_.dir.path();
    fs::write(d.join("t.raw"), pattern(64 << 10, 5)).expect("image");
    // Fill the file system: the add-cow file's header cannot be written.
    let filler = fs::File::create(d.join("filler")).expect("filler");
    let mut n = 0u64;
    while std::os::unix::fs::FileExt::write_all_at(&filler, &[0xff; 4096], n).is_ok() {
        n += 4096;
    }
    drop(filler);
    let before = snapshot(d);
    let err = create(&d.join("t.add-cow"), &options("t.raw", None, Some(1 << 30)))
        .expect_err("no space for the add-cow file");
    assert!(err.to_string().contains("No space"), "{err}");
    assert!(
        snapshot(d) == before,
        "the image file changed though create failed"
    );
}
