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
//!                role u8, disk u8, max write u32
//! Uuids          current u64, bitmap u64, history1 u64, history2 u64, dirty bits u64, flags u64
//!                (bit 0 discard-my-data, bit 1 crashed-primary, bit 2 inconsistent)
//! SyncUuid       uuid u64
//! WriteData      id u64, offset u64, flags u32 (bit 0 FUA, bit 1 FLUSH), length u32, data
//! WriteAck       id u64, kind u8 (1 received, 2 completed, 3 failed)
//! Barrier        barrier u64
//! BarrierAck     barrier u64, writes u32
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
//! Checksums      id u64, offset u64, length u32, crc32c u32 per 4 KiB block of the range
//!                (the last one over what is left when the length is not a multiple of 4 KiB)
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

use super::{need, Error};
use std::fmt;

/// Header magic, "TBRP".
pub const MAGIC: [u8; 4] = *b"TBRP";
/// Length of the common header.
pub const HEADER_LEN: usize = 24;
/// Bytes of a WriteData message before its data (see [`WriteDataRepr::emit_head`]).
pub const WRITE_DATA_HEAD_LEN: usize = HEADER_LEN + 24;
/// Oldest protocol version this build speaks. Version 2 added checksum-based resync and
/// verify (`ChecksumRequest`, `Checksums`, `ResyncZero`) and `SyncPause`, and changed how a
/// resync source uses `ResyncSkip`: a version-1 peer would misread the stream, so it is refused
/// at the handshake ("no common protocol version") instead.
pub const VERSION_MIN: u16 = 2;
/// Newest protocol version this build speaks.
pub const VERSION_MAX: u16 = 2;
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

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:expr, $word:expr;)* } $field:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }
        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// The wire code.
            pub fn code(self) -> u8 {
                match self { $($name::$variant => $code,)* }
            }
            /// The value of a wire code; `Malformed` for an unknown code.
            pub fn from_code(code: u8) -> Result<$name, Error> {
                match code {
                    $($code => Ok($name::$variant),)*
                    _ => Err(Error::Malformed { field: $field }),
                }
            }
            /// The word `drbdadm status` would print.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word,)* }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// A node's role for the resource.
    Role {
        /// Role not known (the peer is not connected).
        Unknown = 0, "Unknown";
        /// Serves the exports and originates writes.
        Primary = 1, "Primary";
        /// Receives writes from the primary; exports nothing.
        Secondary = 2, "Secondary";
    } "role"
}

wire_enum! {
    /// The state of a node's local data, in DRBD's words.
    DiskState {
        /// No local disk attached (detached after an I/O error, or never attached).
        Diskless = 0, "Diskless";
        /// The data is not usable: a sync target mid-resync, or never synced.
        Inconsistent = 1, "Inconsistent";
        /// Consistent but known to be older than the peer's.
        Outdated = 2, "Outdated";
        /// Consistent; whether it is the newest is not known (no peer seen yet).
        Consistent = 3, "Consistent";
        /// Consistent and known to be the newest data.
        UpToDate = 4, "UpToDate";
        /// The peer's disk, while the peer is not connected.
        DUnknown = 5, "DUnknown";
    } "disk state"
}

wire_enum! {
    /// The state of the connection to the peer.
    ConnState {
        /// Not connected and not trying (operator `disconnect`, split brain, unrelated data).
        StandAlone = 0, "StandAlone";
        /// Trying to reach the peer (DRBD 8.4: WFConnection).
        Connecting = 1, "Connecting";
        /// Transport up and authenticated, exchanging parameters and UUIDs.
        Handshaking = 2, "WFReportParams";
        /// Handshake done; see the replication state.
        Connected = 3, "Connected";
    } "connection state"
}

wire_enum! {
    /// What the connection is doing with the data.
    ReplState {
        /// Not connected.
        Off = 0, "Off";
        /// Writes are mirrored; nothing to resync.
        Established = 1, "Established";
        /// Sending resync data to the peer.
        SyncSource = 2, "SyncSource";
        /// Receiving resync data from the peer.
        SyncTarget = 3, "SyncTarget";
        /// Resync as source, paused by the operator.
        PausedSyncS = 4, "PausedSyncS";
        /// Resync as target, paused by the operator.
        PausedSyncT = 5, "PausedSyncT";
    } "replication state"
}

wire_enum! {
    /// When a write counts as replicated (DRBD's protocols).
    ReplProtocol {
        /// Local disk plus the TCP send buffer.
        A = 1, "A";
        /// Local disk plus the peer's receipt ([`AckKind::Received`]).
        B = 2, "B";
        /// Local disk plus the peer's disk ([`AckKind::Completed`]).
        C = 3, "C";
    } "protocol"
}

wire_enum! {
    /// What "on the peer's disk" means for protocol C.
    Durability {
        /// In the peer's OS (page cache): survives a crash of one node, not a power cut of both.
        Node = 0, "node";
        /// On stable storage (written with FUA): survives a power cut of both nodes.
        Power = 1, "power";
    } "durability"
}

wire_enum! {
    /// The kind of a [`WriteAckRepr`].
    AckKind {
        /// The peer received the write (protocol B).
        Received = 1, "received";
        /// The peer completed the write with the agreed durability (protocol C).
        Completed = 2, "completed";
        /// The peer's disk failed the write; the block is out of sync.
        Failed = 3, "failed";
    } "ack kind"
}

wire_enum! {
    /// Why a node closes the connection ([`DisconnectRepr`]).
    DisconnectReason {
        /// Orderly shutdown or operator `disconnect`.
        Shutdown = 0, "shutdown";
        /// No common protocol version.
        VersionMismatch = 1, "version-mismatch";
        /// Authentication failed.
        AuthFailed = 2, "auth-failed";
        /// The peer's data is unrelated to ours (no common generation).
        UnrelatedData = 3, "unrelated-data";
        /// Split brain detected; both stay StandAlone until the operator resolves it.
        SplitBrain = 4, "split-brain";
        /// The usable sizes differ.
        SizeMismatch = 5, "size-mismatch";
        /// The peer sent something that violates the protocol.
        ProtocolError = 6, "protocol-error";
        /// The peer stopped completing writes (ko-count).
        KoCount = 7, "ko-count";
        /// The peer stopped answering pings.
        Timeout = 8, "timeout";
        /// Both nodes are primary.
        BothPrimary = 9, "both-primary";
        /// The peer refused the connection because a node with this name is already connected.
        Duplicate = 10, "duplicate";
    } "disconnect reason"
}

/// Message type codes (header byte 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 1: [`HelloRepr`].
    Hello,
    /// 2: [`AuthChallengeRepr`].
    AuthChallenge,
    /// 3: [`AuthResponseRepr`].
    AuthResponse,
    /// 4: authentication accepted.
    AuthOk,
    /// 5: authentication refused.
    AuthFail,
    /// 6: [`ParametersRepr`].
    Parameters,
    /// 7: [`UuidsRepr`].
    Uuids,
    /// 8: the sync UUID a resync source chose.
    SyncUuid,
    /// 9: [`WriteDataRepr`].
    WriteData,
    /// 10: [`WriteAckRepr`].
    WriteAck,
    /// 11: [`BarrierRepr`].
    Barrier,
    /// 12: [`BarrierAckRepr`].
    BarrierAck,
    /// 13: [`BitmapChunkRepr`].
    BitmapChunk,
    /// 14: [`ResyncRequestRepr`].
    ResyncRequest,
    /// 15: [`ResyncDataRepr`].
    ResyncData,
    /// 16: [`ResyncSkipRepr`].
    ResyncSkip,
    /// 17: [`StateChangeRepr`].
    StateChange,
    /// 18: keepalive.
    Ping,
    /// 19: keepalive answer.
    PingAck,
    /// 20: [`DisconnectRepr`].
    Disconnect,
    /// 21: [`SyncStartRepr`].
    SyncStart,
    /// 22: the resync source copied every out-of-sync block.
    SyncDone,
    /// 23: [`ChecksumRequestRepr`].
    ChecksumRequest,
    /// 24: [`ChecksumsRepr`].
    Checksums,
    /// 25: [`ResyncZeroRepr`].
    ResyncZero,
    /// 30: the operator paused (1) or resumed (0) the resync on the sender's side.
    SyncPause,
    /// Any other code: refused by [`MessageRepr::parse`].
    Unknown(u8),
}

