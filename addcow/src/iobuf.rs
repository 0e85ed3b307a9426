//! Scatter/gather buffers: the memory a vectored read fills ([`IoBufsMut`])
//! or a vectored write takes its bytes from ([`IoBufs`]), as a list of
//! `(pointer, length)` pieces that go to `preadv`/`pwritev` unchanged.
//!
//! Both borrow their memory for `'a`. The safe constructors take Rust
//! slices; the unsafe ones take raw memory that Rust does not own, such as a
//! virtual machine's guest memory, which another agent (a vCPU) may change
//! at any time. That is why nothing here ever makes a Rust reference to the
//! memory of a piece: its bytes are only handed to the kernel, or copied
//! with raw-pointer copies, so concurrent changes make the bytes moved
//! unpredictable but never break Rust's aliasing rules for any reference.

use std::marker::PhantomData;

use smallvec::SmallVec;

/// The pieces of a buffer list: up to four inline (a request has one or a
/// few), so that making a list for one I/O does not allocate.
type IovList = SmallVec<[libc::iovec; 4]>;

/// A raw piece of a buffer list.
#[derive(Clone, Copy)]
struct Piece {
    base: *mut u8,
    len: usize,
}

/// The pieces of `list` that cover `[start, start + len)` of its bytes;
/// `None` when the range is not inside the list.
fn sub_range(list: &[libc::iovec], start: usize, len: usize) -> Option<IovList> {
    let end = start.checked_add(len)?;
    let mut out = IovList::new();
    let mut at = 0usize;
    for iov in list {
        let (from, to) = (at, at + iov.iov_len);
        at = to;
        if to <= start || from >= end {
            if from >= end {
                break;
            }
            continue;
        }
        let skip = start.saturating_sub(from);
        let take = to.min(end) - from - skip;
        // The offset stays inside the piece: `skip < iov_len`.
        let base = iov.iov_base.cast::<u8>().wrapping_add(skip);
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: take,
        });
    }
    (end <= at).then_some(out)
}

fn iovec(piece: Piece) -> libc::iovec {
    libc::iovec {
        iov_base: piece.base.cast(),
        iov_len: piece.len,
    }
}

/// Memory a vectored write takes its bytes from, in order.
pub struct IoBufs<'a> {
    iov: IovList,
    len: usize,
    _memory: PhantomData<&'a [u8]>,
}

impl std::fmt::Debug for IoBufs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufs")
            .field("pieces", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Default for IoBufs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> IoBufs<'a> {
    /// An empty list.
    pub fn new() -> Self {
        IoBufs {
            iov: IovList::new(),
            len: 0,
            _memory: PhantomData,
        }
    }

    /// One piece: `buf`.
    pub fn from_slice(buf: &'a [u8]) -> Self {
        let mut bufs = Self::new();
        bufs.push(buf);
        bufs
    }

    /// Appends `buf`.
    pub fn push(&mut self, buf: &'a [u8]) {
        self.push_piece(Piece {
            base: buf.as_ptr().cast_mut(),
            len: buf.len(),
        });
    }

    /// Appends `len` bytes of raw memory at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` must stay mapped and readable for `'a`, and no
    /// Rust `&mut` reference to it may exist for `'a`. Other agents (a
    /// guest's vCPUs, another process) may write it meanwhile: the bytes
    /// written are then whatever the memory held when they were read.
    pub unsafe fn push_raw(&mut self, base: *const u8, len: usize) {
        self.push_piece(Piece {
            base: base.cast_mut(),
            len,
        });
    }

    /// Appends every piece of `other` (which lives at least as long).
    pub fn append(&mut self, other: &IoBufs<'a>) {
        self.iov.extend_from_slice(&other.iov);
        self.len += other.len;
    }

    fn push_piece(&mut self, piece: Piece) {
        if piece.len > 0 {
            self.iov.push(iovec(piece));
            self.len += piece.len;
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, for `pwritev`. Their memory is only valid to read while
    /// `self` is borrowed.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// The bytes `[start, start + len)` as a list of their own; `None` when
    /// the range is not inside.
    pub fn range(&self, start: usize, len: usize) -> Option<IoBufs<'_>> {
        if start == 0 && len == self.len {
            return Some(IoBufs {
                iov: self.iov.clone(),
                len,
                _memory: PhantomData,
            });
        }
        Some(IoBufs {
            iov: sub_range(&self.iov, start, len)?,
            len,
            _memory: PhantomData,
        })
    }

    /// Copies the first `dst.len()` bytes into `dst` (fewer when the list
    /// is shorter); returns how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for iov in &self.iov {
            let n = iov.iov_len.min(dst.len() - done);
            // SAFETY: the piece is readable for `n <= iov_len` bytes (the
            // constructors' contract) and `dst[done..done + n]` is in
            // bounds; the two cannot overlap, as `dst` is a `&mut` that the
            // contract excludes from every piece.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.iov_base.cast::<u8>(),
                    dst.as_mut_ptr().add(done),
                    n,
                )
            };
            done += n;
            if done == dst.len() {
                break;
            }
        }
        done
    }
}

