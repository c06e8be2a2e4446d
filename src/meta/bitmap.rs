//! The out-of-sync bitmap: one bit per 4 KiB of data, kept in memory, written back by page.
//!
//! A set bit means "this block may differ from the peer". Setting rounds outwards (a partial
//! block is marked), clearing rounds inwards (only blocks wholly covered are cleared): a
//! mistake can only cost resync work, never skip data. Each 4 KiB on-disk page
//! ([`crate::wire::ondisk::BitmapPage`]) carries a crc32c; a page that fails its check at load
//! is never trusted: every bit it covers is set.
//!
//! Pages changed in memory are *dirty* until written back. The store writes them back before an
//! extent leaves the activity log (only the pages that extent touches), on
//! [`flush`](super::MetaStore::flush_bitmap) and on clean shutdown.

use std::ops::Range;

use crate::block::BlockDevice;
use crate::wire::ondisk::{
    emit_bitmap_page, BitmapPage, BitmapPageRepr, BLOCK_LEN, BM_BITS_PER_PAGE, BM_BYTES_PER_PAGE,
};

use super::layout::{Layout, BM_BLOCK_SIZE};
use super::MetaError;

/// The in-memory bitmap of one resource.
#[derive(Debug, Clone)]
pub struct Bitmap {
    bytes: Vec<u8>,
    n_bits: u64,
    set: u64,
    dirty: Vec<bool>,
}

impl Bitmap {
    /// An all-clear bitmap of `pages` pages describing `data_size` bytes.
    pub fn new(data_size: u64, pages: u32) -> Self {
        let n_bits = data_size.div_ceil(BM_BLOCK_SIZE);
        assert!(
            n_bits <= pages as u64 * BM_BITS_PER_PAGE,
            "bitmap too small"
        );
        Bitmap {
            bytes: vec![0; pages as usize * BM_BYTES_PER_PAGE],
            n_bits,
            set: 0,
            dirty: vec![false; pages as usize],
        }
    }

    /// Number of bits that describe data.
    pub fn bits(&self) -> u64 {
        self.n_bits
    }

    /// Number of pages.
    pub fn pages(&self) -> u32 {
        self.dirty.len() as u32
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Bytes of data marked out of sync.
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.set * BM_BLOCK_SIZE
    }

    /// Whether bit `bit` is set.
    pub fn test(&self, bit: u64) -> bool {
        bit < self.n_bits && self.bytes[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    fn set_bit(&mut self, bit: u64, value: bool) -> bool {
        let byte = &mut self.bytes[(bit / 8) as usize];
        let mask = 1u8 << (bit % 8);
        let was = *byte & mask != 0;
        if was != value {
            *byte ^= mask;
            if value {
                self.set += 1;
            } else {
                self.set -= 1;
            }
            self.dirty[(bit / BM_BITS_PER_PAGE) as usize] = true;
            true
        } else {
            false
        }
    }

    /// Bits touched by `[offset, offset + len)` (rounded outwards), clipped to the data.
    pub fn bits_outer(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / BM_BLOCK_SIZE;
        let end = offset.saturating_add(len).div_ceil(BM_BLOCK_SIZE);
        first.min(self.n_bits)..end.min(self.n_bits)
    }

    /// Bits wholly inside `[offset, offset + len)` (rounded inwards), clipped to the data.
    pub fn bits_inner(&self, offset: u64, len: u64) -> Range<u64> {
        let first = offset.div_ceil(BM_BLOCK_SIZE);
        let end_byte = offset.saturating_add(len);
        // The last, partial block of the data counts as wholly covered when the range reaches
        // the end of the data.
        let end = if end_byte >= self.n_bits * BM_BLOCK_SIZE {
            self.n_bits
        } else {
            end_byte / BM_BLOCK_SIZE
        };
        first.min(self.n_bits)..end.max(first).min(self.n_bits)
    }

    /// Sets every bit in `bits`; returns how many were newly set.
    pub fn set_bits(&mut self, bits: Range<u64>) -> u64 {
        bits.filter(|&b| self.set_bit(b, true)).count() as u64
    }

    /// Clears every bit in `bits`; returns how many were newly cleared.
    pub fn clear_bits(&mut self, bits: Range<u64>) -> u64 {
        bits.filter(|&b| self.set_bit(b, false)).count() as u64
    }

    /// Marks the blocks touched by a byte range out of sync.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        let bits = self.bits_outer(offset, len);
        self.set_bits(bits)
    }

    /// Marks the blocks wholly inside a byte range in sync.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> u64 {
        let bits = self.bits_inner(offset, len);
        self.clear_bits(bits)
    }

