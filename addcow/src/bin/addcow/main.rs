//! `addcow`: create, inspect, check, read, write, convert and stream add-cow
//! images, in the manner of `qemu-img`.

mod create_options;
mod progress;

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use addcow::{Access, AddCow, Backing, Source};
use clap::{Parser, Subcommand};

use create_options::CreateArgs;

/// Copy-on-write disk images whose data lives in a plain raw file.
#[derive(Debug, Parser)]
#[command(name = "addcow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an add-cow file for an image file over an optional backing file.
    Create(CreateArgs),
    /// Show the header, sizes, allocation and backing chain.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The add-cow file.
        file: PathBuf,
    },
    /// Check every rule of the format; exit 0 clean, 2 corrupt, 1 could not check.
    Check {
        /// The add-cow file.
        file: PathBuf,
    },
    /// Show where each range of the virtual disk is read from.
    Map {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The add-cow file.
        file: PathBuf,
    },
    /// Write LENGTH bytes of the virtual disk from OFFSET to standard output.
    Read {
        /// The add-cow file.
        file: PathBuf,
        /// Byte offset (K/M/G suffixes allowed).
        #[arg(value_parser = create_options::parse_size)]
        offset: u64,
        /// Number of bytes (K/M/G suffixes allowed).
        #[arg(value_parser = create_options::parse_size)]
        length: u64,
    },
    /// Write standard input to the virtual disk at OFFSET.
    Write {
        /// The add-cow file.
        file: PathBuf,
        /// Byte offset (K/M/G suffixes allowed).
        #[arg(value_parser = create_options::parse_size)]
        offset: u64,
    },
    /// Write the merged virtual disk to a sparse raw file.
    Convert {
        /// The add-cow file.
        file: PathBuf,
        /// The raw file to write (created or overwritten).
        output: PathBuf,
        /// Do not sync the output at the end (like `qemu-img convert`'s
        /// default `-t unsafe`): faster, but a crash soon after may lose it.
        #[arg(long)]
        no_sync: bool,
    },
    /// Copy every unallocated cluster from the backing chain into the image
    /// file, then mark the image all-allocated: the image file then stands alone.
    Stream {
        /// The add-cow file.
        file: PathBuf,
    },
}

/// A failure with the exit status it should give.
struct Failure {
    status: u8,
    message: String,
}

impl From<addcow::Error> for Failure {
    fn from(err: addcow::Error) -> Self {
        // Errors that only a command line can cause are bad arguments.
        let status = match err {
            addcow::Error::OutOfRange { .. } | addcow::Error::ClusterSize(_) => 2,
            _ => 1,
        };
        Failure {
            status,
            message: err.to_string(),
        }
    }
}

fn io_failure(what: &str) -> impl Fn(io::Error) -> Failure + '_ {
    move |err| Failure {
        status: 1,
        message: format!("{what}: {err}"),
    }
}

fn main() -> ExitCode {
    // `addcow info x | head`: like any filter, end quietly when the reader
    // goes away (Rust ignores SIGPIPE, and `println!` then panics).
    // SAFETY: restoring a signal's default disposition before any other
    // thread exists touches no memory of this program.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("addcow: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Create(args) => create_options::run(args),
        Command::Info { json, file } => info(&file, json),
        Command::Check { file } => check(&file),
        Command::Map { json, file } => map(&file, json),
        Command::Read {
            file,
            offset,
            length,
        } => read(&file, offset, length),
        Command::Write { file, offset } => write(&file, offset),
        Command::Convert {
            file,
            output,
            no_sync,
        } => convert(&file, &output, !no_sync),
        Command::Stream { file } => stream(&file),
    }
}

#[derive(serde::Serialize)]
struct ChainLink {
    filename: String,
    format: &'static str,
    virtual_size: u64,
}

#[derive(serde::Serialize)]
struct Info {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    cluster_size: u64,
    image_file: String,
    image_format: &'static str,
    backing_file: Option<String>,
    backing_format: Option<&'static str>,
    all_allocated: bool,
    clusters: u64,
    allocated_clusters: u64,
    header: addcow::header::RawFields,
    backing_chain: Vec<ChainLink>,
}

