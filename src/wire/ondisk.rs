//! The on-disk meta-data formats: superblock, activity-log transaction and bitmap page.
//!
//! Every structure is exactly [`BLOCK_LEN`] (4 KiB) long, little-endian, and protected by a
//! crc32c stored inside it (computed over the whole block with the checksum field zeroed).
//! A block whose magic, checksum or fields are wrong does not parse: a torn or corrupt
//! structure is detected here and never trusted. What to do instead (pick the other
//! superblock copy, stop the activity-log replay, set every bit of a bitmap page) is decided
//! in [`crate::meta`].
//!
//! # Superblock ([`Superblock`], [`SuperblockRepr`])
//!
//! ```text
//!    0..8    magic "TWBLMETA"           8..12   format version (1)     12..16  flags
//!   16..24   write sequence            24..32   meta-data uuid (random at create-md)
//!   32..40   uuid current              40..48   uuid bitmap
//!   48..56   uuid history 1            56..64   uuid history 2
//!   64..72   data size (bytes)         72..80   meta-data area size (bytes)
//!   80..88   superblock offset         88..96   activity-log offset
//!   96..104  bitmap offset            104..108  AL ring length (transactions)
//!  108..112  al-extents               112       AL extent shift (22 = 4 MiB)
//!  113       bitmap block shift (12)  114       meta-data kind (0 internal, 1 external)
//!  116..120  bitmap pages             120..152  resource name (UTF-8, NUL padded)
//! 4092..4096 crc32c
//! ```
//!
//! Offsets are absolute byte offsets on the device that holds the meta-data. There are two
//! copies of the superblock side by side; the valid one with the higher sequence wins.
//!
//! # Activity-log transaction ([`AlTransaction`], [`AlTransactionRepr`])
//!
//! ```text
//!    0..4    magic "TBAL"               4..8    crc32c
//!    8..16   meta-data uuid            16..24   transaction number
//!   24..26   kind (0 update, 1 reset)  26..28   number of updates (<= 64)
//!   28..30   context start slot        30..32   context length (<= 916)
//!   48..176  update slots (u16 x 64)  176..432  update extents (u32 x 64)
//!  432..4096 context: extents of consecutive slots (u32 x 916)
//! ```
//!
//! An extent number of [`AL_FREE`] means "slot empty".
//!
//! # Bitmap page ([`BitmapPage`], [`BitmapPageRepr`])
//!
//! ```text
//!    0..4    magic "TBBM"               4..8    crc32c
//!    8..16   meta-data uuid            16..20   page index
//!   32..4096 bits (bit i of the page: byte i / 8, bit i % 8; 32512 bits per page)
//! ```

use super::{need, Error};

/// Size of every on-disk structure, and the alignment of every meta-data offset.
pub const BLOCK_LEN: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"TWBLMETA";
/// The superblock format this module reads and writes.
pub const SB_VERSION: u32 = 1;
/// Longest resource name a superblock records.
pub const SB_NAME_LEN: usize = 32;
/// AL transaction magic ("TBAL").
pub const AL_MAGIC: u32 = u32::from_le_bytes(*b"TBAL");
/// Most slot updates one AL transaction carries (DRBD's AL_UPDATES_PER_TRANSACTION).
pub const AL_UPDATES_PER_TR: usize = 64;
/// Context entries (slot snapshots) one AL transaction carries.
pub const AL_CONTEXT_PER_TR: usize = 916;
/// Extent number meaning "this AL slot is empty".
pub const AL_FREE: u32 = u32::MAX;
/// Largest number of AL slots (slot numbers are 16 bits; 0xFFFF is reserved).
pub const AL_MAX_SLOTS: u32 = 0xFFFF;
/// Bitmap page magic ("TBBM").
pub const BM_MAGIC: u32 = u32::from_le_bytes(*b"TBBM");
/// Header bytes at the start of a bitmap page.
pub const BM_HEADER_LEN: usize = 32;
/// Bitmap bytes in one page.
pub const BM_BYTES_PER_PAGE: usize = BLOCK_LEN - BM_HEADER_LEN;
/// Bitmap bits in one page.
pub const BM_BITS_PER_PAGE: u64 = (BM_BYTES_PER_PAGE * 8) as u64;
/// Smallest AL extent shift accepted (64 KiB extents).
pub const MIN_EXTENT_SHIFT: u8 = 16;
/// Largest AL extent shift accepted (1 GiB extents).
pub const MAX_EXTENT_SHIFT: u8 = 30;
/// The only bitmap granularity supported: 4 KiB per bit.
pub const BM_BLOCK_SHIFT: u8 = 12;

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn write_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn write_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn write_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// crc32c of a 4 KiB block with the four checksum bytes at `crc_at` taken as zero.
fn block_crc(block: &[u8], crc_at: usize) -> u32 {
    let crc = crc32c::crc32c(&block[..crc_at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[crc_at + 4..BLOCK_LEN])
}

fn malformed(field: &'static str) -> Error {
    Error::Malformed { field }
}

// ---------------------------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------------------------

mod sb_field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const SEQ: usize = 16;
    pub const MD_UUID: usize = 24;
    pub const UUIDS: usize = 32;
    pub const DATA_SIZE: usize = 64;
    pub const MD_SIZE: usize = 72;
    pub const SB_OFFSET: usize = 80;
    pub const AL_OFFSET: usize = 88;
    pub const BM_OFFSET: usize = 96;
    pub const AL_TRANSACTIONS: usize = 104;
    pub const AL_EXTENTS: usize = 108;
    pub const AL_EXTENT_SHIFT: usize = 112;
    pub const BM_BLOCK_SHIFT: usize = 113;
    pub const KIND: usize = 114;
    pub const BM_PAGES: usize = 116;
    pub const NAME: usize = 120;
    pub const AGREED_SIZE: usize = 152;
    pub const CRC: usize = super::BLOCK_LEN - 4;
}

