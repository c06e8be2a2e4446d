//! The heartbeat datagram: one UDP payload a node sends on every heartbeat path (the replication
//! link, the client network) so its peer can tell "the peer is down" from "one path is down".
//! Each datagram also carries the sender's state for every resource, so the pair can exchange
//! it (and ask each other to persist Outdated) over any path, not only the replication link,
//! and how many of its ping targets the sender reaches (`[cluster] ping`).
//!
//! This module is the byte format alone; [`crate::ha::service`] sends and receives it.
//!
//! # Layout
//!
//! All integers big-endian. `N` is the sender's node name length, `R` the length of the
//! resource list that follows it.
//!
//! | offset     | size | field       | meaning                                                     |
//! |------------|------|-------------|-------------------------------------------------------------|
//! | 0          | 4    | magic       | `TBHB`                                                      |
//! | 4          | 1    | version     | [`VERSION`] (3)                                             |
//! | 5          | 1    | kind        | [`Kind`]: 1 heartbeat, 2 echo reply                         |
//! | 6          | 1    | path        | the sender's id of the path it sent this on                 |
//! | 7          | 1    | role        | the sender's [`Role`] wire code (summary of its resources)  |
//! | 8          | 1    | flags       | [`StatusFlags`]: bit 0 serving, bit 1 disk up to date       |
//! | 9          | 1    | name length | `N`, 1..=[`MAX_NAME_LEN`]                                   |
//! | 10         | 8    | boot nonce  | random, chosen once per process start                       |
//! | 18         | 8    | sequence    | per sender, one counter shared by all paths, never reused   |
//! | 26         | 8    | sent µs     | the sender's monotonic clock when it sent this              |
//! | 34         | 8    | echo µs     | echo reply: the `sent µs` of the heartbeat answered; else 0 |
//! | 42         | 1    | reach       | ping targets the sender reaches, 0..=[`MAX_REACH`]; 0xFF: it has none configured |
//! | 43         | N    | name        | the sender's node name, UTF-8                               |
//! | 43 + N     | 1    | count       | number of resource entries, 0..=[`MAX_RESOURCES`]           |
//! | 44 + N     | R    | resources   | `count` entries, each laid out as below                     |
//! | 44 + N + R | 32   | tag         | HMAC-SHA256 over bytes `0..44 + N + R`, see below           |
//!
//! One resource entry (`L` is its name length):
//!
//! | offset | size | field       | meaning                                                        |
//! |--------|------|-------------|----------------------------------------------------------------|
//! | 0      | 1    | name length | `L`, 1..=[`MAX_RESOURCE_NAME_LEN`]                             |
//! | 1      | L    | name        | the resource name, UTF-8                                       |
//! | 1 + L  | 1    | role        | the sender's [`Role`] wire code for this resource              |
//! | 2 + L  | 1    | flags       | [`ResourceFlags`]: bit 0 serving, 1 UpToDate, 2 Outdated, 3 outdate request, 4 handing over, 5 wants switchover |
//!
//! The datagram ends with the tag: trailing bytes are refused, because nothing would
//! authenticate them.
//!
//! # Authentication
//!
//! `tag = HMAC-SHA256(secret, "twinblade-heartbeat-v1" || every byte before the tag)`, the
//! resource entries included. The domain prefix differs from the replication handshake's
//! (`crate::repl::auth`), so no tag made for one can pass as the other; the version byte is
//! signed, so a version 1 datagram cannot pass as version 2. The tag is compared in constant
//! time ([`Packet::verify`]). Read untrusted datagrams with
//! [`HeartbeatRepr::parse_authenticated`]: it checks the tag before believing any field.
//! Replay protection (boot nonce and sequence) is [`crate::ha::replay`]'s job.
//!
//! # Round trip without clock agreement
//!
//! A node answers a heartbeat with an echo reply whose `echo µs` is the heartbeat's `sent µs`.
//! The original sender subtracts that from its own monotonic clock: both times come from the
//! same clock, so the peers' clocks never need to agree.

