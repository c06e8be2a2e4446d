//! One resource on this node: the engine thread that feeds the cluster [`Machine`] and carries
//! out its [`Action`]s, the connection thread that reaches the peer, the reader of an
//! established connection, and the resync copier.
//!
//! Threads and who owns what (one file per role):
//!
//! * **engine** (this file; one per resource): owns the `Machine`, the exports and the resync
//!   job, and executes the machine's actions — what a restart must keep through
//!   [`crate::cluster::persist`], the executor the simulator runs too. Every other thread talks
//!   to it through its [`Input`] channel; it never blocks on the network except to stop an
//!   export.
//! * **connector** (`connector.rs`): dials or accepts, runs the handshake, hands the result to
//!   the engine, which lets the machine judge the peer's terms before anything is set up.
//! * **reader and applier** (`applier.rs`; one pair per connection): apply the peer's writes,
//!   barriers and resync blocks in arrival order and answer them; complete our own requests.
//! * **copier** (`resync.rs`, while this node is a resync source) and **verifier**
//!   (`verify.rs`, during `verify`); the pure chunk planning is [`crate::repl::plan`].
//! * **status** (`status.rs`): the snapshot and the `events` lines.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::ha::gate::ServeGate;
use crate::ha::service::{Heartbeat, LocalResource};
use crate::ha::stopwatch::Stopwatch;
use crate::supervisor::Supervisor;

use crate::block::BlockDevice;
use crate::cluster::persist::{self, Keeper, SourceStarted};
use crate::cluster::{
    Action, Authority, Command, ConnState, DiskState, Event, Machine, Notification, PeerSeen,
    ReplState, Role, Startup, SyncDirection, Terms,
};
use crate::meta::store::MetaStore;
use crate::ratelimit::LogLimiter;
use crate::repl::device::{barrier_reply, DeviceEvent, ReplicatedDevice};
use crate::repl::link::{PeerLink, Reply};
use crate::repl::rate::Pacer;
use crate::repl::uuid::{decide, random_uuid, HandshakeContext, UuidFlags, UuidSet};
use crate::wire::ondisk::flags;
use crate::wire::repl::{
    AckKind, BarrierAckRepr, BitmapChunkRepr, BitmapEncoding, ChecksumAlg, ChecksumRequestRepr,
    ChecksumsRepr, DisconnectReason, Durability, FrameDecoder, Message, ParametersRepr, PingRepr,
    ReplProtocol, ResyncDataRepr, ResyncSkipRepr, ResyncZeroRepr, StateChangeRepr, SyncStartRepr,
    UuidsRepr, WriteAckRepr, CHECKSUM_BLOCK, MAX_DATA_LEN,
};

use super::peer::{self, Handshaken, Identity};
use crate::repl::csum::{self, Digest};
use crate::repl::plan::{classify_blocks, classify_zero, BlockKind};

mod applier;
mod connector;
mod engine;
mod ops;
mod resync;
pub mod service;
mod status;
mod verify;