/// Superblock flag bits.
pub mod flags {
    /// The data is consistent (DRBD's MDF_CONSISTENT): not in the middle of a resync target.
    pub const CONSISTENT: u32 = 0x01;
    /// This node is (or was, at a crash) primary.
    pub const PRIMARY_IND: u32 = 0x02;
    /// The node crashed while primary (set at attach if PRIMARY_IND was still set).
    pub const CRASHED_PRIMARY: u32 = 0x04;
    /// The peer's disk is known to be outdated.
    pub const PEER_OUTDATED: u32 = 0x08;
    /// The activity log was cleanly closed: it names nothing that might be out of sync.
    pub const AL_CLEAN: u32 = 0x10;
    /// This node's data is Outdated (consistent, but the peer has newer): it must not promote
    /// itself. Set when a primary that lost the replication link asks for it (resource-only
    /// fencing) or after the peer took over; cleared by a resync.
    pub const OUTDATED: u32 = 0x20;
    /// Every bit known to this format.
    pub const ALL: u32 =
        CONSISTENT | PRIMARY_IND | CRASHED_PRIMARY | PEER_OUTDATED | AL_CLEAN | OUTDATED;
}

/// Where the meta-data lives relative to the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// At the end of the data device; the usable size shrinks.
    Internal,
    /// On a separate device (or file) of its own.
    External,
}

impl MetaKind {
    fn to_u8(self) -> u8 {
        match self {
            MetaKind::Internal => 0,
            MetaKind::External => 1,
        }
    }
}

