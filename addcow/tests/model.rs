//! Model-based tests: random operations on an add-cow image (with a raw
//! backing file, an add-cow backing chain, or none) must read back exactly
//! what an in-memory model of the virtual disk holds, allocate exactly the
//! clusters written, and never change a byte of the backing files.

use std::fs;
use std::path::{Path, PathBuf};

use addcow::{create, Access, AddCow, BackingFormat, BackingRef, CreateOptions, Source};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    WriteZeroes { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
    Flush,
    Reopen,
    Stream,
}

#[derive(Debug, Clone, Copy)]
enum Base {
    None,
    Raw,
    /// A raw base under an add-cow layer that already holds some writes.
    Chain,
}

#[derive(Debug, Clone)]
struct Setup {
    cluster_bits: u32,
    size: u64,
    backing_size: u64,
    base: Base,
}

fn setup() -> impl Strategy<Value = Setup> {
    (12u32..=15, 1u64..24, 0u64..4096, 0u64..=100, 0usize..3).prop_map(
        |(cluster_bits, clusters, tail, backing_pct, base)| {
            let size = ((clusters - 1) << cluster_bits) + tail.max(1);
            Setup {
                cluster_bits,
                size,
                backing_size: size * backing_pct / 100,
                base: [Base::None, Base::Raw, Base::Chain][base],
            }
        },
    )
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let span =
        move || (0..size).prop_flat_map(move |off| (Just(off), 0..=(size - off).min(300_000)));
    let op = prop_oneof![
        6 => (span(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len: len as usize, seed }),
        1 => span().prop_map(|(offset, len)| Op::WriteZeroes { offset, len }),
        3 => span().prop_map(|(offset, len)| Op::Read { offset, len: len as usize }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Stream),
    ];
    proptest::collection::vec(op, 1..25)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn hash(path: &Path) -> Vec<u8> {
    Sha256::digest(fs::read(path).expect("read file to hash")).to_vec()
}

struct World {
    _dir: tempfile::TempDir,
    top: PathBuf,
    protected: Vec<(PathBuf, Vec<u8>)>,
    model: Vec<u8>,
    allocated: Vec<bool>,
    cluster_bits: u32,
}

fn build(s: &Setup) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let base_bytes = pattern(s.backing_size as usize, 0x5a);
    fs::write(&base, &base_bytes).expect("write base");
    let mut model = vec![0u8; s.size as usize];
    let mut protected = vec![];
    let backing = match s.base {
        Base::None => None,
        Base::Raw => {
            model[..base_bytes.len()].copy_from_slice(&base_bytes);
            protected.push((base.clone(), hash(&base)));
            Some(BackingRef {
                name: "base.raw".into(),
                format: BackingFormat::Raw,
            })
        }
        Base::Chain => {
            // mid.add-cow over base.raw, mid sized like the top image.
            let mid = dir.path().join("mid.add-cow");
            create(
                &mid,
                &CreateOptions {
                    image: "mid.raw".into(),
                    backing: Some(BackingRef {
                        name: "base.raw".into(),
                        format: BackingFormat::Raw,
                    }),
                    cluster_bits: 12,
                    size: Some(s.size),
                },
            )
            .expect("create mid");
            model[..base_bytes.len()].copy_from_slice(&base_bytes);
            let disk = AddCow::open(&mid, Access::ReadWrite).expect("open mid");
            let data = pattern((s.size / 3) as usize, 0x33);
            let at = s.size / 2 - s.size / 6;
            disk.write_at(&data, at).expect("write mid");
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
            disk.close().expect("close mid");
            for f in ["base.raw", "mid.add-cow", "mid.raw"] {
                let p = dir.path().join(f);
                protected.push((p.clone(), hash(&p)));
            }
            Some(BackingRef {
                name: "mid.add-cow".into(),
                format: BackingFormat::AddCow,
            })
        }
    };
    let top = dir.path().join("top.add-cow");
    create(
        &top,
        &CreateOptions {
            image: "top.raw".into(),
            backing,
            cluster_bits: s.cluster_bits,
            size: Some(s.size),
        },
    )
    .expect("create top");
    let clusters = s.size.div_ceil(1 << s.cluster_bits) as usize;
    World {
        _dir: dir,
        top,
        protected,
        model,
        allocated: vec![false; clusters],
        cluster_bits: s.cluster_bits,
    }
}

fn touch(world: &mut World, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = (offset >> world.cluster_bits) as usize;
    let last = ((offset + len - 1) >> world.cluster_bits) as usize;
    for a in &mut world.allocated[first..=last] {
        *a = true;
    }
}

fn run(s: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut world = build(&s);
    let mut disk = AddCow::open(&world.top, Access::ReadWrite).expect("open top");
    prop_assert_eq!(disk.size(), s.size);
    for op in ops {
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(len, seed);
                disk.write_at(&data, offset).expect("write");
                world.model[offset as usize..offset as usize + len].copy_from_slice(&data);
                touch(&mut world, offset, len as u64);
            }
            Op::WriteZeroes { offset, len } => {
                disk.write_zeroes(offset, len).expect("write zeroes");
                world.model[offset as usize..(offset + len) as usize].fill(0);
                touch(&mut world, offset, len);
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0xee; len];
                disk.read_at(&mut buf, offset).expect("read");
                prop_assert!(
                    buf == world.model[offset as usize..offset as usize + len],
                    "read {}+{}",
                    offset,
                    len
                );
            }
            Op::Flush => disk.flush().expect("flush"),
            Op::Reopen => {
                disk.close().expect("close");
                disk = AddCow::open(&world.top, Access::ReadWrite).expect("reopen");
            }
            Op::Stream => {
                disk.stream(|_, _| {}).expect("stream");
                world.allocated.iter_mut().for_each(|a| *a = true);
                prop_assert!(disk.all_allocated());
            }
        }
        for (c, &a) in world.allocated.iter().enumerate() {
            prop_assert_eq!(disk.is_allocated(c as u64), a, "cluster {}", c);
        }
    }
    let mut all = vec![0u8; s.size as usize];
    disk.read_at(&mut all, 0).expect("read all");
    prop_assert!(all == world.model);
    // The extent map agrees with the allocation model and covers the disk.
    let mut at = 0;
    for e in disk.map() {
        prop_assert_eq!(e.start, at);
        at += e.length;
        let first = (e.start >> world.cluster_bits) as usize;
        let last = ((e.start + e.length - 1) >> world.cluster_bits) as usize;
        for c in first..=last {
            prop_assert_eq!(world.allocated[c], e.source == Source::Image);
        }
    }
    prop_assert_eq!(at, s.size);
    disk.close().expect("close");

    // After a reopen everything is still there, and the file checks clean.
    let disk = AddCow::open(&world.top, Access::ReadOnly).expect("reopen read-only");
    let mut again = vec![0u8; s.size as usize];
    disk.read_at(&mut again, 0).expect("read all again");
    prop_assert!(again == world.model);
    drop(disk);
    let report = addcow::check::check(&world.top).expect("check runs");
    prop_assert!(report.is_clean(), "{:?}", report.problems);
    for (path, before) in &world.protected {
        prop_assert_eq!(&hash(path), before, "{} changed", path.display());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]
    #[test]
    fn every_read_matches_the_model((s, ops) in setup().prop_flat_map(|s| { let size = s.size; (Just(s), ops(size)) })) {
        run(s, ops)?;
    }
}
