//! Loading Linux: the kernel (bzImage or ELF vmlinux, with linux-loader),
//! the initrd as high as it fits, the command line, and the zero page with
//! the E820 map.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    e820_map, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};

/// Errors loading the guest kernel and what comes with it.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel or initrd file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{0}: not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// linux-loader refused the kernel (often: it does not fit in memory).
    #[error("{path}: cannot load the kernel: {source}")]
    Load {
        /// The kernel.
        path: PathBuf,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Kernel and initrd do not both fit below the MMIO gap.
    #[error("too little memory: the kernel ends at {kernel_end:#x} and the {initrd_size}-byte initrd needs to fit below {limit:#x}; give more --mem")]
    NoRoomForInitrd {
        /// End of the kernel image.
        kernel_end: u64,
        /// Size of the initrd.
        initrd_size: u64,
        /// Top of usable low memory.
        limit: u64,
    },
    /// The command line is too long or has a bad character.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the command line, initrd or zero page failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// The cause.
        reason: String,
    },
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest address an initrd may end at for kernels that do not say otherwise.
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// The boot protocol's magic "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader type.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn memory_error<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BootError {
    move |e| BootError::Memory {
        what,
        reason: e.to_string(),
    }
}

/// Loads kernel, initrd and command line into `mem` and writes the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(read_error(kernel))?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(read_error(kernel))?;
    let is_elf = magic == *b"\x7fELF";
    let load_error = |source| BootError::Load {
        path: kernel.to_path_buf(),
        source,
    };
    let loaded = if is_elf {
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_error)?
    } else {
        match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
            Ok(loaded) => loaded,
            Err(linux_loader::loader::Error::Bzimage(_)) => {
                return Err(BootError::NotAKernel(kernel.to_path_buf()))
            }
            Err(other) => return Err(load_error(other)),
        }
    };
    let mut params = boot_params::default();
    let entry = match loaded.setup_header {
        Some(header) => {
            params.hdr = header;
            loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
        }
        None => loaded.kernel_load.0,
    };

    let mut line = Cmdline::new(CMDLINE_MAX_SIZE)?;
    line.insert_str(cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &line)
        .map_err(memory_error("the command line"))?;

    if let Some(initrd) = initrd {
        let bytes = std::fs::read(initrd).map_err(read_error(initrd))?;
        let limit = mem_size.min(MMIO_GAP_START).min(INITRD_ADDR_MAX + 1);
        let size = bytes.len() as u64;
        let kernel_end = loaded.kernel_end;
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or(BootError::NoRoomForInitrd {
                kernel_end,
                initrd_size: size,
                limit,
            })?;
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(memory_error("the initrd"))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    let map = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(memory_error("the zero page"))?;
    Ok(KernelEntry { entry })
}
