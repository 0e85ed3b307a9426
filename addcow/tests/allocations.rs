//! Guest I/O allocates nothing per request: a read or write of a file (a
//! raw disk), of an add-cow image's allocated clusters and of its backing
//! file goes from the caller's buffers to `pread`/`preadv` and back without
//! touching the heap, and a copy-on-write reads the backing's part of the
//! cluster into its thread's reused scratch buffer (issue 16: no
//! per-request buffers). The bitmap's set of dirty 4 KiB chunks gains an
//! entry when a write dirties a new one (not here). Counted with a global
//! allocator; this file holds one test, so no other test's allocations are
//! counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use addcow::{
    Access, AddCow, BackingFormat, BackingRef, CreateOptions, FileStorage, IoBufs, IoBufsMut,
    Storage,
};

/// Counts allocations, then leaves the work to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counter is an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with `layout` (above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made while `f` runs.
fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn reads_and_writes_of_files_and_images_do_not_allocate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = FileStorage::new(tempfile::tempfile().expect("raw file"));
    raw.write_all_at(&[7u8; 1 << 17], 0).expect("fill raw");

    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![9u8; 1 << 20]).expect("backing file");
    let path = dir.path().join("disk.add-cow");
    addcow::create(
        &path,
        &CreateOptions {
            image: "disk.raw".into(),
            backing: Some(BackingRef {
                name: "base.raw".into(),
                format: BackingFormat::Raw,
            }),
            cluster_bits: 16,
            size: Some(1 << 20),
        },
    )
    .expect("create");
    let image = AddCow::open(&path, Access::ReadWrite).expect("open");
    // Cluster 0 allocated (a whole-cluster write), cluster 1 still backing.
    image
        .write_at(&[5u8; 1 << 16], 0)
        .expect("allocate cluster 0");
    // The first copy-on-write of this thread makes its scratch buffer.
    image
        .write_at(&[4u8; 4096], 2 << 16)
        .expect("first copy-on-write");

    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 8192]);
    let payload = vec![3u8; 4096];
    let counted = allocations_in(|| {
        // One piece and two pieces, raw file.
        raw.read_vectored_exact_at(&mut IoBufsMut::from_slice(&mut a), 4096)
            .expect("raw read");
        let mut two = IoBufsMut::from_slice(&mut a);
        two.push(&mut b);
        raw.read_vectored_exact_at(&mut two, 0).expect("raw read 2");
        raw.write_vectored_all_at(&IoBufs::from_slice(&payload), 8192)
            .expect("raw write");
        // add-cow: an allocated cluster, a rewrite, the backing file.
        image
            .read_vectored_at(&mut IoBufsMut::from_slice(&mut a), 4096)
            .expect("allocated read");
        image
            .write_vectored_at(&IoBufs::from_slice(&payload), 8192)
            .expect("rewrite");
        image
            .read_vectored_at(&mut IoBufsMut::from_slice(&mut b), 1 << 16)
            .expect("backing read");
        // A copy-on-write: the backing's cluster goes through this
        // thread's scratch buffer, made by the first one (above).
        image
            .write_vectored_at(&IoBufs::from_slice(&payload), 3 << 16)
            .expect("copy-on-write");
    });
    assert!(a.iter().all(|&x| x == 5) && b.iter().all(|&x| x == 9));
    assert_eq!(counted, 0, "allocations in seven reads and writes");
    let mut cluster = vec![0u8; 1 << 16];
    image.read_at(&mut cluster, 3 << 16).expect("read back");
    assert!(cluster[..4096].iter().all(|&x| x == 3) && cluster[4096..].iter().all(|&x| x == 9));
}
