//! Resync and verify: the out-of-sync bitmap ([`BitmapChunkRepr`], raw or RLE), the resync
//! messages ([`ResyncRequestRepr`], [`ResyncDataRepr`], [`ResyncSkipRepr`], [`ResyncZeroRepr`]),
//! checksum-based resync and verify ([`ChecksumAlg`], [`ChecksumRequestRepr`], [`ChecksumsRepr`])
//! and the operator-started [`SyncStartRepr`].

use super::{
    check_block_range, ensure, exact, need, rd32, rd64, wr32, wr64, Error, MAX_BITMAP_CHUNK_BITS,
    MAX_DATA_LEN,
};
use crate::cluster::state::wire_enum;

/// How a [`BitmapChunkRepr`] is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapEncoding {
    /// One bit per bit, LSB first.
    Raw,
    /// Alternating run lengths (clear run first, may be 0), each a LEB128 varint.
    Rle,
}

/// BitmapChunk flag: the last chunk of a bitmap transfer.
pub const BITMAP_LAST: u8 = 1;

/// BitmapChunk: part of the out-of-sync bitmap, sent at the start of a resync.
///
/// The `Repr` always holds the decoded bits (`bits`, LSB first, `ceil(bit_count / 8)` bytes,
/// padding bits zero); `encoding` says how [`BitmapChunkRepr::emit`] puts them on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChunkRepr {
    /// Index of the first bit this chunk describes.
    pub first_bit: u64,
    /// Number of bits described (at most [`MAX_BITMAP_CHUNK_BITS`]).
    pub bit_count: u32,
    /// Wire encoding.
    pub encoding: BitmapEncoding,
    /// Whether this is the last chunk.
    pub last: bool,
    /// The bits, LSB first.
    pub bits: Vec<u8>,
}

fn leb128_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn leb128_put(out: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// Reads one LEB128 value of at most 5 bytes (runs never exceed `u32`).
fn leb128_get(p: &[u8]) -> Result<(u64, usize), Error> {
    let mut v = 0u64;
    for (i, &b) in p.iter().enumerate().take(5) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            ensure(i == 0 || b != 0, "rle varint")?;
            return Ok((v, i + 1));
        }
    }
    Err(Error::Malformed {
        field: "rle varint",
    })
}

impl BitmapChunkRepr {
    /// Builds a chunk from bits, picking the smaller encoding.
    pub fn new(first_bit: u64, bit_count: u32, mut bits: Vec<u8>, last: bool) -> Self {
        bits.resize((bit_count as usize).div_ceil(8), 0);
        if !bit_count.is_multiple_of(8) {
            if let Some(b) = bits.last_mut() {
                *b &= (1u8 << (bit_count % 8)) - 1;
            }
        }
        let mut chunk = BitmapChunkRepr {
            first_bit,
            bit_count,
            encoding: BitmapEncoding::Rle,
            last,
            bits,
        };
        if chunk.rle_len() >= chunk.bits.len() {
            chunk.encoding = BitmapEncoding::Raw;
        }
        chunk
    }

