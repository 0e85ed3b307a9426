//! The `--disk` specification shared by every front end (vmm today, a
//! vhost-user-blk daemon later):
//!
//! ```text
//! PATH[,ro][,format=add-cow|raw][,trace=FILE][,fail-read=S:N][,fail-write=S:N]
//!     [,fail-flush-after=K][,flush-delay-ms=MS]
//!     [,power-cut-after-writes=N[,power-cut-seed=SEED]]
//! ```
//!
//! [`DiskSpec::open`] opens the format backend and stacks the I/O-lab layers
//! the options ask for: trace → faults → power cut → format backend. A disk
//! without lab options is the format backend alone.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::backend::{open_disk, DiskBackend, DiskFormat};
use super::lab::{FaultPlan, Faults, PowerCut, PowerCutPlan, SectorRange, Trace};
use super::request::ID_LEN;
use crate::exit::{ExitSignal, VmExit};

/// One disk and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The add-cow or raw file.
    pub path: PathBuf,
    /// How to read it.
    pub format: DiskFormat,
    /// Offer it read-only (VIRTIO_BLK_F_RO) and refuse writes.
    pub read_only: bool,
    /// Where to write the request trace.
    pub trace: Option<PathBuf>,
    /// Injected errors.
    pub faults: FaultPlan,
    /// When the power goes.
    pub power_cut: Option<PowerCutPlan>,
}

/// A `--disk` specification that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Nothing before the first comma.
    #[error("a disk needs a path")]
    NoPath,
    /// An option nobody knows.
    #[error("unknown disk option '{0}' (use ro, format=add-cow|raw, trace=FILE, fail-read=S:N, fail-write=S:N, fail-flush-after=K, flush-delay-ms=MS, power-cut-after-writes=N, power-cut-seed=SEED)")]
    Unknown(String),
    /// `format=` with another format.
    #[error("disk format '{0}': use add-cow or raw")]
    Format(String),
    /// An option's value does not parse.
    #[error("{option}={value}: {expected}")]
    Value {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is expected.
        expected: &'static str,
    },
    /// An option that may appear once appeared twice.
    #[error("{0} is given twice")]
    Repeated(&'static str),
    /// `power-cut-seed` alone.
    #[error("power-cut-seed needs power-cut-after-writes")]
    SeedWithoutCut,
    /// A power cut that no write could ever trigger.
    #[error("power-cut-after-writes on a read-only disk: no write would ever trigger it")]
    CutOnReadOnly,
}

/// A disk that cannot be opened as specified.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The disk itself.
    #[error(transparent)]
    Disk(#[from] addcow::Error),
    /// The trace file.
    #[error("trace file {path}: {reason}")]
    Trace {
        /// The `trace=` path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn number(option: &'static str, value: &str, least: u64) -> Result<u64, SpecError> {
    let expected = if least == 0 {
        "expected a number"
    } else {
        "expected a number of at least 1"
    };
    match value.parse::<u64>() {
        Ok(n) if n >= least => Ok(n),
        _ => Err(SpecError::Value {
            option,
            value: value.to_string(),
            expected,
        }),
    }
}

fn sector_range(option: &'static str, value: &str) -> Result<SectorRange, SpecError> {
    let bad = || SpecError::Value {
        option,
        value: value.to_string(),
        expected: "expected FIRST_SECTOR:SECTORS, SECTORS at least 1",
    };
    let (start, count) = value.split_once(':').ok_or_else(bad)?;
    let start = start.parse::<u64>().map_err(|_| bad())?;
    let count = count.parse::<u64>().map_err(|_| bad())?;
    if count == 0 || start.checked_add(count).is_none() {
        return Err(bad());
    }
    Ok(SectorRange { start, count })
}

/// Longest flush delay: stopping the VM waits for a delayed flush.
const MAX_FLUSH_DELAY_MS: u64 = 60_000;

fn flush_delay(value: &str) -> Result<Duration, SpecError> {
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_FLUSH_DELAY_MS => Ok(Duration::from_millis(ms)),
        _ => Err(SpecError::Value {
            option: "flush-delay-ms",
            value: value.to_string(),
            expected: "expected milliseconds, at most 60000",
        }),
    }
}

