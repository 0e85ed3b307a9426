//! The same test guest under QEMU's microvm, with disks served over
//! vhost-user by the workspace's `vhost-user-blk` (or any other backend).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{artefacts, drive, guest_disk, script_disk, workspace_binary, Run, GUEST_MEM};
/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails loudly when QEMU is missing (the README's test command installs
/// it, pinned to the version of qemu-utils, with resources/install-qemu.sh).
pub fn require_qemu() -> PathBuf {
    let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
    assert!(
        path.exists(),
        "qemu-system-x86_64 is missing: run resources/install-qemu.sh (scripts/test.sh does)"
    );
    path
}

/// A vhost-user backend process serving one disk on a socket; killed when
/// dropped if it did not exit by itself.
pub struct Backend {
    /// The socket it listens on.
    pub socket: PathBuf,
    child: Child,
}

impl Backend {
    /// Starts `vhost-user-blk --socket SOCKET --disk SPEC` and waits for
    /// its socket.
    pub fn vhost_user_blk(socket: &Path, spec: &str) -> Backend {
        let mut cmd = Command::new(workspace_binary("vhost-user-blk"));
        cmd.arg("--socket").arg(socket).arg("--disk").arg(spec);
        Backend::start(cmd, socket)
    }

    /// Starts any backend command that creates `socket` and waits for it.
    pub fn start(mut cmd: Command, socket: &Path) -> Backend {
        let _ = std::fs::remove_file(socket);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the vhost-user backend");
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut text = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut text);
                }
                panic!("the vhost-user backend exited with {status}: {text}");
            }
            assert!(
                start.elapsed() < SOCKET_TIMEOUT,
                "no socket {} after {SOCKET_TIMEOUT:?}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend {
            socket: socket.to_path_buf(),
            child,
        }
    }

    /// Waits for the backend to exit (it does when its frontend goes away)
    /// and returns its status and standard error.
    pub fn wait(mut self) -> (Option<i32>, String) {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        let status = self.child.wait().expect("wait for the backend").code();
        (status, text)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots the test initramfs under QEMU microvm with one vhost-user-blk disk
/// per socket (vda, vdb, ... in order) plus the script disk, which runs as
/// /init's job. The status in the returned [`Run`] is the script's, as with
/// [`crate::boot`] (QEMU's isa-debug-exit reports `status << 1 | 1`), or -1
/// when QEMU ended otherwise.
pub fn boot_qemu(
    dir: &Path,
    sockets: &[&Path],
    script: &str,
    mut on_line: impl FnMut(&str) -> Option<String>,
) -> Run {
    let qemu = require_qemu();
    let a = artefacts();
    let script_path = script_disk(dir, script);
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={GUEST_MEM},share=on"),
        ])
        .args(["-m", GUEST_MEM, "-enable-kvm", "-nographic", "-no-reboot"])
        // QEMU 7.2's `-cpu host` aborts on hosts without VT-x/AMD-V; this
        // model boots everywhere (the guest hides the rest itself).
        .args(["-cpu", "qemu64,-cx16,-popcnt"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(&a.vmlinux)
        .arg("-initrd")
        .arg(&a.initrd)
        .arg("-append")
        .arg(format!(
            "{} addcow.run={}",
            a.cmdline,
            guest_disk(sockets.len())
        ))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    for (i, socket) in sockets.iter().enumerate() {
        cmd.arg("-chardev")
            .arg(format!("socket,id=vu{i},path={}", socket.display()))
            .args(["-device", &format!("vhost-user-blk,chardev=vu{i}")]);
    }
    cmd.arg("-drive")
        .arg(format!(
            "id=script,file={},format=raw,if=none,readonly=on",
            script_path.display()
        ))
        .args(["-device", "virtio-blk-device,drive=script"]);
    let mut run = drive(cmd, b"", |line| on_line(line).map(crate::Action::Type));
    run.status = run
        .status
        .map(|code| if code & 1 == 1 { code >> 1 } else { -1 });
    run
}
