//! The I/O lab on real guests: power cuts (raw blocks written with O_DIRECT,
//! and an ext4 file system), injected read and write errors, and the request
//! trace. Each power cut ends its boot; errors and trace share one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use addcow::{Access, AddCow, BackingFormat, BackingRef, CreateOptions};
use e2e::{artefacts, boot, file_hash, workspace_binary, Disk, KernelImage, Run};

const BLOCK: usize = 4096;
const DISK_SIZE: usize = 1 << 20;
/// How long the slow disk holds each FLUSH request.
const FLUSH_DELAY: std::time::Duration = std::time::Duration::from_secs(20);

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// An add-cow disk `name` (image file `name.raw`) over the raw `backing`.
fn add_cow(dir: &Path, name: &str, backing: &str, cluster_bits: u32) -> PathBuf {
    let path = dir.join(format!("{name}.add-cow"));
    addcow::create(
        &path,
        &CreateOptions {
            image: format!("{name}.raw").into(),
            backing: Some(BackingRef {
                name: backing.into(),
                format: BackingFormat::Raw,
            }),
            cluster_bits,
            size: None,
        },
    )
    .expect("create add-cow");
    path
}

/// The merged disk, read through the library once the VM is gone.
fn merged(path: &Path) -> Vec<u8> {
    let disk = AddCow::open(path, Access::ReadOnly).expect("open add-cow");
    let mut bytes = vec![0u8; disk.size() as usize];
    disk.read_at(&mut bytes, 0).expect("read add-cow");
    bytes
}

fn assert_clean(path: &Path) {
    let report = addcow::check::check(path).expect("check");
    assert!(
        report.is_clean(),
        "{}: {:?}",
        path.display(),
        report.problems
    );
}

fn assert_power_cut(run: &Run, disk: &Path, writes: u64) {
    assert_eq!(
        run.status,
        Some(3),
        "vmm must exit 3 at the power cut:\n{}\n{}",
        run.console,
        run.stderr
    );
    let line = format!(
        "vmm: power cut on disk {} after {writes} writes",
        disk.display()
    );
    assert!(
        run.stderr.lines().any(|l| l == line),
        "stderr lacks '{line}':\n{}",
        run.stderr
    );
}

/// Where each write lands (in 4 KiB blocks of a 1 MiB disk with 64 KiB
/// clusters: partial clusters, neighbours, one cluster twice).
const BLOCKS: [usize; 8] = [0, 3, 17, 18, 40, 77, 100, 150];
/// The write followed by an fsync (a FLUSH).
const FLUSHED: usize = 2;

/// One `dd` per block (one request each with O_DIRECT), an fsync after
/// write FLUSHED, then more; the power goes after the last one.
fn block_script() -> String {
    let mut script = String::new();
    for (i, block) in BLOCKS.iter().enumerate() {
        let fsync = if i == FLUSHED { ",fsync" } else { "" };
        script.push_str(&format!(
            "dd if=/dev/vdb of=/dev/vda bs={BLOCK} count=1 skip={i} seek={block} oflag=direct conv=notrunc{fsync} 2>/dev/null || check write_failed {i}\n"
        ));
    }
    script.push_str("check all_written yes\nsleep 60\n");
    script
}

/// Boots with the block script on a fresh add-cow disk; returns the disk.
fn cut_blocks(dir: &Path, name: &str, options: &str) -> (PathBuf, Run) {
    let disk = add_cow(dir, name, "base.img", 16);
    let run = boot(
        dir,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(&disk, options),
            Disk::new(dir.join("payload.img"), ",ro,format=raw"),
        ],
        &block_script(),
        |_| None,
    );
    assert_power_cut(&run, &disk, BLOCKS.len() as u64);
    assert!(
        run.checks.keys().all(|k| k != "write_failed"),
        "{:?}",
        run.checks
    );
    assert_clean(&disk);
    (disk, run)
}

