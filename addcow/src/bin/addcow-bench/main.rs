//! `addcow-bench`: the same workloads against a raw file (the limit), add-cow
//! over a raw backing file, and qcow2 over the same backing file through
//! `qemu-img bench` (the peer). Queue depth 1, page-cache mode, one thread.
//!
//! Patterns: 4 KiB I/Os one per 64 KiB cluster ("4k"), 1 MiB sequential
//! ("1m"). Workloads: reads of allocated data, reads through to the backing
//! file, first writes into unallocated clusters (COW), rewrites, and writes
//! with a flush every 16. Each engine pair runs alternately, median of N runs.
//!
//! `--scale` measures a 1 TiB disk instead (see `scale.rs`).

mod scale;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use addcow::{create, Access, AddCow, BackingFormat, BackingRef, CreateOptions};
use clap::Parser;

/// Benchmark add-cow against raw files and qcow2.
#[derive(Debug, Parser)]
struct Args {
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Size of the disk in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Directory for the images (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Instead of the table: the 1 TiB scale measurements (info, check,
    /// map --json under an address-space limit; a whole-disk discard).
    #[arg(long)]
    scale: bool,
}

const CLUSTER: u64 = 64 << 10;
const FLUSH_EVERY: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    AllocatedRead,
    BackingRead,
    CowWrite,
    Rewrite,
    WriteFlush,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::AllocatedRead,
        Workload::BackingRead,
        Workload::CowWrite,
        Workload::Rewrite,
        Workload::WriteFlush,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::AllocatedRead => "read allocated",
            Workload::BackingRead => "read via backing",
            Workload::CowWrite => "first write (COW)",
            Workload::Rewrite => "rewrite",
            Workload::WriteFlush => "write+flush/16",
        }
    }

    fn writes(self) -> bool {
        !matches!(self, Workload::AllocatedRead | Workload::BackingRead)
    }

    /// Whether the image must be fully allocated before the timed part.
    fn preallocated(self) -> bool {
        matches!(
            self,
            Workload::AllocatedRead | Workload::Rewrite | Workload::WriteFlush
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Pattern {
    name: &'static str,
    io: u64,
    step: u64,
}

const PATTERNS: [Pattern; 2] = [
    Pattern {
        name: "4k",
        io: 4 << 10,
        step: CLUSTER,
    },
    Pattern {
        name: "1m",
        io: 1 << 20,
        step: 1 << 20,
    },
];

type Fail = Box<dyn std::error::Error>;

/// A disk the workloads run on.
trait Engine {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Fail>;
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), Fail>;
    fn flush(&self) -> Result<(), Fail>;
}

struct Raw(File);

impl Engine for Raw {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Fail> {
        Ok(self.0.read_exact_at(buf, offset)?)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), Fail> {
        Ok(self.0.write_all_at(buf, offset)?)
    }
    fn flush(&self) -> Result<(), Fail> {
        Ok(self.0.sync_data()?)
    }
}

impl Engine for AddCow {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Fail> {
        Ok(self.read_at(buf, offset)?)
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), Fail> {
        Ok(self.write_at(buf, offset)?)
    }
    fn flush(&self) -> Result<(), Fail> {
        Ok(AddCow::flush(self)?)
    }
}

/// Runs `w` with pattern `p` on `engine`; returns seconds.
fn run_engine(engine: &dyn Engine, w: Workload, p: Pattern, size: u64) -> Result<f64, Fail> {
    let mut buf = vec![0x5au8; p.io as usize];
    let start = Instant::now();
    let mut n = 0;
    let mut offset = 0;
    while offset + p.io <= size {
        if w.writes() {
            engine.write(&buf, offset)?;
            n += 1;
            if w == Workload::WriteFlush && n % FLUSH_EVERY == 0 {
                engine.flush()?;
            }
        } else {
            engine.read(&mut buf, offset)?;
        }
        offset += p.step;
    }
    Ok(start.elapsed().as_secs_f64())
}

struct Bench {
    dir: PathBuf,
    size: u64,
}

fn sh(cmd: &mut Command) -> Result<String, Fail> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn fresh_raw(&self, name: &str) -> Result<PathBuf, Fail> {
        let path = self.path(name);
        let _ = std::fs::remove_file(&path);
        File::create(&path)?.set_len(self.size)?;
        Ok(path)
    }

    fn fill(engine: &dyn Engine, size: u64) -> Result<(), Fail> {
        let buf = vec![0xa5u8; 1 << 20];
        let mut at = 0;
        while at < size {
            engine.write(&buf, at)?;
            at += 1 << 20;
        }
        engine.flush()
    }

    fn raw(&self, w: Workload, p: Pattern) -> Result<f64, Fail> {
        let path = self.fresh_raw("raw.img")?;
        let raw = Raw(OpenOptions::new().read(true).write(true).open(&path)?);
        if w.preallocated() || w == Workload::BackingRead {
            Self::fill(&raw, self.size)?;
        }
        run_engine(&raw, w, p, self.size)
    }

    fn addcow(&self, w: Workload, p: Pattern) -> Result<f64, Fail> {
        let meta = self.path("test.add-cow");
        self.fresh_raw("test.raw")?;
        create(
            &meta,
            &CreateOptions {
                image: "test.raw".into(),
                backing: Some(BackingRef {
                    name: "base.img".into(),
                    format: BackingFormat::Raw,
                }),
                cluster_bits: CLUSTER.trailing_zeros(),
                size: Some(self.size),
            },
        )?;
        let disk = AddCow::open(&meta, Access::ReadWrite)?;
        if w.preallocated() {
            Self::fill(&disk, self.size)?;
        }
        let secs = run_engine(&disk, w, p, self.size)?;
        disk.close()?;
        Ok(secs)
    }

    fn qemu_bench(&self, image: &Path, w: Workload, p: Pattern, count: u64) -> Result<f64, Fail> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-f", "qcow2", "-t", "writeback", "-d", "1"]);
        cmd.args([
            "-c",
            &count.to_string(),
            "-s",
            &p.io.to_string(),
            "-S",
            &p.step.to_string(),
        ]);
        if w.writes() {
            cmd.arg("-w");
        }
        if w == Workload::WriteFlush {
            cmd.args(["--flush-interval", &FLUSH_EVERY.to_string()]);
        }
        cmd.arg(image);
        // qemu-img times its own I/O loop: "Run completed in 1.234 seconds."
        let out = sh(&mut cmd)?;
        out.lines()
            .find_map(|l| l.strip_prefix("Run completed in "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|secs| secs.parse().ok())
            .ok_or_else(|| format!("no timing in qemu-img bench output: {out}").into())
    }

    fn qcow2(&self, w: Workload, p: Pattern) -> Result<f64, Fail> {
        let image = self.path("test.qcow2");
        let _ = std::fs::remove_file(&image);
        sh(Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "-b",
                "base.img",
                "-F",
                "raw",
            ])
            .arg(&image)
            .arg(self.size.to_string())
            .current_dir(&self.dir))?;
        let count = self.size / p.step;
        if w.preallocated() {
            let fill = Pattern {
                name: "fill",
                io: 1 << 20,
                step: 1 << 20,
            };
            self.qemu_bench(&image, Workload::CowWrite, fill, self.size >> 20)?;
        }
        self.qemu_bench(&image, w, p, count)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Fail> {
    let args = Args::parse();
    let tmp = tempfile_dir(args.dir)?;
    if args.scale {
        let result = scale::run(&tmp, args.runs);
        std::fs::remove_dir_all(&tmp)?;
        return result;
    }
    let bench = Bench {
        dir: tmp.clone(),
        size: args.size_mib << 20,
    };
    // The backing file: the first half of the disk, real data.
    let base = File::create(bench.path("base.img"))?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for i in 0..(bench.size / 2) >> 20 {
        base.write_all_at(&chunk, i << 20)?;
    }
    base.set_len(bench.size)?;
    base.sync_all()?;

    println!(
        "{:<20}{:<5}{:>11}{:>11}{:>11}{:>9}{:>11}   (MB/s, median of {}; IOPS for add-cow)",
        "workload", "io", "raw", "add-cow", "qcow2", "ac/raw", "ac/qcow2", args.runs
    );
    for p in PATTERNS {
        for w in Workload::ALL {
            let (mut raw, mut ac, mut qc) = (vec![], vec![], vec![]);
            for _ in 0..args.runs {
                raw.push(bench.raw(w, p)?);
                ac.push(bench.addcow(w, p)?);
                qc.push(bench.qcow2(w, p)?);
            }
            let bytes = (bench.size / p.step * p.io) as f64;
            let mbs = |secs: f64| bytes / secs / 1e6;
            let (r, a, q) = (mbs(median(raw)), mbs(median(ac)), mbs(median(qc)));
            let iops = a * 1e6 / p.io as f64;
            println!(
                "{:<20}{:<5}{:>11.0}{:>11.0}{:>11.0}{:>9.2}{:>11.2}   {:.0} IOPS",
                w.name(),
                p.name,
                r,
                a,
                q,
                a / r,
                a / q,
                iops
            );
        }
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// The benchmark directory: the one given, or a fresh one under /var/tmp
/// (a real file system, unlike a tmpfs /tmp).
fn tempfile_dir(dir: Option<PathBuf>) -> Result<PathBuf, Fail> {
    let dir = dir
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/addcow-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