use super::{need, Error};
use crate::cluster::Role;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `TBHB`.
pub const MAGIC: [u8; 4] = *b"TBHB";
/// The only version this build speaks (2: resource entries after the name; 3: the reach byte).
pub const VERSION: u8 = 3;
/// The most ping targets a reach byte counts.
pub const MAX_REACH: u8 = 16;
/// The reach byte of a sender without ping targets.
pub const NO_REACH: u8 = 0xFF;
/// The longest node name a heartbeat carries.
pub const MAX_NAME_LEN: usize = 64;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Length of everything before the name.
pub const FIXED_LEN: usize = field::NAME_START;
/// The most resource entries one datagram carries.
pub const MAX_RESOURCES: usize = 16;
/// The longest resource name an entry carries.
pub const MAX_RESOURCE_NAME_LEN: usize = 64;
/// Length of the longest resource entry: name length, name, role, flags.
pub const MAX_ENTRY_LEN: usize = 1 + MAX_RESOURCE_NAME_LEN + 2;
/// Length of the longest heartbeat datagram.
pub const MAX_LEN: usize = FIXED_LEN + MAX_NAME_LEN + 1 + MAX_RESOURCES * MAX_ENTRY_LEN + TAG_LEN;

/// Domain separation: no other twinblade MAC can be mistaken for a heartbeat tag.
const DOMAIN: &[u8] = b"twinblade-heartbeat-v1";

/// Byte ranges of the heartbeat datagram (the name, the resource list and the tag follow
/// [`NAME_START`](field::NAME_START)).
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const PATH: usize = 6;
    pub const ROLE: usize = 7;
    pub const FLAGS: usize = 8;
    pub const NAME_LEN: usize = 9;
    pub const BOOT_NONCE: Range<usize> = 10..18;
    pub const SEQUENCE: Range<usize> = 18..26;
    pub const SENT_US: Range<usize> = 26..34;
    pub const ECHO_US: Range<usize> = 34..42;
    pub const REACH: usize = 42;
    pub const NAME_START: usize = 43;
}

/// What a heartbeat datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 1: "I am alive", sent periodically on every path.
    Heartbeat,
    /// 2: the answer to a heartbeat, echoing its send time so the sender can measure round trip.
    EchoReply,
}

impl Kind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Kind::Heartbeat => 1,
            Kind::EchoReply => 2,
        }
    }

    /// The kind of a wire code; `Malformed` for an unknown code.
    pub fn from_code(code: u8) -> Result<Kind, Error> {
        match code {
            1 => Ok(Kind::Heartbeat),
            2 => Ok(Kind::EchoReply),
            _ => Err(Error::Malformed { field: "kind" }),
        }
    }
}

/// The sender's serving summary. Unknown bits are kept as they are, so a newer peer can add
/// bits without an older one refusing its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StatusFlags(pub u8);

impl StatusFlags {
    /// The sender serves its exports to clients.
    pub const SERVING: u8 = 1 << 0;
    /// The sender's disk is up to date.
    pub const UP_TO_DATE: u8 = 1 << 1;

    /// Flags with the two known bits set as given.
    pub fn new(serving: bool, up_to_date: bool) -> StatusFlags {
        let mut bits = 0;
        if serving {
            bits |= Self::SERVING;
        }
        if up_to_date {
            bits |= Self::UP_TO_DATE;
        }
        StatusFlags(bits)
    }

    /// Whether the sender serves its exports.
    pub fn serving(self) -> bool {
        self.0 & Self::SERVING != 0
    }

    /// Whether the sender's disk is up to date.
    pub fn up_to_date(self) -> bool {
        self.0 & Self::UP_TO_DATE != 0
    }
}

/// One resource's state as its entry carries it. Unknown bits are kept as they are, as in
/// [`StatusFlags`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ResourceFlags(pub u8);

impl ResourceFlags {
    /// The sender serves this resource's exports.
    pub const SERVING: u8 = 1 << 0;
    /// The sender's disk for this resource is UpToDate.
    pub const UP_TO_DATE: u8 = 1 << 1;
    /// The sender has persisted Outdated for this resource on its disk.
    pub const OUTDATED: u8 = 1 << 2;
    /// The sender, a primary that lost the replication link, asks the receiver to persist
    /// Outdated for this resource.
    pub const OUTDATE_REQUEST: u8 = 1 << 3;
    /// The sender, a primary, stepped down for the receiver in a planned switchover.
    pub const HANDING_OVER: u8 = 1 << 4;
    /// The sender, a secondary, asks the receiver to hand the primary role over.
    pub const WANTS_SWITCHOVER: u8 = 1 << 5;