impl From<u8> for MessageType {
    fn from(v: u8) -> Self {
        use MessageType::*;
        match v {
            1 => Hello,
            2 => AuthChallenge,
            3 => AuthResponse,
            4 => AuthOk,
            5 => AuthFail,
            6 => Parameters,
            7 => Uuids,
            8 => SyncUuid,
            9 => WriteData,
            10 => WriteAck,
            11 => Barrier,
            12 => BarrierAck,
            13 => BitmapChunk,
            14 => ResyncRequest,
            15 => ResyncData,
            16 => ResyncSkip,
            17 => StateChange,
            18 => Ping,
            19 => PingAck,
            20 => Disconnect,
            21 => SyncStart,
            22 => SyncDone,
            23 => ChecksumRequest,
            24 => Checksums,
            25 => ResyncZero,
            30 => SyncPause,
            other => Unknown(other),
        }
    }
}

impl From<MessageType> for u8 {
    fn from(t: MessageType) -> u8 {
        use MessageType::*;
        match t {
            Hello => 1,
            AuthChallenge => 2,
            AuthResponse => 3,
            AuthOk => 4,
            AuthFail => 5,
            Parameters => 6,
            Uuids => 7,
            SyncUuid => 8,
            WriteData => 9,
            WriteAck => 10,
            Barrier => 11,
            BarrierAck => 12,
            BitmapChunk => 13,
            ResyncRequest => 14,
            ResyncData => 15,
            ResyncSkip => 16,
            StateChange => 17,
            Ping => 18,
            PingAck => 19,
            Disconnect => 20,
            SyncStart => 21,
            SyncDone => 22,
            ChecksumRequest => 23,
            Checksums => 24,
            ResyncZero => 25,
            SyncPause => 30,
            Unknown(v) => v,
        }
    }
}

/// Byte ranges of the common header.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const TYPE: usize = 6;
    pub const FLAGS: usize = 7;
    pub const LENGTH: usize = 8;
    pub const SEQ: usize = 12;
    pub const CRC: Range<usize> = 20..24;
    pub const PAYLOAD: usize = 24;
}

/// A view of one framed message: header and payload.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that it holds the header and the whole payload the header
    /// announces. Extra bytes after the payload are allowed (the next message of a stream).
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the header and the announced payload fit in the buffer.
    pub fn check_len(&self) -> Result<(), Error> {
        let have = self.buffer.as_ref().len();
        need(HEADER_LEN, have)?;
        need(self.total_len(), have)
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.buffer.as_ref()[field::MAGIC]
            .try_into()
            .expect("4 bytes")
    }
    /// Protocol version the sender speaks on this connection.
    pub fn version(&self) -> u16 {
        rd16(self.buffer.as_ref(), field::VERSION)
    }
    /// Message type.
    pub fn msg_type(&self) -> MessageType {
        MessageType::from(self.buffer.as_ref()[field::TYPE])
    }
    /// Header flags (none defined: must be 0).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    /// Payload length in bytes.
    pub fn payload_len(&self) -> u32 {
        rd32(self.buffer.as_ref(), field::LENGTH)
    }
    /// Per-connection sequence number.
    pub fn seq(&self) -> u64 {
        rd64(self.buffer.as_ref(), field::SEQ)
    }
    /// The checksum field.
    pub fn checksum(&self) -> u32 {
        rd32(self.buffer.as_ref(), field::CRC.start)
    }
    /// Header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len() as usize
    }
    /// The payload (panics unless [`Packet::check_len`] passed).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..self.total_len()]
    }
    /// The crc32c of header (checksum field as zero) and payload.
    pub fn compute_checksum(&self) -> u32 {
        let b = &self.buffer.as_ref()[..self.total_len()];
        let crc = crc32c::crc32c(&b[..field::CRC.start]);
        let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
        crc32c::crc32c_append(crc, &b[field::PAYLOAD..])
    }
    /// Whether the checksum field matches the contents.
    pub fn verify_checksum(&self) -> bool {
        self.compute_checksum() == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes magic, version, type, flags, payload length and sequence number.
    pub fn set_header(&mut self, version: u16, msg_type: MessageType, payload_len: u32, seq: u64) {
        let b = self.buffer.as_mut();
        b[field::MAGIC].copy_from_slice(&MAGIC);
        wr16(b, field::VERSION, version);
        b[field::TYPE] = msg_type.into();
        b[field::FLAGS] = 0;
        wr32(b, field::LENGTH, payload_len);
        wr64(b, field::SEQ, seq);
    }
    /// Mutable payload bytes (as long as the header's payload length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        &mut self.buffer.as_mut()[field::PAYLOAD..end]
    }
    /// Computes and stores the checksum; call after header and payload are final.
    pub fn fill_checksum(&mut self) {
        let crc = self.compute_checksum();
        wr32(self.buffer.as_mut(), field::CRC.start, crc);
    }
}

/// Hello: the first message on a connection, sent by both sides at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRepr {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// Random connection nonce (also breaks ties, e.g. who holds "resolve conflicts").
    pub nonce: [u8; NONCE_LEN],
    /// The sender's node name (UTF-8, at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
}

impl HelloRepr {
    /// Parses a Hello payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(37, p.len())?;
        let name_len = p[36] as usize;
        ensure(name_len <= MAX_NAME_LEN, "name length")?;
        exact(p, 37 + name_len)?;
        let name = std::str::from_utf8(&p[37..]).map_err(|_| Error::Malformed { field: "name" })?;
        let min_version = rd16(p, 0);
        let max_version = rd16(p, 2);
        ensure(min_version <= max_version, "version range")?;
        Ok(HelloRepr {
            min_version,
            max_version,
            nonce: p[4..36].try_into().expect("32 bytes"),
            name: name.to_string(),
        })
    }
    /// Payload length. The name is cut to [`MAX_NAME_LEN`] bytes when emitted.
    pub fn buffer_len(&self) -> usize {
        37 + self.name.len().min(MAX_NAME_LEN)
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_LEN)];
        wr16(p, 0, self.min_version);
        wr16(p, 2, self.max_version);
        p[4..36].copy_from_slice(&self.nonce);
        p[36] = name.len() as u8;
        p[37..37 + name.len()].copy_from_slice(name);
    }
}

/// The only authentication algorithm: HMAC-SHA256 with the shared secret.
pub const AUTH_HMAC_SHA256: u8 = 1;

/// AuthChallenge: a fresh nonce the peer must include in its [`AuthResponseRepr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthChallengeRepr {
    /// Algorithm ([`AUTH_HMAC_SHA256`]).
    pub algorithm: u8,
    /// Fresh random challenge.
    pub nonce: [u8; NONCE_LEN],
}

