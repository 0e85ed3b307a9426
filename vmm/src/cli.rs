//! Command-line arguments of `vmm` and their checks.

use std::path::PathBuf;

use clap::Parser;

use devices::virtio::block::DiskFormat;

use crate::vm::{DiskConfig, VmConfig};
use crate::x86_64::mptable::MAX_CPUS;

/// What every guest gets on its command line before the user's additions:
/// the serial console, reboot through the i8042 (a clean VMM exit), reboot at
/// once on panic, and no PCI bus to probe.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// Boot a Linux guest on KVM, with add-cow disks.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    /// Guest kernel: bzImage or uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Appended to the default kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory (K/M/G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A virtio-blk disk: PATH[,ro][,format=add-cow|raw]. The format defaults
    /// to add-cow for a `.add-cow` file and raw otherwise. Repeat for vdb, vdc, ...
    #[arg(long = "disk", value_name = "PATH[,ro][,format=F]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// Add the test exit port at I/O port 0xf4: the byte the guest writes
    /// there becomes vmm's exit status.
    #[arg(long)]
    exit_port: bool,
}

/// Parses a byte count with an optional binary suffix.
fn parse_size(text: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text)
        .map_err(|e| format!("'{text}' is not a size ({e})"))
}

/// Parses `PATH[,ro][,format=add-cow|raw]`.
fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut parts = text.split(',');
    let path = PathBuf::from(
        parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("a disk needs a path")?,
    );
    let mut read_only = false;
    let mut format = None;
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => read_only = true,
            Some(("format", "add-cow")) => format = Some(DiskFormat::AddCow),
            Some(("format", "raw")) => format = Some(DiskFormat::Raw),
            Some(("format", other)) => {
                return Err(format!("disk format '{other}': use add-cow or raw"))
            }
            _ => {
                return Err(format!(
                    "unknown disk option '{option}' (use ro or format=add-cow|raw)"
                ))
            }
        }
    }
    Ok(DiskConfig {
        format: format.unwrap_or_else(|| DiskFormat::from_extension(&path)),
        path,
        read_only,
    })
}

/// Least guest memory accepted: room for the boot structures and a kernel.
const MIN_MEM: u64 = 16 << 20;

impl Cli {
    /// Checks the arguments and builds the VM configuration.
    pub fn into_config(self) -> Result<VmConfig, String> {
        if self.vcpus == 0 || self.vcpus > MAX_CPUS {
            return Err(format!("--vcpus {}: must be 1 to {MAX_CPUS}", self.vcpus));
        }
        if self.mem < MIN_MEM {
            return Err(format!(
                "--mem {}: at least {} MiB are needed",
                self.mem,
                MIN_MEM >> 20
            ));
        }
        for path in std::iter::once(&self.kernel).chain(&self.initrd) {
            std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let mut cmdline = DEFAULT_CMDLINE.to_string();
        if !self.cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.cmdline.trim());
        }
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline,
            mem_size: self.mem,
            vcpus: self.vcpus,
            disks: self.disks,
            exit_port: self.exit_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<VmConfig, String> {
        let kernel = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut all = vec!["vmm", "--kernel", kernel.to_str().ok_or("path")?];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .into_config()
    }

    #[test]
    fn defaults_and_cmdline_extension() -> Result<(), String> {
        let c = config(&["--cmdline", "quiet  "])?;
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cmdline, format!("{DEFAULT_CMDLINE} quiet"));
        assert!(!c.exit_port);
        assert_eq!(config(&["--mem", "1G"])?.mem_size, 1 << 30);
        Ok(())
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(config(&["--vcpus", "0"]).is_err_and(|e| e.contains("--vcpus")));
        assert!(config(&["--vcpus", "33"]).is_err());
        assert!(config(&["--mem", "1M"]).is_err_and(|e| e.contains("--mem")));
        assert!(config(&["--mem", "lots"]).is_err());
        assert!(config(&["--initrd", "/nonexistent/initrd"])
            .is_err_and(|e| e.contains("/nonexistent/initrd")));
        assert!(config(&["--disk", "a.img,rw"]).is_err_and(|e| e.contains("unknown disk option")));
        assert!(config(&["--disk", "a.img,format=qcow2"]).is_err_and(|e| e.contains("qcow2")));
        assert!(config(&["--disk", ",ro"]).is_err());
    }

    #[test]
    fn disk_options() -> Result<(), String> {
        let c = config(&[
            "--disk",
            "/d/a.add-cow",
            "--disk",
            "b.img,ro",
            "--disk",
            "c.img,format=add-cow,ro",
        ])?;
        let got: Vec<_> = c
            .disks
            .iter()
            .map(|d| (d.path.to_str(), d.format, d.read_only))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("/d/a.add-cow"), DiskFormat::AddCow, false),
                (Some("b.img"), DiskFormat::Raw, true),
                (Some("c.img"), DiskFormat::AddCow, true),
            ]
        );
        Ok(())
    }
}
