//! The witness datagram: what a node and a witness ([`crate::ha::witness`]) say to each other
//! over UDP. A node *claims* the right to serve a resource alone, starting from the data
//! generation it holds, or *queries* who holds that right; the witness answers each with a
//! *verdict* that echoes the request's nonce.
//!
//! This module is the byte format alone.
//!
//! # Layout
//!
//! All integers big-endian. `P`, `N`, `R` are the lengths of the pair, node and resource names.
//!
//! | offset      | size | field           | meaning                                                   |
//! |-------------|------|-----------------|-----------------------------------------------------------|
//! | 0           | 4    | magic           | `TBWT`                                                    |
//! | 4           | 1    | version         | [`VERSION`] (1)                                           |
//! | 5           | 1    | kind            | [`Kind`]: 1 claim, 2 query, 3 verdict                     |
//! | 6           | 1    | verdict         | [`Verdict`] in a verdict: 1 granted, 2 held, 3 free; else 0 |
//! | 7           | 1    | pair length     | `P`, 1..=[`MAX_NAME_LEN`]                                 |
//! | 8           | 1    | node length     | `N`, 1..=[`MAX_NAME_LEN`]                                 |
//! | 9           | 1    | resource length | `R`, 1..=[`MAX_NAME_LEN`]                                 |
//! | 10          | 8    | nonce           | random per request; a verdict carries its request's       |
//! | 18          | 8    | generation      | the claimant's current data generation (UUID)             |
//! | 26          | P    | pair            | the pair's name: which shared secret signs this           |
//! | 26 + P      | N    | node            | request: the sender; verdict: the node the grant is for   |
//! | 26 + P + N  | R    | resource        | the resource's name                                       |
//! | 26 + P+N+R  | 32   | tag             | HMAC-SHA256 over every byte before it, see below          |
//!
//! In a verdict `node` names the holder of the grant for `generation`: the asking node for
//! *granted*, another node for *held*, and the asking node again for *free* (nobody holds it).
//!
//! # Authentication
//!
//! `tag = HMAC-SHA256(secret, "twinblade-witness-v1" || every byte before the tag)`, with the
//! pair's shared secret. The witness reads the pair name before it believes anything else, to
//! pick the secret; [`WitnessRepr::parse_authenticated`] checks the tag before returning any
//! field. The domain prefix keeps heartbeat and handshake tags from passing as witness tags.
//! A replayed claim asks again for what its sender already asked: the witness's answer to it
//! cannot change who holds a generation, so no sequence number is needed; a node believes a
//! verdict only if it echoes the nonce of a request it sent.

use super::{need, Error};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `TBWT`.
pub const MAGIC: [u8; 4] = *b"TBWT";
/// The only version this build speaks.
pub const VERSION: u8 = 1;
/// The longest pair, node or resource name a datagram carries.
pub const MAX_NAME_LEN: usize = 64;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Length of everything before the names.
pub const FIXED_LEN: usize = field::NAMES_START;
/// Length of the longest witness datagram.
pub const MAX_LEN: usize = FIXED_LEN + 3 * MAX_NAME_LEN + TAG_LEN;

/// Domain separation: no other twinblade MAC can be mistaken for a witness tag.
const DOMAIN: &[u8] = b"twinblade-witness-v1";

/// Byte offsets of the fixed part.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const VERDICT: usize = 6;
    pub const PAIR_LEN: usize = 7;
    pub const NODE_LEN: usize = 8;
    pub const RESOURCE_LEN: usize = 9;
    pub const NONCE: Range<usize> = 10..18;
    pub const GENERATION: Range<usize> = 18..26;
    pub const NAMES_START: usize = 26;
}

/// What a witness datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 1: "let me serve this resource alone, from this generation on".
    Claim,
    /// 2: "who may serve this resource alone from this generation?" (changes nothing).
    Query,
    /// 3: the witness's answer to a claim or a query.
    Verdict(Verdict),
}

