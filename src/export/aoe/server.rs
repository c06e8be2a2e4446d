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
//! and frames from the port's own MAC (or a blade's service MAC) are dropped besides.
//!
//! # Service MACs
//!
//! A blade exported with [`Export::service_mac`] lives at that MAC instead of the interface's:
//! the port's socket joins it as an extra unicast address for as long as the socket is open
//! (the kernel drops it when the socket closes, also when the process is killed; the
//! interface's own MAC never changes), the blade takes only frames sent to it or broadcast,
//! and every reply, announce and rival query of the blade leaves from it. When the blade moves
//! to the other node, the MAC moves with it, and the Linux driver's retransmissions to the MAC
//! it knows reach the new node without it abandoning a target (which takes it ~10 s).
//!
//! Such a blade announces itself [`SERVICE_ANNOUNCE_BURST`] times when its gate opens and
//! then every [`ANNOUNCE_REFRESH`] while it stays open, which is also what keeps every
//! bridge's forwarding entry for the MAC pointing at this node; it sends rival queries only
//! while its gate is open (a query from the MAC would steer that entry too). Another node
//! answering from the same MAC is a rival as well: we never hear our own frames.

use super::blade::{Blade, BladeConfig, Outcome, Port, PreparedTransfer};
use super::probe::{self, RivalAlarm, RIVAL_CHECK_INTERVAL};
use super::service_mac::{check_service_mac, ServiceMacError};
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
    /// A blade's service MAC is not a unicast address.
    #[error("e{shelf}.{slot}: {source}")]
    ServiceMac {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
        /// Why the MAC is refused.
        #[source]
        source: ServiceMacError,
    },
    /// The kernel refused to receive frames for a service MAC on an interface.
    #[error("joining service MAC {mac} on {name}: {source}")]
    JoinServiceMac {
        /// Interface name.
        name: String,
        /// The service MAC.
        mac: MacAddr,
        /// What failed.
        #[source]
        source: io::Error,
    },
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
    /// Where the blade lives: `None` answers from each interface's own MAC (as vblade);
    /// `Some` answers only frames sent to this MAC (or broadcast), and sends every reply,
    /// announce and rival query from it, so that the blade's address moves with the blade
    /// from node to node (see [`super::service_mac`]). The port's socket receives it for as
    /// long as the socket is open; the interface's own MAC is not used for the blade at all.
    pub service_mac: Option<MacAddr>,
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
            if let Some(mac) = export.service_mac {
                check_service_mac(mac).map_err(|source| StartError::ServiceMac {
                    shelf,
                    slot,
                    source,
                })?;
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
            let mut service_macs: Vec<MacAddr> = exports
                .iter()
                .filter(|e| e.interfaces.contains(name))
                .filter_map(|e| e.service_mac)
                .collect();
            service_macs.sort();
            service_macs.dedup();
            for mac in service_macs {
                io.join_unicast(mac)
                    .map_err(|source| StartError::JoinServiceMac {
                        name: name.clone(),
                        mac,
                        source,
                    })?;
            }
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
                        service_mac: export.service_mac,
                        open_this_batch: Cell::new(false),
                    });
                }
            }
        }

        for (port, routes) in ports.into_iter().zip(routes) {
            for route in &routes {
                let blade = route.lock();
                let current = route.port_for(&port.port());
                tracing::info!(blade = %blade.config().name(), iface = %port.iface.name, mac = %current.mac, mtu = current.mtu, sectors_per_frame = current.max_sectors(), gate = %route.gate.authority(), guarded = route.guard.is_some(), "serving");
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
    /// The blade's service MAC, if it has one (see [`Export::service_mac`]).
    service_mac: Option<MacAddr>,
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

    /// The port as this blade sees it: replies leave from its service MAC, if it has one.
    fn port_for(&self, interface: &Port) -> Port {
        Port {
            mac: self.service_mac.unwrap_or(interface.mac),
            ..*interface
        }
    }

    /// Whether a frame sent to `dst` may be for this blade: a blade at a service MAC takes
    /// only frames sent to it or broadcast; one at the interface's MAC takes whatever the
    /// socket hears (as vblade).
    fn takes(&self, dst: MacAddr) -> bool {
        match self.service_mac {
            Some(mac) => dst == mac || dst.is_broadcast(),
            None => true,
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

impl PortIo {
    fn join_unicast(&self, mac: MacAddr) -> io::Result<()> {
        match self {
            PortIo::Ring(ring) => ring.join_unicast(mac),
            PortIo::Socket(socket) => socket.join_unicast(mac),
        }
    }
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

/// Announces sent in a row when the gate of a blade at a service MAC opens. The announce is
/// also what moves every bridge's forwarding entry for the MAC to this node, so one lost frame
/// must not leave the entry pointing at the node the MAC came from. A blade at its
/// interface's MAC announces once, as vblade does.
pub const SERVICE_ANNOUNCE_BURST: u32 = 3;
/// Time between the announces of that burst.
pub const ANNOUNCE_SPACING: Duration = Duration::from_millis(100);
/// How often a blade at a service MAC announces itself while its gate stays open (keepalived's
/// `garp_master_refresh`): one stray frame from the node the MAC came from — one that woke up
/// from a freeze — steers a bridge's forwarding entry away until the owner sends again, and a
/// blade nobody asks anything sends nothing else. A little under a second, so that waking up
/// late never stretches the gap between two announces beyond one.
pub const ANNOUNCE_REFRESH: Duration = Duration::from_millis(900);
/// How long a port waits for frames at most while an announce is due within
/// [`POLL_INTERVAL`]. A fixed step rather than the exact time left, so the `recvmmsg` path's
/// receive timeout (a socket option) changes rarely.
const DUTY_TICK: Duration = Duration::from_millis(50);

/// When one blade announces itself next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AnnounceSchedule {
    /// When the next announce is due; `None` while the gate is closed, and after the single
    /// announce of a blade that does not refresh.
    next: Option<Instant>,
    /// Announces of the opening burst left after the next one.
    burst_left: u32,
}

impl AnnounceSchedule {
    /// The gate opened at `now`: `burst` announces start now.
    fn opened(&mut self, now: Instant, burst: u32) {
        self.next = Some(now);
        self.burst_left = burst.saturating_sub(1);
    }

    /// The gate is closed: nothing more until it opens again.
    fn closed(&mut self) {
        *self = AnnounceSchedule::default();
    }

    /// Whether an announce is due at `now`; if so, it counts as sent and the following one
    /// is scheduled (after the burst, every [`ANNOUNCE_REFRESH`] if `refresh`).
    fn take_due(&mut self, now: Instant, refresh: bool) -> bool {
        if self.next.is_none_or(|due| due > now) {
            return false;
        }
        self.next = if self.burst_left > 0 {
            self.burst_left -= 1;
            Some(now + ANNOUNCE_SPACING)
        } else if refresh {
            Some(now + ANNOUNCE_REFRESH)
        } else {
            None
        };
        true
    }
}

/// What a port does between batches: reads every blade's gate for the coming batch,
/// announces the blades whose gate just opened (and keeps announcing those at a service MAC
/// while it stays open), and, once per [`RIVAL_CHECK_INTERVAL`], asks the wire whether anyone
/// else answers for a guarded blade's address.
struct PortDuties {
    next_rival_check: Instant,
    /// One per route, in route order.
    announces: Vec<AnnounceSchedule>,
    scratch: Vec<u8>,
}

impl PortDuties {
    fn new(routes: &[Route]) -> PortDuties {
        PortDuties {
            next_rival_check: Instant::now(),
            announces: vec![AnnounceSchedule::default(); routes.len()],
            scratch: vec![0u8; FRAME_BUFFER],
        }
    }

    /// How long the frame path may wait for frames before these duties need running again.
    fn wait_limit(&self, now: Instant) -> Duration {
        let soonest = self.announces.iter().filter_map(|a| a.next).min();
        match soonest {
            Some(due) if due.saturating_duration_since(now) < POLL_INTERVAL => {
                DUTY_TICK.min(POLL_INTERVAL)
            }
            _ => POLL_INTERVAL,
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
        let now = Instant::now();
        for (route, schedule) in routes.iter().zip(&mut self.announces) {
            let at_service_mac = route.service_mac.is_some();
            let opened = route.refresh_gate();
            if opened {
                let burst = if at_service_mac {
                    SERVICE_ANNOUNCE_BURST
                } else {
                    1
                };
                schedule.opened(now, burst);
            } else if !route.open_this_batch.get() {
                schedule.closed();
            }
            if schedule.take_due(now, at_service_mac) {
                let blade_port = route.port_for(current);
                announce(&mut self.scratch, iface, &blade_port, route, opened, send);
            }
        }
        if now < self.next_rival_check {
            return;
        }
        self.next_rival_check = now + RIVAL_CHECK_INTERVAL;
        for route in routes.iter().filter(|r| r.guard.is_some()) {
            // A blade asks only while it answers: one that does not is nobody's rival (the
            // node that answers instead is its rightful successor), and a query from a service
            // MAC would steer the bridges' forwarding entry for it away from that node.
            if !route.gate.may_answer() {
                continue;
            }
            let (shelf, slot) = route.address;
            let query = probe::config_query(route.port_for(current).mac, shelf, slot);
            if let Err(err) = send(&query) {
                static QUERY_LOG: LogLimiter = LogLimiter::network();
                warn_limited!(QUERY_LOG, iface = %iface.name, %err, "rival query not sent");
            }
        }
    }
}

/// Sends the blade's unsolicited config response from `port.mac` (broadcast, or to each
/// masked MAC) and counts it. `first`: the first since the gate opened (logged).
fn announce(
    scratch: &mut [u8],
    iface: &Interface,
    port: &Port,
    route: &Route,
    first: bool,
    send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) {
    static ANNOUNCE_LOG: LogLimiter = LogLimiter::network();
    let blade = route.lock();
    for dst in blade.announce_destinations() {
        let len = blade.announce(port, dst, scratch);
        // The gate was open an instant ago, but it is the gate at send time that counts.
        if !route.may_send(1) {
            return;
        }
        match send(&scratch[..len]) {
            Ok(()) => route.stats.count_announce(),
            Err(err) => {
                warn_limited!(ANNOUNCE_LOG, blade = %blade.config().name(), iface = %iface.name, %err, "announce failed")
            }
        }
    }
    if first {
        tracing::info!(blade = %blade.config().name(), iface = %iface.name, mac = %port.mac, "announced");
    }
}

/// Looks at a received frame before it is answered: a response is never answered, but one
/// for a guarded blade's address from another node raises that blade's [`RivalAlarm`].
/// Returns whether the frame is a request to answer.
///
/// A blade at a service MAC never sends from the interface's MAC, and the port's socket never
/// hears its own frames (`PACKET_IGNORE_OUTGOING`): a response for its address from its own
/// service MAC comes from another node that took the MAC, and is a rival's too — the one kind
/// of rival a query can never reach, as a bridge does not send a frame back to the port it
/// learned the destination on, but whose refresh announces it hears.
fn screen(frame: &[u8], routes: &[Route], interface_mac: MacAddr) -> bool {
    let Ok(view) = Frame::new_checked(frame) else {
        // The blade counts it.
        return true;
    };
    if view.is_response() {
        for route in routes {
            let Some(alarm) = &route.guard else { continue };
            // Multiple-mount protection guards a blade that answers: a node that woke from a
            // pause with its gate shut hears its successor, which is no conflict.
            if !route.gate.may_answer() {
                continue;
            }
            let (shelf, slot) = route.address;
            if let Some(rival) = probe::responder(frame, shelf, slot, interface_mac) {
                alarm.raise(rival, shelf, slot, Instant::now());
            }
        }
        return false;
    }
    // Our own rival queries, should the kernel loop them back (ignoring outgoing frames is
    // best effort): the blade must not answer its own question.
    let src = view.src();
    src != interface_mac && routes.iter().all(|r| r.service_mac != Some(src))
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
/// writing replies through `emit` (given the route's index and the port as that blade sees
/// it, `interface` with the blade's service MAC if it has one).
fn answer(
    frame: &[u8],
    routes: &[Route],
    interface: &Port,
    mut emit: impl FnMut(usize, &mut Blade, &Port) -> bool,
) {
    // Cheap pre-filter; the blade does the full check.
    let Ok(view) = Frame::new_checked(frame) else {
        return;
    };
    if view.is_response() || view.ethertype() != aoe::ETHERTYPE {
        return;
    }
    let (shelf, slot) = (view.shelf(), view.slot());
    let dst = view.dst();
    for (index, route) in routes.iter().enumerate() {
        if !route.takes(dst) {
            continue;
        }
        let mut blade = route.lock();
        if !blade.is_addressed(shelf, slot) {
            continue;
        }
        if !route.open_this_batch.get() {
            route.stats.count_gated(1);
            continue;
        }
        if !emit(index, &mut blade, &route.port_for(interface)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::NullDevice;

    const INTERFACE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x10]);
    const SERVICE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x20]);
    const CLIENT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x30]);

    /// A route to blade e0.5 at `service_mac`, guarded by an alarm that counts its calls.
    fn guarded_route(service_mac: Option<MacAddr>) -> (Route, Arc<AtomicU32>) {
        let blade = Blade::new(
            BladeConfig::new(0, 5),
            Arc::new(NullDevice::new(1 << 20)) as Arc<dyn BlockDevice>,
        );
        let raised = Arc::new(AtomicU32::new(0));
        let counter = raised.clone();
        let alarm = RivalAlarm::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let route = Route {
            stats: blade.stats(),
            blade: Arc::new(Mutex::new(blade)),
            gate: ServeGate::always_open(),
            address: (0, 5),
            guard: Some(Arc::new(alarm)),
            service_mac,
            open_this_batch: Cell::new(true),
        };
        (route, raised)
    }

    fn query_from(src: MacAddr) -> Vec<u8> {
        probe::config_query(src, 0, 5)
    }

    fn answer_from(src: MacAddr) -> Vec<u8> {
        let mut frame = query_from(src);
        Frame::new_unchecked(&mut frame[..]).set_version_flags(aoe::VERSION, aoe::FLAG_RESPONSE);
        frame
    }

    #[test]
    fn a_blade_at_a_service_mac_takes_only_frames_to_it_or_broadcast() {
        let (at_service_mac, _) = guarded_route(Some(SERVICE_MAC));
        assert!(at_service_mac.takes(SERVICE_MAC));
        assert!(at_service_mac.takes(MacAddr::BROADCAST));
        assert!(!at_service_mac.takes(INTERFACE_MAC));
        assert!(!at_service_mac.takes(CLIENT_MAC));
        let (at_interface_mac, _) = guarded_route(None);
        for dst in [SERVICE_MAC, MacAddr::BROADCAST, INTERFACE_MAC] {
            assert!(at_interface_mac.takes(dst), "{dst}");
        }
        let interface = Port {
            mac: INTERFACE_MAC,
            mtu: 1500,
        };
        assert_eq!(at_service_mac.port_for(&interface).mac, SERVICE_MAC);
        assert_eq!(at_interface_mac.port_for(&interface).mac, INTERFACE_MAC);
    }

    #[test]
    fn another_node_answering_from_our_service_mac_is_a_rival() {
        let (route, raised) = guarded_route(Some(SERVICE_MAC));
        let routes = [route];
        // Our socket never hears its own frames: an answer from the service MAC is another
        // node's, one that took the MAC.
        assert!(!screen(&answer_from(SERVICE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&answer_from(CLIENT_MAC), &routes, INTERFACE_MAC));
        // The interface's MAC is the port's own.
        assert!(!screen(&answer_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert_eq!(raised.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_answer_from_the_interface_mac_is_not_a_rival_of_a_blade_at_it() {
        let (route, raised) = guarded_route(None);
        let routes = [route];
        assert!(!screen(&answer_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&answer_from(CLIENT_MAC), &routes, INTERFACE_MAC));
        assert_eq!(raised.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn our_own_queries_are_never_requests_to_answer() {
        let (route, _) = guarded_route(Some(SERVICE_MAC));
        let routes = [route];
        assert!(!screen(&query_from(SERVICE_MAC), &routes, INTERFACE_MAC));
        assert!(!screen(&query_from(INTERFACE_MAC), &routes, INTERFACE_MAC));
        assert!(screen(&query_from(CLIENT_MAC), &routes, INTERFACE_MAC));
    }

    /// Announces `schedule` sends when looked at every `step` from `start` until `end`.
    fn announces_between(
        schedule: &mut AnnounceSchedule,
        start: Instant,
        end: Duration,
        step: Duration,
        refresh: bool,
    ) -> Vec<Duration> {
        let mut sent = Vec::new();
        let mut at = Duration::ZERO;
        while at <= end {
            if schedule.take_due(start + at, refresh) {
                sent.push(at);
            }
            at += step;
        }
        sent
    }

    #[test]
    fn a_blade_at_its_interface_mac_announces_once_when_the_gate_opens() {
        let start = Instant::now();
        let mut schedule = AnnounceSchedule::default();
        assert!(!schedule.take_due(start, false), "closed: nothing due");
        schedule.opened(start, 1);
        let sent = announces_between(
            &mut schedule,
            start,
            Duration::from_secs(5),
            Duration::from_millis(10),
            false,
        );
        assert_eq!(sent, vec![Duration::ZERO]);
    }

    #[test]
    fn a_service_mac_announces_a_burst_then_refreshes_while_open() {
        let start = Instant::now();
        let mut schedule = AnnounceSchedule::default();
        schedule.opened(start, SERVICE_ANNOUNCE_BURST);
        let sent = announces_between(
            &mut schedule,
            start,
            Duration::from_millis(4_950),
            Duration::from_millis(10),
            true,
        );
        // Three 100 ms apart, then one every 900 ms: 0, 100, 200, 1100, 2000, 2900, 3800, 4700.
        assert_eq!(sent.len(), 8, "{sent:?}");
        assert_eq!(&sent[..3], &[0, 100, 200].map(Duration::from_millis));
        for pair in sent.windows(2) {
            assert!(pair[1] - pair[0] <= Duration::from_secs(1), "{sent:?}");
        }
    }

    #[test]
    fn announces_stop_when_the_gate_closes_and_restart_with_a_burst() {
        let start = Instant::now();
        let step = Duration::from_millis(10);
        let mut schedule = AnnounceSchedule::default();
        schedule.opened(start, SERVICE_ANNOUNCE_BURST);
        let before = announces_between(&mut schedule, start, Duration::from_secs(2), step, true);
        assert_eq!(before.len(), 5, "{before:?}");
        schedule.closed();
        let later = start + Duration::from_secs(3);
        let while_closed =
            announces_between(&mut schedule, later, Duration::from_secs(5), step, true);
        assert!(while_closed.is_empty(), "{while_closed:?}");
        let reopened = start + Duration::from_secs(10);
        schedule.opened(reopened, SERVICE_ANNOUNCE_BURST);
        let after = announces_between(
            &mut schedule,
            reopened,
            Duration::from_millis(250),
            step,
            true,
        );
        assert_eq!(after.len(), 3, "{after:?}");
    }
}
