//! What a kernel image says about itself before anything is loaded: its
//! kind, how much guest memory it occupies while it boots, and where its
//! initrd may go.
//!
//! A bzImage's protected-mode part is loaded at 1 MiB, but it decompresses
//! to max(16 MiB, `pref_address`) and uses `init_size` bytes from there
//! (the relocatable kernel rounds its load address up to `kernel_alignment`,
//! 16 MiB here, and never goes below its `pref_address`): the initrd must lie
//! above all of that. An ELF vmlinux occupies its `PT_LOAD` segments at their
//! physical addresses, BSS included.

use std::io::{Read, Seek, SeekFrom};

use super::layout::HIMEM_START;

/// Offset of the setup header fields, from the start of a bzImage file
/// (Linux `Documentation/arch/x86/boot.rst`).
mod hdr {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const LOADFLAGS: usize = 0x211;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const XLOADFLAGS: usize = 0x236;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// Bytes of the file that hold every field read here.
    pub const END: usize = 0x264;
}

/// "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12: the first with `xloadflags` (and `pref_address`, `init_size`).
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// Boot protocol 2.03: the first with `initrd_addr_max`.
const PROTOCOL_INITRD_ADDR_MAX: u16 = 0x0203;
/// `initrd_addr_max` of kernels older than 2.03.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Highest address an initrd may end at for a kernel without a setup header
/// (ELF vmlinux): the boot protocol's 2 GiB.
pub const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// `loadflags` bit 0: the protected-mode kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 1;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1;
/// Where the relocatable kernel decompresses at the lowest: the load address
/// (1 MiB) rounded up to the 16 MiB `kernel_alignment` the VMM gives it.
pub const MIN_DECOMPRESS_ADDRESS: u64 = 16 << 20;

/// The kinds of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage (64-bit boot protocol).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// What loading needs to know of a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// bzImage or ELF.
    pub kind: KernelKind,
    /// The first guest address above everything the kernel writes while it
    /// loads and decompresses (the initrd goes at or above it).
    pub footprint_end: u64,
    /// The highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

/// Why an image cannot be booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelProblem {
    /// Neither an ELF file nor a bzImage.
    NotAKernel,
    /// A bzImage without the 64-bit entry point (protocol before 2.12, or
    /// `XLF_KERNEL_64` clear), or an ELF file that is not 64-bit.
    Not64Bit,
    /// The image could not be read (short, or I/O error).
    Truncated,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Reads what [`KernelInfo`] holds from a kernel image.
pub fn inspect<R: Read + Seek>(image: &mut R) -> Result<KernelInfo, KernelProblem> {
    let len = image
        .seek(SeekFrom::End(0))
        .map_err(|_| KernelProblem::Truncated)?;
    let mut head = vec![0u8; hdr::END];
    image.rewind().map_err(|_| KernelProblem::Truncated)?;
    let got = read_up_to(image, &mut head)?;
    if got >= 4 && head[..4] == *b"\x7fELF" {
        return inspect_elf(image, &head[..got]);
    }
    if got < hdr::END || u32_at(&head, hdr::HEADER) != HDR_MAGIC {
        return Err(KernelProblem::NotAKernel);
    }
    inspect_bzimage(&head, len)
}

fn read_up_to<R: Read>(image: &mut R, buf: &mut [u8]) -> Result<usize, KernelProblem> {
    let mut got = 0;
    while got < buf.len() {
        match image.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(KernelProblem::Truncated),
        }
    }
    Ok(got)
}