    /// Bit `i` of the chunk (relative to `first_bit`).
    pub fn bit(&self, i: u32) -> bool {
        i < self.bit_count && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The run lengths of the bits: clear, set, clear, ... (the first may be 0).
    fn runs(&self) -> Vec<u64> {
        let mut runs = Vec::new();
        let mut current = false;
        let mut len = 0u64;
        for i in 0..self.bit_count {
            if self.bit(i) != current {
                runs.push(len);
                current = !current;
                len = 0;
            }
            len += 1;
        }
        if len > 0 || runs.is_empty() {
            runs.push(len);
        }
        runs
    }

    fn rle_len(&self) -> usize {
        self.runs().into_iter().map(leb128_len).sum()
    }

    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(14, p.len())?;
        let first_bit = rd64(p, 0);
        let bit_count = rd32(p, 8);
        ensure(bit_count <= MAX_BITMAP_CHUNK_BITS, "bit count")?;
        ensure(
            first_bit.checked_add(u64::from(bit_count)).is_some(),
            "first bit",
        )?;
        ensure(p[13] & !BITMAP_LAST == 0, "bitmap flags")?;
        let last = p[13] & BITMAP_LAST != 0;
        let body = &p[14..];
        let byte_len = (bit_count as usize).div_ceil(8);
        match p[12] {
            0 => {
                ensure(body.len() == byte_len, "payload length")?;
                if !bit_count.is_multiple_of(8) {
                    let pad = body[byte_len - 1] >> (bit_count % 8);
                    ensure(pad == 0, "bitmap padding")?;
                }
                Ok(BitmapChunkRepr {
                    first_bit,
                    bit_count,
                    encoding: BitmapEncoding::Raw,
                    last,
                    bits: body.to_vec(),
                })
            }
            1 => {
                let mut bits = vec![0u8; byte_len];
                let (mut at, mut pos, mut set) = (0usize, 0u64, false);
                while at < body.len() {
                    let (run, used) = leb128_get(&body[at..])?;
                    // Only the first run may be empty.
                    ensure(run > 0 || (at == 0 && body.len() > used), "rle run")?;
                    at += used;
                    let end = pos + run;
                    ensure(end <= u64::from(bit_count), "rle overrun")?;
                    if set {
                        for i in pos..end {
                            bits[(i / 8) as usize] |= 1 << (i % 8);
                        }
                    }
                    pos = end;
                    set = !set;
                }
                ensure(pos == u64::from(bit_count), "rle length")?;
                Ok(BitmapChunkRepr {
                    first_bit,
                    bit_count,
                    encoding: BitmapEncoding::Rle,
                    last,
                    bits,
                })
            }
            _ => Err(Error::Malformed {
                field: "bitmap encoding",
            }),
        }
    }

    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        14 + match self.encoding {
            BitmapEncoding::Raw => self.bits.len(),
            BitmapEncoding::Rle if self.bit_count == 0 => 0,
            BitmapEncoding::Rle => self.rle_len(),
        }
    }

    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.first_bit);
        wr32(p, 8, self.bit_count);
        p[13] = if self.last { BITMAP_LAST } else { 0 };
        match self.encoding {
            BitmapEncoding::Raw => {
                p[12] = 0;
                p[14..14 + self.bits.len()].copy_from_slice(&self.bits);
            }
            BitmapEncoding::Rle => {
                p[12] = 1;
                if self.bit_count == 0 {
                    return;
                }
                let mut at = 14;
                for run in self.runs() {
                    at += leb128_put(&mut p[at..], run);
                }
            }
        }
    }
}

/// ResyncRequest flag: `checksum` holds the crc32c of the requester's copy of the range.
pub const RESYNC_HAS_CHECKSUM: u8 = 1;

/// ResyncRequest: the sync target asks for one range (optionally "only if it differs").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRequestRepr {
    /// Request id, echoed in the answer.
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// Length in bytes (multiple of 512, at most [`MAX_DATA_LEN`]).
    pub len: u32,
    /// crc32c of the requester's data for checksum-based resync: the source answers with
    /// [`ResyncSkipRepr`] when its data has the same checksum.
    pub checksum: Option<u32>,
}

impl ResyncRequestRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 25)?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        ensure(p[20] & !RESYNC_HAS_CHECKSUM == 0, "resync flags")?;
        let crc = rd32(p, 21);
        let checksum = if p[20] & RESYNC_HAS_CHECKSUM != 0 {
            Some(crc)
        } else {
            ensure(crc == 0, "checksum")?;
            None
        };
        Ok(ResyncRequestRepr {
            id,
            offset,
            len,
            checksum,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        25
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
        p[20] = if self.checksum.is_some() {
            RESYNC_HAS_CHECKSUM
        } else {
            0
        };
        wr32(p, 21, self.checksum.unwrap_or(0));
    }
}

/// ResyncData: the source's data for one requested range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncDataRepr {
    /// The request's id.
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// The data (a multiple of 512 bytes, at most [`MAX_DATA_LEN`]).
    pub data: Vec<u8>,
}

impl ResyncDataRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(20, p.len())?;
        let len = rd32(p, 16) as usize;
        ensure(len <= MAX_DATA_LEN, "length")?;
        exact(p, 20 + len)?;
        let offset = rd64(p, 8);
        check_block_range(offset, len as u64)?;
        Ok(ResyncDataRepr {
            id: rd64(p, 0),
            offset,
            data: p[20..].to_vec(),
        })
    }
    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        20 + self.data.len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.data.len() as u32);
        p[20..20 + self.data.len()].copy_from_slice(&self.data);
    }
}

