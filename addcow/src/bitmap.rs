//! The COW bitmap: one bit per cluster of the image file, kept in memory.
//!
//! Bit `c` is bit `c % 8` (least significant first) of byte `c / 8`; 1 means
//! the cluster is read from the image file, 0 from the backing file. Changes
//! are tracked in chunks of [`CHUNK_BYTES`] so that a flush writes back only
//! the parts of the bitmap that changed.

use std::collections::BTreeSet;

/// Granularity of write-back: one page of bitmap covers 32768 clusters.
pub const CHUNK_BYTES: usize = 4096;

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
    /// share it, at most `end`.
    pub fn run(&self, start: u64, end: u64) -> (bool, u64) {
        debug_assert!(start < end && end <= self.clusters);
        let value = self.is_allocated(start);
        let whole = if value { 0xff } else { 0x00 };
        let mut c = start + 1;
        while c < end {
            if c.is_multiple_of(8) && c + 8 <= end && self.bytes[(c / 8) as usize] == whole {
                c += 8;
            } else if self.is_allocated(c) == value {
                c += 1;
            } else {
                break;
            }
        }
        (value, c.min(end))
    }

    /// Marks clusters `start..end` allocated; returns how many were not before.
    pub fn set_range(&mut self, start: u64, end: u64) -> u64 {
        debug_assert!(start <= end && end <= self.clusters);
        let mut newly = 0;
        for c in start..end {
            let byte = (c / 8) as usize;
            let bit = 1u8 << (c % 8);
            if self.bytes[byte] & bit == 0 {
                self.bytes[byte] |= bit;
                self.dirty_chunks.insert(byte / CHUNK_BYTES);
                newly += 1;
            }
        }
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

    /// Copies out the changed chunks and forgets that they changed; give them
    /// back with [`CowBitmap::mark_dirty`] if writing them fails.
    pub fn take_dirty(&mut self) -> Vec<DirtyChunk> {
        let chunks = std::mem::take(&mut self.dirty_chunks);
        chunks
            .into_iter()
            .map(|i| {
                let start = i * CHUNK_BYTES;
                let end = (start + CHUNK_BYTES).min(self.bytes.len());
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
            self.dirty_chunks
                .insert(chunk.offset as usize / CHUNK_BYTES);
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
    }
}