/// A view of a superblock copy.
#[derive(Debug, Clone)]
pub struct Superblock<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Superblock<T> {
    /// Wraps a buffer without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        Superblock { buffer }
    }

    /// Wraps a buffer after checking its length.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let sb = Self::new_unchecked(buffer);
        sb.check_len()?;
        Ok(sb)
    }

    /// Checks that the buffer holds a whole block.
    pub fn check_len(&self) -> Result<(), Error> {
        need(BLOCK_LEN, self.buffer.as_ref().len())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Whether the magic matches (regardless of checksum): "some twinblade meta-data is here".
    pub fn has_magic(&self) -> bool {
        self.b()[..8] == SB_MAGIC
    }
    /// Format version.
    pub fn version(&self) -> u32 {
        read_u32(self.b(), sb_field::VERSION)
    }
    /// Flag bits (see [`flags`]).
    pub fn flags(&self) -> u32 {
        read_u32(self.b(), sb_field::FLAGS)
    }
    /// Write sequence.
    pub fn seq(&self) -> u64 {
        read_u64(self.b(), sb_field::SEQ)
    }
    /// Meta-data uuid.
    pub fn md_uuid(&self) -> u64 {
        read_u64(self.b(), sb_field::MD_UUID)
    }
    /// Generation uuid `i` (0 current, 1 bitmap, 2 and 3 history).
    pub fn uuid(&self, i: usize) -> u64 {
        read_u64(self.b(), sb_field::UUIDS + 8 * i)
    }
    /// Stored checksum.
    pub fn checksum(&self) -> u32 {
        read_u32(self.b(), sb_field::CRC)
    }
    /// Whether the stored checksum matches the contents.
    pub fn verify_checksum(&self) -> bool {
        block_crc(self.b(), sb_field::CRC) == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Superblock<T> {
    /// Recomputes and stores the checksum.
    pub fn fill_checksum(&mut self) {
        let crc = block_crc(self.buffer.as_ref(), sb_field::CRC);
        write_u32(self.buffer.as_mut(), sb_field::CRC, crc);
    }
}

/// The parsed meaning of a superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockRepr {
    /// Flag bits (see [`flags`]).
    pub flags: u32,
    /// Write sequence: bumped on every write; the higher valid copy wins.
    pub seq: u64,
    /// Random identity of this meta-data, given by create-md.
    pub md_uuid: u64,
    /// Generation uuids: current, bitmap, history 1, history 2.
    pub uuids: [u64; 4],
    /// Usable data size in bytes (a multiple of 4 KiB).
    pub data_size: u64,
    /// Size of the whole meta-data area in bytes.
    pub md_size: u64,
    /// Offset of the first superblock copy (the second follows it).
    pub sb_offset: u64,
    /// Offset of the activity-log ring.
    pub al_offset: u64,
    /// Offset of the first bitmap page.
    pub bm_offset: u64,
    /// Length of the activity-log ring in transactions (4 KiB each).
    pub al_transactions: u32,
    /// Number of activity-log slots (hot extents).
    pub al_extents: u32,
    /// log2 of the activity-log extent size.
    pub al_extent_shift: u8,
    /// log2 of the bytes one bitmap bit covers.
    pub bm_block_shift: u8,
    /// Internal or external meta-data.
    pub kind: MetaKind,
    /// Number of bitmap pages.
    pub bm_pages: u32,
    /// Resource name (at most [`SB_NAME_LEN`] bytes, no NUL).
    pub name: String,
    /// The usable size last agreed with the peer (DRBD's la-size), when it is smaller than
    /// `data_size`; 0 when no smaller size was ever agreed. A multiple of 4 KiB.
    pub agreed_size: u64,
}

/// Bitmap pages needed for `data_size` bytes with 4 KiB bits.
pub fn bm_pages_for(data_size: u64) -> u64 {
    let bits = data_size.div_ceil(1 << BM_BLOCK_SHIFT);
    bits.div_ceil(BM_BITS_PER_PAGE).max(1)
}

/// Activity-log slots a ring of `transactions` can describe after a torn write: every slot
/// must appear in the context of the `transactions - 1` newest ones.
pub fn al_capacity(transactions: u32) -> u64 {
    (transactions.saturating_sub(1) as u64 * AL_CONTEXT_PER_TR as u64).min(AL_MAX_SLOTS as u64)
}

impl SuperblockRepr {
    /// Parses a superblock copy, checking magic, version, checksum and geometry.
    pub fn parse<T: AsRef<[u8]>>(sb: &Superblock<T>) -> Result<Self, Error> {
        sb.check_len()?;
        let b = sb.b();
        if !sb.has_magic() {
            return Err(malformed("magic"));
        }
        if sb.version() != SB_VERSION {
            return Err(malformed("version"));
        }
        if !sb.verify_checksum() {
            return Err(malformed("checksum"));
        }
        let flags = sb.flags();
        if flags & !flags::ALL != 0 {
            return Err(malformed("flags"));
        }
        let kind = match b[sb_field::KIND] {
            0 => MetaKind::Internal,
            1 => MetaKind::External,
            _ => return Err(malformed("kind")),
        };
        let name_bytes = &b[sb_field::NAME..sb_field::NAME + SB_NAME_LEN];
        let name_len = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(SB_NAME_LEN);
        if name_bytes[name_len..].iter().any(|&c| c != 0) {
            return Err(malformed("name"));
        }
        let name = std::str::from_utf8(&name_bytes[..name_len])
            .map_err(|_| malformed("name"))?
            .to_string();
        let repr = SuperblockRepr {
            flags,
            seq: sb.seq(),
            md_uuid: sb.md_uuid(),
            uuids: [sb.uuid(0), sb.uuid(1), sb.uuid(2), sb.uuid(3)],
            data_size: read_u64(b, sb_field::DATA_SIZE),
            md_size: read_u64(b, sb_field::MD_SIZE),
            sb_offset: read_u64(b, sb_field::SB_OFFSET),
            al_offset: read_u64(b, sb_field::AL_OFFSET),
            bm_offset: read_u64(b, sb_field::BM_OFFSET),
            al_transactions: read_u32(b, sb_field::AL_TRANSACTIONS),
            al_extents: read_u32(b, sb_field::AL_EXTENTS),
            al_extent_shift: b[sb_field::AL_EXTENT_SHIFT],
            bm_block_shift: b[sb_field::BM_BLOCK_SHIFT],
            kind,
            bm_pages: read_u32(b, sb_field::BM_PAGES),
            name,
            agreed_size: read_u64(b, sb_field::AGREED_SIZE),
        };
        repr.check_geometry()?;
        Ok(repr)
    }

    /// Checks the geometry fields for internal consistency (alignment, capacity, overlap).
    pub fn check_geometry(&self) -> Result<(), Error> {
        let block = BLOCK_LEN as u64;
        if !(MIN_EXTENT_SHIFT..=MAX_EXTENT_SHIFT).contains(&self.al_extent_shift) {
            return Err(malformed("al_extent_shift"));
        }
        if self.bm_block_shift != BM_BLOCK_SHIFT {
            return Err(malformed("bm_block_shift"));
        }
        if !self.data_size.is_multiple_of(block) {
            return Err(malformed("data_size"));
        }
        if self.data_size >> self.al_extent_shift >= AL_FREE as u64 {
            return Err(malformed("data_size"));
        }
        if self.al_transactions < 2 {
            return Err(malformed("al_transactions"));
        }
        if self.al_extents == 0 || self.al_extents as u64 > al_capacity(self.al_transactions) {
            return Err(malformed("al_extents"));
        }
        if (self.bm_pages as u64) < bm_pages_for(self.data_size) {
            return Err(malformed("bm_pages"));
        }
        if self.name.len() > SB_NAME_LEN || self.name.contains('\0') {
            return Err(malformed("name"));
        }
        if self.agreed_size > self.data_size || !self.agreed_size.is_multiple_of(block) {
            return Err(malformed("agreed_size"));
        }
        // Three regions, each 4 KiB aligned, none overlapping.
        let regions = [
            (self.sb_offset, 2 * block, "sb_offset"),
            (
                self.al_offset,
                self.al_transactions as u64 * block,
                "al_offset",
            ),
            (self.bm_offset, self.bm_pages as u64 * block, "bm_offset"),
        ];
        for (i, &(start, len, field)) in regions.iter().enumerate() {
            if !start.is_multiple_of(block) || start.checked_add(len).is_none() {
                return Err(malformed(field));
            }
            for &(other, other_len, _) in &regions[..i] {
                if start < other + other_len && other < start + len {
                    return Err(malformed(field));
                }
            }
        }
        let total: u64 = regions.iter().map(|r| r.1).sum();
        if self.md_size < total || !self.md_size.is_multiple_of(block) {
            return Err(malformed("md_size"));
        }
        Ok(())
    }

    /// Bytes an emitted superblock takes.
    pub fn buffer_len(&self) -> usize {
        BLOCK_LEN
    }

    /// Writes the superblock (checksum included) into a buffer of at least [`BLOCK_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, sb: &mut Superblock<T>) {
        let b = &mut sb.buffer.as_mut()[..BLOCK_LEN];
        b.fill(0);
        b[..8].copy_from_slice(&SB_MAGIC);
        write_u32(b, sb_field::VERSION, SB_VERSION);
        write_u32(b, sb_field::FLAGS, self.flags);
        write_u64(b, sb_field::SEQ, self.seq);
        write_u64(b, sb_field::MD_UUID, self.md_uuid);
        for (i, uuid) in self.uuids.iter().enumerate() {
            write_u64(b, sb_field::UUIDS + 8 * i, *uuid);
        }
        write_u64(b, sb_field::DATA_SIZE, self.data_size);
        write_u64(b, sb_field::MD_SIZE, self.md_size);
        write_u64(b, sb_field::SB_OFFSET, self.sb_offset);
        write_u64(b, sb_field::AL_OFFSET, self.al_offset);
        write_u64(b, sb_field::BM_OFFSET, self.bm_offset);
        write_u32(b, sb_field::AL_TRANSACTIONS, self.al_transactions);
        write_u32(b, sb_field::AL_EXTENTS, self.al_extents);
        b[sb_field::AL_EXTENT_SHIFT] = self.al_extent_shift;
        b[sb_field::BM_BLOCK_SHIFT] = self.bm_block_shift;
        b[sb_field::KIND] = self.kind.to_u8();
        write_u32(b, sb_field::BM_PAGES, self.bm_pages);
        let name = self.name.as_bytes();
        let n = name.len().min(SB_NAME_LEN);
        b[sb_field::NAME..sb_field::NAME + n].copy_from_slice(&name[..n]);
        write_u64(b, sb_field::AGREED_SIZE, self.agreed_size);
        sb.fill_checksum();
        debug_assert_eq!(sb_field::MAGIC, 0);
    }

    /// Emits into a fresh 4 KiB block.
    pub fn to_block(&self) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK_LEN];
        self.emit(&mut Superblock::new_unchecked(&mut out[..]));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Activity-log transaction
