//! Runs blades on interfaces: sockets, threads, announce, shutdown.
//!
//! One thread per interface moves frames in batches: one `recvmmsg` takes every frame the
//! kernel has queued (up to [`BATCH`]), each is answered in arrival order by the blade it
//! addresses (a broadcast goes to every blade on that interface), and one `sendmmsg` sends all
//! the replies. Answering in arrival order is what keeps overlapping requests (the Linux driver
//! retransmits under new tags) in order; answering inline is what keeps the frame path at two
//! syscalls per batch and no thread hand-offs. A blade served on several interfaces is shared
//! behind a mutex (uncontended in the common single-interface case).
//!
//! On the ring path, reads and writes of adjacent sectors that arrive in one batch are executed
//! as one device call (see [`serve_port_ring`]); `TWINBLADE_AOE_RUN_BYTES` caps such a run
//! (default 1 MiB; 0 executes every transfer on its own, as vblade does). Writes are started
//! with [`BlockDevice::start_write`]: one that is still completing when started (a replicated
//! write waiting for the peer) is answered by whichever thread completes it (the peer link's
//! reader), through a send-only socket, while the frame path goes on with the next frames.
//! Every request still reaches the device in arrival order; only the replies of such writes
//! leave later.
//!
//! The socket buffers are sized so the kernel never drops what we advertised (the buffer count
//! of every blade on the interface, at the largest frame size).
//!
//! Everything stops when the [`CancellationToken`] is cancelled: the threads notice within
//! [`POLL_INTERVAL`].
//!
//! # The serve gate
//!
//! Each blade answers only while its [`ServeGate`] says this node may ("at no instant may two
//! nodes answer for one shelf.slot"). The gate is asked immediately before a reply is handed
//! to the kernel — per reply on the ring path (before the slot is committed), per blade and
//! send batch on the `sendmmsg` path and for deferred write replies — and a reply it refuses
//! is dropped and counted in [`BladeStats::gated`]: AoE initiators retransmit. Frames for a
//! blade whose gate was closed when the batch began are not even executed. A blade announces
//! itself whenever its gate opens (at start if it is open then), so initiators learn where it
//! now lives.
//!
//! # Multiple-mount protection
//!
//! A blade exported with a [`RivalAlarm`] broadcasts a Query Config for its own address from
//! the port every [`RIVAL_CHECK_INTERVAL`]; any AoE *response* for that address from another
//! MAC seen on the port (an answer to our query, to a client's, an announce) raises the alarm.
//! Our own queries are never answered by our own blades: the sockets ignore outgoing frames,
//! and frames from the port's own MAC are dropped besides.

use super::blade::{Blade, BladeConfig, Outcome, Port, PreparedTransfer};
use super::probe::{self, RivalAlarm, RIVAL_CHECK_INTERVAL};
use super::stats::BladeStats;
use crate::block::{BlockDevice, SECTOR_SIZE};
use crate::ha::gate::ServeGate;
use crate::net::{Interface, PacketRing, PacketSocket, RxRing, TxRing, SLOT_SIZE};
use crate::ratelimit::LogLimiter;
use crate::supervisor::Supervisor;
use crate::warn_limited;
use crate::wire::aoe::{self, Frame};
use crate::wire::MacAddr;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often blocked receive threads look at the cancellation token and re-read the MTU.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Frames moved per syscall at most.
pub const BATCH: usize = 64;
/// Largest frame we receive or send: a 9000-byte MTU plus headers, with room to spare.
const FRAME_BUFFER: usize = 9216 + 1024;
/// Kernel memory one queued frame costs at most (payload plus skb overhead), for buffer sizing.
const SKB_COST: usize = 16 * 1024;

