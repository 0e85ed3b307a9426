//! How a VM ends: `poweroff` and `halt` end vmm with status 0, through ACPI
//! S5 (the project's kernel has ACPI) and without it (`acpi=off`, and `halt`
//! always: the kernel halts every CPU with interrupts off); console input
//! piped to vmm reaches the guest whole; SIGTERM during guest writes stops
//! the VM with status 143 and the data the guest had flushed on disk.
//!
//! The time from the guest's command to vmm's exit is printed, not asserted
//! (the host's speed varies); the harness's timeout catches a VMM that never
//! exits.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;

use addcow::{Access, AddCow};
use e2e::{
    addcow_cli, artefacts, boot_with, drive, run_vmm, workspace_binary, Action, Disk, KernelImage,
    Run,
};

fn assert_status(what: &str, run: &Run, status: i32) {
    assert_eq!(
        run.status,
        Some(status),
        "{what}: vmm did not exit {status}; console:\n{}\nstderr:\n{}",
        run.console,
        run.stderr
    );
}

/// The line `echo` prints for a 150-byte argument built in the guest (the
/// `$((40+2))` tells it from the terminal's echo of the command).
fn long_line() -> (String, String) {
    let tail: String = (0..150u8).map(|i| (b'a' + i % 26) as char).collect();
    (
        format!("echo \"long-$((40+2))-{tail}\""),
        format!("long-42-{tail}"),
    )
}

/// What the kernel prints when it powers off through ACPI. Linux 6.1 prints
/// it on a reboot too: the exit status is the evidence of a power-off.
const S5: &str = "ACPI: PM: Preparing to enter system sleep state S5";

/// Once lost the script's first three bytes ("o hi" ran for "echo hi"):
/// input the VMM put in the FIFO during the 8250 probe's IER test was read
/// away by the probe's and the port start-up's RBR reads (see
/// `devices/src/legacy/serial.rs`).
#[test]
fn a_piped_script_runs_whole_and_poweroff_f_ends_the_vm() {
    let a = artefacts();
    let (command, expected) = long_line();
    // No addcow.run=: /init starts a shell on the console, which reads the
    // script from vmm's stdin, a pipe closed right after the script.
    let script = format!("echo hi\n{command}\necho \"POWER$((1+1))OFF\"; poweroff -f\n");
    assert!(command.len() > 64);
    let args: Vec<OsString> = vec![
        "--kernel".into(),
        a.kernel.clone().into(),
        "--initrd".into(),
        a.initrd.clone().into(),
        "--cmdline".into(),
        a.cmdline.clone().into(),
    ];
    let run = run_vmm(&args, script.as_bytes());
    assert_status("poweroff -f", &run, 0);
    assert!(
        run.console.contains(S5),
        "poweroff -f did not go through ACPI S5:\n{}",
        run.console
    );
    let has = |line: &str| run.console.lines().any(|l| l == line);
    assert!(has("hi"), "'echo hi' did not run:\n{}", run.console);
    assert!(
        has(&expected),
        "the {}-byte line did not arrive whole:\n{}",
        command.len(),
        run.console
    );
    eprintln!(
        "poweroff -f: vmm exited {:?} after the guest's command, {:?} after the kernel's last line",
        run.exit_delay_after("POWER2OFF"),
        run.exit_delay_after("reboot: Power down")
    );
}

/// Boots the demo root file system (busybox init, a shell on the console)
/// on an add-cow disk over it, typing `command` once the shell is up;
/// `extra_cmdline` goes to the kernel.
fn boot_demo_root(dir: &Path, extra_cmdline: &str, command: &str) -> Run {
    let a = artefacts();
    let rootfs = a.rootfs.display().to_string();
    addcow_cli(
        dir,
        &[
            "create",
            "--image",
            "root.raw",
            "--backing",
            &rootfs,
            "--backing-fmt",
            "raw",
            "root.add-cow",
        ],
    );
    let mut cmd = Command::new(workspace_binary("vmm"));
    cmd.arg("--kernel")
        .arg(&a.kernel)
        .arg("--cmdline")
        .arg(format!("{} root=/dev/vda rw {extra_cmdline}", a.cmdline))
        .arg("--disk")
        .arg(dir.join("root.add-cow"));
    let mut typed = false;
    let command = command.to_string();
    drive(cmd, b"", move |line| {
        // The motd is the last thing rcS prints before the shell starts.
        (!typed && line.contains("addcow-vmm demo")).then(|| {
            typed = true;
            Action::Type(format!("echo \"CMD$((1+1))\"; {command}\n"))
        })
    })
}

/// `halt -f` halts every CPU with interrupts off, ACPI or not; a plain
/// `poweroff` of a kernel without ACPI (`acpi=off`) does the same.
#[test]
fn halt_f_and_a_plain_poweroff_without_acpi_end_the_vm() {
    for (command, extra_cmdline) in [("halt -f", ""), ("poweroff", "acpi=off")] {
        let what = format!("{command} ({extra_cmdline})");
        let dir = tempfile::tempdir().expect("tempdir");
        let run = boot_demo_root(dir.path(), extra_cmdline, command);
        assert_status(&what, &run, 0);
        assert!(
            !run.console.contains(S5),
            "{what} went through ACPI S5:\n{}",
            run.console
        );
        eprintln!(
            "{what}: vmm exited {:?} after the guest's command, {:?} after the kernel's last line",
            run.exit_delay_after("CMD2"),
            run.exit_delay_after("reboot: System halted")
        );
        addcow_cli(dir.path(), &["check", "root.add-cow"]);
    }
}

#[test]
fn sigterm_during_guest_writes_keeps_what_the_guest_flushed() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pattern: Vec<u8> = (0..MIB as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    fs::write(d.join("pattern.img"), &pattern).expect("pattern");
    addcow_cli(
        d,
        &[
            "create",
            "--image",
            "data.raw",
            "--size",
            "4M",
            "data.add-cow",
        ],
    );
    // The first MiB is written and flushed; then writes go on behind it,
    // each flushed, until the host's SIGTERM stops the VM.
    let script = "dd if=/dev/vdb of=/dev/vda bs=65536 count=16 conv=fsync 2>/dev/null\n\
                  (i=0; while :; do dd if=/dev/vdb of=/dev/vda bs=65536 skip=$((i % 16)) seek=$((16 + i % 32)) count=1 conv=fsync 2>/dev/null; i=$((i + 1)); done) &\n\
                  sleep 1\n\
                  echo FLUSHED\n\
                  wait\n";
    let mut signalled = false;
    let run = boot_with(
        d,
        KernelImage::Vmlinux,
        "",
        &[
            Disk::new(d.join("data.add-cow"), ""),
            Disk::new(d.join("pattern.img"), ",ro,format=raw"),
        ],
        script,
        |line| {
            (line == "FLUSHED" && !signalled).then(|| {
                signalled = true;
                Action::Signal("TERM")
            })
        },
    );
    assert!(signalled, "the guest never flushed:\n{}", run.console);
    assert_status("SIGTERM", &run, 143);
    assert!(
        run.stderr.contains("stopped by signal 15"),
        "stderr: {}",
        run.stderr
    );
    eprintln!(
        "SIGTERM: vmm exited {:?} after the guest's FLUSHED",
        run.exit_delay_after("FLUSHED")
    );
    addcow_cli(d, &["check", "data.add-cow"]);
    let disk = AddCow::open(&d.join("data.add-cow"), Access::ReadOnly).expect("open");
    let mut flushed = vec![0u8; MIB];
    disk.read_at(&mut flushed, 0).expect("read");
    assert!(flushed == pattern, "the flushed MiB is not on disk");
}