fn backing_chain(disk: &AddCow) -> Vec<ChainLink> {
    let mut chain = Vec::new();
    let mut next = disk.backing();
    while let Some(backing) = next {
        let (format, below) = match backing {
            Backing::Raw { .. } => ("raw", None),
            Backing::AddCow(image) => ("add-cow", image.backing()),
        };
        chain.push(ChainLink {
            filename: backing.path().display().to_string(),
            format,
            virtual_size: backing.size(),
        });
        next = below;
    }
    chain
}

fn info(file: &Path, json: bool) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadOnly)?;
    let header = disk.header();
    let info = Info {
        filename: file.display().to_string(),
        format: "add-cow",
        virtual_size: disk.size(),
        cluster_size: disk.cluster_size(),
        image_file: header.image_name.display().to_string(),
        image_format: header.image_format.name(),
        backing_file: header
            .backing
            .as_ref()
            .map(|b| b.name.display().to_string()),
        backing_format: header.backing.as_ref().map(|b| b.format.name()),
        all_allocated: disk.all_allocated(),
        clusters: disk.cluster_count(),
        allocated_clusters: disk.allocated_clusters(),
        header: header.raw_fields(),
        backing_chain: backing_chain(&disk),
    };
    if json {
        return print_json(&info);
    }
    let pct = if info.clusters == 0 {
        100.0
    } else {
        info.allocated_clusters as f64 * 100.0 / info.clusters as f64
    };
    println!("image: {}", info.filename);
    println!("file format: add-cow");
    println!(
        "virtual size: {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    println!("cluster_size: {}", info.cluster_size);
    println!(
        "image file: {} (format: {})",
        info.image_file, info.image_format
    );
    match (&info.backing_file, info.backing_format) {
        (Some(name), Some(format)) => println!("backing file: {name} (format: {format})"),
        _ => println!("backing file: none"),
    }
    println!(
        "allocated: {}/{} clusters ({pct:.2}%)",
        info.allocated_clusters, info.clusters
    );
    println!(
        "all allocated: {}",
        if info.all_allocated { "yes" } else { "no" }
    );
    let h = &info.header;
    println!("header:");
    println!(
        "    backing file name offset/size: {}/{}",
        h.backing_name_offset, h.backing_name_size
    );
    println!(
        "    image file name offset/size: {}/{}",
        h.image_name_offset, h.image_name_size
    );
    println!("    cluster bits: {}", h.cluster_bits);
    println!("    features: {:#x}", h.features);
    println!("    compatible features: {:#x}", h.compatible_features);
    println!("    header size: {}", h.header_size);
    if !info.backing_chain.is_empty() {
        println!("backing chain:");
        for (depth, link) in info.backing_chain.iter().enumerate() {
            println!(
                "    {}: {} ({}, {} bytes)",
                depth + 1,
                link.filename,
                link.format,
                link.virtual_size
            );
        }
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure {
        status: 1,
        message: e.to_string(),
    })?;
    println!("{text}");
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.3} {}", UNITS[unit]).replace(".000 ", " ")
}

fn check(file: &Path) -> Result<(), Failure> {
    let report = addcow::check::check(file)?;
    if report.is_clean() {
        println!(
            "No errors were found on the image.\n{}/{} clusters allocated.",
            report.allocated, report.clusters
        );
        return Ok(());
    }
    for problem in &report.problems {
        println!("ERROR: {problem}");
    }
    Err(Failure {
        status: 2,
        message: format!(
            "{}: {} error(s) found",
            file.display(),
            report.problems.len()
        ),
    })
}

fn map(file: &Path, json: bool) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadOnly)?;
    let extents = disk.map();
    if json {
        return print_json(&extents);
    }
    println!("{:<20}{:<20}Source", "Offset", "Length");
    for e in extents {
        let source = match e.source {
            Source::Image => disk.image_path().display().to_string(),
            Source::Backing => disk
                .backing()
                .map_or_else(String::new, |b| b.path().display().to_string()),
            Source::Zero => "zero".to_string(),
        };
        println!("{:<#20x}{:<#20x}{source}", e.start, e.length);
    }
    Ok(())
}

/// Size of the pieces `read` and `write` move at once.
const COPY_CHUNK: u64 = 1 << 20;