fn once<T>(slot: &mut Option<T>, option: &'static str, value: T) -> Result<(), SpecError> {
    if slot.replace(value).is_some() {
        return Err(SpecError::Repeated(option));
    }
    Ok(())
}

impl FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let mut parts = text.split(',');
        let path = PathBuf::from(
            parts
                .next()
                .filter(|p| !p.is_empty())
                .ok_or(SpecError::NoPath)?,
        );
        let mut read_only = false;
        let mut format = None;
        let mut trace = None;
        let mut faults = FaultPlan::default();
        let mut after_writes = None;
        let mut seed = None;
        for option in parts {
            match option.split_once('=') {
                None if option == "ro" => read_only = true,
                Some(("format", "add-cow")) => once(&mut format, "format", DiskFormat::AddCow)?,
                Some(("format", "raw")) => once(&mut format, "format", DiskFormat::Raw)?,
                Some(("format", other)) => return Err(SpecError::Format(other.to_string())),
                Some(("trace", "")) => {
                    return Err(SpecError::Value {
                        option: "trace",
                        value: String::new(),
                        expected: "expected a file name",
                    })
                }
                Some(("trace", file)) => once(&mut trace, "trace", PathBuf::from(file))?,
                Some(("fail-read", v)) => faults.fail_read.push(sector_range("fail-read", v)?),
                Some(("fail-write", v)) => faults.fail_write.push(sector_range("fail-write", v)?),
                Some(("fail-flush-after", v)) => once(
                    &mut faults.fail_flush_after,
                    "fail-flush-after",
                    number("fail-flush-after", v, 0)?,
                )?,
                Some(("flush-delay-ms", v)) => {
                    once(&mut faults.flush_delay, "flush-delay-ms", flush_delay(v)?)?
                }
                Some(("power-cut-after-writes", v)) => once(
                    &mut after_writes,
                    "power-cut-after-writes",
                    number("power-cut-after-writes", v, 1)?,
                )?,
                Some(("power-cut-seed", v)) => {
                    once(&mut seed, "power-cut-seed", number("power-cut-seed", v, 0)?)?
                }
                _ => return Err(SpecError::Unknown(option.to_string())),
            }
        }
        let power_cut = match (after_writes, seed) {
            (None, Some(_)) => return Err(SpecError::SeedWithoutCut),
            (None, None) => None,
            (Some(_), _) if read_only => return Err(SpecError::CutOnReadOnly),
            (Some(after_writes), seed) => Some(PowerCutPlan { after_writes, seed }),
        };
        Ok(DiskSpec {
            format: format.unwrap_or_else(|| DiskFormat::from_extension(&path)),
            path,
            read_only,
            trace,
            faults,
            power_cut,
        })
    }
}

impl DiskSpec {
    /// The GET_ID serial of the disk: derived from its canonical path, so
    /// stable across runs and the same whichever transport serves it.
    pub fn serial(&self) -> [u8; ID_LEN] {
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        // FNV-1a: stable across runs and Rust versions.
        let hash = path
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let mut id = [0u8; ID_LEN];
        let text = format!("acow-{hash:015x}");
        id.copy_from_slice(&text.as_bytes()[..ID_LEN]);
        id
    }

    /// Opens the disk with the layers its options ask for; a power cut is
    /// reported to `exit` as [`VmExit::PowerCut`].
    pub fn open(&self, exit: &Arc<ExitSignal>) -> Result<Box<dyn DiskBackend>, OpenError> {
        let mut disk = open_disk(&self.path, self.format, self.read_only)?;
        if let Some(plan) = self.power_cut {
            let (exit, path) = (exit.clone(), self.path.clone());
            let on_cut = Box::new(move |writes| {
                exit.signal(VmExit::PowerCut {
                    disk: path.clone(),
                    writes,
                })
            });
            disk = Box::new(PowerCut::new(disk, plan, on_cut));
        }
        if !self.faults.is_empty() {
            disk = Box::new(Faults::new(disk, self.faults.clone()));
        }
        if let Some(path) = &self.trace {
            let file = open_trace(path).map_err(|reason| OpenError::Trace {
                path: path.clone(),
                reason,
            })?;
            disk = Box::new(Trace::new(disk, Box::new(BufWriter::new(file))));
        }
        Ok(disk)
    }
}

