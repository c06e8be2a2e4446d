//! The peer-to-peer replication protocol: every message two twinblade nodes exchange over their
//! TCP connection, as a checked header view ([`Packet`]) plus one owned `Repr` per message.
//!
//! This module owns the byte format only. What a message *means* for the state machine lives in
//! [`crate::repl`] (authentication, generation UUIDs) and [`crate::cluster`] (roles, connection
//! and disk states). No sockets here: [`FrameDecoder`] turns a byte stream into messages without
//! doing any I/O, so the connection task only moves bytes.
//!
//! # Framing
//!
//! Every message is a 24-byte header followed by `payload length` bytes. All integers are
//! big-endian (network order).
//!
//! ```text
//!  0..4   magic "TBRP"          4..6   protocol version     6      message type
//!  7      header flags (0)      8..12  payload length       12..20 sequence number
//! 20..24  crc32c over the header (this field zeroed) and the payload
//! 24..    payload (per message type, below)
//! ```
//!
//! The sequence number counts messages per connection and direction, starting at 0;
//! [`FrameDecoder::check_sequence`] makes a gap or a replay a hard error. The checksum catches
//! corruption that TCP's 16-bit checksum lets through: a message whose crc32c does not match is
//! never trusted ([`DecodeError::Checksum`]); the connection must be dropped.
//!
//! # Payloads
//!
//! ```text
//! Hello          min version u16, max version u16, nonce [32], name length u8, name (UTF-8)
//! AuthChallenge  algorithm u8 (1 = HMAC-SHA256), nonce [32]
//! AuthResponse   mac [32]
//! AuthOk         (empty)
//! AuthFail       (empty)
//! Parameters     size u64, protocol u8 (1 A, 2 B, 3 C), durability u8 (0 node, 1 power),
//!                role u8, disk u8, max write u32, checksum algorithm u8 (1 crc32c,
//!                2 xxh3-128, 3 blake3)
//! Uuids          current u64, bitmap u64, history1 u64, history2 u64, dirty bits u64, flags u64
//!                (bit 0 discard-my-data, bit 1 crashed-primary, bit 2 inconsistent)
//! SyncUuid       uuid u64
//! WriteData      id u64, offset u64, flags u32 (bit 0 FUA, bit 1 FLUSH), length u32, data
//! WriteAck       id u64, kind u8 (1 received, 2 completed, 3 failed)
//! Barrier        barrier u64
//! BarrierAck     barrier u64, status u8 (0 stable, 1 flush failed), 3 reserved zero bytes
//! BitmapChunk    first bit u64, bit count u32, encoding u8 (0 raw, 1 RLE), flags u8 (bit 0
//!                last), bits (raw: LSB first; RLE: LEB128 run lengths, clear run first)
//! ResyncRequest  id u64, offset u64, length u32, flags u8 (bit 0 checksum present), crc32c u32
//! ResyncData     id u64, offset u64, length u32, data
//! ResyncSkip     id u64, offset u64, length u32
//! StateChange    role u8, disk u8, conn u8
//! Ping, PingAck  cookie u64 (echoed)
//! Disconnect     reason u8, message length u16, message (UTF-8)
//! SyncStart      flags u8 (bit 0 sender is source, bit 1 full)
//! SyncDone       (empty)
//! ChecksumRequest id u64, offset u64, length u32
//! Checksums      id u64, offset u64, length u32, algorithm u8 (as in Parameters), one digest
//!                per 4 KiB block of the range (the last one over what is left when the length
//!                is not a multiple of 4 KiB): crc32c u32, or 16 bytes for xxh3-128 and blake3
//!                (BLAKE3's first 16 output bytes)
//! ResyncZero     id u64, offset u64, length u32 (the range is all zero bytes)
//! SyncPause      paused u8 (1 pause-sync, 0 resume-sync; nothing else)
//! ```
//!
//! `ChecksumRequest`/`Checksums` serve checksum-based resync and online verify; `ResyncZero` is
//! the zero marker of a resync. `ResyncSkip` also travels from source to target (with the push
//! bit in its id, see [`crate::daemon`]) to say "this range is already equal".
//!
//! A payload must be exactly as long as its fields: trailing bytes are malformed. Offsets and
//! lengths of block data are multiples of [`crate::block::SECTOR_SIZE`].
//!
//! # Files
//!
//! One file per message family, all private; everything is re-exported here.
//!
//! * `header`: [`MessageType`] and the [`Packet`] view of the common header.
//! * `handshake`: [`HelloRepr`], authentication, [`ParametersRepr`], [`UuidsRepr`].
//! * `data`: mirrored writes and barriers ([`WriteDataRepr`], [`WriteAckRepr`], ...).
//! * `resync`: bitmap exchange, resync, checksums and [`SyncStartRepr`].
//! * `control`: [`StateChangeRepr`], [`PingRepr`], [`DisconnectRepr`].
//! * `message`: the [`Message`] enum over every payload and the framed [`MessageRepr`].
//! * `decoder`: [`FrameDecoder`], the streaming decoder, and [`DecodeError`].
//!
//! The state words ([`Role`], [`DiskState`], [`ConnState`], [`ReplState`],
//! [`DisconnectReason`]) live in [`crate::cluster::state`] and are re-exported here too.

