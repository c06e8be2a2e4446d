//! Latency histograms for the data path: fixed buckets, atomic counters, no lock and no
//! allocation per observation.
//!
//! The [`crate::repl::ReplicatedDevice`] times every client read, write and flush it serves
//! ([`IoLatency`]); the metrics endpoint renders the [`HistogramSnapshot`]s as Prometheus
//! histograms (`twinblade_io_latency_seconds`).
//!
//! A histogram keeps one count per bucket (not cumulative: an observation touches one
//! counter) and the sum of the observed times in nanoseconds. The count is the sum of the
//! buckets, so a snapshot's `+Inf` bucket always equals its count even while observations
//! race with the scrape; the sum may be one observation ahead or behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets (`le`), nanoseconds: 50 µs to 10 s, 1-2.5-5 steps. An
/// observation goes to the first bucket whose bound is at least its time; above the last bound
/// it goes to `+Inf` only.
pub const BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets including `+Inf`.
pub const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// One latency histogram.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// The bucket `ns` falls in (the last one is `+Inf`).
pub fn bucket_of(ns: u64) -> usize {
    BOUNDS_NS.partition_point(|&b| b < ns)
}

impl LatencyHistogram {
    /// Records one request that took `d`.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); the last is above every bound.
    pub buckets: [u64; BUCKETS],
    /// Sum of the observed times, nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Observations in total.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Sum of the observed times, seconds.
    pub fn sum_secs(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// `(le, cumulative count)` per bucket as Prometheus wants them, `+Inf` last.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut running = 0;
        self.buckets.iter().enumerate().map(move |(i, &n)| {
            running += n;
            let le = BOUNDS_NS.get(i).map_or(f64::INFINITY, |&b| b as f64 / 1e9);
            (le, running)
        })
    }
}

/// What a client-facing device times: one histogram per kind of request.
#[derive(Debug, Default)]
pub struct IoLatency {
    /// Reads, from the call to the data in the buffer.
    pub read: LatencyHistogram,
    /// Writes, from the call to the completion (the peer's acknowledgement where the protocol
    /// waits for it).
    pub write: LatencyHistogram,
    /// Flushes, from the call to the return (the peer's barrier acknowledgement included).
    pub flush: LatencyHistogram,
}

/// [`IoLatency`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoLatencySnapshot {
    /// Reads.
    pub read: HistogramSnapshot,
    /// Writes.
    pub write: HistogramSnapshot,
    /// Flushes.
    pub flush: HistogramSnapshot,
}

impl IoLatency {
    /// The three histograms now.
    pub fn snapshot(&self) -> IoLatencySnapshot {
        IoLatencySnapshot {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_whose_bound_holds_it() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(50_000), 0, "le is inclusive");
        assert_eq!(bucket_of(50_001), 1);
        assert_eq!(bucket_of(1_000_000), 4);
        assert_eq!(bucket_of(1_000_001), 5);
        assert_eq!(bucket_of(10_000_000_000), 16);
        assert_eq!(bucket_of(10_000_000_001), 17, "+Inf");
        assert_eq!(bucket_of(u64::MAX), 17);
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));

        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        h.observe(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.count(), 5);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[4], 2, "700 µs and 1 ms are both in le=0.001");
        assert_eq!(s.buckets[17], 2);
        let cum: Vec<(f64, u64)> = s.cumulative().collect();
        assert_eq!(cum.len(), BUCKETS);
        assert_eq!(cum[0], (0.00005, 1));
        assert_eq!(cum[3], (0.0005, 1));
        assert_eq!(cum[4], (0.001, 3));
        assert_eq!(cum[16], (10.0, 3));
        assert_eq!(cum[17], (f64::INFINITY, 5));
    }

    #[test]
    fn the_sum_is_in_seconds() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_millis(1500));
        h.observe(Duration::from_micros(250));
        assert_eq!(h.snapshot().sum_ns, 1_500_250_000);
        assert!((h.snapshot().sum_secs() - 1.50025).abs() < 1e-12);
    }
}