/// ResyncSkip: the range's checksum matched; nothing to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncSkipRepr {
    /// The request's id.
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// Length in bytes (multiple of 512).
    pub len: u32,
}

impl ResyncSkipRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 20)?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        Ok(ResyncSkipRepr { id, offset, len })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        20
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
    }
}

/// Block size of checksum-based resync and verify: one digest per this many bytes.
pub const CHECKSUM_BLOCK: u32 = 4096;

wire_enum! {
    /// The digest of one [`CHECKSUM_BLOCK`] that checksum-based resync and verify compare
    /// (DRBD's `csums-alg` and `verify-alg` in one). Both nodes must use the same one.
    ChecksumAlg {
        /// crc32c: 32 bits, fast in hardware, but blocks that differ match with 2^-32.
        Crc32c = 1, "crc32c";
        /// XXH3, 128-bit variant: not cryptographic, faster than memory bandwidth.
        Xxh3_128 = 2, "xxh3-128";
        /// BLAKE3 truncated to 128 bits: cryptographic, slower.
        Blake3 = 3, "blake3";
    } "checksum algorithm"
}

impl ChecksumAlg {
    /// Bytes one block's digest takes in a [`ChecksumsRepr`].
    pub const fn digest_len(self) -> usize {
        match self {
            ChecksumAlg::Crc32c => 4,
            ChecksumAlg::Xxh3_128 | ChecksumAlg::Blake3 => 16,
        }
    }

    /// Whether `digest` fits in [`ChecksumAlg::digest_len`] bytes.
    pub const fn fits(self, digest: u128) -> bool {
        self.digest_len() == 16 || digest >> (8 * self.digest_len()) == 0
    }
}

/// ChecksumRequest: "send me the digest of each 4 KiB block of this range of your disk" (with
/// the [`ChecksumAlg`] both nodes agreed on in their Parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumRequestRepr {
    /// Request id, echoed in the [`ChecksumsRepr`].
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// Length in bytes (multiple of 512, at most [`MAX_DATA_LEN`]).
    pub len: u32,
}

impl ChecksumRequestRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 20)?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        Ok(ChecksumRequestRepr { id, offset, len })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        20
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
    }
}

/// Number of [`CHECKSUM_BLOCK`]s (the last one possibly short) in `len` bytes.
pub const fn checksum_count(len: u32) -> usize {
    len.div_ceil(CHECKSUM_BLOCK) as usize
}

/// Checksums: the answer to a [`ChecksumRequestRepr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksumsRepr {
    /// The request's id.
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// Length in bytes (multiple of 512, at most [`MAX_DATA_LEN`]).
    pub len: u32,
    /// The algorithm of `digests`; it sets their width on the wire.
    pub alg: ChecksumAlg,
    /// One digest per block: exactly [`checksum_count`]`(len)` values, each one that
    /// [`ChecksumAlg::fits`] (a crc32c zero-extended).
    pub digests: Vec<u128>,
}

impl ChecksumsRepr {
    /// Length of the fields before the digests.
    const HEAD_LEN: usize = 21;

    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(Self::HEAD_LEN, p.len())?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        let alg = ChecksumAlg::from_code(p[20])?;
        let width = alg.digest_len();
        exact(p, Self::HEAD_LEN + width * checksum_count(len))?;
        let digests = p[Self::HEAD_LEN..]
            .chunks_exact(width)
            .map(|d| d.iter().fold(0u128, |v, &b| v << 8 | u128::from(b)))
            .collect();
        Ok(ChecksumsRepr {
            id,
            offset,
            len,
            alg,
            digests,
        })
    }
    /// Payload length. The `Repr` must hold [`checksum_count`]`(len)` digests.
    pub fn buffer_len(&self) -> usize {
        Self::HEAD_LEN + self.alg.digest_len() * self.digests.len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
        p[20] = self.alg.code();
        let width = self.alg.digest_len();
        let body = &mut p[Self::HEAD_LEN..Self::HEAD_LEN + width * self.digests.len()];
        for (out, digest) in body.chunks_exact_mut(width).zip(&self.digests) {
            debug_assert!(self.alg.fits(*digest), "{} digest too wide", self.alg);
            out.copy_from_slice(&digest.to_be_bytes()[16 - width..]);
        }
    }
}

