//! Soak: rounds of guest writes of random blocks across the whole add-cow
//! disk, a reboot between rounds, and in every round the guest verifies what
//! the earlier rounds wrote; the host checks the merged view against its
//! model after each round, and the backing file's hash at the end.

use std::fs;

use addcow::{Access, AddCow};
use e2e::{boot, file_hash, workspace_binary, Disk, KernelImage};
use sha2::{Digest, Sha256};

const DISK: u64 = 8 << 20;
const BASE: u64 = 6 << 20;
const BLOCK: u64 = 4096;
const ROUNDS: u64 = 3;
const WRITES_PER_ROUND: u64 = 24;
const PAYLOAD: u64 = 1 << 20;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn rounds_of_random_writes_survive_reboots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base: Vec<u8> = (0..BASE).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(d.join("base.img"), &base).expect("base");
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 13 % 241) as u8 ^ 0x40).collect();
    fs::write(d.join("payload.img"), &payload).expect("payload");
    let base_hash = file_hash(&d.join("base.img"));
    let out = std::process::Command::new(workspace_binary("addcow"))
        .args([
            "create",
            "--image",
            "soak.raw",
            "--size",
            &DISK.to_string(),
            "--backing",
            "base.img",
        ])
        .args([
            "--backing-fmt",
            "raw",
            "--cluster-size",
            "64K",
            "soak.add-cow",
        ])
        .current_dir(d)
        .output()
        .expect("addcow create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut model = base.clone();
    model.resize(DISK as usize, 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..ROUNDS {
        let before = sha_hex(&model);
        // The guest first checks the whole disk against the model so far.
        let mut script = String::from(
            "check before \"$(dd if=/dev/vda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n",
        );
        for _ in 0..WRITES_PER_ROUND {
            let blocks = 1 + rng.below(8);
            let offset = rng.below(DISK / BLOCK - blocks) * BLOCK;
            let from = rng.below(PAYLOAD / BLOCK - blocks) * BLOCK;
            script.push_str(&format!(
                "dd if=/dev/vdb of=/dev/vda bs=4096 skip={} seek={} count={blocks} conv=notrunc 2>/dev/null || check failed {offset}\n",
                from / BLOCK,
                offset / BLOCK
            ));
            let (o, f, n) = (offset as usize, from as usize, (blocks * BLOCK) as usize);
            model[o..o + n].copy_from_slice(&payload[f..f + n]);
        }
        script.push_str("sync /dev/vda\ncheck after \"$(dd if=/dev/vda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n");
        let run = boot(
            d,
            if round % 2 == 0 {
                KernelImage::Vmlinux
            } else {
                KernelImage::BzImage
            },
            "",
            &[
                Disk::new(d.join("soak.add-cow"), ""),
                Disk::new(d.join("payload.img"), ",ro,format=raw"),
            ],
            &script,
            |_| None,
        );
        assert_eq!(
            run.status,
            Some(0),
            "round {round}:\n{}\n{}",
            run.console,
            run.stderr
        );
        assert!(
            !run.checks.contains_key("failed"),
            "round {round}: a write failed"
        );
        assert_eq!(
            run.check("after"),
            sha_hex(&model),
            "round {round}: guest view after writing"
        );
        assert_eq!(
            run.check("before"),
            before,
            "round {round}: guest view of earlier rounds"
        );
        let disk = AddCow::open(&d.join("soak.add-cow"), Access::ReadOnly).expect("open");
        let mut merged = vec![0u8; DISK as usize];
        disk.read_at(&mut merged, 0).expect("read");
        assert!(
            merged == model,
            "round {round}: host merged view differs from the model"
        );
    }
    assert_eq!(
        file_hash(&d.join("base.img")),
        base_hash,
        "the backing file changed"
    );
    let report = addcow::check::check(&d.join("soak.add-cow")).expect("check runs");
    assert!(report.is_clean(), "{:?}", report.problems);
}