    fn bit(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// Returns these flags with `bit` set to `on`, other bits (unknown ones too) unchanged.
    pub fn with(self, bit: u8, on: bool) -> ResourceFlags {
        if on {
            ResourceFlags(self.0 | bit)
        } else {
            ResourceFlags(self.0 & !bit)
        }
    }

    /// Whether the sender serves this resource.
    pub fn serving(self) -> bool {
        self.bit(Self::SERVING)
    }

    /// Whether the sender's disk is UpToDate.
    pub fn up_to_date(self) -> bool {
        self.bit(Self::UP_TO_DATE)
    }

    /// Whether the sender has persisted Outdated.
    pub fn outdated(self) -> bool {
        self.bit(Self::OUTDATED)
    }

    /// Whether the sender asks us to persist Outdated.
    pub fn outdate_request(self) -> bool {
        self.bit(Self::OUTDATE_REQUEST)
    }

    /// Whether the sender stepped down for us (planned switchover).
    pub fn handing_over(self) -> bool {
        self.bit(Self::HANDING_OVER)
    }

    /// Whether the sender asks us to hand over.
    pub fn wants_switchover(self) -> bool {
        self.bit(Self::WANTS_SWITCHOVER)
    }
}

/// One resource entry of a heartbeat: the sender's state for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceEntry {
    /// The resource name, 1..=[`MAX_RESOURCE_NAME_LEN`] bytes.
    pub name: String,
    /// The sender's role for it.
    pub role: Role,
    /// Its state.
    pub flags: ResourceFlags,
}

/// A view of one resource entry inside a [`Packet`], fields unparsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEntry<'a> {
    /// The raw name bytes.
    pub name: &'a [u8],
    /// The raw role code.
    pub role: u8,
    /// The flags.
    pub flags: ResourceFlags,
}

/// The resource entries of a checked [`Packet`], in order.
#[derive(Debug, Clone)]
pub struct RawEntries<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl<'a> Iterator for RawEntries<'a> {
    type Item = RawEntry<'a>;

    fn next(&mut self) -> Option<RawEntry<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let name_len = usize::from(self.bytes[0]);
        let entry = RawEntry {
            name: &self.bytes[1..1 + name_len],
            role: self.bytes[1 + name_len],
            flags: ResourceFlags(self.bytes[2 + name_len]),
        };
        self.bytes = &self.bytes[3 + name_len..];
        Some(entry)
    }
}

/// The tag does not verify: wrong secret, or the datagram was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat tag does not verify (wrong secret or altered datagram)")]
pub struct BadTag;