/// Memory a vectored read fills, in order.
pub struct IoBufsMut<'a> {
    iov: IovList,
    len: usize,
    _memory: PhantomData<&'a mut [u8]>,
}

impl std::fmt::Debug for IoBufsMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufsMut")
            .field("pieces", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Default for IoBufsMut<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> IoBufsMut<'a> {
    /// An empty list.
    pub fn new() -> Self {
        IoBufsMut {
            iov: IovList::new(),
            len: 0,
            _memory: PhantomData,
        }
    }

    /// One piece: `buf`.
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let mut bufs = Self::new();
        bufs.push(buf);
        bufs
    }

    /// Appends `buf`.
    pub fn push(&mut self, buf: &'a mut [u8]) {
        if !buf.is_empty() {
            self.len += buf.len();
            self.iov.push(iovec(Piece {
                base: buf.as_mut_ptr(),
                len: buf.len(),
            }));
        }
    }

    /// Appends `len` bytes of raw memory at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` must stay mapped and writable for `'a`, and no
    /// Rust reference to it may exist for `'a`. It may overlap other pieces
    /// of this list (a guest's descriptors may): the bytes there are then
    /// the last ones written. Other agents (a guest's vCPUs) may read or
    /// write it meanwhile: what they see of a fill in progress is
    /// unspecified.
    pub unsafe fn push_raw(&mut self, base: *mut u8, len: usize) {
        if len > 0 {
            self.len += len;
            self.iov.push(iovec(Piece { base, len }));
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, for `preadv`. Their memory is only valid to write while
    /// `self` is mutably borrowed.
    pub fn iovecs(&mut self) -> &[libc::iovec] {
        &self.iov
    }

    /// The bytes `[start, start + len)` as a list of their own, borrowing
    /// these; `None` when the range is not inside.
    pub fn range(&mut self, start: usize, len: usize) -> Option<IoBufsMut<'_>> {
        let iov = if start == 0 && len == self.len {
            self.iov.clone()
        } else {
            sub_range(&self.iov, start, len)?
        };
        Some(IoBufsMut {
            iov,
            len,
            _memory: PhantomData,
        })
    }

    /// The same memory as bytes to write (a read-back, or a fill laid
    /// under other data), borrowing these.
    pub fn as_bufs(&self) -> IoBufs<'_> {
        IoBufs {
            iov: self.iov.clone(),
            len: self.len,
            _memory: PhantomData,
        }
    }

    /// Sets every byte to zero.
    pub fn fill_zero(&mut self) {
        for iov in &self.iov {
            // SAFETY: the piece is writable for `iov_len` bytes and no Rust
            // reference to it exists (the constructors' contract).
            unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
        }
    }

    /// Copies `src` into the first `src.len()` bytes (fewer when the list
    /// is shorter); returns how many.
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        let mut done = 0;
        for iov in &self.iov {
            let n = iov.iov_len.min(src.len() - done);
            // SAFETY: the piece is writable for `n <= iov_len` bytes and no
            // Rust reference to it exists (the constructors' contract), so
            // it cannot overlap `src`; `src[done..done + n]` is in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(done), iov.iov_base.cast::<u8>(), n)
            };
            done += n;
            if done == src.len() {
                break;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cut_pieces_at_the_right_bytes() {
        let (mut a, mut b, mut c) = ([1u8; 3], [2u8; 5], [3u8; 4]);
        let mut bufs = IoBufsMut::new();
        bufs.push(&mut a);
        bufs.push(&mut []);
        bufs.push(&mut b);
        bufs.push(&mut c);
        assert_eq!(bufs.len(), 12);
        let mut expect = Vec::new();
        expect.extend_from_slice(&[1; 3]);
        expect.extend_from_slice(&[2; 5]);
        expect.extend_from_slice(&[3; 4]);
        for start in 0..=12 {
            for len in 0..=12 - start {
                let sub = bufs.range(start, len).expect("inside");
                assert_eq!(sub.len(), len);
                assert_eq!(sub.iov.iter().map(|i| i.iov_len).sum::<usize>(), len);
                let mut got = vec![0u8; len];
                assert_eq!(sub.as_bufs().copy_to(&mut got), len);
                assert_eq!(got, expect[start..start + len], "{start}+{len}");
            }
        }
        assert!(bufs.range(5, 8).is_none());
        assert!(bufs.range(usize::MAX, 2).is_none());
    }

    #[test]
    fn fills_and_copies_reach_every_piece() {
        let (mut a, mut b) = ([9u8; 3], [9u8; 5]);
        {
            let mut bufs = IoBufsMut::new();
            bufs.push(&mut a);
            bufs.push(&mut b);
            assert_eq!(bufs.copy_from(&[1, 2, 3, 4, 5, 6]), 6);
            bufs.range(6, 2).expect("inside").fill_zero();
        }
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [4, 5, 6, 0, 0]);
        let mut all = IoBufs::from_slice(&a[..2]);
        let tail = IoBufs::from_slice(&b);
        all.append(&tail);
        let mut out = [0u8; 10];
        assert_eq!(all.copy_to(&mut out), 7);
        assert_eq!(out[..7], [1, 2, 4, 5, 6, 0, 0]);
    }
}
