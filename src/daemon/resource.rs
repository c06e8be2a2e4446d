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
//!   device's order lock, so a concurrent client write cannot be overtaken by older data. A full
//!   sync first asks the peer for the crc32c of each 4 KiB block and sends only blocks that
//!   differ; all-zero blocks travel as zero markers; a [`Pacer`] sets the pace.
//! * **verifier** (during `verify`): compares the crc32c of every block with the peer's at one
//!   point of the replication stream and records the ranges that differ.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::block::BlockDevice;
use crate::cluster::persist::{self, Keeper, SourceStarted};
use crate::cluster::{
    Action, Command, ConnState, DiskState, Event, Machine, Notification, ReplState, Role, Startup,
    SyncDirection, Terms,
};
use crate::export::aoe::blade::BladeConfig;
use crate::export::aoe::server::{AoeServer, Export};
use crate::meta::store::MetaStore;
use crate::ratelimit::LogLimiter;
use crate::repl::device::{barrier_reply, DeviceEvent, ReplicatedDevice};
use crate::repl::link::{PeerLink, Reply};
use crate::repl::rate::Pacer;
use crate::repl::uuid::{decide, random_uuid, HandshakeContext, UuidSet};
use crate::wire::ondisk::flags;
use crate::wire::repl::{
    block_checksums, AckKind, BarrierAckRepr, BitmapChunkRepr, BitmapEncoding, ChecksumRequestRepr,
    ChecksumsRepr, DisconnectReason, Durability, FrameDecoder, Message, ParametersRepr, PingRepr,
    ReplProtocol, ResyncDataRepr, ResyncSkipRepr, ResyncZeroRepr, StateChangeRepr, SyncStartRepr,
    UuidsRepr, WriteAckRepr, CHECKSUM_BLOCK, MAX_DATA_LEN,
};

use super::peer::{self, Handshaken, Identity};

/// Resync pushes carry this bit in their id, so the receiver can tell them from answers to
/// its own read requests (both are `ResyncData`).
pub const PUSH_BIT: u64 = 1 << 63;
/// A `ChecksumRequest` with this bit in its id asks the requester to checksum its own copy when
/// the answer is applied, in stream order (verify run by a Secondary whose peer is Primary).
pub const LOCAL_BIT: u64 = 1 << 62;
/// The request id without the flag bits.
const ID_MASK: u64 = !(PUSH_BIT | LOCAL_BIT);
/// Bytes per resync block (bitmap-based resync).
const RESYNC_CHUNK: u64 = 256 * 1024;
/// Bytes per checksum request (checksum-based resync, verify).
const CSUM_CHUNK: u64 = MAX_DATA_LEN as u64;
/// Resync messages in flight (the rate controller usually keeps fewer).
const RESYNC_WINDOW: usize = 64;
/// Verify checksum requests in flight.
const VERIFY_WINDOW: usize = 8;
/// Progress lines in `events` at most this often.
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// Mismatched ranges kept for status (all are logged).
const MAX_VERIFY_RANGES: usize = 64;
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
    /// `verify`: start an online verify; the reply says whether it started.
    Verify(SyncSender<Result<String, String>>),
    /// The verifier finished (true) or gave up (false) on connection `conn_id`.
    VerifyDone(u64, bool),
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
    /// The resync rate controller's settings.
    pub rate: crate::repl::rate::RateConfig,
}

/// Resync progress, for status. Reset when a resync starts, kept after it ends (the last
/// resync's figures). Both nodes count: the source when the target acknowledges, the target
/// when it applies.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to resync (the out-of-sync bytes when it started).
    pub total: AtomicU64,
    /// Bytes settled (copied, zeroed or found equal).
    pub done: AtomicU64,
    /// When the resync started (ms since the resource started).
    pub started_ms: AtomicU64,
    /// When it ended (ms since the resource started; 0 while running).
    pub ended_ms: AtomicU64,
    /// Block data moved over the wire (`ResyncData`).
    pub sent: AtomicU64,
    /// Bytes found equal by checksum and not moved.
    pub same: AtomicU64,
    /// Bytes sent as zero markers.
    pub zero: AtomicU64,
}

impl Progress {
    fn begin(&self, total: u64, now_ms: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.started_ms.store(now_ms, Ordering::Relaxed);
        for c in [
            &self.done,
            &self.ended_ms,
            &self.sent,
            &self.same,
            &self.zero,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn end(&self, now_ms: u64) {
        let _ =
            self.ended_ms
                .compare_exchange(0, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Seconds from the start to the end (or to `now_ms` while running).
    fn secs(&self, now_ms: u64) -> f64 {
        let end = match self.ended_ms.load(Ordering::Relaxed) {
            0 => now_ms,
            e => e,
        };
        end.saturating_sub(self.started_ms.load(Ordering::Relaxed)) as f64 / 1000.0
    }
}

/// Online verify: progress and what it found.
#[derive(Debug, Default)]
pub struct VerifyState {
    /// A verify is running.
    pub running: AtomicBool,
    /// Bytes to compare.
    pub total: AtomicU64,
    /// Bytes compared.
    pub done: AtomicU64,
    /// Start (ms since the resource started).
    pub started_ms: AtomicU64,
    /// End (0 while running).
    pub ended_ms: AtomicU64,
    /// 4 KiB blocks found different.
    pub blocks: AtomicU64,
    /// The last verify stopped early (connection lost, or a resync started).
    pub failed: AtomicBool,
    /// Asks the running verifier to stop (the pair left Established).
    abort: AtomicBool,
    /// Verifies finished since the daemon started.
    pub runs: AtomicU64,
    /// The first 64 mismatched ranges as (offset, length), merged.
    pub ranges: Mutex<Vec<(u64, u64)>>,
    /// Every mismatched range (for marking them out of sync).
    all_ranges: Mutex<Vec<(u64, u64)>>,
}

/// How a block travels in a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    /// Its data (`ResyncData`).
    Data,
    /// A zero marker (`ResyncZero`).
    Zero,
    /// Nothing: the peer's checksum matched (`ResyncSkip`).
    Same,
}

/// Splits `buf` into runs of 4 KiB blocks that travel the same way: equal to the peer's
/// checksum (if given), all zero, or data. Returns (start, end, kind) in bytes of `buf`.
fn classify_blocks(buf: &[u8], peer: Option<&[u32]>) -> Vec<(usize, usize, BlockKind)> {
    let block = CHECKSUM_BLOCK as usize;
    let mut runs: Vec<(usize, usize, BlockKind)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        let same = peer
            .and_then(|p| p.get(i))
            .is_some_and(|&c| crc32c::crc32c(b) == c);
        let kind = if same {
            BlockKind::Same
        } else if b.iter().fold(0u8, |a, &x| a | x) == 0 {
            BlockKind::Zero
        } else {
            BlockKind::Data
        };
        let start = i * block;
        let end = start + b.len();
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.1 == start => last.1 = end,
            _ => runs.push((start, end, kind)),
        }
    }
    runs
}

/// The crc32c of `len` zero bytes (at most one block).
fn zero_crc(len: usize) -> u32 {
    static FULL: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const ZEROS: [u8; CHECKSUM_BLOCK as usize] = [0; CHECKSUM_BLOCK as usize];
    if len == ZEROS.len() {
        *FULL.get_or_init(|| crc32c::crc32c(&ZEROS))
    } else {
        crc32c::crc32c(&ZEROS[..len])
    }
}

/// What [`block_checksums`] gives for `len` zero bytes, without reading or hashing them.
fn zero_checksums(len: u64) -> Vec<u32> {
    let block = u64::from(CHECKSUM_BLOCK);
    (0..len.div_ceil(block))
        .map(|i| zero_crc(block.min(len - i * block) as usize))
        .collect()
}

/// [`classify_blocks`] for `len` bytes known to be zero: equal where the peer's checksum is the
/// zero checksum, zero markers elsewhere.
fn classify_zero(len: u64, peer: Option<&[u32]>) -> Vec<(usize, usize, BlockKind)> {
    let zero = zero_checksums(len);
    let block = CHECKSUM_BLOCK as usize;
    let mut runs: Vec<(usize, usize, BlockKind)> = Vec::new();
    for (i, z) in zero.iter().enumerate() {
        let kind = if peer.and_then(|p| p.get(i)) == Some(z) {
            BlockKind::Same
        } else {
            BlockKind::Zero
        };
        let start = i * block;
        let end = (start + block).min(len as usize);
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.1 == start => last.1 = end,
            _ => runs.push((start, end, kind)),
        }
    }
    runs
}