/// Why the AoE target could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The interface does not exist or has no MAC.
    #[error("interface {name}: {source}")]
    Interface {
        /// Interface name.
        name: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Opening the raw socket failed (needs CAP_NET_RAW).
    #[error("opening a raw AoE socket on {name}: {source}")]
    Socket {
        /// Interface name.
        name: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Two blades claim the same shelf.slot.
    #[error("e{shelf}.{slot} is exported twice")]
    DuplicateAddress {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
    },
    /// A port thread could not be started.
    #[error("starting a port thread: {0}")]
    Thread(#[source] io::Error),
    /// A blade has no interface.
    #[error("e{shelf}.{slot} has no interface")]
    NoInterface {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
    },
    /// A shelf or slot reserved for broadcast.
    #[error("shelf 0xffff and slot 0xff are broadcast addresses and cannot be exported")]
    BroadcastAddress,
}

/// One device to export.
pub struct Export {
    /// Blade settings.
    pub config: BladeConfig,
    /// What it serves.
    pub device: Arc<dyn BlockDevice>,
    /// Interfaces to serve it on.
    pub interfaces: Vec<String>,
    /// Whether this node may answer for the blade right now; asked before every reply
    /// ([`ServeGate::always_open`] for a standalone target).
    pub gate: Arc<ServeGate>,
    /// Multiple-mount protection: when set, the blade watches its ports for another MAC
    /// answering for its address and reports each such rival here (see the module docs).
    pub guard: Option<RivalAlarm>,
}

/// How frames move on an interface.
enum PortIo {
    /// `PACKET_MMAP` rings: no syscall per frame while busy (the default).
    Ring(PacketRing),
    /// A plain packet socket with `recvmmsg`/`sendmmsg` (the fallback when rings are
    /// unavailable, or when `TWINBLADE_AOE_IO=mmsg` asks for it).
    Socket(PacketSocket),
}

/// An interface we serve on.
struct PortHandle {
    iface: Interface,
    io: PortIo,
    mtu: AtomicU32,
}

impl PortHandle {
    fn port(&self) -> Port {
        // Frames never exceed our buffers, whatever MTU the interface has.
        let mtu = self
            .mtu
            .load(Ordering::Relaxed)
            .min((FRAME_BUFFER - 14) as u32);
        Port {
            mac: self.iface.mac,
            mtu,
        }
    }

    fn refresh_mtu(&self) {
        if let Ok(mtu) = self.iface.mtu() {
            self.mtu.store(mtu, Ordering::Relaxed);
        }
    }
}

/// A running AoE target.
pub struct AoeServer {
    /// Its port threads (one per interface).
    group: Supervisor,
    stats: Vec<(String, Arc<BladeStats>)>,
}

impl AoeServer {
    /// Opens the sockets, announces every blade and starts serving: one thread per interface,
    /// started in `group` (which the server then owns and stops).
    pub fn start(exports: Vec<Export>, group: Supervisor) -> Result<AoeServer, StartError> {
        let mut seen = std::collections::HashSet::new();
        for export in &exports {
            let (shelf, slot) = (export.config.shelf, export.config.slot);
            if shelf == aoe::BROADCAST_SHELF || slot == aoe::BROADCAST_SLOT {
                return Err(StartError::BroadcastAddress);
            }
            if !seen.insert((shelf, slot)) {
                return Err(StartError::DuplicateAddress { shelf, slot });
            }
            if export.interfaces.is_empty() {
                return Err(StartError::NoInterface { shelf, slot });
            }
        }

        // One port per distinct interface name.
        let mut names: Vec<String> = exports.iter().flat_map(|e| e.interfaces.clone()).collect();
        names.sort();
        names.dedup();
        let mut ports = Vec::new();
        for name in &names {
            let iface = Interface::by_name(name).map_err(|source| StartError::Interface {
                name: name.clone(),
                source,
            })?;
            let buffers: usize = exports
                .iter()
                .filter(|e| e.interfaces.contains(name))
                .map(|e| usize::from(e.config.buffer_count))
                .sum();
            let io = open_port_io(&iface, buffers).map_err(|source| StartError::Socket {
                name: name.clone(),
                source,
            })?;
            let mtu = iface.mtu().map_err(|source| StartError::Interface {
                name: name.clone(),
                source,
            })?;
            ports.push(PortHandle {
                iface,
                io,
                mtu: AtomicU32::new(mtu),
            });
        }

        let mut stats = Vec::new();
        let mut routes: Vec<Vec<Route>> = (0..ports.len()).map(|_| Vec::new()).collect();
        for export in exports {
            let blade = Blade::new(export.config, export.device);
            let name = blade.config().name();
            let address = blade.address();
            let blade_stats = blade.stats();
            stats.push((name, blade_stats.clone()));
            let blade = Arc::new(Mutex::new(blade));
            let guard = export.guard.map(Arc::new);
            for (index, port) in ports.iter().enumerate() {
                if export.interfaces.contains(&port.iface.name) {
                    routes[index].push(Route {
                        blade: Arc::clone(&blade),
                        gate: Arc::clone(&export.gate),
                        stats: Arc::clone(&blade_stats),
                        address,
                        guard: guard.clone(),
                        open_this_batch: Cell::new(false),
                    });
                }
            }
        }

        for (port, routes) in ports.into_iter().zip(routes) {
            for route in &routes {
                let blade = route.lock();
                let current = port.port();
                tracing::info!(blade = %blade.config().name(), iface = %port.iface.name, mtu = current.mtu, sectors_per_frame = current.max_sectors(), gate = %route.gate.authority(), guarded = route.guard.is_some(), "serving");
            }
            let name = format!("aoe-{}", port.iface.name);
            group
                .spawn(name, move |token| serve_port(port, routes, token))
                .map_err(StartError::Thread)?;
        }
        Ok(AoeServer { group, stats })
    }

    /// Counters of every blade, by name.
    pub fn stats(&self) -> &[(String, Arc<BladeStats>)] {
        &self.stats
    }

    /// Stops serving and waits for every thread, then logs counters.
    pub fn stop(self) {
        self.group.stop();
        for (name, stats) in &self.stats {
            tracing::info!(blade = %name, stats = %stats.summary(), "stopped");
        }
    }
}

/// A blade reachable on a port (owned by that port's thread).
struct Route {
    blade: Arc<Mutex<Blade>>,
    gate: Arc<ServeGate>,
    /// The blade's counters, reachable without its lock.
    stats: Arc<BladeStats>,
    /// The blade's shelf and slot.
    address: (u16, u8),
    guard: Option<Arc<RivalAlarm>>,
    /// The gate as of the start of the current batch: frames for a closed blade are not
    /// executed (the reply could not go out anyway). Also what tells a gate that just opened.
    open_this_batch: Cell<bool>,
}

impl Route {
    fn lock(&self) -> std::sync::MutexGuard<'_, Blade> {
        // A panic while answering one frame must not take the blade down for good.
        self.blade.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `replies` may be handed to the kernel now; if not, counts them as gated.
    /// Ask immediately before the hand-over.
    fn may_send(&self, replies: usize) -> bool {
        if self.gate.may_answer() {
            true
        } else {
            self.stats.count_gated(replies as u64);
            false
        }
    }

    /// Reads the gate for a new batch; returns whether it opened since the last batch.
    fn refresh_gate(&self) -> bool {
        let open = self.gate.may_answer();
        !self.open_this_batch.replace(open) && open
    }
}

/// Opens the frame I/O of one interface: rings if possible, else a plain socket. Either way
/// the kernel can queue every frame the blades on it advertised.
fn open_port_io(iface: &Interface, buffers: usize) -> std::io::Result<PortIo> {
    let want_socket = std::env::var("TWINBLADE_AOE_IO").is_ok_and(|v| v == "mmsg");
    if !want_socket {
        // Each ring slot holds one frame of up to 16 KiB; 1 MiB blocks.
        let blocks = (buffers * 2 * SLOT_SIZE).div_ceil(1 << 20).max(4);
        match PacketRing::open(iface, aoe::ETHERTYPE, blocks, 4) {
            Ok(ring) => {
                let _ = ring.set_send_buffer((buffers * SKB_COST * 2).max(4 << 20));
                return Ok(PortIo::Ring(ring));
            }
            Err(err) => {
                tracing::warn!(iface = %iface.name, %err, "PACKET_MMAP rings unavailable, using recvmmsg/sendmmsg")
            }
        }
    }
    let socket = PacketSocket::open(iface, aoe::ETHERTYPE)?;
    let _ = socket.set_buffer_sizes((buffers * SKB_COST * 2).max(4 << 20));
    Ok(PortIo::Socket(socket))
}

/// Sends one frame now, outside the batched frame path (announces, rival queries).
fn send_now(io: &mut PortIo, frame: &[u8]) -> io::Result<()> {
    match io {
        PortIo::Socket(socket) => socket.send(frame),
        PortIo::Ring(ring) => {
            let (_, tx) = ring.split();
            let buf = tx.buffer()?;
            buf[..frame.len()].copy_from_slice(frame);
            tx.commit(frame.len());
            tx.kick()
        }
    }
}

/// What a port does between batches: reads every blade's gate for the coming batch,
/// announces the blades whose gate just opened, and, once per [`RIVAL_CHECK_INTERVAL`],
/// asks the wire whether anyone else answers for a guarded blade's address.
struct PortDuties {
    next_rival_check: Instant,
    scratch: Vec<u8>,
}

impl PortDuties {
    fn new() -> PortDuties {
        PortDuties {
            next_rival_check: Instant::now(),
            scratch: vec![0u8; FRAME_BUFFER],
        }
    }

    /// `send` sends one frame now.
    fn run(
        &mut self,
        iface: &Interface,
        current: &Port,
        routes: &[Route],
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) {
        for route in routes {
            if route.refresh_gate() {
                self.announce(iface, current, route, send);
            }
        }
        let now = Instant::now();
        if now < self.next_rival_check {
            return;
        }
        self.next_rival_check = now + RIVAL_CHECK_INTERVAL;
        for route in routes.iter().filter(|r| r.guard.is_some()) {
            let (shelf, slot) = route.address;
            let query = probe::config_query(current.mac, shelf, slot);
            if let Err(err) = send(&query) {
                static QUERY_LOG: LogLimiter = LogLimiter::network();
                warn_limited!(QUERY_LOG, iface = %iface.name, %err, "rival query not sent");
            }
        }
    }

    /// Sends the blade's unsolicited config response (broadcast, or to each masked MAC).
    fn announce(
        &mut self,
        iface: &Interface,
        current: &Port,
        route: &Route,
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) {
        let blade = route.lock();
        for dst in blade.announce_destinations() {
            let len = blade.announce(current, dst, &mut self.scratch);
            // The gate opened an instant ago, but it is the gate at send time that counts.
            if !route.may_send(1) {
                return;
            }
            if let Err(err) = send(&self.scratch[..len]) {
                tracing::warn!(blade = %blade.config().name(), iface = %iface.name, %err, "announce failed");
            }
        }
        tracing::info!(blade = %blade.config().name(), iface = %iface.name, "announced");
    }
}

/// Looks at a received frame before it is answered: a response is never answered, but one
/// for a guarded blade's address from another MAC raises that blade's [`RivalAlarm`]. Returns
/// whether the frame is a request to answer.
fn screen(frame: &[u8], routes: &[Route], own: MacAddr) -> bool {
    let Ok(view) = Frame::new_checked(frame) else {
        // The blade counts it.
        return true;
    };
    if view.is_response() {
        for route in routes {
            let Some(alarm) = &route.guard else { continue };
            let (shelf, slot) = route.address;
            if let Some(rival) = probe::responder(frame, shelf, slot, own) {
                alarm.raise(rival, shelf, slot, Instant::now());
            }
        }
        return false;
    }
    // Our own rival queries, should the kernel loop them back (ignoring outgoing frames is
    // best effort): the blade must not answer its own question.
    view.src() != own
}

/// The frame path of one interface: receive a batch, answer it in order, send the replies.
fn serve_port(mut port: PortHandle, routes: Vec<Route>, cancel: CancellationToken) {
    if let PortIo::Ring(_) = port.io {
        serve_port_ring(&mut port, &routes, &cancel);
    } else {
        serve_port_socket(&port, &routes, &cancel);
    }
}

/// Answers one frame with every blade it addresses whose gate was open when the batch began,
/// writing replies through `emit` (given the route's index).
fn answer(frame: &[u8], routes: &[Route], mut emit: impl FnMut(usize, &mut Blade) -> bool) {
    // Cheap pre-filter; the blade does the full check.
    let Ok(view) = Frame::new_checked(frame) else {
        return;
    };
    if view.is_response() || view.ethertype() != aoe::ETHERTYPE {
        return;
    }
    let (shelf, slot) = (view.shelf(), view.slot());
    for (index, route) in routes.iter().enumerate() {
        let mut blade = route.lock();
        if !blade.is_addressed(shelf, slot) {
            continue;
        }
        if !route.open_this_batch.get() {
            route.stats.count_gated(1);
            continue;
        }
        if !emit(index, &mut blade) {
            return;
        }
    }
}

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
fn serve_port_ring(port: &mut PortHandle, routes: &[Route], cancel: &CancellationToken) {
    let mut last_mtu_check = Instant::now();
    let error_log = LogLimiter::network();
    let mut run = Run {
        max_bytes: run_limit(),
        ..Run::default()
    };
    let replier = Replier::start(&port.iface);
    let mut duties = PortDuties::new();
    while !cancel.is_cancelled() {
        if last_mtu_check.elapsed() >= POLL_INTERVAL {
            port.refresh_mtu();
            last_mtu_check = Instant::now();
        }
        let current = port.port();
        let PortIo::Ring(ring) = &mut port.io else {
            return;
        };
        let readable = match ring.wait_readable(POLL_INTERVAL) {
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
                    answer(frame, routes, |index, blade| match tx.buffer() {
                        Ok(out) => {
                            if let Outcome::Reply(len) = blade.handle(frame, &current, out) {
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
fn prepare(frame: &[u8], routes: &[Route], port: &Port) -> Option<(usize, PreparedTransfer)> {
    routes
        .iter()
        .enumerate()
        .filter(|(_, route)| route.open_this_batch.get())
        .find_map(|(index, route)| Some((index, route.lock().prepare_transfer(frame, port)?)))
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

/// Answers writes that complete after the frame path has moved on (replicated writes waiting
/// for the peer): each is answered by whichever thread completes it (the peer link's reader,
/// as the acknowledgement arrives), through a send-only socket, so that the frame path never
/// waits for the peer and no thread sits between the acknowledgement and the reply.
struct Replier {
    socket: Arc<PacketSocket>,
    /// Writes started and not yet answered.
    in_flight: Arc<(Mutex<usize>, std::sync::Condvar)>,
}

/// Longest a stopping port waits for its writes still in flight (the peer link answers or
/// fails every request well within it).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

impl Replier {
    /// `None` if no send socket can be opened: writes then complete inline.
    fn start(iface: &Interface) -> Option<Replier> {
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
    fn defer(
        &self,
        answerer: super::blade::TransferAnswerer,
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

fn serve_port_socket(port: &PortHandle, routes: &[Route], cancel: &CancellationToken) {
    let PortIo::Socket(socket) = &port.io else {
        return;
    };
    let mut inbox: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; FRAME_BUFFER]).collect();
    let mut inbox_lens = vec![0usize; BATCH];
    let mut outbox: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; FRAME_BUFFER]).collect();
    let mut outbox_lens = vec![0usize; BATCH];
    // The route (blade) each reply in the outbox is from, for the gate check at send time.
    let mut outbox_routes = vec![0usize; BATCH];
    let mut duties = PortDuties::new();
    let mut last_mtu_check = Instant::now();
    let error_log = LogLimiter::network();
    let send_log = LogLimiter::network();
    while !cancel.is_cancelled() {
        if last_mtu_check.elapsed() >= POLL_INTERVAL {
            port.refresh_mtu();
            last_mtu_check = Instant::now();
        }
        let received = match socket.recv_batch(&mut inbox, &mut inbox_lens, POLL_INTERVAL) {
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
            answer(frame, routes, |index, blade| {
                if let Outcome::Reply(reply_len) =
                    blade.handle(frame, &current, &mut outbox[replies])
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
