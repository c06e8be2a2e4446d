//! The `recvmmsg`/`sendmmsg` frame path: the fallback when rings are unavailable (or
//! `TWINBLADE_AOE_IO=mmsg`), with every frame copied into and out of buffers of our own.

use super::rival::screen;
use super::{answer, PortDuties, PortHandle, PortIo, Route, BATCH, FRAME_BUFFER, POLL_INTERVAL};
use crate::export::aoe::blade::Outcome;
use crate::net::PacketSocket;
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The `sendmmsg` frame path: receive a batch into the inbox, answer it in order into the
/// outbox, send the replies whose gate allows it.
pub(super) fn serve_port_socket(port: &PortHandle, routes: &[Route], cancel: &CancellationToken) {
    let PortIo::Socket(socket) = &port.io else {
        return;
    };
    let mut inbox: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; FRAME_BUFFER]).collect();
    let mut inbox_lens = vec![0usize; BATCH];
    let mut outbox: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; FRAME_BUFFER]).collect();
    let mut outbox_lens = vec![0usize; BATCH];
    // The route (blade) each reply in the outbox is from, for the gate check at send time.
    let mut outbox_routes = vec![0usize; BATCH];
    let mut duties = PortDuties::new(routes);
    let mut last_mtu_check = Instant::now();
    let error_log = LogLimiter::network();
    let send_log = LogLimiter::network();
    while !cancel.is_cancelled() {
        if last_mtu_check.elapsed() >= POLL_INTERVAL {
            port.refresh_mtu();
            last_mtu_check = Instant::now();
        }
        let wait = duties.wait_limit(Instant::now());
        let received = match socket.recv_batch(&mut inbox, &mut inbox_lens, wait) {
            Ok(n) => n,
            Err(err) => {
                warn_limited!(error_log, iface = %port.iface.name, %err, "receive failed");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        let current = port.port();
        // After the wait, so the gates read are those of the frames about to be answered.
        duties.run(&port.iface, &current, routes, &mut |frame| {
            socket.send(frame)
        });
        let mut replies = 0;
        for (frame, &len) in inbox.iter().zip(&inbox_lens).take(received) {
            let frame = &frame[..len];
            if !screen(frame, routes, current.mac) {
                continue;
            }
            answer(frame, routes, &current, |index, blade, blade_port| {
                if let Outcome::Reply(reply_len) =
                    blade.handle(frame, blade_port, &mut outbox[replies])
                {
                    outbox_lens[replies] = reply_len;
                    outbox_routes[replies] = index;
                    replies += 1;
                    if replies == BATCH {
                        let outgoing = Outgoing {
                            outbox: &outbox,
                            lens: &outbox_lens,
                            routes_of: &outbox_routes,
                        };
                        send_replies(port, socket, routes, outgoing, &send_log);
                        replies = 0;
                    }
                }
                true
            });
        }
        let outgoing = Outgoing {
            outbox: &outbox,
            lens: &outbox_lens[..replies],
            routes_of: &outbox_routes[..replies],
        };
        send_replies(port, socket, routes, outgoing, &send_log);
    }
}

/// Replies built on the `sendmmsg` path: `lens[i]` bytes of `outbox[i]`, from the blade of
/// route `routes_of[i]`.
struct Outgoing<'a> {
    outbox: &'a [Vec<u8>],
    lens: &'a [usize],
    routes_of: &'a [usize],
}

/// Sends the replies whose blade's gate allows it now (asked once per blade, immediately
/// before the `sendmmsg`); the rest are dropped and counted.
fn send_replies(
    port: &PortHandle,
    socket: &PacketSocket,
    routes: &[Route],
    outgoing: Outgoing<'_>,
    log: &LogLimiter,
) {
    if outgoing.lens.is_empty() {
        return;
    }
    let mut verdicts: Vec<Option<bool>> = vec![None; routes.len()];
    let frames: Vec<&[u8]> = outgoing
        .outbox
        .iter()
        .zip(outgoing.lens)
        .zip(outgoing.routes_of)
        .filter(|(_, &route)| {
            let verdict = verdicts[route].get_or_insert_with(|| routes[route].gate.may_answer());
            if !*verdict {
                routes[route].stats.count_gated(1);
            }
            *verdict
        })
        .map(|((buf, &len), _)| &buf[..len])
        .collect();
    if frames.is_empty() {
        return;
    }
    if let Err(err) = socket.send_batch(&frames) {
        warn_limited!(log, iface = %port.iface.name, %err, replies = frames.len(), "replies not sent");
    }
}
