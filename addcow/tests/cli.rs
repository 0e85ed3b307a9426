//! The `addcow` command against qemu-img as the oracle: raw files made by
//! `qemu-img create`, merged views compared with `qemu-img compare`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

fn addcow(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_addcow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run addcow")
}

fn addcow_stdin(dir: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_addcow"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn addcow");
    // The command may fail and exit before reading: a broken pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(input);
    child.wait_with_output().expect("wait addcow")
}

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img must be installed (package qemu-utils)")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha(path: &Path) -> Vec<u8> {
    Sha256::digest(fs::read(path).expect("read")).to_vec()
}

#[test]
fn create_write_stream_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(d, &["create", "-f", "raw", "base.img", "3M"]));
    // Give the base recognisable content through qemu-io's peer, plain writes.
    let base: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    fs::write(d.join("base.img"), &base).expect("fill base");
    let base_hash = sha(&d.join("base.img"));
    ok(qemu_img(d, &["create", "-f", "raw", "test.raw", "5M"]));

    ok(addcow(
        d,
        &[
            "create",
            "-f",
            "add-cow",
            "test.add-cow",
            "-o",
            "backing_file=base.img,backing_fmt=raw,image_file=test.raw,cluster_size=4K",
        ],
    ));
    // Writes across cluster boundaries and past the backing file's end.
    let writes: [(u64, usize); 4] = [
        (4000, 300),
        (65535, 70000),
        ((3 << 20) - 10, 100),
        (5 << 20 >> 1, 1),
    ];
    let mut model = base.clone();
    model.resize(5 << 20, 0);
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j as u8) ^ (i as u8 + 0x80)).collect();
        ok(addcow_stdin(
            d,
            &["write", "test.add-cow", &offset.to_string()],
            &data,
        ));
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    let read = ok(addcow(d, &["read", "test.add-cow", "0", "5M"]));
    assert!(read.stdout == model, "merged view differs from the model");

    ok(addcow(d, &["convert", "test.add-cow", "merged.raw"]));
    assert!(fs::read(d.join("merged.raw")).expect("read merged") == model);
    // Without the final sync (qemu-img's default) the bytes are the same,
    // and an existing output is overwritten.
    ok(addcow(
        d,
        &["convert", "--no-sync", "test.add-cow", "merged.raw"],
    ));
    assert!(fs::read(d.join("merged.raw")).expect("read merged") == model);

    let check = ok(addcow(d, &["check", "test.add-cow"]));
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors"));

    ok(addcow(d, &["stream", "test.add-cow"]));
    // The image file alone is now the disk: qemu-img agrees byte for byte.
    let cmp = qemu_img(
        d,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "test.raw",
            "merged.raw",
        ],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let info = ok(addcow(d, &["info", "--json", "test.add-cow"]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["all_allocated"], true);
    assert_eq!(info["allocated_clusters"], info["clusters"]);
    assert_eq!(
        sha(&d.join("base.img")),
        base_hash,
        "the backing file changed"
    );
}

