//! Replies to writes that complete after the ring frame path has moved on (replicated
//! writes waiting for the peer), sent by whichever thread completes them.

use super::Route;
use crate::export::aoe::blade::{PreparedTransfer, TransferAnswerer};
use crate::net::{Interface, PacketSocket};
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Answers writes that complete after the frame path has moved on (replicated writes waiting
/// for the peer): each is answered by whichever thread completes it (the peer link's reader,
/// as the acknowledgement arrives), through a send-only socket, so that the frame path never
/// waits for the peer and no thread sits between the acknowledgement and the reply.
pub(super) struct Replier {
    socket: Arc<PacketSocket>,
    /// Writes started and not yet answered.
    in_flight: Arc<(Mutex<usize>, std::sync::Condvar)>,
}

/// Longest a stopping port waits for its writes still in flight (the peer link answers or
/// fails every request well within it).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

impl Replier {
    /// `None` if no send socket can be opened: writes then complete inline.
    pub(super) fn start(iface: &Interface) -> Option<Replier> {
        // Protocol 0: this socket receives nothing.
        match PacketSocket::open(iface, 0) {
            Ok(socket) => Some(Replier {
                socket: Arc::new(socket),
                in_flight: Arc::default(),
            }),
            Err(err) => {
                tracing::warn!(iface = %iface.name, %err, "no reply socket: writes complete inline");
                None
            }
        }
    }

    /// Answers `transfers` (one run of `route`'s blade) when `completion` completes, if the
    /// blade's gate allows it then.
    pub(super) fn defer(
        &self,
        answerer: TransferAnswerer,
        transfers: Vec<PreparedTransfer>,
        completion: crate::block::WriteCompletion,
        route: &Route,
    ) {
        let gate = Arc::clone(&route.gate);
        let stats = Arc::clone(&route.stats);
        static SEND_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10), 3);
        *lock_count(&self.in_flight.0) += 1;
        let socket = self.socket.clone();
        let in_flight = self.in_flight.clone();
        completion.then(Box::new(move |result| {
            let mut replies = vec![[0u8; WRITE_REPLY_BUFFER]; transfers.len()];
            let mut lens = Vec::with_capacity(transfers.len());
            for (transfer, out) in transfers.iter().zip(&mut replies) {
                let result = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.duplicate()),
                };
                lens.push(answerer.finish(transfer, result, out));
            }
            let frames: Vec<&[u8]> = replies.iter().zip(&lens).map(|(b, &l)| &b[..l]).collect();
            if !gate.may_answer() {
                // The write happened, but this node may no longer say so: the initiator
                // retransmits to whoever serves now.
                stats.count_gated(frames.len() as u64);
                *lock_count(&in_flight.0) -= 1;
                in_flight.1.notify_all();
                return;
            }
            // This runs on whichever thread completed the write (the replication link's
            // reader): it must never wait, so a full send queue drops replies, as a full link
            // would, and the initiator retransmits.
            match socket.try_send_batch(&frames) {
                Ok(n) if n < frames.len() => warn_limited!(
                    SEND_LOG,
                    dropped = frames.len() - n,
                    "send queue full: write replies dropped (the initiator retransmits)"
                ),
                Ok(_) => {}
                Err(err) => {
                    warn_limited!(SEND_LOG, %err, replies = frames.len(), "replies not sent")
                }
            }
            *lock_count(&in_flight.0) -= 1;
            in_flight.1.notify_all();
        }));
    }
}

/// Room for a write's reply: header, ATA argument, padding to the Ethernet minimum.
const WRITE_REPLY_BUFFER: usize = 128;

fn lock_count(count: &Mutex<usize>) -> std::sync::MutexGuard<'_, usize> {
    count.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Replier {
    /// Waits until every deferred write has been answered.
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut count = lock_count(&self.in_flight.0);
        while *count > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(
                    writes = *count,
                    "stopping with replicated writes still unanswered"
                );
                return;
            }
            count = self
                .in_flight
                .1
                .wait_timeout(count, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
