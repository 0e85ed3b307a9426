//! What a VM is made from, as the command line describes it.

use std::path::PathBuf;

use devices::virtio::block::DiskSpec;

/// Everything a VM is made from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, before the VMM adds its device parameters.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// virtio-blk disks, in order: vda, vdb, ...
    pub disks: Vec<DiskConfig>,
    /// Whether the test exit port at 0xf4 is present.
    pub exit_port: bool,
}

/// One `--disk`: the file, its format and its I/O-lab options.
pub type DiskConfig = DiskSpec;
