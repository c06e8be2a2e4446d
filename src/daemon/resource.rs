//! One resource on this node: the engine thread that feeds the cluster [`Machine`] and carries
//! out its [`Action`]s, the connection thread that reaches the peer, the reader of an
//! established connection, and the resync copier.
//!
//! Threads and who owns what:
//!
//! * **engine** (one per resource): owns the `Machine`, the exports and the resync job. Every
//!   other thread talks to it through its [`Input`] channel; it never blocks on the network
//!   except to stop an export.
//! * **connector**: while the engine wants a connection, dials (the node whose name sorts
//!   first) or accepts, runs the handshake and hands the result to the engine.
//! * **reader** (one per connection): applies the peer's writes, barriers and resync blocks to
//!   the local disk in arrival order and answers them; completes our own requests; forwards
//!   everything else to the engine.
//! * **copier** (while this node is a resync source): copies out-of-sync blocks under the
//!   device's order lock, so a concurrent client write cannot be overtaken by older data.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::block::BlockDevice;
use crate::cluster::{
    Action, Command, ConnState, DiskState, Event, Machine, Notification, ReplState, Role, Startup,
    SyncDirection,
};
use crate::export::aoe::blade::BladeConfig;
use crate::export::aoe::server::{AoeServer, Export};
use crate::meta::generation::Uuids;
use crate::meta::store::MetaStore;
use crate::ratelimit::LogLimiter;
use crate::repl::device::{DeviceEvent, ReplicatedDevice};
use crate::repl::link::{PeerLink, Reply};
use crate::repl::uuid::{decide, random_uuid, HandshakeContext, UuidSet};
use crate::wire::ondisk::flags;
use crate::wire::repl::{
    AckKind, BarrierAckRepr, BitmapChunkRepr, BitmapEncoding, DisconnectReason, Durability,
    FrameDecoder, Message, ParametersRepr, PingRepr, ReplProtocol, ResyncDataRepr, StateChangeRepr,
    SyncStartRepr, UuidsRepr, WriteAckRepr, MAX_DATA_LEN,
};

use super::peer::{self, Handshaken, Identity};

/// Resync pushes carry this bit in their id, so the receiver can tell them from answers to
/// its own read requests (both are `ResyncData`).
pub const PUSH_BIT: u64 = 1 << 63;
/// Bytes per resync block.
const RESYNC_CHUNK: u64 = 256 * 1024;
/// Resync blocks in flight.
const RESYNC_WINDOW: usize = 16;
/// Keepalive interval while connected.
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Engine tick.
const TICK: Duration = Duration::from_millis(100);

/// What the engine hears.
pub enum Input {
    /// An operator command; the reply says whether it was accepted.
    Command(Command, SyncSender<Result<String, String>>),
    /// The connector established and authenticated a connection.
    PeerUp(Box<Handshaken>),
    /// A message for the engine from connection `conn_id`.
    PeerMessage(u64, Message),
    /// Connection `conn_id` ended.
    PeerDown(u64, String),
    /// The replicated device reported something.
    Device(DeviceEvent),
    /// The copier finished (true) or gave up (false) on connection `conn_id`.
    CopierDone(u64, bool),
    /// Stop: stop serving, leave the peer, mark the meta-data clean.
    Stop(SyncSender<()>),
}

/// Static facts about the resource.
#[derive(Clone)]
pub struct ResourceSpec {
    /// Resource name.
    pub name: String,
    /// Shelf and slot.
    pub aoe: (u16, u8),
    /// Client-facing interface of this node.
    pub interface: String,
    /// Our replication address (listen).
    pub listen: SocketAddr,
    /// The peer's replication address.
    pub peer_addr: SocketAddr,
    /// We dial (our name sorts first); else we accept.
    pub dialer: bool,
    /// Names and secret.
    pub identity: Identity,
    /// Replication protocol.
    pub protocol: ReplProtocol,
    /// Durability level.
    pub durability: Durability,
    /// NBD export address while primary.
    pub nbd: Option<SocketAddr>,
    /// The test-only fault layer under the data disk (see [`super::TEST_FAULTS_ENV`]).
    pub faults: Option<super::TestFaults>,
}

/// Resync progress, for status.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to copy when the copier started.
    pub total: AtomicU64,
    /// Bytes copied.
    pub done: AtomicU64,
    /// When the copier started (ms since the resource started).
    pub started_ms: AtomicU64,
}

struct Job {
    direction: SyncDirection,
    full: bool,
    peer_bitmap_done: bool,
    copier_started: bool,
}

struct State {
    machine: Machine,
    link: Option<Arc<PeerLink>>,
    wants_connect: Arc<AtomicBool>,
    aoe: Option<AoeServer>,
    nbd: Option<super::NbdHandle>,
    job: Option<Job>,
    paused: Arc<AtomicBool>,
    source_at_start: Option<UuidSet>,
    last_ping: Instant,
    last_alive_seen: Option<Instant>,
    last_role: Role,
    last_disk: DiskState,
}

