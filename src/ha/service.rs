//! The heartbeat service: the I/O around the pure pieces of [`crate::ha`]. It owns the
//! heartbeat sockets (one UDP socket per path) and the one thread that sends and receives on
//! them, and from what it hears it keeps:
//!
//! * whether the peer is alive ([`Heartbeat::peer_dead`], through [`Liveness`]),
//! * the peer's last announced state per resource ([`Heartbeat::peer_resource`]),
//! * how many ping targets the peer last said it reaches ([`Heartbeat::peer_reach`]; kept
//!   when the peer dies: it is what the peer reached when last heard),
//! * our lease ([`Heartbeat::lease`]), which the exports' [`ServeGate`](super::gate::ServeGate)
//!   reads before every reply.
//!
//! What we announce is set with [`Heartbeat::publish`] (and our reach with
//! [`Heartbeat::publish_reach`], by [`crate::ha::ping`]); who cares about changes registers with
//! [`Heartbeat::subscribe`].
//!
//! # The thread
//!
//! One OS thread, started through the [`Supervisor`], does every send and receive on every
//! path and nothing else: no disk I/O, no locks held across anything slow, so a busy node
//! still heartbeats on time. It waits in `poll(2)` on the path sockets and a wake-up channel
//! (for [`Heartbeat::publish`]), never longer than until the next send is due, so it also
//! notices its cancellation token within one interval. It asks for `SCHED_FIFO` like corosync
//! does, so a loaded CPU does not delay it past the dead time; where that is not permitted it
//! runs at normal priority and says so once.
//!
//! Every `interval` it sends a heartbeat on every path; it answers each heartbeat it accepts
//! with an echo reply on the same path. Both carry our resource entries. A datagram is
//! accepted only if its tag verifies with the shared secret, it names the configured peer, and
//! its (boot nonce, sequence) is new ([`ReplayWindow`]); anything else is counted
//! ([`Heartbeat::bad_datagrams`]), logged rate-limited, and changes nothing. The peer's
//! resource state is taken from the newest accepted datagram of its boot: paths reorder, and a
//! late one still proves the peer alive but must not undo newer state. The sockets bind
//! without `SO_REUSEADDR`, so a second daemon on the same address fails to start instead of
//! sharing (and stealing) the heartbeats.
//!
//! # The lease, and why it is sound
//!
//! An echo reply proves the peer heard our heartbeat sent at `sent` (our clock). The peer
//! promotes itself alone only after hearing nothing from us on any path for `dead_time`, so it
//! cannot promote before `sent + dead_time` by its clock. We renew our lease to
//! `sent + lease_time` with `lease_time` = 2/3 `dead_time`, and the exports stop answering when
//! it lapses. The remaining third covers the two clocks running at slightly different rates
//! and the gap between an export's gate check and its send. Only echoes renew the lease: a
//! heartbeat from the peer says the peer is alive, not that it heard us. Echoes are checked
//! against the send times of our recent heartbeats, so one can only vouch for a heartbeat this
//! process really sent within the dead time. When the peer restarts (a new boot nonce) the
//! lease is revoked: the new boot has heard nothing from us.
//!
//! # When the peer is dead
//!
//! The peer is dead once every path has been silent for `dead_time`; a path never heard from
//! counts as silent, but only from `dead_time` after the service started (so a node does not
//! call its peer dead before it could possibly have heard it). While dead, the peer's resource
//! state is forgotten. The replay window is not forgotten on death (it would retire the
//! peer's current boot, and a peer coming back from a network partition without restarting
//! would then be refused for good); instead, while the peer is dead, a new boot whose sequence
//! is past the restart limit (a restart we did not hear early enough) is let in.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::clock::{self, LeaseClock};
use super::gate::ServeGate;
use super::liveness::Liveness;
use super::replay::{Refused, ReplayWindow};
use crate::cluster::Role;
use crate::ratelimit::LogLimiter;
use crate::supervisor::Supervisor;
use crate::wire::heartbeat::{
    HeartbeatRepr, Kind, ResourceEntry, ResourceFlags, StatusFlags, MAX_LEN, MAX_NAME_LEN,
    MAX_RESOURCES, MAX_RESOURCE_NAME_LEN,
};

/// The UDP port heartbeats use on every path unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7790;
/// How often a heartbeat is sent on every path unless configured otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);
/// How long every path must be silent before the peer is declared dead, unless configured
/// otherwise.
pub const DEFAULT_DEAD_TIME: Duration = Duration::from_secs(1);