/// The witness's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// 1: the asking node holds the grant for the generation (given now or before).
    Granted,
    /// 2: another node holds it (named in the verdict).
    Held,
    /// 3: nobody holds it (the answer to a query only).
    Free,
}

impl Verdict {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Verdict::Granted => 1,
            Verdict::Held => 2,
            Verdict::Free => 3,
        }
    }

    /// The verdict of a wire code.
    pub fn from_code(code: u8) -> Result<Verdict, Error> {
        match code {
            1 => Ok(Verdict::Granted),
            2 => Ok(Verdict::Held),
            3 => Ok(Verdict::Free),
            _ => Err(Error::Malformed { field: "verdict" }),
        }
    }
}

impl Kind {
    /// The (kind, verdict) wire codes.
    pub fn codes(self) -> (u8, u8) {
        match self {
            Kind::Claim => (1, 0),
            Kind::Query => (2, 0),
            Kind::Verdict(verdict) => (3, verdict.code()),
        }
    }

    /// The kind of a pair of wire codes: a request carries verdict 0, a verdict a known one.
    pub fn from_codes(kind: u8, verdict: u8) -> Result<Kind, Error> {
        match (kind, verdict) {
            (1, 0) => Ok(Kind::Claim),
            (2, 0) => Ok(Kind::Query),
            (3, code) => Ok(Kind::Verdict(Verdict::from_code(code)?)),
            (1 | 2, _) => Err(Error::Malformed { field: "verdict" }),
            _ => Err(Error::Malformed { field: "kind" }),
        }
    }
}

/// The tag does not verify: wrong secret, or the datagram was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("witness tag does not verify (wrong secret or altered datagram)")]
pub struct BadTag;

