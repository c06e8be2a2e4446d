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
//!
//! The gate also measures how long it has been shut since it was last open, for the
//! `on-no-quorum` policy ([`super::quorum`]): [`ServeGate::failing`] says when requests held
//! behind it should fail rather than wait (NBD only; see there).

use super::clock::{nanos_at, now_nanos, LeaseClock};
use super::quorum::OnNoQuorum;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

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
    /// When the authority last changed, except that a closed gate closing again changes
    /// nothing ([`NEVER`]: it was never open).
    changed_at: AtomicU64,
    policy: Mutex<OnNoQuorum>,
}

/// `changed_at` of a gate that has never been open.
const NEVER: u64 = u64::MAX;

impl ServeGate {
    /// A closed gate that, once set to [`Authority::Lease`], follows `lease`.
    pub fn new(lease: LeaseClock) -> Arc<ServeGate> {
        Arc::new(ServeGate {
            authority: AtomicU8::new(Authority::Closed.code()),
            lease,
            changed_at: AtomicU64::new(NEVER),
            policy: Mutex::new(OnNoQuorum::SuspendIo),
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
        self.set_at(authority, now_nanos());
    }

    /// [`ServeGate::set`] at `now` (process-epoch nanoseconds).
    fn set_at(&self, authority: Authority, now: u64) {
        let before = self.authority.swap(authority.code(), Ordering::AcqRel);
        let never_open = self.changed_at.load(Ordering::Acquire) == NEVER;
        if before != authority.code() && !(never_open && authority == Authority::Closed) {
            self.changed_at.store(now, Ordering::Release);
        }
    }

    /// What requests held behind the shut gate do (`on-no-quorum`; a new gate suspends).
    pub fn set_on_no_quorum(&self, policy: OnNoQuorum) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// The `on-no-quorum` policy.
    pub fn on_no_quorum(&self) -> OnNoQuorum {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the gate has been shut at `now` since it was last open: `None` while it is
    /// open, or if it has never been open.
    pub fn shut_for(&self, now: u64) -> Option<Duration> {
        let changed = self.changed_at.load(Ordering::Acquire);
        let since = match self.authority() {
            Authority::Open => return None,
            Authority::Closed if changed == NEVER => return None,
            Authority::Closed => changed,
            Authority::Lease if self.lease.valid_at(now) => return None,
            Authority::Lease => {
                let until = self.lease.until().map_or(0, nanos_at);
                until.max(if changed == NEVER { now } else { changed })
            }
        };
        Some(Duration::from_nanos(now.saturating_sub(since)))
    }

    /// Have requests been held long enough that they should fail (`on-no-quorum = io-error`,
    /// the gate shut for `on-no-quorum-timeout`)? Cheap while the gate is open.
    pub fn failing(&self) -> bool {
        if self.authority() == Authority::Open {
            return false;
        }
        self.failing_at(now_nanos())
    }

    /// [`ServeGate::failing`] at `now`.
    pub fn failing_at(&self, now: u64) -> bool {
        self.shut_for(now)
            .is_some_and(|shut| self.on_no_quorum().fails(shut))
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

    #[test]
    fn a_gate_fails_requests_only_after_the_bound_from_when_it_shut() {
        let s = |n: u64| n * 1_000_000_000;
        let gate = ServeGate::new(LeaseClock::new());
        gate.set_on_no_quorum(OnNoQuorum::IoError {
            after: Duration::from_secs(3),
        });
        // Never open (a secondary): nothing is measured, nothing fails.
        gate.set_at(Authority::Closed, s(1));
        assert_eq!(gate.shut_for(s(100)), None);
        assert!(!gate.failing_at(s(100)));
        // Open, then shut at 10 s: fails from 13 s on; closing again does not restart it.
        gate.set_at(Authority::Open, s(5));
        assert!(!gate.failing_at(s(100)));
        gate.set_at(Authority::Closed, s(10));
        gate.set_at(Authority::Closed, s(12));
        assert_eq!(gate.shut_for(s(12)), Some(Duration::from_secs(2)));
        assert!(!gate.failing_at(s(12)));
        assert!(gate.failing_at(s(13)));
        // Open again: nothing fails; under a lease that runs out, counted from its end.
        gate.set_at(Authority::Open, s(20));
        assert!(!gate.failing_at(s(30)));
        gate.set_at(Authority::Lease, s(30));
        gate.lease()
            .renew_until(crate::ha::clock::instant_at(s(40)));
        assert!(!gate.failing_at(s(39)));
        assert_eq!(gate.shut_for(s(41)), Some(Duration::from_secs(1)));
        assert!(!gate.failing_at(s(42)));
        assert!(gate.failing_at(s(43)));
        // suspend-io: never.
        gate.set_on_no_quorum(OnNoQuorum::SuspendIo);
        assert!(!gate.failing_at(s(1000)));
        assert!(!ServeGate::always_open().failing());
    }
}
