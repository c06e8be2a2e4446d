//! Counters of one blade: what arrived, what was answered, what was dropped and why.
//!
//! Kept next to the rate-limited logs so that totals stay exact when the logs are throttled.

use super::ata::{AtaReply, AtaRequest};
use crate::wire::aoe::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a frame got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than the AoE header or its command's argument.
    Truncated,
    /// Wrong ethertype, reserved flags or a malformed config request.
    Malformed,
    /// From a MAC not on the mask list.
    Masked,
    /// A config test / test-prefix that did not match.
    ConfigMismatch,
}

/// Counters of one blade. All relaxed atomics: they are statistics, not synchronisation.
#[derive(Debug, Default)]
pub struct BladeStats {
    /// Frames addressed to this blade.
    pub requests: AtomicU64,
    /// Replies sent.
    pub replies: AtomicU64,
    /// Frames dropped as truncated.
    pub dropped_truncated: AtomicU64,
    /// Frames dropped as malformed.
    pub dropped_malformed: AtomicU64,
    /// Frames dropped by the mask list.
    pub dropped_masked: AtomicU64,
    /// Config tests that did not match.
    pub config_mismatches: AtomicU64,
    /// AoE error replies, indexed by error code (1..=6).
    pub aoe_errors: [AtomicU64; 7],
    /// ATA reads completed.
    pub reads: AtomicU64,
    /// ATA writes completed.
    pub writes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// ATA commands answered with an error status.
    pub ata_errors: AtomicU64,
    /// Replies withheld (and requests left unexecuted) because the serve gate was closed:
    /// another node may be answering for this address, so the initiator must retransmit.
    pub gated: AtomicU64,
    /// Unsolicited config responses sent (when the gate opens and, for a blade at a service
    /// MAC, the refreshes while it stays open).
    pub announces: AtomicU64,
}

impl BladeStats {
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_reply(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a dropped frame.
    pub(crate) fn count_drop(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::Truncated => &self.dropped_truncated,
            DropReason::Malformed => &self.dropped_malformed,
            DropReason::Masked => &self.dropped_masked,
            DropReason::ConfigMismatch => &self.config_mismatches,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` replies withheld by the serve gate.
    pub(crate) fn count_gated(&self, n: u64) {
        self.gated.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_announce(&self) {
        self.announces.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_error(&self, code: ErrorCode) {
        self.aoe_errors[code as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_ata(&self, request: &AtaRequest, reply: &AtaReply) {
        if !reply.is_ok() {
            self.ata_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match *request {
            AtaRequest::Read { sectors, .. } => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                self.bytes_read
                    .fetch_add(u64::from(sectors) * 512, Ordering::Relaxed);
            }
            AtaRequest::Write { sectors, .. } => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.bytes_written
                    .fetch_add(u64::from(sectors) * 512, Ordering::Relaxed);
            }
            AtaRequest::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// AoE error replies sent with `code`.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.aoe_errors[code as usize].load(Ordering::Relaxed)
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "requests={} replies={} reads={} writes={} flushes={} read_bytes={} written_bytes={} ata_errors={} aoe_errors={:?} dropped(truncated={} malformed={} masked={}) config_mismatches={} gated={} announces={}",
            get(&self.requests),
            get(&self.replies),
            get(&self.reads),
            get(&self.writes),
            get(&self.flushes),
            get(&self.bytes_read),
            get(&self.bytes_written),
            get(&self.ata_errors),
            self.aoe_errors[1..].iter().map(get).collect::<Vec<_>>(),
            get(&self.dropped_truncated),
            get(&self.dropped_malformed),
            get(&self.dropped_masked),
            get(&self.config_mismatches),
            get(&self.gated),
            get(&self.announces),
        )
    }
}
