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