fn inspect_bzimage(head: &[u8], file_len: u64) -> Result<KernelInfo, KernelProblem> {
    let version = u16_at(head, hdr::VERSION);
    if head[hdr::LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(KernelProblem::NotAKernel);
    }
    if version < PROTOCOL_XLOADFLAGS || u16_at(head, hdr::XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(KernelProblem::Not64Bit);
    }
    let setup_sects = match head[hdr::SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let protected_mode = file_len.saturating_sub((setup_sects + 1) * 512);
    let decompress_at = MIN_DECOMPRESS_ADDRESS.max(u64_at(head, hdr::PREF_ADDRESS));
    let decompressed_end = decompress_at.saturating_add(u64::from(u32_at(head, hdr::INIT_SIZE)));
    let initrd_addr_max = if version >= PROTOCOL_INITRD_ADDR_MAX {
        u64::from(u32_at(head, hdr::INITRD_ADDR_MAX))
    } else {
        OLD_INITRD_ADDR_MAX
    };
    Ok(KernelInfo {
        kind: KernelKind::BzImage,
        footprint_end: decompressed_end.max(HIMEM_START + protected_mode),
        initrd_addr_max,
    })
}

fn inspect_elf<R: Read + Seek>(image: &mut R, head: &[u8]) -> Result<KernelInfo, KernelProblem> {
    const ELFCLASS64: u8 = 2;
    const PT_LOAD: u32 = 1;
    const EHDR_LEN: usize = 64;
    const PHDR_LEN: usize = 56;
    if head.len() < EHDR_LEN {
        return Err(KernelProblem::Truncated);
    }
    if head[4] != ELFCLASS64 {
        return Err(KernelProblem::Not64Bit);
    }
    let phoff = u64_at(head, 0x20);
    let phentsize = usize::from(u16_at(head, 0x36));
    let phnum = usize::from(u16_at(head, 0x38));
    if phentsize < PHDR_LEN {
        return Err(KernelProblem::NotAKernel);
    }
    image
        .seek(SeekFrom::Start(phoff))
        .map_err(|_| KernelProblem::Truncated)?;
    let mut table = vec![0u8; phentsize * phnum];
    if read_up_to(image, &mut table)? != table.len() {
        return Err(KernelProblem::Truncated);
    }
    let footprint_end = table
        .chunks_exact(phentsize)
        .filter(|ph| u32_at(ph, 0) == PT_LOAD)
        .map(|ph| u64_at(ph, 0x18).saturating_add(u64_at(ph, 0x28)))
        .max()
        .ok_or(KernelProblem::NotAKernel)?;
    Ok(KernelInfo {
        kind: KernelKind::Elf,
        footprint_end,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// A bzImage header of protocol `version` with the given fields, followed
    /// by `pm_len` bytes of protected-mode kernel.
    pub(crate) fn bzimage(
        version: u16,
        xloadflags: u16,
        pref_address: u64,
        init_size: u32,
        initrd_addr_max: u32,
        pm_len: usize,
    ) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512 + pm_len];
        b[hdr::SETUP_SECTS] = setup_sects;
        b[hdr::HEADER..hdr::HEADER + 4].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        b[hdr::VERSION..hdr::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        b[hdr::LOADFLAGS] = LOADED_HIGH;
        // code32_start: 1 MiB.
        b[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        b[hdr::INITRD_ADDR_MAX..hdr::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&initrd_addr_max.to_le_bytes());
        b[hdr::XLOADFLAGS..hdr::XLOADFLAGS + 2].copy_from_slice(&xloadflags.to_le_bytes());
        b[hdr::PREF_ADDRESS..hdr::PREF_ADDRESS + 8].copy_from_slice(&pref_address.to_le_bytes());
        b[hdr::INIT_SIZE..hdr::INIT_SIZE + 4].copy_from_slice(&init_size.to_le_bytes());
        b
    }

    fn inspect_bytes(bytes: Vec<u8>) -> Result<KernelInfo, KernelProblem> {
        inspect(&mut Cursor::new(bytes))
    }

    #[test]
    fn bzimage_footprint_is_the_decompression_buffer() {
        // Linux's defaults: pref_address 16 MiB; init_size 20 MiB.
        let info = inspect_bytes(bzimage(0x020f, 0x7f, 16 << 20, 20 << 20, 0x7fff_ffff, 4096));
        assert_eq!(
            info,
            Ok(KernelInfo {
                kind: KernelKind::BzImage,
                footprint_end: 36 << 20,
                initrd_addr_max: 0x7fff_ffff,
            })
        );
        // A preferred address above 16 MiB moves the buffer up.
        let info = inspect_bytes(bzimage(0x020f, 1, 32 << 20, 8 << 20, 0x3fff_ffff, 4096));
        assert_eq!(info.map(|i| i.footprint_end), Ok(40 << 20));
        // A preferred address below 16 MiB does not move it down.
        let info = inspect_bytes(bzimage(0x020f, 1, 2 << 20, 8 << 20, 0x3fff_ffff, 4096));
        assert_eq!(info.map(|i| i.footprint_end), Ok(24 << 20));
        // A protected-mode part larger than its buffer ends the footprint itself.
        let info = inspect_bytes(bzimage(0x020f, 1, 16 << 20, 1 << 20, 0x3fff_ffff, 20 << 20));
        assert_eq!(info.map(|i| i.footprint_end), Ok(HIMEM_START + (20 << 20)));
    }

    #[test]
    fn bzimage_without_a_64_bit_entry_is_refused() {
        let no_xlf = inspect_bytes(bzimage(0x020f, 0, 16 << 20, 1 << 20, 0x7fff_ffff, 512));
        assert_eq!(no_xlf, Err(KernelProblem::Not64Bit));
        let old = inspect_bytes(bzimage(0x020b, 1, 16 << 20, 1 << 20, 0x7fff_ffff, 512));
        assert_eq!(old, Err(KernelProblem::Not64Bit));
    }

    #[test]
    fn not_a_kernel_at_all() {
        assert_eq!(
            inspect_bytes(vec![b'x'; 8192]),
            Err(KernelProblem::NotAKernel)
        );
        assert_eq!(inspect_bytes(Vec::new()), Err(KernelProblem::NotAKernel));
        assert_eq!(
            inspect_bytes(b"\x7fELF".to_vec()),
            Err(KernelProblem::Truncated)
        );
    }

    pub(crate) fn elf(class: u8, segments: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = class;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for &(kind, paddr, memsz) in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
            ph[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b
    }

    #[test]
    fn elf_footprint_is_its_highest_load_segment() {
        let image = elf(
            2,
            &[
                (1, 0x100_0000, 0x80_0000),
                (4, 0x900_0000, 0x1000),
                (1, 0x200_0000, 0x40_0000),
            ],
        );
        assert_eq!(
            inspect_bytes(image),
            Ok(KernelInfo {
                kind: KernelKind::Elf,
                footprint_end: 0x240_0000,
                initrd_addr_max: ELF_INITRD_ADDR_MAX,
            })
        );
        assert_eq!(
            inspect_bytes(elf(1, &[(1, 0, 1)])),
            Err(KernelProblem::Not64Bit)
        );
        assert_eq!(
            inspect_bytes(elf(2, &[(4, 0, 1)])),
            Err(KernelProblem::NotAKernel)
        );
    }
}
