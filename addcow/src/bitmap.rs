//! The COW bitmap: one bit per cluster of the image file, kept in memory.
//!
//! Bit `c` is bit `c % 8` (least significant first) of byte `c / 8`; 1 means
//! the cluster is read from the image file, 0 from the backing file. Changes
//! are tracked in chunks of [`CHUNK_BYTES`] so that a flush writes back only
//! the parts of the bitmap that changed.

use std::collections::BTreeSet;

/// Granularity of write-back: one page of bitmap covers 32768 clusters.
pub const CHUNK_BYTES: usize = 4096;

/// Largest bitmap an image may have: 128 MiB of memory, 2^30 clusters (a
/// 4 TiB disk with 4 KiB clusters, 64 TiB with the default 64 KiB). Larger
/// disks need larger clusters; open and create refuse them.
pub const MAX_BITMAP_BYTES: u64 = 128 << 20;

/// Largest sum of the bitmaps of one backing chain (each layer's bitmap is
/// in memory at once): 512 MiB, four layers at [`MAX_BITMAP_BYTES`].
pub const MAX_CHAIN_BITMAP_BYTES: u64 = 4 * MAX_BITMAP_BYTES;

/// The in-memory COW bitmap of one add-cow image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowBitmap {
    bytes: Vec<u8>,
    clusters: u64,
    dirty_chunks: BTreeSet<usize>,
}

/// A piece of the bitmap to write back: its offset inside the bitmap and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyChunk {
    /// Byte offset from the start of the bitmap.
    pub offset: u64,
    /// The bytes as they are in memory now.
    pub bytes: Vec<u8>,
}

/// Bytes needed for `clusters` bits.
pub fn bitmap_len(clusters: u64) -> u64 {
    clusters.div_ceil(8)
}

impl CowBitmap {
    /// An all-zero bitmap (nothing allocated) for `clusters` clusters.
    pub fn new(clusters: u64) -> Self {
        CowBitmap {
            bytes: vec![0; bitmap_len(clusters) as usize],
            clusters,
            dirty_chunks: BTreeSet::new(),
        }
    }

    /// A bitmap read from disk. `bytes` must be [`bitmap_len`] long; bits past
    /// the last cluster are cleared (the format says to ignore them). Returns
    /// the bitmap and whether any such bit was set.
    pub fn from_bytes(mut bytes: Vec<u8>, clusters: u64) -> (Self, bool) {
        debug_assert_eq!(bytes.len() as u64, bitmap_len(clusters));
        let mut stray_bits = false;
        let used_in_last = (clusters % 8) as u32;
        if used_in_last != 0 {
            if let Some(last) = bytes.last_mut() {
                let mask = (1u8 << used_in_last) - 1;
                stray_bits = *last & !mask != 0;
                *last &= mask;
            }
        }
        let bitmap = CowBitmap {
            bytes,
            clusters,
            dirty_chunks: BTreeSet::new(),
        };
        (bitmap, stray_bits)
    }

    /// Number of clusters tracked.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// The bitmap as stored on disk.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// True when cluster `c` is in the image file.
    pub fn is_allocated(&self, c: u64) -> bool {
        debug_assert!(c < self.clusters);
        self.bytes[(c / 8) as usize] & (1 << (c % 8)) != 0
    }

    /// The state of cluster `start` and the end of the run of clusters that
    /// share it, at most `end`. Skips whole 64-cluster words at once, so a
    /// long run costs one step per 64 clusters.
    pub fn run(&self, start: u64, end: u64) -> (bool, u64) {
        debug_assert!(start < end && end <= self.clusters);
        let value = self.is_allocated(start);
        let whole = if value { u8::MAX } else { 0 };
        let mut c = start + 1;
        while c < end {
            let byte = (c / 8) as usize;
            if c.is_multiple_of(64)
                && c + 64 <= end
                && self.bytes[byte..byte + 8].iter().all(|&b| b == whole)
            {
                c += 64;
                continue;
            }
            if c.is_multiple_of(8) && c + 8 <= end && self.bytes[byte] == whole {
                c += 8;
            } else if self.is_allocated(c) == value {
                c += 1;
            } else {
                break;
            }
        }
        (value, c.min(end))
    }