// ---------------------------------------------------------------------------------------------

mod al_field {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 4;
    pub const MD_UUID: usize = 8;
    pub const NUMBER: usize = 16;
    pub const KIND: usize = 24;
    pub const N_UPDATES: usize = 26;
    pub const CONTEXT_START: usize = 28;
    pub const CONTEXT_LEN: usize = 30;
    pub const UPDATE_SLOTS: usize = 48;
    pub const UPDATE_EXTENTS: usize = UPDATE_SLOTS + 2 * super::AL_UPDATES_PER_TR;
    pub const CONTEXT: usize = UPDATE_EXTENTS + 4 * super::AL_UPDATES_PER_TR;
}

const _: () = assert!(al_field::CONTEXT + 4 * AL_CONTEXT_PER_TR == BLOCK_LEN);

/// What an AL transaction does before applying its updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlKind {
    /// Applies updates and context on top of the previous state.
    Update,
    /// Empties every slot first: nothing before it matters.
    Reset,
}

/// A view of an activity-log transaction.
#[derive(Debug, Clone)]
pub struct AlTransaction<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> AlTransaction<T> {
    /// Wraps a buffer without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        AlTransaction { buffer }
    }

    /// Wraps a buffer after checking its length.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let tr = Self::new_unchecked(buffer);
        tr.check_len()?;
        Ok(tr)
    }

    /// Checks that the buffer holds a whole block.
    pub fn check_len(&self) -> Result<(), Error> {
        need(BLOCK_LEN, self.buffer.as_ref().len())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Magic.
    pub fn magic(&self) -> u32 {
        read_u32(self.b(), al_field::MAGIC)
    }
    /// Stored checksum.
    pub fn checksum(&self) -> u32 {
        read_u32(self.b(), al_field::CRC)
    }
    /// Whether the stored checksum matches the contents.
    pub fn verify_checksum(&self) -> bool {
        block_crc(self.b(), al_field::CRC) == self.checksum()
    }
    /// Meta-data uuid.
    pub fn md_uuid(&self) -> u64 {
        read_u64(self.b(), al_field::MD_UUID)
    }
    /// Transaction number.
    pub fn number(&self) -> u64 {
        read_u64(self.b(), al_field::NUMBER)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AlTransaction<T> {
    /// Recomputes and stores the checksum.
    pub fn fill_checksum(&mut self) {
        let crc = block_crc(self.buffer.as_ref(), al_field::CRC);
        write_u32(self.buffer.as_mut(), al_field::CRC, crc);
    }
}

/// The parsed meaning of an activity-log transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransactionRepr {
    /// Meta-data uuid: a transaction from other meta-data is not ours.
    pub md_uuid: u64,
    /// Transaction number; transaction `n` lives in ring slot `n % ring length`.
    pub number: u64,
    /// Update or reset.
    pub kind: AlKind,
    /// (slot, extent) assignments, at most [`AL_UPDATES_PER_TR`].
    pub updates: Vec<(u16, u32)>,
    /// First slot the context describes.
    pub context_start: u16,
    /// Extents held by slots `context_start..` (wrapping) after this transaction; at most
    /// [`AL_CONTEXT_PER_TR`].
    pub context: Vec<u32>,
}

impl AlTransactionRepr {
    /// Parses a transaction, checking magic, checksum and counts.
    pub fn parse<T: AsRef<[u8]>>(tr: &AlTransaction<T>) -> Result<Self, Error> {
        tr.check_len()?;
        let b = tr.b();
        if tr.magic() != AL_MAGIC {
            return Err(malformed("magic"));
        }
        if !tr.verify_checksum() {
            return Err(malformed("checksum"));
        }
        let kind = match read_u16(b, al_field::KIND) {
            0 => AlKind::Update,
            1 => AlKind::Reset,
            _ => return Err(malformed("kind")),
        };
        let n_updates = read_u16(b, al_field::N_UPDATES) as usize;
        if n_updates > AL_UPDATES_PER_TR {
            return Err(malformed("n_updates"));
        }
        let context_len = read_u16(b, al_field::CONTEXT_LEN) as usize;
        if context_len > AL_CONTEXT_PER_TR {
            return Err(malformed("context_len"));
        }
        let updates = (0..n_updates)
            .map(|i| {
                (
                    read_u16(b, al_field::UPDATE_SLOTS + 2 * i),
                    read_u32(b, al_field::UPDATE_EXTENTS + 4 * i),
                )
            })
            .collect();
        let context = (0..context_len)
            .map(|i| read_u32(b, al_field::CONTEXT + 4 * i))
            .collect();
        Ok(AlTransactionRepr {
            md_uuid: tr.md_uuid(),
            number: tr.number(),
            kind,
            updates,
            context_start: read_u16(b, al_field::CONTEXT_START),
            context,
        })
    }

    /// Bytes an emitted transaction takes.
    pub fn buffer_len(&self) -> usize {
        BLOCK_LEN
    }

    /// Writes the transaction (checksum included). Updates and context beyond the format's
    /// limits are cut off (callers never build such a transaction).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, tr: &mut AlTransaction<T>) {
        let b = &mut tr.buffer.as_mut()[..BLOCK_LEN];
        b.fill(0);
        write_u32(b, al_field::MAGIC, AL_MAGIC);
        write_u64(b, al_field::MD_UUID, self.md_uuid);
        write_u64(b, al_field::NUMBER, self.number);
        let kind = match self.kind {
            AlKind::Update => 0,
            AlKind::Reset => 1,
        };
        write_u16(b, al_field::KIND, kind);
        let updates = &self.updates[..self.updates.len().min(AL_UPDATES_PER_TR)];
        write_u16(b, al_field::N_UPDATES, updates.len() as u16);
        for (i, &(slot, extent)) in updates.iter().enumerate() {
            write_u16(b, al_field::UPDATE_SLOTS + 2 * i, slot);
            write_u32(b, al_field::UPDATE_EXTENTS + 4 * i, extent);
        }
        let context = &self.context[..self.context.len().min(AL_CONTEXT_PER_TR)];
        write_u16(b, al_field::CONTEXT_START, self.context_start);
        write_u16(b, al_field::CONTEXT_LEN, context.len() as u16);
        for (i, &extent) in context.iter().enumerate() {
            write_u32(b, al_field::CONTEXT + 4 * i, extent);
        }
        tr.fill_checksum();
    }

    /// Emits into a fresh 4 KiB block.
    pub fn to_block(&self) -> Vec<u8> {
        let mut out = vec![0u8; BLOCK_LEN];
        self.emit(&mut AlTransaction::new_unchecked(&mut out[..]));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Bitmap page
// ---------------------------------------------------------------------------------------------

mod bm_field {
    pub const MAGIC: usize = 0;
    pub const CRC: usize = 4;
    pub const MD_UUID: usize = 8;
    pub const INDEX: usize = 16;
    pub const BITS: usize = super::BM_HEADER_LEN;
}

/// A view of a bitmap page.
#[derive(Debug, Clone)]
pub struct BitmapPage<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> BitmapPage<T> {
    /// Wraps a buffer without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        BitmapPage { buffer }
    }

    /// Wraps a buffer after checking its length.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let page = Self::new_unchecked(buffer);
        page.check_len()?;
        Ok(page)
    }

    /// Checks that the buffer holds a whole block.
    pub fn check_len(&self) -> Result<(), Error> {
        need(BLOCK_LEN, self.buffer.as_ref().len())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Magic.
    pub fn magic(&self) -> u32 {
        read_u32(self.b(), bm_field::MAGIC)
    }
    /// Stored checksum.
    pub fn checksum(&self) -> u32 {
        read_u32(self.b(), bm_field::CRC)
    }
    /// Whether the stored checksum matches the contents.
    pub fn verify_checksum(&self) -> bool {
        block_crc(self.b(), bm_field::CRC) == self.checksum()
    }
    /// Meta-data uuid.
    pub fn md_uuid(&self) -> u64 {
        read_u64(self.b(), bm_field::MD_UUID)
    }
    /// Page index.
    pub fn index(&self) -> u32 {
        read_u32(self.b(), bm_field::INDEX)
    }
    /// The bit bytes.
    pub fn bits(&self) -> &[u8] {
        &self.b()[bm_field::BITS..BLOCK_LEN]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> BitmapPage<T> {
    /// Recomputes and stores the checksum.
    pub fn fill_checksum(&mut self) {
        let crc = block_crc(self.buffer.as_ref(), bm_field::CRC);
        write_u32(self.buffer.as_mut(), bm_field::CRC, crc);
    }
}

/// The parsed meaning of a bitmap page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapPageRepr {
    /// Meta-data uuid.
    pub md_uuid: u64,
    /// Page index (page `i` holds bits `i * BM_BITS_PER_PAGE..`).
    pub index: u32,
    /// [`BM_BYTES_PER_PAGE`] bytes of bits.
    pub bits: Vec<u8>,
}

impl BitmapPageRepr {
    /// Parses a page, checking magic and checksum.
    pub fn parse<T: AsRef<[u8]>>(page: &BitmapPage<T>) -> Result<Self, Error> {
        page.check_len()?;
        if page.magic() != BM_MAGIC {
            return Err(malformed("magic"));
        }
        if !page.verify_checksum() {
            return Err(malformed("checksum"));
        }
        Ok(BitmapPageRepr {
            md_uuid: page.md_uuid(),
            index: page.index(),
            bits: page.bits().to_vec(),
        })
    }

    /// Bytes an emitted page takes.
    pub fn buffer_len(&self) -> usize {
        BLOCK_LEN
    }

    /// Writes the page (checksum included). Missing bits are written as zero.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, page: &mut BitmapPage<T>) {
        emit_bitmap_page(
            &mut page.buffer.as_mut()[..BLOCK_LEN],
            self.md_uuid,
            self.index,
            &self.bits,
        );
    }
}

/// Writes a bitmap page straight from a slice of bits (no intermediate `Repr`), as the meta-data
/// store does on every write-back. `block` must be [`BLOCK_LEN`] bytes.
pub fn emit_bitmap_page(block: &mut [u8], md_uuid: u64, index: u32, bits: &[u8]) {
    let block = &mut block[..BLOCK_LEN];
    block.fill(0);
    write_u32(block, bm_field::MAGIC, BM_MAGIC);
    write_u64(block, bm_field::MD_UUID, md_uuid);
    write_u32(block, bm_field::INDEX, index);
    let n = bits.len().min(BM_BYTES_PER_PAGE);
    block[bm_field::BITS..bm_field::BITS + n].copy_from_slice(&bits[..n]);
    let crc = block_crc(block, bm_field::CRC);
    write_u32(block, bm_field::CRC, crc);
}

/// Runs every parser on `data` (and on each 4 KiB block of it) and checks that whatever parses
/// survives an emit/parse round trip unchanged. The cargo-fuzz target calls this.
pub fn fuzz_parse(data: &[u8]) {
    let mut blocks = vec![data.to_vec()];
    // Short inputs are padded to a block and given a valid checksum in every position, so the
    // fuzzer reaches the field checks behind the checksum.
    if data.len() < BLOCK_LEN {
        let mut padded = data.to_vec();
        padded.resize(BLOCK_LEN, 0);
        for crc_at in [sb_field::CRC, al_field::CRC, bm_field::CRC] {
            let mut b = padded.clone();
            let crc = block_crc(&b, crc_at);
            write_u32(&mut b, crc_at, crc);
            blocks.push(b);
        }
    }
    for block in &blocks {
        if let Ok(sb) = Superblock::new_checked(&block[..]) {
            if let Ok(repr) = SuperblockRepr::parse(&sb) {
                let again = SuperblockRepr::parse(&Superblock::new_unchecked(&repr.to_block()[..]))
                    .expect("an emitted superblock must parse");
                assert_eq!(again, repr, "superblock round trip");
            }
        }
        if let Ok(tr) = AlTransaction::new_checked(&block[..]) {
            if let Ok(repr) = AlTransactionRepr::parse(&tr) {
                let again =
                    AlTransactionRepr::parse(&AlTransaction::new_unchecked(&repr.to_block()[..]))
                        .expect("an emitted transaction must parse");
                assert_eq!(again, repr, "AL transaction round trip");
            }
        }
        if let Ok(page) = BitmapPage::new_checked(&block[..]) {
            if let Ok(repr) = BitmapPageRepr::parse(&page) {
                let mut out = vec![0u8; repr.buffer_len()];
                repr.emit(&mut BitmapPage::new_unchecked(&mut out[..]));
                let again = BitmapPageRepr::parse(&BitmapPage::new_unchecked(&out[..]))
                    .expect("an emitted bitmap page must parse");
                assert_eq!(again, repr, "bitmap page round trip");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_sb() -> SuperblockRepr {
        SuperblockRepr {
            flags: flags::CONSISTENT | flags::AL_CLEAN,
            seq: 7,
            md_uuid: 0x0123_4567_89ab_cdef,
            uuids: [0x1111, 0x2222, 0x3333, 0x4444],
            data_size: 1 << 30,
            md_size: (2 + 8 + 9) * 4096,
            sb_offset: (1 << 30) + 17 * 4096,
            al_offset: (1 << 30) + 9 * 4096,
            bm_offset: 1 << 30,
            al_transactions: 8,
            al_extents: 1237,
            al_extent_shift: 22,
            bm_block_shift: 12,
            kind: MetaKind::Internal,
            bm_pages: 9,
            name: "r0".into(),
            agreed_size: 0,
        }
    }

    #[test]
    fn superblock_layout_is_as_documented() {
        let block = sample_sb().to_block();
        assert_eq!(&block[0..8], b"TWBLMETA");
        assert_eq!(&block[8..12], &[1, 0, 0, 0]);
        assert_eq!(&block[12..16], &[0x11, 0, 0, 0]);
        assert_eq!(&block[16..24], &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&block[24..32], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(&block[32..40], &0x1111u64.to_le_bytes());
        assert_eq!(&block[64..72], &(1u64 << 30).to_le_bytes());
        assert_eq!(&block[104..108], &8u32.to_le_bytes());
        assert_eq!(&block[108..112], &1237u32.to_le_bytes());
        assert_eq!(block[112], 22);
        assert_eq!(block[113], 12);
        assert_eq!(block[114], 0);
        assert_eq!(&block[120..123], b"r0\0");
        let crc = block_crc(&block, BLOCK_LEN - 4);
        assert_eq!(&block[4092..], &crc.to_le_bytes());
        assert_eq!(
            SuperblockRepr::parse(&Superblock::new_checked(&block[..]).unwrap()).unwrap(),
            sample_sb()
        );
    }

    #[test]
    fn superblock_rejects_corruption() {
        let good = sample_sb().to_block();
        // Every single-byte corruption is caught (by the checksum if nothing else).
        for at in (0..BLOCK_LEN).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                SuperblockRepr::parse(&Superblock::new_unchecked(&bad[..])).is_err(),
                "flip at {at} accepted"
            );
        }
        // A torn write: the first sector new, the rest zero.
        let mut torn = vec![0u8; BLOCK_LEN];
        torn[..512].copy_from_slice(&good[..512]);
        assert!(SuperblockRepr::parse(&Superblock::new_unchecked(&torn[..])).is_err());
        assert!(Superblock::new_checked(&good[..100]).is_err());
    }

    #[test]
    fn superblock_rejects_bad_geometry_even_with_valid_checksum() {
        type Mutation = Box<dyn Fn(&mut SuperblockRepr)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|s| s.al_extent_shift = 12),
            Box::new(|s| s.bm_block_shift = 9),
            Box::new(|s| s.data_size = 1000),
            Box::new(|s| s.al_transactions = 1),
            Box::new(|s| s.al_extents = 0),
            Box::new(|s| s.al_extents = 7 * 916 + 1),
            Box::new(|s| s.bm_pages = 1),
            Box::new(|s| s.al_offset = s.bm_offset),
            Box::new(|s| s.sb_offset = 12),
            Box::new(|s| s.md_size = 4096),
            Box::new(|s| s.flags = 0x100),
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut s = sample_sb();
            mutate(&mut s);
            let block = s.to_block();
            assert!(
                SuperblockRepr::parse(&Superblock::new_unchecked(&block[..])).is_err(),
                "case {i} accepted"
            );
        }
    }

    fn sample_tr() -> AlTransactionRepr {
        AlTransactionRepr {
            md_uuid: 42,
            number: 9,
            kind: AlKind::Update,
            updates: vec![(3, 100), (4, AL_FREE)],
            context_start: 10,
            context: vec![1, 2, AL_FREE],
        }
    }

    #[test]
    fn al_transaction_layout_is_as_documented() {
        let block = sample_tr().to_block();
        assert_eq!(&block[0..4], b"TBAL");
        assert_eq!(&block[8..16], &42u64.to_le_bytes());
        assert_eq!(&block[16..24], &9u64.to_le_bytes());
        assert_eq!(&block[24..26], &[0, 0]);
        assert_eq!(&block[26..28], &[2, 0]);
        assert_eq!(&block[28..30], &[10, 0]);
        assert_eq!(&block[30..32], &[3, 0]);
        assert_eq!(&block[48..52], &[3, 0, 4, 0]);
        assert_eq!(&block[176..184], &[100, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&block[432..440], &[1, 0, 0, 0, 2, 0, 0, 0]);
        let tr = AlTransaction::new_checked(&block[..]).unwrap();
        assert!(tr.verify_checksum());
        assert_eq!(AlTransactionRepr::parse(&tr).unwrap(), sample_tr());
    }

    #[test]
    fn al_transaction_rejects_corruption() {
        let good = sample_tr().to_block();
        for at in (0..BLOCK_LEN).step_by(5) {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(AlTransactionRepr::parse(&AlTransaction::new_unchecked(&bad[..])).is_err());
        }
        // A torn write: the tail of the update area is missing.
        let mut torn = good.clone();
        torn[180..].fill(0);
        assert!(AlTransactionRepr::parse(&AlTransaction::new_unchecked(&torn[..])).is_err());
        // Counts out of range with a valid checksum.
        for (at, v) in [(26usize, 65u16), (30, 917), (24, 2)] {
            let mut bad = good.clone();
            write_u16(&mut bad, at, v);
            AlTransaction::new_unchecked(&mut bad[..]).fill_checksum();
            assert!(AlTransactionRepr::parse(&AlTransaction::new_unchecked(&bad[..])).is_err());
        }
        assert!(AlTransaction::new_checked(&good[..4095]).is_err());
    }

    #[test]
    fn bitmap_page_round_trips_and_rejects_corruption() {
        let mut bits = vec![0u8; BM_BYTES_PER_PAGE];
        bits[0] = 0x81;
        bits[BM_BYTES_PER_PAGE - 1] = 0x80;
        let repr = BitmapPageRepr {
            md_uuid: 5,
            index: 3,
            bits,
        };
        let mut block = vec![0u8; BLOCK_LEN];
        repr.emit(&mut BitmapPage::new_unchecked(&mut block[..]));
        assert_eq!(&block[0..4], b"TBBM");
        assert_eq!(&block[16..20], &3u32.to_le_bytes());
        assert_eq!(block[32], 0x81);
        assert_eq!(block[4095], 0x80);
        assert_eq!(
            BitmapPageRepr::parse(&BitmapPage::new_checked(&block[..]).unwrap()).unwrap(),
            repr
        );
        block[100] ^= 4;
        assert!(BitmapPageRepr::parse(&BitmapPage::new_unchecked(&block[..])).is_err());
        assert!(BitmapPageRepr::parse(&BitmapPage::new_unchecked(&[0u8; BLOCK_LEN][..])).is_err());
    }

    #[test]
    fn capacity_matches_drbd_default_ring() {
        // 32 KiB ring = 8 transactions; 7 * 916 slots survive a torn newest transaction.
        assert_eq!(al_capacity(8), 6412);
        assert!(al_capacity(8) >= 1237);
        assert_eq!(
            bm_pages_for(1 << 40),
            (1u64 << 28).div_ceil(BM_BITS_PER_PAGE)
        );
    }

    #[test]
    fn fuzz_parse_survives_samples() {
        fuzz_parse(&[]);
        fuzz_parse(&sample_sb().to_block());
        fuzz_parse(&sample_tr().to_block());
        fuzz_parse(b"TWBLMETA\x01\0\0\0");
        fuzz_parse(b"TBAL");
    }

    fn arb_sb() -> impl Strategy<Value = SuperblockRepr> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u64; 4]>(),
            0u64..(1 << 30),
            2u32..64,
            MIN_EXTENT_SHIFT..=MAX_EXTENT_SHIFT,
            any::<bool>(),
            "[a-z0-9-]{0,32}",
        )
            .prop_flat_map(|(fl, seq, md, uuids, blocks, trs, shift, internal, name)| {
                let cap = al_capacity(trs) as u32;
                (1u32..=cap).prop_map(move |al_extents| {
                    let data_size = blocks * 4096;
                    let bm_pages = bm_pages_for(data_size) as u32;
                    let b = 4096u64;
                    SuperblockRepr {
                        flags: fl & flags::ALL,
                        seq,
                        md_uuid: md,
                        uuids,
                        data_size,
                        md_size: (2 + trs as u64 + bm_pages as u64) * b,
                        sb_offset: 0,
                        al_offset: 2 * b,
                        bm_offset: (2 + trs as u64) * b,
                        al_transactions: trs,
                        al_extents,
                        al_extent_shift: shift,
                        bm_block_shift: 12,
                        kind: if internal {
                            MetaKind::Internal
                        } else {
                            MetaKind::External
                        },
                        bm_pages,
                        name: name.clone(),
                        agreed_size: data_size / 2 / b * b,
                    }
                })
            })
    }

    fn arb_tr() -> impl Strategy<Value = AlTransactionRepr> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec((any::<u16>(), any::<u32>()), 0..=AL_UPDATES_PER_TR),
            any::<u16>(),
            proptest::collection::vec(any::<u32>(), 0..=AL_CONTEXT_PER_TR),
        )
            .prop_map(
                |(md_uuid, number, reset, updates, context_start, context)| AlTransactionRepr {
                    md_uuid,
                    number,
                    kind: if reset { AlKind::Reset } else { AlKind::Update },
                    updates,
                    context_start,
                    context,
                },
            )
    }

    proptest! {
        #[test]
        fn superblock_round_trips(repr in arb_sb()) {
            let block = repr.to_block();
            let parsed = SuperblockRepr::parse(&Superblock::new_checked(&block[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
        }

        #[test]
        fn al_transaction_round_trips(repr in arb_tr()) {
            let block = repr.to_block();
            let parsed = AlTransactionRepr::parse(&AlTransaction::new_checked(&block[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
        }

        #[test]
        fn bitmap_page_round_trips(md_uuid in any::<u64>(), index in any::<u32>(),
                                   bits in proptest::collection::vec(any::<u8>(), BM_BYTES_PER_PAGE)) {
            let repr = BitmapPageRepr { md_uuid, index, bits };
            let mut block = vec![0u8; BLOCK_LEN];
            repr.emit(&mut BitmapPage::new_unchecked(&mut block[..]));
            prop_assert_eq!(BitmapPageRepr::parse(&BitmapPage::new_checked(&block[..]).unwrap()).unwrap(), repr);
        }

        #[test]
        fn fuzz_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            fuzz_parse(&bytes);
        }
    }
}
