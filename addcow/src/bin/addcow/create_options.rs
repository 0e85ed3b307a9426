//! `addcow create`: its flags, qemu-img's `-o key=value,...` spelling of
//! them, sizes with K/M/G suffixes, and backing-format probing.

use std::path::PathBuf;

use addcow::{cluster_bits_of, probe_format, BackingFormat, BackingRef, CreateOptions, Probed};
use clap::Args;

use crate::Failure;

/// Flags of `addcow create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Format to create; only add-cow (accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FORMAT")]
    format: Option<String>,
    /// The raw image file holding the guest's data (created sparse if missing).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Format of the image file: raw.
    #[arg(long, value_name = "FORMAT")]
    image_fmt: Option<String>,
    /// The read-only backing file.
    #[arg(long)]
    backing: Option<PathBuf>,
    /// Format of the backing file: raw or add-cow; probed when omitted.
    #[arg(long, value_name = "FORMAT")]
    backing_fmt: Option<String>,
    /// Cluster size, a power of two from 4K to 2M.
    #[arg(long, value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// Size of the virtual disk (default: the image file's, else the backing file's).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// qemu-img style options: backing_file=…,backing_fmt=…,image_file=…,image_fmt=…,cluster_size=…
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The add-cow file to create.
    output: PathBuf,
    /// Size of the virtual disk, as qemu-img takes it.
    #[arg(value_parser = parse_size)]
    size_positional: Option<u64>,
}

/// Parses a byte count with an optional binary suffix: 512, 64K, 1.5G.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text)
        .map_err(|e| format!("'{text}' is not a size ({e})"))
}

fn usage(message: String) -> Failure {
    Failure { status: 2, message }
}

/// Sets `slot` from a flag or an `-o` key; both given and different is an error.
fn merge<T: PartialEq + std::fmt::Debug>(
    slot: &mut Option<T>,
    value: T,
    key: &str,
) -> Result<(), Failure> {
    match slot {
        Some(old) if *old != value => Err(usage(format!(
            "{key} given twice with different values ({old:?} and {value:?})"
        ))),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// Runs `addcow create`.
pub fn run(mut args: CreateArgs) -> Result<(), Failure> {
    if let Some(format) = &args.format {
        if format != "add-cow" {
            return Err(usage(format!(
                "-f {format}: addcow creates only add-cow files"
            )));
        }
    }
    for list in std::mem::take(&mut args.options) {
        for pair in list.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| usage(format!("-o {pair}: expected key=value")))?;
            match key {
                "backing_file" => merge(&mut args.backing, PathBuf::from(value), key)?,
                // Empty: probe, as if not given (decision 6 of the format page).
                "backing_fmt" if value.is_empty() => {}
                "backing_fmt" => merge(&mut args.backing_fmt, value.to_string(), key)?,
                "image_file" => merge(&mut args.image, PathBuf::from(value), key)?,
                "image_fmt" => merge(&mut args.image_fmt, value.to_string(), key)?,
                "cluster_size" => merge(
                    &mut args.cluster_size,
                    parse_size(value).map_err(usage)?,
                    key,
                )?,
                "size" => merge(&mut args.size, parse_size(value).map_err(usage)?, key)?,
                other => return Err(usage(format!("-o {other}: unknown option"))),
            }
        }
    }
    if let Some(size) = args.size_positional {
        merge(&mut args.size, size, "size")?;
    }
    let image = args.image.ok_or_else(|| {
        usage("the image file is required: --image FILE or -o image_file=FILE".into())
    })?;
    if let Some(fmt) = &args.image_fmt {
        if fmt != "raw" {
            return Err(usage(format!(
                "image format {fmt}: the image file must be raw"
            )));
        }
    }
    let cluster_bits = match args.cluster_size {
        Some(size) => cluster_bits_of(size)?,
        None => addcow::header::DEFAULT_CLUSTER_BITS,
    };
    if args.backing_fmt.as_deref() == Some("") {
        args.backing_fmt = None;
    }
    let backing = match args.backing {
        None => {
            if let Some(fmt) = args.backing_fmt {
                return Err(usage(format!(
                    "backing format {fmt} given without a backing file"
                )));
            }
            None
        }
        Some(name) => {
            let format = match args.backing_fmt {
                Some(fmt) => BackingFormat::from_name(&fmt)
                    .ok_or_else(|| usage(format!("backing format {fmt}: use raw or add-cow")))?,
                None => {
                    let resolved = addcow::resolve_name(&args.output, &name);
                    match probe_format(&resolved)? {
                        Probed::AddCow => BackingFormat::AddCow,
                        Probed::Raw => {
                            eprintln!(
                                "addcow: warning: {} has no known magic and is taken as raw; \
                                 probing raw files is unsafe, give --backing-fmt raw",
                                resolved.display()
                            );
                            BackingFormat::Raw
                        }
                    }
                }
            };
            Some(BackingRef { name, format })
        }
    };
    addcow::create(
        &args.output,
        &CreateOptions {
            image,
            backing,
            cluster_bits,
            size: args.size,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn merge_refuses_conflicts() {
        let mut slot = Some(1u64);
        assert!(merge(&mut slot, 1, "size").is_ok());
        assert!(merge(&mut slot, 2, "size").is_err());
        let mut empty = None;
        assert!(merge(&mut empty, 3u64, "size").is_ok());
        assert_eq!(empty, Some(3));
    }
}
