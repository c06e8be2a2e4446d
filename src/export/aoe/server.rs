//! Runs blades on interfaces: sockets, threads, announce, shutdown.
//!
//! One receive thread per interface reads frames and hands each to the blade(s) it addresses
//! (a broadcast goes to every blade on that interface). One worker thread per blade answers
//! its frames strictly in arrival order — which is what keeps overlapping requests (the Linux
//! driver retransmits under new tags) in order — and sends the replies. The worker's queue
//! holds four times the advertised buffer count, and the socket buffers are sized so the
//! kernel never drops what we advertised; a frame beyond that is dropped and counted.
//!
//! Everything stops when the [`CancellationToken`] is cancelled: the receive threads notice
//! within [`POLL_INTERVAL`], the workers when their queue closes.

use super::blade::{Blade, BladeConfig, Port};
use super::stats::{BladeStats, DropReason};
use crate::block::BlockDevice;
use crate::net::{Interface, PacketSocket};
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::aoe::{self, Frame};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often blocked receive threads look at the cancellation token and re-read the MTU.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Largest frame we ever receive (jumbo frames up to 64 KiB MTU are not a thing on Ethernet,
/// but a buffer this size never truncates anything a NIC delivers).
const RECV_BUFFER: usize = 65536;
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
}

/// An interface we serve on.
struct PortHandle {
    iface: Interface,
    socket: PacketSocket,
    mtu: AtomicU32,
}

impl PortHandle {
    fn port(&self) -> Port {
        Port {
            mac: self.iface.mac,
            mtu: self.mtu.load(Ordering::Relaxed),
        }
    }

    fn refresh_mtu(&self) {
        if let Ok(mtu) = self.iface.mtu() {
            self.mtu.store(mtu, Ordering::Relaxed);
        }
    }
}

/// A frame on its way from a receive thread to a blade's worker.
struct Job {
    port: usize,
    frame: Vec<u8>,
}

/// A running AoE target.
pub struct AoeServer {
    cancel: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    stats: Vec<(String, Arc<BladeStats>)>,
}