/// Why a received witness datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WitnessWireError {
    /// The bytes are not a well-formed witness datagram.
    #[error(transparent)]
    Wire(#[from] Error),
    /// The bytes are well formed but not signed with the pair's secret.
    #[error(transparent)]
    BadTag(#[from] BadTag),
}

/// A view of one witness datagram.
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

    /// Wraps a buffer after checking its length against the name lengths it announces.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the buffer holds exactly one datagram: the fixed part, three names of allowed
    /// lengths, the tag, and nothing after it.
    pub fn check_len(&self) -> Result<(), Error> {
        let have = self.buffer.as_ref().len();
        need(FIXED_LEN, have)?;
        for (len, name) in [
            (self.pair_len(), "pair length"),
            (self.node_len(), "node length"),
            (self.resource_len(), "resource length"),
        ] {
            if len == 0 || len > MAX_NAME_LEN {
                return Err(Error::Malformed { field: name });
            }
        }
        need(self.total_len(), have)?;
        if have > self.total_len() {
            return Err(Error::Malformed { field: "length" });
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn u64_at(&self, range: std::ops::Range<usize>) -> u64 {
        u64::from_be_bytes(self.bytes()[range].try_into().expect("8-byte field"))
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.bytes()[field::MAGIC].try_into().expect("4-byte field")
    }

    /// The version byte.
    pub fn version(&self) -> u8 {
        self.bytes()[field::VERSION]
    }

    /// The kind and verdict codes.
    pub fn codes(&self) -> (u8, u8) {
        (self.bytes()[field::KIND], self.bytes()[field::VERDICT])
    }

    fn pair_len(&self) -> usize {
        usize::from(self.bytes()[field::PAIR_LEN])
    }

    fn node_len(&self) -> usize {
        usize::from(self.bytes()[field::NODE_LEN])
    }

    fn resource_len(&self) -> usize {
        usize::from(self.bytes()[field::RESOURCE_LEN])
    }

    /// The request's nonce.
    pub fn nonce(&self) -> u64 {
        self.u64_at(field::NONCE)
    }

    /// The data generation the datagram is about.
    pub fn generation(&self) -> u64 {
        self.u64_at(field::GENERATION)
    }

    /// The pair name (unauthenticated until [`verify`](Self::verify) passes: use it only to
    /// pick the secret).
    pub fn pair(&self) -> &[u8] {
        let start = field::NAMES_START;
        &self.bytes()[start..start + self.pair_len()]
    }

    /// The node name.
    pub fn node(&self) -> &[u8] {
        let start = field::NAMES_START + self.pair_len();
        &self.bytes()[start..start + self.node_len()]
    }

    /// The resource name.
    pub fn resource(&self) -> &[u8] {
        let start = field::NAMES_START + self.pair_len() + self.node_len();
        &self.bytes()[start..start + self.resource_len()]
    }

    fn tag_start(&self) -> usize {
        field::NAMES_START + self.pair_len() + self.node_len() + self.resource_len()
    }

    /// The tag.
    pub fn tag(&self) -> &[u8] {
        &self.bytes()[self.tag_start()..self.total_len()]
    }

    /// The length of the datagram the header announces.
    pub fn total_len(&self) -> usize {
        self.tag_start() + TAG_LEN
    }

    /// Checks the tag against `secret`, in constant time.
    pub fn verify(&self, secret: &[u8]) -> Result<(), BadTag> {
        tag_mac(secret, &self.bytes()[..self.tag_start()])
            .verify_slice(self.tag())
            .map_err(|_| BadTag)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the tag for `secret` over the bytes before it.
    pub fn sign(&mut self, secret: &[u8]) {
        let start = self.tag_start();
        let tag = tag_mac(secret, &self.bytes()[..start])
            .finalize()
            .into_bytes();
        let end = self.total_len();
        self.buffer.as_mut()[start..end].copy_from_slice(&tag);
    }
}

fn tag_mac(secret: &[u8], signed: &[u8]) -> Hmac<Sha256> {
    super::domain_mac(DOMAIN, secret, signed)
}

/// The meaning of one witness datagram (everything but the tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessRepr {
    /// Claim, query or verdict.
    pub kind: Kind,
    /// Random per request; a verdict echoes its request's.
    pub nonce: u64,
    /// The data generation the request starts from.
    pub generation: u64,
    /// The pair's name, 1..=[`MAX_NAME_LEN`] bytes.
    pub pair: String,
    /// The sender of a request, or the node a verdict's grant is for.
    pub node: String,
    /// The resource.
    pub resource: String,
}

impl WitnessRepr {
    /// Parses a datagram's fields **without** checking its tag: use
    /// [`parse_authenticated`](Self::parse_authenticated) for anything received.
    pub fn parse(bytes: &[u8]) -> Result<WitnessRepr, Error> {
        let packet = Packet::new_checked(bytes)?;
        if packet.magic() != MAGIC {
            return Err(Error::Malformed { field: "magic" });
        }
        if packet.version() != VERSION {
            return Err(Error::Malformed { field: "version" });
        }
        let (kind, verdict) = packet.codes();
        let text = |bytes: &[u8], field: &'static str| {
            std::str::from_utf8(bytes)
                .map(str::to_string)
                .map_err(|_| Error::Malformed { field })
        };
        Ok(WitnessRepr {
            kind: Kind::from_codes(kind, verdict)?,
            nonce: packet.nonce(),
            generation: packet.generation(),
            pair: text(packet.pair(), "pair")?,
            node: text(packet.node(), "node")?,
            resource: text(packet.resource(), "resource")?,
        })
    }

    /// Parses a received datagram, believing nothing in it until its tag verifies.
    pub fn parse_authenticated(
        bytes: &[u8],
        secret: &[u8],
    ) -> Result<WitnessRepr, WitnessWireError> {
        Packet::new_checked(bytes)?.verify(secret)?;
        Ok(Self::parse(bytes)?)
    }

    /// The names as emitted: each cut to [`MAX_NAME_LEN`] bytes.
    fn emitted_names(&self) -> [&[u8]; 3] {
        [&self.pair, &self.node, &self.resource].map(|name| {
            let bytes = name.as_bytes();
            &bytes[..bytes.len().min(MAX_NAME_LEN)]
        })
    }

    /// The datagram's length, tag included.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.emitted_names().iter().map(|n| n.len()).sum::<usize>() + TAG_LEN
    }

    /// Writes the fields into `buf` (at least [`buffer_len`](Self::buffer_len) bytes) and
    /// zeroes the tag. Names longer than [`MAX_NAME_LEN`] are cut (the configuration refuses
    /// them first); an empty one makes a datagram the receiver refuses. Never panics.
    pub fn emit(&self, buf: &mut [u8]) {
        let [pair, node, resource] = self.emitted_names();
        let (kind, verdict) = self.kind.codes();
        buf[field::MAGIC].copy_from_slice(&MAGIC);
        buf[field::VERSION] = VERSION;
        buf[field::KIND] = kind;
        buf[field::VERDICT] = verdict;
        buf[field::PAIR_LEN] = pair.len() as u8;
        buf[field::NODE_LEN] = node.len() as u8;
        buf[field::RESOURCE_LEN] = resource.len() as u8;
        buf[field::NONCE].copy_from_slice(&self.nonce.to_be_bytes());
        buf[field::GENERATION].copy_from_slice(&self.generation.to_be_bytes());
        let mut at = field::NAMES_START;
        for name in [pair, node, resource] {
            buf[at..at + name.len()].copy_from_slice(name);
            at += name.len();
        }
        buf[at..at + TAG_LEN].fill(0);
    }

    /// The signed datagram as a new vector.
    pub fn to_signed_vec(&self, secret: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; self.buffer_len()];
        self.emit(&mut buf);
        Packet::new_unchecked(&mut buf[..]).sign(secret);
        buf
    }
}