impl AuthChallengeRepr {
    /// Parses the payload; refuses unknown algorithms.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 33)?;
        ensure(p[0] == AUTH_HMAC_SHA256, "auth algorithm")?;
        Ok(AuthChallengeRepr {
            algorithm: p[0],
            nonce: p[1..33].try_into().expect("32 bytes"),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        33
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        p[0] = self.algorithm;
        p[1..33].copy_from_slice(&self.nonce);
    }
}

/// AuthResponse: the HMAC proving the sender knows the shared secret (see
/// [`crate::repl::auth`] for what it covers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthResponseRepr {
    /// HMAC-SHA256 tag.
    pub mac: [u8; MAC_LEN],
}

impl AuthResponseRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, MAC_LEN)?;
        Ok(AuthResponseRepr {
            mac: p.try_into().expect("32 bytes"),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        MAC_LEN
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        p[..MAC_LEN].copy_from_slice(&self.mac);
    }
}

/// Parameters: what each side offers for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParametersRepr {
    /// Usable size of the replicated device in bytes.
    pub size: u64,
    /// Replication protocol.
    pub protocol: ReplProtocol,
    /// What "completed" means for protocol C.
    pub durability: Durability,
    /// The sender's role.
    pub role: Role,
    /// The sender's disk state.
    pub disk: DiskState,
    /// Largest WriteData payload the sender accepts.
    pub max_write: u32,
}

impl ParametersRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 16)?;
        Ok(ParametersRepr {
            size: rd64(p, 0),
            protocol: ReplProtocol::from_code(p[8])?,
            durability: Durability::from_code(p[9])?,
            role: Role::from_code(p[10])?,
            disk: DiskState::from_code(p[11])?,
            max_write: rd32(p, 12),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        16
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.size);
        p[8] = self.protocol.code();
        p[9] = self.durability.code();
        p[10] = self.role.code();
        p[11] = self.disk.code();
        wr32(p, 12, self.max_write);
    }
}

/// Uuids flag: the sender was told to discard its data (`connect --discard-my-data`).
pub const UUID_FLAG_DISCARD_MY_DATA: u64 = 1;
/// Uuids flag: the sender crashed while primary.
pub const UUID_FLAG_CRASHED_PRIMARY: u64 = 2;
/// Uuids flag: the sender's disk is Inconsistent.
pub const UUID_FLAG_INCONSISTENT: u64 = 4;
const UUID_FLAGS_ALL: u64 =
    UUID_FLAG_DISCARD_MY_DATA | UUID_FLAG_CRASHED_PRIMARY | UUID_FLAG_INCONSISTENT;

/// Uuids: the sender's generation UUIDs, the input of [`crate::repl::uuid::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidsRepr {
    /// Current UUID.
    pub current: u64,
    /// Bitmap UUID (0 if none).
    pub bitmap: u64,
    /// History UUIDs, newest first.
    pub history: [u64; 2],
    /// Number of set (out-of-sync) bits in the sender's bitmap.
    pub dirty_bits: u64,
    /// `UUID_FLAG_*` bits; unknown bits are malformed.
    pub flags: u64,
}

impl UuidsRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 48)?;
        let flags = rd64(p, 40);
        ensure(flags & !UUID_FLAGS_ALL == 0, "uuid flags")?;
        Ok(UuidsRepr {
            current: rd64(p, 0),
            bitmap: rd64(p, 8),
            history: [rd64(p, 16), rd64(p, 24)],
            dirty_bits: rd64(p, 32),
            flags,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        48
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.current);
        wr64(p, 8, self.bitmap);
        wr64(p, 16, self.history[0]);
        wr64(p, 24, self.history[1]);
        wr64(p, 32, self.dirty_bits);
        wr64(p, 40, self.flags);
    }
}

/// WriteData flag: the write must be on stable storage before it is acknowledged.
pub const WRITE_FUA: u32 = 1;
/// WriteData flag: flush the peer's cache before this write (and before acking it).
pub const WRITE_FLUSH: u32 = 2;
const WRITE_FLAGS_ALL: u32 = WRITE_FUA | WRITE_FLUSH;

fn check_block_range(offset: u64, len: u64) -> Result<(), Error> {
    ensure(offset.is_multiple_of(SECTOR), "offset")?;
    ensure(len.is_multiple_of(SECTOR), "length")?;
    ensure(offset.checked_add(len).is_some(), "offset")
}

/// WriteData: one mirrored write from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteDataRepr {
    /// Request id, echoed in the [`WriteAckRepr`].
    pub id: u64,
    /// Byte offset on the device (a multiple of 512).
    pub offset: u64,
    /// `WRITE_FUA` / `WRITE_FLUSH`.
    pub flags: u32,
    /// The data (a multiple of 512 bytes, at most [`MAX_DATA_LEN`]; empty for a pure flush).
    pub data: Vec<u8>,
}

impl WriteDataRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(24, p.len())?;
        let len = rd32(p, 20) as usize;
        ensure(len <= MAX_DATA_LEN, "length")?;
        exact(p, 24 + len)?;
        let flags = rd32(p, 16);
        ensure(flags & !WRITE_FLAGS_ALL == 0, "write flags")?;
        let offset = rd64(p, 8);
        check_block_range(offset, len as u64)?;
        Ok(WriteDataRepr {
            id: rd64(p, 0),
            offset,
            flags,
            data: p[24..].to_vec(),
        })
    }
    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        24 + self.data.len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.flags);
        wr32(p, 20, self.data.len() as u32);
        p[24..24 + self.data.len()].copy_from_slice(&self.data);
    }
    /// A whole WriteData message as two pieces, head and `data`, so the data can be sent from
    /// where it lies: the head is the message header and the fixed fields, with the checksum
    /// over both pieces. `head ++ data` is what [`MessageRepr::emit`] makes of the owned form.
    pub fn emit_head(
        version: u16,
        seq: u64,
        id: u64,
        offset: u64,
        flags: u32,
        data: &[u8],
    ) -> [u8; WRITE_DATA_HEAD_LEN] {
        let mut head = [0u8; WRITE_DATA_HEAD_LEN];
        Packet::new_unchecked(&mut head[..]).set_header(
            version,
            MessageType::WriteData,
            (24 + data.len()) as u32,
            seq,
        );
        let p = &mut head[HEADER_LEN..];
        wr64(p, 0, id);
        wr64(p, 8, offset);
        wr32(p, 16, flags);
        wr32(p, 20, data.len() as u32);
        let crc = crc32c::crc32c(&head[..field::CRC.start]);
        let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
        let crc = crc32c::crc32c_append(crc, &head[field::PAYLOAD..]);
        let crc = crc32c::crc32c_append(crc, data);
        wr32(&mut head, field::CRC.start, crc);
        head
    }
    /// Whether the FUA flag is set.
    pub fn fua(&self) -> bool {
        self.flags & WRITE_FUA != 0
    }
    /// Whether the FLUSH flag is set.
    pub fn flush(&self) -> bool {
        self.flags & WRITE_FLUSH != 0
    }
}

/// WriteAck: the peer's answer to one [`WriteDataRepr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAckRepr {
    /// The write's request id.
    pub id: u64,
    /// Received (protocol B), completed (protocol C) or failed.
    pub kind: AckKind,
}

impl WriteAckRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 9)?;
        Ok(WriteAckRepr {
            id: rd64(p, 0),
            kind: AckKind::from_code(p[8])?,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        9
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        p[8] = self.kind.code();
    }
}

