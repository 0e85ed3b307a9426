//! Locks and `fork`: a program that spawns processes from one thread while
//! another opens images (a test harness, a VMM with helpers) must not see its
//! own, already closed, images as "in use". A child holds copies of every
//! descriptor from `fork` until `exec` closes them, and `flock` locks belong
//! to the open file, so for that window a lock outlives its `close`.

use std::fs;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use addcow::{Access, AddCow, CreateOptions};

/// A 1 MiB image without backing, its image file `image` beside it.
fn standalone(image: &str) -> CreateOptions {
    CreateOptions {
        image: image.into(),
        backing: None,
        cluster_bits: 16,
        size: Some(1 << 20),
    }
}

#[test]
fn closed_images_are_not_locked_while_another_thread_spawns_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut spawned = 0u32;
            while !stop.load(Ordering::Relaxed) {
                Command::new("true").status().expect("spawn true");
                spawned += 1;
            }
            spawned
        })
    };
    let mut failures = Vec::new();
    for i in 0..300 {
        let path = dir.path().join(format!("t{i}.add-cow"));
        let created = addcow::create(&path, &standalone(&format!("t{i}.raw")));
        // Create, then open for writing, then for reading: each step closes
        // what the one before locked.
        let result = created
            .and_then(|()| AddCow::open(&path, Access::ReadWrite).map(drop))
            .and_then(|()| AddCow::open(&path, Access::ReadOnly).map(drop))
            .and_then(|()| AddCow::open(&path, Access::ReadWrite).map(drop));
        if let Err(err) = result {
            failures.push(format!("{i}: {err}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let spawned = spawner.join().expect("spawner");
    assert!(spawned > 0, "the spawner never ran");
    assert!(
        failures.is_empty(),
        "{} of 300 failed: {failures:?}",
        failures.len()
    );
}

/// Copies (as `fork` makes them, same open file) of every descriptor this
/// process has open on `path`.
fn copies_of_descriptors_on(path: &Path) -> Vec<OwnedFd> {
    let target = fs::canonicalize(path).expect("canonicalize");
    // Every descriptor found before any is copied: a copy made while the
    // directory is read could take the number of one another thread just
    // closed, be listed later and be copied again.
    let found: Vec<RawFd> = fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            (fs::read_link(entry.path()).ok()? == target).then_some(fd)
        })
        .collect();
    found
        .into_iter()
        .filter_map(|fd| {
            // SAFETY: `fd` is only duplicated here. It named `path` a moment
            // ago, and the caller keeps the image on `path` open (only it has
            // the file open), so the descriptor is still open and still that
            // file.
            unsafe { BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .ok()
        })
        .collect()
}

/// Deterministic form of the race above: a copy of each descriptor of an
/// open image (what a forked child holds) outlives the image's close, and
/// the image opens again for writing at once.
#[test]
fn a_copy_of_a_closed_images_descriptor_does_not_keep_its_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.add-cow");
    addcow::create(&path, &standalone("t.raw")).expect("create");
    let disk = AddCow::open(&path, Access::ReadWrite).expect("open");
    let mut copies = copies_of_descriptors_on(&path);
    copies.extend(copies_of_descriptors_on(&dir.path().join("t.raw")));
    assert_eq!(
        copies.len(),
        2,
        "one descriptor each on the add-cow and image file"
    );
    drop(disk);
    let started = Instant::now();
    let again = AddCow::open(&path, Access::ReadWrite);
    assert!(again.is_ok(), "reopen: {:?}", again.err());
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "the reopen waited {:?} for a lock a closed image kept",
        started.elapsed()
    );
    drop(again);
    drop(copies);
}
