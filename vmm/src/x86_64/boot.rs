//! Loading Linux: the kernel (bzImage or ELF vmlinux, with linux-loader),
//! the initrd as high as it fits, the command line, and the zero page with
//! the E820 map.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use super::kernel::{self, KernelKind, KernelProblem};
use super::layout::{
    e820_map, MmioDevice, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START,
    ZERO_PAGE_START,
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
    /// A kernel without a 64-bit entry point.
    #[error("{0}: not a 64-bit kernel (a bzImage needs boot protocol 2.12 with XLF_KERNEL_64, a vmlinux ELFCLASS64)")]
    Not64Bit(PathBuf),
    /// The kernel image is shorter than its headers say.
    #[error("{0}: truncated kernel image")]
    Truncated(PathBuf),
    /// The kernel does not fit in guest memory while it boots.
    #[error("{path}: the kernel needs {needed_mib} MiB of guest memory to boot (it loads and decompresses up to {needed:#x}), but --mem gives {mem_mib} MiB; give more --mem", needed_mib = needed.div_ceil(1 << 20), mem_mib = mem >> 20)]
    KernelTooBig {
        /// The kernel.
        path: PathBuf,
        /// First address above the kernel's boot-time footprint.
        needed: u64,
        /// Guest memory below the MMIO gap.
        mem: u64,
    },
    /// linux-loader refused the kernel.
    #[error("{path}: cannot load the kernel: {source}")]
    Load {
        /// The kernel.
        path: PathBuf,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Kernel and initrd do not both fit in the memory the initrd may use.
    #[error("too little memory: the kernel uses guest memory up to {lowest:#x} while it boots and the {initrd_size}-byte initrd must end below {limit:#x}; give more --mem")]
    NoRoomForInitrd {
        /// First address the initrd may use.
        lowest: u64,
        /// Size of the initrd.
        initrd_size: u64,
        /// The address the initrd must end at or below.
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

impl BootError {
    /// Whether the user's arguments or files are at fault (exit status 2),
    /// not the VMM or the host.
    ///
    /// What linux-loader refuses is the file's fault too: a malformed or
    /// truncated image (its read errors on a regular file are short reads).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, BootError::Memory { .. })
    }
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The boot protocol's magic "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader type.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The alignment the relocatable kernel rounds its load address up to:
/// with the kernel at 1 MiB it decompresses at 16 MiB or its `pref_address`.
const KERNEL_ALIGNMENT: u32 = kernel::MIN_DECOMPRESS_ADDRESS as u32;
/// Initrds are placed on page boundaries.
const PAGE_SIZE: u64 = 0x1000;

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

/// Where an initrd of `size` bytes goes: as high as it fits, page-aligned,
/// ending at or below `limit` and starting at or above `lowest`.
pub fn initrd_address(size: u64, lowest: u64, limit: u64) -> Option<u64> {
    limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= lowest)
}

/// The kernel command line: `cmdline` with a `virtio_mmio.device=` for each
/// device among its boot arguments (before a ` -- `, after which come
/// init's arguments).
pub fn kernel_cmdline(cmdline: &str, virtio: &[MmioDevice]) -> Result<Cmdline, BootError> {
    let mut line = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)?;
    for device in virtio {
        line.add_virtio_mmio_device(device.size, GuestAddress(device.base), device.irq, None)?;
    }
    Ok(line)
}

/// Allocates the pages of guest RAM `[addr, addr + len)` (clipped to the
/// region holding `addr`) in one call (`MADV_POPULATE_WRITE`) before a file
/// is read there: one page fault per 4 KiB page of a 2 MiB kernel costs
/// vmm's start-up about a millisecond. A hint: a host kernel older than 5.14
/// (EINVAL) just takes the faults.
fn prefault(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return;
    };
    let Ok(host) = mem.get_host_address(GuestAddress(addr)) else {
        return;
    };
    let in_region = region.len() - (addr - region.start_addr().0);
    let (start, end) = (host as usize, host as usize + len.min(in_region) as usize);
    // madvise wants a page-aligned start; the range is rounded out to pages
    // that all lie in the region (its mapping is page-aligned).
    let page = 4096;
    let aligned = start & !(page - 1);
    // SAFETY: the range lies inside one live private anonymous mapping
    // owned by `mem`; MADV_POPULATE_WRITE only allocates its pages as a
    // write fault would, leaving the contents (zeros) unchanged.
    unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            end - aligned,
            libc::MADV_POPULATE_WRITE,
        )
    };
}

