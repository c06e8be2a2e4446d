//! Peer authentication: HMAC-SHA256 challenge-response over the shared secret.
//!
//! This module owns what the MAC covers and how it is checked; the messages are
//! [`AuthChallengeRepr`] and [`AuthResponseRepr`] in [`crate::wire::repl`].
//!
//! # Exchange
//!
//! After both [`Hello`](crate::wire::repl::HelloRepr)s (which carry the node names), each side
//! sends an `AuthChallenge` with a **fresh random nonce** and answers the peer's challenge with
//!
//! ```text
//! HMAC-SHA256(secret, "twinblade-repl-auth-v1" || len16(challenger name) || challenger name
//!                     || challenger nonce || len16(responder name) || responder name
//!                     || responder nonce)
//! ```
//!
//! where "challenger" is the side that verifies this response. Then each side sends `AuthOk` or
//! `AuthFail` and, on failure, closes the connection.
//!
//! Why this is safe:
//! * **Both nonces** are inside every MAC, so a response recorded on an earlier connection does
//!   not verify on a new one: the verifier's fresh nonce differs.
//! * **Roles are ordered** (challenger first), so a man in the middle cannot bounce our own
//!   challenge back at us and replay our answer as the peer's: the names swap places and the
//!   MAC changes. A peer challenge equal to our own nonce is refused outright.
//! * The tag is compared in constant time (`hmac`'s `verify_slice`).
//! * The secret never crosses the wire.

use crate::wire::repl::{
    AuthChallengeRepr, AuthResponseRepr, AUTH_HMAC_SHA256, MAC_LEN, NONCE_LEN,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A challenge nonce.
pub type Nonce = [u8; NONCE_LEN];
/// An HMAC-SHA256 tag.
pub type Tag = [u8; MAC_LEN];

/// Domain separation: no other twinblade MAC can be mistaken for an auth response.
const DOMAIN: &[u8] = b"twinblade-repl-auth-v1";

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The response does not match: wrong secret, replayed response, or a tampered exchange.
    #[error("peer's authentication response does not verify (wrong secret or replay)")]
    BadResponse,
    /// The peer's challenge repeats our own nonce (a reflection attempt).
    #[error("peer's challenge reuses our nonce")]
    ReflectedNonce,
    /// The peer asked for an algorithm we do not speak.
    #[error("unsupported authentication algorithm {0}")]
    UnsupportedAlgorithm(u8),
    /// A response arrived before the peer's challenge.
    #[error("response before challenge")]
    OutOfOrder,
    /// The configured shared secret is empty.
    #[error("the shared secret is empty")]
    EmptySecret,
}

/// One side of the exchange: a node name and the nonce that side sent as its challenge.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// Node name, as sent in Hello.
    pub name: &'a str,
    /// The nonce of this side's AuthChallenge.
    pub nonce: &'a Nonce,
}

fn mac_for(secret: &[u8], challenger: Party<'_>, responder: Party<'_>) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(DOMAIN);
    for party in [challenger, responder] {
        mac.update(&(party.name.len() as u16).to_be_bytes());
        mac.update(party.name.as_bytes());
        mac.update(party.nonce);
    }
    mac
}

/// The tag `responder` sends to prove it knows `secret` to `challenger`.
pub fn response_tag(secret: &[u8], challenger: Party<'_>, responder: Party<'_>) -> Tag {
    mac_for(secret, challenger, responder)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a tag received from `responder`, in constant time.
pub fn verify_tag(
    secret: &[u8],
    challenger: Party<'_>,
    responder: Party<'_>,
    tag: &[u8],
) -> Result<(), AuthError> {
    mac_for(secret, challenger, responder)
        .verify_slice(tag)
        .map_err(|_| AuthError::BadResponse)
}

/// A fresh random nonce.
pub fn fresh_nonce<R: rand::Rng + ?Sized>(rng: &mut R) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    nonce
}