use applier::checksums_of;
use engine::Engine;
pub use ops::{AoeTotals, ExportCounters, FailoverOutcome, NbdTotals, OpsSnapshot};
use service::{ServiceGroup, ServiceSpec};
pub use status::{HaSnapshot, PathSnapshot, ResyncFigures, Snapshot, VerifySnapshot};

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
/// Keepalive interval while connected, at most (see [`ResourceSpec::ping_interval`]).
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Config queries the wire guard sends in that time.
const WIRE_GUARD_QUERIES: u32 = 3;
/// A failover still not serving a client after this long is no longer timed.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// Engine tick: timers of the machine (the takeover delay above all) fire on a tick, so a
/// failover waits up to this much longer than it must.
const TICK: Duration = Duration::from_millis(50);

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
    /// The wire guard finished: somebody else answers our shelf.slot (or it could not ask).
    WireChecked(bool),
    /// While serving, another MAC answered our shelf.slot.
    Rival(crate::wire::MacAddr),
    /// The fence command finished.
    FenceDone(crate::cluster::FenceOutcome),
    /// The witness answered a claim for this generation (or did not).
    WitnessDone(u64, crate::cluster::WitnessVerdict),
    /// The heartbeat's view of the peer changed.
    Heartbeat,
    /// Test hook (`fault RES engine-stall-ms=N`): the engine stands still this long, as a
    /// hung engine would — what the watchdog must notice.
    Stall(Duration),
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
    /// Block digest of full sync and verify.
    pub csums: ChecksumAlg,
    /// NBD export address while primary.
    pub nbd: Option<SocketAddr>,
    /// The MAC the blade answers from while served (`None`: the interface's own).
    pub service_mac: Option<crate::wire::MacAddr>,
    /// The address that moves with the service.
    pub floating_ip: Option<crate::net::address::FloatingIp>,
    /// The test-only fault layer under the data disk (see [`super::TEST_FAULTS_ENV`]).
    pub faults: Option<super::TestFaults>,
    /// The resync rate controller's settings.
    pub rate: crate::repl::rate::RateConfig,
    /// How long an acknowledged heartbeat or replication ping keeps this node's lease (⅔ of
    /// the heartbeat dead time; see [`crate::cluster::machine`]).
    pub lease_time: Duration,
    /// How long the wire guard listens for answers to its config queries.
    pub wire_guard_wait: Duration,
    /// How often the replication link is pinged while connected (the heartbeat interval, at
    /// most [`PING_INTERVAL`]).
    pub ping_interval: Duration,
    /// The fence command (`[cluster] fence-peer`), if one is configured.
    pub fence: Option<Arc<super::fence::FenceSpec>>,
    /// The witness (`[cluster] witness`), if one is configured.
    pub witness: Option<Arc<super::witness::WitnessSpec>>,
    /// What requests held behind the shut serve gate do (`on-no-quorum`).
    pub on_no_quorum: crate::ha::quorum::OnNoQuorum,
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

struct Job {
    direction: SyncDirection,
    full: bool,
    peer_bitmap_done: bool,
    copier_started: bool,
}

/// The periodic witness query: its last result (reachable) and when it came, and when the
/// last one started.
pub type WitnessPoll = (Option<(bool, Instant)>, Option<Instant>);

/// What the engine last published of its machine, for the roles that only read it.
#[derive(Debug, Clone, Copy)]
struct Published {
    status: crate::cluster::Status,
    uuid_flags: UuidFlags,
}