/// ResyncZero: the source's data for this range is all zero bytes (the zero marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncZeroRepr {
    /// Request id (with the push bit), answered by a [`WriteAckRepr`](super::WriteAckRepr).
    pub id: u64,
    /// Byte offset (multiple of 512).
    pub offset: u64,
    /// Length in bytes (multiple of 512, at most [`MAX_DATA_LEN`]).
    pub len: u32,
}

impl ResyncZeroRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 20)?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        Ok(ResyncZeroRepr { id, offset, len })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        20
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
    }
}

/// An operator-started resync (`invalidate`, `invalidate-remote`, `primary --force`): the
/// sender's direction (the receiver takes the other one) and whether the whole device syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncStartRepr {
    /// The sender is the resync source.
    pub sender_is_source: bool,
    /// Whole device instead of the bitmap.
    pub full: bool,
}

impl SyncStartRepr {
    /// Parses the 1-byte payload: bit 0 sender is source, bit 1 full; other bits must be 0.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 1)?;
        if p[0] & !0b11 != 0 {
            return Err(Error::Malformed {
                field: "sync start flags",
            });
        }
        Ok(SyncStartRepr {
            sender_is_source: p[0] & 1 != 0,
            full: p[0] & 2 != 0,
        })
    }

    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        1
    }

    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        p[0] = u8::from(self.sender_is_source) | (u8::from(self.full) << 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::{Message, MessageType};
    use proptest::prelude::*;

    const PUSH: u64 = 1 << 63;

    #[test]
    fn literal_checksum_messages() {
        // Checksums for 4 KiB + 512 bytes at 8 KiB: two crc32c, the second over 512 bytes.
        let mut p = Vec::new();
        p.extend_from_slice(&9u64.to_be_bytes());
        p.extend_from_slice(&8192u64.to_be_bytes());
        p.extend_from_slice(&4608u32.to_be_bytes());
        p.push(1); // crc32c
        p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        p.extend_from_slice(&0x5566_7788u32.to_be_bytes());
        let c = ChecksumsRepr::parse(&p).unwrap();
        assert_eq!((c.id, c.offset, c.len), (9, 8192, 4608));
        assert_eq!(c.alg, ChecksumAlg::Crc32c);
        assert_eq!(c.digests, vec![0x1122_3344, 0x5566_7788]);
        let mut out = vec![0u8; c.buffer_len()];
        c.emit(&mut out);
        assert_eq!(out, p);
        // One digest too many or too few, a length that is not whole sectors, an unknown
        // algorithm: refused.
        assert!(ChecksumsRepr::parse(&p[..p.len() - 4]).is_err());
        let mut longer = p.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(ChecksumsRepr::parse(&longer).is_err());
        let mut unknown = p.clone();
        unknown[20] = 4;
        assert!(ChecksumsRepr::parse(&unknown).is_err());
        p[19] = 1; // length 4097
        assert!(ChecksumsRepr::parse(&p).is_err());

        // The same two blocks as 128-bit digests: 16 bytes each, big-endian; the crc32c
        // payload's 8 digest bytes are too few.
        let mut wide = Vec::new();
        wide.extend_from_slice(&9u64.to_be_bytes());
        wide.extend_from_slice(&8192u64.to_be_bytes());
        wide.extend_from_slice(&4608u32.to_be_bytes());
        wide.push(2); // xxh3-128
        wide.extend_from_slice(&[0xaa; 15]);
        wide.push(0x01);
        wide.extend_from_slice(&[0; 15]);
        wide.push(0x02);
        let c = ChecksumsRepr::parse(&wide).unwrap();
        assert_eq!(c.alg, ChecksumAlg::Xxh3_128);
        assert_eq!(c.digests, vec![(u128::MAX / 255 * 0xaa) << 8 | 1, 2]);
        let mut out = vec![0u8; c.buffer_len()];
        c.emit(&mut out);
        assert_eq!(out, wide);
        wide[20] = 1; // crc32c with 32 digest bytes
        assert!(ChecksumsRepr::parse(&wide).is_err());
        assert!(ChecksumsRepr::parse(&wide[..21]).is_err());

        let zero = Message::ResyncZero(ResyncZeroRepr {
            id: PUSH,
            offset: 4096,
            len: 1 << 20,
        });
        let mut out = vec![0u8; zero.buffer_len()];
        zero.emit(&mut out);
        assert_eq!(&out[16..20], &[0, 0x10, 0, 0]);
        assert_eq!(Message::parse(MessageType::ResyncZero, &out).unwrap(), zero);
        out[17] = 0x11; // more than MAX_DATA_LEN
        assert!(Message::parse(MessageType::ResyncZero, &out).is_err());

        let req = ChecksumRequestRepr {
            id: 3,
            offset: 512,
            len: 1024,
        };
        let mut out = vec![0u8; req.buffer_len()];
        req.emit(&mut out);
        assert_eq!(ChecksumRequestRepr::parse(&out).unwrap(), req);
        out[15] = 1; // offset 513
        assert!(ChecksumRequestRepr::parse(&out).is_err());
    }

    #[test]
    fn checksum_algorithm_words_codes_and_widths() {
        let words: Vec<_> = ChecksumAlg::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(words, ["crc32c", "xxh3-128", "blake3"]);
        for &alg in ChecksumAlg::ALL {
            assert_eq!(ChecksumAlg::from_code(alg.code()).unwrap(), alg);
            assert!(alg.fits(u128::from(u32::MAX)));
        }
        assert!(ChecksumAlg::from_code(0).is_err());
        assert!(!ChecksumAlg::Crc32c.fits(1 << 32));
        assert!(ChecksumAlg::Blake3.fits(u128::MAX));
    }

    #[test]
    fn bitmap_rle_literal_and_choice() {
        // 20 bits: 3 clear, 5 set, 12 clear -> runs 3,5,12.
        let mut bits = vec![0u8; 3];
        for i in 3..8 {
            bits[i / 8] |= 1 << (i % 8);
        }
        let chunk = BitmapChunkRepr::new(64, 20, bits.clone(), true);
        assert_eq!(chunk.encoding, BitmapEncoding::Raw); // 3 bytes raw == 3 bytes RLE
        let rle = BitmapChunkRepr {
            encoding: BitmapEncoding::Rle,
            ..chunk.clone()
        };
        let mut p = vec![0u8; rle.buffer_len()];
        rle.emit(&mut p);
        assert_eq!(&p[12..], &[1, BITMAP_LAST, 3, 5, 12]);
        assert_eq!(BitmapChunkRepr::parse(&p).unwrap(), rle);
        assert_eq!(rle.count_ones(), 5);

        // A mostly-clear 1 Mbit chunk compresses to a handful of bytes.
        let mut big = vec![0u8; 1 << 17];
        big[1000] = 0xff;
        let chunk = BitmapChunkRepr::new(0, 1 << 20, big, false);
        assert_eq!(chunk.encoding, BitmapEncoding::Rle);
        assert!(chunk.buffer_len() < 32);

        // Runs that overshoot or fall short of the bit count are malformed.
        let mut p2 = p.clone();
        p2[16] = 13;
        assert!(BitmapChunkRepr::parse(&p2).is_err());
        p2[16] = 11;
        assert!(BitmapChunkRepr::parse(&p2).is_err());
    }

    proptest! {
        #[test]
        fn bitmap_bits_survive_either_encoding(bits in proptest::collection::vec(any::<u8>(), 0..200), trim in 0u32..8) {
            let count = (bits.len() as u32 * 8).saturating_sub(trim);
            let chunk = BitmapChunkRepr::new(0, count, bits.clone(), false);
            for encoding in [BitmapEncoding::Raw, BitmapEncoding::Rle] {
                let c = BitmapChunkRepr { encoding, ..chunk.clone() };
                let mut p = vec![0u8; c.buffer_len()];
                c.emit(&mut p);
                let back = BitmapChunkRepr::parse(&p).unwrap();
                for i in 0..count {
                    prop_assert_eq!(back.bit(i), bits[(i / 8) as usize] & (1 << (i % 8)) != 0);
                }
            }
        }
    }
}
