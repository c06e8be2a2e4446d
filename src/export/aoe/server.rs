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
//! This file owns the setup (sockets, service MACs, one route per blade and port), the work a
//! port does between batches and the answer to one frame; the rest is in submodules:
//!
//! * [`ring`]: the `PACKET_MMAP` frame path and its runs of adjacent transfers;
//!   [`replier`]: the replies to writes that complete after that path moved on.
//! * [`socket`]: the `recvmmsg`/`sendmmsg` frame path (the fallback).
//! * [`announce`]: when a blade announces itself, and the announce.
//! * [`rival`]: the rival queries and the look at every received frame for a rival's answer
//!   (the multiple-mount protection below).
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

mod announce;
mod replier;
mod ring;
mod rival;
mod socket;

use super::blade::{Blade, BladeConfig, Port};
use super::probe::{RivalAlarm, RIVAL_CHECK_INTERVAL};
use super::service_mac::{check_service_mac, ServiceMacError};
use super::stats::BladeStats;
use crate::block::BlockDevice;
use crate::ha::gate::ServeGate;
use crate::net::{Interface, PacketRing, PacketSocket, SLOT_SIZE};
use crate::supervisor::Supervisor;
use crate::wire::aoe::{self, Frame};
use crate::wire::MacAddr;
use announce::{announce, AnnounceSchedule};
use ring::serve_port_ring;
use socket::serve_port_socket;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use announce::{ANNOUNCE_REFRESH, ANNOUNCE_SPACING, SERVICE_ANNOUNCE_BURST};

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

/// How long a port waits for frames at most while an announce is due within
/// [`POLL_INTERVAL`]. A fixed step rather than the exact time left, so the `recvmmsg` path's
/// receive timeout (a socket option) changes rarely.
const DUTY_TICK: Duration = Duration::from_millis(50);

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
        rival::send_queries(iface, current, routes, send);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::NullDevice;

    pub(super) const INTERFACE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x10]);
    pub(super) const SERVICE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x20]);
    pub(super) const CLIENT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x30]);

    /// A route to blade e0.5 at `service_mac`, guarded by an alarm that counts its calls.
    pub(super) fn guarded_route(service_mac: Option<MacAddr>) -> (Route, Arc<AtomicU32>) {
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
}
