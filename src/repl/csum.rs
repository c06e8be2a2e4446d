//! Block digests of checksum-based resync and verify: one [`Digest`] per
//! [`CHECKSUM_BLOCK`] of data under the [`ChecksumAlg`] both nodes agreed on.
//!
//! Every algorithm's digest is a `u128`, so callers compare digests without knowing the
//! algorithm: crc32c zero-extended, XXH3-128 as it is, BLAKE3 cut to its first 16 output bytes
//! (read big-endian, so the wire's bytes are BLAKE3's). The digests of all-zero blocks are
//! known without reading anything ([`zero_digests`]), for ranges a backend knows to be holes.
//! Pure functions, no I/O.

use std::sync::OnceLock;

use crate::wire::repl::{ChecksumAlg, CHECKSUM_BLOCK};

/// The digest of one block, of any algorithm (see the module docs).
pub type Digest = u128;

/// The digest of `block` (at most one [`CHECKSUM_BLOCK`], as the last block of a range may be
/// short).
pub fn block_digest(alg: ChecksumAlg, block: &[u8]) -> Digest {
    match alg {
        ChecksumAlg::Crc32c => Digest::from(crc32c::crc32c(block)),
        ChecksumAlg::Xxh3_128 => xxhash_rust::xxh3::xxh3_128(block),
        ChecksumAlg::Blake3 => {
            let hash = blake3::hash(block);
            let first: [u8; 16] = hash.as_bytes()[..16].try_into().expect("16 bytes");
            Digest::from_be_bytes(first)
        }
    }
}

/// The digest of each [`CHECKSUM_BLOCK`] of `data` (the last one over what is left).
pub fn block_digests(alg: ChecksumAlg, data: &[u8]) -> Vec<Digest> {
    data.chunks(CHECKSUM_BLOCK as usize)
        .map(|block| block_digest(alg, block))
        .collect()
}

/// What [`block_digests`] gives for `len` zero bytes, without hashing whole blocks (their
/// digest is computed once per algorithm).
pub fn zero_digests(alg: ChecksumAlg, len: u64) -> Vec<Digest> {
    let block = u64::from(CHECKSUM_BLOCK);
    (0..len.div_ceil(block))
        .map(|i| zero_digest(alg, block.min(len - i * block) as usize))
        .collect()
}

/// The digest of `len` zero bytes (at most one block).
fn zero_digest(alg: ChecksumAlg, len: usize) -> Digest {
    const ZEROS: [u8; CHECKSUM_BLOCK as usize] = [0; CHECKSUM_BLOCK as usize];
    static WHOLE_BLOCK: [OnceLock<Digest>; ChecksumAlg::ALL.len()] =
        [const { OnceLock::new() }; ChecksumAlg::ALL.len()];
    let slot = ChecksumAlg::ALL
        .iter()
        .position(|&a| a == alg)
        .expect("every algorithm is in ALL");
    if len == ZEROS.len() {
        *WHOLE_BLOCK[slot].get_or_init(|| block_digest(alg, &ZEROS))
    } else {
        block_digest(alg, &ZEROS[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::checksum_count;
    use proptest::prelude::*;

    #[test]
    fn known_answers() {
        let check = b"123456789";
        assert_eq!(block_digest(ChecksumAlg::Crc32c, check), 0xe306_9283);
        assert_eq!(
            block_digest(ChecksumAlg::Xxh3_128, b""),
            0x99aa_06d3_0147_98d8_6001_c324_468d_497f
        );
        // BLAKE3("") = af1349b9f5f9a1a6a0404dea36dcc949 9bcb25c9adc112b7cc9a93cae41f3262
        assert_eq!(
            block_digest(ChecksumAlg::Blake3, b""),
            0xaf13_49b9_f5f9_a1a6_a040_4dea_36dc_c949
        );
    }

    #[test]
    fn every_digest_fits_its_wire_width() {
        let data: Vec<u8> = (0..3 * CHECKSUM_BLOCK + 512).map(|i| i as u8).collect();
        for &alg in ChecksumAlg::ALL {
            let digests = block_digests(alg, &data);
            assert_eq!(digests.len(), checksum_count(data.len() as u32));
            assert!(digests.iter().all(|&d| alg.fits(d)), "{alg}");
        }
    }

    #[test]
    fn zero_digests_match_hashing_zeros() {
        for &alg in ChecksumAlg::ALL {
            for len in [0u64, 512, 4096, 4096 + 512, 3 << 12, 1 << 20] {
                let zeros = vec![0u8; len as usize];
                assert_eq!(
                    zero_digests(alg, len),
                    block_digests(alg, &zeros),
                    "{alg} {len}"
                );
            }
        }
    }

    #[test]
    fn algorithms_disagree_with_each_other() {
        let block = [7u8; CHECKSUM_BLOCK as usize];
        let [a, b, c] = [0, 1, 2].map(|i| block_digest(ChecksumAlg::ALL[i], &block));
        assert!(a != b && b != c && a != c);
    }

    /// Digests 1 GiB in 4 KiB blocks with each algorithm and prints the speed. Run it with
    /// `cargo test --release --lib digest_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in a release build"]
    fn digest_speed() {
        const BUFFER: usize = 64 << 20; // larger than the caches, as a disk read would be
        const ROUNDS: usize = 16; // 1 GiB in all
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..BUFFER)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for &alg in ChecksumAlg::ALL {
            let start = std::time::Instant::now();
            let mut sum = 0u128;
            for _ in 0..ROUNDS {
                sum = block_digests(alg, &data)
                    .into_iter()
                    .fold(sum, u128::wrapping_add);
            }
            let secs = start.elapsed().as_secs_f64();
            let mb = (BUFFER * ROUNDS) as f64 / 1e6;
            println!(
                "{alg:>9}: {:7.0} MB/s ({secs:.2} s for 1 GiB; sum {:04x})",
                mb / secs,
                sum & 0xffff
            );
        }
    }

    proptest! {
        /// Changing one byte changes the digest of its block and of no other block.
        #[test]
        fn one_changed_byte_changes_only_its_block(
            data in proptest::collection::vec(any::<u8>(), 1..3 * CHECKSUM_BLOCK as usize),
            at in any::<proptest::sample::Index>(),
            flip in 1u8..,
        ) {
            let at = at.index(data.len());
            let mut changed = data.clone();
            changed[at] ^= flip;
            for &alg in ChecksumAlg::ALL {
                let before = block_digests(alg, &data);
                let after = block_digests(alg, &changed);
                for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                    prop_assert_eq!(b != a, i == at / CHECKSUM_BLOCK as usize, "{} block {}", alg, i);
                }
            }
        }
    }
}
