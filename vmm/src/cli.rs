//! Command-line arguments of `vmm` and their checks.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{DiskConfig, VmConfig};

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
    /// Number of vCPUs, 1 to 8.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A virtio-blk disk: PATH[,ro][,format=add-cow|raw] and the I/O-lab
    /// options [,trace=FILE][,fail-read=S:N][,fail-write=S:N]
    /// [,fail-flush-after=K][,power-cut-after-writes=N[,power-cut-seed=SEED]].
    /// The format defaults to add-cow for a `.add-cow` file and raw
    /// otherwise. Repeat for vdb, vdc, ...
    #[arg(long = "disk", value_name = "PATH[,ro][,format=F][,...]")]
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

/// Least guest memory accepted: room for the boot structures and a kernel.
const MIN_MEM: u64 = 16 << 20;
/// Guest memory comes in pages.
const PAGE_SIZE: u64 = 4096;
/// Most vCPUs: the guest kernel's `CONFIG_NR_CPUS` (resources/kernel).
pub const MAX_VCPUS: u8 = 8;

impl Cli {
    /// Checks the arguments and builds the VM configuration.
    pub fn into_config(self) -> Result<VmConfig, String> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(format!("--vcpus {}: must be 1 to {MAX_VCPUS}", self.vcpus));
        }
        if !self.mem.is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "--mem {}: must be a multiple of the {} KiB page size",
                self.mem,
                PAGE_SIZE >> 10
            ));
        }
        if self.mem < MIN_MEM {
            return Err(format!(
                "--mem {}: at least {} MiB are needed",
                self.mem,
                MIN_MEM >> 20
            ));
        }
        for path in std::iter::once(&self.kernel).chain(&self.initrd) {
            // stat, not open: opening a FIFO blocks until someone writes it.
            let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if !meta.is_file() {
                return Err(format!("{}: not a regular file", path.display()));
            }
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
    use devices::virtio::block::DiskFormat;

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
        assert_eq!(config(&["--mem", "16388K"])?.mem_size, 16388 << 10);
        assert_eq!(config(&["--vcpus", "8"])?.vcpus, 8);
        Ok(())
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(config(&["--vcpus", "0"]).is_err_and(|e| e.contains("--vcpus")));
        assert!(config(&["--vcpus", "9"]).is_err_and(|e| e.contains("1 to 8")));
        assert!(config(&["--vcpus", "300"]).is_err());
        assert!(config(&["--mem", "16385K"]).is_err_and(|e| e.contains("page")));
        assert!(config(&["--mem", "268435457"]).is_err_and(|e| e.contains("page")));
        assert!(config(&["--mem", "1M"]).is_err_and(|e| e.contains("--mem")));
        assert!(config(&["--mem", "lots"]).is_err());
        assert!(config(&["--initrd", "/nonexistent/initrd"])
            .is_err_and(|e| e.contains("/nonexistent/initrd")));
        assert!(config(&["--disk", "a.img,rw"]).is_err_and(|e| e.contains("unknown disk option")));
        assert!(config(&["--disk", "a.img,format=qcow2"]).is_err_and(|e| e.contains("qcow2")));
        assert!(config(&["--disk", ",ro"]).is_err());
    }

    /// A kernel or initrd that is not a regular file is refused at once
    /// (exit 2): opening a FIFO would block until a writer comes (with the
    /// stop signals blocked later on), a directory reads as a "truncated
    /// kernel", and reading /dev/zero as an initrd never ends.
    #[test]
    fn kernel_and_initrd_must_be_regular_files() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
            .map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated path; the result is checked.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let fifo = fifo.to_str().ok_or("path")?;
        let dir_path = dir.path().to_str().ok_or("path")?;
        let parse = |args: &[&str]| {
            let mut all = vec!["vmm"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all)
                .map_err(|e| e.to_string())
                .and_then(Cli::into_config)
        };
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let me = me.to_str().ok_or("path")?;
        for (args, name) in [
            (vec!["--kernel", fifo], fifo),
            (vec!["--kernel", dir_path], dir_path),
            (vec!["--kernel", me, "--initrd", fifo], fifo),
            (vec!["--kernel", me, "--initrd", "/dev/zero"], "/dev/zero"),
        ] {
            let err = parse(&args).expect_err("not a regular file");
            assert!(
                err.contains(name) && err.contains("not a regular file"),
                "{err}"
            );
        }
        Ok(())
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