#[test]
fn a_power_cut_keeps_exactly_the_flushed_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = pattern(DISK_SIZE, 1);
    let payload = pattern(BLOCKS.len() * BLOCK, 2);
    fs::write(d.join("base.img"), &base).expect("base");
    fs::write(d.join("payload.img"), &payload).expect("payload");
    let base_hash = file_hash(&d.join("base.img"));
    let new_block = |i: usize| &payload[i * BLOCK..(i + 1) * BLOCK];
    let at = |disk: &[u8], block: usize| disk[block * BLOCK..(block + 1) * BLOCK].to_vec();

    // Without a seed: exactly the blocks written up to the flush.
    let (disk, _) = cut_blocks(d, "plain", ",power-cut-after-writes=8");
    let mut model = base.clone();
    for (i, &block) in BLOCKS.iter().enumerate().take(FLUSHED + 1) {
        model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(new_block(i));
    }
    assert!(merged(&disk) == model, "the disk is not the flushed state");

    // With a seed: flushed blocks kept, each later one wholly old or new,
    // the same seed twice gives identical images.
    let options = ",power-cut-after-writes=8,power-cut-seed=7";
    let (first, _) = cut_blocks(d, "seeded1", options);
    let (second, _) = cut_blocks(d, "seeded2", options);
    let (one, two) = (merged(&first), merged(&second));
    assert!(one == two, "same seed, different disks");
    assert!(
        fs::read(d.join("seeded1.raw")).expect("image")
            == fs::read(d.join("seeded2.raw")).expect("image"),
        "same seed, different image files"
    );
    let mut kept = 0;
    let mut expected = model;
    for (i, &block) in BLOCKS.iter().enumerate().skip(FLUSHED + 1) {
        let got = at(&one, block);
        if got == new_block(i) {
            kept += 1;
            expected[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&got);
        } else {
            assert!(
                got == at(&base, block),
                "block {block} is neither old nor new"
            );
        }
    }
    assert!(one == expected, "bytes outside the written blocks changed");
    // This seed keeps some and drops some (so both cases are exercised).
    assert!(kept > 0 && kept < BLOCKS.len() - FLUSHED - 1, "{kept} kept");
    assert_eq!(
        file_hash(&d.join("base.img")),
        base_hash,
        "the backing changed"
    );
}

fn run_tool(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}

#[test]
fn ext4_survives_a_power_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.ext4");
    let base_str = base.to_str().expect("path");
    let out = run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            base_str,
            "32M",
        ],
    );
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base_hash = file_hash(&base);
    let payload = pattern(256 << 10, 3);
    fs::write(d.join("payload.img"), &payload).expect("payload");
    let disk = add_cow(d, "fs", "base.ext4", 16);

    // Files written and synced, then files written (and fsynced) until the
    // power goes.
    let script = "mount -o noatime -t ext4 /dev/vda /mnt || check mount_failed yes\n\
         for i in 1 2 3 4 5; do dd if=/dev/vdb of=/mnt/synced$i bs=4096 skip=$i count=$((i * 3)) 2>/dev/null; done\n\
         mkdir /mnt/dir && echo hello > /mnt/dir/hello.txt\n\
         sync\n\
         check synced yes\n\
         i=0; while true; do dd if=/dev/vdb of=/mnt/later$i bs=4096 count=8 conv=fsync 2>/dev/null; rm -f /mnt/later$((i - 3)); i=$((i + 1)); done\n";
    let run = boot(
        d,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(&disk, ",power-cut-after-writes=150"),
            Disk::new(d.join("payload.img"), ",ro,format=raw"),
        ],
        script,
        |_| None,
    );
    assert_power_cut(&run, &disk, 150);
    assert_eq!(
        run.check("synced"),
        "yes",
        "the cut came before the sync: raise N"
    );
    assert!(!run.checks.contains_key("mount_failed"));
    assert_clean(&disk);
    assert_eq!(file_hash(&base), base_hash, "the backing changed");

    // What a reboot would find: the journal replayed (as a mount would do),
    // then a full read-only check must be clean.
    let image = d.join("merged.ext4");
    fs::write(&image, merged(&disk)).expect("merged");
    let image_str = image.to_str().expect("path");
    let replay = run_tool("e2fsck", &["-E", "journal_only", "-p", image_str]);
    assert!(
        replay.status.code().is_some_and(|c| c <= 1),
        "journal replay: {}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let check = run_tool("e2fsck", &["-fn", image_str]);
    assert!(
        check.status.success(),
        "e2fsck -fn:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for i in 1..=5usize {
        let out = run_tool("debugfs", &["-R", &format!("cat /synced{i}"), image_str]);
        let want = &payload[i * BLOCK..(i + i * 3) * BLOCK];
        assert!(out.stdout == want, "synced{i} does not read back");
    }
    let out = run_tool("debugfs", &["-R", "cat /dir/hello.txt", image_str]);
    assert_eq!(out.stdout, b"hello\n");
}