    /// Marks clusters `start..end` allocated; returns how many were not
    /// before. Works a write-back chunk at a time and whole bytes at once:
    /// one dirty entry per changed chunk, never one per cluster.
    pub fn set_range(&mut self, start: u64, end: u64) -> u64 {
        debug_assert!(start <= end && end <= self.clusters);
        const CHUNK_CLUSTERS: u64 = CHUNK_BYTES as u64 * 8;
        let mut newly = 0;
        let mut c = start;
        while c < end {
            let chunk_end = ((c / CHUNK_CLUSTERS + 1) * CHUNK_CLUSTERS).min(end);
            let changed = self.set_bits(c, chunk_end);
            if changed > 0 {
                self.dirty_chunks.insert((c / CHUNK_CLUSTERS) as usize);
                newly += changed;
            }
            c = chunk_end;
        }
        newly
    }

    /// Sets bits `start..end` (partial bytes bit by bit, whole bytes at
    /// once); returns how many were clear.
    fn set_bits(&mut self, start: u64, end: u64) -> u64 {
        let whole_from = start.next_multiple_of(8).min(end);
        let whole_to = (end - end % 8).max(whole_from);
        let mut newly = 0;
        for c in (start..whole_from).chain(whole_to..end) {
            let (byte, bit) = ((c / 8) as usize, 1u8 << (c % 8));
            if self.bytes[byte] & bit == 0 {
                self.bytes[byte] |= bit;
                newly += 1;
            }
        }
        let whole = &mut self.bytes[(whole_from / 8) as usize..(whole_to / 8) as usize];
        newly += whole
            .iter()
            .map(|b| u64::from(b.count_zeros()))
            .sum::<u64>();
        whole.fill(u8::MAX);
        newly
    }