fn read(file: &Path, offset: u64, length: u64) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadOnly)?;
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; length.min(COPY_CHUNK) as usize];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(COPY_CHUNK) as usize;
        disk.read_at(&mut buf[..n], offset + done)?;
        out.write_all(&buf[..n])
            .map_err(io_failure("standard output"))?;
        done += n as u64;
    }
    out.flush().map_err(io_failure("standard output"))
}

fn write(file: &Path, offset: u64) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadWrite)?;
    let mut input = io::stdin().lock();
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut at = offset;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure("standard input")(e)),
            }
        }
        if filled == 0 {
            break;
        }
        disk.write_at(&buf[..filled], at)?;
        at += filled as u64;
    }
    disk.close()?;
    Ok(())
}

/// Flattens `file` into `output`; with `sync`, the output is durable
/// (fdatasync) when this returns.
fn convert(file: &Path, output: &Path, sync: bool) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadOnly)?;
    let (out, sparse) = open_output(&disk, output)?;
    let fail = io_failure_owned(output);
    let bar = progress::bar(disk.size(), "converting");
    let kind = if sparse {
        addcow::convert::Output::Sparse
    } else {
        addcow::convert::Output::Dense
    };
    addcow::convert::convert(&disk, &out, output, kind, |n| bar.inc(n))?;
    if sparse {
        out.set_len(disk.size()).map_err(&fail)?;
    }
    if sync {
        out.sync_all().map_err(&fail)?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Opens the output of `convert`, refusing any file of the disk's chain
/// (by device and inode of the opened file, so links are caught) before
/// anything is truncated. A missing output is created exclusively: a new
/// file cannot be one the disk reads. The output is locked for writing, so
/// a file another process has open (its lock) is refused too. Returns the file and whether it is a
/// regular file (written sparse); a block device is written whole and must
/// be large enough.
fn open_output(disk: &AddCow, output: &Path) -> Result<(fs::File, bool), Failure> {
    let mut existing = OpenOptions::new();
    existing.read(true).write(true);
    let (out, created) = match addcow::open_checked(output, &existing, "open") {
        Ok(out) => (out, false),
        Err(addcow::Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let mut new = OpenOptions::new();
            new.read(true).write(true).create_new(true);
            (addcow::open_checked(output, &new, "create")?, true)
        }
        Err(err) => return Err(err.into()),
    };
    if !created {
        let id = addcow::FileId::of(&out, output)?;
        if let Some(input) = disk.chain_files().into_iter().find(|f| f.id == id) {
            return Err(Failure {
                status: 2,
                message: format!(
                    "{}: refusing to overwrite {}, the {} of {}'s backing chain",
                    output.display(),
                    input.path.display(),
                    input.role,
                    disk.path().display()
                ),
            });
        }
    }
    // Not a file another process writes or reads (a running VMM's disk).
    addcow::lock(&out, output, Access::ReadWrite)?;
    let fail = io_failure_owned(output);
    let is_device = out.metadata().map_err(&fail)?.file_type().is_block_device();
    if is_device {
        let len = addcow::file_size(&out).map_err(&fail)?;
        if len < disk.size() {
            return Err(Failure {
                status: 2,
                message: format!(
                    "{}: the block device is {len} bytes, smaller than the {}-byte disk",
                    output.display(),
                    disk.size()
                ),
            });
        }
    } else if !created {
        // A new file is empty already. Truncating it anyway would cost the
        // whole copy on ext4: a file truncated to 0 is written back when
        // closed (`auto_da_alloc`, meant for files rewritten in place),
        // 0.5 s for a 1 GiB `convert --no-sync`.
        out.set_len(0).map_err(&fail)?;
    }
    Ok((out, !is_device))
}

fn io_failure_owned(path: &Path) -> impl Fn(io::Error) -> Failure {
    let name = path.display().to_string();
    move |err| Failure {
        status: 1,
        message: format!("{name}: {err}"),
    }
}

fn stream(file: &Path) -> Result<(), Failure> {
    let disk = AddCow::open(file, Access::ReadWrite)?;
    let bar = progress::bar(disk.size(), "streaming");
    disk.stream(|done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    let image = disk.image_path().display().to_string();
    disk.close()?;
    println!("{image} now holds the whole disk; the backing file is no longer used.");
    Ok(())
}