/// One resync message waiting for the peer.
enum InFlight {
    /// A checksum request (checksum-based resync): the data follows once it is answered.
    Csum {
        off: u64,
        len: u64,
        answer: crate::repl::link::Answer,
    },
    /// Data, a zero marker or a skip, waiting for its acknowledgement.
    Push {
        off: u64,
        len: u64,
        kind: BlockKind,
        wire: u64,
        answer: crate::repl::link::Answer,
    },
}

/// The source's copier state for one pass.
struct Copier<'a> {
    link: &'a PeerLink,
    pacer: Pacer,
    /// Data, zero markers and skips, in the order sent.
    queue: std::collections::VecDeque<InFlight>,
    /// Checksum requests, in the order sent: settled ahead of older pushes, so the data they
    /// lead to keeps the peer busy while those acknowledgements are on their way.
    csums: std::collections::VecDeque<InFlight>,
    /// Wire bytes sent and not yet acknowledged.
    in_flight: u64,
}

impl Copier<'_> {
    /// Messages waiting for the peer.
    fn pending(&self) -> usize {
        self.queue.len() + self.csums.len()
    }
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
    last_progress_event: Instant,
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
    /// Online verify.
    pub verify: VerifyState,
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
        // A size agreed with a smaller peer holds across restarts, even without the peer.
        device.limit_size(meta.usable_size());
        let sb = meta.superblock();
        let just_created = meta.uuids().is_just_created();
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
                last_progress_event: now,
            }),
            tx: Mutex::new(tx),
            subscribers: Mutex::new(Vec::new()),
            cancel,
            conn_ids: AtomicU64::new(1),
            progress: Progress::default(),
            verify: VerifyState::default(),
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
            resync_secs: self.progress.secs(self.now_ms()),
            resync_sent: self.progress.sent.load(Ordering::Relaxed),
            resync_same: self.progress.same.load(Ordering::Relaxed),
            resync_zero: self.progress.zero.load(Ordering::Relaxed),
            verify: self.verify_snapshot(),
            read_bytes: self.device.counters.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.device.counters.written_bytes.load(Ordering::Relaxed),
            sent_bytes: self.device.counters.sent_bytes.load(Ordering::Relaxed),
            writes_marked: self.device.counters.writes_marked.load(Ordering::Relaxed),
            uuids: self.uuid_set(&st.machine),
            protocol: self.spec.protocol,
            durability: self.spec.durability,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn verify_snapshot(&self) -> VerifySnapshot {
        let v = &self.verify;
        let now = self.now_ms();
        let end = match v.ended_ms.load(Ordering::Relaxed) {
            0 => now,
            e => e,
        };
        VerifySnapshot {
            running: v.running.load(Ordering::Relaxed),
            runs: v.runs.load(Ordering::Relaxed),
            total: v.total.load(Ordering::Relaxed),
            done: v.done.load(Ordering::Relaxed),
            secs: end.saturating_sub(v.started_ms.load(Ordering::Relaxed)) as f64 / 1000.0,
            blocks: v.blocks.load(Ordering::Relaxed),
            ranges: lock(&v.ranges).clone(),
            failed: v.failed.load(Ordering::Relaxed),
        }
    }

    /// Steers the test-only fault layer: `write-delay-ms=N`, `read-delay-ms=N`, `write-error`,
    /// `read-error`, `clear`.
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
                other => {
                    let ms = |prefix: &str| other.strip_prefix(prefix).map(str::parse::<u64>);
                    match (ms("write-delay-ms="), ms("read-delay-ms=")) {
                        (Some(Ok(n)), _) => config.write_delay = Duration::from_millis(n),
                        (_, Some(Ok(n))) => config.read_delay = Duration::from_millis(n),
                        _ => return Err(format!("unknown fault {other:?} (write-delay-ms=N, read-delay-ms=N, write-error, read-error, clear, power-cut [keep-subset SEED])")),
                    }
                }
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
        UuidSet {
            dirty_bits: self.meta.out_of_sync_bytes() / 4096,
            flags: machine.uuid_flags(),
            ..self.meta.uuids()
        }
    }

    /// The meta-data store as the persistent executor sees it.
    fn keeper(&self) -> MetaKeeper<'_> {
        MetaKeeper(&self.meta)
    }

    /// Logs a failed meta-data write of the persistent executor.
    fn persist_failed(&self, what: &str, error: &str) {
        tracing::error!(resource = %self.spec.name, error = %error, "cannot persist {what}");
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
                // Never wait for the sender: if it is busy, data is flowing, which the peer
                // hears as well as a ping; and a sender stuck on a dead link must not stop
                // this thread from noticing that the peer has gone silent.
                let _ = link.try_send(Message::Ping(PingRepr { cookie: 0 }));
            }
        }
        self.step(&mut st, Event::Tick);
        self.publish_progress(&mut st, false);
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
                    self.progress.end(self.now_ms());
                    self.publish_progress(&mut st, true);
                    if let Err(e) = persist::finish_resync_source(&mut self.keeper()) {
                        self.persist_failed("the end of the resync", &e);
                    }
                    if let Some(link) = &st.link {
                        let _ = link.send(Message::SyncDone);
                    }
                    self.set_job(&mut st, None);
                    tracing::info!(resource = %self.spec.name, "resync finished (source)");
                    self.step(&mut st, Event::ResyncDone);
                }
            }
            Input::Verify(reply) => {
                let _ = reply.send(self.start_verify(&mut st));
            }
            Input::VerifyDone(conn_id, ok) => self.verify_done(&mut st, conn_id, ok),
            Input::Stop(_) => unreachable!("handled by the engine loop"),
        }
    }

    /// One `events` line about a running resync or verify, at most once a second (`force`:
    /// now, e.g. the final one).
    fn publish_progress(&self, st: &mut State, force: bool) {
        if !force && st.last_progress_event.elapsed() < PROGRESS_EVENT_INTERVAL {
            return;
        }
        let s = st.machine.status();
        let syncing = matches!(
            s.repl,
            ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::PausedSyncS
                | ReplState::PausedSyncT
        );
        let verifying = self.verify.running.load(Ordering::Relaxed);
        if verifying && s.repl != ReplState::Established {
            // A resync (or a lost connection) makes the comparison meaningless.
            self.verify.abort.store(true, Ordering::Relaxed);
        }
        if !force && !syncing && !verifying {
            return;
        }
        st.last_progress_event = Instant::now();
        let name = &self.spec.name;
        if syncing || (force && !verifying) {
            let p = ResyncFigures::of(
                self.progress.total.load(Ordering::Relaxed),
                self.meta.out_of_sync_bytes(),
                self.progress.secs(self.now_ms()),
            );
            self.publish(format!(
                "change resource name:{name} replication:{} done:{:.1} rate:{:.1}MB/s eta:{:.0}s out-of-sync:{}KiB resync-sent:{} resync-same:{} resync-zero:{}",
                s.repl,
                p.percent,
                p.rate_mbps,
                p.eta_secs,
                self.meta.out_of_sync_bytes() / 1024,
                self.progress.sent.load(Ordering::Relaxed),
                self.progress.same.load(Ordering::Relaxed),
                self.progress.zero.load(Ordering::Relaxed),
            ));
        }
        if verifying || (force && !syncing) {
            let v = self.verify_snapshot();
            let f = ResyncFigures::of(v.total, v.total.saturating_sub(v.done), v.secs);
            self.publish(format!(
                "change resource name:{name} verify:{} verify-done:{:.1} rate:{:.1}MB/s eta:{:.0}s out-of-sync-blocks:{}{}",
                if v.running { "running" } else if v.failed { "failed" } else { "finished" },
                f.percent,
                f.rate_mbps,
                f.eta_secs,
                v.blocks,
                if v.ranges.is_empty() { String::new() } else { format!(" ranges:{}", v.ranges_text().replace(' ', ",")) }
            ));
        }
    }

    fn start_verify(&self, st: &mut State) -> Result<String, String> {
        let s = st.machine.status();
        if s.conn != ConnState::Connected || s.repl != ReplState::Established {
            return Err(format!(
                "verify: refused: needs an established connection (connection:{} replication:{})",
                s.conn, s.repl
            ));
        }
        if s.disk != DiskState::UpToDate || s.peer_disk != DiskState::UpToDate {
            return Err(format!(
                "verify: refused: both disks must be UpToDate (disk:{} peer-disk:{})",
                s.disk, s.peer_disk
            ));
        }
        let Some(link) = st.link.clone() else {
            return Err("verify: refused: not connected".into());
        };
        if self.verify.running.swap(true, Ordering::AcqRel) {
            return Err("verify: already running".into());
        }
        let size = self.device.size();
        let v = &self.verify;
        v.total.store(size, Ordering::Relaxed);
        v.done.store(0, Ordering::Relaxed);
        v.blocks.store(0, Ordering::Relaxed);
        v.failed.store(false, Ordering::Relaxed);
        v.abort.store(false, Ordering::Relaxed);
        v.started_ms.store(self.now_ms(), Ordering::Relaxed);
        v.ended_ms.store(0, Ordering::Relaxed);
        lock(&v.ranges).clear();
        lock(&v.all_ranges).clear();
        // A Secondary under a Primary checksums its copy where the Primary's answer lands in its
        // replication stream; anyone else checksums under its order lock when asking.
        let local_at_reply = s.role != Role::Primary && s.peer_role == Role::Primary;
        let me = self.self_arc();
        let spawned = std::thread::Builder::new()
            .name(format!("verify-{}", self.spec.name))
            .spawn(move || {
                let ok = me.verify_all(&link, local_at_reply);
                me.send(Input::VerifyDone(link.conn_id, ok));
            });
        if let Err(e) = spawned {
            v.running.store(false, Ordering::Release);
            return Err(format!("verify: cannot start: {e}"));
        }
        tracing::info!(resource = %self.spec.name, "online verify started: {size} bytes");
        Ok(format!("verify started: {size} bytes"))
    }

    fn verify_done(&self, st: &mut State, conn_id: u64, ok: bool) {
        let v = &self.verify;
        v.ended_ms.store(self.now_ms().max(1), Ordering::Relaxed);
        v.failed.store(!ok, Ordering::Relaxed);
        v.runs.fetch_add(1, Ordering::Relaxed);
        v.running.store(false, Ordering::Release);
        let name = &self.spec.name;
        let blocks = v.blocks.load(Ordering::Relaxed);
        if !ok {
            tracing::warn!(resource = %name, "online verify stopped early (connection lost or resync started); {blocks} block(s) found out of sync so far");
        } else {
            tracing::info!(resource = %name, "online verify finished: {blocks} block(s) out of sync");
        }
        self.publish_progress(st, true);
        let ranges = std::mem::take(&mut *lock(&v.all_ranges));
        if !ok || ranges.is_empty() || st.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        for (off, len) in &ranges {
            self.meta.mark_out_of_sync(*off, *len);
        }
        let s = st.machine.status();
        // From the current primary; from here (the verify source) if neither is primary.
        let source = s.role == Role::Primary || s.peer_role != Role::Primary;
        tracing::info!(resource = %name, "resyncing the blocks verify found, {}", if source { "from here" } else { "from the peer" });
        self.step(st, Event::VerifyFoundDifferences { source });
    }

    /// The current resync job; the device learns whether this node is a resync target.
    fn set_job(&self, st: &mut State, job: Option<Job>) {
        self.device.set_sync_target(
            job.as_ref()
                .is_some_and(|j| j.direction == SyncDirection::Target),
        );
        st.job = job;
    }

    fn drop_link(&self, st: &mut State) {
        self.device.set_link(None);
        if let Some(link) = st.link.take() {
            link.fail_all();
        }
        self.set_job(st, None);
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
        // The machine judges the peer's terms (and may shrink the device) before anything of
        // this connection is set up; a refused peer changes nothing.
        let offer = Event::PeerOffered {
            ours: Terms {
                size: self.device.size(),
                protocol: self.spec.protocol,
                durability: self.spec.durability,
            },
            theirs: Terms {
                size: hs.params.size,
                protocol: hs.params.protocol,
                durability: hs.params.durability,
            },
        };
        let actions = self.step(st, offer);
        if let Some(reason) = actions.iter().find_map(|a| match a {
            Action::RefusePeer { reason } => Some(reason),
            _ => None,
        }) {
            crate::warn_limited!(REFUSALS, resource = %self.spec.name, "refusing the peer: {reason}");
            return;
        }
        let Handshaken { conn, params, .. } = hs;
        // A send blocked longer than the peer may stay silent means the peer is gone: fail
        // the link then, rather than hold the sender (and everyone queued behind it) until
        // TCP gives up many minutes later.
        let _ = conn.stream.set_write_timeout(Some(
            st.machine.config().dead_time.max(Duration::from_secs(1)),
        ));
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
            Message::SyncPause(paused) => {
                // Either node's pause-sync holds the resync on both; the echo of our own
                // pause finds the state already changed and does nothing.
                let repl = st.machine.status().repl;
                let running = matches!(repl, ReplState::SyncSource | ReplState::SyncTarget);
                let held = matches!(repl, ReplState::PausedSyncS | ReplState::PausedSyncT);
                if paused && running {
                    self.step(st, Event::Command(Command::PauseSync));
                } else if !paused && held {
                    self.step(st, Event::Command(Command::ResumeSync));
                }
            }
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
                if let Err(e) = persist::adopt_sync_uuid(&mut self.keeper(), sync_uuid) {
                    self.persist_failed("the sync UUID", &e);
                }
            }
            Message::BitmapChunk(c) => {
                // The bits were applied by the applier thread, in order with the resync data.
                if c.last {
                    if let Some(job) = &mut st.job {
                        job.peer_bitmap_done = true;
                        let total = self.meta.out_of_sync_bytes();
                        self.progress.total.store(total, Ordering::Relaxed);
                    }
                    self.maybe_start_copier(st);
                }
            }
            Message::SyncDone => {
                if st.job.as_ref().map(|j| j.direction) == Some(SyncDirection::Target) {
                    let source = st.source_at_start;
                    if let Err(e) =
                        persist::finish_resync_target(&mut self.keeper(), source.as_ref())
                    {
                        self.persist_failed("the end of the resync", &e);
                    }
                    self.set_job(st, None);
                    self.progress.end(self.now_ms());
                    self.publish_progress(st, true);
                    tracing::info!(
                        resource = %self.spec.name,
                        "resync finished (target): {} bytes received, {} equal, {} zero",
                        self.progress.sent.load(Ordering::Relaxed),
                        self.progress.same.load(Ordering::Relaxed),
                        self.progress.zero.load(Ordering::Relaxed)
                    );
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
        let full = job.full;
        let total = self.meta.out_of_sync_bytes();
        self.progress.total.store(total, Ordering::Relaxed);
        tracing::info!(
            resource = %self.spec.name,
            "resync started: {total} bytes to examine, {}",
            if full { "checksum-based" } else { "bitmap-based" }
        );
        let me = self.self_arc();
        let paused = st.paused.clone();
        let _ = std::thread::Builder::new()
            .name(format!("resync-{}", self.spec.name))
            .spawn(move || {
                let ok = me.copy_out_of_sync(&link, &paused, full);
                if ok {
                    tracing::info!(
                        resource = %me.spec.name,
                        "resync copied: {} bytes sent, {} equal, {} zero",
                        me.progress.sent.load(Ordering::Relaxed),
                        me.progress.same.load(Ordering::Relaxed),
                        me.progress.zero.load(Ordering::Relaxed)
                    );
                }
                me.send(Input::CopierDone(link.conn_id, ok));
            });
    }

    /// The source's copier: every out-of-sync block to the peer, until none is left. With
    /// `checksums` (a full sync) the peer first sends the crc32c of each 4 KiB block of a
    /// chunk and only blocks that differ travel; in both modes all-zero blocks travel as zero
    /// markers. The local read and the send happen under the device's order lock.
    fn copy_out_of_sync(&self, link: &PeerLink, paused: &AtomicBool, checksums: bool) -> bool {
        let size = self.device.size();
        let chunk = if checksums { CSUM_CHUNK } else { RESYNC_CHUNK };
        let mut c = Copier {
            link,
            pacer: Pacer::new(self.spec.rate, Instant::now()),
            queue: std::collections::VecDeque::new(),
            csums: std::collections::VecDeque::new(),
            in_flight: 0,
        };
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
            for range in ranges {
                let mut off = range.start;
                let end = range.end.min(size);
                while off < end {
                    if !self.copier_gate(&mut c, paused) {
                        return false;
                    }
                    // Chunks aligned to the chunk size, so checksum requests line up.
                    let len = (chunk - off % chunk).min(end - off);
                    if checksums {
                        let Some(answer) = link.request(|id| {
                            Message::ChecksumRequest(ChecksumRequestRepr {
                                id,
                                offset: off,
                                len: len as u32,
                            })
                        }) else {
                            return false;
                        };
                        // Reserve the chunk's worth: what may travel once the checksums are in.
                        c.pacer.charge(len);
                        c.in_flight += len;
                        c.csums.push_back(InFlight::Csum { off, len, answer });
                    } else {
                        let Some(data) = self.push_chunk(&mut c, off, len, None) else {
                            return false;
                        };
                        c.pacer.charge(data);
                    }
                    off += len;
                }
            }
            while c.pending() > 0 {
                if !self.reap(&mut c, true) {
                    return false;
                }
            }
        }
    }

    /// Before the copier issues more: pause, link, window and rate. False: give up.
    fn copier_gate(&self, c: &mut Copier<'_>, paused: &AtomicBool) -> bool {
        loop {
            if c.link.is_dead() || self.cancel.is_cancelled() {
                return false;
            }
            // Settle whatever the peer has answered (acks feed the rate controller).
            while c.pending() > 0 {
                match self.reap_ready(c) {
                    Some(true) => {}
                    Some(false) => return false,
                    None => break,
                }
            }
            if paused.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if c.pending() >= RESYNC_WINDOW {
                if !self.reap(c, true) {
                    return false;
                }
                continue;
            }
            let app = self.device.counters.read_bytes.load(Ordering::Relaxed)
                + self.device.counters.written_bytes.load(Ordering::Relaxed);
            match c.pacer.poll(Instant::now(), c.in_flight, app) {
                None => return true,
                Some(wait) => {
                    if c.pending() > 0 && !self.reap(c, true) {
                        return false;
                    }
                    if c.pending() == 0 {
                        std::thread::sleep(wait.min(Duration::from_millis(20)));
                    }
                }
            }
        }
    }

    /// Settles the oldest checksum request or, failing that, the oldest push, if its answer is
    /// there: `None` if neither is answered yet.
    fn reap_ready(&self, c: &mut Copier<'_>) -> Option<bool> {
        for csums in [true, false] {
            let q = if csums { &mut c.csums } else { &mut c.queue };
            let Some(InFlight::Csum { answer, .. } | InFlight::Push { answer, .. }) = q.front()
            else {
                continue;
            };
            match answer.try_recv() {
                Ok(reply) => {
                    let entry = q.pop_front().expect("not empty");
                    return Some(self.settle(c, entry, reply));
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Some(false),
            }
        }
        None
    }

    /// Settles one message, waiting for its answer if `blocking`: the oldest checksum request
    /// if there is one (its answer leads to more data), else the oldest push.
    fn reap(&self, c: &mut Copier<'_>, blocking: bool) -> bool {
        if !blocking {
            return self.reap_ready(c).unwrap_or(true);
        }
        let entry = match c.csums.pop_front() {
            Some(e) => e,
            None => match c.queue.pop_front() {
                Some(e) => e,
                None => return true,
            },
        };
        let reply = match &entry {
            InFlight::Csum { answer, .. } | InFlight::Push { answer, .. } => answer.recv(),
        };
        match reply {
            Ok(reply) => self.settle(c, entry, reply),
            Err(_) => false,
        }
    }

    fn settle(&self, c: &mut Copier<'_>, entry: InFlight, reply: Reply) -> bool {
        match (entry, reply) {
            (InFlight::Csum { off, len, .. }, Reply::Checksums(peer))
                if peer.len() == len.div_ceil(CHECKSUM_BLOCK as u64) as usize =>
            {
                // The reservation ends; what does not travel as data goes back to the budget
                // (the data itself was paid for by the reservation).
                c.in_flight = c.in_flight.saturating_sub(len);
                let Some(data) = self.push_chunk(c, off, len, Some(&peer)) else {
                    return false;
                };
                c.pacer.charge(data);
                c.pacer.charge_back(len);
                true
            }
            (
                InFlight::Push {
                    off,
                    len,
                    kind,
                    wire,
                    ..
                },
                Reply::Ack(AckKind::Completed),
            ) => {
                c.in_flight = c.in_flight.saturating_sub(wire);
                c.pacer.acked(wire);
                self.meta.clear_in_sync(off, len);
                self.progress.done.fetch_add(len, Ordering::Relaxed);
                let counter = match kind {
                    BlockKind::Data => &self.progress.sent,
                    BlockKind::Zero => &self.progress.zero,
                    BlockKind::Same => &self.progress.same,
                };
                counter.fetch_add(len, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Reads `len` bytes at `off` and sends them as runs of data, zero markers and (given the
    /// peer's checksums) skips, all under the order lock, so a client write to the same blocks
    /// is either already in the read or sent after it. Returns the wire bytes sent (data plus
    /// message overhead), or `None` if the link or the disk failed.
    fn push_chunk(
        &self,
        c: &mut Copier<'_>,
        off: u64,
        len: u64,
        peer: Option<&[u32]>,
    ) -> Option<u64> {
        let _order = self.device.order_lock();
        let local = self.device.local();
        let mut buf = Vec::new();
        let runs = if local.known_zero(off, len) {
            classify_zero(len, peer)
        } else {
            buf = vec![0u8; len as usize];
            if local.read_at(&mut buf, off).is_err() {
                self.device.detach();
                return None;
            }
            classify_blocks(&buf, peer)
        };
        let mut sent = 0;
        let whole = runs.len() == 1;
        for (a, b, kind) in runs {
            let offset = off + a as u64;
            let run = (b - a) as u64;
            let (wire, answer) = match kind {
                BlockKind::Data => (
                    run,
                    c.link.request(|id| {
                        Message::ResyncData(ResyncDataRepr {
                            id: id | PUSH_BIT,
                            offset,
                            // One run of data: the buffer itself, no copy.
                            data: if whole {
                                std::mem::take(&mut buf)
                            } else {
                                buf[a..b].to_vec()
                            },
                        })
                    }),
                ),
                BlockKind::Zero => (
                    20,
                    c.link.request(|id| {
                        Message::ResyncZero(ResyncZeroRepr {
                            id: id | PUSH_BIT,
                            offset,
                            len: run as u32,
                        })
                    }),
                ),
                BlockKind::Same => (
                    20,
                    c.link.request(|id| {
                        Message::ResyncSkip(ResyncSkipRepr {
                            id: id | PUSH_BIT,
                            offset,
                            len: run as u32,
                        })
                    }),
                ),
            };
            let answer = answer?;
            sent += wire;
            c.in_flight += wire;
            c.queue.push_back(InFlight::Push {
                off: offset,
                len: run,
                kind,
                wire,
                answer,
            });
        }
        Some(sent)
    }

    /// The verifier: compares the crc32c of every 4 KiB block with the peer's, recording the
    /// ranges that differ. False if the connection was lost first.
    fn verify_all(&self, link: &PeerLink, local_at_reply: bool) -> bool {
        let size = self.device.size();
        let mut queue = std::collections::VecDeque::new();
        let mut off = 0u64;
        while off < size || !queue.is_empty() {
            if link.is_dead()
                || self.cancel.is_cancelled()
                || self.verify.abort.load(Ordering::Relaxed)
            {
                return false;
            }
            if off < size && queue.len() < VERIFY_WINDOW {
                let len = CSUM_CHUNK.min(size - off);
                let request = |id| {
                    Message::ChecksumRequest(ChecksumRequestRepr {
                        id,
                        offset: off,
                        len: len as u32,
                    })
                };
                if local_at_reply {
                    let Some(answer) = link.request(|id| request(id | LOCAL_BIT)) else {
                        return false;
                    };
                    queue.push_back((off, len, answer, None));
                } else {
                    let (ours, answer) = {
                        let _order = self.device.order_lock();
                        let Some(ours) = checksums_of(self.device.local().as_ref(), off, len)
                        else {
                            self.device.detach();
                            return false;
                        };
                        (ours, link.request(request))
                    };
                    let Some(answer) = answer else { return false };
                    queue.push_back((off, len, answer, Some(ours)));
                }
                off += len;
                continue;
            }
            let (o, l, answer, ours) = queue.pop_front().expect("not empty");
            let (peer, local) = match (answer.recv(), ours) {
                (Ok(Reply::Checksums(peer)), Some(local)) => (peer, local),
                (Ok(Reply::Compared { peer, local }), None) => (peer, local),
                _ => return false,
            };
            if peer.len() != local.len() {
                return false;
            }
            for (i, (p, q)) in peer.iter().zip(&local).enumerate() {
                if p != q {
                    let at = o + i as u64 * CHECKSUM_BLOCK as u64;
                    self.verify_mismatch(at, (CHECKSUM_BLOCK as u64).min(o + l - at));
                }
            }
            self.verify.done.fetch_add(l, Ordering::Relaxed);
        }
        true
    }

    fn verify_mismatch(&self, off: u64, len: u64) {
        tracing::warn!(resource = %self.spec.name, "verify: out-of-sync {len}@{off}");
        self.verify.blocks.fetch_add(1, Ordering::Relaxed);
        for (list, cap) in [
            (&self.verify.ranges, MAX_VERIFY_RANGES),
            (&self.verify.all_ranges, usize::MAX),
        ] {
            let mut list = lock(list);
            if let Some((_, l)) = list.last_mut().filter(|(o, l)| *o + *l == off) {
                *l += len;
            } else if list.len() < cap {
                list.push((off, len));
            }
        }
    }

    // ---------------------------------------------------------------- actions

    fn execute(&self, st: &mut State, actions: Vec<Action>) {
        for action in actions {
            // What a restart must know first, by the executor the simulator runs too.
            let started = persist::execute(&mut self.keeper(), &action, &mut || {
                random_uuid(&mut rand::rng())
            })
            .unwrap_or_else(|e| {
                self.persist_failed(&format!("{action:?}"), &e);
                None
            });
            self.execute_one(st, action, started);
        }
        let s = st.machine.status();
        // The connected peer has no disk: the writes it forwards exist only here.
        let peer_diskless = s.conn == ConnState::Connected && s.peer_disk == DiskState::Diskless;
        self.peer_diskless.store(peer_diskless, Ordering::Release);
        // Replicate writes whenever the connection is established.
        let replicate = s.conn == ConnState::Connected && s.peer_disk != DiskState::Diskless;
        match (&st.link, replicate, self.device.link().is_some()) {
            (Some(link), true, false) => self.device.set_link(Some(link.clone())),
            (_, false, true) => self.device.set_link(None),
            _ => {}
        }
    }

    fn execute_one(&self, st: &mut State, action: Action, started: Option<SourceStarted>) {
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
                // Bits beyond a size shrunk to the peer's are never resynced: drop them.
                let size = self.device.size();
                let data_size = self.meta.data_size();
                if data_size > size {
                    self.meta.clear_in_sync(size, data_size - size);
                }
                if !full {
                    self.send_bitmap(&link);
                }
                self.progress
                    .begin(self.meta.out_of_sync_bytes(), self.now_ms());
                if direction == SyncDirection::Source {
                    // The executor rotated our UUIDs; the target learns the result.
                    let Some(started) = started else {
                        tracing::error!(resource = %name, "resync not started: the generation UUIDs could not be written");
                        return;
                    };
                    let _ = link.send(Message::Uuids(UuidsRepr::from(UuidSet {
                        dirty_bits: self.meta.out_of_sync_bytes() / 4096,
                        flags: st.machine.uuid_flags(),
                        ..started.at_start
                    })));
                    let _ = link.send(Message::SyncUuid(started.sync_uuid));
                }
                tracing::info!(resource = %name, "resync: {direction:?}, {}", if full { "full" } else { "bitmap" });
                self.set_job(
                    st,
                    Some(Job {
                        direction,
                        full,
                        peer_bitmap_done: false,
                        copier_started: false,
                    }),
                );
                self.maybe_start_copier(st);
            }
            Action::PauseResync | Action::ResumeResync => {
                let paused = action == Action::PauseResync;
                st.paused.store(paused, Ordering::Release);
                if let Some(link) = &st.link {
                    let _ = link.send(Message::SyncPause(paused));
                }
            }
            // Persisted by the executor before this.
            Action::NewCurrentUuid | Action::PersistFlags { .. } => {}
            Action::Shrink { size } => self.device.limit_size(size),
            Action::RefusePeer { reason } => {
                tracing::debug!(resource = %name, "peer refused: {reason}")
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
            if let Err(e) = self.keeper().change_flags(0, flags::PRIMARY_IND) {
                self.persist_failed("the demotion", &e);
            }
        }
        // The applier may still be finishing a write from the peer; it cannot start another
        // (the link is down), so wait for it rather than leave the meta-data unclean.
        let still = self.meta.wait_for_writes(Duration::from_secs(10));
        if still > 0 {
            tracing::error!(resource = %self.spec.name, "{still} writes still in flight at shutdown");
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
                    // Acknowledgements of a burst of writes leave together, after the last of
                    // them is written: one send (and one wake-up of the peer) per burst.
                    let mut acks = Vec::new();
                    let mut next = work_rx.recv().ok();
                    while let Some(message) = next {
                        let mut answered = Ok(());
                        if !matches!(message, Message::WriteData(_)) || acks.len() >= 64 {
                            answered = send_acks(&link, &mut acks);
                        }
                        answered = answered.and_then(|()| me.apply(&link, message, &mut acks));
                        next = work_rx.try_recv().ok();
                        if next.is_none() {
                            answered = answered.and_then(|()| send_acks(&link, &mut acks));
                            next = work_rx.recv().ok();
                        }
                        if let Err(e) = answered {
                            tracing::warn!(resource = %me.spec.name, "peer link failed while answering: {e}");
                            link.fail_all();
                            return;
                        }
                    }
                    let _ = send_acks(&link, &mut acks);
                });
        }
        let why = loop {
            let message = match peer::read_message(&mut stream, &mut decoder) {
                Ok(m) => m,
                Err(e) => break e.to_string(),
            };
            link.heard();
            let answered = match &message {
                // Not behind a busy sender: this thread must keep reading (see tick).
                Message::Ping(p) => link
                    .try_send(Message::PingAck(*p))
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Message::PingAck(_) => Ok(()),
                Message::WriteAck(a) => {
                    if a.kind == AckKind::Failed {
                        self.device.peer_failed_io();
                    }
                    link.complete(a.id & ID_MASK, Reply::Ack(a.kind));
                    Ok(())
                }
                Message::BarrierAck(a) => {
                    if !a.stable {
                        self.device.peer_failed_io();
                    }
                    link.complete(a.barrier, barrier_reply(a));
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
    ///
    /// A `WriteData` answered under protocol C leaves its acknowledgement in `acks`, for the
    /// caller to send (with the others of its burst) before anything else.
    fn apply(
        &self,
        link: &PeerLink,
        message: Message,
        acks: &mut Vec<Message>,
    ) -> Result<(), String> {
        let local = self.device.local();
        let power = self.spec.durability == Durability::Power;
        match message {
            Message::WriteData(w) => {
                let fua = power || w.flags & crate::repl::device::WRITE_FUA != 0;
                let len = w.data.len() as u64;
                // The activity log covers what this node acknowledges, as on the primary: if
                // it loses power with the write only in its cache, the extent is resynced.
                let logged = self.meta.write_begin(w.offset, len).is_ok();
                let ok = logged
                    && !self.device.is_detached()
                    && local.write_at(&w.data, w.offset, fua).is_ok();
                if logged {
                    self.meta.write_end(w.offset, len);
                }
                if !ok {
                    self.device.detach();
                } else if self.peer_diskless.load(Ordering::Acquire) {
                    self.meta.mark_out_of_sync(w.offset, w.data.len() as u64);
                }
                if w.id != 0 && self.spec.protocol == ReplProtocol::C {
                    let kind = if ok {
                        AckKind::Completed
                    } else {
                        AckKind::Failed
                    };
                    acks.push(Message::WriteAck(WriteAckRepr { id: w.id, kind }));
                }
            }
            Message::Barrier(b) => {
                // A failed flush is a failing disk: detach (the peer learns we are Diskless)
                // and say so, so the Primary does not count on what sat in our cache.
                let stable = !self.device.is_detached()
                    && match local.flush() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!(resource = %self.spec.name, error = %e, "flush failed; detaching the disk");
                            self.device.detach();
                            false
                        }
                    };
                link.send(Message::BarrierAck(BarrierAckRepr {
                    barrier: b.barrier,
                    stable,
                }))
                .map_err(|e| e.to_string())?;
            }
            Message::WriteAck(a) => {
                link.complete(a.id & ID_MASK, Reply::Ack(a.kind));
            }
            Message::BarrierAck(a) => {
                link.complete(a.barrier, barrier_reply(&a));
            }
            Message::ResyncData(d) if d.id & PUSH_BIT != 0 => {
                let len = d.data.len() as u64;
                let ok = self.resync_write(&d.data, d.offset, power);
                self.resync_applied(link, d.id, d.offset, len, ok, &self.progress.sent)?;
            }
            Message::ResyncZero(z) if z.id & PUSH_BIT != 0 => {
                let len = u64::from(z.len);
                let ok = crate::block::check_range(self.device.size(), z.offset, len).is_ok()
                    && !self.device.is_detached()
                    && (local.known_zero(z.offset, len)
                        || self
                            .device
                            .apply_resync_zeroes(z.offset, len, power)
                            .is_ok());
                if !ok && !self.device.is_detached() {
                    self.device.detach();
                }
                let len = u64::from(z.len);
                self.resync_applied(link, z.id, z.offset, len, ok, &self.progress.zero)?;
            }
            Message::ResyncSkip(k) if k.id & PUSH_BIT != 0 => {
                // Equal already: nothing to write, only the bits to clear.
                let ok = crate::block::check_range(self.device.size(), k.offset, u64::from(k.len))
                    .is_ok();
                let len = u64::from(k.len);
                self.resync_applied(link, k.id, k.offset, len, ok, &self.progress.same)?;
            }
            Message::ChecksumRequest(r) => {
                // Under the order lock: if we are the Primary, the answer lands in our stream
                // after every write already sent, before every later one.
                let _order = self.device.order_lock();
                let crcs =
                    if crate::block::check_range(self.device.size(), r.offset, u64::from(r.len))
                        .is_ok()
                        && !self.device.is_detached()
                    {
                        checksums_of(local.as_ref(), r.offset, u64::from(r.len))
                    } else {
                        None
                    };
                if let Some(crcs) = crcs {
                    link.send(Message::Checksums(ChecksumsRepr {
                        id: r.id,
                        offset: r.offset,
                        len: r.len,
                        crcs,
                    }))
                    .map_err(|e| e.to_string())?;
                } else {
                    send_ack(link, r.id, AckKind::Failed)?;
                }
            }
            Message::Checksums(c) if c.id & LOCAL_BIT != 0 => {
                // Our copy at this point of the stream: every write the peer sent before its
                // answer is applied, none after.
                let ours =
                    crate::block::check_range(self.device.size(), c.offset, u64::from(c.len))
                        .ok()
                        .and_then(|()| checksums_of(local.as_ref(), c.offset, u64::from(c.len)));
                let reply = match ours {
                    Some(local) => Reply::Compared {
                        peer: c.crcs,
                        local,
                    },
                    None => Reply::Ack(AckKind::Failed),
                };
                link.complete(c.id & ID_MASK, reply);
            }
            Message::Checksums(c) => {
                link.complete(c.id & ID_MASK, Reply::Checksums(c.crcs));
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

impl Resource {
    /// A resync write on the target (never over what a client wrote meanwhile, see
    /// [`ReplicatedDevice::apply_resync`]); a failure detaches the disk.
    fn resync_write(&self, data: &[u8], offset: u64, power: bool) -> bool {
        let ok = crate::block::check_range(self.device.size(), offset, data.len() as u64).is_ok()
            && !self.device.is_detached()
            && self.device.apply_resync(data, offset, power).is_ok();
        if !ok && !self.device.is_detached() {
            self.device.detach();
        }
        ok
    }

    /// The target applied (or failed) one resync message: bits, counters, acknowledgement.
    fn resync_applied(
        &self,
        link: &PeerLink,
        id: u64,
        offset: u64,
        len: u64,
        ok: bool,
        counter: &AtomicU64,
    ) -> Result<(), String> {
        if ok {
            self.meta.clear_in_sync(offset, len);
            counter.fetch_add(len, Ordering::Relaxed);
            self.progress.done.fetch_add(len, Ordering::Relaxed);
        }
        send_ack(
            link,
            id,
            if ok {
                AckKind::Completed
            } else {
                AckKind::Failed
            },
        )
    }
}

/// The crc32c of each 4 KiB block of `len` bytes at `offset`; a range the device knows reads as
/// zeros (a hole, an unwritten extent) is neither read nor hashed. `None` on a read error.
fn checksums_of(dev: &dyn BlockDevice, offset: u64, len: u64) -> Option<Vec<u32>> {
    if dev.known_zero(offset, len) {
        return Some(zero_checksums(len));
    }
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, offset).ok()?;
    Some(block_checksums(&buf))
}

/// The meta-data store under the persistent executor: every write durable when it returns.
struct MetaKeeper<'a>(&'a MetaStore);

impl Keeper for MetaKeeper<'_> {
    fn uuids(&self) -> UuidSet {
        self.0.uuids()
    }

    fn store_uuids(&mut self, uuids: UuidSet) -> Result<(), String> {
        self.0.set_uuids(uuids).map_err(|e| e.to_string())
    }

    fn change_flags(&mut self, set: u32, clear: u32) -> Result<(), String> {
        self.0.set_flags(set, clear).map_err(|e| e.to_string())
    }

    fn store_agreed_size(&mut self, size: u64) -> Result<(), String> {
        self.0.set_agreed_size(size).map_err(|e| e.to_string())
    }

    fn mark_all_out_of_sync(&mut self) -> Result<(), String> {
        self.0
            .set_all_out_of_sync()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Sends the acknowledgements collected so far, in one write.
fn send_acks(link: &PeerLink, acks: &mut Vec<Message>) -> Result<(), String> {
    if acks.is_empty() {
        return Ok(());
    }
    link.send_all(acks.drain(..)).map_err(|e| e.to_string())
}

fn send_ack(link: &PeerLink, id: u64, kind: AckKind) -> Result<(), String> {
    link.send(Message::WriteAck(WriteAckRepr { id, kind }))
        .map_err(|e| e.to_string())
}

/// Percent done, rate and time left of a resync or verify.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResyncFigures {
    /// Percent done.
    pub percent: f64,
    /// MB/s (10^6 bytes) since it started.
    pub rate_mbps: f64,
    /// Seconds left at that rate (0 if unknown).
    pub eta_secs: f64,
}

impl ResyncFigures {
    /// From the bytes to do, the bytes left and the seconds so far.
    pub fn of(total: u64, remaining: u64, secs: f64) -> ResyncFigures {
        let total = total.max(remaining);
        let done = total - remaining;
        let percent = if total == 0 {
            100.0
        } else {
            100.0 * done as f64 / total as f64
        };
        let rate_mbps = if secs > 0.0 {
            done as f64 / secs / 1e6
        } else {
            0.0
        };
        let eta_secs = if rate_mbps > 0.0 {
            remaining as f64 / 1e6 / rate_mbps
        } else {
            0.0
        };
        ResyncFigures {
            percent,
            rate_mbps,
            eta_secs,
        }
    }
}

/// The online verify's state for status.
#[derive(Debug, Clone, Default)]
pub struct VerifySnapshot {
    /// Running now.
    pub running: bool,
    /// Verifies finished since the daemon started.
    pub runs: u64,
    /// Bytes to compare.
    pub total: u64,
    /// Bytes compared.
    pub done: u64,
    /// Seconds it ran (so far).
    pub secs: f64,
    /// 4 KiB blocks that differ.
    pub blocks: u64,
    /// The first mismatched ranges (offset, length).
    pub ranges: Vec<(u64, u64)>,
    /// The last verify stopped early.
    pub failed: bool,
}

impl VerifySnapshot {
    /// `4096@1052672 8192@2097152` (length@offset, bytes).
    pub fn ranges_text(&self) -> String {
        let mut t = self
            .ranges
            .iter()
            .map(|(o, l)| format!("{l}@{o}"))
            .collect::<Vec<_>>()
            .join(" ");
        if self.blocks > 0 && self.ranges.len() >= MAX_VERIFY_RANGES {
            t += " ...";
        }
        t
    }
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
    /// Resync: seconds since it started (until it ended).
    pub resync_secs: f64,
    /// Resync: block data moved over the wire.
    pub resync_sent: u64,
    /// Resync: bytes found equal by checksum.
    pub resync_same: u64,
    /// Resync: bytes sent as zero markers.
    pub resync_zero: u64,
    /// Online verify.
    pub verify: VerifySnapshot,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_travel_as_data_zero_or_skip() {
        let mut buf = vec![0u8; 6 * 4096 + 512];
        buf[4096] = 1; // block 1: data
        buf[3 * 4096 + 7] = 9; // block 3: data, equal at the peer
        buf[6 * 4096 + 1] = 5; // the short tail: data
        let runs = classify_blocks(&buf, None);
        assert_eq!(
            runs,
            vec![
                (0, 4096, BlockKind::Zero),
                (4096, 8192, BlockKind::Data),
                (8192, 12288, BlockKind::Zero),
                (12288, 16384, BlockKind::Data),
                (16384, 24576, BlockKind::Zero),
                (24576, 25088, BlockKind::Data),
            ]
        );
        // With the peer's checksums: block 0 (zero there too) and block 3 are equal; block 4
        // differs there but is zero here; block 5 is zero here and garbage there.
        let mut peer = block_checksums(&buf);
        peer[1] ^= 1;
        peer[4] = 0xdead_beef;
        peer[5] = 0xfeed_f00d;
        peer[6] ^= 1;
        let runs = classify_blocks(&buf, Some(&peer));
        assert_eq!(
            runs,
            vec![
                (0, 4096, BlockKind::Same),
                (4096, 8192, BlockKind::Data),
                (8192, 16384, BlockKind::Same),
                (16384, 24576, BlockKind::Zero),
                (24576, 25088, BlockKind::Data),
            ]
        );
        // Every byte is covered exactly once.
        let covered: usize = runs.iter().map(|(a, b, _)| b - a).sum();
        assert_eq!(covered, buf.len());
    }

    #[test]
    fn figures_and_progress_clock() {
        let f = ResyncFigures::of(100_000_000, 25_000_000, 1.5);
        assert!((f.percent - 75.0).abs() < 1e-9);
        assert!((f.rate_mbps - 50.0).abs() < 1e-9);
        assert!((f.eta_secs - 0.5).abs() < 1e-9);
        // Nothing to do is done; no time yet is no rate and no ETA.
        assert_eq!(ResyncFigures::of(0, 0, 0.0).percent, 100.0);
        assert_eq!(ResyncFigures::of(10, 10, 0.0).eta_secs, 0.0);
        // More left than planned (new writes): never negative.
        assert_eq!(ResyncFigures::of(10, 20, 1.0).percent, 0.0);
        let p = Progress::default();
        p.begin(1000, 2000);
        assert_eq!(p.secs(3500), 1.5);
        p.end(4000);
        p.end(9000); // the first end counts
        assert_eq!(p.secs(10_000), 2.0);
        p.sent.store(5, Ordering::Relaxed);
        p.begin(10, 20_000);
        assert_eq!(
            p.sent.load(Ordering::Relaxed),
            0,
            "a new resync starts from zero"
        );
        assert_eq!(p.secs(20_500), 0.5);
    }

    #[test]
    fn verify_ranges_print_as_length_at_offset() {
        let v = VerifySnapshot {
            blocks: 3,
            ranges: vec![(1_052_672, 4096), (2 << 20, 8192)],
            ..VerifySnapshot::default()
        };
        assert_eq!(v.ranges_text(), "4096@1052672 8192@2097152");
    }
}