#[test]
fn map_reports_image_backing_and_zero_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(d, &["create", "-f", "raw", "base.img", "1M"]));
    ok(addcow(
        d,
        &[
            "create",
            "--image",
            "t.raw",
            "--backing",
            "base.img",
            "--backing-fmt",
            "raw",
            "--size",
            "2M",
            "t.add-cow",
        ],
    ));
    ok(addcow_stdin(d, &["write", "t.add-cow", "65536"], b"x"));
    let out = ok(addcow(d, &["map", "--json", "t.add-cow"]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let expected = serde_json::json!([
        {"start": 0, "length": 65536, "source": "backing"},
        {"start": 65536, "length": 65536, "source": "image"},
        {"start": 131072, "length": 1048576 - 131072, "source": "backing"},
        {"start": 1048576, "length": 1048576, "source": "zero"},
    ]);
    assert_eq!(map, expected);
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(addcow(
        d,
        &["create", "--image", "t.raw", "--size", "1M", "t.add-cow"],
    ));
    assert_eq!(addcow(d, &["check", "t.add-cow"]).status.code(), Some(0));

    // A stray bit past the last cluster: 1M / 64K = 16 clusters fill two
    // bytes exactly, so make the image 17 clusters and set bit 17.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.raw"))
        .expect("open");
    f.set_len(17 * 65536).expect("grow");
    drop(f);
    ok(addcow(d, &["create", "--image", "t.raw", "t.add-cow"]));
    let mut bytes = fs::read(d.join("t.add-cow")).expect("read");
    bytes[65536 + 2] = 0b10;
    fs::write(d.join("t.add-cow"), &bytes).expect("write");
    let out = addcow(d, &["check", "t.add-cow"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("past the last cluster"));

    // A broken header.
    bytes[0] = b'X';
    fs::write(d.join("t.add-cow"), &bytes).expect("write");
    let out = addcow(d, &["check", "t.add-cow"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("magic"));

    // Nothing to check.
    assert_eq!(
        addcow(d, &["check", "missing.add-cow"]).status.code(),
        Some(1)
    );
}

#[test]
fn create_refuses_what_the_spec_forbids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(qemu_img(d, &["create", "-f", "raw", "base.img", "2M"]));
    ok(qemu_img(d, &["create", "-f", "qcow2", "base.qcow2", "2M"]));
    let fails = |args: &[&str], needle: &str| {
        let out = addcow(d, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: '{err}' lacks '{needle}'");
    };
    fails(
        &[
            "create",
            "--image",
            "base.img",
            "--backing",
            "base.img",
            "--backing-fmt",
            "raw",
            "a.add-cow",
        ],
        "same file",
    );
    fails(
        &[
            "create",
            "--image",
            "small.raw",
            "--size",
            "1M",
            "--backing",
            "base.img",
            "--backing-fmt",
            "raw",
            "a.add-cow",
        ],
        "larger than image file",
    );
    fails(
        &[
            "create",
            "--image",
            "x.raw",
            "--backing",
            "base.qcow2",
            "a.add-cow",
        ],
        "qcow2",
    );
    fails(
        &["create", "--image", "base.img", "--size", "1M", "a.add-cow"],
        "never shrinks",
    );
    fails(&["create", "--image", "x.raw", "a.add-cow"], "give a size");
    // Nothing was left behind by the failures.
    assert!(!d.join("a.add-cow").exists());
    assert!(!d.join("small.raw").exists());
    assert!(!d.join("x.raw").exists());
    // Probing a raw backing file warns.
    let out = ok(addcow(
        d,
        &[
            "create",
            "--image",
            "y.raw",
            "--backing",
            "base.img",
            "b.add-cow",
        ],
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    // A second writer is refused while the first holds the image.
    let first = addcow::AddCow::open(&d.join("b.add-cow"), addcow::Access::ReadWrite)
        .expect("first writer");
    let out = addcow_stdin(d, &["write", "b.add-cow", "0"], b"z");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    drop(first);
}

/// `addcow` under `timeout`, so that a regression that blocks fails the test
/// instead of hanging it (status 124).
fn addcow_timed(dir: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_addcow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run timeout (coreutils)")
}

/// Runs the CLI with `args` in `d` under `strace -f -e trace=CALLS`;
/// returns its output and the trace.
fn strace_addcow(d: &Path, calls: &str, args: &[&str]) -> (Output, String) {
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            &format!("trace={calls}"),
            "-o",
            "trace.txt",
        ])
        .arg(env!("CARGO_BIN_EXE_addcow"))
        .args(args)
        .current_dir(d)
        .output()
        .expect("strace must be installed");
    let trace = fs::read_to_string(d.join("trace.txt")).expect("trace");
    (out, trace)
}

fn create_ok(d: &Path, args: &[&str]) {
    let mut all = vec!["create"];
    all.extend_from_slice(args);
    ok(addcow(d, &all));
}

#[test]
fn convert_refuses_every_file_of_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::write(d.join("base.raw"), vec![0x11u8; 1 << 20]).expect("base");
    create_ok(
        d,
        &[
            "--image",
            "mid.raw",
            "--backing",
            "base.raw",
            "--backing-fmt",
            "raw",
            "mid.add-cow",
        ],
    );
    ok(addcow_stdin(
        d,
        &["write", "mid.add-cow", "70000"],
        &[0x22; 5000],
    ));
    create_ok(
        d,
        &[
            "--image",
            "top.raw",
            "--backing",
            "mid.add-cow",
            "--backing-fmt",
            "add-cow",
            "--size",
            "2M",
            "top.add-cow",
        ],
    );
    ok(addcow_stdin(
        d,
        &["write", "top.add-cow", "1500000"],
        &[0x33; 5000],
    ));
    fs::hard_link(d.join("mid.raw"), d.join("hard.raw")).expect("hard link");
    std::os::unix::fs::symlink("base.raw", d.join("soft.raw")).expect("symlink");
    let snapshot = || {
        [
            "base.raw",
            "mid.raw",
            "mid.add-cow",
            "top.raw",
            "top.add-cow",
        ]
        .map(|f| fs::read(d.join(f)).expect("read"))
    };
    let before = snapshot();
    for target in [
        "mid.raw",
        "hard.raw",
        "soft.raw",
        "base.raw",
        "mid.add-cow",
        "top.raw",
        "top.add-cow",
        "./mid.raw",
    ] {
        let out = addcow(d, &["convert", "top.add-cow", target]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "convert to {target}: {err}");
        assert!(
            err.contains(target) && err.contains("refusing to overwrite"),
            "{target}: {err}"
        );
        assert!(
            snapshot() == before,
            "convert to {target} changed a file of the chain"
        );
    }
    // The chain is whole and converts to a new file.
    ok(addcow(d, &["convert", "top.add-cow", "merged.raw"]));
    let mut model = vec![0x11u8; 1 << 20];
    model[70000..75000].fill(0x22);
    model.resize(2 << 20, 0);
    model[1500000..1505000].fill(0x33);
    assert!(fs::read(d.join("merged.raw")).expect("merged") == model);
}

#[test]
fn special_files_are_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fifo = d.join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let _socket = std::os::unix::net::UnixListener::bind(d.join("sock")).expect("socket");
    fs::create_dir(d.join("dir")).expect("dir");
    fs::write(d.join("base.img"), vec![1u8; 1 << 16]).expect("base");
    for (name, kind) in [
        ("fifo", "FIFO"),
        ("sock", "socket"),
        ("dir", "directory"),
        ("/dev/null", "character device"),
    ] {
        // As the image file and as the backing file of a hostile header.
        let header_image = addcow::Header::new(12, Path::new(name), None).expect("header");
        let header_backing = addcow::Header::new(
            12,
            Path::new("a.raw"),
            Some(addcow::BackingRef {
                name: name.into(),
                format: addcow::BackingFormat::Raw,
            }),
        )
        .expect("header");
        fs::write(d.join("a.raw"), vec![0u8; 1 << 16]).expect("image");
        for header in [header_image, header_backing] {
            let mut bytes = header.encode().expect("encode");
            bytes.resize(8192, 0);
            fs::write(d.join("a.add-cow"), &bytes).expect("write");
            for verb in ["info", "check", "map"] {
                let out = addcow_timed(d, &[verb, "a.add-cow"]);
                let err = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                assert_ne!(out.status.code(), Some(124), "{verb} with {name} hangs");
                assert!(
                    !out.status.success() && err.contains(kind),
                    "{verb} with {name}: {err}"
                );
            }
        }
        // Named at create.
        let out = addcow_timed(
            d,
            &["create", "--image", "n.raw", "--backing", name, "n.add-cow"],
        );
        assert_ne!(out.status.code(), Some(124), "create with {name} hangs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(kind),
            "create with {name}: {err}"
        );
        assert!(!d.join("n.add-cow").exists() && !d.join("n.raw").exists());
    }
}

#[test]
fn a_huge_sparse_bitmap_is_a_clear_error_under_a_1g_address_space() {
    // tmpfs takes sparse files of any size; ext4 stops at 16 TiB.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm (tmpfs) for a 32 TiB sparse image file");
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("tempdir");
    let d = dir.path();
    ok(addcow(
        d,
        &[
            "create",
            "--image",
            "a.raw",
            "--size",
            "1M",
            "--cluster-size",
            "4K",
            "a.add-cow",
        ],
    ));
    // 32 TiB of 4 KiB clusters: a 1 GiB bitmap, and a sparse add-cow file that has it.
    let grow = |name: &str, len: u64| {
        fs::OpenOptions::new()
            .write(true)
            .open(d.join(name))
            .expect("open")
            .set_len(len)
            .expect("sparse");
    };
    grow("a.raw", 1 << 45);
    grow("a.add-cow", 4096 + (1 << 30));
    for verb in ["info", "check", "read"] {
        let mut args = vec![
            "--as=1073741824",
            env!("CARGO_BIN_EXE_addcow"),
            verb,
            "a.add-cow",
        ];
        if verb == "read" {
            args.extend(["0", "512"]);
        }
        let out = Command::new("prlimit")
            .args(&args)
            .current_dir(d)
            .output()
            .expect("prlimit (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(1) | Some(2)),
            "{verb}: {:?} {err}",
            out.status
        );
        assert!(err.contains("limit"), "{verb}: {err}");
    }
    // Create refuses such a disk too, before writing anything.
    let out = addcow(
        d,
        &[
            "create",
            "--image",
            "b.raw",
            "--size",
            "32T",
            "--cluster-size",
            "4K",
            "b.add-cow",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit"));
    assert!(!d.join("b.raw").exists() && !d.join("b.add-cow").exists());
}

#[test]
fn create_small_mistakes_get_the_right_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The image file and the add-cow file are one file: say so, not "in use".
    let out = addcow(
        d,
        &[
            "create",
            "--image",
            "t.add-cow",
            "--size",
            "1M",
            "t.add-cow",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("image file and the add-cow file are the same file"),
        "{err}"
    );
    assert!(
        !d.join("t.add-cow").exists(),
        "a refused create left its file"
    );
    // An empty backing_fmt probes, as an omitted one does.
    fs::write(d.join("base.img"), vec![7u8; 1 << 16]).expect("base");
    let out = ok(addcow(
        d,
        &[
            "create",
            "-f",
            "add-cow",
            "p.add-cow",
            "-o",
            "backing_file=base.img,backing_fmt=,image_file=p.raw",
        ],
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken as raw"));
    let out = ok(addcow(d, &["read", "p.add-cow", "0", "4"]));
    assert_eq!(out.stdout, [7u8; 4]);
}

#[test]
fn convert_never_truncates_a_new_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_ok(d, &["--image", "t.raw", "--size", "1M", "t.add-cow"]);
    ok(addcow_stdin(
        d,
        &["write", "t.add-cow", "4096"],
        &[0x5a; 512],
    ));
    // An existing output longer than the disk: truncated, then written.
    fs::write(d.join("old.raw"), vec![0xffu8; 3 << 20]).expect("old output");
    for (output, truncated) in [("new.raw", false), ("old.raw", true)] {
        let (out, trace) = strace_addcow(
            d,
            "ftruncate",
            &["convert", "--no-sync", "t.add-cow", output],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // ext4 writes back, when it is closed, a file truncated to 0.
        assert_eq!(trace.contains(", 0)"), truncated, "{output}:\n{trace}");
        let mut expected = vec![0u8; 1 << 20];
        expected[4096..4608].fill(0x5a);
        assert!(
            fs::read(d.join(output)).expect("output") == expected,
            "{output}"
        );
    }
}

#[test]
fn create_syncs_the_directory_of_new_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fs::create_dir(d.join("images")).expect("dir");
    let (out, trace) = strace_addcow(
        d,
        "openat,fsync,fdatasync",
        &[
            "create",
            "--image",
            "t.raw",
            "--size",
            "1M",
            "images/t.add-cow",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The descriptor the directory was opened as, then an fsync of it.
    let fd = trace
        .lines()
        .filter(|l| l.contains("openat(") && l.contains("\"images\""))
        .filter_map(|l| l.rsplit("= ").next()?.trim().parse::<i32>().ok())
        .next()
        .unwrap_or_else(|| panic!("the directory is never opened:\n{trace}"));
    assert!(
        trace.lines().any(|l| l.contains(&format!("fsync({fd})"))),
        "the directory is opened but never fsynced:\n{trace}"
    );
}

#[test]
fn check_of_a_huge_sparse_addcow_file_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_ok(d, &["--image", "t.raw", "--size", "1M", "t.add-cow"]);
    // A hostile length costs nothing on disk: 8 TiB of holes.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.add-cow"))
        .expect("open");
    file.set_len(8 << 40).expect("grow sparse");
    drop(file);
    let out = addcow_timed(d, &["check", "t.add-cow"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expected 131072"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn convert_refuses_an_output_in_use_by_another_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_ok(d, &["--image", "a.raw", "--size", "1M", "a.add-cow"]);
    fs::write(d.join("busy.raw"), vec![0x5a; 1 << 20]).expect("busy");
    create_ok(d, &["--image", "busy.raw", "busy.add-cow"]);
    // A running VMM's disk: its image file is locked for writing.
    let running =
        addcow::AddCow::open(&d.join("busy.add-cow"), addcow::Access::ReadWrite).expect("writer");
    let out = addcow(d, &["convert", "a.add-cow", "busy.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(running);
    assert_eq!(
        fs::read(d.join("busy.raw")).expect("busy"),
        vec![0x5a; 1 << 20]
    );
}

#[test]
fn a_closed_standard_output_is_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_ok(d, &["--image", "t.raw", "--size", "1M", "t.add-cow"]);
    for args in [
        &["info", "t.add-cow"][..],
        &["map", "t.add-cow"],
        &["check", "t.add-cow"],
        &["read", "t.add-cow", "0", "4096"],
    ] {
        // `addcow info t.add-cow | head -0`: the reader is gone before any write.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_addcow"))
            .args(args)
            .current_dir(d)
            .stdout(writer)
            .output()
            .expect("run addcow");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && out.status.code() != Some(101),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn a_device_named_by_a_header_is_refused_without_opening_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Opening some character devices acts (a watchdog arms, a tape rewinds,
    // /dev/ptmx makes a terminal): a hostile header must not get them opened.
    let header = addcow::Header::new(16, Path::new("/dev/ptmx"), None).expect("header");
    let mut bytes = header.encode().expect("encode");
    bytes.resize(2 << 16, 0);
    fs::write(d.join("h.add-cow"), &bytes).expect("write");
    let (out, trace) = strace_addcow(d, "openat,open", &["info", "h.add-cow"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("character device"), "{err}");
    assert!(
        !trace.contains("\"/dev/ptmx\""),
        "the device was opened:\n{trace}"
    );
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_ok(d, &["--image", "t.raw", "--size", "1M", "t.add-cow"]);
    let status = |out: Output| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), err)
    };
    for args in [
        &["read", "t.add-cow", "2M", "16"][..],
        &["read", "t.add-cow", "1048570", "16"],
        &[
            "create",
            "--image",
            "x.raw",
            "--cluster-size",
            "3K",
            "--size",
            "1M",
            "x.add-cow",
        ],
    ] {
        let (code, err) = status(addcow(d, args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}");
    }
    let (code, err) = status(addcow_stdin(d, &["write", "t.add-cow", "2M"], b"hi"));
    assert_eq!(code, Some(2), "write past the end: {err}");
    assert!(err.contains("past the end"), "{err}");
    assert!(!d.join("x.raw").exists() && !d.join("x.add-cow").exists());
}

#[test]
fn the_bitmaps_of_a_whole_chain_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Four layers of 4 TiB with 4 KiB clusters: 128 MiB of bitmap each, 512 MiB in all.
    create_ok(
        d,
        &[
            "--image",
            "l0.raw",
            "--size",
            "4T",
            "--cluster-size",
            "4K",
            "l0.add-cow",
        ],
    );
    for i in 1..4 {
        let (image, below, file) = (
            format!("l{i}.raw"),
            format!("l{}.add-cow", i - 1),
            format!("l{i}.add-cow"),
        );
        create_ok(
            d,
            &[
                "--image",
                &image,
                "--size",
                "4T",
                "--cluster-size",
                "4K",
                "--backing",
                &below,
                "--backing-fmt",
                "add-cow",
                &file,
            ],
        );
    }
    // A fifth is refused by create, before it writes anything...
    let args = [
        "create",
        "--image",
        "l4.raw",
        "--size",
        "4T",
        "--cluster-size",
        "4K",
        "--backing",
        "l3.add-cow",
        "--backing-fmt",
        "add-cow",
        "l4.add-cow",
    ];
    let out = addcow(d, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("limit"), "{err}");
    assert!(!d.join("l4.raw").exists() && !d.join("l4.add-cow").exists());
    // ...and, made by hand, by open: an error, not 640 MiB under a 1 GiB limit.
    let header = addcow::Header::new(
        12,
        Path::new("l4.raw"),
        Some(addcow::BackingRef {
            name: "l3.add-cow".into(),
            format: addcow::BackingFormat::AddCow,
        }),
    )
    .expect("header");
    let bytes = header.encode().expect("encode");
    let file = fs::File::create(d.join("l4.add-cow")).expect("add-cow");
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).expect("header");
    file.set_len(((bytes.len() as u64 + (128 << 20)).div_ceil(4096)) * 4096)
        .expect("bitmap");
    fs::File::create(d.join("l4.raw"))
        .expect("image")
        .set_len(4 << 40)
        .expect("size");
    let out = Command::new("prlimit")
        .args(["--as=1073741824", "--"])
        .arg(env!("CARGO_BIN_EXE_addcow"))
        .args(["info", "l4.add-cow"])
        .current_dir(d)
        .output()
        .expect("prlimit (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bitmaps of its backing chain"), "{err}");
}
