//! The machine itself: a guest boots, prints its banner and stops cleanly;
//! a panic is reported as one; bad input is refused before anything runs.

use std::process::Command;

use e2e::{artefacts, boot, workspace_binary, KernelImage};

#[test]
fn guest_boots_and_reboot_ends_the_vm_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `reboot -f` goes through the i8042 (reboot=k), before /init could
    // use the exit port: the VMM must exit 0 on its own.
    let run = boot(
        dir.path(),
        KernelImage::BzImage,
        "",
        &[],
        "echo \"CHECK cpus $(grep -c ^processor /proc/cpuinfo)\"\nreboot -f\nsleep 60\n",
        |_| None,
    );
    assert_eq!(
        run.status,
        Some(0),
        "console:\n{}\nstderr:\n{}",
        run.console,
        run.stderr
    );
    assert!(
        run.console.contains("Linux version 6.1"),
        "no kernel banner:\n{}",
        run.console
    );
    assert!(
        run.console.contains("addcow-guest: /init started"),
        "no /init banner:\n{}",
        run.console
    );
    assert_eq!(run.check("cpus"), "1");
}

#[test]
fn guest_panic_is_reported_as_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No such init: the kernel panics ("No working init found"), reboots
    // (panic=-1), and the VMM reports the panic instead of a clean reset.
    let run = boot(
        dir.path(),
        KernelImage::Vmlinux,
        "rdinit=/nonexistent init=/nonexistent",
        &[],
        "exit 0\n",
        |_| None,
    );
    assert_eq!(
        run.status,
        Some(1),
        "console:\n{}\nstderr:\n{}",
        run.console,
        run.stderr
    );
    assert!(
        run.stderr
            .contains("guest panicked: Kernel panic - not syncing"),
        "stderr: {}",
        run.stderr
    );
}

fn vmm(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(workspace_binary("vmm"))
        .args(args)
        .output()
        .expect("run vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_refused_with_status_2() {
    let a = artefacts();
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = a.kernel.to_str().expect("path");
    let not_a_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_a_kernel, vec![b'x'; 8192]).expect("write");
    let big_initrd = dir.path().join("big.cpio");
    std::fs::write(&big_initrd, vec![0u8; 24 << 20]).expect("write");
    // The same bzImage without XLF_KERNEL_64 (xloadflags bit 0, at 0x236).
    let mut bytes = std::fs::read(&a.kernel).expect("read kernel");
    bytes[0x236] &= !1;
    let kernel32 = dir.path().join("bzImage32");
    std::fs::write(&kernel32, bytes).expect("write");
    let long_cmdline = "x".repeat(3000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/bzImage"],
            "/nonexistent/bzImage",
        ),
        (
            vec!["--kernel", not_a_kernel.to_str().expect("path")],
            "not a Linux kernel",
        ),
        (vec!["--kernel", kernel, "--vcpus", "0"], "--vcpus"),
        (
            vec!["--kernel", kernel, "--disk", "x.img,bogus"],
            "unknown disk option",
        ),
        (
            vec!["--kernel", kernel, "--disk", "/nonexistent/d.add-cow"],
            "/nonexistent/d.add-cow",
        ),
        // The kernel decompresses to 16 MiB + init_size (~16 MiB): the
        // 24 MiB initrd would overlap it in 40 MiB.
        (
            vec![
                "--kernel",
                kernel,
                "--mem",
                "40M",
                "--initrd",
                big_initrd.to_str().expect("path"),
            ],
            "too little memory",
        ),
        (vec!["--kernel", kernel, "--mem", "16M"], "give more --mem"),
        (vec!["--kernel", kernel, "--mem", "16385K"], "page size"),
        (vec!["--kernel", kernel, "--vcpus", "9"], "must be 1 to 8"),
        (
            vec!["--kernel", kernel32.to_str().expect("path")],
            "not a 64-bit kernel",
        ),
        (
            vec!["--kernel", kernel, "--cmdline", &long_cmdline],
            "command line",
        ),
    ];
    for (args, needle) in cases {
        let (status, stderr) = vmm(&args);
        assert_eq!(status, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: '{stderr}' lacks '{needle}'"
        );
    }
}

#[test]
fn a_second_writer_of_a_disk_is_refused() {
    let a = artefacts();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.add-cow");
    let out = Command::new(workspace_binary("addcow"))
        .args(["create", "--image", "d.raw", "--size", "1M"])
        .arg(&disk)
        .current_dir(dir.path())
        .output()
        .expect("addcow create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk_arg = disk.to_str().expect("path");
    let kernel = a.kernel.to_str().expect("path");
    // The first VMM opens (and locks) its disks before the guest starts.
    let mut first = Command::new(workspace_binary("vmm"))
        .args([
            "--kernel",
            kernel,
            "--cmdline",
            &a.cmdline,
            "--disk",
            disk_arg,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("first vmm");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (status, stderr) = vmm(&["--kernel", kernel, "--disk", disk_arg]);
    let writer = Command::new(workspace_binary("addcow"))
        .args(["write", disk_arg, "0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("addcow write");
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(status, Some(2), "second vmm: {stderr}");
    assert!(
        stderr.contains("in use by another process"),
        "second vmm: {stderr}"
    );
    assert_eq!(writer.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&writer.stderr).contains("in use by another process"));
}