/// One heartbeat path: our local address `local` and the peer's address `peer` on one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPath {
    /// The path's id, carried in every datagram sent on it.
    pub id: u8,
    /// Our address on this path; the path's socket binds to it.
    pub local: IpAddr,
    /// The peer's address on this path; heartbeats go to it.
    pub peer: IpAddr,
}

/// What the heartbeat service needs to run.
#[derive(Clone)]
pub struct HeartbeatSettings {
    /// Our node name, carried in every datagram.
    pub node: String,
    /// The peer's node name: datagrams naming anyone else are refused.
    pub peer: String,
    /// The shared secret that signs every datagram.
    pub secret: Vec<u8>,
    /// The paths; path `i` pairs our local address `i` with the peer's address `i`.
    pub paths: Vec<HeartbeatPath>,
    /// The UDP port on every path (both ends).
    pub port: u16,
    /// How often a heartbeat goes out on every path.
    pub interval: Duration,
    /// The peer is dead when it has been silent on every path this long.
    pub dead_time: Duration,
}

impl std::fmt::Debug for HeartbeatSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret: settings end up in logs.
        f.debug_struct("HeartbeatSettings")
            .field("node", &self.node)
            .field("peer", &self.peer)
            .field("paths", &self.paths)
            .field("port", &self.port)
            .field("interval", &self.interval)
            .field("dead_time", &self.dead_time)
            .finish_non_exhaustive()
    }
}

impl HeartbeatSettings {
    /// Settings with the default port, interval and dead time.
    pub fn new(
        node: impl Into<String>,
        peer: impl Into<String>,
        secret: impl Into<Vec<u8>>,
        paths: Vec<HeartbeatPath>,
    ) -> HeartbeatSettings {
        HeartbeatSettings {
            node: node.into(),
            peer: peer.into(),
            secret: secret.into(),
            paths,
            port: DEFAULT_PORT,
            interval: DEFAULT_INTERVAL,
            dead_time: DEFAULT_DEAD_TIME,
        }
    }

    /// How long an echo reply keeps our lease: 2/3 of the dead time (see the module docs).
    pub fn lease_time(&self) -> Duration {
        self.dead_time * 2 / 3
    }

    fn validate(&self) -> Result<(), HeartbeatError> {
        let invalid = |reason: String| Err(HeartbeatError::Settings(reason));
        for (what, name) in [("node", &self.node), ("peer", &self.peer)] {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return invalid(format!(
                    "the {what} name must be 1..={MAX_NAME_LEN} bytes, not {}",
                    name.len()
                ));
            }
        }
        if self.node == self.peer {
            return invalid(format!("node and peer are both named {:?}", self.node));
        }
        if self.secret.is_empty() {
            return invalid("the secret is empty".to_string());
        }
        if self.paths.is_empty() {
            return invalid("no heartbeat paths".to_string());
        }
        for (i, path) in self.paths.iter().enumerate() {
            if self.paths[..i].iter().any(|other| other.id == path.id) {
                return invalid(format!("path id {} is used twice", path.id));
            }
            if path.local.is_ipv4() != path.peer.is_ipv4() {
                return invalid(format!(
                    "path {} pairs {} with {}: one IPv4, one IPv6",
                    path.id, path.local, path.peer
                ));
            }
        }
        if self.interval.is_zero() || self.dead_time <= self.interval {
            return invalid(format!(
                "the dead time ({:?}) must be longer than the interval ({:?}), which must not be 0",
                self.dead_time, self.interval
            ));
        }
        Ok(())
    }
}

/// What we announce for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalResource {
    /// Our role for it.
    pub role: Role,
    /// We serve its exports.
    pub serving: bool,
    /// Our disk is UpToDate.
    pub up_to_date: bool,
    /// We have persisted Outdated on our disk.
    pub outdated: bool,
    /// We are a primary that lost the replication link and ask the peer to persist Outdated.
    pub outdate_request: bool,
    /// We stepped down for the peer in a planned switchover: it should take over.
    pub handing_over: bool,
    /// We (a Secondary) ask the peer to hand the primary role over.
    pub wants_switchover: bool,
}

