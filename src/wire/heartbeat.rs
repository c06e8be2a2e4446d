//! The heartbeat datagram: one UDP payload a node sends on every heartbeat path (the replication
//! link, the client network) so its peer can tell "the peer is down" from "one path is down".
//!
//! Not wired into the daemon yet: this is the byte format alone.
//!
//! # Layout
//!
//! All integers big-endian. `N` is the sender's node name length.
//!
//! | offset   | size | field       | meaning                                                     |
//! |----------|------|-------------|-------------------------------------------------------------|
//! | 0        | 4    | magic       | `TBHB`                                                      |
//! | 4        | 1    | version     | [`VERSION`] (1)                                             |
//! | 5        | 1    | kind        | [`Kind`]: 1 heartbeat, 2 echo reply                         |
//! | 6        | 1    | path        | the sender's id of the path it sent this on                 |
//! | 7        | 1    | role        | the sender's [`Role`] wire code                             |
//! | 8        | 1    | flags       | [`StatusFlags`]: bit 0 serving, bit 1 disk up to date       |
//! | 9        | 1    | name length | `N`, 1..=[`MAX_NAME_LEN`]                                   |
//! | 10       | 8    | boot nonce  | random, chosen once per process start                       |
//! | 18       | 8    | sequence    | per sender, one counter shared by all paths, never reused   |
//! | 26       | 8    | sent µs     | the sender's monotonic clock when it sent this              |
//! | 34       | 8    | echo µs     | echo reply: the `sent µs` of the heartbeat answered; else 0 |
//! | 42       | N    | name        | the sender's node name, UTF-8                               |
//! | 42 + N   | 32   | tag         | HMAC-SHA256 over bytes `0..42 + N`, see below               |
//!
//! The datagram ends with the tag: trailing bytes are refused, because nothing would
//! authenticate them.
//!
//! # Authentication
//!
//! `tag = HMAC-SHA256(secret, "twinblade-heartbeat-v1" || bytes 0..42 + N)`. The domain prefix
//! differs from the replication handshake's (`crate::repl::auth`), so no tag made for one can
//! pass as the other. The tag is compared in constant time ([`Packet::verify`]). Read untrusted
//! datagrams with [`HeartbeatRepr::parse_authenticated`]: it checks the tag before believing any
//! field. Replay protection (boot nonce and sequence) is [`crate::ha::replay`]'s job.
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
/// The only version this build speaks.
pub const VERSION: u8 = 1;
/// The longest node name a heartbeat carries.
pub const MAX_NAME_LEN: usize = 64;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Length of everything before the name.
pub const FIXED_LEN: usize = field::NAME_START;
/// Length of the longest heartbeat datagram.
pub const MAX_LEN: usize = FIXED_LEN + MAX_NAME_LEN + TAG_LEN;

/// Domain separation: no other twinblade MAC can be mistaken for a heartbeat tag.
const DOMAIN: &[u8] = b"twinblade-heartbeat-v1";

/// Byte ranges of the heartbeat datagram (the name and tag follow [`NAME_START`](field::NAME_START)).
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
    pub const NAME_START: usize = 42;
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
    /// the tag, and nothing after it.
    pub fn check_len(&self) -> Result<(), Error> {
        let have = self.buffer.as_ref().len();
        need(FIXED_LEN, have)?;
        let name_len = self.name_len();
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(Error::Malformed {
                field: "name length",
            });
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

    /// The raw name bytes.
    pub fn name(&self) -> &[u8] {
        &self.buffer.as_ref()[field::NAME_START..self.tag_start()]
    }

    /// The tag bytes.
    pub fn tag(&self) -> &[u8] {
        &self.buffer.as_ref()[self.tag_start()..self.total_len()]
    }

    fn tag_start(&self) -> usize {
        field::NAME_START + self.name_len()
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
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(DOMAIN);
    mac.update(signed);
    mac
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
        let name = std::str::from_utf8(packet.name())
            .map_err(|_| Error::Malformed { field: "name" })?
            .to_string();
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

    /// The datagram's length, tag included.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.name.len().min(MAX_NAME_LEN) + TAG_LEN
    }

    /// Writes the fields into `buf` (at least [`buffer_len`](Self::buffer_len) bytes) and
    /// zeroes the tag; [`emit_signed`](Self::emit_signed) also signs.
    ///
    /// A name longer than [`MAX_NAME_LEN`] is cut to it (at a byte boundary: the peer then
    /// refuses the datagram if that split a character), and an empty one is refused by the
    /// peer: emitting never panics, and the configuration refuses such names first.
    pub fn emit(&self, buf: &mut [u8]) {
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_LEN)];
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
        let tag_start = field::NAME_START + name.len();
        buf[field::NAME_START..tag_start].copy_from_slice(name);
        buf[tag_start..tag_start + TAG_LEN].fill(0);
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