/// One resource, running: what its roles share — static facts, the disks, counters, the
/// engine's inbox and its published status. The engine's own state is not here (see
/// [`engine`]).
pub struct Resource {
    /// Static facts.
    pub spec: ResourceSpec,
    meta: Arc<MetaStore>,
    device: Arc<ReplicatedDevice>,
    tx: Mutex<Sender<Input>>,
    /// The machine's status as of the engine's last step.
    published: Mutex<Published>,
    /// The engine wants a connection (the connector dials or accepts while it does).
    wants_connect: AtomicBool,
    /// A connection is established (the connector rests meanwhile).
    linked: AtomicBool,
    subscribers: Mutex<Vec<Sender<String>>>,
    /// What this resource's engine starts (reader, applier, copier, verifier, exports); stopped
    /// by the engine at shutdown.
    crew: Supervisor,
    /// The resource's own group (engine, connector, crew).
    group: Supervisor,
    conn_ids: AtomicU64,
    /// Resync progress.
    pub progress: Progress,
    /// Online verify.
    pub verify: VerifyState,
    started: Instant,
    /// The connected peer has no disk: writes it forwards to us exist only here, so we mark
    /// them out of sync (and started a new data generation when it lost its disk).
    peer_diskless: AtomicBool,
    /// Whether the exports may answer right now: the engine sets its authority after every
    /// step; the heartbeat and the replication pings renew its lease.
    pub gate: Arc<ServeGate>,
    /// Lease lapses while serving under a lease (each logged once).
    pub lease_lapses: AtomicU64,
    /// The node's heartbeat: what the peer is heard saying, and what we announce.
    heartbeat: Heartbeat,
    /// The last failover's timeline, for `status`.
    pub last_failover: Mutex<Option<String>>,
    /// The fence command's last outcome and when it came, for `status`.
    pub last_fence: Mutex<Option<(crate::cluster::FenceOutcome, Instant)>>,
    /// The witness's last verdict (generation, verdict) and when it came, for `status`.
    pub last_witness: Mutex<Option<(u64, crate::cluster::WitnessVerdict, Instant)>>,
    /// When the witness was last unreachable, for `status` (a warning).
    pub witness_unreachable: Mutex<Option<Instant>>,
    /// The periodic query's last result (reachable) and when it came; when the last started.
    pub witness_poll: Mutex<WitnessPoll>,
    /// A periodic query is running.
    witness_polling: AtomicBool,
    /// What the service group serves and where.
    service: ServiceSpec,
    /// The engine's loop beat, failover outcomes and export counters (watchdog, metrics).
    ops: ops::Ops,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Resource {
    /// Starts the engine and connector threads in `group` (stopping the group stops the
    /// resource in order: connector, then the engine's orderly shutdown). `local` is the data
    /// area.
    pub fn start(
        spec: ResourceSpec,
        machine_config: crate::cluster::Config,
        meta: Arc<MetaStore>,
        local: Arc<dyn BlockDevice>,
        heartbeat: Heartbeat,
        group: Supervisor,
    ) -> std::io::Result<Arc<Resource>> {
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
                if sb.flags & flags::OUTDATED != 0 {
                    DiskState::Outdated
                } else {
                    DiskState::Consistent
                }
            } else {
                DiskState::Inconsistent
            },
            crashed_primary: sb.flags & flags::CRASHED_PRIMARY != 0,
            degraded: sb.flags & flags::PEER_OUTDATED != 0,
        };
        // A copy of the floating IP that a daemon killed while serving left behind: nothing may
        // answer there before this node serves again.
        if let Some(ip) = &spec.floating_ip {
            service::drop_floating_ip(&spec.name, &spec.interface, ip);
        }
        let now = Instant::now();
        let (machine, actions) = Machine::new(machine_config, startup, now);
        let listener = TcpListener::bind(spec.listen)?;
        listener.set_nonblocking(true)?;
        let res = Arc::new(Resource {
            peer_diskless: AtomicBool::new(false),
            // The resource's own lease, renewed by echoes from a peer that is not primary for
            // it (see `Heartbeat::serve_through`) and by answered replication pings.
            gate: {
                let gate = ServeGate::new(crate::ha::clock::LeaseClock::new());
                gate.set_on_no_quorum(spec.on_no_quorum);
                gate
            },
            heartbeat: heartbeat.clone(),
            last_failover: Mutex::new(None),
            last_fence: Mutex::new(None),
            last_witness: Mutex::new(None),
            witness_unreachable: Mutex::new(None),
            witness_poll: Mutex::new((None, None)),
            witness_polling: AtomicBool::new(false),
            lease_lapses: AtomicU64::new(0),
            service: ServiceSpec {
                name: spec.name.clone(),
                aoe: spec.aoe,
                interface: spec.interface.clone(),
                service_mac: spec.service_mac,
                floating_ip: spec.floating_ip,
                nbd: spec.nbd,
            },
            spec,
            meta,
            device,
            tx: Mutex::new(tx),
            published: Mutex::new(Published {
                status: machine.status(),
                uuid_flags: machine.uuid_flags(),
            }),
            wants_connect: AtomicBool::new(false),
            linked: AtomicBool::new(false),
            subscribers: Mutex::new(Vec::new()),
            crew: group.group("crew"),
            group: group.clone(),
            conn_ids: AtomicU64::new(1),
            progress: Progress::default(),
            verify: VerifyState::default(),
            started: now,
            ops: ops::Ops::default(),
        });
        tracing::info!(resource = %res.spec.name, ?startup, "attached");
        res.heartbeat
            .serve_through(&res.spec.name, res.gate.clone());
        {
            let weak = Arc::downgrade(&res);
            res.heartbeat.subscribe(
                &res.spec.name,
                Box::new(move || {
                    if let Some(res) = weak.upgrade() {
                        res.send(Input::Heartbeat);
                    }
                }),
            );
        }
        let mut engine = Engine {
            res: res.clone(),
            machine,
            link: None,
            service: None,
            ip_up: None,
            service_failed: false,
            job: None,
            paused: Arc::new(AtomicBool::new(false)),
            source_at_start: None,
            last_ping: now,
            last_alive_seen: None,
            last_progress_event: now,
            lease_lapsed: false,
            last_heard: None,
            last_reach: None,
            pauses_seen: 0,
            stopwatch: None,
        };
        engine.execute(actions);
        group.spawn(format!("engine-{}", res.spec.name), move |token| {
            engine.run(rx, token)
        })?;
        {
            let res = res.clone();
            group.spawn(format!("connect-{}", res.spec.name), move |token| {
                res.connector(listener, token)
            })?;
        }
        Ok(res)
    }

    /// The heartbeat paths as the heartbeat sees them now.
    fn heartbeat_paths(&self) -> Vec<PathSnapshot> {
        self.heartbeat
            .paths()
            .into_iter()
            .map(|p| PathSnapshot {
                id: p.id,
                local: p.local,
                peer: p.peer,
                last_heard: p.last_heard_age,
                rtt: p.rtt,
                silent: p.silent,
            })
            .collect()
    }

    /// Sends the engine an input.
    pub fn send(&self, input: Input) {
        let _ = lock(&self.tx).send(input);
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Steers the test-only fault layer: `write-delay-ms=N`, `read-delay-ms=N`, `write-error`,
    /// `read-error`, `flush-error`, `clear`.
    pub fn inject(&self, specs: &[&str]) -> Result<String, String> {
        use crate::block::fault::{FaultSpec, InjectedError};
        if let Some((&"power-cut", args)) = specs.split_first() {
            return super::power_cut(args, &self.crew);
        }
        if let [stall] = specs {
            if let Some(ms) = stall.strip_prefix("engine-stall-ms=") {
                let ms: u64 = ms
                    .parse()
                    .map_err(|e| format!("engine-stall-ms: bad number {ms:?}: {e}"))?;
                if self.spec.faults.is_none() {
                    return Err(format!(
                        "fault injection is off (start the daemon with {}=1)",
                        super::TEST_FAULTS_ENV
                    ));
                }
                self.send(Input::Stall(Duration::from_millis(ms)));
                return Ok(format!("engine stalls for {ms} ms"));
            }
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
                "flush-error" => config.flush_error = Some(FaultSpec::always(InjectedError::Eio)),
                other => {
                    let ms = |prefix: &str| other.strip_prefix(prefix).map(str::parse::<u64>);
                    match (ms("write-delay-ms="), ms("read-delay-ms=")) {
                        (Some(Ok(n)), _) => config.write_delay = Duration::from_millis(n),
                        (_, Some(Ok(n))) => config.read_delay = Duration::from_millis(n),
                        _ => return Err(format!("unknown fault {other:?} (write-delay-ms=N, read-delay-ms=N, write-error, read-error, flush-error, clear, engine-stall-ms=N, power-cut [keep-subset SEED])")),
                    }
                }
            }
        }
        faults.set_faults(config.clone());
        Ok(format!("faults: {config:?}"))
    }

    /// Our generation UUIDs as they travel: the stored ones, the dirty bits and `flags`.
    fn uuid_set(&self, flags: UuidFlags) -> UuidSet {
        UuidSet {
            dirty_bits: self.meta.out_of_sync_bytes() / 4096,
            flags,
            ..self.meta.uuids()
        }
    }

    /// The machine's status and UUID flags as of the engine's last step.
    fn published(&self) -> Published {
        *lock(&self.published)
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

    // ---------------------------------------------------------------- actions
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine actions of one simulated node, replayed through the daemon's executor
    /// backend (the meta-data store), end where the simulator's toy disk ended: the same
    /// generation UUIDs, the same superblock flags, the same agreed size. Both run
    /// [`persist::execute`]; this catches the two backends (or what they persist) drifting.
    #[test]
    fn the_daemon_keeps_what_the_simulator_keeps() {
        use crate::block::crash::CrashDevice;
        use crate::cluster::sim::{Pair, BLOCKS};
        use crate::meta::store::{create, CreateOptions};
        use crate::meta::LayoutParams;
        use crate::wire::ondisk::MetaKind;

        // Promotion, the peer losing its disk (a new generation), the peer gone (outdated),
        // demotion, a smaller peer (shrink), and a resync started as the source.
        let mut pair = Pair::healthy();
        pair.resync_time = Duration::from_secs(3600);
        pair.advance(Duration::from_secs(1));
        pair.step(1, Event::LocalIoError);
        pair.advance(Duration::from_secs(1));
        pair.crash(1);
        pair.advance(Duration::from_secs(1));
        pair.command(0, Command::Secondary);
        let mut smaller = pair.nodes[1].terms;
        smaller.size = BLOCKS as u64 * 4096 / 2;
        pair.set_terms(1, smaller);
        pair.restart(1, crate::cluster::Config::default(), Startup::consistent());
        pair.advance(Duration::from_secs(3));
        let node = &pair.nodes[0];
        for kind in ["NewCurrentUuid", "PersistFlags", "Shrink", "StartResync"] {
            assert!(
                node.actions
                    .iter()
                    .any(|a| format!("{a:?}").starts_with(kind)),
                "the history has no {kind}: {:?}",
                node.actions
            );
        }

        let meta_dev: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(1 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(4 << 20));
        let opts = CreateOptions {
            name: "t".into(),
            params: LayoutParams::default(),
            force: true,
        };
        create(meta_dev.as_ref(), 4 << 20, MetaKind::External, &opts).unwrap();
        let (store, _) = MetaStore::attach(meta_dev, data, MetaKind::External).unwrap();
        store
            .set_uuids(UuidSet::from_array([0x1000, 0, 0, 0]))
            .unwrap();
        let executor_bits = flags::CONSISTENT
            | flags::PRIMARY_IND
            | flags::PEER_OUTDATED
            | flags::CRASHED_PRIMARY
            | flags::OUTDATED;
        store.set_flags(0, executor_bits).unwrap();
        let mut fresh = node.fresh_uuids.iter().copied();
        for action in &node.actions {
            persist::execute(&mut MetaKeeper(&store), action, &mut || {
                fresh
                    .next()
                    .expect("as many new UUIDs as the simulator drew")
            })
            .unwrap();
        }
        assert_eq!(
            store.uuids().to_array(),
            node.uuids.to_array(),
            "generation UUIDs"
        );
        assert_eq!(
            store.superblock().flags & executor_bits,
            node.flags & executor_bits,
            "superblock flags"
        );
        assert_eq!(Some(store.usable_size()), node.agreed_size, "agreed size");
    }

    #[test]
    fn blocks_travel_as_data_zero_or_skip() {
        let mut buf = vec![0u8; 6 * 4096 + 512];
        buf[4096] = 1; // block 1: data
        buf[3 * 4096 + 7] = 9; // block 3: data, equal at the peer
        buf[6 * 4096 + 1] = 5; // the short tail: data
        let alg = ChecksumAlg::Xxh3_128;
        let runs = classify_blocks(alg, &buf, None);
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
        let mut peer = csum::block_digests(alg, &buf);
        peer[1] ^= 1;
        peer[4] = 0xdead_beef;
        peer[5] = 0xfeed_f00d;
        peer[6] ^= 1;
        let runs = classify_blocks(alg, &buf, Some(&peer));
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
