//! `addcow-bench --scale`: a 1 TiB add-cow disk with 64 KiB clusters (16 M
//! clusters, a 2 MiB bitmap) with some thousands of written runs. Times
//! `addcow info`, `check` and `map --json` under an address-space limit
//! (`prlimit --as`), then a whole-disk DISCARD (`write_zeroes` of every byte)
//! in the library: its CPU time, and the flush that writes the bitmap back.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use addcow::{create, Access, AddCow, BackingFormat, BackingRef, CreateOptions};

use crate::{median, sh, Fail};

/// The virtual disk: 1 TiB.
const DISK: u64 = 1 << 40;
/// Address-space limit for the CLI runs: 256 MiB.
const AS_LIMIT: u64 = 256 << 20;
/// Written runs before the measurements (each one 64 KiB-cluster write,
/// spread over the disk, so `map` has about twice as many extents).
const RUNS: u64 = 4096;

/// CPU time (user + system) this thread has used so far, in seconds.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given and
    // reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `addcow VERB... disk` under the address-space limit; wall seconds
/// and the bytes it printed.
fn cli(addcow: &Path, args: &[&str], disk: &Path) -> Result<(f64, usize), Fail> {
    let start = Instant::now();
    let out = sh(Command::new("prlimit")
        .arg(format!("--as={AS_LIMIT}"))
        .arg(addcow)
        .args(args)
        .arg(disk))?;
    Ok((start.elapsed().as_secs_f64(), out.len()))
}

/// Makes the disk afresh: a 1 TiB sparse image file over a 1 GiB raw
/// backing file (a hole), with [`RUNS`] clusters written across it.
fn make_disk(dir: &Path) -> Result<std::path::PathBuf, Fail> {
    let disk = dir.join("big.add-cow");
    for name in ["big.add-cow", "big.raw", "base.raw"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    File::create(dir.join("base.raw"))?.set_len(1 << 30)?;
    File::create(dir.join("big.raw"))?.set_len(DISK)?;
    create(
        &disk,
        &CreateOptions {
            image: "big.raw".into(),
            backing: Some(BackingRef {
                name: "base.raw".into(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 16,
            size: None,
        },
    )?;
    let image = AddCow::open(&disk, Access::ReadWrite)?;
    let data = vec![0x5au8; 64 << 10];
    for i in 0..RUNS {
        image.write_at(&data, i * (DISK / RUNS) + (i % 7) * (64 << 10))?;
    }
    image.close()?;
    Ok(disk)
}

/// The measurements, `runs` times each (medians), printed as a table.
pub fn run(dir: &Path, runs: usize) -> Result<(), Fail> {
    let addcow = std::env::current_exe()?.with_file_name("addcow");
    if !addcow.exists() {
        return Err(format!("{} missing: build the addcow binary too", addcow.display()).into());
    }
    let disk = make_disk(dir)?;
    println!(
        "1 TiB add-cow disk, 64 KiB clusters (16 M), {RUNS} written runs; \
         CLI under prlimit --as={AS_LIMIT}; median of {runs}"
    );
    println!("{:<34}{:>10}{:>14}", "operation", "seconds", "output bytes");
    for verb in [&["info"][..], &["check"], &["map", "--json"]] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..runs {
            let (secs, n) = cli(&addcow, verb, &disk)?;
            times.push(secs);
            bytes = n;
        }
        let name = format!("addcow {}", verb.join(" "));
        println!("{name:<34}{:>10.3}{bytes:>14}", median(times));
    }

    let (mut cpu, mut wall, mut flush) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let disk = make_disk(dir)?;
        let image = AddCow::open(&disk, Access::ReadWrite)?;
        let (start, cpu_start) = (Instant::now(), thread_cpu());
        image.write_zeroes(0, image.size())?;
        cpu.push(thread_cpu() - cpu_start);
        wall.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        image.close()?;
        flush.push(start.elapsed().as_secs_f64());
        if AddCow::open(&disk, Access::ReadOnly)?.allocated_clusters() != DISK >> 16 {
            return Err("the whole-disk discard left clusters unallocated".into());
        }
    }
    println!(
        "{:<34}{:>10.3}   (CPU {:.3} s)",
        "whole-disk discard (library)",
        median(wall),
        median(cpu)
    );
    println!(
        "{:<34}{:>10.3}",
        "  then flush (2 MiB of bitmap)",
        median(flush)
    );
    Ok(())
}