    /// Sets every bit (a full resync).
    pub fn set_all(&mut self) {
        let n = self.n_bits;
        self.set_bits(0..n);
    }

    /// Pages holding the bits of a byte range.
    pub fn pages_for_range(&self, offset: u64, len: u64) -> Range<u32> {
        let bits = self.bits_outer(offset, len);
        if bits.is_empty() {
            return 0..0;
        }
        (bits.start / BM_BITS_PER_PAGE) as u32..((bits.end - 1) / BM_BITS_PER_PAGE + 1) as u32
    }

    /// Whether page `i` changed since it was last written.
    pub fn is_dirty(&self, i: u32) -> bool {
        self.dirty[i as usize]
    }

    /// Indices of the dirty pages.
    pub fn dirty_pages(&self) -> Vec<u32> {
        (0..self.pages())
            .filter(|&i| self.dirty[i as usize])
            .collect()
    }

    /// Takes a copy of page `i`'s bits for writing and marks it clean. If the write fails, call
    /// [`mark_dirty`](Self::mark_dirty).
    pub fn take_page(&mut self, i: u32) -> Vec<u8> {
        self.dirty[i as usize] = false;
        self.page_bits(i).to_vec()
    }

    /// Marks page `i` as needing a write.
    pub fn mark_dirty(&mut self, i: u32) {
        self.dirty[i as usize] = true;
    }

    /// The bit bytes of page `i`.
    pub fn page_bits(&self, i: u32) -> &[u8] {
        let at = i as usize * BM_BYTES_PER_PAGE;
        &self.bytes[at..at + BM_BYTES_PER_PAGE]
    }

    /// Replaces page `i`'s bits with what was read from disk (bits past the data are ignored).
    pub fn load_page(&mut self, i: u32, bits: &[u8]) {
        let first = i as u64 * BM_BITS_PER_PAGE;
        let end = (first + BM_BITS_PER_PAGE).min(self.n_bits);
        for bit in first..end {
            let rel = bit - first;
            let value = bits[(rel / 8) as usize] & (1 << (rel % 8)) != 0;
            self.set_bit(bit, value);
        }
        self.dirty[i as usize] = false;
    }

    /// Sets every bit of page `i` (its on-disk copy could not be trusted).
    pub fn set_page(&mut self, i: u32) {
        let first = i as u64 * BM_BITS_PER_PAGE;
        let end = (first + BM_BITS_PER_PAGE).min(self.n_bits);
        self.set_bits(first..end);
        self.dirty[i as usize] = true;
    }

    /// Byte ranges of runs of set bits, in order, clipped to `data_size`.
    pub fn runs(&self, data_size: u64) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut bit = 0;
        while bit < self.n_bits {
            // Skip clear bytes quickly.
            if bit % 64 == 0 && bit + 64 <= self.n_bits {
                let at = (bit / 8) as usize;
                if self.bytes[at..at + 8].iter().all(|&b| b == 0) {
                    bit += 64;
                    continue;
                }
            }
            if !self.test(bit) {
                bit += 1;
                continue;
            }
            let start = bit;
            while bit < self.n_bits && self.test(bit) {
                bit += 1;
            }
            runs.push(start * BM_BLOCK_SIZE..(bit * BM_BLOCK_SIZE).min(data_size));
        }
        runs
    }
}

