//! One monotonic clock for everything that decides who may serve: the heartbeat thread writes
//! lease expiries in it, the exports read them before every reply.
//!
//! Times are nanoseconds since a process-wide epoch on `CLOCK_MONOTONIC` (std's `Instant`),
//! which keeps counting while the process is stopped (SIGSTOP) and never jumps with NTP or
//! `settimeofday`: a node that wakes from a freeze sees at once how long it was gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process epoch, for `instant` (0 for instants before it).
pub fn nanos_at(instant: Instant) -> u64 {
    instant.saturating_duration_since(epoch()).as_nanos() as u64
}

/// Nanoseconds since the process epoch, now.
pub fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// The instant `nanos` after the process epoch.
pub fn instant_at(nanos: u64) -> Instant {
    epoch() + Duration::from_nanos(nanos)
}

/// A lease expiry shared between the thread that renews it and the threads that check it.
/// 0 means "no lease". Renewals only move it forward.
#[derive(Debug, Clone, Default)]
pub struct LeaseClock(Arc<AtomicU64>);

impl LeaseClock {
    /// A clock holding no lease.
    pub fn new() -> LeaseClock {
        LeaseClock::default()
    }

    /// Extends the lease to `until` if that is later than what it holds.
    pub fn renew_until(&self, until: Instant) {
        self.0.fetch_max(nanos_at(until), Ordering::AcqRel);
    }

    /// Drops the lease (a restart of the peer, a demotion): nothing granted before counts.
    pub fn revoke(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// When the lease ends; `None` if none was ever granted (or it was revoked).
    pub fn until(&self) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            nanos => Some(instant_at(nanos)),
        }
    }

    /// The lease holds now.
    pub fn valid(&self) -> bool {
        self.valid_at(now_nanos())
    }

    /// The lease holds at `nanos` (process-epoch nanoseconds).
    pub fn valid_at(&self, nanos: u64) -> bool {
        nanos < self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_it_ends_and_only_grows() {
        let lease = LeaseClock::new();
        assert!(!lease.valid());
        assert_eq!(lease.until(), None);
        let now = Instant::now();
        lease.renew_until(now + Duration::from_secs(60));
        assert!(lease.valid());
        lease.renew_until(now + Duration::from_secs(1)); // earlier: ignored
        assert!(lease.until().unwrap() >= now + Duration::from_secs(59));
        lease.revoke();
        assert!(!lease.valid());
        lease.renew_until(now - Duration::from_millis(1).min(now.elapsed()));
        assert!(!lease.valid());
    }
}
