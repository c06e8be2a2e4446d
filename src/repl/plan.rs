//! Pure resync planning: how each 4 KiB block of a chunk travels (data, a zero marker, or
//! nothing because the peer's digest matched), also for known-zero ranges. No I/O: the copier
//! reads, this decides; the digests are [`crate::repl::csum`]'s.

use crate::repl::csum::{self, Digest};
use crate::wire::repl::{ChecksumAlg, CHECKSUM_BLOCK};

/// How a block travels in a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// Its data (`ResyncData`).
    Data,
    /// A zero marker (`ResyncZero`).
    Zero,
    /// Nothing: the peer's digest matched (`ResyncSkip`).
    Same,
}

/// Splits `buf` into runs of 4 KiB blocks that travel the same way: equal to the peer's
/// digest under `alg` (if given), all zero, or data. Returns (start, end, kind) in bytes of
/// `buf`.
pub(crate) fn classify_blocks(
    alg: ChecksumAlg,
    buf: &[u8],
    peer: Option<&[Digest]>,
) -> Vec<(usize, usize, BlockKind)> {
    let block = CHECKSUM_BLOCK as usize;
    let mut runs: Vec<(usize, usize, BlockKind)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        let same = peer
            .and_then(|p| p.get(i))
            .is_some_and(|&d| csum::block_digest(alg, b) == d);
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

/// [`classify_blocks`] for `len` bytes known to be zero: equal where the peer's digest is the
/// zero block's, zero markers elsewhere.
pub(crate) fn classify_zero(
    alg: ChecksumAlg,
    len: u64,
    peer: Option<&[Digest]>,
) -> Vec<(usize, usize, BlockKind)> {
    let zero = csum::zero_digests(alg, len);
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