/// Why a received heartbeat datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// The bytes are not a well-formed heartbeat.
    #[error(transparent)]
    Wire(#[from] Error),
    /// The bytes are well formed but not signed with our secret.
    #[error(transparent)]
    BadTag(#[from] BadTag),
}

/// A view of one heartbeat datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it. Accessors panic if it is too short: only for buffers
    /// we built ourselves.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking its length against the name length it announces.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the buffer holds exactly one datagram: fixed part, a name of an allowed length,
    /// an allowed number of resource entries each with a name of an allowed length, the tag,
    /// and nothing after it.
    pub fn check_len(&self) -> Result<(), Error> {
        let bytes = self.buffer.as_ref();
        let have = bytes.len();
        need(FIXED_LEN, have)?;
        let name_len = self.name_len();
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(Error::Malformed {
                field: "name length",
            });
        }
        let mut at = self.count_at();
        need(at + 1, have)?;
        let count = usize::from(bytes[at]);
        if count > MAX_RESOURCES {
            return Err(Error::Malformed {
                field: "resource count",
            });
        }
        at += 1;
        for _ in 0..count {
            need(at + 1, have)?;
            let entry_name_len = usize::from(bytes[at]);
            if entry_name_len == 0 || entry_name_len > MAX_RESOURCE_NAME_LEN {
                return Err(Error::Malformed {
                    field: "resource name length",
                });
            }
            at += 3 + entry_name_len;
            need(at, have)?;
        }
        need(self.total_len(), have)?;
        if have > self.total_len() {
            return Err(Error::Malformed { field: "length" });
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u64_at(&self, range: std::ops::Range<usize>) -> u64 {
        u64::from_be_bytes(self.buffer.as_ref()[range].try_into().expect("8 bytes"))
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.buffer.as_ref()[field::MAGIC]
            .try_into()
            .expect("4 bytes")
    }

    /// The version byte.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// The raw kind code.
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }

    /// The sender's path id.
    pub fn path(&self) -> u8 {
        self.buffer.as_ref()[field::PATH]
    }

    /// The raw role code.
    pub fn role(&self) -> u8 {
        self.buffer.as_ref()[field::ROLE]
    }

    /// The status flags.
    pub fn flags(&self) -> StatusFlags {
        StatusFlags(self.buffer.as_ref()[field::FLAGS])
    }

    /// The announced name length.
    pub fn name_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::NAME_LEN])
    }

    /// The sender's boot nonce.
    pub fn boot_nonce(&self) -> u64 {
        self.u64_at(field::BOOT_NONCE)
    }

    /// The sender's sequence number.
    pub fn sequence(&self) -> u64 {
        self.u64_at(field::SEQUENCE)
    }

    /// The sender's monotonic send time, µs.
    pub fn sent_us(&self) -> u64 {
        self.u64_at(field::SENT_US)
    }

    /// The echoed send time, µs (0 in a heartbeat).
    pub fn echo_us(&self) -> u64 {
        self.u64_at(field::ECHO_US)
    }

    /// The raw reach byte: targets reached, or [`NO_REACH`].
    pub fn reach(&self) -> u8 {
        self.buffer.as_ref()[field::REACH]
    }

    /// The raw name bytes.
    pub fn name(&self) -> &[u8] {
        &self.buffer.as_ref()[field::NAME_START..self.count_at()]
    }

    /// The offset of the resource count byte, right after the name.
    fn count_at(&self) -> usize {
        field::NAME_START + self.name_len()
    }

    /// The number of resource entries.
    pub fn resource_count(&self) -> usize {
        usize::from(self.buffer.as_ref()[self.count_at()])
    }

    /// The resource entries, fields unparsed.
    pub fn resources(&self) -> RawEntries<'_> {
        RawEntries {
            bytes: &self.buffer.as_ref()[self.count_at() + 1..],
            left: self.resource_count(),
        }
    }

    /// The tag bytes.
    pub fn tag(&self) -> &[u8] {
        &self.buffer.as_ref()[self.tag_start()..self.total_len()]
    }

    /// Where the tag starts: after the last resource entry.
    fn tag_start(&self) -> usize {
        let bytes = self.buffer.as_ref();
        let mut at = self.count_at() + 1;
        for _ in 0..self.resource_count() {
            at += 3 + usize::from(bytes[at]);
        }
        at
    }

    /// The length of the datagram the header announces.
    pub fn total_len(&self) -> usize {
        self.tag_start() + TAG_LEN
    }

    /// The bytes the tag covers.
    fn signed_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.tag_start()]
    }

    /// Checks the tag against `secret`, in constant time.
    pub fn verify(&self, secret: &[u8]) -> Result<(), BadTag> {
        tag_mac(secret, self.signed_bytes())
            .verify_slice(self.tag())
            .map_err(|_| BadTag)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the tag for `secret` over the bytes before it.
    pub fn sign(&mut self, secret: &[u8]) {
        let tag = tag_mac(secret, self.signed_bytes()).finalize().into_bytes();
        let range = self.tag_start()..self.total_len();
        self.buffer.as_mut()[range].copy_from_slice(&tag);
    }
}

fn tag_mac(secret: &[u8], signed: &[u8]) -> Hmac<Sha256> {
    super::domain_mac(DOMAIN, secret, signed)
}

/// The meaning of one heartbeat datagram (everything but the tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRepr {
    /// Heartbeat or echo reply.
    pub kind: Kind,
    /// The sender's id of the path it sent this on.
    pub path: u8,
    /// The sender's role.
    pub role: Role,
    /// The sender's serving summary.
    pub flags: StatusFlags,
    /// The sender's node name, 1..=[`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Random, chosen once per sender process start.
    pub boot_nonce: u64,
    /// Per sender, increasing, shared by all paths.
    pub sequence: u64,
    /// The sender's monotonic send time, µs.
    pub sent_us: u64,
    /// In an echo reply, the `sent_us` of the heartbeat answered; 0 in a heartbeat.
    pub echo_us: u64,
    /// How many ping targets the sender reaches (at most [`MAX_REACH`]); `None`: it has none
    /// configured.
    pub reach: Option<u8>,
    /// The sender's state per resource, at most [`MAX_RESOURCES`].
    pub resources: Vec<ResourceEntry>,
}