/// Creates or empties a trace file, refusing a file that an open disk holds
/// (its lock, taken as disks take theirs, with the same patience for a
/// forked child's copy of a descriptor): a typo must not truncate a disk
/// image.
fn open_trace(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| e.to_string())?;
    match addcow::open::lock(&file, path, addcow::Access::ReadWrite) {
        Ok(()) => {}
        Err(addcow::Error::Locked { .. }) => {
            return Err("in use (a disk or another trace holds its lock)".into())
        }
        Err(e) => return Err(e.to_string()),
    }
    file.set_len(0).map_err(|e| e.to_string())?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::backend::{BackendError, Fate, Op, Served, Status};

    fn parse(text: &str) -> Result<DiskSpec, SpecError> {
        text.parse()
    }

    #[test]
    fn every_option_parses() -> Result<(), SpecError> {
        let spec = parse(
            "d.img,format=add-cow,trace=/t/x.jsonl,fail-read=8:2,fail-read=100:1,fail-write=0:4,\
             fail-flush-after=3,flush-delay-ms=250,power-cut-after-writes=7,\
             power-cut-seed=18446744073709551615",
        )?;
        assert_eq!(spec.path, PathBuf::from("d.img"));
        assert_eq!(spec.format, DiskFormat::AddCow);
        assert!(!spec.read_only);
        assert_eq!(spec.trace, Some(PathBuf::from("/t/x.jsonl")));
        assert_eq!(
            spec.faults,
            FaultPlan {
                fail_read: vec![
                    SectorRange { start: 8, count: 2 },
                    SectorRange {
                        start: 100,
                        count: 1
                    }
                ],
                fail_write: vec![SectorRange { start: 0, count: 4 }],
                fail_flush_after: Some(3),
                flush_delay: Some(Duration::from_millis(250)),
            }
        );
        assert_eq!(
            spec.power_cut,
            Some(PowerCutPlan {
                after_writes: 7,
                seed: Some(u64::MAX)
            })
        );
        let plain = parse("x.add-cow,ro")?;
        assert_eq!(
            (plain.format, plain.read_only, plain.trace, plain.power_cut),
            (DiskFormat::AddCow, true, None, None)
        );
        assert!(plain.faults.is_empty());
        assert_eq!(
            parse("fail-flush-after=0.img,fail-flush-after=0")?
                .faults
                .fail_flush_after,
            Some(0)
        );
        Ok(())
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "needs a path"),
            (",ro", "needs a path"),
            ("a.img,rw", "unknown disk option 'rw'"),
            ("a.img,format=qcow2", "qcow2"),
            ("a.img,flush-delay-ms=60001", "at most 60000"),
            ("a.img,flush-delay-ms=-1", "at most 60000"),
            ("a.img,flush-delay-ms=1,flush-delay-ms=1", "given twice"),
            ("a.img,format=raw,format=raw", "format is given twice"),
            ("a.img,trace=", "trace=: expected a file name"),
            ("a.img,trace=a,trace=b", "trace is given twice"),
            ("a.img,fail-read=5", "fail-read=5: expected"),
            ("a.img,fail-read=5:0", "fail-read=5:0"),
            ("a.img,fail-write=x:1", "fail-write=x:1"),
            ("a.img,fail-write=18446744073709551615:1", "fail-write="),
            ("a.img,fail-flush-after=-1", "fail-flush-after=-1"),
            ("a.img,power-cut-after-writes=0", "at least 1"),
            (
                "a.img,power-cut-after-writes=1,power-cut-after-writes=2",
                "twice",
            ),
            ("a.img,power-cut-seed=1", "needs power-cut-after-writes"),
            ("a.img,power-cut-after-writes=1,ro", "read-only"),
            ("a.img,power-cut-after-writes", "unknown disk option"),
        ];
        for (text, expected) in cases {
            match parse(text) {
                Ok(spec) => panic!("{text}: accepted as {spec:?}"),
                Err(e) => assert!(e.to_string().contains(expected), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn a_trace_file_that_is_a_disk_is_refused_and_left_alone() -> Result<(), BackendError> {
        let dir = tempfile::tempdir()?;
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 4096])?;
        let exit = Arc::new(ExitSignal::new()?);
        let spec = parse(&format!("{0},trace={0}", disk.display()))?;
        let err = spec.open(&exit).err().ok_or("opened")?;
        assert!(matches!(err, OpenError::Trace { .. }), "{err}");
        assert_eq!(std::fs::read(&disk)?, vec![7u8; 4096]);
        // A trace elsewhere is created empty.
        let trace = dir.path().join("t.jsonl");
        std::fs::write(&trace, "old\n")?;
        let opened =
            parse(&format!("{},trace={}", disk.display(), trace.display()))?.open(&exit)?;
        assert_eq!(std::fs::read(&trace)?, b"");
        drop(opened);
        Ok(())
    }

    /// A trace file whose lock is held for a moment (as by a child forked
    /// between its `fork` and `exec`, which holds a copy of every
    /// descriptor) is waited for, as a disk's lock is; one held for good is
    /// refused.
    #[test]
    fn a_trace_lock_held_for_a_moment_is_waited_for() -> Result<(), BackendError> {
        let dir = tempfile::tempdir()?;
        let trace = dir.path().join("t.jsonl");
        std::fs::write(&trace, "old\n")?;
        let holder = File::open(&trace)?;
        holder.lock()?;
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(holder);
        });
        let file = open_trace(&trace)?;
        release.join().map_err(|_| "holder thread")?;
        assert_eq!(std::fs::read(&trace)?, b"");
        drop(file);
        let holder = File::open(&trace)?;
        holder.lock()?;
        let err = open_trace(&trace).err().ok_or("opened a locked trace")?;
        assert!(err.contains("in use"), "{err}");
        Ok(())
    }

    /// The whole stack over a real add-cow image with a backing file: after
    /// a seeded cut the image checks clean, the backing file is unchanged,
    /// and the VMM is told why to stop.
    #[test]
    fn a_power_cut_leaves_an_add_cow_image_valid() -> Result<(), BackendError> {
        let dir = tempfile::tempdir()?;
        let backing = dir.path().join("base.img");
        let base: Vec<u8> = (0..1u32 << 20).map(|i| ((i * 7) >> 5) as u8).collect();
        std::fs::write(&backing, &base)?;
        let path = dir.path().join("d.add-cow");
        addcow::create(
            &path,
            &addcow::CreateOptions {
                image: "d.raw".into(),
                backing: Some(addcow::BackingRef {
                    name: "base.img".into(),
                    format: addcow::BackingFormat::Raw,
                }),
                cluster_bits: 12,
                size: None,
            },
        )?;
        let exit = Arc::new(ExitSignal::new()?);
        let trace = dir.path().join("t.jsonl");
        let spec = parse(&format!(
            "{},trace={},power-cut-after-writes=40,power-cut-seed=9",
            path.display(),
            trace.display()
        ))?;
        let disk = spec.open(&exit)?;
        let done = |op, sector, sectors| Served {
            op,
            sector,
            sectors,
            status: Status::Ok,
        };
        let mut fate = Fate::Completes;
        for i in 0..40u64 {
            // Partial clusters, overlaps, discards, and a flush every 8.
            let offset = (i * 3001) % (1000 * 512) / 512 * 512;
            if i % 5 == 4 {
                disk.write_zeroes(offset, 2048, false)?;
                fate = disk.served(&done(Op::Discard, offset / 512, 4));
            } else {
                disk.write_at(&vec![i as u8 + 1; 1536], offset)?;
                fate = disk.served(&done(Op::Write, offset / 512, 3));
            }
            if i % 8 == 7 && i < 39 {
                disk.flush()?;
            }
        }
        assert_eq!(fate, Fate::CompletesThenPowerCut);
        assert_eq!(
            exit.reason(),
            Some(VmExit::PowerCut {
                disk: path.clone(),
                writes: 40
            })
        );
        assert_eq!(exit.reason().map(|r| r.status()), Some(3));
        disk.flush()?;
        drop(disk);
        assert!(addcow::check::check(&path)?.is_clean());
        assert_eq!(std::fs::read(&backing)?, base);
        let lines = std::fs::read_to_string(&trace)?;
        assert_eq!(lines.lines().count(), 41);
        assert!(lines.ends_with("{\"event\":\"power_cut\",\"seq\":41}\n"));
        Ok(())
    }
}