/// Reads every bitmap page. Pages that fail their checks (torn, corrupt, from other meta-data
/// or at the wrong index) have all their bits set; their indices are returned.
pub fn load(
    dev: &dyn BlockDevice,
    layout: &Layout,
    md_uuid: u64,
) -> Result<(Bitmap, Vec<u32>), MetaError> {
    let mut bitmap = Bitmap::new(layout.data_size, layout.bm_pages);
    let mut corrupt = Vec::new();
    let mut block = vec![0u8; BLOCK_LEN];
    for i in 0..layout.bm_pages {
        dev.read_at(&mut block, layout.bm_page_offset(i))?;
        match BitmapPageRepr::parse(&BitmapPage::new_unchecked(&block[..])) {
            Ok(page) if page.md_uuid == md_uuid && page.index == i => {
                bitmap.load_page(i, &page.bits)
            }
            _ => {
                bitmap.set_page(i);
                corrupt.push(i);
            }
        }
    }
    Ok((bitmap, corrupt))
}

/// Writes page `i` with the given bits (not FUA: the caller flushes).
pub fn write_page(
    dev: &dyn BlockDevice,
    layout: &Layout,
    md_uuid: u64,
    i: u32,
    bits: &[u8],
) -> Result<(), MetaError> {
    let mut block = vec![0u8; BLOCK_LEN];
    emit_bitmap_page(&mut block, md_uuid, i, bits);
    dev.write_at(&block, layout.bm_page_offset(i), false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_rounds_out_and_clear_rounds_in() {
        let mut bm = Bitmap::new(1 << 20, 1);
        assert_eq!(bm.bits(), 256);
        assert_eq!(bm.set_range(4000, 200), 2); // touches blocks 0 and 1
        assert!(bm.test(0) && bm.test(1) && !bm.test(2));
        assert_eq!(bm.clear_range(100, 8000), 0); // covers no whole block
        assert_eq!(bm.clear_range(0, 8192), 2);
        assert_eq!(bm.count(), 0);
        assert_eq!(bm.set_range(0, 0), 0);
        // The range reaching the end of the data clears the last block.
        bm.set_all();
        assert_eq!(bm.count(), 256);
        assert_eq!(bm.out_of_sync_bytes(), 1 << 20);
        assert_eq!(bm.clear_range((1 << 20) - 4096, 1 << 30), 1);
        assert_eq!(bm.runs(1 << 20), vec![0..(1 << 20) - 4096]);
    }

    #[test]
    fn dirty_pages_track_changes() {
        let pages = 3;
        let data = 2 * BM_BITS_PER_PAGE * BM_BLOCK_SIZE + 4096;
        let mut bm = Bitmap::new(data, pages);
        assert!(bm.dirty_pages().is_empty());
        bm.set_range(BM_BITS_PER_PAGE * BM_BLOCK_SIZE - 4096, 8192);
        assert_eq!(bm.dirty_pages(), vec![0, 1]);
        assert_eq!(
            bm.pages_for_range(BM_BITS_PER_PAGE * BM_BLOCK_SIZE - 4096, 8192),
            0..2
        );
        let bits = bm.take_page(0);
        assert_eq!(bm.dirty_pages(), vec![1]);
        let mut other = Bitmap::new(data, pages);
        other.load_page(0, &bits);
        assert_eq!(other.count(), 1);
        assert!(other.test(BM_BITS_PER_PAGE - 1));
        other.set_page(2);
        assert_eq!(other.count(), 2, "page 2 holds a single data bit");
    }

    proptest! {
        #[test]
        fn runs_match_the_bits(ops in proptest::collection::vec((any::<bool>(), 0u64..(1 << 21), 0u64..(1 << 18)), 0..40)) {
            let size = 1u64 << 21;
            let mut bm = Bitmap::new(size, 1);
            let mut model = vec![false; (size / 4096) as usize];
            for (set, off, len) in ops {
                if set {
                    bm.set_range(off, len);
                    if len > 0 {
                        for b in off / 4096..((off + len).div_ceil(4096)).min(512) { model[b as usize] = true; }
                    }
                } else {
                    bm.clear_range(off, len);
                    let end = if off + len >= size { 512 } else { (off + len) / 4096 };
                    for b in off.div_ceil(4096)..end { model[b as usize] = false; }
                }
            }
            prop_assert_eq!(bm.count(), model.iter().filter(|&&b| b).count() as u64);
            let mut from_runs = vec![false; model.len()];
            for r in bm.runs(size) {
                for b in r.start / 4096..r.end / 4096 { from_runs[b as usize] = true; }
            }
            prop_assert_eq!(from_runs, model);
        }
    }
}
