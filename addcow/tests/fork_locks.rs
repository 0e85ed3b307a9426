//! Locks and `fork`: a program that spawns processes from one thread while
//! another opens images (a test harness, a VMM with helpers) must not see its
//! own, already closed, images as "in use". A child holds copies of every
//! descriptor from `fork` until `exec` closes them, and `flock` locks belong
//! to the open file, so for that window a lock outlives its `close`.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use addcow::{Access, AddCow, CreateOptions};

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
        let created = addcow::create(
            &path,
            &CreateOptions {
                image: format!("t{i}.raw").into(),
                backing: None,
                cluster_bits: 16,
                size: Some(1 << 20),
            },
        );
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
