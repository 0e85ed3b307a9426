//! add-cow disks served to QEMU by `vhost-user-blk`, in two boots:
//!
//! 1. QEMU microvm with two disks from `vhost-user-blk`: an add-cow disk
//!    the guest reads (through the backing file, and past its end), writes
//!    across cluster boundaries and flushes, and a read-only raw disk that
//!    refuses writes; the host then checks the bytes against a model, the
//!    bitmap against the touched clusters, `addcow check`, and the backing;
//! 2. vmm running the same script on a second, identical disk: both
//!    transports must leave the same bytes and the same bitmap.

use std::fs;
use std::path::Path;

use e2e::qemu::{boot_qemu, Backend};
use e2e::{assert_image_is_model, boot, file_hash, workspace_binary, Disk, KernelImage};
use sha2::{Digest, Sha256};

const CLUSTER: u64 = 64 << 10;
const BASE_SIZE: usize = 2 << 20;
const DISK_SIZE: usize = 3 << 20;
const PAYLOAD_SIZE: usize = 1 << 20;

/// (disk offset, length, payload offset) of each guest write: inside one
/// cluster, across one boundary, over several clusters, across the end of
/// the backing file, at the very end of the disk.
const WRITES: [(u64, u64, u64); 5] = [
    (1000, 3000, 0),
    (CLUSTER - 700, 1400, 5000),
    (3 * CLUSTER + 123, 2 * CLUSTER + 10, 9000),
    (BASE_SIZE as u64 - 100, 300, 1234),
    (DISK_SIZE as u64 - 50, 50, 77),
];

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn addcow_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(workspace_binary("addcow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run addcow")
}

fn create_disk(dir: &Path, name: &str) {
    let out = addcow_cli(
        dir,
        &[
            "create",
            "--image",
            &format!("{name}.raw"),
            "--size",
            &DISK_SIZE.to_string(),
            "--backing",
            "base.img",
            "--backing-fmt",
            "raw",
            "--cluster-size",
            "64K",
            &format!("{name}.add-cow"),
        ],
    );
    assert!(out.status.success(), "create {name}: {out:?}");
}

/// The guest's workload: vda is the add-cow disk, vdb the read-only payload.
fn workload() -> String {
    let mut script = String::from(
        "h() { dd if=/dev/vda bs=65536 iflag=skip_bytes,count_bytes skip=$1 count=$2 2>/dev/null | sha256sum | cut -d' ' -f1; }\n\
         check base \"$(h 0 2097152)\"\n\
         check tail \"$(h 2097152 1048576)\"\n\
         check serial \"$(cat /sys/block/vda/serial)\"\n",
    );
    for (offset, len, from) in WRITES {
        script.push_str(&format!(
            "dd if=/dev/vdb of=/dev/vda bs=4096 iflag=skip_bytes,count_bytes,fullblock oflag=seek_bytes \
             skip={from} seek={offset} count={len} conv=notrunc 2>/dev/null || check write_failed {offset}\n"
        ));
    }
    script.push_str(
        "sync /dev/vda\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         check after \"$(h 0 3145728)\"\n\
         check ro_flag \"$(cat /sys/block/vdb/ro)\"\n\
         dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null; check ro_write $?\n\
         check ro_read \"$(dd if=/dev/vdb bs=65536 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n",
    );
    script
}

#[test]
fn qemu_boots_on_an_add_cow_disk_served_by_vhost_user_blk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = pattern(BASE_SIZE, 1);
    let payload = pattern(PAYLOAD_SIZE, 2);
    fs::write(d.join("base.img"), &base).expect("base");
    fs::write(d.join("payload.img"), &payload).expect("payload");
    let base_hash = file_hash(&d.join("base.img"));
    let payload_hash = file_hash(&d.join("payload.img"));
    create_disk(d, "vu");
    create_disk(d, "vmm");

    let mut model = base.clone();
    model.resize(DISK_SIZE, 0);
    let mut touched = std::collections::BTreeSet::new();
    for (offset, len, from) in WRITES {
        model[offset as usize..(offset + len) as usize]
            .copy_from_slice(&payload[from as usize..(from + len) as usize]);
        touched.extend(offset / CLUSTER..=(offset + len - 1) / CLUSTER);
    }

    // Boot 1: QEMU with both disks from vhost-user-blk.
    let data = Backend::vhost_user_blk(
        &d.join("data.sock"),
        &d.join("vu.add-cow").display().to_string(),
    );
    let ro = Backend::vhost_user_blk(
        &d.join("ro.sock"),
        &format!("{},ro,format=raw", d.join("payload.img").display()),
    );
    let run = boot_qemu(d, &[&data.socket, &ro.socket], &workload(), |_| None);
    assert_eq!(
        run.status,
        Some(0),
        "guest under QEMU failed:\n{}\n{}",
        run.console,
        run.stderr
    );
    // Each backend exits 0 by itself when QEMU disconnects, after a flush.
    for (name, backend) in [("data", data), ("ro", ro)] {
        let (status, stderr) = backend.wait();
        assert_eq!(status, Some(0), "{name} backend: {stderr}");
        assert!(stderr.contains("frontend disconnected"), "{name}: {stderr}");
    }
    assert!(!run.checks.contains_key("write_failed"), "{:?}", run.checks);
    assert_eq!(
        run.check("base"),
        sha_hex(&base),
        "base via the backing file"
    );
    assert_eq!(
        run.check("tail"),
        sha_hex(&vec![0; DISK_SIZE - BASE_SIZE]),
        "zeros past the backing file"
    );
    assert_eq!(
        run.check("after"),
        sha_hex(&model),
        "guest's view after writing"
    );
    assert_eq!(run.check("ro_flag"), "1", "the read-only disk is read-only");
    assert_ne!(
        run.check("ro_write"),
        "0",
        "a write to the read-only disk succeeded"
    );
    assert_eq!(run.check("ro_read"), sha_hex(&payload));
    let serial = run.check("serial");
    assert!(
        serial.starts_with("acow-") && serial.len() == 20,
        "serial {serial}"
    );

    // The host: model bytes, exactly the touched clusters, a clean check,
    // an unchanged backing and read-only disk.
    assert_image_is_model(&d.join("vu.add-cow"), &model, &touched);
    let check = addcow_cli(d, &["check", "vu.add-cow"]);
    assert!(check.status.success(), "addcow check: {check:?}");
    assert_eq!(
        file_hash(&d.join("base.img")),
        base_hash,
        "base.img changed"
    );
    assert_eq!(
        file_hash(&d.join("payload.img")),
        payload_hash,
        "the read-only disk changed"
    );

    // Boot 2: vmm's in-process device, the same script, an identical disk.
    let run = boot(
        d,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(d.join("vmm.add-cow"), ""),
            Disk::new(d.join("payload.img"), ",ro,format=raw"),
        ],
        &workload(),
        |_| None,
    );
    assert_eq!(
        run.status,
        Some(0),
        "guest under vmm failed:\n{}",
        run.console
    );
    assert_eq!(run.check("after"), sha_hex(&model));
    assert_eq!(
        fs::read(d.join("vmm.raw")).expect("vmm image file"),
        fs::read(d.join("vu.raw")).expect("vhost-user image file"),
        "the image files differ between the two transports"
    );
    let header_len = CLUSTER as usize;
    assert_eq!(
        fs::read(d.join("vmm.add-cow")).expect("vmm add-cow")[header_len..],
        fs::read(d.join("vu.add-cow")).expect("vhost-user add-cow")[header_len..],
        "the bitmaps differ between the two transports"
    );
}
