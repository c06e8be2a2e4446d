//! The connection handshake: [`HelloRepr`] (versions, nonce, name), [`AuthChallengeRepr`] and
//! [`AuthResponseRepr`], [`ParametersRepr`] with [`ReplProtocol`], [`Durability`] and the
//! [`ChecksumAlg`](super::ChecksumAlg), and
//! [`UuidsRepr`] with the `UUID_FLAG_*` bits.

use super::{
    ensure, exact, need, rd16, rd32, rd64, wr16, wr32, wr64, ChecksumAlg, DiskState, Error, Role,
    MAC_LEN, MAX_NAME_LEN, NONCE_LEN,
};
use crate::cluster::state::wire_enum;

wire_enum! {
    /// When a write counts as replicated (DRBD's protocols).
    ReplProtocol {
        /// Local disk plus the TCP send buffer.
        A = 1, "A";
        /// Local disk plus the peer's receipt ([`AckKind::Received`](super::AckKind::Received)).
        B = 2, "B";
        /// Local disk plus the peer's disk ([`AckKind::Completed`](super::AckKind::Completed)).
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
    /// Block digest of checksum-based resync and verify (must be the same on both nodes).
    pub checksum_alg: ChecksumAlg,
}

impl ParametersRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 17)?;
        Ok(ParametersRepr {
            size: rd64(p, 0),
            protocol: ReplProtocol::from_code(p[8])?,
            durability: Durability::from_code(p[9])?,
            role: Role::from_code(p[10])?,
            disk: DiskState::from_code(p[11])?,
            max_write: rd32(p, 12),
            checksum_alg: ChecksumAlg::from_code(p[16])?,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        17
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.size);
        p[8] = self.protocol.code();
        p[9] = self.durability.code();
        p[10] = self.role.code();
        p[11] = self.disk.code();
        wr32(p, 12, self.max_write);
        p[16] = self.checksum_alg.code();
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn literal_parameters_carry_the_checksum_algorithm() {
        let mut p = Vec::new();
        p.extend_from_slice(&(1u64 << 30).to_be_bytes()); // 1 GiB
        p.extend_from_slice(&[3, 1, 2, 4]); // C, power, Secondary, UpToDate
        p.extend_from_slice(&(1u32 << 20).to_be_bytes());
        p.push(3); // blake3
        let params = ParametersRepr::parse(&p).unwrap();
        assert_eq!(
            params,
            ParametersRepr {
                size: 1 << 30,
                protocol: ReplProtocol::C,
                durability: Durability::Power,
                role: Role::Secondary,
                disk: DiskState::UpToDate,
                max_write: 1 << 20,
                checksum_alg: ChecksumAlg::Blake3,
            }
        );
        let mut out = vec![0u8; params.buffer_len()];
        params.emit(&mut out);
        assert_eq!(out, p);
        // Without the algorithm (a 16-byte payload) or with an unknown one: refused.
        assert!(ParametersRepr::parse(&p[..16]).is_err());
        p[16] = 0;
        assert!(ParametersRepr::parse(&p).is_err());
    }
}
