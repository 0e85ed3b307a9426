//! Harness for tests that boot real guests through the `vmm` binary.
//!
//! A boot is expensive on hosts without hardware virtualization (~12 s of
//! guest clock to /init, ~15-18 s of wall time for a whole boot of the
//! vmlinux), so each test boots a few times and runs a script of many
//! checks.
//! The script travels on an extra read-only raw disk (the last one) and is
//! run by the initramfs's /init (`addcow.run=`), which hands its exit status
//! to the VMM's exit port. The guest reports results as `CHECK name value`
//! lines on the console; the harness collects them, and can answer console
//! lines (a marker) by writing to the guest's console input, so that the
//! host can inspect files while the guest waits.
//!
//! [`qemu`] boots the same guest under QEMU's microvm, for disks served by
//! the `vhost-user-blk` backend.

pub mod qemu;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use addcow::{Access, AddCow};
use sha2::{Digest, Sha256};

/// Guest RAM of the boots this harness makes (vmm's and QEMU's), as
/// Firecracker's default; the power tests that boot `vmm` as a user would
/// keep vmm's default of 256 MiB. On a host
/// without VT-x/AMD-V the kernel's set-up of each page (its `struct page`,
/// freeing it to the allocator) is emulated instruction by instruction:
/// 256 MiB instead of 128 cost ~2 s of guest clock before /init there.
pub const GUEST_MEM: &str = "128M";

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