impl LocalResource {
    fn flags(&self) -> ResourceFlags {
        ResourceFlags::default()
            .with(ResourceFlags::SERVING, self.serving)
            .with(ResourceFlags::UP_TO_DATE, self.up_to_date)
            .with(ResourceFlags::OUTDATED, self.outdated)
            .with(ResourceFlags::OUTDATE_REQUEST, self.outdate_request)
            .with(ResourceFlags::HANDING_OVER, self.handing_over)
            .with(ResourceFlags::WANTS_SWITCHOVER, self.wants_switchover)
    }
}

/// What the peer last announced for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerResource {
    /// The peer's role for it.
    pub role: Role,
    /// The peer serves its exports.
    pub serving: bool,
    /// The peer's disk is UpToDate.
    pub up_to_date: bool,
    /// The peer has persisted Outdated on its disk.
    pub outdated: bool,
    /// The peer, a primary that lost the replication link, asks us to persist Outdated.
    pub outdate_request: bool,
    /// The peer stepped down for us in a planned switchover.
    pub handing_over: bool,
    /// The peer asks us to hand the primary role over.
    pub wants_switchover: bool,
}

impl PeerResource {
    fn from_entry(entry: &ResourceEntry) -> PeerResource {
        PeerResource {
            role: entry.role,
            serving: entry.flags.serving(),
            up_to_date: entry.flags.up_to_date(),
            outdated: entry.flags.outdated(),
            outdate_request: entry.flags.outdate_request(),
            handing_over: entry.flags.handing_over(),
            wants_switchover: entry.flags.wants_switchover(),
        }
    }
}

/// One path as [`Heartbeat::paths`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathReport {
    /// The path's id.
    pub id: u8,
    /// Our address on it.
    pub local: IpAddr,
    /// The peer's address on it.
    pub peer: IpAddr,
    /// How long ago the peer was last heard on it; `None` if never.
    pub last_heard_age: Option<Duration>,
    /// The smoothed round trip on it; `None` before the first echo reply.
    pub rtt: Option<Duration>,
    /// It has been silent for the dead time (or was never heard).
    pub silent: bool,
}

/// Why the heartbeat service could not start.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The settings cannot work.
    #[error("heartbeat settings: {0}")]
    Settings(String),
    /// A path's socket could not be bound (the address is not ours, or the port is taken).
    #[error("cannot bind the heartbeat socket to {address}: {source}")]
    Bind {
        /// The address it should have been bound to.
        address: SocketAddr,
        /// Why not.
        source: io::Error,
    },
    /// The channel that wakes the thread on a publish could not be made.
    #[error("cannot create the heartbeat wake-up channel: {0}")]
    WakeChannel(io::Error),
    /// The thread could not be started.
    #[error("cannot start the heartbeat thread: {0}")]
    Spawn(io::Error),
}

type Callback = Arc<dyn Fn() + Send + Sync>;

/// The running heartbeat service (see the module docs). Cheap to clone: clones share it. It
/// runs until its [`Supervisor`] group stops.
#[derive(Clone)]
pub struct Heartbeat {
    shared: Arc<Shared>,
}

/// What the heartbeat thread and the handles share.
struct Shared {
    node: String,
    peer: String,
    paths: Vec<HeartbeatPath>,
    dead_time: Duration,
    lease_time: Duration,
    started: Instant,
    lease: LeaseClock,
    state: Mutex<State>,
    /// Writing a byte here wakes the thread to send at once.
    wake: UnixDatagram,
    bad_datagrams: AtomicU64,
    /// Times the heartbeat thread found the process had stood still for a lease or more.
    pauses: AtomicU64,
    /// How long the last such pause was, ms.
    last_pause_ms: AtomicU64,
    /// When the heartbeat thread last went round its loop (process-epoch nanoseconds).
    last_round_nanos: AtomicU64,
}

struct State {
    local: BTreeMap<String, LocalResource>,
    /// The serve gate of each resource that has one: "serving" is announced only while it
    /// lets replies out, so a node that wakes from a freeze never claims to serve on the
    /// strength of what it published before.
    gates: HashMap<String, Arc<ServeGate>>,
    peer: BTreeMap<String, PeerResource>,
    /// The ping targets we reach (`None`: none configured), announced in every datagram.
    own_reach: Option<u8>,
    /// What the peer's newest datagram said it reaches; not forgotten when it dies.
    peer_reach: Option<u8>,
    liveness: Liveness,
    subscribers: HashMap<String, Vec<Callback>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking subscriber never runs under the lock, so poisoning means nothing here.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn peer_dead_at(&self, state: &State, now: Instant) -> bool {
        now.saturating_duration_since(self.started) >= self.dead_time
            && state.liveness.peer_dead(now)
    }
}