impl AoeServer {
    /// Opens the sockets, announces every blade and starts serving.
    pub fn start(exports: Vec<Export>, cancel: CancellationToken) -> Result<AoeServer, StartError> {
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
            let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).map_err(|source| {
                StartError::Socket {
                    name: name.clone(),
                    source,
                }
            })?;
            let mtu = iface.mtu().map_err(|source| StartError::Interface {
                name: name.clone(),
                source,
            })?;
            let buffers: usize = exports
                .iter()
                .filter(|e| e.interfaces.contains(name))
                .map(|e| usize::from(e.config.buffer_count))
                .sum();
            let _ = socket.set_buffer_sizes((buffers * SKB_COST * 2).max(4 << 20));
            ports.push(Arc::new(PortHandle {
                iface,
                socket,
                mtu: AtomicU32::new(mtu),
            }));
        }

        let mut threads = Vec::new();
        let mut stats = Vec::new();
        // routes[port] = blades on that port: (shelf, slot, queue, stats)
        let mut routes: Vec<Vec<Route>> = vec![Vec::new(); ports.len()];
        for export in exports {
            let blade = Blade::new(export.config, export.device);
            let name = blade.config().name();
            let blade_stats = blade.stats();
            stats.push((name.clone(), Arc::clone(&blade_stats)));
            let capacity = usize::from(blade.config().buffer_count).max(1) * 4;
            let (tx, rx) = mpsc::sync_channel::<Job>(capacity);
            let blade_ports: Vec<Arc<PortHandle>> = ports.to_vec();
            for (index, port) in ports.iter().enumerate() {
                if export.interfaces.contains(&port.iface.name) {
                    let (shelf, slot) = blade.address();
                    routes[index].push(Route {
                        shelf,
                        slot,
                        queue: tx.clone(),
                        stats: Arc::clone(&blade_stats),
                    });
                }
            }
            let served: Vec<usize> = (0..ports.len())
                .filter(|i| export.interfaces.contains(&ports[*i].iface.name))
                .collect();
            drop(tx);
            let thread = std::thread::Builder::new()
                .name(format!("aoe-{name}"))
                .spawn(move || run_blade(blade, blade_ports, served, rx))
                .expect("spawning a thread");
            threads.push(thread);
        }
        for (index, port) in ports.iter().enumerate() {
            let port = Arc::clone(port);
            let routes = std::mem::take(&mut routes[index]);
            let cancel = cancel.clone();
            let thread = std::thread::Builder::new()
                .name(format!("aoe-rx-{}", port.iface.name))
                .spawn(move || receive_loop(port, routes, index, cancel))
                .expect("spawning a thread");
            threads.push(thread);
        }
        Ok(AoeServer {
            cancel,
            threads,
            stats,
        })
    }

    /// Counters of every blade, by name.
    pub fn stats(&self) -> &[(String, Arc<BladeStats>)] {
        &self.stats
    }

    /// Stops serving and waits for every thread.
    pub fn stop(self) {
        self.cancel.cancel();
        self.wait();
    }

    /// Waits until the token is cancelled and every thread has finished.
    pub fn wait(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct Route {
    shelf: u16,
    slot: u8,
    queue: SyncSender<Job>,
    stats: Arc<BladeStats>,
}

fn receive_loop(port: Arc<PortHandle>, routes: Vec<Route>, port_index: usize, cancel: CancellationToken) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut last_mtu_check = Instant::now();
    let overflow_log = LogLimiter::network();
    let error_log = LogLimiter::network();
    while !cancel.is_cancelled() {
        if last_mtu_check.elapsed() >= POLL_INTERVAL {
            port.refresh_mtu();
            last_mtu_check = Instant::now();
        }
        let len = match port.socket.recv(&mut buf, POLL_INTERVAL) {
            Ok(Some(len)) => len,
            Ok(None) => continue,
            Err(err) => {
                warn_limited!(error_log, iface = %port.iface.name, %err, "receive failed");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        let frame = &buf[..len];
        // Cheap pre-filter; the blade does the full check.
        let Ok(view) = Frame::new_checked(frame) else {
            continue;
        };
        if view.is_response() {
            continue;
        }
        let (shelf, slot) = (view.shelf(), view.slot());
        for route in &routes {
            let addressed = (shelf == route.shelf || shelf == aoe::BROADCAST_SHELF)
                && (slot == route.slot || slot == aoe::BROADCAST_SLOT);
            if !addressed {
                continue;
            }
            let job = Job {
                port: port_index,
                frame: frame.to_vec(),
            };
            match route.queue.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    route.stats.count_drop(DropReason::QueueFull);
                    warn_limited!(overflow_log, iface = %port.iface.name, shelf = route.shelf, slot = route.slot, "queue full, frame dropped");
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

fn run_blade(mut blade: Blade, ports: Vec<Arc<PortHandle>>, served: Vec<usize>, queue: mpsc::Receiver<Job>) {
    let mut out = vec![0u8; RECV_BUFFER];
    let send_log = LogLimiter::network();
    let name = blade.config().name();
    for &index in &served {
        let port = ports[index].port();
        for dst in blade.announce_destinations() {
            let len = blade.announce(&port, dst, &mut out);
            if let Err(err) = ports[index].socket.send(&out[..len]) {
                tracing::warn!(blade = %name, iface = %ports[index].iface.name, %err, "announce failed");
            }
        }
        tracing::info!(blade = %name, iface = %ports[index].iface.name, mtu = port.mtu, sectors_per_frame = port.max_sectors(), "serving");
    }
    // The queue closes when every receive thread has stopped.
    while let Ok(job) = queue.recv() {
        let handle = &ports[job.port];
        let port = handle.port();
        if let super::blade::Outcome::Reply(len) = blade.handle(&job.frame, &port, &mut out) {
            if let Err(err) = handle.socket.send(&out[..len]) {
                warn_limited!(send_log, blade = %name, iface = %handle.iface.name, %err, "reply not sent");
            }
        }
    }
    tracing::info!(blade = %name, stats = %blade.stats().summary(), "stopped");
}