/// The fuzz target's body (with [`crate::ha::witness::fuzz_book`]): parsing any bytes must
/// refuse or round-trip, never panic; the format has one encoding per meaning, so re-emitting
/// gives back the input's signed bytes; verifying must not panic.
pub fn fuzz_parse(data: &[u8]) {
    const SECRET: &[u8] = b"fuzz secret";
    if let Ok(packet) = Packet::new_checked(data) {
        let _ = packet.verify(SECRET);
        let _ = (packet.pair(), packet.node(), packet.resource());
    }
    if let Ok(repr) = WitnessRepr::parse(data) {
        let signed = repr.to_signed_vec(SECRET);
        assert_eq!(signed.len(), data.len());
        assert_eq!(
            signed[..signed.len() - TAG_LEN],
            data[..data.len() - TAG_LEN],
            "one encoding per meaning"
        );
        assert_eq!(
            WitnessRepr::parse_authenticated(&signed, SECRET).as_ref(),
            Ok(&repr),
            "round trip"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn claim() -> WitnessRepr {
        WitnessRepr {
            kind: Kind::Claim,
            nonce: 0x0102_0304_0506_0708,
            generation: 0x1111_2222_3333_4444,
            pair: "lab".into(),
            node: "beta".into(),
            resource: "r0".into(),
        }
    }

    #[test]
    fn emits_the_documented_layout() {
        let bytes = claim().to_signed_vec(SECRET);
        assert_eq!(&bytes[0..4], b"TBWT");
        assert_eq!(bytes[4..10], [1, 1, 0, 3, 4, 2]);
        assert_eq!(bytes[10..18], 0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(bytes[18..26], 0x1111_2222_3333_4444u64.to_be_bytes());
        assert_eq!(&bytes[26..35], b"labbetar0");
        assert_eq!(bytes.len(), 26 + 9 + TAG_LEN);
    }

    #[test]
    fn a_verdict_round_trips_and_carries_the_holder() {
        let verdict = WitnessRepr {
            kind: Kind::Verdict(Verdict::Held),
            node: "alpha".into(),
            ..claim()
        };
        let bytes = verdict.to_signed_vec(SECRET);
        assert_eq!(bytes[5..7], [3, 2]);
        assert_eq!(
            WitnessRepr::parse_authenticated(&bytes, SECRET),
            Ok(verdict)
        );
    }

    #[test]
    fn refuses_malformed_datagrams() {
        let good = claim().to_signed_vec(SECRET);
        let malformed = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            Packet::new_unchecked(&mut bytes[..]).sign(SECRET);
            WitnessRepr::parse_authenticated(&bytes, SECRET)
        };
        assert!(matches!(
            malformed(0, b'X'),
            Err(WitnessWireError::Wire(Error::Malformed { field: "magic" }))
        ));
        assert!(matches!(
            malformed(4, 2),
            Err(WitnessWireError::Wire(Error::Malformed {
                field: "version"
            }))
        ));
        assert!(matches!(
            malformed(5, 9),
            Err(WitnessWireError::Wire(Error::Malformed { field: "kind" }))
        ));
        assert!(matches!(
            malformed(6, 1),
            Err(WitnessWireError::Wire(Error::Malformed {
                field: "verdict"
            }))
        ));
        let mut bad_verdict = good.clone();
        bad_verdict[5] = 3;
        bad_verdict[6] = 7;
        Packet::new_unchecked(&mut bad_verdict[..]).sign(SECRET);
        assert!(WitnessRepr::parse_authenticated(&bad_verdict, SECRET).is_err());
        let mut zero_name = good.clone();
        zero_name[7] = 0;
        assert!(matches!(
            WitnessRepr::parse(&zero_name),
            Err(Error::Malformed {
                field: "pair length"
            })
        ));
        assert!(matches!(
            WitnessRepr::parse(&good[..good.len() - 1]),
            Err(Error::Truncated { .. })
        ));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            WitnessRepr::parse(&longer),
            Err(Error::Malformed { field: "length" })
        ));
        let mut not_utf8 = good.clone();
        not_utf8[26] = 0xff;
        Packet::new_unchecked(&mut not_utf8[..]).sign(SECRET);
        assert!(WitnessRepr::parse_authenticated(&not_utf8, SECRET).is_err());
    }

    #[test]
    fn a_wrong_secret_or_an_altered_byte_fails_the_tag() {
        let good = claim().to_signed_vec(SECRET);
        assert_eq!(
            WitnessRepr::parse_authenticated(&good, b"other secret"),
            Err(WitnessWireError::BadTag(BadTag))
        );
        for at in 0..good.len() {
            let mut altered = good.clone();
            altered[at] ^= 0x01;
            assert!(
                WitnessRepr::parse_authenticated(&altered, SECRET).is_err(),
                "byte {at} altered and still accepted"
            );
        }
    }

    #[test]
    fn a_heartbeat_tag_does_not_pass_as_a_witness_tag() {
        let mut bytes = claim().to_signed_vec(SECRET);
        let start = bytes.len() - TAG_LEN;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).unwrap();
        mac.update(b"twinblade-heartbeat-v1");
        mac.update(&bytes[..start]);
        bytes[start..].copy_from_slice(&mac.finalize().into_bytes());
        assert!(WitnessRepr::parse_authenticated(&bytes, SECRET).is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9ä-]{1,20}"
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Claim),
            Just(Kind::Query),
            Just(Kind::Verdict(Verdict::Granted)),
            Just(Kind::Verdict(Verdict::Held)),
            Just(Kind::Verdict(Verdict::Free)),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(kind in kind(), nonce: u64, generation: u64, pair in name(), node in name(), resource in name()) {
            let repr = WitnessRepr { kind, nonce, generation, pair, node, resource };
            let bytes = repr.to_signed_vec(SECRET);
            prop_assert_eq!(bytes.len(), repr.buffer_len());
            prop_assert_eq!(WitnessRepr::parse_authenticated(&bytes, SECRET), Ok(repr));
        }

        #[test]
        fn any_bytes_refuse_or_round_trip(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_parse(&data);
        }
    }
}
