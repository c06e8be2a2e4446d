//! The `PACKET_MMAP` frame path (the default): frames answered where the kernel put them,
//! replies built in the transmit ring, and reads and writes of adjacent sectors executed as
//! one device call (a [`Run`]).

use super::replier::Replier;
use super::rival::screen;
use super::{answer, send_now, PortDuties, PortHandle, PortIo, Route, BATCH, POLL_INTERVAL};
use crate::block::SECTOR_SIZE;
use crate::export::aoe::blade::{Outcome, Port, PreparedTransfer};
use crate::net::{RxRing, TxRing};
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::MacAddr;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The ring frame path: frames are read where the kernel put them and replies built in the
/// transmit ring; the only syscalls are one kick per batch, a poll when idle, and the device
/// I/O — one `read_at`/`write_at` per run of adjacent transfers rather than one per frame.
///
/// A batch is every frame the receive ring holds (up to [`BATCH`]), taken in arrival order.
/// Reads and writes that continue the current run (same blade, same direction, the next
/// sectors) join it: their reply slots are staged in the transmit ring and the transfer waits.
/// Any other frame first completes the run, then is answered on its own, so every request
/// still reaches the device in arrival order. Receive slots are handed back at the end of the
/// batch, which is what lets a run's write data be gathered from where it arrived.
pub(super) fn serve_port_ring(port: &mut PortHandle, routes: &[Route], cancel: &CancellationToken) {
    let mut last_mtu_check = Instant::now();
    let error_log = LogLimiter::network();
    let mut run = Run {
        max_bytes: run_limit(),
        ..Run::default()
    };
    let replier = Replier::start(&port.iface);
    let mut duties = PortDuties::new(routes);
    while !cancel.is_cancelled() {
        if last_mtu_check.elapsed() >= POLL_INTERVAL {
            port.refresh_mtu();
            last_mtu_check = Instant::now();
        }
        let current = port.port();
        let PortIo::Ring(ring) = &mut port.io else {
            return;
        };
        let readable = match ring.wait_readable(duties.wait_limit(Instant::now())) {
            Ok(readable) => readable,
            Err(err) => {
                warn_limited!(error_log, iface = %port.iface.name, %err, "receive failed");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        // After the wait, so the gates read are those of the frames about to be answered.
        duties.run(&port.iface, &current, routes, &mut |frame| {
            send_now(&mut port.io, frame)
        });
        if !readable {
            continue;
        }
        let PortIo::Ring(ring) = &mut port.io else {
            return;
        };
        let (rx, tx) = ring.split();
        // Hold at most half the receive ring, so the kernel always has room for what the
        // initiators were promised.
        let limit = BATCH.min(rx.capacity() / 2).max(1);
        let mut held = 0;
        while held < limit {
            let Some(frame) = rx.peek(held) else { break };
            if !screen(frame, routes, current.mac) {
                held += 1;
                continue;
            }
            match prepare(frame, routes, &current) {
                Some((route, transfer)) => {
                    if !run.continues(route, &transfer) {
                        run.complete(routes, rx, tx, replier.as_ref());
                    }
                    // A read is read straight into its reply slot; a write's reply slot is
                    // taken when it completes.
                    let slot = if transfer.is_write() {
                        Ok(usize::MAX)
                    } else {
                        tx.stage()
                    };
                    match slot {
                        Ok(slot) => run.push(route, transfer, held, slot),
                        Err(err) => {
                            warn_limited!(error_log, %err, "no transmit slot");
                        }
                    }
                }
                None => {
                    run.complete(routes, rx, tx, replier.as_ref());
                    answer(frame, routes, &current, |index, blade, port| {
                        match tx.buffer() {
                            Ok(out) => {
                                if let Outcome::Reply(len) = blade.handle(frame, port, out) {
                                    // Committing hands the slot to the kernel, which may send it
                                    // at any kick: the gate is asked now.
                                    if routes[index].may_send(1) {
                                        tx.commit(len);
                                    }
                                }
                                true
                            }
                            Err(err) => {
                                warn_limited!(error_log, %err, "no transmit slot");
                                false
                            }
                        }
                    });
                }
            }
            held += 1;
        }
        run.complete(routes, rx, tx, replier.as_ref());
        rx.release_many(held);
        if tx.pending() > 0 {
            if let Err(err) = tx.kick() {
                warn_limited!(error_log, iface = %port.iface.name, %err, "replies not sent");
            }
        }
    }
}

/// The blade (route index) that takes `frame` as a plain transfer, if one does and its gate
/// was open when the batch began (a closed blade's frames go to [`answer`], which counts them).
fn prepare(frame: &[u8], routes: &[Route], interface: &Port) -> Option<(usize, PreparedTransfer)> {
    let dst = MacAddr::from_bytes(frame.get(..6)?);
    routes
        .iter()
        .enumerate()
        .filter(|(_, route)| route.open_this_batch.get() && route.takes(dst))
        .find_map(|(index, route)| {
            let port = route.port_for(interface);
            Some((index, route.lock().prepare_transfer(frame, &port)?))
        })
}

/// Adjacent transfers of one blade in one direction, waiting to be executed together.
#[derive(Default)]
struct Run {
    /// Largest run executed as one device call (0: every transfer on its own).
    max_bytes: usize,
    route: usize,
    entries: Vec<RunEntry>,
    /// Scratch for devices that cannot gather or scatter by themselves (see
    /// `BlockDevice::read_vectored`).
    staging: Vec<u8>,
}

struct RunEntry {
    transfer: PreparedTransfer,
    /// Position of the request frame among the held receive slots.
    rx: usize,
    /// Position of the reply among the staged transmit slots.
    tx: usize,
}

/// Largest run executed as one device call, unless `TWINBLADE_AOE_RUN_BYTES` says otherwise
/// (0 executes every transfer on its own, as vblade does).
const MAX_RUN_BYTES: usize = 1 << 20;

fn run_limit() -> usize {
    std::env::var("TWINBLADE_AOE_RUN_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_RUN_BYTES)
}

impl Run {
    fn continues(&self, route: usize, next: &PreparedTransfer) -> bool {
        let Some(last) = self.entries.last() else {
            return true;
        };
        let first = &self.entries[0].transfer;
        let bytes: usize = self.entries.iter().map(|e| e.transfer.data_len()).sum();
        route == self.route
            && next.is_write() == first.is_write()
            && next.lba() == last.transfer.lba() + (last.transfer.data_len() / 512) as u64
            && bytes + next.data_len() <= self.max_bytes
    }

    fn push(&mut self, route: usize, transfer: PreparedTransfer, rx: usize, tx: usize) {
        self.route = route;
        self.entries.push(RunEntry { transfer, rx, tx });
    }

    /// Executes the run with one device call (each transfer alone if that call fails, so
    /// every reply carries its own outcome), writes the replies and queues them. A write that
    /// is still completing (a replicated write waiting for the peer) goes to the `replier`,
    /// which answers it when it completes, so the frame path goes on meanwhile.
    fn complete(
        &mut self,
        routes: &[Route],
        rx: &RxRing,
        tx: &mut TxRing,
        replier: Option<&Replier>,
    ) {
        if self.entries.is_empty() {
            return;
        }
        let blade = routes[self.route].lock();
        let device = blade.device();
        let data_at = PreparedTransfer::DATA_OFFSET;
        let first = self.entries[0].transfer;
        let offset = first.lba() * SECTOR_SIZE;
        let write = first.is_write();
        let request_data = |entry: &RunEntry| -> &[u8] {
            let frame = rx.peek(entry.rx).unwrap_or(&[]);
            frame
                .get(data_at..data_at + entry.transfer.data_len())
                .unwrap_or(&[])
        };
        let together = if write {
            let started = if self.entries.len() == 1 {
                // Nothing to gather: straight from the receive slot.
                device.start_write(request_data(&self.entries[0]), offset, false)
            } else {
                // Straight from the receive slots where the device can (pwritev).
                let slices: Vec<&[u8]> = self.entries.iter().map(request_data).collect();
                device.start_write_vectored(&slices, offset, false, &mut self.staging)
            };
            match (started, replier) {
                (Ok(mut completion), Some(replier)) => {
                    if completion.poll() {
                        completion.wait()
                    } else {
                        let transfers = self.entries.iter().map(|e| e.transfer).collect();
                        let answerer = blade.answerer();
                        drop(blade);
                        replier.defer(answerer, transfers, completion, &routes[self.route]);
                        self.entries.clear();
                        return;
                    }
                }
                (Ok(completion), None) => completion.wait(),
                (Err(e), _) => Err(e),
            }
        } else if self.entries.len() == 1 {
            // Nothing to gather: straight into the reply slot.
            let entry = &self.entries[0];
            let len = entry.transfer.data_len();
            device.read_at(
                &mut tx.staged_buffer(entry.tx)[data_at..data_at + len],
                offset,
            )
        } else {
            // Straight into the reply slots where the device can (preadv).
            let positions: Vec<usize> = self.entries.iter().map(|e| e.tx).collect();
            let mut bufs: Vec<&mut [u8]> = tx
                .staged_buffers(&positions)
                .into_iter()
                .zip(&self.entries)
                .map(|(buf, entry)| &mut buf[data_at..data_at + entry.transfer.data_len()])
                .collect();
            device.read_vectored(&mut bufs, offset, &mut self.staging)
        };
        let single = self.entries.len() == 1;
        let alone = together.is_err() && !single;
        let mut together = Some(together);
        for entry in &mut self.entries {
            let transfer = &entry.transfer;
            let result = if alone {
                let offset = transfer.lba() * SECTOR_SIZE;
                let len = transfer.data_len();
                if write {
                    device.write_at(request_data(entry), offset, false)
                } else {
                    device.read_at(
                        &mut tx.staged_buffer(entry.tx)[data_at..data_at + len],
                        offset,
                    )
                }
            } else if single {
                together.take().unwrap_or(Ok(()))
            } else {
                Ok(())
            };
            if write {
                match tx.stage() {
                    Ok(slot) => entry.tx = slot,
                    Err(_) => continue,
                }
            }
            let len = blade.finish_transfer(transfer, result, tx.staged_buffer(entry.tx));
            tx.set_staged_len(entry.tx, len);
        }
        drop(blade);
        // Committing hands the slots to the kernel: the gate is asked now.
        if routes[self.route].may_send(tx.staged()) {
            tx.commit_staged();
        } else {
            tx.discard_staged();
        }
        self.entries.clear();
    }
}
