//! Rate-limited, counted logging for anything the network can trigger.
//!
//! A malformed frame or a misbehaving client must not be able to flood the log (or slow the
//! target by making it log). Every such log site owns a [`LogLimiter`]: at most `burst`
//! messages per `interval` get through; the rest are counted, and the next message that gets
//! through says how many were suppressed. Counters next to the log sites keep exact totals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets at most `burst` events per `interval` through and counts the rest.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    burst: u32,
    window: Mutex<Window>,
    suppressed_total: AtomicU64,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter passing `burst` events per `interval`.
    pub const fn new(interval: Duration, burst: u32) -> Self {
        LogLimiter {
            interval,
            burst,
            window: Mutex::new(Window {
                started: None,
                passed: 0,
                suppressed: 0,
            }),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// The default for network-triggered logs: 10 messages per 5 seconds.
    pub const fn network() -> Self {
        Self::new(Duration::from_secs(5), 10)
    }

    /// Records an event at `now`. Returns `Some(n)` if it may be logged, where `n` is the
    /// number of events suppressed since the last one that was logged; `None` if it must not.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .started
            .is_none_or(|start| now.duration_since(start) >= self.interval);
        if expired {
            w.started = Some(now);
            w.passed = 0;
        }
        if w.passed < self.burst {
            w.passed += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// [`LogLimiter::check_at`] now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// Total events suppressed since creation.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// Logs a `tracing::warn!` through a [`LogLimiter`], adding `suppressed = n` when messages
/// were dropped since the last one.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.check() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_burst_then_counts_until_next_window() {
        let limiter = LogLimiter::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limiter.check_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(limiter.suppressed_total(), 5);
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