impl Heartbeat {
    /// Binds one socket per path and starts the heartbeat thread in `group`. Fails if the
    /// settings cannot work or a socket cannot be bound; nothing is left running then.
    pub fn start(
        settings: HeartbeatSettings,
        group: &Supervisor,
    ) -> Result<Heartbeat, HeartbeatError> {
        let thread_name = format!("heartbeat-{}", settings.peer);
        let (heartbeat, runner) = Heartbeat::prepare(settings)?;
        group
            .spawn(thread_name, move |token| runner.run(token))
            .map_err(HeartbeatError::Spawn)?;
        Ok(heartbeat)
    }

    /// Everything [`start`](Self::start) does but start the thread: the handle, and the
    /// thread's state to run (tests drive it datagram by datagram).
    fn prepare(settings: HeartbeatSettings) -> Result<(Heartbeat, Runner), HeartbeatError> {
        settings.validate()?;
        let mut sockets = Vec::with_capacity(settings.paths.len());
        for path in &settings.paths {
            let address = SocketAddr::new(path.local, settings.port);
            let socket = bind_exclusive(address)
                .map_err(|source| HeartbeatError::Bind { address, source })?;
            sockets.push(PathSocket {
                path: *path,
                peer: SocketAddr::new(path.peer, settings.port),
                socket,
            });
        }
        let (wake, woken) = UnixDatagram::pair().map_err(HeartbeatError::WakeChannel)?;
        for end in [&wake, &woken] {
            end.set_nonblocking(true)
                .map_err(HeartbeatError::WakeChannel)?;
        }
        let ids: Vec<u8> = settings.paths.iter().map(|path| path.id).collect();
        let shared = Arc::new(Shared {
            node: settings.node.clone(),
            peer: settings.peer.clone(),
            paths: settings.paths.clone(),
            dead_time: settings.dead_time,
            lease_time: settings.lease_time(),
            started: Instant::now(),
            lease: LeaseClock::new(),
            state: Mutex::new(State {
                local: BTreeMap::new(),
                peer: BTreeMap::new(),
                own_reach: None,
                peer_reach: None,
                liveness: Liveness::new(&ids, settings.dead_time),
                subscribers: HashMap::new(),
                gates: HashMap::new(),
            }),
            wake,
            bad_datagrams: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            last_pause_ms: AtomicU64::new(0),
            last_round_nanos: AtomicU64::new(clock::now_nanos()),
        });
        let runner = Runner {
            shared: shared.clone(),
            secret: settings.secret,
            interval: settings.interval,
            sockets,
            woken,
            boot_nonce: rand::random(),
            next_sequence: 0,
            replay: ReplayWindow::new(),
            peer_latest: None,
            reported_dead: false,
            recent_sends: VecDeque::new(),
            send_buf: vec![0; MAX_LEN],
            recv_buf: vec![0; MAX_LEN + 1],
        };
        Ok((Heartbeat { shared }, runner))
    }

    /// Sets what we announce for `resource` from now on. A change goes out at once on every
    /// path, not at the next interval. Names must be 1..=64 bytes and at most 16 resources
    /// can be announced; anything else is a programming error, logged and ignored.
    pub fn publish(&self, resource: &str, state: LocalResource) {
        if resource.is_empty() || resource.len() > MAX_RESOURCE_NAME_LEN {
            tracing::error!(
                resource,
                "not announcing a resource whose name is not 1..={MAX_RESOURCE_NAME_LEN} bytes"
            );
            return;
        }
        let changed = {
            let mut st = lock(&self.shared.state);
            if !st.local.contains_key(resource) && st.local.len() >= MAX_RESOURCES {
                tracing::error!(
                    resource,
                    "not announcing more than {MAX_RESOURCES} resources in heartbeats"
                );
                return;
            }
            st.local.insert(resource.to_string(), state) != Some(state)
        };
        if changed {
            // Non-blocking: if the channel is full, a wake-up is pending already.
            let _ = self.shared.wake.send(&[1]);
        }
    }