/// Barrier: closes a write epoch; the peer answers once every write of the epoch is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierRepr {
    /// Barrier (epoch) number.
    pub barrier: u64,
}

impl BarrierRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 8)?;
        Ok(BarrierRepr {
            barrier: rd64(p, 0),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        8
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.barrier);
    }
}

/// BarrierAck: every write of the epoch is on the peer's stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierAckRepr {
    /// Barrier (epoch) number.
    pub barrier: u64,
    /// Writes the epoch held (a cross-check).
    pub writes: u32,
}

impl BarrierAckRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 12)?;
        Ok(BarrierAckRepr {
            barrier: rd64(p, 0),
            writes: rd32(p, 8),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        12
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.barrier);
        wr32(p, 8, self.writes);
    }
}

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

/// Block size of checksum-based resync and verify: one crc32c per this many bytes.
pub const CHECKSUM_BLOCK: u32 = 4096;

/// ChecksumRequest: "send me the crc32c of each 4 KiB block of this range of your disk".
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

/// The crc32c of each [`CHECKSUM_BLOCK`] of `data` (the last one over what is left).
pub fn block_checksums(data: &[u8]) -> Vec<u32> {
    data.chunks(CHECKSUM_BLOCK as usize)
        .map(crc32c::crc32c)
        .collect()
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
    /// One crc32c per block: exactly [`checksum_count`]`(len)` values.
    pub crcs: Vec<u32>,
}

impl ChecksumsRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(20, p.len())?;
        let (id, offset, len) = (rd64(p, 0), rd64(p, 8), rd32(p, 16));
        ensure(len as usize <= MAX_DATA_LEN, "length")?;
        check_block_range(offset, u64::from(len))?;
        let count = checksum_count(len);
        exact(p, 20 + 4 * count)?;
        let crcs = (0..count).map(|i| rd32(p, 20 + 4 * i)).collect();
        Ok(ChecksumsRepr {
            id,
            offset,
            len,
            crcs,
        })
    }
    /// Payload length. The `Repr` must hold [`checksum_count`]`(len)` checksums.
    pub fn buffer_len(&self) -> usize {
        20 + 4 * self.crcs.len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.len);
        for (i, c) in self.crcs.iter().enumerate() {
            wr32(p, 20 + 4 * i, *c);
        }
    }
}

/// ResyncZero: the source's data for this range is all zero bytes (the zero marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncZeroRepr {
    /// Request id (with the push bit), answered by a [`WriteAckRepr`].
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

/// StateChange: the sender's role, disk or connection state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChangeRepr {
    /// The sender's role.
    pub role: Role,
    /// The sender's disk state.
    pub disk: DiskState,
    /// The sender's connection state.
    pub conn: ConnState,
}

impl StateChangeRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 3)?;
        Ok(StateChangeRepr {
            role: Role::from_code(p[0])?,
            disk: DiskState::from_code(p[1])?,
            conn: ConnState::from_code(p[2])?,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        3
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        p[0] = self.role.code();
        p[1] = self.disk.code();
        p[2] = self.conn.code();
    }
}

/// Ping and PingAck: a cookie the answer echoes (a send timestamp gives the round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingRepr {
    /// Opaque cookie.
    pub cookie: u64,
}

impl PingRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 8)?;
        Ok(PingRepr { cookie: rd64(p, 0) })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        8
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.cookie);
    }
}

/// Disconnect: the sender is about to close the connection, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectRepr {
    /// Machine-readable reason.
    pub reason: DisconnectReason,
    /// Human-readable detail (UTF-8, at most [`MAX_REASON_LEN`] bytes; cut when emitted).
    pub message: String,
}

impl DisconnectRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(3, p.len())?;
        let reason = DisconnectReason::from_code(p[0])?;
        let len = rd16(p, 1) as usize;
        ensure(len <= MAX_REASON_LEN, "message length")?;
        exact(p, 3 + len)?;
        let message =
            std::str::from_utf8(&p[3..]).map_err(|_| Error::Malformed { field: "message" })?;
        Ok(DisconnectRepr {
            reason,
            message: message.to_string(),
        })
    }
    fn message_bytes(&self) -> &[u8] {
        let mut end = self.message.len().min(MAX_REASON_LEN);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        &self.message.as_bytes()[..end]
    }
    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        3 + self.message_bytes().len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        let m = self.message_bytes();
        p[0] = self.reason.code();
        wr16(p, 1, m.len() as u16);
        p[3..3 + m.len()].copy_from_slice(m);
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

/// One message's meaning, without the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`HelloRepr`].
    Hello(HelloRepr),
    /// See [`AuthChallengeRepr`].
    AuthChallenge(AuthChallengeRepr),
    /// See [`AuthResponseRepr`].
    AuthResponse(AuthResponseRepr),
    /// The peer's response verified.
    AuthOk,
    /// The peer's response did not verify; the connection closes.
    AuthFail,
    /// See [`ParametersRepr`].
    Parameters(ParametersRepr),
    /// See [`UuidsRepr`].
    Uuids(UuidsRepr),
    /// The resync source's new bitmap UUID; the target sets current := this, bitmap := 0.
    SyncUuid(u64),
    /// See [`WriteDataRepr`].
    WriteData(WriteDataRepr),
    /// See [`WriteAckRepr`].
    WriteAck(WriteAckRepr),
    /// See [`BarrierRepr`].
    Barrier(BarrierRepr),
    /// See [`BarrierAckRepr`].
    BarrierAck(BarrierAckRepr),
    /// See [`BitmapChunkRepr`].
    BitmapChunk(BitmapChunkRepr),
    /// See [`ResyncRequestRepr`].
    ResyncRequest(ResyncRequestRepr),
    /// See [`ResyncDataRepr`].
    ResyncData(ResyncDataRepr),
    /// See [`ResyncSkipRepr`].
    ResyncSkip(ResyncSkipRepr),
    /// See [`StateChangeRepr`].
    StateChange(StateChangeRepr),
    /// Keepalive.
    Ping(PingRepr),
    /// Keepalive answer.
    PingAck(PingRepr),
    /// See [`DisconnectRepr`].
    Disconnect(DisconnectRepr),
    /// See [`SyncStartRepr`].
    SyncStart(SyncStartRepr),
    /// The resync source has copied every block; the target may finish its side.
    SyncDone,
    /// See [`ChecksumRequestRepr`].
    ChecksumRequest(ChecksumRequestRepr),
    /// See [`ChecksumsRepr`].
    Checksums(ChecksumsRepr),
    /// See [`ResyncZeroRepr`].
    ResyncZero(ResyncZeroRepr),
    /// `pause-sync` (true) or `resume-sync` (false) on the sender's side: a resync is paused
    /// on both nodes when either says so.
    SyncPause(bool),
}

