//! Harness for tests that boot real guests through the `vmm` binary.
//!
//! A boot is expensive on hosts without hardware virtualization (~20 s to
//! /init), so each test boots a few times and runs a script of many checks.
//! The script travels on an extra read-only raw disk (the last one) and is
//! run by the initramfs's /init (`addcow.run=`), which hands its exit status
//! to the VMM's exit port. The guest reports results as `CHECK name value`
//! lines on the console; the harness collects them, and can answer console
//! lines (a marker) by writing to the guest's console input, so that the
//! host can inspect files while the guest waits.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// What `resources/build.sh` printed.
#[derive(Debug, Clone)]
pub struct Artefacts {
    /// bzImage.
    pub kernel: PathBuf,
    /// ELF vmlinux.
    pub vmlinux: PathBuf,
    /// Test initramfs.
    pub initrd: PathBuf,
    /// ext4 demo root filesystem.
    pub rootfs: PathBuf,
    /// Kernel command line this host needs.
    pub cmdline: String,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds (or finds in the cache) the guest, once per test process.
pub fn artefacts() -> &'static Artefacts {
    static ARTEFACTS: OnceLock<Artefacts> = OnceLock::new();
    ARTEFACTS.get_or_init(|| {
        require_kvm();
        let out = Command::new("bash")
            .arg(repo_root().join("resources/build.sh"))
            .arg("--quiet")
            .stderr(Stdio::inherit())
            .output()
            .expect("run resources/build.sh");
        assert!(out.status.success(), "resources/build.sh failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("build.sh printed no {key}="))
                .to_string()
        };
        Artefacts {
            kernel: get("kernel").into(),
            vmlinux: get("vmlinux").into(),
            initrd: get("initrd").into(),
            rootfs: get("rootfs").into(),
            cmdline: get("cmdline"),
        }
    })
}

/// Fails loudly when this machine cannot run guests.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is not usable ({e}): these tests boot real guests and need KVM");
    }
}

/// A binary of this workspace, next to the test executable's directory.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins; the README's test command does)",
        bin.display()
    );
    bin
}

/// SHA-256 of a file, to prove it did not change.
pub fn file_hash(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).expect("read file to hash")).to_vec()
}

/// One `--disk` argument.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The file.
    pub path: PathBuf,
    /// `,ro,format=...` and the like, with the leading comma.
    pub options: String,
}

impl Disk {
    /// A disk with options such as `",ro"` or `",format=raw"`.
    pub fn new(path: impl Into<PathBuf>, options: &str) -> Self {
        Disk {
            path: path.into(),
            options: options.to_string(),
        }
    }
}

/// Which kernel image a boot uses.
#[derive(Debug, Clone, Copy)]
pub enum KernelImage {
    /// The compressed bzImage.
    BzImage,
    /// The ELF vmlinux.
    Vmlinux,
}

/// What a finished boot left.
#[derive(Debug)]
pub struct Run {
    /// vmm's exit status.
    pub status: Option<i32>,
    /// Everything on the console.
    pub console: String,
    /// vmm's standard error.
    pub stderr: String,
    /// `CHECK name value` lines the guest printed.
    pub checks: BTreeMap<String, String>,
}

impl Run {
    /// The value of check `name`; panics with the console if missing.
    pub fn check(&self, name: &str) -> &str {
        match self.checks.get(name) {
            Some(value) => value,
            None => panic!(
                "the guest reported no check '{name}'; console:\n{}",
                self.console
            ),
        }
    }
}

/// Defined for every script: `check NAME VALUE` reports a result.
const SCRIPT_PRELUDE: &str = "check() { echo \"CHECK $1 $2\"; }\n";

/// Most time one boot may take before the harness kills it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Boots the test initramfs with `disks` plus a disk holding `script`, which
/// runs as the guest's /init job; `extra_cmdline` is appended to the kernel
/// command line. `on_line` sees every console line and may return text to
/// type on the guest console.
pub fn boot(
    dir: &Path,
    kernel: KernelImage,
    extra_cmdline: &str,
    disks: &[Disk],
    script: &str,
    mut on_line: impl FnMut(&str) -> Option<String>,
) -> Run {
    let a = artefacts();
    let script_path = dir.join(format!("script-{}.sh", std::process::id()));
    let mut bytes = format!("{SCRIPT_PRELUDE}{script}").into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(&script_path, bytes).expect("write script disk");
    let script_dev = format!("/dev/vd{}", (b'a' + disks.len() as u8) as char);

    let mut cmd = Command::new(workspace_binary("vmm"));
    cmd.arg("--kernel").arg(match kernel {
        KernelImage::BzImage => &a.kernel,
        KernelImage::Vmlinux => &a.vmlinux,
    });
    cmd.arg("--initrd").arg(&a.initrd);
    cmd.arg("--cmdline").arg(format!(
        "{} addcow.run={script_dev} {extra_cmdline}",
        a.cmdline
    ));
    cmd.arg("--exit-port");
    for disk in disks {
        cmd.arg("--disk")
            .arg(format!("{}{}", disk.path.display(), disk.options));
    }
    cmd.arg("--disk")
        .arg(format!("{},ro,format=raw", script_path.display()));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vmm");

    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut stdin = child.stdin.take().expect("stdin");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });

    let start = Instant::now();
    let mut console = String::new();
    let mut checks = BTreeMap::new();
    loop {
        let left = BOOT_TIMEOUT.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                console.push_str(&line);
                console.push('\n');
                if let Some(rest) = line.strip_prefix("CHECK ") {
                    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                    checks.insert(name.to_string(), value.trim().to_string());
                }
                if let Some(reply) = on_line(&line) {
                    stdin
                        .write_all(reply.as_bytes())
                        .expect("type on the guest console");
                    stdin.flush().expect("flush console input");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("guest did not finish in {BOOT_TIMEOUT:?}; console:\n{console}");
            }
        }
    }
    let status = child.wait().expect("wait for vmm").code();
    let stderr = stderr_reader.join().unwrap_or_default();
    Run {
        status,
        console,
        stderr,
        checks,
    }
}