impl HeartbeatRepr {
    /// Parses a datagram's fields **without** checking its tag: use
    /// [`parse_authenticated`](Self::parse_authenticated) for anything received.
    pub fn parse(bytes: &[u8]) -> Result<HeartbeatRepr, Error> {
        let packet = Packet::new_checked(bytes)?;
        if packet.magic() != MAGIC {
            return Err(Error::Malformed { field: "magic" });
        }
        if packet.version() != VERSION {
            return Err(Error::Malformed { field: "version" });
        }
        let reach = match packet.reach() {
            NO_REACH => None,
            n if n <= MAX_REACH => Some(n),
            _ => return Err(Error::Malformed { field: "reach" }),
        };
        let name = std::str::from_utf8(packet.name())
            .map_err(|_| Error::Malformed { field: "name" })?
            .to_string();
        let resources = packet
            .resources()
            .map(|raw| {
                Ok(ResourceEntry {
                    name: std::str::from_utf8(raw.name)
                        .map_err(|_| Error::Malformed {
                            field: "resource name",
                        })?
                        .to_string(),
                    role: Role::from_code(raw.role).map_err(|_| Error::Malformed {
                        field: "resource role",
                    })?,
                    flags: raw.flags,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(HeartbeatRepr {
            kind: Kind::from_code(packet.kind())?,
            path: packet.path(),
            role: Role::from_code(packet.role())?,
            flags: packet.flags(),
            name,
            boot_nonce: packet.boot_nonce(),
            sequence: packet.sequence(),
            sent_us: packet.sent_us(),
            echo_us: packet.echo_us(),
            reach,
            resources,
        })
    }

    /// Parses a received datagram, believing nothing in it until its tag verifies.
    pub fn parse_authenticated(
        bytes: &[u8],
        secret: &[u8],
    ) -> Result<HeartbeatRepr, HeartbeatError> {
        Packet::new_checked(bytes)?.verify(secret)?;
        Ok(Self::parse(bytes)?)
    }

    /// The name bytes emitted: cut to [`MAX_NAME_LEN`].
    fn emitted_name(&self) -> &[u8] {
        &self.name.as_bytes()[..self.name.len().min(MAX_NAME_LEN)]
    }

    /// The resource entries emitted, with the name bytes each carries: the first
    /// [`MAX_RESOURCES`], names cut to [`MAX_RESOURCE_NAME_LEN`].
    fn emitted_resources(&self) -> impl Iterator<Item = (&[u8], &ResourceEntry)> {
        self.resources.iter().take(MAX_RESOURCES).map(|entry| {
            let name = entry.name.as_bytes();
            (&name[..name.len().min(MAX_RESOURCE_NAME_LEN)], entry)
        })
    }

    /// The datagram's length, tag included.
    pub fn buffer_len(&self) -> usize {
        let resources: usize = self
            .emitted_resources()
            .map(|(name, _)| 3 + name.len())
            .sum();
        FIXED_LEN + self.emitted_name().len() + 1 + resources + TAG_LEN
    }

    /// Writes the fields into `buf` (at least [`buffer_len`](Self::buffer_len) bytes) and
    /// zeroes the tag; [`emit_signed`](Self::emit_signed) also signs.
    ///
    /// A name longer than [`MAX_NAME_LEN`] (or a resource name longer than
    /// [`MAX_RESOURCE_NAME_LEN`]) is cut to it (at a byte boundary: the peer then refuses the
    /// datagram if that split a character), an empty one is refused by the peer, and entries
    /// past [`MAX_RESOURCES`] are left out (a reach above [`MAX_REACH`] is sent as [`MAX_REACH`]): emitting never panics, and the configuration
    /// refuses such names first.
    pub fn emit(&self, buf: &mut [u8]) {
        let name = self.emitted_name();
        buf[field::MAGIC].copy_from_slice(&MAGIC);
        buf[field::VERSION] = VERSION;
        buf[field::KIND] = self.kind.code();
        buf[field::PATH] = self.path;
        buf[field::ROLE] = self.role.code();
        buf[field::FLAGS] = self.flags.0;
        buf[field::NAME_LEN] = name.len() as u8;
        buf[field::BOOT_NONCE].copy_from_slice(&self.boot_nonce.to_be_bytes());
        buf[field::SEQUENCE].copy_from_slice(&self.sequence.to_be_bytes());
        buf[field::SENT_US].copy_from_slice(&self.sent_us.to_be_bytes());
        buf[field::ECHO_US].copy_from_slice(&self.echo_us.to_be_bytes());
        buf[field::REACH] = self.reach.map_or(NO_REACH, |n| n.min(MAX_REACH));
        let mut at = field::NAME_START + name.len();
        buf[field::NAME_START..at].copy_from_slice(name);
        buf[at] = self.emitted_resources().count() as u8;
        at += 1;
        for (entry_name, entry) in self.emitted_resources() {
            buf[at] = entry_name.len() as u8;
            at += 1;
            buf[at..at + entry_name.len()].copy_from_slice(entry_name);
            at += entry_name.len();
            buf[at] = entry.role.code();
            buf[at + 1] = entry.flags.0;
            at += 2;
        }
        buf[at..at + TAG_LEN].fill(0);
    }

    /// Emits and signs with `secret`: the datagram to send. Returns its length.
    pub fn emit_signed(&self, secret: &[u8], buf: &mut [u8]) -> usize {
        self.emit(buf);
        let mut packet = Packet::new_unchecked(buf);
        packet.sign(secret);
        packet.total_len()
    }

    /// The signed datagram as a new vector.
    pub fn to_signed_vec(&self, secret: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; self.buffer_len()];
        let len = self.emit_signed(secret, &mut buf);
        buf.truncate(len);
        buf
    }
}

/// The fuzz target's body: parsing any bytes must refuse or round-trip, never panic; the format
/// has one encoding per meaning, so re-emitting gives back the input's signed bytes; verifying
/// must not panic; an authenticated heartbeat goes through a replay window. The fuzzer cannot
/// forge tags, so [`crate::ha::replay::fuzz_window`] drives the window with the raw bytes too.
pub fn fuzz_parse(data: &[u8]) {
    const SECRET: &[u8] = b"fuzz secret";
    if let Ok(packet) = Packet::new_checked(data) {
        let _ = packet.verify(SECRET);
        assert_eq!(packet.resources().count(), packet.resource_count());
    }
    if let Ok(repr) = HeartbeatRepr::parse(data) {
        let signed = repr.to_signed_vec(SECRET);
        assert_eq!(signed.len(), repr.buffer_len());
        assert_eq!(signed.len(), data.len());
        assert_eq!(
            signed[..signed.len() - TAG_LEN],
            data[..data.len() - TAG_LEN],
            "one encoding per meaning"
        );
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&signed, SECRET).as_ref(),
            Ok(&repr),
            "round trip"
        );
        let mut window = crate::ha::replay::ReplayWindow::new();
        assert!(window.accept(repr.boot_nonce, repr.sequence).is_ok());
        assert!(window.accept(repr.boot_nonce, repr.sequence).is_err());
    }
    crate::ha::replay::fuzz_window(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn sample() -> HeartbeatRepr {
        HeartbeatRepr {
            kind: Kind::Heartbeat,
            path: 1,
            role: Role::Primary,
            flags: StatusFlags::new(true, true),
            name: "alpha".to_string(),
            boot_nonce: 0x0102_0304_0506_0708,
            sequence: 42,
            sent_us: 1_000_000,
            echo_us: 0,
            reach: Some(2),
            resources: vec![ResourceEntry {
                name: "r0".to_string(),
                role: Role::Primary,
                flags: ResourceFlags(ResourceFlags::SERVING | ResourceFlags::OUTDATE_REQUEST),
            }],
        }
    }

    /// The sample's length before the tag.
    const SIGNED_LEN: usize = 54;
    /// Where the sample's resource list starts (the count byte).
    const COUNT_AT: usize = 48;

    /// The sample's bytes before the tag, written out by hand from the layout table.
    const SAMPLE_SIGNED_PART: [u8; SIGNED_LEN] = [
        b'T', b'B', b'H', b'B', // magic
        3,    // version
        1,    // kind: heartbeat
        1,    // path
        1,    // role: Primary
        0b11, // flags: serving, up to date
        5,    // name length
        1, 2, 3, 4, 5, 6, 7, 8, // boot nonce
        0, 0, 0, 0, 0, 0, 0, 42, // sequence
        0, 0, 0, 0, 0, 0x0f, 0x42, 0x40, // sent µs = 1_000_000
        0, 0, 0, 0, 0, 0, 0, 0, // echo µs
        2, // reach: 2 ping targets
        b'a', b'l', b'p', b'h', b'a', // name
        1,    // resource count
        2,    // resource name length
        b'r', b'0',   // resource name
        1,      // resource role: Primary
        0b1001, // resource flags: serving, outdate request
    ];

    #[test]
    fn emits_the_documented_layout() {
        let bytes = sample().to_signed_vec(SECRET);
        assert_eq!(bytes.len(), SIGNED_LEN + TAG_LEN);
        assert_eq!(&bytes[..SIGNED_LEN], &SAMPLE_SIGNED_PART);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
        mac.update(b"twinblade-heartbeat-v1");
        mac.update(&SAMPLE_SIGNED_PART);
        assert_eq!(&bytes[SIGNED_LEN..], mac.finalize().into_bytes().as_slice());
    }

    #[test]
    fn parses_captured_bytes() {
        let bytes = sample().to_signed_vec(SECRET);
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, SECRET),
            Ok(sample())
        );
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.name(), b"alpha");
        assert_eq!(packet.sequence(), 42);
        assert!(packet.flags().serving() && packet.flags().up_to_date());
        let entries: Vec<RawEntry> = packet.resources().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, b"r0");
        assert_eq!(entries[0].role, Role::Primary.code());
        let flags = entries[0].flags;
        assert!(flags.serving() && flags.outdate_request());
        assert!(!flags.up_to_date() && !flags.outdated());
    }

    #[test]
    fn echo_reply_round_trips() {
        let reply = HeartbeatRepr {
            kind: Kind::EchoReply,
            role: Role::Secondary,
            flags: StatusFlags::new(false, true),
            echo_us: 1_000_000,
            ..sample()
        };
        let bytes = reply.to_signed_vec(SECRET);
        assert_eq!(bytes[5], 2);
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, SECRET),
            Ok(reply)
        );
    }

    #[test]
    fn refuses_malformed_datagrams() {
        let good = sample().to_signed_vec(SECRET);
        let refused = |edit: &dyn Fn(&mut Vec<u8>), field: &str| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            match HeartbeatRepr::parse(&bytes) {
                Err(Error::Malformed { field: got }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        refused(&|b| b[0] = b'X', "magic");
        refused(&|b| b[4] = 1, "version");
        refused(&|b| b[5] = 0, "kind");
        refused(&|b| b[7] = 9, "role");
        refused(&|b| b[9] = 0, "name length");
        refused(&|b| b[9] = MAX_NAME_LEN as u8 + 1, "name length");
        refused(&|b| b[42] = MAX_REACH + 1, "reach");
        refused(&|b| b[43] = 0xff, "name");
        refused(&|b| b.push(0), "length");
        refused(&|b| b[COUNT_AT] = MAX_RESOURCES as u8 + 1, "resource count");
        refused(&|b| b[COUNT_AT + 1] = 0, "resource name length");
        refused(
            &|b| b[COUNT_AT + 1] = MAX_RESOURCE_NAME_LEN as u8 + 1,
            "resource name length",
        );
        refused(&|b| b[COUNT_AT + 2] = 0xff, "resource name");
        refused(&|b| b[COUNT_AT + 4] = 9, "resource role");
        // A count larger than the entries present: the tag is read as an entry and the
        // datagram falls short of what it announces (or its bytes are not valid entries).
        let mut bytes = good.clone();
        bytes[COUNT_AT] = 2;
        assert!(HeartbeatRepr::parse(&bytes).is_err());
        // A count smaller than the entries present leaves bytes after the tag.
        let mut bytes = good.clone();
        bytes[COUNT_AT] = 0;
        assert_eq!(
            HeartbeatRepr::parse(&bytes),
            Err(Error::Malformed { field: "length" })
        );
        for len in 0..good.len() {
            assert!(
                HeartbeatRepr::parse(&good[..len]).is_err(),
                "truncated to {len}"
            );
        }
        assert_eq!(
            HeartbeatRepr::parse(&good[..10]),
            Err(Error::Truncated {
                needed: FIXED_LEN,
                have: 10
            })
        );
    }

    #[test]
    fn wrong_secret_fails() {
        let bytes = sample().to_signed_vec(SECRET);
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, b"another secret"),
            Err(HeartbeatError::BadTag(BadTag))
        );
        assert!(Packet::new_checked(&bytes[..])
            .unwrap()
            .verify(b"")
            .is_err());
    }

    #[test]
    fn a_tag_without_the_domain_prefix_fails() {
        let mut bytes = sample().to_signed_vec(SECRET);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
        mac.update(&bytes[..SIGNED_LEN]);
        bytes[SIGNED_LEN..].copy_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, SECRET),
            Err(HeartbeatError::BadTag(BadTag))
        );
    }

    #[test]
    fn no_ping_targets_is_0xff() {
        let repr = HeartbeatRepr {
            reach: None,
            ..sample()
        };
        let bytes = repr.to_signed_vec(SECRET);
        assert_eq!(bytes[42], NO_REACH);
        assert_eq!(HeartbeatRepr::parse_authenticated(&bytes, SECRET), Ok(repr));
        let over = HeartbeatRepr {
            reach: Some(200),
            ..sample()
        };
        assert_eq!(over.to_signed_vec(SECRET)[42], MAX_REACH);
    }

    #[test]
    fn unknown_flag_bits_survive() {
        let repr = HeartbeatRepr {
            flags: StatusFlags(0x80 | StatusFlags::SERVING),
            ..sample()
        };
        let parsed = HeartbeatRepr::parse(&repr.to_signed_vec(SECRET)).unwrap();
        assert_eq!(parsed.flags, repr.flags);
        assert!(parsed.flags.serving() && !parsed.flags.up_to_date());
    }

    #[test]
    fn the_tag_covers_the_resource_entries() {
        let good = sample().to_signed_vec(SECRET);
        for at in COUNT_AT..SIGNED_LEN {
            let mut bytes = good.clone();
            bytes[at] ^= 0x01;
            assert!(
                HeartbeatRepr::parse_authenticated(&bytes, SECRET).is_err(),
                "byte {at} altered"
            );
        }
        // Altering an entry's flags alone still parses, but no longer verifies.
        let mut bytes = good.clone();
        bytes[SIGNED_LEN - 1] ^= ResourceFlags::OUTDATED;
        assert!(HeartbeatRepr::parse(&bytes).is_ok());
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, SECRET),
            Err(HeartbeatError::BadTag(BadTag))
        );
    }

    #[test]
    fn the_longest_datagram_fits_max_len() {
        let repr = HeartbeatRepr {
            name: "n".repeat(MAX_NAME_LEN),
            resources: (0..MAX_RESOURCES + 3)
                .map(|i| ResourceEntry {
                    name: format!("{i:0>width$}", width = MAX_RESOURCE_NAME_LEN + 5),
                    role: Role::Secondary,
                    flags: ResourceFlags(0xff),
                })
                .collect(),
            ..sample()
        };
        let bytes = repr.to_signed_vec(SECRET);
        assert_eq!(bytes.len(), MAX_LEN);
        // Emitting cut the extra entries and the long names; the peer reads what fits.
        let parsed = HeartbeatRepr::parse_authenticated(&bytes, SECRET).unwrap();
        assert_eq!(parsed.resources.len(), MAX_RESOURCES);
        assert!(parsed
            .resources
            .iter()
            .all(|entry| entry.name.len() == MAX_RESOURCE_NAME_LEN));
    }

    #[test]
    fn resource_flags_keep_unknown_bits() {
        let flags = ResourceFlags(0xf0).with(ResourceFlags::OUTDATED, true);
        assert!(flags.outdated() && !flags.serving());
        assert_eq!(
            flags.with(ResourceFlags::OUTDATED, false),
            ResourceFlags(0xf0)
        );
    }

    fn any_entry() -> impl Strategy<Value = ResourceEntry> {
        (
            "[a-zA-Z0-9_.é-]{1,32}",
            proptest::sample::select(Role::ALL),
            any::<u8>(),
        )
            .prop_map(|(name, role, flags)| ResourceEntry {
                name,
                role,
                flags: ResourceFlags(flags),
            })
    }

    fn any_repr() -> impl Strategy<Value = HeartbeatRepr> {
        (
            prop_oneof![Just(Kind::Heartbeat), Just(Kind::EchoReply)],
            any::<u8>(),
            proptest::sample::select(Role::ALL),
            any::<u8>(),
            "[a-z0-9-]{1,64}",
            any::<[u64; 4]>(),
            proptest::option::of(0..=MAX_REACH),
            proptest::collection::vec(any_entry(), 0..=MAX_RESOURCES),
        )
            .prop_map(
                |(
                    kind,
                    path,
                    role,
                    flags,
                    name,
                    [boot_nonce, sequence, sent_us, echo_us],
                    reach,
                    resources,
                )| {
                    HeartbeatRepr {
                        kind,
                        path,
                        role,
                        flags: StatusFlags(flags),
                        name,
                        boot_nonce,
                        sequence,
                        sent_us,
                        echo_us,
                        reach,
                        resources,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(repr in any_repr()) {
            let bytes = repr.to_signed_vec(SECRET);
            prop_assert_eq!(bytes.len(), repr.buffer_len());
            prop_assert_eq!(HeartbeatRepr::parse_authenticated(&bytes, SECRET), Ok(repr));
        }

        #[test]
        fn any_flipped_byte_fails_verification(repr in any_repr(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = repr.to_signed_vec(SECRET);
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(HeartbeatRepr::parse_authenticated(&bytes, SECRET).is_err());
        }

        #[test]
        fn fuzz_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..160)) {
            fuzz_parse(&data);
        }

        #[test]
        fn fuzz_parse_survives_altered_datagrams(
            repr in any_repr(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            // Near-valid bytes reach the entry parser far more often than random ones.
            let mut bytes = repr.to_signed_vec(SECRET);
            for (at, value) in edits {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            bytes.truncate(bytes.len() - cut % 8);
            fuzz_parse(&bytes);
        }
    }
}