/// Runs `addcow ARGS` in `dir`; panics with its stderr if it fails.
pub fn addcow_cli(dir: &Path, args: &[&str]) {
    let out = Command::new(workspace_binary("addcow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run addcow");
    assert!(
        out.status.success(),
        "addcow {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that the add-cow image at `path` reads as `model` (the whole
/// virtual disk) and that exactly the clusters in `touched` are allocated.
pub fn assert_image_is_model(path: &Path, model: &[u8], touched: &BTreeSet<u64>) {
    let disk = AddCow::open(path, Access::ReadOnly).expect("open the add-cow image");
    let mut merged = vec![0u8; model.len()];
    disk.read_at(&mut merged, 0).expect("read the merged view");
    assert!(
        merged == model,
        "{}: the merged view differs from the model",
        path.display()
    );
    for c in 0..disk.cluster_count() {
        assert_eq!(disk.is_allocated(c), touched.contains(&c), "cluster {c}");
    }
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
///
/// Most tests boot the vmlinux: on KVM's PVM backend (no VT-x/AMD-V) the
/// bzImage's decompressor takes ~8.5 s of wall time before the kernel's
/// clock starts; the ELF vmlinux has none to run. A few boots keep the
/// bzImage path tested: the reboot test, the second soak round and the
/// boots of `tests/tests/power.rs` (a piped script, the demo's root); none
/// with more than one vCPU.
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
    /// Each console line with the time the harness read it.
    pub lines: Vec<(Instant, String)>,
    /// When vmm had exited.
    pub ended: Instant,
}

impl Run {
    /// How long vmm took to exit after the first console line holding
    /// `text`; panics with the console if there is none.
    pub fn exit_delay_after(&self, text: &str) -> Duration {
        match self.lines.iter().find(|(_, l)| l.contains(text)) {
            Some((at, _)) => self.ended.saturating_duration_since(*at),
            None => panic!("no console line with '{text}'; console:\n{}", self.console),
        }
    }

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

/// Most time one boot may take before the harness kills it, unless
/// `ADDCOW_E2E_BOOT_TIMEOUT` (seconds) says otherwise (a host much slower
/// than usual).
fn boot_timeout() -> Duration {
    std::env::var("ADDCOW_E2E_BOOT_TIMEOUT")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

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
    boot_with(dir, kernel, extra_cmdline, disks, script, |line| {
        on_line(line).map(Action::Type)
    })
}

/// [`boot`], with any [`Action`] in answer to a console line.
pub fn boot_with(
    dir: &Path,
    kernel: KernelImage,
    extra_cmdline: &str,
    disks: &[Disk],
    script: &str,
    on_line: impl FnMut(&str) -> Option<Action>,
) -> Run {
    let cmd = vmm_command(dir, kernel, 1, extra_cmdline, disks, script);
    drive(cmd, b"", on_line)
}

/// [`boot`] with `vcpus` vCPUs. It may take `vcpus` times as long (on a
/// loaded 2-core host without VT-x, every cross-CPU wait of an SMP guest
/// needs both vCPU threads scheduled at once).
pub fn boot_smp(
    dir: &Path,
    kernel: KernelImage,
    vcpus: u8,
    extra_cmdline: &str,
    disks: &[Disk],
    script: &str,
    mut on_line: impl FnMut(&str) -> Option<String>,
) -> Run {
    let cmd = vmm_command(dir, kernel, vcpus, extra_cmdline, disks, script);
    let timeout = boot_timeout() * u32::from(vcpus.max(1));
    drive_within(cmd, b"", timeout, |line| on_line(line).map(Action::Type))
}

/// The vmm command line of a test boot: the guest, `disks`, the script disk
/// last, the exit port.
fn vmm_command(
    dir: &Path,
    kernel: KernelImage,
    vcpus: u8,
    extra_cmdline: &str,
    disks: &[Disk],
    script: &str,
) -> Command {
    let a = artefacts();
    let script_path = script_disk(dir, script);
    let script_dev = guest_disk(disks.len());

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
    cmd.arg("--mem").arg(GUEST_MEM);
    cmd.arg("--vcpus").arg(vcpus.to_string());
    for disk in disks {
        cmd.arg("--disk")
            .arg(format!("{}{}", disk.path.display(), disk.options));
    }
    cmd.arg("--disk")
        .arg(format!("{},ro,format=raw", script_path.display()));
    cmd
}

/// Writes `script` (with the prelude) to a raw disk image in `dir`, padded
/// to whole sectors, for `/init` to run.
pub fn script_disk(dir: &Path, script: &str) -> PathBuf {
    let script_path = dir.join(format!("script-{}.sh", std::process::id()));
    let mut bytes = format!("{SCRIPT_PRELUDE}{script}").into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(&script_path, bytes).expect("write script disk");
    script_path
}

/// The guest device name of the `index`-th virtio disk (0 = vda).
pub fn guest_disk(index: usize) -> String {
    format!("/dev/vd{}", (b'a' + index as u8) as char)
}

/// What the harness does in answer to a console line.
#[derive(Debug, Clone)]
pub enum Action {
    /// Types this on the guest's console.
    Type(String),
    /// Sends vmm this signal (a `kill` name: "TERM", "HUP", ...).
    Signal(&'static str),
}

/// Runs vmm with `args` (no script disk, no exit port: the caller says
/// everything), with `input` on its stdin followed by end of input.
pub fn run_vmm(args: &[std::ffi::OsString], input: &[u8]) -> Run {
    let mut cmd = Command::new(workspace_binary("vmm"));
    cmd.args(args);
    drive(cmd, input, |_| None)
}

/// Runs `cmd` (vmm), writing `input` to its stdin (closed after it when
/// non-empty), collecting its console and answering lines with `on_line`.
pub fn drive(cmd: Command, input: &[u8], on_line: impl FnMut(&str) -> Option<Action>) -> Run {
    drive_within(cmd, input, boot_timeout(), on_line)
}

/// [`drive`], killing the VMM after `timeout`.
pub fn drive_within(
    mut cmd: Command,
    input: &[u8],
    timeout: Duration,
    mut on_line: impl FnMut(&str) -> Option<Action>,
) -> Run {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vmm");
    let mut stdin = child.stdin.take();
    if !input.is_empty() {
        // Written at once, before the guest is up, as `printf ... | vmm` does.
        if let Some(mut pipe) = stdin.take() {
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
    }

    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send((Instant::now(), line)).is_err() {
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
    let mut timed = Vec::new();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok((at, line)) => {
                let line = line.trim_end_matches('\r').to_string();
                console.push_str(&line);
                console.push('\n');
                if let Some(rest) = line.strip_prefix("CHECK ") {
                    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                    checks.insert(name.to_string(), value.trim().to_string());
                }
                match on_line(&line) {
                    Some(Action::Type(reply)) => {
                        let pipe = stdin.as_mut().expect("the console input is still open");
                        pipe.write_all(reply.as_bytes())
                            .expect("type on the guest console");
                        pipe.flush().expect("flush console input");
                    }
                    Some(Action::Signal(name)) => {
                        let sent = Command::new("kill")
                            .arg(format!("-{name}"))
                            .arg(child.id().to_string())
                            .status()
                            .expect("run kill");
                        assert!(sent.success(), "kill -{name} failed");
                    }
                    None => {}
                }
                timed.push((at, line));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("guest did not finish in {timeout:?}; console:\n{console}");
            }
        }
    }
    let status = child.wait().expect("wait for vmm").code();
    let ended = Instant::now();
    let stderr = stderr_reader.join().unwrap_or_default();
    Run {
        status,
        console,
        stderr,
        checks,
        lines: timed,
        ended,
    }
}