/// The fuzz target's body: parsing any bytes must refuse or round-trip, never panic; verifying
/// must not panic; an authenticated heartbeat goes through a replay window. The fuzzer cannot
/// forge tags, so [`crate::ha::replay::fuzz_window`] drives the window with the raw bytes too.
pub fn fuzz_parse(data: &[u8]) {
    const SECRET: &[u8] = b"fuzz secret";
    if let Ok(packet) = Packet::new_checked(data) {
        let _ = packet.verify(SECRET);
    }
    if let Ok(repr) = HeartbeatRepr::parse(data) {
        let signed = repr.to_signed_vec(SECRET);
        assert_eq!(signed.len(), repr.buffer_len());
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
        }
    }

    /// The sample's bytes before the tag, written out by hand from the layout table.
    const SAMPLE_SIGNED_PART: [u8; 47] = [
        b'T', b'B', b'H', b'B', // magic
        1,    // version
        1,    // kind: heartbeat
        1,    // path
        1,    // role: Primary
        0b11, // flags: serving, up to date
        5,    // name length
        1, 2, 3, 4, 5, 6, 7, 8, // boot nonce
        0, 0, 0, 0, 0, 0, 0, 42, // sequence
        0, 0, 0, 0, 0, 0x0f, 0x42, 0x40, // sent µs = 1_000_000
        0, 0, 0, 0, 0, 0, 0, 0, // echo µs
        b'a', b'l', b'p', b'h', b'a', // name
    ];

    #[test]
    fn emits_the_documented_layout() {
        let bytes = sample().to_signed_vec(SECRET);
        assert_eq!(bytes.len(), 47 + TAG_LEN);
        assert_eq!(&bytes[..47], &SAMPLE_SIGNED_PART);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
        mac.update(b"twinblade-heartbeat-v1");
        mac.update(&SAMPLE_SIGNED_PART);
        assert_eq!(&bytes[47..], mac.finalize().into_bytes().as_slice());
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
        refused(&|b| b[4] = 2, "version");
        refused(&|b| b[5] = 0, "kind");
        refused(&|b| b[7] = 9, "role");
        refused(&|b| b[9] = 0, "name length");
        refused(&|b| b[9] = MAX_NAME_LEN as u8 + 1, "name length");
        refused(&|b| b[42] = 0xff, "name");
        refused(&|b| b.push(0), "length");
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
        mac.update(&bytes[..47]);
        bytes[47..].copy_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            HeartbeatRepr::parse_authenticated(&bytes, SECRET),
            Err(HeartbeatError::BadTag(BadTag))
        );
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

    fn any_repr() -> impl Strategy<Value = HeartbeatRepr> {
        (
            prop_oneof![Just(Kind::Heartbeat), Just(Kind::EchoReply)],
            any::<u8>(),
            proptest::sample::select(Role::ALL),
            any::<u8>(),
            "[a-z0-9-]{1,64}",
            any::<[u64; 4]>(),
        )
            .prop_map(
                |(kind, path, role, flags, name, [boot_nonce, sequence, sent_us, echo_us])| {
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
    }
}
