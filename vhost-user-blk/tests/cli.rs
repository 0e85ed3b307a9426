//! The `vhost-user-blk` binary as a user meets it without a frontend: bad
//! arguments exit 2 with a message, a second writer of one add-cow image is
//! refused, and SIGTERM flushes the disk and exits 128 + 15.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use addcow::CreateOptions;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
}

fn run(args: &[&str]) -> Output {
    binary().args(args).output().expect("run vhost-user-blk")
}

fn create_addcow(dir: &Path) -> String {
    let path = dir.join("t.add-cow");
    addcow::create(
        &path,
        &CreateOptions {
            image: "t.raw".into(),
            backing: None,
            cluster_bits: 16,
            size: Some(1 << 20),
        },
    )
    .expect("create add-cow");
    path.display().to_string()
}

/// Starts a server and waits until its socket exists.
fn serve(socket: &Path, disk: &str) -> Child {
    let mut child = binary()
        .arg("--socket")
        .arg(socket)
        .arg("--disk")
        .arg(disk)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vhost-user-blk");
    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("vhost-user-blk exited before listening: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no socket after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn bad_arguments_and_bad_disks_exit_2_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let disk = create_addcow(d);
    let sock = d.join("s").display().to_string();
    let missing = d.join("missing.add-cow").display().to_string();
    let unknown_option = format!("{disk},bogus=1");
    let no_dir = d.join("no/such/dir/s").display().to_string();
    let cases: [(&str, Vec<&str>); 5] = [
        ("no arguments", vec![]),
        ("no --disk", vec!["--socket", &sock]),
        (
            "unknown disk option",
            vec!["--socket", &sock, "--disk", &unknown_option],
        ),
        ("missing disk", vec!["--socket", &sock, "--disk", &missing]),
        (
            "socket in a missing directory",
            vec!["--socket", &no_dir, "--disk", &disk],
        ),
    ];
    for (what, args) in cases {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{what}: no message");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn a_second_writer_is_refused_and_sigterm_flushes_and_exits_143() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let disk = create_addcow(d);
    let first = serve(&d.join("s1"), &disk);

    let out = run(&[
        "--socket",
        &d.join("s2").display().to_string(),
        "--disk",
        &disk,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "second writer: {stderr}");
    assert!(
        stderr.contains("in use") || stderr.contains("lock"),
        "second writer: {stderr}"
    );
    assert!(!d.join("s2").exists(), "the refused server never listened");

    // SAFETY: kill(2) on the child's pid, which is still ours (not reaped).
    let rc = unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
    let out = first.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("disk flushed"), "{stderr}");

    // The lock went with the process: the image can be served again.
    let mut again = serve(&d.join("s3"), &disk);
    again.kill().expect("kill");
    let _ = again.wait();
}