    /// Number of allocated clusters.
    pub fn count_allocated(&self) -> u64 {
        self.bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// True when some change has not been written back.
    pub fn is_dirty(&self) -> bool {
        !self.dirty_chunks.is_empty()
    }

    /// Copies out the changed chunks, adjacent ones merged into one piece,
    /// and forgets that they changed; give them back with
    /// [`CowBitmap::mark_dirty`] if writing them fails.
    pub fn take_dirty(&mut self) -> Vec<DirtyChunk> {
        let chunks = std::mem::take(&mut self.dirty_chunks);
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for i in chunks {
            match spans.last_mut() {
                Some((_, end)) if *end == i => *end = i + 1,
                _ => spans.push((i, i + 1)),
            }
        }
        spans
            .into_iter()
            .map(|(first, last)| {
                let start = first * CHUNK_BYTES;
                let end = (last * CHUNK_BYTES).min(self.bytes.len());
                DirtyChunk {
                    offset: start as u64,
                    bytes: self.bytes[start..end].to_vec(),
                }
            })
            .collect()
    }

    /// Marks chunks changed again (after a failed write-back).
    pub fn mark_dirty(&mut self, chunks: &[DirtyChunk]) {
        for chunk in chunks {
            let first = chunk.offset as usize / CHUNK_BYTES;
            let last = (chunk.offset as usize + chunk.bytes.len()).div_ceil(CHUNK_BYTES);
            self.dirty_chunks.extend(first..last.max(first + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn least_significant_bit_is_the_first_cluster() {
        let mut b = CowBitmap::new(10);
        b.set_range(0, 1);
        b.set_range(9, 10);
        assert_eq!(b.as_bytes(), &[0b0000_0001, 0b0000_0010]);
    }

    #[test]
    fn stray_bits_past_the_end_are_cleared_and_reported() {
        let (b, stray) = CowBitmap::from_bytes(vec![0xff, 0xff], 10);
        assert!(stray);
        assert_eq!(b.as_bytes(), &[0xff, 0x03]);
        assert_eq!(b.count_allocated(), 10);
        let (_, stray) = CowBitmap::from_bytes(vec![0xff, 0x03], 10);
        assert!(!stray);
    }

    #[test]
    fn dirty_chunks_cover_exactly_the_changes() {
        let clusters = (CHUNK_BYTES as u64 * 8) * 3;
        let mut b = CowBitmap::new(clusters);
        assert!(!b.is_dirty());
        b.set_range(5, 6);
        b.set_range(clusters - 1, clusters);
        let chunks = b.take_dirty();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].offset, 0);
        assert_eq!(chunks[0].bytes[0], 0b0010_0000);
        assert_eq!(chunks[1].offset, 2 * CHUNK_BYTES as u64);
        assert!(!b.is_dirty());
        // Setting an already set bit changes nothing.
        assert_eq!(b.set_range(5, 6), 0);
        assert!(!b.is_dirty());
        b.mark_dirty(&chunks);
        assert_eq!(b.take_dirty(), chunks);
    }

    #[test]
    fn adjacent_dirty_chunks_are_written_back_as_one_piece() {
        let chunk_clusters = CHUNK_BYTES as u64 * 8;
        let clusters = chunk_clusters * 5 + 3;
        let mut b = CowBitmap::new(clusters);
        // Chunks 1, 2 and 3 from one range, and the short last chunk.
        assert_eq!(
            b.set_range(chunk_clusters + 7, chunk_clusters * 4 - 1),
            chunk_clusters * 3 - 8
        );
        b.set_range(clusters - 1, clusters);
        assert_eq!(b.dirty_chunks.len(), 4);
        let pieces = b.take_dirty();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].offset, CHUNK_BYTES as u64);
        assert_eq!(pieces[0].bytes.len(), 3 * CHUNK_BYTES);
        assert_eq!(pieces[0].bytes[0], 0b1000_0000);
        assert_eq!(pieces[0].bytes[3 * CHUNK_BYTES - 1], 0b0111_1111);
        assert_eq!(pieces[1].offset, 5 * CHUNK_BYTES as u64);
        assert_eq!(pieces[1].bytes, vec![0b0000_0100]);
        b.mark_dirty(&pieces);
        assert_eq!(
            b.dirty_chunks.iter().copied().collect::<Vec<_>>(),
            [1, 2, 3, 5]
        );
        assert_eq!(b.take_dirty(), pieces);
    }

    #[test]
    fn a_whole_terabyte_is_set_in_one_pass() {
        // 1 TiB of 64 KiB clusters: one dirty entry per 4 KiB chunk, one piece.
        let clusters = 1u64 << 24;
        let mut b = CowBitmap::new(clusters);
        assert_eq!(b.set_range(0, clusters), clusters);
        assert_eq!(b.dirty_chunks.len(), (clusters / 8) as usize / CHUNK_BYTES);
        assert_eq!(b.run(0, clusters), (true, clusters));
        assert_eq!(b.count_allocated(), clusters);
        let pieces = b.take_dirty();
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].bytes.iter().all(|&x| x == 0xff));
        assert_eq!(b.set_range(0, clusters), 0);
        assert!(!b.is_dirty());
    }

    proptest! {
        #[test]
        fn runs_match_a_bit_by_bit_model(
            clusters in 1u64..300,
            sets in proptest::collection::vec((0u64..300, 0u64..40), 0..20),
            start in 0u64..300,
            len in 1u64..300,
        ) {
            let mut b = CowBitmap::new(clusters);
            let mut model = vec![false; clusters as usize];
            for (s, l) in sets {
                let s = s % clusters;
                let e = (s + l).min(clusters);
                b.set_range(s, e);
                for m in &mut model[s as usize..e as usize] { *m = true; }
            }
            let start = start % clusters;
            let end = (start + len).min(clusters);
            let (value, run_end) = b.run(start, end);
            prop_assert_eq!(value, model[start as usize]);
            prop_assert!(run_end > start && run_end <= end);
            for c in start..run_end { prop_assert_eq!(model[c as usize], value); }
            if run_end < end { prop_assert_ne!(model[run_end as usize], value); }
            prop_assert_eq!(b.count_allocated(), model.iter().filter(|&&m| m).count() as u64);
        }

        #[test]
        fn set_range_matches_a_bit_by_bit_model(
            sets in proptest::collection::vec((0u64..70_000, 0u64..70_000), 1..8),
        ) {
            let clusters = 70_000;
            let mut b = CowBitmap::new(clusters);
            let mut model = vec![false; clusters as usize];
            for (s, l) in sets {
                let e = (s + l).min(clusters);
                let before = model.iter().filter(|&&m| m).count() as u64;
                for m in &mut model[s as usize..e as usize] { *m = true; }
                let after = model.iter().filter(|&&m| m).count() as u64;
                prop_assert_eq!(b.set_range(s, e), after - before);
            }
            for (c, &m) in model.iter().enumerate() {
                prop_assert_eq!(b.is_allocated(c as u64), m);
            }
            let mut start = 0;
            while start < clusters {
                let (value, end) = b.run(start, clusters);
                prop_assert_eq!(value, model[start as usize]);
                prop_assert!(model[start as usize..end as usize].iter().all(|&m| m == value));
                prop_assert!(end == clusters || model[end as usize] != value);
                start = end;
            }
            // Exactly the chunks holding a set bit are dirty.
            let per_chunk = CHUNK_BYTES * 8;
            let dirty: Vec<usize> = b.dirty_chunks.iter().copied().collect();
            let expected: Vec<usize> = (0..model.len().div_ceil(per_chunk))
                .filter(|&i| model.iter().skip(i * per_chunk).take(per_chunk).any(|&m| m))
                .collect();
            prop_assert_eq!(dirty, expected);
        }
    }
}
