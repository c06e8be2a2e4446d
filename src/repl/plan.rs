//! Pure resync planning: how each 4 KiB block of a chunk travels (data, a zero marker, or
//! nothing because the peer's checksum matched), and the checksums of known-zero ranges.
//! No I/O: the copier reads, this decides.

use crate::wire::repl::CHECKSUM_BLOCK;

/// How a block travels in a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// Its data (`ResyncData`).
    Data,
    /// A zero marker (`ResyncZero`).
    Zero,
    /// Nothing: the peer's checksum matched (`ResyncSkip`).
    Same,
}

/// Splits `buf` into runs of 4 KiB blocks that travel the same way: equal to the peer's
/// checksum (if given), all zero, or data. Returns (start, end, kind) in bytes of `buf`.
pub(crate) fn classify_blocks(buf: &[u8], peer: Option<&[u32]>) -> Vec<(usize, usize, BlockKind)> {
    let block = CHECKSUM_BLOCK as usize;
    let mut runs: Vec<(usize, usize, BlockKind)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        let same = peer
            .and_then(|p| p.get(i))
            .is_some_and(|&c| crc32c::crc32c(b) == c);
        let kind = if same {
            BlockKind::Same
        } else if b.iter().fold(0u8, |a, &x| a | x) == 0 {
            BlockKind::Zero
        } else {
            BlockKind::Data
        };
        let start = i * block;
        let end = start + b.len();
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.1 == start => last.1 = end,
            _ => runs.push((start, end, kind)),
        }
    }
    runs
}

/// The crc32c of `len` zero bytes (at most one block).
pub(crate) fn zero_crc(len: usize) -> u32 {
    static FULL: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const ZEROS: [u8; CHECKSUM_BLOCK as usize] = [0; CHECKSUM_BLOCK as usize];
    if len == ZEROS.len() {
        *FULL.get_or_init(|| crc32c::crc32c(&ZEROS))
    } else {
        crc32c::crc32c(&ZEROS[..len])
    }
}

/// What [`block_checksums`] gives for `len` zero bytes, without reading or hashing them.
pub(crate) fn zero_checksums(len: u64) -> Vec<u32> {
    let block = u64::from(CHECKSUM_BLOCK);
    (0..len.div_ceil(block))
        .map(|i| zero_crc(block.min(len - i * block) as usize))
        .collect()
}

/// [`classify_blocks`] for `len` bytes known to be zero: equal where the peer's checksum is the
/// zero checksum, zero markers elsewhere.
pub(crate) fn classify_zero(len: u64, peer: Option<&[u32]>) -> Vec<(usize, usize, BlockKind)> {
    let zero = zero_checksums(len);
    let block = CHECKSUM_BLOCK as usize;
    let mut runs: Vec<(usize, usize, BlockKind)> = Vec::new();
    for (i, z) in zero.iter().enumerate() {
        let kind = if peer.and_then(|p| p.get(i)) == Some(z) {
            BlockKind::Same
        } else {
            BlockKind::Zero
        };
        let start = i * block;
        let end = (start + block).min(len as usize);
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.1 == start => last.1 = end,
            _ => runs.push((start, end, kind)),
        }
    }
    runs
}