/// Loads kernel, initrd and command line into `mem` and writes the zero
/// page; the command line announces the `virtio` devices.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    virtio: &[MmioDevice],
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(read_error(kernel))?;
    let info = kernel::inspect(&mut file).map_err(|problem| match problem {
        KernelProblem::NotAKernel => BootError::NotAKernel(kernel.to_path_buf()),
        KernelProblem::Not64Bit => BootError::Not64Bit(kernel.to_path_buf()),
        KernelProblem::Truncated => BootError::Truncated(kernel.to_path_buf()),
    })?;
    let low_mem = mem_size.min(MMIO_GAP_START);
    if info.footprint_end > low_mem {
        return Err(BootError::KernelTooBig {
            path: kernel.to_path_buf(),
            needed: info.footprint_end,
            mem: low_mem,
        });
    }
    let load_error = |source| BootError::Load {
        path: kernel.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    if let Ok(len) = file.metadata().map(|m| m.len()) {
        prefault(mem, HIMEM_START, len);
    }
    let loaded = match info.kind {
        KernelKind::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_error)?,
        KernelKind::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_error)?,
    };
    let mut params = boot_params::default();
    let entry = match loaded.setup_header {
        Some(header) => {
            params.hdr = header;
            loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
        }
        None => loaded.kernel_load.0,
    };

    let line = kernel_cmdline(cmdline, virtio)?;
    let line_len = line.as_cstring()?.as_bytes().len();
    load_cmdline(mem, GuestAddress(CMDLINE_START), &line)
        .map_err(memory_error("the command line"))?;

    if let Some(initrd) = initrd {
        // Placed by its size first: a file larger than guest memory is
        // refused unread, and the rest goes straight into guest memory.
        let mut file = File::open(initrd).map_err(read_error(initrd))?;
        let size = file.metadata().map_err(read_error(initrd))?.len();
        let limit = low_mem.min(info.initrd_addr_max.saturating_add(1));
        let lowest = info.footprint_end.max(loaded.kernel_end);
        let addr = initrd_address(size, lowest, limit).ok_or(BootError::NoRoomForInitrd {
            lowest,
            initrd_size: size,
            limit,
        })?;
        let len = usize::try_from(size).map_err(memory_error("the initrd"))?;
        prefault(mem, addr, size);
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
            .map_err(|e| match e {
                GuestMemoryError::IOError(source) => read_error(initrd)(source),
                other => memory_error("the initrd")(other),
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = line_len as u32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::kernel::tests::bzimage;

    /// Prefaulting keeps what guest RAM holds, and a range that starts
    /// unaligned, runs past its region or lies outside RAM is clipped or
    /// ignored, never a crash.
    #[test]
    fn prefault_keeps_contents_and_clips_to_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        mem.write_slice(&[0xab; 100], GuestAddress(0x1234))
            .expect("write");
        prefault(&mem, 0x1001, 0x3000);
        prefault(&mem, 0xf_f000, 64 << 20);
        prefault(&mem, 8 << 20, 4096);
        let mut back = [0u8; 102];
        mem.read_slice(&mut back, GuestAddress(0x1233))
            .expect("read");
        assert_eq!(back[0], 0);
        assert!(back[1..101].iter().all(|&b| b == 0xab));
        assert_eq!(back[101], 0);
    }

    #[test]
    fn initrd_goes_as_high_as_it_fits_above_the_kernel() {
        // Ends at the limit, rounded down to a page.
        assert_eq!(
            initrd_address(0x1800, 36 << 20, 64 << 20),
            Some((64 << 20) - 0x2000)
        );
        assert_eq!(initrd_address(4096, 0, 0x10_0000), Some(0xf_f000));
        // Exactly filling the room between kernel and limit is fine ...
        assert_eq!(initrd_address(28 << 20, 36 << 20, 64 << 20), Some(36 << 20));
        // ... one more page is not, nor anything larger than the limit.
        assert_eq!(initrd_address((28 << 20) + 1, 36 << 20, 64 << 20), None);
        assert_eq!(initrd_address(u64::MAX, 0, 64 << 20), None);
    }

    fn guest(mem_size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)]).expect("memory")
    }

    fn files(dir: &Path, kernel: &[u8], initrd_len: usize) -> (PathBuf, PathBuf) {
        let (k, i) = (dir.join("bzImage"), dir.join("initrd"));
        std::fs::write(&k, kernel).expect("write kernel");
        std::fs::write(&i, vec![0x5a; initrd_len]).expect("write initrd");
        (k, i)
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START))
            .expect("zero page")
    }

    #[test]
    fn initrd_stays_clear_of_the_decompression_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A 1 MiB kernel that decompresses into 16 MiB + 30 MiB: in 48 MiB
        // of memory a 2 MiB initrd only fits in the last 2 MiB.
        let kernel = bzimage(0x020f, 1, 16 << 20, 30 << 20, 0x7fff_ffff, 1 << 20);
        let (k, i) = files(dir.path(), &kernel, 2 << 20);
        let mem = guest(48 << 20);
        load_linux(&mem, 48 << 20, &k, Some(&i), "console=ttyS0", &[]).expect("load");
        let hdr = zero_page(&mem).hdr;
        let (image, size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((image, size), (46 << 20, 2 << 20));
        let mut loaded = vec![0u8; 2 << 20];
        mem.read_slice(&mut loaded, GuestAddress(u64::from(image)))
            .expect("read initrd");
        assert!(loaded.iter().all(|&b| b == 0x5a), "the initrd's bytes");
        // 3 MiB do not fit: refused, never placed where decompression writes.
        let (k, i) = files(dir.path(), &kernel, 3 << 20);
        let err = load_linux(&guest(48 << 20), 48 << 20, &k, Some(&i), "", &[]);
        assert!(
            matches!(err, Err(BootError::NoRoomForInitrd { lowest, .. }) if lowest == 46 << 20),
            "{err:?}"
        );
    }

    /// An initrd far larger than guest memory is refused by its size,
    /// before a byte of it is read into the VMM's memory.
    #[test]
    fn an_initrd_larger_than_memory_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = bzimage(0x020f, 1, 16 << 20, 4 << 20, 0x7fff_ffff, 4096);
        let (k, i) = files(dir.path(), &kernel, 0);
        // A sparse 1 TiB file: reading it whole is out of the question.
        File::options()
            .write(true)
            .open(&i)
            .and_then(|f| f.set_len(1 << 40))
            .expect("grow initrd");
        let err = load_linux(&guest(64 << 20), 64 << 20, &k, Some(&i), "", &[]);
        assert!(
            matches!(err, Err(BootError::NoRoomForInitrd { initrd_size, .. }) if initrd_size == 1 << 40),
            "{err:?}"
        );
    }

    #[test]
    fn initrd_respects_the_kernels_initrd_addr_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = bzimage(0x020f, 1, 16 << 20, 4 << 20, (32 << 20) - 1, 4096);
        let (k, i) = files(dir.path(), &kernel, 1 << 20);
        let mem = guest(64 << 20);
        load_linux(&mem, 64 << 20, &k, Some(&i), "", &[]).expect("load");
        let image = zero_page(&mem).hdr.ramdisk_image;
        assert_eq!(image, 31 << 20);
    }

    #[test]
    fn a_kernel_too_big_for_memory_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = bzimage(0x020f, 1, 16 << 20, 20 << 20, 0x7fff_ffff, 4096);
        let (k, _) = files(dir.path(), &kernel, 0);
        let err = load_linux(&guest(32 << 20), 32 << 20, &k, None, "", &[])
            .expect_err("36 MiB kernel in 32 MiB");
        assert!(matches!(err, BootError::KernelTooBig { needed, .. } if needed == 36 << 20));
        let text = err.to_string();
        assert!(
            text.contains("needs 36 MiB") && text.contains("--mem"),
            "{text}"
        );
        assert!(err.is_bad_input());
        // A 32-bit-only kernel is refused by name.
        let old = bzimage(0x020f, 0, 16 << 20, 1 << 20, 0x7fff_ffff, 4096);
        let (k, _) = files(dir.path(), &old, 0);
        let err = load_linux(&guest(64 << 20), 64 << 20, &k, None, "", &[]);
        assert!(matches!(err, Err(BootError::Not64Bit(_))), "{err:?}");
    }

    /// A kernel file linux-loader refuses (here an ELF whose segment would
    /// overwrite the boot structures below 1 MiB) is a bad file: exit 2.
    #[test]
    fn a_kernel_the_loader_refuses_is_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = crate::x86_64::kernel::tests::elf(2, &[(1, 0x1000, 0x1000)]);
        let (k, _) = files(dir.path(), &image, 0);
        let err =
            load_linux(&guest(64 << 20), 64 << 20, &k, None, "", &[]).expect_err("a hostile ELF");
        assert!(matches!(err, BootError::Load { .. }), "{err:?}");
        assert!(err.is_bad_input(), "{err}");
    }

    #[test]
    fn device_parameters_go_before_init_arguments() {
        let dev = |base, irq| MmioDevice {
            base,
            size: 0x1000,
            irq,
        };
        let devices = [dev(0xc000_0000, 5), dev(0xc000_1000, 6)];
        let line = |text| {
            kernel_cmdline(text, &devices)
                .and_then(|l| Ok(l.as_cstring()?.into_string().unwrap_or_default()))
                .expect("cmdline")
        };
        let devs = "virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6";
        assert_eq!(line("console=ttyS0"), format!("console=ttyS0 {devs}"));
        assert_eq!(
            line("console=ttyS0 quiet -- single -x"),
            format!("console=ttyS0 quiet {devs} -- single -x")
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            kernel_cmdline(&long, &devices),
            Err(BootError::Cmdline(_))
        ));
    }
}
