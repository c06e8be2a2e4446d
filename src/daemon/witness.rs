//! The node's claims at the witness (`[cluster] witness`, see [`crate::ha::witness`]): run on
//! a thread of the resource's crew, never on the engine thread; the verdict comes back as an
//! input and the engine steps [`Event::WitnessAnswered`](crate::cluster::Event).

use std::net::SocketAddr;
use std::time::Duration;

use crate::cluster::{NodeName, WitnessVerdict};
use crate::ha::witness::{ask, Request};
use crate::wire::witness::Verdict;

/// Where the witness is and how this node is known there.
#[derive(Debug, Clone)]
pub struct WitnessSpec {
    /// The witness's address.
    pub addr: SocketAddr,
    /// The pair's name there (`[cluster] name`).
    pub pair: String,
    /// This node's name.
    pub node: String,
    /// The pair's shared secret.
    pub secret: Vec<u8>,
    /// How long each try waits.
    pub per_try: Duration,
    /// Tries before it counts as unreachable.
    pub tries: u32,
}

/// Claims `resource` from `generation` (or only asks who holds it, `claim == false`), waiting
/// for at most the tries. Anything but a believed verdict is "unreachable".
pub fn claim(spec: &WitnessSpec, resource: &str, generation: u64, claim: bool) -> WitnessVerdict {
    let request = Request {
        claim,
        pair: &spec.pair,
        node: &spec.node,
        resource,
        generation,
    };
    match ask(spec.addr, &spec.secret, &request, spec.per_try, spec.tries) {
        Ok(answer) => match answer.verdict {
            Verdict::Granted | Verdict::Free => WitnessVerdict::Granted,
            Verdict::Held => WitnessVerdict::Held(NodeName::new(&answer.holder)),
        },
        Err(e) => {
            tracing::warn!(resource = %resource, "witness: {e}");
            WitnessVerdict::Unreachable
        }
    }
}

/// How often an idle node asks the witness (a query, which changes nothing there), so that
/// status shows whether it is reachable before a failure needs it.
pub const POLL: Duration = Duration::from_secs(5);

/// A query for `generation`: whether the witness answered at all.
pub fn reachable(spec: &WitnessSpec, resource: &str, generation: u64) -> bool {
    let request = Request {
        claim: false,
        pair: &spec.pair,
        node: &spec.node,
        resource,
        generation,
    };
    ask(spec.addr, &spec.secret, &request, spec.per_try, spec.tries).is_ok()
}

/// A verdict as status shows it.
pub fn describe(generation: u64, verdict: WitnessVerdict) -> String {
    match verdict {
        WitnessVerdict::Granted => format!("granted generation {generation:016X}"),
        WitnessVerdict::Held(holder) => {
            format!("generation {generation:016X} held by {holder}")
        }
        WitnessVerdict::Unreachable => format!("unreachable (claiming {generation:016X})"),
    }
}