impl Message {
    /// The header type code of this message.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::AuthChallenge(_) => MessageType::AuthChallenge,
            Message::AuthResponse(_) => MessageType::AuthResponse,
            Message::AuthOk => MessageType::AuthOk,
            Message::AuthFail => MessageType::AuthFail,
            Message::Parameters(_) => MessageType::Parameters,
            Message::Uuids(_) => MessageType::Uuids,
            Message::SyncUuid(_) => MessageType::SyncUuid,
            Message::WriteData(_) => MessageType::WriteData,
            Message::WriteAck(_) => MessageType::WriteAck,
            Message::Barrier(_) => MessageType::Barrier,
            Message::BarrierAck(_) => MessageType::BarrierAck,
            Message::BitmapChunk(_) => MessageType::BitmapChunk,
            Message::ResyncRequest(_) => MessageType::ResyncRequest,
            Message::ResyncData(_) => MessageType::ResyncData,
            Message::ResyncSkip(_) => MessageType::ResyncSkip,
            Message::StateChange(_) => MessageType::StateChange,
            Message::Ping(_) => MessageType::Ping,
            Message::PingAck(_) => MessageType::PingAck,
            Message::Disconnect(_) => MessageType::Disconnect,
            Message::SyncStart(_) => MessageType::SyncStart,
            Message::SyncDone => MessageType::SyncDone,
            Message::ChecksumRequest(_) => MessageType::ChecksumRequest,
            Message::Checksums(_) => MessageType::Checksums,
            Message::ResyncZero(_) => MessageType::ResyncZero,
            Message::SyncPause(_) => MessageType::SyncPause,
        }
    }

    /// Parses a payload of the given type.
    pub fn parse(msg_type: MessageType, p: &[u8]) -> Result<Message, Error> {
        use MessageType as T;
        Ok(match msg_type {
            T::Hello => Message::Hello(HelloRepr::parse(p)?),
            T::AuthChallenge => Message::AuthChallenge(AuthChallengeRepr::parse(p)?),
            T::AuthResponse => Message::AuthResponse(AuthResponseRepr::parse(p)?),
            T::AuthOk => {
                exact(p, 0)?;
                Message::AuthOk
            }
            T::AuthFail => {
                exact(p, 0)?;
                Message::AuthFail
            }
            T::Parameters => Message::Parameters(ParametersRepr::parse(p)?),
            T::Uuids => Message::Uuids(UuidsRepr::parse(p)?),
            T::SyncUuid => {
                exact(p, 8)?;
                Message::SyncUuid(rd64(p, 0))
            }
            T::WriteData => Message::WriteData(WriteDataRepr::parse(p)?),
            T::WriteAck => Message::WriteAck(WriteAckRepr::parse(p)?),
            T::Barrier => Message::Barrier(BarrierRepr::parse(p)?),
            T::BarrierAck => Message::BarrierAck(BarrierAckRepr::parse(p)?),
            T::BitmapChunk => Message::BitmapChunk(BitmapChunkRepr::parse(p)?),
            T::ResyncRequest => Message::ResyncRequest(ResyncRequestRepr::parse(p)?),
            T::ResyncData => Message::ResyncData(ResyncDataRepr::parse(p)?),
            T::ResyncSkip => Message::ResyncSkip(ResyncSkipRepr::parse(p)?),
            T::StateChange => Message::StateChange(StateChangeRepr::parse(p)?),
            T::Ping => Message::Ping(PingRepr::parse(p)?),
            T::PingAck => Message::PingAck(PingRepr::parse(p)?),
            T::Disconnect => Message::Disconnect(DisconnectRepr::parse(p)?),
            T::SyncStart => Message::SyncStart(SyncStartRepr::parse(p)?),
            T::SyncDone => {
                exact(p, 0)?;
                Message::SyncDone
            }
            T::ChecksumRequest => Message::ChecksumRequest(ChecksumRequestRepr::parse(p)?),
            T::Checksums => Message::Checksums(ChecksumsRepr::parse(p)?),
            T::ResyncZero => Message::ResyncZero(ResyncZeroRepr::parse(p)?),
            T::SyncPause => {
                exact(p, 1)?;
                match p[0] {
                    0 => Message::SyncPause(false),
                    1 => Message::SyncPause(true),
                    _ => {
                        return Err(Error::Malformed {
                            field: "sync pause",
                        })
                    }
                }
            }
            T::Unknown(_) => {
                return Err(Error::Malformed {
                    field: "message type",
                })
            }
        })
    }

    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        match self {
            Message::Hello(m) => m.buffer_len(),
            Message::AuthChallenge(m) => m.buffer_len(),
            Message::AuthResponse(m) => m.buffer_len(),
            Message::AuthOk | Message::AuthFail => 0,
            Message::Parameters(m) => m.buffer_len(),
            Message::Uuids(m) => m.buffer_len(),
            Message::SyncUuid(_) => 8,
            Message::WriteData(m) => m.buffer_len(),
            Message::WriteAck(m) => m.buffer_len(),
            Message::Barrier(m) => m.buffer_len(),
            Message::BarrierAck(m) => m.buffer_len(),
            Message::BitmapChunk(m) => m.buffer_len(),
            Message::ResyncRequest(m) => m.buffer_len(),
            Message::ResyncData(m) => m.buffer_len(),
            Message::ResyncSkip(m) => m.buffer_len(),
            Message::StateChange(m) => m.buffer_len(),
            Message::Ping(m) | Message::PingAck(m) => m.buffer_len(),
            Message::Disconnect(m) => m.buffer_len(),
            Message::SyncStart(m) => m.buffer_len(),
            Message::SyncDone => 0,
            Message::ChecksumRequest(m) => m.buffer_len(),
            Message::Checksums(m) => m.buffer_len(),
            Message::ResyncZero(m) => m.buffer_len(),
            Message::SyncPause(_) => 1,
        }
    }

    /// Writes the payload into the first [`Message::buffer_len`] bytes of `p`.
    pub fn emit(&self, p: &mut [u8]) {
        match self {
            Message::Hello(m) => m.emit(p),
            Message::AuthChallenge(m) => m.emit(p),
            Message::AuthResponse(m) => m.emit(p),
            Message::AuthOk | Message::AuthFail => {}
            Message::Parameters(m) => m.emit(p),
            Message::Uuids(m) => m.emit(p),
            Message::SyncUuid(u) => wr64(p, 0, *u),
            Message::WriteData(m) => m.emit(p),
            Message::WriteAck(m) => m.emit(p),
            Message::Barrier(m) => m.emit(p),
            Message::BarrierAck(m) => m.emit(p),
            Message::BitmapChunk(m) => m.emit(p),
            Message::ResyncRequest(m) => m.emit(p),
            Message::ResyncData(m) => m.emit(p),
            Message::ResyncSkip(m) => m.emit(p),
            Message::StateChange(m) => m.emit(p),
            Message::Ping(m) | Message::PingAck(m) => m.emit(p),
            Message::Disconnect(m) => m.emit(p),
            Message::SyncStart(m) => m.emit(p),
            Message::SyncDone => {}
            Message::ChecksumRequest(m) => m.emit(p),
            Message::Checksums(m) => m.emit(p),
            Message::ResyncZero(m) => m.emit(p),
            Message::SyncPause(paused) => p[0] = u8::from(*paused),
        }
    }
}

/// A whole framed message: header fields and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRepr {
    /// Protocol version in the header (the negotiated one; before negotiation, the sender's
    /// newest).
    pub version: u16,
    /// Per-connection, per-direction sequence number.
    pub seq: u64,
    /// The message.
    pub message: Message,
}

impl MessageRepr {
    /// Parses a checked packet: magic, reserved flags and checksum are verified first, so a
    /// corrupt message never reaches the payload parsers.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<MessageRepr, Error> {
        packet.check_len()?;
        ensure(packet.verify_checksum(), "checksum")?;
        Self::parse_verified(packet)
    }

    /// [`parse`](Self::parse) for a packet whose length and checksum were already verified
    /// (the stream decoder does that to name a corrupt message precisely).
    fn parse_verified<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<MessageRepr, Error> {
        ensure(packet.magic() == MAGIC, "magic")?;
        ensure(packet.flags() == 0, "header flags")?;
        Ok(MessageRepr {
            version: packet.version(),
            seq: packet.seq(),
            message: Message::parse(packet.msg_type(), packet.payload())?,
        })
    }

    /// Header plus payload length.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.message.buffer_len()
    }

    /// Writes header, payload and checksum into the first [`MessageRepr::buffer_len`] bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let len = self.message.buffer_len();
        packet.set_header(self.version, self.message.msg_type(), len as u32, self.seq);
        self.message.emit(packet.payload_mut());
        packet.fill_checksum();
    }

    /// The message as a new byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut out[..]));
        out
    }
}