/// One connection's authentication, from our side. Pure: the caller sends and receives the
/// messages.
///
/// ```text
/// let mut auth = Authenticator::new(secret, "alpha", fresh_nonce(&mut rng))?;
/// send(auth.challenge());
/// let theirs = recv AuthChallenge;            send(auth.respond("beta", &theirs)?);
/// let response = recv AuthResponse;           auth.verify(&response)  -> AuthOk / AuthFail
/// ```
#[derive(Clone)]
pub struct Authenticator {
    secret: Vec<u8>,
    local_name: String,
    local_nonce: Nonce,
    peer: Option<(String, Nonce)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("local_name", &self.local_name)
            .field("peer", &self.peer.as_ref().map(|p| &p.0))
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Starts an exchange with our name and a fresh nonce (never reuse one across connections).
    pub fn new(secret: &[u8], local_name: &str, local_nonce: Nonce) -> Result<Self, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        Ok(Authenticator {
            secret: secret.to_vec(),
            local_name: local_name.to_string(),
            local_nonce,
            peer: None,
        })
    }

    /// Our challenge, to send.
    pub fn challenge(&self) -> AuthChallengeRepr {
        AuthChallengeRepr {
            algorithm: AUTH_HMAC_SHA256,
            nonce: self.local_nonce,
        }
    }

    /// Answers the peer's challenge; `peer_name` is the name from the peer's Hello.
    pub fn respond(
        &mut self,
        peer_name: &str,
        challenge: &AuthChallengeRepr,
    ) -> Result<AuthResponseRepr, AuthError> {
        if challenge.algorithm != AUTH_HMAC_SHA256 {
            return Err(AuthError::UnsupportedAlgorithm(challenge.algorithm));
        }
        if challenge.nonce == self.local_nonce {
            return Err(AuthError::ReflectedNonce);
        }
        self.peer = Some((peer_name.to_string(), challenge.nonce));
        let peer = Party {
            name: peer_name,
            nonce: &challenge.nonce,
        };
        Ok(AuthResponseRepr {
            mac: response_tag(&self.secret, peer, self.local()),
        })
    }

    /// Verifies the peer's answer to our challenge. Call after [`Authenticator::respond`].
    pub fn verify(&self, response: &AuthResponseRepr) -> Result<(), AuthError> {
        let (name, nonce) = self.peer.as_ref().ok_or(AuthError::OutOfOrder)?;
        let peer = Party { name, nonce };
        verify_tag(&self.secret, self.local(), peer, &response.mac)
    }

    fn local(&self) -> Party<'_> {
        Party {
            name: &self.local_name,
            nonce: &self.local_nonce,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(secret_a: &[u8], secret_b: &[u8], na: u8, nb: u8) -> (Authenticator, Authenticator) {
        (
            Authenticator::new(secret_a, "alpha", [na; 32]).unwrap(),
            Authenticator::new(secret_b, "beta", [nb; 32]).unwrap(),
        )
    }

    /// Runs the exchange; returns (alpha's verdict on beta, beta's verdict on alpha).
    fn exchange(a: &mut Authenticator, b: &mut Authenticator) -> (bool, bool) {
        let (ca, cb) = (a.challenge(), b.challenge());
        let ra = a.respond("beta", &cb).unwrap();
        let rb = b.respond("alpha", &ca).unwrap();
        (a.verify(&rb).is_ok(), b.verify(&ra).is_ok())
    }

    #[test]
    fn right_secret_passes() {
        let (mut a, mut b) = pair(b"s3cret", b"s3cret", 1, 2);
        assert_eq!(exchange(&mut a, &mut b), (true, true));
    }

    #[test]
    fn wrong_secret_fails_both_ways() {
        let (mut a, mut b) = pair(b"s3cret", b"guess", 1, 2);
        assert_eq!(exchange(&mut a, &mut b), (false, false));
    }

    #[test]
    fn replayed_response_with_another_nonce_fails() {
        // An eavesdropper records beta's response on one connection...
        let (mut a, mut b) = pair(b"s3cret", b"s3cret", 1, 2);
        let cb = b.challenge();
        let _ = a.respond("beta", &cb).unwrap();
        let recorded = b.respond("alpha", &a.challenge()).unwrap();
        assert!(a.verify(&recorded).is_ok());
        // ...and replays it to alpha on a new connection, where alpha picked a fresh nonce.
        // The attacker can even replay beta's old challenge: alpha's own nonce changed.
        let mut a2 = Authenticator::new(b"s3cret", "alpha", [7; 32]).unwrap();
        let _ = a2.respond("beta", &cb).unwrap();
        assert_eq!(a2.verify(&recorded), Err(AuthError::BadResponse));
    }

    #[test]
    fn reflection_is_refused() {
        let (mut a, _) = pair(b"s3cret", b"s3cret", 1, 2);
        // The attacker sends our own challenge back to us.
        assert_eq!(
            a.respond("beta", &a.challenge()),
            Err(AuthError::ReflectedNonce)
        );
        // Or a fresh challenge, then offers our answer to it as beta's answer to ours.
        let attacker = AuthChallengeRepr {
            algorithm: AUTH_HMAC_SHA256,
            nonce: [9; 32],
        };
        let ours = a.respond("beta", &attacker).unwrap();
        assert_eq!(a.verify(&ours), Err(AuthError::BadResponse));
    }

    #[test]
    fn names_are_bound() {
        let (mut a, mut b) = pair(b"s3cret", b"s3cret", 1, 2);
        let ra = a.respond("beta", &b.challenge()).unwrap();
        // beta believes it talks to "gamma": alpha's response does not verify.
        let _ = b.respond("gamma", &a.challenge()).unwrap();
        assert_eq!(b.verify(&ra), Err(AuthError::BadResponse));
    }

    #[test]
    fn misuse_is_reported() {
        assert_eq!(
            Authenticator::new(b"", "a", [0; 32]).unwrap_err(),
            AuthError::EmptySecret
        );
        let (a, b) = pair(b"k", b"k", 1, 2);
        let r = AuthResponseRepr { mac: [0; 32] };
        assert_eq!(a.verify(&r), Err(AuthError::OutOfOrder));
        let mut a = a;
        let bad = AuthChallengeRepr {
            algorithm: 2,
            ..b.challenge()
        };
        assert_eq!(
            a.respond("beta", &bad),
            Err(AuthError::UnsupportedAlgorithm(2))
        );
    }

    #[test]
    fn tag_is_stable() {
        // Pins the MAC construction: changing it breaks mixed-version clusters.
        let tag = response_tag(
            b"key",
            Party {
                name: "a",
                nonce: &[1; 32],
            },
            Party {
                name: "b",
                nonce: &[2; 32],
            },
        );
        let again = response_tag(
            b"key",
            Party {
                name: "a",
                nonce: &[1; 32],
            },
            Party {
                name: "b",
                nonce: &[2; 32],
            },
        );
        assert_eq!(tag, again);
        let swapped = response_tag(
            b"key",
            Party {
                name: "b",
                nonce: &[2; 32],
            },
            Party {
                name: "a",
                nonce: &[1; 32],
            },
        );
        assert_ne!(tag, swapped);
    }

    #[test]
    fn fresh_nonces_differ() {
        let mut rng = rand::rng();
        assert_ne!(fresh_nonce(&mut rng), fresh_nonce(&mut rng));
    }
}
