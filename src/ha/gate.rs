//! [`ServeGate`]: whether this node may answer a client for one resource *right now*.
//!
//! The exports (AoE, NBD) ask [`ServeGate::may_answer`] immediately before every reply they
//! send — reads, writes, flushes, AoE config answers alike — and send nothing while it says no
//! (AoE drops the request, so the client retransmits; NBD holds the reply). The resource's
//! engine sets the gate's [`Authority`] from the cluster machine's decisions; the heartbeat
//! thread renews the [`LeaseClock`] it reads. See [`crate::cluster::machine`] for why a primary
//! that holds this gate open can never acknowledge a write the next primary will not have.
//!
//! The check is one atomic load and one monotonic clock read: cheap enough for every frame.

use super::clock::{now_nanos, LeaseClock};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// On what grounds this node answers clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// It does not (secondary, lease lapsed, waiting for the peer to be outdated).
    Closed,
    /// While the peer's lease holds: the peer heard us recently enough that it cannot have
    /// promoted itself.
    Lease,
    /// Unconditionally: nobody else can serve (the peer is Outdated, or this node passed the
    /// promotion gate alone), or there is no peer at all (the vblade front end).
    Open,
}

impl Authority {
    fn code(self) -> u8 {
        match self {
            Authority::Closed => 0,
            Authority::Lease => 1,
            Authority::Open => 2,
        }
    }

    fn from_code(code: u8) -> Authority {
        match code {
            1 => Authority::Lease,
            2 => Authority::Open,
            _ => Authority::Closed,
        }
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authority::Closed => "closed",
            Authority::Lease => "lease",
            Authority::Open => "open",
        })
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ServeGate {
    authority: AtomicU8,
    lease: LeaseClock,
}

impl ServeGate {
    /// A closed gate that, once set to [`Authority::Lease`], follows `lease`.
    pub fn new(lease: LeaseClock) -> Arc<ServeGate> {
        Arc::new(ServeGate {
            authority: AtomicU8::new(Authority::Closed.code()),
            lease,
        })
    }

    /// A gate that is always open: a standalone target with no peer (`twinblade vblade`).
    pub fn always_open() -> Arc<ServeGate> {
        let gate = ServeGate::new(LeaseClock::new());
        gate.set(Authority::Open);
        gate
    }

    /// Changes the grounds.
    pub fn set(&self, authority: Authority) {
        self.authority.store(authority.code(), Ordering::Release);
    }

    /// The current grounds.
    pub fn authority(&self) -> Authority {
        Authority::from_code(self.authority.load(Ordering::Acquire))
    }

    /// The lease this gate follows under [`Authority::Lease`].
    pub fn lease(&self) -> &LeaseClock {
        &self.lease
    }

    /// May a reply go out now? Ask immediately before sending it.
    pub fn may_answer(&self) -> bool {
        match self.authority() {
            Authority::Closed => false,
            Authority::Open => true,
            Authority::Lease => self.lease.valid_at(now_nanos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn the_gate_follows_its_authority_and_the_lease() {
        let lease = LeaseClock::new();
        let gate = ServeGate::new(lease.clone());
        assert!(!gate.may_answer());
        gate.set(Authority::Lease);
        assert!(!gate.may_answer(), "no lease granted yet");
        lease.renew_until(Instant::now() + Duration::from_secs(60));
        assert!(gate.may_answer());
        gate.set(Authority::Closed);
        assert!(!gate.may_answer());
        gate.set(Authority::Open);
        lease.revoke();
        assert!(gate.may_answer());
        assert!(ServeGate::always_open().may_answer());
    }
}