/// Why a byte stream could not be decoded. Every variant means the stream can no longer be
/// trusted: the caller closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream does not start with the protocol magic: not a twinblade peer, or desynced.
    #[error("bad magic {0:02x?}: not a twinblade replication stream")]
    BadMagic([u8; 4]),
    /// The header announces a payload larger than the decoder accepts.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Announced payload length.
        len: u32,
        /// The decoder's limit.
        max: usize,
    },
    /// The crc32c does not match: the message was corrupted in transit.
    #[error("checksum mismatch: header says {expected:#010x}, contents give {actual:#010x}")]
    Checksum {
        /// The checksum field.
        expected: u32,
        /// The checksum of the received bytes.
        actual: u32,
    },
    /// The sequence number is not the one expected (a lost, replayed or reordered message).
    #[error("sequence number {got}, expected {expected}")]
    Sequence {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
    /// The checksum matched but a field is not valid.
    #[error("malformed message: {0}")]
    Malformed(#[from] Error),
    /// An earlier error already made the stream untrustworthy.
    #[error("stream already failed")]
    Failed,
}

/// Turns a byte stream into [`MessageRepr`]s. Pure: the caller reads from the socket and
/// [`feed`](FrameDecoder::feed)s the bytes, then calls [`next_message`](FrameDecoder::next_message)
/// until it returns `Ok(None)` ("need more bytes").
///
/// A bad magic or an oversized length is reported as soon as the header arrives, so a hostile
/// peer cannot make the decoder buffer more than `max_payload + HEADER_LEN` bytes of one message.
/// After any error the decoder stays failed.
#[derive(Debug)]
pub struct FrameDecoder {
    /// `buf[start..end]` is received and not yet decoded; `buf[end..]` is room to receive into.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: usize,
    next_seq: Option<u64>,
    failed: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to [`MAX_PAYLOAD_LEN`].
    pub fn new() -> FrameDecoder {
        Self::with_max_payload(MAX_PAYLOAD_LEN)
    }

    /// A decoder with another payload limit.
    pub fn with_max_payload(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_payload,
            next_seq: None,
            failed: false,
        }
    }

    /// Requires sequence numbers `first, first + 1, ...`; anything else is
    /// [`DecodeError::Sequence`].
    pub fn check_sequence(mut self, first: u64) -> FrameDecoder {
        self.next_seq = Some(first);
        self
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Room for at least `min` more bytes, to receive into directly (which saves the copy
    /// [`feed`](Self::feed) makes); then [`commit`](Self::commit) says how many arrived.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.buf.len() - self.end < min {
            // Drop what was decoded first, so a stream that never ends on a message boundary
            // does not grow the buffer without bound (what is left is less than one message).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < min {
                self.buf.resize(self.end + min, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were received into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether an error has made the stream unusable.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or the error that ends
    /// the stream.
    pub fn next_message(&mut self) -> Result<Option<MessageRepr>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode_one(&mut self) -> Result<Option<MessageRepr>, DecodeError> {
        let avail = &self.buf[self.start..self.end];
        // Check the magic on as many bytes as we have: garbage is refused at once.
        let m = avail.len().min(4);
        if avail[..m] != MAGIC[..m] {
            let mut got = [0u8; 4];
            got[..m].copy_from_slice(&avail[..m]);
            return Err(DecodeError::BadMagic(got));
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let packet = Packet::new_unchecked(avail);
        let len = packet.payload_len();
        if len as usize > self.max_payload {
            return Err(DecodeError::PayloadTooLarge {
                len,
                max: self.max_payload,
            });
        }
        if avail.len() < packet.total_len() {
            return Ok(None);
        }
        let (expected, actual) = (packet.checksum(), packet.compute_checksum());
        if expected != actual {
            return Err(DecodeError::Checksum { expected, actual });
        }
        if let Some(want) = self.next_seq {
            if packet.seq() != want {
                return Err(DecodeError::Sequence {
                    expected: want,
                    got: packet.seq(),
                });
            }
        }
        packet.check_len()?;
        let repr = MessageRepr::parse_verified(&packet)?;
        self.start += packet.total_len();
        if let Some(seq) = self.next_seq.as_mut() {
            *seq = seq.wrapping_add(1);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(repr))
    }
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PUSH: u64 = 1 << 63;

    /// A Ping with cookie 0x0102030405060708, sequence 5, version 1, as on the wire.
    const PING: [u8; 32] = [
        b'T', b'B', b'R', b'P', // magic
        0x00, 0x01, // version 1
        18,   // Ping
        0x00, // flags
        0x00, 0x00, 0x00, 0x08, // payload length
        0, 0, 0, 0, 0, 0, 0, 5, // sequence
        0x00, 0x00, 0x00, 0x00, // crc32c, filled in by `ping_bytes`
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
    ];

    fn ping_bytes() -> Vec<u8> {
        let mut b = PING.to_vec();
        // crc32c over the header with a zero checksum field, then the payload.
        let crc = crc32c::crc32c(&b);
        b[20..24].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn parses_literal_ping() {
        let bytes = ping_bytes();
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.msg_type(), MessageType::Ping);
        assert_eq!(packet.payload_len(), 8);
        assert_eq!(packet.seq(), 5);
        assert!(packet.verify_checksum());
        let repr = MessageRepr::parse(&packet).unwrap();
        assert_eq!(
            repr,
            MessageRepr {
                version: 1,
                seq: 5,
                message: Message::Ping(PingRepr {
                    cookie: 0x0102_0304_0506_0708
                }),
            }
        );
        assert_eq!(repr.to_bytes(), bytes);
    }

    #[test]
    fn known_checksum_value() {
        // crc32c("123456789") = 0xe3069283: pins the algorithm (Castagnoli, not IEEE).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn emits_literal_write_data() {
        let repr = MessageRepr {
            version: 1,
            seq: 0x10,
            message: Message::WriteData(WriteDataRepr {
                id: 7,
                offset: 0x200,
                flags: WRITE_FUA,
                data: vec![0xab; 512],
            }),
        };
        let bytes = repr.to_bytes();
        assert_eq!(bytes.len(), 24 + 24 + 512);
        assert_eq!(&bytes[..12], b"TBRP\x00\x01\x09\x00\x00\x00\x02\x18");
        assert_eq!(&bytes[12..20], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&bytes[24..32], &[0, 0, 0, 0, 0, 0, 0, 7]); // id
        assert_eq!(&bytes[32..40], &[0, 0, 0, 0, 0, 0, 2, 0]); // offset
        assert_eq!(&bytes[40..44], &[0, 0, 0, 1]); // FUA
        assert_eq!(&bytes[44..48], &[0, 0, 2, 0]); // 512 bytes
        assert!(bytes[48..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn literal_checksum_messages() {
        // Checksums for 4 KiB + 512 bytes at 8 KiB: two crcs, the second over 512 bytes.
        let mut p = Vec::new();
        p.extend_from_slice(&9u64.to_be_bytes());
        p.extend_from_slice(&8192u64.to_be_bytes());
        p.extend_from_slice(&4608u32.to_be_bytes());
        p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        p.extend_from_slice(&0x5566_7788u32.to_be_bytes());
        let c = ChecksumsRepr::parse(&p).unwrap();
        assert_eq!((c.id, c.offset, c.len), (9, 8192, 4608));
        assert_eq!(c.crcs, vec![0x1122_3344, 0x5566_7788]);
        let mut out = vec![0u8; c.buffer_len()];
        c.emit(&mut out);
        assert_eq!(out, p);
        // One crc too many or too few, a length that is not whole sectors: refused.
        assert!(ChecksumsRepr::parse(&p[..p.len() - 4]).is_err());
        let mut longer = p.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(ChecksumsRepr::parse(&longer).is_err());
        p[19] = 1; // length 4097
        assert!(ChecksumsRepr::parse(&p).is_err());

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
    fn block_checksums_cover_a_short_tail() {
        let mut data = vec![0u8; 4096 + 512];
        data[4096] = 1;
        let crcs = block_checksums(&data);
        assert_eq!(crcs.len(), checksum_count(data.len() as u32));
        assert_eq!(crcs[0], crc32c::crc32c(&[0u8; 4096]));
        assert_eq!(crcs[1], crc32c::crc32c(&data[4096..]));
    }

    #[test]
    fn literal_uuids_and_hello() {
        let mut payload = Vec::new();
        for v in [0xc0u64, 0xb0, 0xa1, 0xa2, 3, UUID_FLAG_CRASHED_PRIMARY] {
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let u = UuidsRepr::parse(&payload).unwrap();
        assert_eq!(u.current, 0xc0);
        assert_eq!(u.history, [0xa1, 0xa2]);
        assert_eq!(u.flags, UUID_FLAG_CRASHED_PRIMARY);
        payload[47] = 0x80; // unknown flag bit
        assert!(UuidsRepr::parse(&payload).is_err());

        let mut hello = vec![0, 1, 0, 3];
        hello.extend_from_slice(&[9u8; 32]);
        hello.push(5);
        hello.extend_from_slice(b"alpha");
        let h = HelloRepr::parse(&hello).unwrap();
        assert_eq!(
            (h.min_version, h.max_version, h.name.as_str()),
            (1, 3, "alpha")
        );
        hello.push(b'x'); // trailing byte
        assert!(HelloRepr::parse(&hello).is_err());
    }

    #[test]
    fn corrupt_message_is_refused() {
        let good = ping_bytes();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let parsed = Packet::new_checked(&bad[..])
                .ok()
                .and_then(|p| MessageRepr::parse(&p).ok());
            assert!(parsed.is_none(), "flipping byte {i} was not detected");
            let mut d = FrameDecoder::new();
            d.feed(&bad);
            assert!(!matches!(d.next_message(), Ok(Some(_))), "byte {i}");
        }
    }

    #[test]
    fn a_write_data_head_and_its_data_are_the_whole_message() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let owned = MessageRepr {
            version: 1,
            seq: 77,
            message: Message::WriteData(WriteDataRepr {
                id: 5,
                offset: 8192,
                flags: WRITE_FUA,
                data: data.clone(),
            }),
        }
        .to_bytes();
        let head = WriteDataRepr::emit_head(1, 77, 5, 8192, WRITE_FUA, &data);
        assert_eq!([&head[..], &data[..]].concat(), owned);
    }

    #[test]
    fn decoder_buffer_stays_bounded_when_reads_never_end_on_a_boundary() {
        let one = ping_bytes();
        let stream: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 10_000)
            .collect();
        let mut d = FrameDecoder::new();
        let mut decoded = 0;
        // Reads of a size that splits messages, as TCP may deliver them.
        let read_size = one.len() * 3 / 2 + 1;
        for chunk in stream.chunks(read_size) {
            d.feed(chunk);
            while let Ok(Some(_)) = d.next_message() {
                decoded += 1;
            }
            // Room for one read beside the undecoded part of one message, never more.
            assert!(
                d.buf.len() <= read_size + one.len(),
                "buffer grew to {}",
                d.buf.len()
            );
        }
        assert_eq!(decoded, 10_000);
    }

    #[test]
    fn decoder_reports_checksum_and_stays_failed() {
        let mut bad = ping_bytes();
        bad[31] ^= 1;
        let mut d = FrameDecoder::new();
        d.feed(&bad);
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::Checksum { .. })
        ));
        d.feed(&ping_bytes());
        assert_eq!(d.next_message(), Err(DecodeError::Failed));
    }

    #[test]
    fn decoder_handles_byte_at_a_time_and_batches() {
        let msgs: Vec<MessageRepr> = (0..5)
            .map(|seq| MessageRepr {
                version: 1,
                seq,
                message: Message::WriteAck(WriteAckRepr {
                    id: seq * 3,
                    kind: AckKind::Completed,
                }),
            })
            .collect();
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.to_bytes()).collect();
        let mut d = FrameDecoder::new().check_sequence(0);
        let mut got = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);

        let mut d = FrameDecoder::new();
        d.feed(&stream);
        for m in &msgs {
            assert_eq!(d.next_message().unwrap().as_ref(), Some(m));
        }
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn decoder_refuses_gaps_and_replays() {
        let m = |seq| {
            MessageRepr {
                version: 1,
                seq,
                message: Message::Ping(PingRepr { cookie: 0 }),
            }
            .to_bytes()
        };
        let mut d = FrameDecoder::new().check_sequence(0);
        d.feed(&m(0));
        d.feed(&m(0));
        assert!(d.next_message().unwrap().is_some());
        assert_eq!(
            d.next_message(),
            Err(DecodeError::Sequence {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn decoder_refuses_garbage_and_huge_lengths_early() {
        let mut d = FrameDecoder::new();
        d.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_message(), Err(DecodeError::BadMagic(_))));

        let mut d = FrameDecoder::new();
        d.feed(b"TB");
        assert_eq!(d.next_message(), Ok(None));
        d.feed(b"X");
        assert!(matches!(d.next_message(), Err(DecodeError::BadMagic(_))));

        // A header announcing 16 MiB is refused before any payload arrives.
        let mut hdr = ping_bytes()[..HEADER_LEN].to_vec();
        hdr[8..12].copy_from_slice(&(16u32 << 20).to_be_bytes());
        let mut d = FrameDecoder::new();
        d.feed(&hdr);
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn largest_write_fits_the_default_limit() {
        let repr = MessageRepr {
            version: 1,
            seq: 0,
            message: Message::WriteData(WriteDataRepr {
                id: 1,
                offset: 0,
                flags: 0,
                data: vec![1; MAX_DATA_LEN],
            }),
        };
        let mut d = FrameDecoder::new();
        d.feed(&repr.to_bytes());
        assert_eq!(d.next_message().unwrap(), Some(repr));
    }

    #[test]
    fn misaligned_and_oversized_block_ranges_are_malformed() {
        let mut w = WriteDataRepr {
            id: 1,
            offset: 100,
            flags: 0,
            data: vec![0; 512],
        };
        let mut buf = vec![0; w.buffer_len()];
        w.emit(&mut buf);
        assert!(WriteDataRepr::parse(&buf).is_err());
        w.offset = 512;
        w.data = vec![0; 100];
        let mut buf = vec![0; w.buffer_len()];
        w.emit(&mut buf);
        assert!(WriteDataRepr::parse(&buf).is_err());
        let r = ResyncRequestRepr {
            id: 0,
            offset: 0,
            len: (MAX_DATA_LEN + 512) as u32,
            checksum: None,
        };
        let mut buf = vec![0; r.buffer_len()];
        r.emit(&mut buf);
        assert!(ResyncRequestRepr::parse(&buf).is_err());
    }

    #[test]
    fn negotiate_picks_highest_common_version() {
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((2, 5), (1, 3)), Some(3));
        assert_eq!(negotiate((1, 2), (3, 4)), None);
        assert_eq!(negotiate((3, 1), (1, 3)), None);
        assert_eq!(negotiate((4, 4), (1, 9)), Some(4));
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

    #[test]
    fn state_words_match_drbd() {
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!(ConnState::Handshaking.to_string(), "WFReportParams");
        assert_eq!(ReplState::PausedSyncT.to_string(), "PausedSyncT");
        for d in DiskState::ALL {
            assert_eq!(DiskState::from_code(d.code()), Ok(*d));
        }
        assert!(Role::from_code(9).is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9.-]{0,64}"
    }

    fn sectors(max: usize) -> impl Strategy<Value = Vec<u8>> {
        (0..=max).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n * 512))
    }

    fn pick<T: Copy + fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
        proptest::sample::select(all)
    }

    fn message() -> impl Strategy<Value = Message> {
        let offset = (0u64..(1 << 40)).prop_map(|s| s * 512);
        prop_oneof![
            (any::<u16>(), any::<u16>(), any::<[u8; 32]>(), name()).prop_map(
                |(a, b, nonce, name)| {
                    Message::Hello(HelloRepr {
                        min_version: a.min(b),
                        max_version: a.max(b),
                        nonce,
                        name,
                    })
                }
            ),
            any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge(AuthChallengeRepr {
                algorithm: AUTH_HMAC_SHA256,
                nonce
            })),
            any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse(AuthResponseRepr { mac })),
            Just(Message::AuthOk),
            Just(Message::AuthFail),
            Just(Message::SyncDone),
            any::<bool>().prop_map(Message::SyncPause),
            (any::<bool>(), any::<bool>()).prop_map(|(sender_is_source, full)| {
                Message::SyncStart(SyncStartRepr {
                    sender_is_source,
                    full,
                })
            }),
            (
                any::<u64>(),
                pick(ReplProtocol::ALL),
                pick(Durability::ALL),
                pick(Role::ALL),
                pick(DiskState::ALL),
                any::<u32>()
            )
                .prop_map(|(size, protocol, durability, role, disk, max_write)| {
                    Message::Parameters(ParametersRepr {
                        size,
                        protocol,
                        durability,
                        role,
                        disk,
                        max_write,
                    })
                }),
            (any::<[u64; 5]>(), 0u64..8).prop_map(|(v, flags)| Message::Uuids(UuidsRepr {
                current: v[0],
                bitmap: v[1],
                history: [v[2], v[3]],
                dirty_bits: v[4],
                flags,
            })),
            any::<u64>().prop_map(Message::SyncUuid),
            (any::<u64>(), offset.clone(), 0u32..4, sectors(8)).prop_map(
                |(id, offset, flags, data)| Message::WriteData(WriteDataRepr {
                    id,
                    offset,
                    flags,
                    data
                })
            ),
            (any::<u64>(), pick(AckKind::ALL))
                .prop_map(|(id, kind)| Message::WriteAck(WriteAckRepr { id, kind })),
            any::<u64>().prop_map(|barrier| Message::Barrier(BarrierRepr { barrier })),
            (any::<u64>(), any::<u32>()).prop_map(|(barrier, writes)| Message::BarrierAck(
                BarrierAckRepr { barrier, writes }
            )),
            (
                0u64..(1 << 50),
                proptest::collection::vec(any::<u8>(), 0..300),
                0u32..8,
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(first_bit, bits, trim, last, raw)| {
                    let count = (bits.len() as u32 * 8).saturating_sub(trim);
                    let mut c = BitmapChunkRepr::new(first_bit, count, bits, last);
                    c.encoding = if raw {
                        BitmapEncoding::Raw
                    } else {
                        BitmapEncoding::Rle
                    };
                    Message::BitmapChunk(c)
                }),
            (
                any::<u64>(),
                offset.clone(),
                0u32..=2048,
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(id, offset, sectors, checksum)| Message::ResyncRequest(
                    ResyncRequestRepr {
                        id,
                        offset,
                        len: sectors * 512,
                        checksum
                    }
                )),
            (any::<u64>(), offset.clone(), sectors(8)).prop_map(|(id, offset, data)| {
                Message::ResyncData(ResyncDataRepr { id, offset, data })
            }),
            (any::<u64>(), offset.clone(), 0u32..=2048).prop_map(|(id, offset, sectors)| {
                Message::ChecksumRequest(ChecksumRequestRepr {
                    id,
                    offset,
                    len: sectors * 512,
                })
            }),
            (any::<u64>(), offset.clone(), 0u32..=2048, any::<u32>()).prop_map(
                |(id, offset, sectors, seed)| {
                    let len = sectors * 512;
                    let crcs = (0..checksum_count(len) as u32)
                        .map(|i| seed.wrapping_mul(i + 1))
                        .collect();
                    Message::Checksums(ChecksumsRepr {
                        id,
                        offset,
                        len,
                        crcs,
                    })
                }
            ),
            (any::<u64>(), offset.clone(), 0u32..=2048).prop_map(|(id, offset, sectors)| {
                Message::ResyncZero(ResyncZeroRepr {
                    id,
                    offset,
                    len: sectors * 512,
                })
            }),
            (any::<u64>(), offset, 0u32..=2048).prop_map(|(id, offset, sectors)| {
                Message::ResyncSkip(ResyncSkipRepr {
                    id,
                    offset,
                    len: sectors * 512,
                })
            }),
            (pick(Role::ALL), pick(DiskState::ALL), pick(ConnState::ALL)).prop_map(
                |(role, disk, conn)| Message::StateChange(StateChangeRepr { role, disk, conn })
            ),
            any::<u64>().prop_map(|cookie| Message::Ping(PingRepr { cookie })),
            any::<u64>().prop_map(|cookie| Message::PingAck(PingRepr { cookie })),
            (pick(DisconnectReason::ALL), "\\PC{0,80}").prop_map(|(reason, message)| {
                Message::Disconnect(DisconnectRepr { reason, message })
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(version in any::<u16>(), seq in any::<u64>(), message in message()) {
            let repr = MessageRepr { version, seq, message };
            let bytes = repr.to_bytes();
            prop_assert_eq!(bytes.len(), repr.buffer_len());
            let parsed = MessageRepr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap();
            prop_assert_eq!(&parsed, &repr);
            // The streaming decoder agrees, however the bytes are split.
            let mut d = FrameDecoder::new();
            let cut = bytes.len() / 2;
            d.feed(&bytes[..cut]);
            if cut < HEADER_LEN + repr.message.buffer_len() {
                prop_assert_eq!(d.next_message().unwrap(), None);
            }
            d.feed(&bytes[cut..]);
            prop_assert_eq!(d.next_message().unwrap(), Some(repr));
        }

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

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_parse(&bytes);
        }

        #[test]
        fn framed_garbage_payloads_never_panic(t in 0u8..28, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![0u8; HEADER_LEN + payload.len()];
            bytes[HEADER_LEN..].copy_from_slice(&payload);
            let mut p = Packet::new_unchecked(&mut bytes[..]);
            p.set_header(1, MessageType::from(t), payload.len() as u32, 0);
            p.fill_checksum();
            fuzz_parse(&bytes);
        }
    }
}
