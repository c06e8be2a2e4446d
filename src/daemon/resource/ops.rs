//! What the watchdog and the metrics read of a resource beside its status snapshot: when the
//! engine last went round its loop, how timed failovers ended, and the counters of the exports
//! currently (or last) served, and the replicated device's latency histograms. The engine
//! writes them; nothing here is on the I/O path (the export counters are the exports' own
//! atomics, shared once when serving starts; the histograms are the device's).

use super::*;

use crate::export::aoe::BladeStats;
use crate::export::nbd::ServerStats;

/// How the failover stopwatch ended (see `Engine::finish_failover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverOutcome {
    /// This node took over and answered a client.
    Served,
    /// It demoted before answering.
    Demoted,
    /// The peer was heard again with nothing taken over.
    PeerBack,
    /// No client request was answered within two minutes.
    TimedOut,
}

impl FailoverOutcome {
    /// Every outcome, in the order the metrics list them.
    pub const ALL: [FailoverOutcome; 4] = [
        FailoverOutcome::Served,
        FailoverOutcome::Demoted,
        FailoverOutcome::PeerBack,
        FailoverOutcome::TimedOut,
    ];

    /// The metrics' label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverOutcome::Served => "served",
            FailoverOutcome::Demoted => "demoted",
            FailoverOutcome::PeerBack => "peer_back",
            FailoverOutcome::TimedOut => "timed_out",
        }
    }
}

/// The resource's operational counters (see the module docs).
#[derive(Debug, Default)]
pub struct Ops {
    /// When the engine last went round its loop (ms since the resource started).
    engine_beat_ms: AtomicU64,
    /// Timed failovers by outcome ([`FailoverOutcome::ALL`] order).
    failovers: [AtomicU64; 4],
    /// The last served failover, from the start of its timeline to the first reply, in ms
    /// plus one (0: none yet).
    last_failover_ms: AtomicU64,
    /// The exports' counters since serving last started.
    exports: Mutex<ExportCounters>,
}

/// The counters of the exports a resource serves (or served last).
#[derive(Debug, Default, Clone)]
pub struct ExportCounters {
    /// One per AoE blade (interface).
    pub aoe: Vec<Arc<BladeStats>>,
    /// The NBD server's.
    pub nbd: Option<Arc<ServerStats>>,
}

/// A copy of [`Ops`] for one scrape.
#[derive(Debug, Clone, Default)]
pub struct OpsSnapshot {
    /// Since the engine last went round its loop.
    pub engine_idle: Duration,
    /// Timed failovers by outcome ([`FailoverOutcome::ALL`] order).
    pub failovers: [u64; 4],
    /// The last served failover's duration.
    pub last_failover: Option<Duration>,
    /// AoE counters summed over the blades, since serving last started.
    pub aoe: Option<AoeTotals>,
    /// NBD counters, since serving last started.
    pub nbd: Option<NbdTotals>,
    /// Latency of the client reads, writes and flushes the replicated device served (since
    /// the daemon started; the device's own atomics).
    pub latency: crate::block::timed::IoLatencySnapshot,
}

/// AoE counters summed over a resource's blades.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AoeTotals {
    /// Frames addressed to the blade.
    pub requests: u64,
    /// Replies sent.
    pub replies: u64,
    /// ATA reads and writes completed, flushes completed.
    pub reads: u64,
    /// ATA writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Bytes read and written by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// AoE error replies.
    pub aoe_errors: u64,
    /// ATA commands answered with an error status.
    pub ata_errors: u64,
    /// Frames dropped (truncated, malformed, masked).
    pub dropped: u64,
    /// Replies withheld by the closed serve gate.
    pub gated: u64,
}

/// NBD counters of a resource's server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdTotals {
    /// Connections accepted.
    pub connections: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests answered with an error.
    pub error_replies: u64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: u64,
}

impl Ops {
    /// The engine went round its loop at `now_ms`.
    pub(super) fn beat(&self, now_ms: u64) {
        self.engine_beat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// A failover timeline ended.
    pub(super) fn failover(&self, outcome: FailoverOutcome, served_in: Option<Duration>) {
        let i = FailoverOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("listed");
        self.failovers[i].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = served_in {
            self.last_failover_ms
                .store(d.as_millis() as u64 + 1, Ordering::Relaxed);
        }
    }

    /// Serving started with these exports.
    pub(super) fn serving(&self, exports: ExportCounters) {
        *lock(&self.exports) = exports;
    }

    fn snapshot(&self, now_ms: u64) -> OpsSnapshot {
        let exports = lock(&self.exports).clone();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let aoe = (!exports.aoe.is_empty()).then(|| {
            let mut t = AoeTotals::default();
            for s in &exports.aoe {
                t.requests += get(&s.requests);
                t.replies += get(&s.replies);
                t.reads += get(&s.reads);
                t.writes += get(&s.writes);
                t.flushes += get(&s.flushes);
                t.bytes_read += get(&s.bytes_read);
                t.bytes_written += get(&s.bytes_written);
                t.aoe_errors += s.aoe_errors.iter().map(get).sum::<u64>();
                t.ata_errors += get(&s.ata_errors);
                t.dropped +=
                    get(&s.dropped_truncated) + get(&s.dropped_malformed) + get(&s.dropped_masked);
                t.gated += get(&s.gated);
            }
            t
        });
        let nbd = exports.nbd.as_ref().map(|s| NbdTotals {
            connections: get(&s.connections),
            requests: get(&s.requests),
            error_replies: get(&s.error_replies),
            protocol_errors: get(&s.protocol_errors),
        });
        OpsSnapshot {
            engine_idle: Duration::from_millis(now_ms.saturating_sub(get(&self.engine_beat_ms))),
            failovers: std::array::from_fn(|i| get(&self.failovers[i])),
            last_failover: match get(&self.last_failover_ms) {
                0 => None,
                ms => Some(Duration::from_millis(ms - 1)),
            },
            aoe,
            nbd,
            latency: Default::default(),
        }
    }
}

impl Resource {
    /// Since the engine last went round its loop: a healthy engine does at least every tick
    /// (50 ms) unless it is stopping.
    pub fn engine_idle(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.ops.engine_beat_ms.load(Ordering::Relaxed)),
        )
    }

    /// The operational counters for a scrape.
    pub fn ops_snapshot(&self) -> OpsSnapshot {
        OpsSnapshot {
            latency: self.device.counters.latency.snapshot(),
            ..self.ops.snapshot(self.now_ms())
        }
    }
}