    /// Sets how many ping targets we reach (`None`: none configured), announced from now on;
    /// a change goes out at once and every subscriber is told.
    pub fn publish_reach(&self, reach: Option<u8>) {
        let callbacks: Vec<Callback> = {
            let mut st = lock(&self.shared.state);
            if st.own_reach == reach {
                return;
            }
            st.own_reach = reach;
            st.subscribers.values().flatten().cloned().collect()
        };
        let _ = self.shared.wake.send(&[1]);
        runner::fire(callbacks);
    }

    /// The ping targets we reach, as last published.
    pub fn own_reach(&self) -> Option<u8> {
        lock(&self.shared.state).own_reach
    }

    /// The ping targets the peer last said it reaches (`None`: never heard, or it has none
    /// configured). Kept while the peer is dead: it is what the peer reached when last heard.
    pub fn peer_reach(&self) -> Option<u8> {
        lock(&self.shared.state).peer_reach
    }

    /// Announces `resource` as served only while `gate` lets replies out (checked as each
    /// datagram is built).
    pub fn serve_through(&self, resource: &str, gate: Arc<ServeGate>) {
        lock(&self.shared.state)
            .gates
            .insert(resource.to_string(), gate);
    }

    /// Calls `on_change` (from the heartbeat thread: it must not block) whenever the peer's
    /// state for `resource` changes ([`peer_resource`](Self::peer_resource)) and whenever
    /// [`peer_dead`](Self::peer_dead) flips, and whenever our or the peer's reach changes.
    /// It reads the new state itself.
    pub fn subscribe(&self, resource: &str, on_change: Box<dyn Fn() + Send + Sync>) {
        lock(&self.shared.state)
            .subscribers
            .entry(resource.to_string())
            .or_default()
            .push(Arc::from(on_change));
    }

    /// The peer has been silent on every path for the dead time (see the module docs).
    pub fn peer_dead(&self) -> bool {
        let st = lock(&self.shared.state);
        self.shared.peer_dead_at(&st, Instant::now())
    }

    /// The peer is heard on some path now (not silent for the dead time on at least one).
    pub fn peer_heard(&self) -> bool {
        let st = lock(&self.shared.state);
        !st.liveness.peer_dead(Instant::now())
    }

    /// What the peer last announced for `resource`; `None` if it never did or it is dead.
    pub fn peer_resource(&self, resource: &str) -> Option<PeerResource> {
        let st = lock(&self.shared.state);
        if self.shared.peer_dead_at(&st, Instant::now()) {
            return None;
        }
        st.peer.get(resource).copied()
    }

    /// Every path, in configuration order: when the peer was last heard on it, the round
    /// trip, and whether it is silent.
    pub fn paths(&self) -> Vec<PathReport> {
        let st = lock(&self.shared.state);
        let status = st.liveness.status(Instant::now());
        self.shared
            .paths
            .iter()
            .zip(status)
            .map(|(path, status)| PathReport {
                id: path.id,
                local: path.local,
                peer: path.peer,
                last_heard_age: status.last_heard_age,
                rtt: status.rtt,
                silent: status.silent,
            })
            .collect()
    }

    /// Our lease, renewed by the peer's echo replies (see the module docs).
    pub fn lease(&self) -> LeaseClock {
        self.shared.lease.clone()
    }

    /// Only one path is configured: a broken link then looks like a dead peer.
    pub fn single_path(&self) -> bool {
        self.shared.paths.len() == 1
    }

    /// How often this process stood still for a lease or more (seen by the heartbeat
    /// thread), and how long the last pause was.
    pub fn pauses(&self) -> (u64, Duration) {
        (
            self.shared.pauses.load(Ordering::Acquire),
            Duration::from_millis(self.shared.last_pause_ms.load(Ordering::Acquire)),
        )
    }

    /// How long the heartbeat thread has not gone round its loop, if that is a lease or more:
    /// the process is just waking from a pause the thread has not noticed yet (or the thread
    /// is starved, which the peer cannot tell from a pause either).
    pub fn quiet_for(&self) -> Option<Duration> {
        let last = clock::instant_at(self.shared.last_round_nanos.load(Ordering::Acquire));
        let quiet = Instant::now().saturating_duration_since(last);
        (quiet >= self.shared.lease_time).then_some(quiet)
    }

    /// How many received datagrams were refused (bad tag, wrong sender, replayed, bad echo).
    pub fn bad_datagrams(&self) -> u64 {
        self.shared.bad_datagrams.load(Ordering::Relaxed)
    }
}

mod runner;
use runner::{bind_exclusive, PathSocket, Runner};

#[cfg(test)]
mod tests;
