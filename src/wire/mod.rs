//! Every byte format twinblade speaks or stores, as typed views over byte buffers.
//!
//! This module owns parsing and emitting and nothing else: no sockets, no files, no tokio.
//! The pattern follows smoltcp's `wire` module:
//!
//! * A view such as [`aoe::Frame<T>`] wraps a buffer `T: AsRef<[u8]>` and reads fields in place;
//!   setters need `T: AsMut<[u8]>`.
//! * `new_checked` validates lengths first. **Anything read from the network or a disk goes
//!   through `new_checked`**; `new_unchecked` is for buffers we built ourselves.
//! * A `Repr` (e.g. [`aoe::HeaderRepr`]) is the parsed, owned meaning of a view, with `parse`,
//!   `buffer_len` and `emit`. `emit` never panics on a buffer of at least `buffer_len()` bytes.
//!
//! Every parser has tests against literal bytes, a round-trip property test
//! (`parse(emit(r)) == r`) and a cargo-fuzz target (see `src/fuzz/`).

pub mod aoe;
pub mod arp;
pub mod heartbeat;
pub mod nbd;
pub mod ondisk;
pub mod repl;
pub mod witness;

use std::fmt;
use std::str::FromStr;

/// Why a buffer could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The buffer is shorter than the structure it should hold.
    #[error("truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes the buffer holds.
        have: usize,
    },
    /// A field holds a value the format does not allow.
    #[error("malformed field {field}")]
    Malformed {
        /// Name of the offending field.
        field: &'static str,
    },
}

/// HMAC-SHA256 keyed with `secret` over `domain` then `signed`: the tag of every signed
/// datagram (heartbeat, witness). The domain keeps one format's tag from passing as another's.
pub(crate) fn domain_mac(domain: &[u8], secret: &[u8], signed: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret)
        .expect("HMAC accepts keys of any length");
    mac.update(domain);
    mac.update(signed);
    mac
}

/// Checks that `have` bytes are at least `needed`.
pub(crate) fn need(needed: usize, have: usize) -> Result<(), Error> {
    if have < needed {
        Err(Error::Truncated { needed, have })
    } else {
        Ok(())
    }
}

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Reads a MAC from the first six bytes of `bytes`.
    ///
    /// Panics if `bytes` is shorter than six bytes; views check lengths before calling this.
    pub fn from_bytes(bytes: &[u8]) -> MacAddr {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[..6]);
        MacAddr(mac)
    }

    /// Whether this is the broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex pairs, optionally separated by ':' or '-'")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Accepts `00:11:22:33:44:55`, `00-11-22-33-44-55` and `001122334455` (vblade's `-m` form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(s.to_string());
        let pairs: Vec<&str> = if s.contains(':') || s.contains('-') {
            s.split([':', '-']).collect()
        } else if s.len() == 12 && s.is_ascii() {
            (0..6).map(|i| &s[2 * i..2 * i + 2]).collect()
        } else {
            return Err(bad());
        };
        if pairs.len() != 6 || pairs.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, pair) in mac.iter_mut().zip(pairs) {
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_common_forms() {
        let want = MacAddr([0x00, 0x11, 0x22, 0xaa, 0xbb, 0xcc]);
        assert_eq!("00:11:22:aa:bb:cc".parse::<MacAddr>().unwrap(), want);
        assert_eq!("00-11-22-AA-BB-CC".parse::<MacAddr>().unwrap(), want);
        assert_eq!("001122aabbcc".parse::<MacAddr>().unwrap(), want);
        assert_eq!(want.to_string(), "00:11:22:aa:bb:cc");
    }

    #[test]
    fn mac_rejects_garbage() {
        for bad in [
            "",
            "00:11:22:33:44",
            "00:11:22:33:44:55:66",
            "zz:11:22:33:44:55",
            "0:11:22:33:44:555",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }
}