/// One resource, running.
pub struct Resource {
    /// Static facts.
    pub spec: ResourceSpec,
    meta: Arc<MetaStore>,
    device: Arc<ReplicatedDevice>,
    state: Mutex<State>,
    tx: Mutex<Sender<Input>>,
    subscribers: Mutex<Vec<Sender<String>>>,
    cancel: CancellationToken,
    conn_ids: AtomicU64,
    /// Resync progress.
    pub progress: Progress,
    started: Instant,
    me: std::sync::Weak<Resource>,
    /// The connected peer has no disk: writes it forwards to us exist only here, so we mark
    /// them out of sync (and started a new data generation when it lost its disk).
    peer_diskless: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Resource {
    /// Starts the engine and connector threads. `local` is the data area.
    pub fn start(
        spec: ResourceSpec,
        machine_config: crate::cluster::Config,
        meta: Arc<MetaStore>,
        local: Arc<dyn BlockDevice>,
        cancel: CancellationToken,
    ) -> std::io::Result<(Arc<Resource>, Vec<JoinHandle<()>>)> {
        let (tx, rx) = channel();
        let dev_tx = Mutex::new(tx.clone());
        let device = Arc::new(ReplicatedDevice::new(
            local,
            meta.clone(),
            spec.protocol,
            spec.durability,
            Box::new(move |e| {
                let _ = lock(&dev_tx).send(Input::Device(e));
            }),
        ));
        let sb = meta.superblock();
        let just_created = meta.uuids().current == crate::repl::uuid::UUID_JUST_CREATED;
        let startup = Startup {
            disk: if sb.flags & flags::CONSISTENT != 0 && !just_created {
                DiskState::Consistent
            } else {
                DiskState::Inconsistent
            },
            crashed_primary: sb.flags & flags::CRASHED_PRIMARY != 0,
            degraded: sb.flags & flags::PEER_OUTDATED != 0,
        };
        let now = Instant::now();
        let (machine, actions) = Machine::new(machine_config, startup, now);
        let listener = TcpListener::bind(spec.listen)?;
        listener.set_nonblocking(true)?;
        let status = machine.status();
        let res = Arc::new_cyclic(|me| Resource {
            me: me.clone(),
            peer_diskless: AtomicBool::new(false),
            spec,
            meta,
            device,
            state: Mutex::new(State {
                machine,
                link: None,
                wants_connect: Arc::new(AtomicBool::new(false)),
                aoe: None,
                nbd: None,
                job: None,
                paused: Arc::new(AtomicBool::new(false)),
                source_at_start: None,
                last_ping: now,
                last_alive_seen: None,
                last_role: status.role,
                last_disk: status.disk,
            }),
            tx: Mutex::new(tx),
            subscribers: Mutex::new(Vec::new()),
            cancel,
            conn_ids: AtomicU64::new(1),
            progress: Progress::default(),
            started: now,
        });
        tracing::info!(resource = %res.spec.name, ?startup, "attached");
        {
            let mut st = lock(&res.state);
            res.execute(&mut st, actions);
        }
        let engine = {
            let res = res.clone();
            std::thread::Builder::new()
                .name(format!("engine-{}", res.spec.name))
                .spawn(move || res.engine(rx))?
        };
        let connector = {
            let res = res.clone();
            std::thread::Builder::new()
                .name(format!("connect-{}", res.spec.name))
                .spawn(move || res.connector(listener))?
        };
        Ok((res, vec![engine, connector]))
    }

    /// Sends the engine an input.
    pub fn send(&self, input: Input) {
        let _ = lock(&self.tx).send(input);
    }

    /// The machine's status plus what status shows beside it.
    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.state);
        Snapshot {
            status: st.machine.status(),
            peer: self.spec.identity.peer.clone(),
            out_of_sync: self.meta.out_of_sync_bytes(),
            size: self.device.size(),
            detached: self.device.is_detached(),
            resync_total: self.progress.total.load(Ordering::Relaxed),
            resync_done: self.progress.done.load(Ordering::Relaxed),
            resync_secs: (self.started.elapsed().as_millis() as u64)
                .saturating_sub(self.progress.started_ms.load(Ordering::Relaxed))
                as f64
                / 1000.0,
            read_bytes: self.device.counters.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.device.counters.written_bytes.load(Ordering::Relaxed),
            sent_bytes: self.device.counters.sent_bytes.load(Ordering::Relaxed),
            writes_marked: self.device.counters.writes_marked.load(Ordering::Relaxed),
            uuids: self.uuid_set(&st.machine),
            protocol: self.spec.protocol,
            durability: self.spec.durability,
        }
    }

    /// Steers the test-only fault layer: `write-delay-ms=N`, `write-error`, `read-error`,
    /// `clear`.
    pub fn inject(&self, specs: &[&str]) -> Result<String, String> {
        use crate::block::fault::{FaultSpec, InjectedError};
        if let Some((&"power-cut", args)) = specs.split_first() {
            return super::power_cut(args);
        }
        let faults = self.spec.faults.as_ref().ok_or_else(|| {
            format!(
                "fault injection is off (start the daemon with {}=1)",
                super::TEST_FAULTS_ENV
            )
        })?;
        let mut config = faults.faults();
        for spec in specs {
            match *spec {
                "clear" => config = Default::default(),
                "write-error" => config.write_error = Some(FaultSpec::always(InjectedError::Eio)),
                "read-error" => config.read_error = Some(FaultSpec::always(InjectedError::Eio)),
                other => match other.strip_prefix("write-delay-ms=").map(str::parse::<u64>) {
                    Some(Ok(ms)) => config.write_delay = Duration::from_millis(ms),
                    _ => return Err(format!("unknown fault {other:?} (write-delay-ms=N, write-error, read-error, clear, power-cut [keep-subset SEED])")),
                },
            }
        }
        faults.set_faults(config.clone());
        Ok(format!("faults: {config:?}"))
    }

    /// Subscribes to event lines; the current state comes first, as `exists` lines.
    pub fn subscribe(&self, tx: Sender<String>) {
        let s = self.snapshot();
        let name = &self.spec.name;
        let _ = tx.send(format!(
            "exists resource name:{name} role:{} disk:{}",
            s.status.role, s.status.disk
        ));
        let _ = tx.send(format!(
            "exists connection name:{name} peer-node:{} connection:{} role:{}",
            s.peer, s.status.conn, s.status.peer_role
        ));
        let _ = tx.send(format!(
            "exists peer-device name:{name} peer-node:{} replication:{} peer-disk:{} out-of-sync:{}",
            s.peer,
            s.status.repl,
            s.status.peer_disk,
            s.out_of_sync / 1024
        ));
        let _ = tx.send("exists -".to_string());
        lock(&self.subscribers).push(tx);
    }

    fn publish(&self, line: String) {
        lock(&self.subscribers).retain(|s| s.send(line.clone()).is_ok());
    }

    fn uuid_set(&self, machine: &Machine) -> UuidSet {
        let u = self.meta.uuids();
        UuidSet {
            current: u.current,
            bitmap: u.bitmap,
            history: u.history,
            dirty_bits: self.meta.out_of_sync_bytes() / 4096,
            flags: machine.uuid_flags(),
        }
    }

    fn save_uuids(&self, set: &UuidSet) {
        let u = Uuids {
            current: set.current,
            bitmap: set.bitmap,
            history: set.history,
        };
        if let Err(e) = self.meta.set_uuids(u) {
            tracing::error!(resource = %self.spec.name, error = %e, "cannot write the generation UUIDs");
        }
    }

    fn set_flags(&self, set: u32, clear: u32) {
        if let Err(e) = self.meta.set_flags(set, clear) {
            tracing::error!(resource = %self.spec.name, error = %e, "cannot write the superblock flags");
        }
    }

    // ---------------------------------------------------------------- engine

    fn engine(self: Arc<Self>, rx: Receiver<Input>) {
        loop {
            match rx.recv_timeout(TICK) {
                Ok(Input::Stop(done)) => {
                    self.shutdown();
                    let _ = done.send(());
                    return;
                }
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.tick();
        }
    }

    fn step(&self, st: &mut State, event: Event) -> Vec<Action> {
        let actions = st.machine.step(Instant::now(), event);
        self.execute(st, actions.clone());
        actions
    }

    fn tick(&self) {
        let mut st = lock(&self.state);
        if let Some(link) = st.link.clone() {
            let heard = link.last_heard();
            if st.last_alive_seen != Some(heard) {
                st.last_alive_seen = Some(heard);
                self.step(&mut st, Event::PeerAlive);
            }
            self.step(
                &mut st,
                Event::PeerWrites {
                    oldest_pending: link.oldest_pending(),
                },
            );
            if st.last_ping.elapsed() >= PING_INTERVAL {
                st.last_ping = Instant::now();
                let _ = link.send(Message::Ping(PingRepr { cookie: 0 }));
            }
        }
        self.step(&mut st, Event::Tick);
    }

    fn handle(&self, input: Input) {
        let mut st = lock(&self.state);
        match input {
            Input::Command(command, reply) => {
                let actions = self.step(&mut st, Event::Command(command));
                let refused = actions.iter().find_map(|a| match a {
                    Action::Refuse { reason, .. } => Some(reason.to_string()),
                    _ => None,
                });
                let logs: Vec<String> = actions
                    .iter()
                    .filter_map(|a| match a {
                        Action::Log(l) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(match refused {
                    Some(r) => Err(format!("{command}: refused: {r}")),
                    None => Ok(logs.join("\n")),
                });
            }
            Input::PeerUp(hs) => self.peer_up(&mut st, *hs),
            Input::PeerMessage(conn_id, message) => {
                if st.link.as_ref().map(|l| l.conn_id) == Some(conn_id) {
                    self.peer_message(&mut st, message);
                }
            }
            Input::PeerDown(conn_id, why) => {
                if st.link.as_ref().map(|l| l.conn_id) == Some(conn_id) {
                    tracing::warn!(resource = %self.spec.name, "connection to {} lost: {why}", self.spec.identity.peer);
                    self.drop_link(&mut st);
                    self.step(&mut st, Event::PeerLost);
                }
            }
            Input::Device(DeviceEvent::LocalIoError) => {
                self.step(&mut st, Event::LocalIoError);
            }
            Input::CopierDone(conn_id, ok) => {
                if st.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
                    return;
                }
                if let Some(job) = &mut st.job {
                    job.copier_started = false;
                }
                if ok && st.job.as_ref().map(|j| j.direction) == Some(SyncDirection::Source) {
                    let mut set = self.uuid_set(&st.machine);
                    set.finish_resync_source();
                    self.save_uuids(&set);
                    self.set_flags(0, flags::CRASHED_PRIMARY | flags::PEER_OUTDATED);
                    if let Some(link) = &st.link {
                        let _ = link.send(Message::SyncDone);
                    }
                    st.job = None;
                    tracing::info!(resource = %self.spec.name, "resync finished (source)");
                    self.step(&mut st, Event::ResyncDone);
                }
            }
            Input::Stop(_) => unreachable!("handled by the engine loop"),
        }
    }

    fn drop_link(&self, st: &mut State) {
        self.device.set_link(None);
        if let Some(link) = st.link.take() {
            link.fail_all();
        }
        st.job = None;
        st.last_alive_seen = None;
    }

    fn peer_up(&self, st: &mut State, hs: Handshaken) {
        let conn_id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        if !st.wants_connect.load(Ordering::Acquire) || st.link.is_some() {
            return;
        }
        let ours = self.uuid_set(&st.machine);
        let theirs: UuidSet = hs.uuids.into();
        static REFUSALS: LogLimiter = LogLimiter::new(Duration::from_secs(30), 2);
        // Usable size: the smaller of the two, unless that would cut into data in use.
        if hs.params.size < self.device.size() {
            if st.machine.status().serving {
                crate::warn_limited!(
                    REFUSALS,
                    resource = %self.spec.name,
                    "refusing the peer: its usable size ({} bytes) is smaller than the device in use ({} bytes)",
                    hs.params.size,
                    self.device.size()
                );
                return;
            }
            tracing::warn!(
                resource = %self.spec.name,
                "the peer's disk is smaller: the device shrinks from {} to {} bytes",
                self.device.size(),
                hs.params.size
            );
            self.device.limit_size(hs.params.size);
        }
        if hs.params.protocol != self.spec.protocol || hs.params.durability != self.spec.durability
        {
            crate::warn_limited!(REFUSALS, resource = %self.spec.name, "refusing the peer: protocol/durability differ ({:?}/{:?} there); the configuration must be identical", hs.params.protocol, hs.params.durability);
            return;
        }
        let Handshaken { conn, params, .. } = hs;
        let reader_stream = match conn.stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot clone the peer socket: {e}");
                return;
            }
        };
        let link = Arc::new(PeerLink::new(
            conn_id,
            self.spec.identity.peer.clone(),
            conn.stream,
            conn.version,
            conn.seq_out,
        ));
        st.link = Some(link.clone());
        st.source_at_start = Some(theirs);
        tracing::info!(resource = %self.spec.name, "connected to {}; our UUIDs {ours}, theirs {theirs}", self.spec.identity.peer);
        self.step(st, Event::PeerConnected);
        let s = st.machine.status();
        let decision = if s.disk == DiskState::Diskless || params.disk == DiskState::Diskless {
            None
        } else {
            let ctx = HandshakeContext {
                local_role: s.role,
                peer_role: params.role,
                resolve_conflicts: hs.resolve_conflicts,
            };
            Some(decide(&ours, &theirs, &ctx))
        };
        if let Some(d) = &decision {
            tracing::info!(resource = %self.spec.name, "handshake: {}", d.name());
        }
        // The reader starts before the machine reacts, so nothing the peer sends is lost.
        let decoder = conn.decoder;
        {
            let me = self.self_arc();
            let link = link.clone();
            let _ = std::thread::Builder::new()
                .name(format!("reader-{}", self.spec.name))
                .spawn(move || me.reader(link, reader_stream, decoder));
        }
        self.step(
            st,
            Event::Handshake {
                decision,
                peer_role: params.role,
                peer_disk: params.disk,
            },
        );
    }

    fn self_arc(&self) -> Arc<Resource> {
        self.me.upgrade().expect("a running resource is alive")
    }

    fn peer_message(&self, st: &mut State, message: Message) {
        match message {
            Message::StateChange(s) => {
                self.step(
                    st,
                    Event::PeerState {
                        role: s.role,
                        disk: s.disk,
                    },
                );
            }
            Message::SyncStart(s) => {
                let direction = if s.sender_is_source {
                    SyncDirection::Target
                } else {
                    SyncDirection::Source
                };
                self.step(
                    st,
                    Event::PeerStartedResync {
                        direction,
                        full: s.full,
                    },
                );
            }
            Message::Uuids(u) => st.source_at_start = Some(u.into()),
            Message::SyncUuid(sync_uuid) => {
                let mut set = self.uuid_set(&st.machine);
                set.start_resync_target(sync_uuid);
                self.save_uuids(&set);
                self.set_flags(0, flags::CONSISTENT);
            }
            Message::BitmapChunk(c) => {
                // The bits were applied by the applier thread, in order with the resync data.
                if c.last {
                    if let Some(job) = &mut st.job {
                        job.peer_bitmap_done = true;
                    }
                    self.maybe_start_copier(st);
                }
            }
            Message::SyncDone => {
                if st.job.as_ref().map(|j| j.direction) == Some(SyncDirection::Target) {
                    let mut set = self.uuid_set(&st.machine);
                    if let Some(src) = st.source_at_start {
                        set.finish_resync_target(&src);
                    }
                    self.save_uuids(&set);
                    self.set_flags(flags::CONSISTENT, flags::CRASHED_PRIMARY);
                    st.job = None;
                    tracing::info!(resource = %self.spec.name, "resync finished (target)");
                    self.step(st, Event::ResyncDone);
                }
            }
            Message::Disconnect(d) => {
                tracing::warn!(resource = %self.spec.name, "the peer disconnected: {} {}", d.reason, d.message);
                self.drop_link(st);
                self.step(st, Event::PeerDropped { reason: d.reason });
            }
            other => {
                tracing::debug!("ignored {:?} from the peer", other.msg_type());
            }
        }
    }

    fn apply_bitmap_chunk(&self, c: &BitmapChunkRepr) {
        let bits = match c.encoding {
            BitmapEncoding::Raw => c.bits.clone(),
            BitmapEncoding::Rle => return,
        };
        for i in 0..c.bit_count as u64 {
            if bits[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                let off = (c.first_bit + i) * 4096;
                let len = 4096.min(self.device.size().saturating_sub(off));
                if len > 0 {
                    self.meta.mark_out_of_sync(off, len);
                }
            }
        }
    }

    fn send_bitmap(&self, link: &PeerLink) {
        let size = self.device.size();
        for range in self.meta.iterate_dirty().collect::<Vec<_>>() {
            let first = range.start / 4096;
            let end = range.end.min(size).div_ceil(4096);
            let mut bit = first;
            while bit < end {
                let count = (end - bit).min(MAX_DATA_LEN as u64 * 8 / 2) as u32;
                let mut bits = vec![0xffu8; count.div_ceil(8) as usize];
                if !count.is_multiple_of(8) {
                    *bits.last_mut().unwrap() = (1u8 << (count % 8)) - 1;
                }
                let _ = link.send(Message::BitmapChunk(BitmapChunkRepr {
                    first_bit: bit,
                    bit_count: count,
                    encoding: BitmapEncoding::Raw,
                    last: false,
                    bits,
                }));
                bit += count as u64;
            }
        }
        let _ = link.send(Message::BitmapChunk(BitmapChunkRepr {
            first_bit: 0,
            bit_count: 1,
            encoding: BitmapEncoding::Raw,
            last: true,
            bits: vec![0],
        }));
    }

    fn maybe_start_copier(&self, st: &mut State) {
        let Some(link) = st.link.clone() else { return };
        let Some(job) = &mut st.job else { return };
        if job.direction != SyncDirection::Source
            || job.copier_started
            || !(job.full || job.peer_bitmap_done)
        {
            return;
        }
        job.copier_started = true;
        let total = self.meta.out_of_sync_bytes();
        self.progress.total.store(total, Ordering::Relaxed);
        self.progress.done.store(0, Ordering::Relaxed);
        self.progress
            .started_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        tracing::info!(resource = %self.spec.name, "resync started: {total} bytes to copy");
        let me = self.self_arc();
        let paused = st.paused.clone();
        let _ = std::thread::Builder::new()
            .name(format!("resync-{}", self.spec.name))
            .spawn(move || {
                let ok = me.copy_out_of_sync(&link, &paused);
                me.send(Input::CopierDone(link.conn_id, ok));
            });
    }

    /// The source's copier: every out-of-sync block to the peer, until none is left.
    fn copy_out_of_sync(&self, link: &PeerLink, paused: &AtomicBool) -> bool {
        let size = self.device.size();
        loop {
            // Bits beyond a size shrunk to the peer's never need copying.
            let ranges: Vec<_> = self
                .meta
                .iterate_dirty()
                .filter(|r| r.start < size)
                .collect();
            if ranges.is_empty() {
                return true;
            }
            let mut inflight = std::collections::VecDeque::new();
            for range in ranges {
                let mut off = range.start;
                let end = range.end.min(size);
                while off < end {
                    while paused.load(Ordering::Acquire) {
                        if link.is_dead() || self.cancel.is_cancelled() {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if link.is_dead() || self.cancel.is_cancelled() {
                        return false;
                    }
                    let len = RESYNC_CHUNK.min(end - off);
                    let mut buf = vec![0u8; len as usize];
                    let answer = {
                        let _order = self.device.order_lock();
                        if self.device.local().read_at(&mut buf, off).is_err() {
                            self.device.detach();
                            return false;
                        }
                        link.request(|id| {
                            Message::ResyncData(ResyncDataRepr {
                                id: id | PUSH_BIT,
                                offset: off,
                                data: buf,
                            })
                        })
                    };
                    let Some(answer) = answer else { return false };
                    inflight.push_back((off, len, answer));
                    while inflight.len() >= RESYNC_WINDOW {
                        if !self.finish_one(&mut inflight) {
                            return false;
                        }
                    }
                    off += len;
                }
            }
            while !inflight.is_empty() {
                if !self.finish_one(&mut inflight) {
                    return false;
                }
            }
        }
    }

    fn finish_one(
        &self,
        inflight: &mut std::collections::VecDeque<(u64, u64, crate::repl::link::Answer)>,
    ) -> bool {
        let (off, len, answer) = inflight.pop_front().expect("not empty");
        match answer.recv() {
            Ok(Reply::Ack(AckKind::Completed)) => {
                self.meta.clear_in_sync(off, len);
                self.progress.done.fetch_add(len, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    // ---------------------------------------------------------------- actions

    fn execute(&self, st: &mut State, actions: Vec<Action>) {
        for action in actions {
            self.execute_one(st, action);
        }
        let s = st.machine.status();
        // Persist what a restart must know.
        if s.role != st.last_role {
            if s.role == Role::Primary {
                self.set_flags(flags::PRIMARY_IND, 0);
            } else {
                self.set_flags(0, flags::PRIMARY_IND);
            }
            st.last_role = s.role;
        }
        if s.disk != st.last_disk {
            match s.disk {
                DiskState::UpToDate | DiskState::Consistent => self.set_flags(flags::CONSISTENT, 0),
                DiskState::Inconsistent => self.set_flags(0, flags::CONSISTENT),
                _ => {}
            }
            st.last_disk = s.disk;
        }
        let on_disk = self.meta.superblock().flags;
        if s.role == Role::Primary && s.conn != ConnState::Connected && s.degraded {
            if on_disk & flags::PEER_OUTDATED == 0 {
                self.set_flags(flags::PEER_OUTDATED, 0);
            }
        } else if s.conn == ConnState::Connected
            && s.repl == ReplState::Established
            && s.peer_disk == DiskState::UpToDate
            && on_disk & (flags::PEER_OUTDATED | flags::CRASHED_PRIMARY) != 0
        {
            self.set_flags(0, flags::PEER_OUTDATED | flags::CRASHED_PRIMARY);
        }
        let peer_diskless = s.conn == ConnState::Connected && s.peer_disk == DiskState::Diskless;
        if peer_diskless
            && s.disk == DiskState::UpToDate
            && !self.peer_diskless.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(resource = %self.spec.name, "the peer lost its disk: this node now holds the only copy");
            if let Err(e) = self.meta.new_current_uuid() {
                tracing::error!(resource = %self.spec.name, error = %e, "cannot write a new current UUID");
            }
        } else if !peer_diskless {
            self.peer_diskless.store(false, Ordering::Release);
        }
        // Replicate writes whenever the connection is established.
        let replicate = s.conn == ConnState::Connected && s.peer_disk != DiskState::Diskless;
        match (&st.link, replicate, self.device.link().is_some()) {
            (Some(link), true, false) => self.device.set_link(Some(link.clone())),
            (_, false, true) => self.device.set_link(None),
            _ => {}
        }
    }

    fn execute_one(&self, st: &mut State, action: Action) {
        let name = &self.spec.name;
        match action {
            Action::StartServing => self.start_serving(st),
            Action::StopServing => self.stop_serving(st),
            Action::Connect => st.wants_connect.store(true, Ordering::Release),
            Action::Disconnect { reason } => {
                st.wants_connect.store(false, Ordering::Release);
                if let Some(link) = &st.link {
                    let _ = link.send(Message::Disconnect(crate::wire::repl::DisconnectRepr {
                        reason,
                        message: String::new(),
                    }));
                }
                self.drop_link(st);
                // The machine decides whether to reconnect (a later Connect action).
                if reason != DisconnectReason::Shutdown {
                    tracing::warn!(resource = %name, "disconnected: {reason}");
                }
            }
            Action::SendState { role, disk, conn } => {
                if let Some(link) = &st.link {
                    let _ = link.send(Message::StateChange(StateChangeRepr { role, disk, conn }));
                }
            }
            Action::StartResync {
                direction,
                full,
                tell_peer,
            } => {
                let Some(link) = st.link.clone() else { return };
                if tell_peer {
                    let _ = link.send(Message::SyncStart(SyncStartRepr {
                        sender_is_source: direction == SyncDirection::Source,
                        full,
                    }));
                }
                st.paused.store(false, Ordering::Release);
                if full {
                    if let Err(e) = self.meta.set_all_out_of_sync() {
                        tracing::error!(resource = %name, error = %e, "cannot mark the device out of sync");
                    }
                } else {
                    self.send_bitmap(&link);
                }
                if direction == SyncDirection::Source {
                    let mut set = self.uuid_set(&st.machine);
                    let at_start = set;
                    let sync_uuid = set.start_resync_source(random_uuid(&mut rand::rng()));
                    self.save_uuids(&set);
                    let _ = link.send(Message::Uuids(UuidsRepr::from(at_start)));
                    let _ = link.send(Message::SyncUuid(sync_uuid));
                } else {
                    self.set_flags(0, flags::CONSISTENT);
                }
                tracing::info!(resource = %name, "resync: {direction:?}, {}", if full { "full" } else { "bitmap" });
                st.job = Some(Job {
                    direction,
                    full,
                    peer_bitmap_done: false,
                    copier_started: false,
                });
                self.maybe_start_copier(st);
            }
            Action::PauseResync => st.paused.store(true, Ordering::Release),
            Action::ResumeResync => st.paused.store(false, Ordering::Release),
            Action::NewCurrentUuid => {
                if let Err(e) = self.meta.new_current_uuid() {
                    tracing::error!(resource = %name, error = %e, "cannot write a new current UUID");
                }
            }
            Action::MarkOutOfSync => {
                // Waiting writes fail over to dirty bits; new writes are marked from now on.
                self.device.set_link(None);
                if let Some(link) = &st.link {
                    link.fail_all();
                }
            }
            Action::Detach => self.device.detach(),
            Action::Notify(n) => {
                // drbdsetup events2 style: `change <object> name:<res> <key>:<value>`.
                let line = match &n {
                    Notification::Change { object, key, value } => {
                        format!("change {object} name:{name} {key}:{value}")
                    }
                    Notification::SplitBrain(why) => {
                        tracing::error!(resource = %name, "Split-Brain detected: {why}; dropping the connection");
                        format!("call helper name:{name} split-brain: {why}")
                    }
                };
                self.publish(line);
            }
            Action::Log(l) => tracing::info!(resource = %name, "{l}"),
            Action::Refuse { command, reason } => {
                tracing::warn!(resource = %name, "{command} refused: {reason}")
            }
        }
    }

    fn start_serving(&self, st: &mut State) {
        if st.aoe.is_some() {
            return;
        }
        let (shelf, slot) = self.spec.aoe;
        let export = Export {
            config: BladeConfig::new(shelf, slot),
            device: self.device.clone(),
            interfaces: vec![self.spec.interface.clone()],
        };
        match AoeServer::start(vec![export], self.cancel.child_token()) {
            Ok(server) => {
                tracing::info!(resource = %self.spec.name, "serving e{shelf}.{slot} on {}", self.spec.interface);
                st.aoe = Some(server);
            }
            Err(e) => {
                tracing::error!(resource = %self.spec.name, error = %e, "cannot serve over AoE")
            }
        }
        if let Some(addr) = self.spec.nbd {
            match super::NbdHandle::start(
                addr,
                &self.spec.name,
                self.device.clone(),
                self.cancel.child_token(),
            ) {
                Ok(server) => st.nbd = Some(server),
                Err(e) => {
                    tracing::error!(resource = %self.spec.name, error = %e, "cannot serve over NBD")
                }
            }
        }
    }

    fn stop_serving(&self, st: &mut State) {
        // Reverse start order: NBD, then AoE.
        if let Some(nbd) = st.nbd.take() {
            nbd.stop();
        }
        if let Some(aoe) = st.aoe.take() {
            aoe.stop();
            tracing::info!(resource = %self.spec.name, "stopped serving");
        }
    }

    fn shutdown(&self) {
        let mut st = lock(&self.state);
        self.stop_serving(&mut st);
        st.wants_connect.store(false, Ordering::Release);
        if let Some(link) = &st.link {
            let _ = link.send(Message::Disconnect(crate::wire::repl::DisconnectRepr {
                reason: DisconnectReason::Shutdown,
                message: "node stopping".into(),
            }));
        }
        self.drop_link(&mut st);
        if st.machine.status().role == Role::Primary {
            // An orderly stop is a demotion: the next start is not a crashed primary.
            self.set_flags(0, flags::PRIMARY_IND);
        }
        if let Err(e) = self.device.local().flush() {
            tracing::error!(resource = %self.spec.name, error = %e, "flush at shutdown failed");
        }
        match self.meta.mark_clean() {
            Ok(()) => tracing::info!(resource = %self.spec.name, "meta-data marked clean"),
            Err(e) => {
                tracing::error!(resource = %self.spec.name, error = %e, "cannot mark the meta-data clean")
            }
        }
    }

    // ---------------------------------------------------------------- connector

    fn connector(self: Arc<Self>, listener: TcpListener) {
        static LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(10), 3);
        let wants = lock(&self.state).wants_connect.clone();
        while !self.cancel.is_cancelled() {
            let idle = !wants.load(Ordering::Acquire) || lock(&self.state).link.is_some();
            if idle {
                // Drain stray connection attempts so the peer sees a refusal, not a hang.
                if let Ok((s, _)) = listener.accept() {
                    drop(s);
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let stream = if self.spec.dialer {
                match peer::dial(self.spec.peer_addr) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(300));
                        None
                    }
                }
            } else {
                peer::accept(
                    &listener,
                    self.spec.peer_addr.ip(),
                    Duration::from_millis(300),
                    &LIMIT,
                )
            };
            let Some(stream) = stream else { continue };
            let me = self.clone();
            match peer::handshake(stream, &self.spec.identity, move || me.our_parameters()) {
                Ok(hs) => {
                    self.send(Input::PeerUp(Box::new(hs)));
                    // Give the engine time to take it (or refuse it) before trying again.
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    crate::warn_limited!(
                        LIMIT,
                        "resource {}: connection to {} failed: {e}",
                        self.spec.name,
                        self.spec.identity.peer
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn our_parameters(&self) -> (ParametersRepr, UuidsRepr) {
        let st = lock(&self.state);
        let s = st.machine.status();
        (
            ParametersRepr {
                size: self.device.size(),
                protocol: self.spec.protocol,
                durability: self.spec.durability,
                role: s.role,
                disk: s.disk,
                max_write: MAX_DATA_LEN as u32,
            },
            self.uuid_set(&st.machine).into(),
        )
    }

    // ---------------------------------------------------------------- reader

    fn reader(
        self: Arc<Self>,
        link: Arc<PeerLink>,
        mut stream: std::net::TcpStream,
        mut decoder: FrameDecoder,
    ) {
        // Data is applied on a thread of its own, in arrival order, so that a slow disk does
        // not silence the keepalive: the peer can tell "alive but not completing writes"
        // (ko-count) from "dead" (dead-time).
        let (work_tx, work_rx) = channel::<Message>();
        {
            let me = self.clone();
            let link = link.clone();
            let _ = std::thread::Builder::new()
                .name(format!("apply-{}", self.spec.name))
                .spawn(move || {
                    for message in work_rx {
                        if let Err(e) = me.apply(&link, message) {
                            tracing::warn!(resource = %me.spec.name, "peer link failed while answering: {e}");
                            link.fail_all();
                            return;
                        }
                    }
                });
        }
        let why = loop {
            let message = match peer::read_message(&mut stream, &mut decoder) {
                Ok(m) => m,
                Err(e) => break e.to_string(),
            };
            link.heard();
            let answered = match &message {
                Message::Ping(p) => link.send(Message::PingAck(*p)).map_err(|e| e.to_string()),
                Message::PingAck(_) => Ok(()),
                Message::WriteAck(a) => {
                    link.complete(a.id & !PUSH_BIT, Reply::Ack(a.kind));
                    Ok(())
                }
                Message::BarrierAck(a) => {
                    link.complete(a.barrier, Reply::Ack(AckKind::Completed));
                    Ok(())
                }
                Message::ResyncData(d) if d.id & PUSH_BIT == 0 => {
                    link.complete(d.id, Reply::Data(d.data.clone()));
                    Ok(())
                }
                Message::Disconnect(_) => {
                    // Straight to the engine: the peer's verdict must not wait behind data
                    // queued for a slow disk.
                    self.send(Input::PeerMessage(link.conn_id, message));
                    Ok(())
                }
                Message::WriteData(w) if w.id != 0 && self.spec.protocol == ReplProtocol::B => {
                    // Protocol B: received is enough; the write itself is queued.
                    send_ack(link.as_ref(), w.id, AckKind::Received)
                        .and_then(|()| work_tx.send(message).map_err(|e| e.to_string()))
                }
                _ => work_tx.send(message).map_err(|e| e.to_string()),
            };
            if let Err(e) = answered {
                break e;
            }
        };
        drop(work_tx);
        link.fail_all();
        self.send(Input::PeerDown(link.conn_id, why));
    }

    /// Applies one message from the peer, in arrival order (the applier thread).
    fn apply(&self, link: &PeerLink, message: Message) -> Result<(), String> {
        let local = self.device.local();
        let power = self.spec.durability == Durability::Power;
        match message {
            Message::WriteData(w) => {
                let fua = power || w.flags & crate::repl::device::WRITE_FUA != 0;
                let ok =
                    !self.device.is_detached() && local.write_at(&w.data, w.offset, fua).is_ok();
                if !ok {
                    self.device.detach();
                } else if self.peer_diskless.load(Ordering::Acquire) {
                    self.meta.mark_out_of_sync(w.offset, w.data.len() as u64);
                }
                if w.id != 0 && self.spec.protocol == ReplProtocol::C {
                    send_ack(
                        link,
                        w.id,
                        if ok {
                            AckKind::Completed
                        } else {
                            AckKind::Failed
                        },
                    )?;
                }
            }
            Message::Barrier(b) => {
                let _ = local.flush();
                link.send(Message::BarrierAck(BarrierAckRepr {
                    barrier: b.barrier,
                    writes: 0,
                }))
                .map_err(|e| e.to_string())?;
            }
            Message::WriteAck(a) => {
                link.complete(a.id & !PUSH_BIT, Reply::Ack(a.kind));
            }
            Message::BarrierAck(a) => {
                link.complete(a.barrier, Reply::Ack(AckKind::Completed));
            }
            Message::ResyncData(d) if d.id & PUSH_BIT != 0 => {
                let ok = local.write_at(&d.data, d.offset, power).is_ok();
                if ok {
                    self.meta.clear_in_sync(d.offset, d.data.len() as u64);
                } else {
                    self.device.detach();
                }
                send_ack(
                    link,
                    d.id,
                    if ok {
                        AckKind::Completed
                    } else {
                        AckKind::Failed
                    },
                )?;
            }
            Message::ResyncData(d) => {
                link.complete(d.id, Reply::Data(d.data));
            }
            Message::ResyncRequest(r) => {
                // A detached peer reads through us.
                let mut buf = vec![0u8; r.len as usize];
                if crate::block::check_range(self.device.size(), r.offset, r.len as u64).is_ok()
                    && !self.device.is_detached()
                    && local.read_at(&mut buf, r.offset).is_ok()
                {
                    link.send(Message::ResyncData(ResyncDataRepr {
                        id: r.id,
                        offset: r.offset,
                        data: buf,
                    }))
                    .map_err(|e| e.to_string())?;
                } else {
                    send_ack(link, r.id, AckKind::Failed)?;
                }
            }
            Message::Ping(p) => {
                link.send(Message::PingAck(p)).map_err(|e| e.to_string())?;
            }
            Message::PingAck(_) => {}
            Message::BitmapChunk(c) => {
                // Here, not on the engine thread: the peer's resync data that follows must
                // clear these bits, not be overtaken by them (stale out-of-sync bits).
                self.apply_bitmap_chunk(&c);
                if c.last {
                    self.send(Input::PeerMessage(link.conn_id, Message::BitmapChunk(c)));
                }
            }
            other => self.send(Input::PeerMessage(link.conn_id, other)),
        }
        Ok(())
    }
}

fn send_ack(link: &PeerLink, id: u64, kind: AckKind) -> Result<(), String> {
    link.send(Message::WriteAck(WriteAckRepr { id, kind }))
        .map_err(|e| e.to_string())
}

/// What `status` shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The machine's states.
    pub status: crate::cluster::Status,
    /// Peer name.
    pub peer: String,
    /// Out-of-sync bytes.
    pub out_of_sync: u64,
    /// Device size.
    pub size: u64,
    /// Local disk detached.
    pub detached: bool,
    /// Resync: bytes to copy.
    pub resync_total: u64,
    /// Resync: bytes copied.
    pub resync_done: u64,
    /// Resync: seconds since it started.
    pub resync_secs: f64,
    /// Client bytes read.
    pub read_bytes: u64,
    /// Client bytes written.
    pub written_bytes: u64,
    /// Bytes sent to the peer.
    pub sent_bytes: u64,
    /// Writes completed without the peer.
    pub writes_marked: u64,
    /// Generation UUIDs.
    pub uuids: UuidSet,
    /// Protocol.
    pub protocol: ReplProtocol,
    /// Durability.
    pub durability: Durability,
}