/// A trace line the script must cause: op, sector, sectors, status.
type Expected = (&'static str, u64, u64, &'static str);

#[derive(Debug, PartialEq, Eq)]
struct Line {
    op: String,
    sector: u64,
    sectors: u64,
    status: String,
}

fn parse_trace(path: &Path) -> Vec<Line> {
    let text = fs::read_to_string(path).expect("trace");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(v["seq"], i as u64 + 1, "{line}");
            assert!(v["us"].is_u64(), "{line}");
            Line {
                op: v["op"].as_str().expect("op").to_string(),
                sector: v["sector"].as_u64().expect("sector"),
                sectors: v["sectors"].as_u64().expect("sectors"),
                status: v["status"].as_str().expect("status").to_string(),
            }
        })
        .collect()
}

#[test]
fn injected_errors_and_the_trace_of_a_scripted_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let disk = d.join("disk.img");
    let original = pattern(DISK_SIZE, 4);
    fs::write(&disk, &original).expect("disk");
    // 32 blocks: every `skip=` below reads a whole block.
    let payload = pattern(128 << 10, 5);
    fs::write(d.join("payload.img"), &payload).expect("payload");
    let trace = d.join("trace.jsonl");

    // (script line, expected trace line); GET_ID (reading the serial) marks
    // where the script's requests start and end.
    let rd = |skip: usize, bs: usize| {
        format!("dd if=/dev/vda of=/dev/null bs={bs} count=1 skip={skip} iflag=direct")
    };
    let wr = |seek: usize, extra: &str| {
        format!("dd if=/dev/vdb of=/dev/vda bs=4096 count=1 skip={seek} seek={seek} oflag=direct conv=notrunc{extra}")
    };
    let steps: Vec<(String, String, Vec<Expected>)> = vec![
        ("read_ok".into(), rd(2, 4096), vec![("read", 16, 8, "ok")]),
        (
            "read_bad".into(),
            rd(8, 4096),
            vec![("read", 64, 8, "ioerr")],
        ),
        ("read_edge".into(), rd(9, 4096), vec![("read", 72, 8, "ok")]),
        ("write_ok".into(), wr(4, ""), vec![("write", 32, 8, "ok")]),
        (
            "write_bad".into(),
            wr(16, ""),
            vec![("write", 128, 8, "ioerr")],
        ),
        (
            "write_sync".into(),
            wr(6, ",fsync"),
            vec![("write", 48, 8, "ok"), ("flush", 0, 0, "ok")],
        ),
        (
            "discard_ok".into(),
            "blkdiscard -o 196608 -l 8192 /dev/vda".into(),
            vec![("discard", 384, 16, "ok")],
        ),
        (
            "discard_bad".into(),
            "blkdiscard -o 65536 -l 4096 /dev/vda".into(),
            vec![("discard", 128, 8, "ioerr")],
        ),
        (
            "read_big".into(),
            rd(4, 65536),
            vec![("read", 512, 128, "ok")],
        ),
    ];
    // `r` runs a command and sets s (its status) and e (1 if its first
    // error line is EIO), with no process but the command (forks are slow).
    let mut script = String::from(
        "r() { \"$@\" 2>/tmp/err; s=$?; read -r e </tmp/err; case \"$e\" in *Input/output*) e=1;; *) e=0;; esac; }\n\
         cat /sys/block/vda/serial >/dev/null\n",
    );
    for (name, command, _) in &steps {
        script.push_str(&format!("r {command}; check {name} \"$s:$e\"\n"));
    }
    script.push_str("cat /sys/block/vda/serial >/dev/null\n");
    // A slow FLUSH on vdc (held FLUSH_DELAY on the host) must not hold up a
    // read of vdb: each disk has its own I/O thread. The read starts once
    // the write before the FLUSH has completed (field 5 of the stat file)
    // and dd sleeps in its fsync (state D): the FLUSH is in flight.
    script.push_str(
        "dd if=/dev/zero of=/dev/vdc bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null &\n\
         flusher=$!\n\
         w=0; st=R\n\
         while [ \"$w\" -lt 1 ] || [ \"$st\" != D ]; do\n\
             read -r _ _ _ _ w _ </sys/block/vdc/stat; read -r _ _ st _ </proc/$flusher/stat || break\n\
         done\n\
         read -r t0 _ </proc/uptime\n\
         dd if=/dev/vdb of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null\n\
         read -r t1 _ </proc/uptime\n\
         if kill -0 $flusher 2>/dev/null; then check read_during_flush yes; else check read_during_flush no; fi\n\
         check read_seconds \"$t0 $t1\"\n\
         wait $flusher; check flushed $?\n",
    );
    let slow = d.join("slow.img");
    fs::write(&slow, pattern(DISK_SIZE, 6)).expect("slow disk");
    let run = boot(
        d,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(
                &disk,
                &format!(
                    ",format=raw,fail-read=64:8,fail-write=128:8,trace={}",
                    trace.display()
                ),
            ),
            Disk::new(d.join("payload.img"), ",ro,format=raw"),
            Disk::new(
                &slow,
                &format!(",format=raw,flush-delay-ms={}", FLUSH_DELAY.as_millis()),
            ),
        ],
        &script,
        |_| None,
    );
    assert_eq!(
        run.status,
        Some(0),
        "guest failed:\n{}\n{}",
        run.console,
        run.stderr
    );
    // The other disk answered while vdc's FLUSH was held.
    assert_eq!(run.check("read_during_flush"), "yes", "{}", run.console);
    assert_eq!(run.check("flushed"), "0");
    eprintln!(
        "vdb 4 KiB read during vdc's {FLUSH_DELAY:?} FLUSH, guest uptime before and after: {}",
        run.check("read_seconds")
    );
    assert!(fs::read(&slow).expect("slow disk")[..BLOCK] == [0u8; BLOCK]);
    // EIO in the range, success elsewhere.
    for (name, _, lines) in &steps {
        let failed = lines.iter().any(|l| l.3 == "ioerr");
        let expected = if failed { "1:1" } else { "0:0" };
        assert_eq!(run.check(name), expected, "{name}");
    }
    // Failed writes left the host bytes alone; good ones landed.
    let after = fs::read(&disk).expect("disk");
    let blk = |b: &[u8], i: usize| b[i * BLOCK..(i + 1) * BLOCK].to_vec();
    assert!(
        blk(&after, 16) == blk(&original, 16),
        "a failed write changed the disk"
    );
    assert!(blk(&after, 4) == blk(&payload, 4) && blk(&after, 6) == blk(&payload, 6));
    assert!(after[196608..196608 + 8192].iter().all(|&b| b == 0));
    assert!(blk(&after, 16) == blk(&original, 16));

    // The trace: boot-time reads, then exactly the script's requests
    // between the two GET_IDs.
    let lines = parse_trace(&trace);
    let first = lines
        .iter()
        .position(|l| l.op == "get_id")
        .expect("a get_id");
    assert!(
        lines[..first].iter().all(|l| l.op == "read"),
        "{:?}",
        &lines[..first]
    );
    let last = lines
        .iter()
        .rposition(|l| l.op == "get_id")
        .expect("a get_id");
    let expected: Vec<Line> = steps
        .iter()
        .flat_map(|(_, _, lines)| lines.iter())
        .map(|&(op, sector, sectors, status)| Line {
            op: op.into(),
            sector,
            sectors,
            status: status.into(),
        })
        .collect();
    assert_eq!(lines[first + 1..last], expected[..]);
}

#[test]
fn bad_lab_options_are_refused() {
    let a = artefacts();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.img");
    fs::write(&disk, vec![1u8; 4096]).expect("disk");
    let disk = disk.display().to_string();
    for (options, needle) in [
        (",power-cut-after-writes=0", "at least 1"),
        (",power-cut-seed=3", "needs power-cut-after-writes"),
        (",fail-read=1", "fail-read=1"),
        (",ro,power-cut-after-writes=2", "read-only"),
        (&format!(",trace={disk}") as &str, "trace file"),
    ] {
        let out = Command::new(workspace_binary("vmm"))
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--disk")
            .arg(format!("{disk}{options}"))
            .output()
            .expect("run vmm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{options}: {stderr}");
        assert!(stderr.contains(needle), "{options}: {stderr}");
    }
    assert_eq!(
        fs::read(&disk).expect("disk"),
        vec![1u8; 4096],
        "the disk survived"
    );
}
