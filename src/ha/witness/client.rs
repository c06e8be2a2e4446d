//! A node's side of the witness: one claim or query, sent again until a verdict arrives or the
//! tries run out. A verdict is believed only if its tag verifies with the pair's secret, it
//! comes from the witness's address, echoes the nonce this call chose, and is about the same
//! pair, resource and generation; anything else is ignored, so a forged or replayed verdict
//! can at worst make the node wait out its timeout ("unreachable"), never serve.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::wire::witness::{Kind, Verdict, WitnessRepr, MAX_LEN};

/// What a node asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// `true` to claim the grant, `false` to ask who holds it.
    pub claim: bool,
    /// The pair's name (`[cluster] name`), which picks the secret at the witness.
    pub pair: &'a str,
    /// This node.
    pub node: &'a str,
    /// The resource.
    pub resource: &'a str,
    /// This node's current data generation.
    pub generation: u64,
}

/// The witness's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Granted to this node, held by another, or free (queries only).
    pub verdict: Verdict,
    /// Who holds the grant (this node when granted or free).
    pub holder: String,
}

/// Why no verdict came.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The local socket failed.
    #[error("witness socket: {0}")]
    Socket(#[from] io::Error),
    /// No acceptable verdict within the tries.
    #[error("no answer from the witness at {witness} after {tries} tries")]
    Unreachable {
        /// The witness asked.
        witness: SocketAddr,
        /// Datagrams sent.
        tries: u32,
    },
}

/// Asks `witness` and waits up to `per_try` for each of `tries` sends.
pub fn ask(
    witness: SocketAddr,
    secret: &[u8],
    request: &Request<'_>,
    per_try: Duration,
    tries: u32,
) -> Result<Answer, AskError> {
    let local: SocketAddr = if witness.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    let nonce: u64 = rand::random();
    let sent = WitnessRepr {
        kind: if request.claim {
            Kind::Claim
        } else {
            Kind::Query
        },
        nonce,
        generation: request.generation,
        pair: request.pair.to_string(),
        node: request.node.to_string(),
        resource: request.resource.to_string(),
    };
    let datagram = sent.to_signed_vec(secret);
    let mut buf = vec![0u8; MAX_LEN + 1];
    for _ in 0..tries.max(1) {
        socket.send_to(&datagram, witness)?;
        let deadline = Instant::now() + per_try;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        // Nobody listens there yet: wait out this try rather than spin.
                        std::thread::sleep(left);
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if from != witness {
                continue;
            }
            if let Some(answer) = believe(&buf[..len], secret, &sent) {
                return Ok(answer);
            }
        }
    }
    Err(AskError::Unreachable {
        witness,
        tries: tries.max(1),
    })
}

/// The answer in `bytes` if it is a verdict on `sent`, signed with `secret`.
fn believe(bytes: &[u8], secret: &[u8], sent: &WitnessRepr) -> Option<Answer> {
    let verdict = WitnessRepr::parse_authenticated(bytes, secret).ok()?;
    let Kind::Verdict(outcome) = verdict.kind else {
        return None;
    };
    let same = verdict.nonce == sent.nonce
        && verdict.generation == sent.generation
        && verdict.pair == sent.pair
        && verdict.resource == sent.resource;
    let consistent = match outcome {
        Verdict::Granted | Verdict::Free => verdict.node == sent.node,
        // A claim of ours is granted, never "held" by us; a query may hear that we hold it.
        Verdict::Held => sent.kind == Kind::Query || verdict.node != sent.node,
    };
    let fits_the_question = matches!(
        (sent.kind, outcome),
        (Kind::Claim, Verdict::Granted | Verdict::Held)
            | (Kind::Query, Verdict::Held | Verdict::Free)
    );
    (same && consistent && fits_the_question).then_some(Answer {
        verdict: outcome,
        holder: verdict.node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent() -> WitnessRepr {
        WitnessRepr {
            kind: Kind::Claim,
            nonce: 42,
            generation: 7,
            pair: "lab".into(),
            node: "beta".into(),
            resource: "r0".into(),
        }
    }

    #[test]
    fn only_a_verdict_on_our_own_question_is_believed() {
        let secret = b"s3cret";
        let verdict = |change: &dyn Fn(&mut WitnessRepr)| {
            let mut v = WitnessRepr {
                kind: Kind::Verdict(Verdict::Held),
                node: "alpha".into(),
                ..sent()
            };
            change(&mut v);
            v.to_signed_vec(secret)
        };
        let held = believe(&verdict(&|_| {}), secret, &sent()).expect("a good verdict");
        assert_eq!(
            (held.verdict, held.holder.as_str()),
            (Verdict::Held, "alpha")
        );
        assert!(believe(&verdict(&|v| v.nonce = 43), secret, &sent()).is_none());
        assert!(believe(&verdict(&|v| v.generation = 8), secret, &sent()).is_none());
        assert!(believe(&verdict(&|v| v.resource = "r1".into()), secret, &sent()).is_none());
        assert!(believe(&verdict(&|v| v.kind = Kind::Claim), secret, &sent()).is_none());
        // "Granted" must name us, "held" somebody else; a claim is never answered "free".
        assert!(believe(
            &verdict(&|v| v.kind = Kind::Verdict(Verdict::Granted)),
            secret,
            &sent()
        )
        .is_none());
        assert!(believe(&verdict(&|v| v.node = "beta".into()), secret, &sent()).is_none());
        assert!(believe(
            &verdict(&|v| {
                v.kind = Kind::Verdict(Verdict::Free);
                v.node = "beta".into();
            }),
            secret,
            &sent()
        )
        .is_none());
        assert!(believe(&verdict(&|_| {}), b"other", &sent()).is_none());
        // A query hears who holds the generation, ourselves included.
        let query = WitnessRepr {
            kind: Kind::Query,
            ..sent()
        };
        let ours = believe(&verdict(&|v| v.node = "beta".into()), secret, &query);
        assert_eq!(
            ours.map(|a| (a.verdict, a.holder)),
            Some((Verdict::Held, "beta".into()))
        );
        assert!(believe(
            &verdict(&|v| v.kind = Kind::Verdict(Verdict::Granted)),
            secret,
            &query
        )
        .is_none());
    }
}