use super::{need, Error};

mod control;
mod data;
mod decoder;
mod handshake;
mod header;
mod message;
mod resync;

pub use crate::cluster::state::{ConnState, DisconnectReason, DiskState, ReplState, Role};
pub use control::*;
pub use data::*;
pub use decoder::*;
pub use handshake::*;
pub use header::*;
pub use message::*;
pub use resync::*;

/// Header magic, "TBRP".
pub const MAGIC: [u8; 4] = *b"TBRP";
/// Length of the common header.
pub const HEADER_LEN: usize = 24;
/// Bytes of a WriteData message before its data (see [`WriteDataRepr::emit_head`]).
pub const WRITE_DATA_HEAD_LEN: usize = HEADER_LEN + 24;
/// Oldest protocol version this build speaks. Version 2 added checksum-based resync and
/// verify (`ChecksumRequest`, `Checksums`, `ResyncZero`) and `SyncPause`, and changed how a
/// resync source uses `ResyncSkip`: a version-1 peer would misread the stream, so it is refused
/// at the handshake ("no common protocol version") instead. Version 3 added the flush status
/// of `BarrierAck` (a peer whose flush failed says so) and the checksum algorithm of resync and
/// verify; an older peer would report every flush as stable, so it is refused the same way.
pub const VERSION_MIN: u16 = 3;
/// Newest protocol version this build speaks.
pub const VERSION_MAX: u16 = 3;
/// Largest block-data payload of one [`WriteDataRepr`] or [`ResyncDataRepr`] (1 MiB).
pub const MAX_DATA_LEN: usize = 1 << 20;
/// Largest payload of any message: block data plus its fixed fields, with room to spare.
pub const MAX_PAYLOAD_LEN: usize = MAX_DATA_LEN + 64;
/// Length of the nonces in [`HelloRepr`] and [`AuthChallengeRepr`].
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Longest node name in [`HelloRepr`], in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest human-readable text in [`DisconnectRepr`], in bytes.
pub const MAX_REASON_LEN: usize = 256;
/// Most bits one [`BitmapChunkRepr`] may describe (what fits raw in [`MAX_DATA_LEN`]).
pub const MAX_BITMAP_CHUNK_BITS: u32 = (MAX_DATA_LEN * 8) as u32;
/// Block offsets and lengths are multiples of this.
const SECTOR: u64 = 512;

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn wr32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn wr64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Fails with `Malformed { field }` unless `ok`.
fn ensure(ok: bool, field: &'static str) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::Malformed { field })
    }
}

/// Checks that a payload is exactly `len` bytes.
fn exact(payload: &[u8], len: usize) -> Result<(), Error> {
    need(len, payload.len())?;
    ensure(payload.len() == len, "payload length")
}

/// Picks the protocol version both sides speak: the highest version in both ranges.
///
/// `None` if the ranges do not overlap or either is empty (min > max).
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    if ours.0 > ours.1 || theirs.0 > theirs.1 {
        return None;
    }
    let best = ours.1.min(theirs.1);
    (best >= ours.0.max(theirs.0)).then_some(best)
}

fn check_block_range(offset: u64, len: u64) -> Result<(), Error> {
    ensure(offset.is_multiple_of(SECTOR), "offset")?;
    ensure(len.is_multiple_of(SECTOR), "length")?;
    ensure(offset.checked_add(len).is_some(), "offset")
}

/// Parses `data` with every parser in this module; the cargo-fuzz target calls this.
///
/// Whatever the bytes, this must not panic, and whatever parses must re-emit to bytes that parse
/// to the same value. The bytes are also fed to a [`FrameDecoder`] in two uneven pieces.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(packet) = Packet::new_checked(data) {
        if let Ok(repr) = MessageRepr::parse(&packet) {
            let bytes = repr.to_bytes();
            let again = MessageRepr::parse(&Packet::new_checked(&bytes[..]).expect("emitted"))
                .expect("an emitted message must parse");
            assert_eq!(again, repr, "round trip changed the message");
        }
    }
    // Every payload parser on the raw bytes, with the first byte as the type.
    if let Some((&t, rest)) = data.split_first() {
        if let Ok(msg) = Message::parse(MessageType::from(t), rest) {
            let mut out = vec![0u8; msg.buffer_len()];
            msg.emit(&mut out);
            let again = Message::parse(msg.msg_type(), &out).expect("emitted payload must parse");
            assert_eq!(again, msg, "payload round trip changed the message");
        }
    }
    let mut decoder = FrameDecoder::with_max_payload(4096);
    let cut = data.len() / 3;
    decoder.feed(&data[..cut]);
    while let Ok(Some(_)) = decoder.next_message() {}
    decoder.feed(&data[cut..]);
    while let Ok(Some(_)) = decoder.next_message() {}
}

#[cfg(test)]
mod tests;
