//! WRITE_ZEROES and DISCARD as a Linux guest sends them (issue 12), on a raw
//! disk and on an add-cow disk, in one boot, checked from the host:
//!
//! - BLKZEROOUT (WRITE_ZEROES with unmap=0, how a guest preallocates) leaves
//!   the range reading zeros and allocated on the host; on add-cow it never
//!   shows the backing file again;
//! - BLKDISCARD of a whole allocated cluster frees it in the image file;
//! - a discard smaller than a cluster on an unallocated add-cow cluster
//!   leaves the image file's allocated size unchanged;
//! - the device advertises the cluster as the discard granularity.
//!
//! busybox cannot send BLKZEROOUT: `resources/blkzero.c`, built static here,
//! travels to the guest on a raw disk of its own.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use addcow::{Access, AddCow};
use e2e::{boot, repo_root, workspace_binary, Disk, KernelImage};
use sha2::{Digest, Sha256};

const CLUSTER: u64 = 64 << 10;
const SIZE: usize = 4 << 20;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8 | 1)
        .collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes the host file system has allocated for `path`.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// Builds resources/blkzero.c as a static binary padded to whole sectors;
/// returns its path and its length in sectors.
fn build_helper(dir: &Path) -> (std::path::PathBuf, u64) {
    let bin = dir.join("blkzero");
    let out = Command::new("cc")
        .args(["-static", "-Os", "-s", "-Wall", "-o"])
        .arg(&bin)
        .arg(repo_root().join("resources/blkzero.c"))
        .output()
        .expect("run cc (the guest helper needs a C compiler and static libc)");
    assert!(
        out.status.success(),
        "cc resources/blkzero.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = fs::read(&bin).expect("read helper");
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    let sectors = bytes.len() as u64 / 512;
    let disk = dir.join("blkzero.img");
    fs::write(&disk, bytes).expect("helper disk");
    (disk, sectors)
}

#[test]
fn zeroout_keeps_space_and_discard_frees_only_whole_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (helper, helper_sectors) = build_helper(d);

    let raw = d.join("raw.img");
    fs::write(&raw, pattern(SIZE, 1)).expect("raw disk");
    let base = pattern(SIZE, 2);
    fs::write(d.join("base.img"), &base).expect("base");
    let out = Command::new(workspace_binary("addcow"))
        .args([
            "create",
            "--image",
            "data.raw",
            "--backing",
            "base.img",
            "--backing-fmt",
            "raw",
            "--cluster-size",
            "64K",
            "data.add-cow",
        ])
        .current_dir(d)
        .output()
        .expect("addcow create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = d.join("data.raw");

    // vdb: zero out clusters 2..5 whole and 4 KiB of cluster 6.
    let (zero_at, zero_len) = (2 * CLUSTER, 4 * CLUSTER + 4096);
    let rest_len = CLUSTER - 4096;
    let script = format!(
        "dd if=/dev/vdc of=/tmp/blkzero bs=512 count={helper_sectors} 2>/dev/null\n\
         chmod +x /tmp/blkzero\n\
         h() {{ dd if=$1 bs=65536 iflag=skip_bytes,count_bytes skip=$2 count=$3 2>/dev/null | sha256sum | cut -d' ' -f1; }}\n\
         check gran_raw \"$(cat /sys/block/vda/queue/discard_granularity)\"\n\
         check gran_addcow \"$(cat /sys/block/vdb/queue/discard_granularity)\"\n\
         /tmp/blkzero zeroout /dev/vda 1048576 1048576; check raw_zeroout $?\n\
         check raw_zeros \"$(h /dev/vda 1048576 1048576)\"\n\
         /tmp/blkzero zeroout /dev/vdb {zero_at} {zero_len}; check addcow_zeroout $?\n\
         check addcow_zeros \"$(h /dev/vdb {zero_at} {zero_len})\"\n\
         check addcow_rest \"$(h /dev/vdb {rest_at} {rest_len})\"\n\
         dd if=/dev/vda of=/dev/vdb bs=65536 count=1 seek=10 oflag=direct conv=fsync 2>/dev/null; check addcow_write $?\n\
         sync\n\
         echo MARK written\n\
         read -t 300 reply\n\
         /tmp/blkzero discard /dev/vdb {c10} 65536; check addcow_discard $?\n\
         sync\n\
         echo MARK discarded\n\
         read -t 300 reply\n\
         /tmp/blkzero discard /dev/vdb {sub_at} 8192; check addcow_subdiscard $?\n\
         sync\n\
         echo MARK subdiscarded\n\
         read -t 300 reply\n\
         /tmp/blkzero discard /dev/vda 3145728 65536; check raw_discard $?\n\
         sync\n",
        rest_at = zero_at + zero_len,
        c10 = 10 * CLUSTER,
        sub_at = 20 * CLUSTER + 4096,
    );

    let mut seen = Vec::new();
    let run = boot(
        d,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(&raw, ",format=raw"),
            Disk::new(d.join("data.add-cow"), ""),
            Disk::new(&helper, ",ro,format=raw"),
        ],
        &script,
        |line| {
            let mark = line.strip_prefix("MARK ")?;
            seen.push((mark.to_string(), allocated(&image), allocated(&raw)));
            Some("go\n".into())
        },
    );
    assert_eq!(
        run.status,
        Some(0),
        "guest failed:\n{}\n{}",
        run.console,
        run.stderr
    );
    for name in [
        "raw_zeroout",
        "addcow_zeroout",
        "addcow_write",
        "addcow_discard",
        "addcow_subdiscard",
        "raw_discard",
    ] {
        assert_eq!(run.check(name), "0", "{name} failed:\n{}", run.console);
    }
    assert_eq!(run.check("gran_addcow"), CLUSTER.to_string());
    assert_eq!(run.check("raw_zeros"), sha_hex(&vec![0u8; 1 << 20]));
    assert_eq!(
        run.check("addcow_zeros"),
        sha_hex(&vec![0u8; zero_len as usize])
    );
    let rest = (zero_at + zero_len) as usize;
    assert_eq!(
        run.check("addcow_rest"),
        sha_hex(&base[rest..rest + rest_len as usize]),
        "the rest of a partly zeroed cluster still reads the backing file"
    );
    let marks: Vec<&str> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
    assert_eq!(
        marks,
        ["written", "discarded", "subdiscarded"],
        "{}",
        run.console
    );
    let (_, written, raw_written) = seen[0];
    let (_, discarded, _) = seen[1];
    let (_, subdiscarded, _) = seen[2];

    // BLKZEROOUT on the raw disk: zeros on the host, nothing freed.
    assert!(
        raw_written >= SIZE as u64,
        "the raw disk lost allocation to BLKZEROOUT: {raw_written} < {SIZE}"
    );
    let raw_bytes = fs::read(&raw).expect("read raw");
    assert!(raw_bytes[1 << 20..2 << 20].iter().all(|&b| b == 0));
    // BLKZEROOUT on add-cow: five clusters (4 whole, 1 partial) really
    // allocated in the image file, and cluster 10 written.
    assert!(
        written >= 6 * CLUSTER,
        "image file after zeroout and a write: {written} < {}",
        6 * CLUSTER
    );
    // BLKDISCARD of the whole cluster 10 freed it.
    assert!(
        discarded + CLUSTER <= written,
        "a whole-cluster discard freed nothing: {written} -> {discarded}"
    );
    // A sub-cluster discard on unallocated cluster 20 allocated nothing.
    assert_eq!(
        subdiscarded, discarded,
        "a sub-cluster discard grew the image file"
    );
    // A discard on the raw disk punched its hole.
    assert!(
        allocated(&raw) + CLUSTER <= raw_written,
        "raw discard freed nothing"
    );

    // From the host, through the library: zeros where zeroed, cluster 20
    // still the base's.
    let disk = AddCow::open(&d.join("data.add-cow"), Access::ReadOnly).expect("open");
    let mut got = vec![0u8; zero_len as usize];
    disk.read_at(&mut got, zero_at).expect("read");
    assert!(got.iter().all(|&b| b == 0));
    assert!((2..=6).all(|c| disk.is_allocated(c)));
    assert!(
        !disk.is_allocated(20),
        "the sub-cluster discard allocated cluster 20"
    );
    let mut c20 = vec![0u8; CLUSTER as usize];
    disk.read_at(&mut c20, 20 * CLUSTER).expect("read");
    assert!(c20 == base[20 * CLUSTER as usize..21 * CLUSTER as usize]);
}
