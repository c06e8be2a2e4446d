//! [`Machine`]: one node's role/connection/disk/replication state and the rules that move it.
//!
//! # Timers
//!
//! * **Startup wait.** A freshly started node does not decide anything until it has met its
//!   peer, or until `wfc_timeout` (`degr_wfc_timeout` if it was a degraded primary when it went
//!   down) has passed. Even then it promotes itself only if its data is *provably* UpToDate: it
//!   was the degraded primary (the peer is known to be older). So when both nodes restart at
//!   once, neither becomes primary alone; they wait for each other.
//! * **Heartbeat.** While connected, any sign of life ([`Event::PeerAlive`]) must arrive within
//!   `dead_time`, or the peer is declared lost.
//! * **ko-count.** A peer that answers heartbeats but has not completed the oldest pending write
//!   within `ko_count × timeout` is dropped: a stuck secondary must not stall the primary.
//!
//! # Automatic promotion (`auto_promote`)
//!
//! * Connected, nobody Primary: the node with UpToDate data promotes if it is the
//!   `preferred_primary`, or if the peer's data is not UpToDate. No preemption: a node never
//!   promotes while the peer is Primary.
//! * Peer lost (or never met, after the startup wait): a Secondary with UpToDate data promotes
//!   (failover). Without a fencing path or a third vote this can split the brain on a network
//!   partition; the UUID handshake detects it when the link returns, and nothing is synced
//!   until the operator resolves it.
//! * StandAlone (operator `disconnect`, split brain, unrelated data): never.

use super::{ConnState, DisconnectReason, DiskState, ReplState, Role, SyncDecision, SyncDirection};
use crate::repl::uuid::UuidFlags;
use crate::wire::ondisk::flags;
use crate::wire::repl::{ChecksumAlg, Durability, ReplProtocol};
use std::fmt;
use std::time::{Duration, Instant};

/// Timers and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Promote automatically (startup, failover) as described in the module docs.
    pub auto_promote: bool,
    /// This node is the one that promotes when both are healthy. Set it on exactly one node.
    pub preferred_primary: bool,
    /// How long a normally started node waits for its peer before the startup wait is over
    /// (`None`: forever, DRBD's `wfc-timeout 0`).
    pub wfc_timeout: Option<Duration>,
    /// The same for a node that was a degraded primary when it went down (DRBD default 60 s).
    pub degr_wfc_timeout: Option<Duration>,
    /// Silence after which a connected peer is declared lost.
    pub dead_time: Duration,
    /// The request timeout ko-count is counted in (DRBD's `timeout`, 6 s).
    pub timeout: Duration,
    /// Timeouts a pending write may take before the peer is dropped (DRBD default 7; 0: off).
    pub ko_count: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auto_promote: true,
            preferred_primary: false,
            wfc_timeout: None,
            degr_wfc_timeout: Some(Duration::from_secs(60)),
            dead_time: Duration::from_millis(10_500),
            timeout: Duration::from_secs(6),
            ko_count: 7,
        }
    }
}

/// What the meta-data says about this node when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startup {
    /// Disk state from the meta-data: Inconsistent, Outdated or Consistent (never UpToDate:
    /// that takes a peer, or proof), or Diskless if no disk could be attached.
    pub disk: DiskState,
    /// The on-disk "primary" flag was set: this node crashed (or was killed) while primary.
    pub crashed_primary: bool,
    /// This node was a primary running without its peer when it went down: its data is newer
    /// than the peer's.
    pub degraded: bool,
}

impl Startup {
    /// A node with consistent data that shut down cleanly while connected.
    pub fn consistent() -> Self {
        Startup {
            disk: DiskState::Consistent,
            crashed_primary: false,
            degraded: false,
        }
    }

    /// A node right after `create-md`: Inconsistent data.
    pub fn fresh() -> Self {
        Startup {
            disk: DiskState::Inconsistent,
            crashed_primary: false,
            degraded: false,
        }
    }
}

/// Operator commands, in `drbdadm` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `primary [--force]`: `force` accepts data that is not UpToDate (and makes it UpToDate).
    Primary {
        /// `--force`.
        force: bool,
    },
    /// `secondary`.
    Secondary,
    /// `connect [--discard-my-data]`.
    Connect {
        /// `--discard-my-data`: lose a split brain on purpose.
        discard_my_data: bool,
    },
    /// `disconnect`: StandAlone until `connect`.
    Disconnect,
    /// `invalidate`: throw away the local data and resync all of it from the peer.
    Invalidate,
    /// `invalidate-remote`: resync all of the peer's data from here.
    InvalidateRemote,
    /// `pause-sync`.
    PauseSync,
    /// `resume-sync`.
    ResumeSync,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Primary { force: false } => f.write_str("primary"),
            Command::Primary { force: true } => f.write_str("primary --force"),
            Command::Secondary => f.write_str("secondary"),
            Command::Connect {
                discard_my_data: false,
            } => f.write_str("connect"),
            Command::Connect {
                discard_my_data: true,
            } => f.write_str("connect --discard-my-data"),
            Command::Disconnect => f.write_str("disconnect"),
            Command::Invalidate => f.write_str("invalidate"),
            Command::InvalidateRemote => f.write_str("invalidate-remote"),
            Command::PauseSync => f.write_str("pause-sync"),
            Command::ResumeSync => f.write_str("resume-sync"),
        }
    }
}

/// Everything that can happen to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The operator asked for something.
    Command(Command),
    /// A peer connected and authenticated, and offered its terms (its Parameters). Comes
    /// before [`Event::PeerConnected`]: the machine accepts (possibly shrinking to the peer's
    /// size, [`Action::Shrink`]) or refuses ([`Action::RefusePeer`]) — checked together, before
    /// anything is persisted. A refused peer changes nothing.
    PeerOffered {
        /// What this node runs with (its usable size now).
        ours: Terms,
        /// What the peer offered.
        theirs: Terms,
    },
    /// The transport to the peer is up and authenticated; the handshake starts.
    PeerConnected,
    /// The handshake finished: the UUID decision (`None` if either side is Diskless, so there
    /// is nothing to compare) and the peer's role and disk state from its Parameters.
    Handshake {
        /// Our side's decision ([`crate::repl::uuid::decide`]).
        decision: Option<SyncDecision>,
        /// The peer's role.
        peer_role: Role,
        /// The peer's disk state.
        peer_disk: DiskState,
    },
    /// The peer reported a new role or disk state (`StateChange`).
    PeerState {
        /// The peer's role.
        role: Role,
        /// The peer's disk state.
        disk: DiskState,
    },
    /// The peer asked for a resync it started (`invalidate`, `invalidate-remote`, forced
    /// promotion): `direction` is ours.
    PeerStartedResync {
        /// Our direction.
        direction: SyncDirection,
        /// Whole device.
        full: bool,
    },
    /// Anything arrived from the peer (ping answer, data, ack).
    PeerAlive,
    /// The replication engine's oldest write still waiting for the peer (`None`: none).
    PeerWrites {
        /// When the oldest pending write was sent.
        oldest_pending: Option<Instant>,
    },
    /// The connection broke (reset, closed).
    PeerLost,
    /// The peer closed the connection on purpose and said why (`Disconnect`). A Secondary
    /// dropped by its Primary for any reason but an orderly shutdown (ko-count, …) is Outdated:
    /// the Primary goes on without it, so it must not promote itself.
    PeerDropped {
        /// The peer's reason.
        reason: DisconnectReason,
    },
    /// The local disk failed a read, write or flush (on-io-error detach).
    LocalIoError,
    /// The resync engine finished.
    ResyncDone,
    /// An online verify found blocks that differ and marked them out of sync: resync them,
    /// from here (`source`) or from the peer.
    VerifyFoundDifferences {
        /// This node is the resync source.
        source: bool,
    },
    /// Time passed.
    Tick,
}

/// What both nodes of a pair must agree on before they replicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// Usable size in bytes.
    pub size: u64,
    /// Replication protocol.
    pub protocol: ReplProtocol,
    /// Durability level.
    pub durability: Durability,
    /// Block digest of checksum-based resync and verify.
    pub checksum_alg: ChecksumAlg,
}

impl Terms {
    /// What must be identical on both nodes: everything but the size.
    pub fn shared_settings(&self) -> SharedSettings {
        SharedSettings {
            protocol: self.protocol,
            durability: self.durability,
            checksum_alg: self.checksum_alg,
        }
    }
}

/// The part of the [`Terms`] that comes from the configuration file and must be identical on
/// both nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSettings {
    /// Replication protocol.
    pub protocol: ReplProtocol,
    /// Durability level.
    pub durability: Durability,
    /// Block digest of checksum-based resync and verify.
    pub checksum_alg: ChecksumAlg,
}

impl SharedSettings {
    /// Each setting that differs from `theirs`, as "NAME OURS here, THEIRS there".
    fn differences(&self, theirs: &SharedSettings) -> Vec<String> {
        let mut out = Vec::new();
        let mut compare = |name: &str, ours: &dyn fmt::Display, theirs: &dyn fmt::Display| {
            let (ours, theirs) = (ours.to_string(), theirs.to_string());
            if ours != theirs {
                out.push(format!("{name} {ours} here, {theirs} there"));
            }
        };
        compare("protocol", &self.protocol, &theirs.protocol);
        compare("durability", &self.durability, &theirs.durability);
        compare("csums", &self.checksum_alg, &theirs.checksum_alg);
        out
    }
}

/// Why a peer was refused at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// The configurations differ (they must be identical on both nodes).
    Terms {
        /// Ours.
        ours: SharedSettings,
        /// The peer's.
        theirs: SharedSettings,
    },
    /// The peer's disk is smaller than the device this node serves: shrinking it would cut
    /// into data in use.
    SmallerThanServed {
        /// The peer's usable size.
        peer: u64,
        /// The size served here.
        served: u64,
    },
}

impl fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRefusal::Terms { ours, theirs } => write!(
                f,
                "its configuration differs ({}); it must be identical on both nodes",
                ours.differences(theirs).join("; ")
            ),
            PeerRefusal::SmallerThanServed { peer, served } => write!(
                f,
                "its usable size ({peer} bytes) is smaller than the device in use ({served} bytes)"
            ),
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The local data is not UpToDate (use `--force` if you know better).
    NotUpToDate(DiskState),
    /// The peer is Primary.
    PeerIsPrimary,
    /// The command needs an established connection.
    NotConnected,
    /// Already connected or connecting.
    AlreadyConnected,
    /// No resync is running (or it is already paused/running).
    NoResync,
    /// The peer's data is not UpToDate.
    PeerNotUpToDate,
    /// A Primary cannot do that (demote first).
    IsPrimary,
    /// This node is the target of a running resync.
    SyncTarget,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotUpToDate(d) => {
                write!(f, "local data is {d}, not UpToDate (--force overrides)")
            }
            Refusal::PeerIsPrimary => f.write_str("the peer is primary"),
            Refusal::NotConnected => f.write_str("not connected to the peer"),
            Refusal::AlreadyConnected => f.write_str("already connected or connecting"),
            Refusal::NoResync => f.write_str("no resync in a state that allows this"),
            Refusal::PeerNotUpToDate => f.write_str("the peer's data is not UpToDate"),
            Refusal::IsPrimary => f.write_str("this node is primary; demote it first"),
            Refusal::SyncTarget => f.write_str("this node is a resync target"),
        }
    }
}

/// A line for `events` (like `drbdsetup events2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// `change <object> <key>:<value>`.
    Change {
        /// `resource`, `device`, `connection` or `peer-device`.
        object: &'static str,
        /// `role`, `disk`, `connection`, `replication`, `peer-role`, `peer-disk`.
        key: &'static str,
        /// The new value.
        value: String,
    },
    /// Split brain detected: `call helper split-brain`.
    SplitBrain(String),
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notification::Change { object, key, value } => {
                write!(f, "change {object} {key}:{value}")
            }
            Notification::SplitBrain(why) => write!(f, "call helper split-brain: {why}"),
        }
    }
}

/// What the daemon must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the exports (AoE, NBD) and take the floating IP.
    StartServing,
    /// Stop the exports and release the floating IP.
    StopServing,
    /// Start (or keep) trying to reach the peer.
    Connect,
    /// Close the peer connection (sending Disconnect with this reason if possible).
    Disconnect {
        /// Why.
        reason: DisconnectReason,
    },
    /// Send our state to the peer (`StateChange`).
    SendState {
        /// Our role.
        role: Role,
        /// Our disk state.
        disk: DiskState,
        /// Our connection state.
        conn: ConnState,
    },
    /// Start a resync: exchange bitmaps (OR them) unless `full`, rotate UUIDs
    /// (`start_resync_source` / `start_resync_target`), then copy. `tell_peer`: the peer does
    /// not know yet (operator-initiated); send it the request.
    StartResync {
        /// Our direction.
        direction: SyncDirection,
        /// Whole device (set every bit) instead of the bitmap.
        full: bool,
        /// Send the peer a resync request.
        tell_peer: bool,
    },
    /// Pause the resync engine.
    PauseResync,
    /// Resume the resync engine.
    ResumeResync,
    /// Start a new data generation (`UuidSet::new_current` with a random UUID) and persist it
    /// before the next write completes.
    NewCurrentUuid,
    /// Persist superblock flags ([`crate::wire::ondisk::flags`]): what a restart must know
    /// (primary indicator, consistent data, peer outdated, crashed primary resolved).
    PersistFlags {
        /// Flags to set.
        set: u32,
        /// Flags to clear.
        clear: u32,
    },
    /// The peer's disk is smaller: the device shrinks to `size` and the agreed size is
    /// persisted (it only ever shrinks).
    Shrink {
        /// The new usable size.
        size: u64,
    },
    /// Drop the connection just offered, without a handshake; nothing changes.
    RefusePeer {
        /// Why.
        reason: PeerRefusal,
    },
    /// The peer no longer receives writes: mark every write it has not acknowledged, and every
    /// write from now on, in the bitmap; complete pending writes locally.
    MarkOutOfSync,
    /// Stop using the local disk (after an I/O error); serve through the peer if possible.
    Detach,
    /// An `events` line.
    Notify(Notification),
    /// A log line.
    Log(String),
    /// A command was refused.
    Refuse {
        /// The command.
        command: Command,
        /// Why.
        reason: Refusal,
    },
}

/// A snapshot of everything `status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Our role.
    pub role: Role,
    /// Our disk.
    pub disk: DiskState,
    /// Connection.
    pub conn: ConnState,
    /// Replication.
    pub repl: ReplState,
    /// The peer's role (Unknown when not connected).
    pub peer_role: Role,
    /// The peer's disk (DUnknown when not connected).
    pub peer_disk: DiskState,
    /// The exports are running here.
    pub serving: bool,
    /// Primary without the peer (persist this: it decides degr-wfc-timeout at the next start).
    pub degraded: bool,
    /// Crashed while primary and not resynced since (persist; sent in the UUID flags).
    pub crashed_primary: bool,
}

/// One node's state machine. See the module docs.
#[derive(Debug, Clone)]
pub struct Machine {
    config: Config,
    role: Role,
    disk: DiskState,
    conn: ConnState,
    repl: ReplState,
    peer_role: Role,
    peer_disk: DiskState,
    serving: bool,
    degraded: bool,
    crashed_primary: bool,
    discard_my_data: bool,
    /// Armed when the peer is lost (failover) or the startup wait ends with provably UpToDate
    /// data: the one moment a node may promote itself without a peer.
    promote_alone: bool,
    /// The operator said `secondary`: no auto-promotion while connected (a failover, when the
    /// peer is lost, still may), until `primary`.
    held_secondary: bool,
    started_at: Instant,
    startup_wait_over: bool,
    last_alive: Option<Instant>,
    oldest_pending: Option<Instant>,
    last_sent: Option<(Role, DiskState, ConnState)>,
    /// What the superblock's flags say, as far as this machine wrote them.
    persisted: Persisted,
    /// The connected peer is diskless and a new generation was started for it.
    peer_diskless_generation: bool,
}

/// The superblock flags this machine keeps up to date (see [`Action::PersistFlags`]).
#[derive(Debug, Clone, Copy)]
struct Persisted {
    role: Role,
    disk: DiskState,
    peer_outdated: bool,
    crashed_primary: bool,
}

impl Machine {
    /// A node that just started: Secondary, Connecting, waiting for its peer. Returns the first
    /// actions (start connecting).
    pub fn new(config: Config, startup: Startup, now: Instant) -> (Machine, Vec<Action>) {
        let disk = match startup.disk {
            DiskState::UpToDate => DiskState::Consistent,
            DiskState::DUnknown => DiskState::Diskless,
            d => d,
        };
        let machine = Machine {
            config,
            role: Role::Secondary,
            disk,
            conn: ConnState::Connecting,
            repl: ReplState::Off,
            peer_role: Role::Unknown,
            peer_disk: DiskState::DUnknown,
            serving: false,
            degraded: startup.degraded,
            crashed_primary: startup.crashed_primary,
            discard_my_data: false,
            promote_alone: false,
            held_secondary: false,
            started_at: now,
            startup_wait_over: false,
            last_alive: None,
            oldest_pending: None,
            last_sent: None,
            persisted: Persisted {
                role: Role::Secondary,
                disk,
                peer_outdated: startup.degraded,
                crashed_primary: startup.crashed_primary,
            },
            peer_diskless_generation: false,
        };
        let actions = vec![
            Action::Log(format!(
                "started: disk {disk}{}{}; waiting for the peer",
                if startup.degraded {
                    ", was degraded primary"
                } else {
                    ""
                },
                if startup.crashed_primary {
                    ", crashed primary"
                } else {
                    ""
                },
            )),
            Action::Connect,
        ];
        (machine, actions)
    }

    /// The current state.
    pub fn status(&self) -> Status {
        Status {
            role: self.role,
            disk: self.disk,
            conn: self.conn,
            repl: self.repl,
            peer_role: self.peer_role,
            peer_disk: self.peer_disk,
            serving: self.serving,
            degraded: self.degraded,
            crashed_primary: self.crashed_primary,
        }
    }

    /// The flags to send with our UUIDs in the handshake.
    pub fn uuid_flags(&self) -> UuidFlags {
        UuidFlags {
            discard_my_data: self.discard_my_data,
            crashed_primary: self.crashed_primary,
            inconsistent: self.disk == DiskState::Inconsistent,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the startup wait is over (met the peer, or the wfc timeout passed).
    pub fn startup_wait_over(&self) -> bool {
        self.startup_wait_over
    }

    /// Feeds one event; returns what to do, in order.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let before = self.status();
        let mut out = Vec::new();
        match event {
            Event::Command(c) => self.command(c, &mut out),
            Event::PeerOffered { ours, theirs } => self.peer_offered(ours, theirs, &mut out),
            Event::PeerConnected => self.peer_connected(now, &mut out),
            Event::Handshake {
                decision,
                peer_role,
                peer_disk,
            } => self.handshake(decision, peer_role, peer_disk, &mut out),
            Event::PeerState { role, disk } => self.peer_state(role, disk, &mut out),
            Event::PeerStartedResync { direction, full } => {
                self.peer_started_resync(direction, full, &mut out)
            }
            Event::PeerAlive => {
                if self.linked() {
                    self.last_alive = Some(now);
                }
            }
            Event::PeerWrites { oldest_pending } => self.oldest_pending = oldest_pending,
            Event::PeerLost => {
                if self.linked() {
                    out.push(Action::Log("connection to the peer lost".into()));
                    self.lose_peer(&mut out);
                    self.conn = ConnState::Connecting;
                    out.push(Action::Connect);
                }
            }
            Event::PeerDropped { reason } => {
                if self.linked() {
                    out.push(Action::Log(format!(
                        "the peer dropped the connection: {reason}"
                    )));
                    if reason != DisconnectReason::Shutdown
                        && self.role == Role::Secondary
                        && self.peer_role == Role::Primary
                        && self.disk == DiskState::UpToDate
                    {
                        self.disk = DiskState::Outdated;
                    }
                    self.lose_peer(&mut out);
                    self.conn = ConnState::Connecting;
                    out.push(Action::Connect);
                }
            }
            Event::LocalIoError => self.io_error(&mut out),
            Event::ResyncDone => self.resync_done(&mut out),
            Event::VerifyFoundDifferences { source } => {
                let healthy = self.conn == ConnState::Connected
                    && self.repl == ReplState::Established
                    && self.disk == DiskState::UpToDate
                    && self.peer_disk == DiskState::UpToDate;
                // The target of a bitmap resync must not be the Primary.
                let allowed = if source {
                    self.peer_role != Role::Primary
                } else {
                    self.role != Role::Primary
                };
                if healthy && allowed {
                    let direction = if source {
                        SyncDirection::Source
                    } else {
                        SyncDirection::Target
                    };
                    out.push(Action::Log(format!(
                        "verify found differences: resync as {direction:?}"
                    )));
                    self.start_resync(direction, false, true, &mut out);
                } else {
                    out.push(Action::Log(
                        "verify found differences, but the pair is not in a state to resync them now; they stay marked out of sync".into(),
                    ));
                }
            }
            Event::Tick => self.tick(now, &mut out),
        }
        self.maybe_promote(&mut out);
        self.finish(before, &mut out);
        out
    }

    /// Transport up (handshaking or connected).
    fn linked(&self) -> bool {
        matches!(self.conn, ConnState::Handshaking | ConnState::Connected)
    }

    fn refuse(command: Command, reason: Refusal, out: &mut Vec<Action>) {
        out.push(Action::Refuse { command, reason });
    }

    fn command(&mut self, c: Command, out: &mut Vec<Action>) {
        let connected = self.conn == ConnState::Connected;
        match c {
            Command::Primary { force } => {
                self.held_secondary = false;
                if self.role == Role::Primary {
                    out.push(Action::Log("already primary".into()));
                    return;
                }
                if self.linked() && self.peer_role == Role::Primary {
                    return Self::refuse(c, Refusal::PeerIsPrimary, out);
                }
                if self.conn == ConnState::Handshaking {
                    return Self::refuse(c, Refusal::NotConnected, out);
                }
                if matches!(self.repl, ReplState::SyncTarget | ReplState::PausedSyncT) && force {
                    return Self::refuse(c, Refusal::SyncTarget, out);
                }
                let through_peer = connected && self.peer_disk == DiskState::UpToDate;
                let usable = self.disk == DiskState::UpToDate
                    || (self.disk == DiskState::Diskless && through_peer)
                    || (self.disk == DiskState::Inconsistent
                        && matches!(self.repl, ReplState::SyncTarget | ReplState::PausedSyncT)
                        && through_peer);
                if !usable {
                    if !force || self.disk == DiskState::Diskless {
                        return Self::refuse(c, Refusal::NotUpToDate(self.disk), out);
                    }
                    out.push(Action::Log(format!(
                        "primary --force: declaring {} data UpToDate",
                        self.disk
                    )));
                    self.disk = DiskState::UpToDate;
                    out.push(Action::NewCurrentUuid);
                    if connected
                        && self.repl == ReplState::Established
                        && self.peer_disk != DiskState::Diskless
                        && self.peer_disk != DiskState::UpToDate
                    {
                        self.start_resync(SyncDirection::Source, true, true, out);
                    }
                }
                self.promote(out);
            }
            Command::Secondary => {
                self.promote_alone = false;
                self.held_secondary = true;
                if self.role == Role::Primary {
                    self.role = Role::Secondary;
                    out.push(Action::Log("demoted to secondary".into()));
                } else {
                    out.push(Action::Log("already secondary".into()));
                }
            }
            Command::Connect { discard_my_data } => {
                if self.conn != ConnState::StandAlone {
                    return Self::refuse(c, Refusal::AlreadyConnected, out);
                }
                self.conn = ConnState::Connecting;
                self.discard_my_data = discard_my_data;
                // Reconnecting on purpose is not a failover.
                self.promote_alone = false;
                out.push(Action::Connect);
            }
            Command::Disconnect => {
                if self.conn == ConnState::StandAlone {
                    out.push(Action::Log("already StandAlone".into()));
                    return;
                }
                out.push(Action::Disconnect {
                    reason: DisconnectReason::Shutdown,
                });
                if self.linked() {
                    self.lose_peer(out);
                }
                self.conn = ConnState::StandAlone;
                self.promote_alone = false;
            }
            Command::Invalidate => {
                if !connected || self.repl != ReplState::Established {
                    return Self::refuse(c, Refusal::NotConnected, out);
                }
                if self.role == Role::Primary {
                    return Self::refuse(c, Refusal::IsPrimary, out);
                }
                if self.peer_disk != DiskState::UpToDate {
                    return Self::refuse(c, Refusal::PeerNotUpToDate, out);
                }
                self.start_resync(SyncDirection::Target, true, true, out);
            }
            Command::InvalidateRemote => {
                if !connected || self.repl != ReplState::Established {
                    return Self::refuse(c, Refusal::NotConnected, out);
                }
                if self.disk != DiskState::UpToDate {
                    return Self::refuse(c, Refusal::NotUpToDate(self.disk), out);
                }
                if self.peer_role == Role::Primary {
                    return Self::refuse(c, Refusal::PeerIsPrimary, out);
                }
                if self.peer_disk == DiskState::Diskless {
                    return Self::refuse(c, Refusal::PeerNotUpToDate, out);
                }
                self.start_resync(SyncDirection::Source, true, true, out);
            }
            Command::PauseSync => {
                self.repl = match self.repl {
                    ReplState::SyncSource => ReplState::PausedSyncS,
                    ReplState::SyncTarget => ReplState::PausedSyncT,
                    _ => return Self::refuse(c, Refusal::NoResync, out),
                };
                out.push(Action::PauseResync);
            }
            Command::ResumeSync => {
                self.repl = match self.repl {
                    ReplState::PausedSyncS => ReplState::SyncSource,
                    ReplState::PausedSyncT => ReplState::SyncTarget,
                    _ => return Self::refuse(c, Refusal::NoResync, out),
                };
                out.push(Action::ResumeResync);
            }
        }
    }

    fn promote(&mut self, out: &mut Vec<Action>) {
        self.role = Role::Primary;
        self.promote_alone = false;
        self.held_secondary = false;
        if self.conn != ConnState::Connected {
            // A new generation: whatever the peer holds is now older.
            out.push(Action::NewCurrentUuid);
            self.degraded = true;
        }
        out.push(Action::Log("promoted to primary".into()));
    }

    fn start_resync(
        &mut self,
        direction: SyncDirection,
        full: bool,
        tell_peer: bool,
        out: &mut Vec<Action>,
    ) {
        match direction {
            SyncDirection::Source => {
                self.repl = ReplState::SyncSource;
                self.peer_disk = DiskState::Inconsistent;
            }
            SyncDirection::Target => {
                self.repl = ReplState::SyncTarget;
                self.disk = DiskState::Inconsistent;
                self.peer_disk = DiskState::UpToDate;
            }
        }
        out.push(Action::StartResync {
            direction,
            full,
            tell_peer,
        });
    }

    fn peer_offered(&mut self, ours: Terms, theirs: Terms, out: &mut Vec<Action>) {
        let refuse = |reason, out: &mut Vec<Action>| out.push(Action::RefusePeer { reason });
        if ours.shared_settings() != theirs.shared_settings() {
            return refuse(
                PeerRefusal::Terms {
                    ours: ours.shared_settings(),
                    theirs: theirs.shared_settings(),
                },
                out,
            );
        }
        if theirs.size < ours.size {
            // Usable size: the smaller of the two, unless that would cut into data in use.
            if self.serving {
                return refuse(
                    PeerRefusal::SmallerThanServed {
                        peer: theirs.size,
                        served: ours.size,
                    },
                    out,
                );
            }
            out.push(Action::Log(format!(
                "the peer's disk is smaller: the device shrinks from {} to {} bytes",
                ours.size, theirs.size
            )));
            out.push(Action::Notify(Notification::Change {
                object: "device",
                key: "size",
                value: theirs.size.to_string(),
            }));
            out.push(Action::Shrink { size: theirs.size });
        }
    }

    fn peer_connected(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.conn {
            ConnState::Connecting => {
                self.conn = ConnState::Handshaking;
                self.last_alive = Some(now);
            }
            ConnState::StandAlone => out.push(Action::Disconnect {
                reason: DisconnectReason::Shutdown,
            }),
            _ => out.push(Action::Log("ignoring a second connection".into())),
        }
    }

    fn handshake(
        &mut self,
        decision: Option<SyncDecision>,
        peer_role: Role,
        peer_disk: DiskState,
        out: &mut Vec<Action>,
    ) {
        if self.conn != ConnState::Handshaking {
            out.push(Action::Log("handshake result while not handshaking".into()));
            return;
        }
        self.startup_wait_over = true;
        let stand_alone = |m: &mut Machine, reason, out: &mut Vec<Action>| {
            out.push(Action::Disconnect { reason });
            m.conn = ConnState::StandAlone;
            m.peer_role = Role::Unknown;
            m.peer_disk = DiskState::DUnknown;
            m.last_alive = None;
        };
        if let Some(d) = decision {
            out.push(Action::Log(format!("handshake: {d}")));
            match d {
                SyncDecision::SplitBrain { reason, .. } => {
                    out.push(Action::Notify(Notification::SplitBrain(d.to_string())));
                    let why = if reason == crate::repl::uuid::SplitBrainReason::BothPrimary {
                        DisconnectReason::BothPrimary
                    } else {
                        DisconnectReason::SplitBrain
                    };
                    return stand_alone(self, why, out);
                }
                SyncDecision::Unrelated => {
                    return stand_alone(self, DisconnectReason::UnrelatedData, out);
                }
                _ => {}
            }
        }
        let decision = match decision {
            Some(d) if self.disk != DiskState::Diskless && peer_disk != DiskState::Diskless => d,
            _ => {
                // A diskless side: nothing to compare or sync; the other serves the data.
                self.conn = ConnState::Connected;
                self.repl = ReplState::Established;
                self.peer_role = peer_role;
                self.peer_disk = peer_disk;
                self.discard_my_data = false;
                return;
            }
        };
        let consistent = |d: DiskState| {
            matches!(
                d,
                DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
            )
        };
        match decision.direction() {
            Some(SyncDirection::Source) if !consistent(self.disk) => {
                out.push(Action::Log(
                    "refusing to be a resync source without consistent data".into(),
                ));
                return stand_alone(self, DisconnectReason::ProtocolError, out);
            }
            Some(SyncDirection::Target) if !consistent(peer_disk) => {
                out.push(Action::Log(
                    "refusing a resync from a peer without consistent data".into(),
                ));
                return stand_alone(self, DisconnectReason::ProtocolError, out);
            }
            _ => {}
        }
        self.conn = ConnState::Connected;
        self.peer_role = peer_role;
        self.peer_disk = peer_disk;
        self.discard_my_data = false;
        self.promote_alone = false;
        match decision.direction() {
            None => {
                self.repl = ReplState::Established;
                if consistent(self.disk) && consistent(peer_disk) {
                    self.disk = DiskState::UpToDate;
                    self.peer_disk = DiskState::UpToDate;
                    self.crashed_primary = false;
                    self.degraded = false;
                }
            }
            Some(SyncDirection::Source) => {
                self.disk = DiskState::UpToDate;
                self.start_resync(SyncDirection::Source, decision.is_full(), false, out);
            }
            Some(SyncDirection::Target) => {
                self.start_resync(SyncDirection::Target, decision.is_full(), false, out);
            }
        }
    }

    fn peer_state(&mut self, role: Role, disk: DiskState, out: &mut Vec<Action>) {
        if self.conn != ConnState::Connected {
            return;
        }
        if role == Role::Primary && self.role == Role::Primary {
            out.push(Action::Log("both nodes are primary: disconnecting".into()));
            out.push(Action::Notify(Notification::SplitBrain(
                "both nodes became primary while connected".into(),
            )));
            out.push(Action::Disconnect {
                reason: DisconnectReason::BothPrimary,
            });
            self.lose_peer(out);
            self.conn = ConnState::StandAlone;
            return;
        }
        if disk == DiskState::Diskless && self.peer_disk != DiskState::Diskless {
            out.push(Action::Log("the peer detached its disk".into()));
            if matches!(
                self.repl,
                ReplState::SyncSource
                    | ReplState::PausedSyncS
                    | ReplState::SyncTarget
                    | ReplState::PausedSyncT
            ) {
                self.repl = ReplState::Established;
            }
            if self.role == Role::Primary && self.disk != DiskState::Diskless {
                out.push(Action::MarkOutOfSync);
                out.push(Action::NewCurrentUuid);
                self.degraded = true;
            }
        }
        self.peer_role = role;
        self.peer_disk = disk;
    }

    fn peer_started_resync(&mut self, direction: SyncDirection, full: bool, out: &mut Vec<Action>) {
        let ok = self.conn == ConnState::Connected
            && self.repl == ReplState::Established
            && self.disk != DiskState::Diskless
            && match direction {
                SyncDirection::Target => self.role != Role::Primary || full,
                SyncDirection::Source => self.disk == DiskState::UpToDate,
            };
        if !ok {
            out.push(Action::Log(format!(
                "refusing the peer's resync request as {direction:?}"
            )));
            out.push(Action::Disconnect {
                reason: DisconnectReason::ProtocolError,
            });
            self.lose_peer(out);
            self.promote_alone = false; // a protocol error is not a failover
            self.conn = ConnState::Connecting;
            out.push(Action::Connect);
            return;
        }
        self.start_resync(direction, full, false, out);
    }

    /// The peer is gone (or we dropped it): what a primary must do, and forget its state.
    fn lose_peer(&mut self, out: &mut Vec<Action>) {
        let was_connected = self.conn == ConnState::Connected;
        if was_connected && self.role == Role::Secondary {
            // Failover: if our data is UpToDate, we may take over.
            self.promote_alone = true;
        }
        if was_connected && self.role == Role::Primary {
            if self.disk != DiskState::Diskless && self.peer_disk != DiskState::Diskless {
                out.push(Action::MarkOutOfSync);
                out.push(Action::NewCurrentUuid);
            }
            self.degraded = true;
        }
        if was_connected && self.role == Role::Primary && self.disk == DiskState::Diskless {
            out.push(Action::Log(
                "lost the peer while serving through it: no data left".into(),
            ));
        }
        self.repl = ReplState::Off;
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::DUnknown;
        self.last_alive = None;
        self.oldest_pending = None;
    }

    fn io_error(&mut self, out: &mut Vec<Action>) {
        if self.disk == DiskState::Diskless {
            return;
        }
        out.push(Action::Log(format!(
            "local disk I/O error: detaching ({} -> Diskless)",
            self.disk
        )));
        out.push(Action::Detach);
        self.disk = DiskState::Diskless;
        if matches!(
            self.repl,
            ReplState::SyncSource
                | ReplState::PausedSyncS
                | ReplState::SyncTarget
                | ReplState::PausedSyncT
        ) {
            self.repl = ReplState::Established;
        }
    }

    fn resync_done(&mut self, out: &mut Vec<Action>) {
        match self.repl {
            ReplState::SyncTarget | ReplState::PausedSyncT => {
                self.disk = DiskState::UpToDate;
                self.peer_disk = DiskState::UpToDate;
            }
            ReplState::SyncSource | ReplState::PausedSyncS => {
                self.peer_disk = DiskState::UpToDate;
                self.degraded = false;
            }
            _ => {
                out.push(Action::Log("resync done while not resyncing".into()));
                return;
            }
        }
        self.repl = ReplState::Established;
        self.crashed_primary = false;
        out.push(Action::Log("resync finished".into()));
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.startup_wait_over && !self.linked() {
            let limit = if self.degraded {
                self.config.degr_wfc_timeout
            } else {
                self.config.wfc_timeout
            };
            if let Some(limit) = limit {
                if now.saturating_duration_since(self.started_at) >= limit {
                    self.startup_wait_over = true;
                    if self.degraded && self.disk == DiskState::Consistent {
                        out.push(Action::Log(
                            "degr-wfc-timeout expired: we were the degraded primary, data is UpToDate"
                                .into(),
                        ));
                        self.disk = DiskState::UpToDate;
                        self.promote_alone = true;
                    } else {
                        out.push(Action::Log(format!(
                            "wfc-timeout expired: data is {}, not provably UpToDate; not promoting",
                            self.disk
                        )));
                    }
                }
            }
        }
        if self.linked() {
            if let Some(last) = self.last_alive {
                if now.saturating_duration_since(last) >= self.config.dead_time {
                    out.push(Action::Log("the peer stopped answering".into()));
                    return self.drop_peer(DisconnectReason::Timeout, out);
                }
            }
        }
        if self.conn == ConnState::Connected && self.config.ko_count > 0 {
            if let Some(since) = self.oldest_pending {
                let limit = self.config.timeout * self.config.ko_count;
                if now.saturating_duration_since(since) >= limit {
                    out.push(Action::Log(format!(
                        "the peer has not completed a write for {limit:?} (ko-count {}): dropping it",
                        self.config.ko_count
                    )));
                    self.drop_peer(DisconnectReason::KoCount, out);
                }
            }
        }
    }

    fn drop_peer(&mut self, reason: DisconnectReason, out: &mut Vec<Action>) {
        out.push(Action::Disconnect { reason });
        self.lose_peer(out);
        self.conn = ConnState::Connecting;
        out.push(Action::Connect);
    }

    fn maybe_promote(&mut self, out: &mut Vec<Action>) {
        if !self.config.auto_promote || self.role == Role::Primary || !self.startup_wait_over {
            return;
        }
        if self.disk != DiskState::UpToDate {
            return;
        }
        let why = match self.conn {
            ConnState::Connected => {
                if self.peer_role == Role::Primary
                    || self.held_secondary
                    || matches!(self.repl, ReplState::SyncTarget | ReplState::PausedSyncT)
                {
                    return;
                }
                if self.config.preferred_primary {
                    "preferred primary with UpToDate data"
                } else if self.peer_disk != DiskState::UpToDate {
                    "only node with UpToDate data"
                } else {
                    return;
                }
            }
            ConnState::Connecting if self.promote_alone => "no peer, UpToDate data",
            ConnState::Connecting => return,
            ConnState::Handshaking | ConnState::StandAlone => return,
        };
        out.push(Action::Log(format!("auto-promote: {why}")));
        self.promote(out);
    }

    /// Emits notifications, serving edges and state messages for what changed in this step.
    fn finish(&mut self, before: Status, out: &mut Vec<Action>) {
        let change = |object, key, value: String| {
            Action::Notify(Notification::Change { object, key, value })
        };
        if before.role != self.role {
            out.push(change("resource", "role", self.role.to_string()));
        }
        if before.disk != self.disk {
            out.push(change("device", "disk", self.disk.to_string()));
        }
        if before.conn != self.conn {
            out.push(change("connection", "connection", self.conn.to_string()));
        }
        if before.repl != self.repl {
            out.push(change("peer-device", "replication", self.repl.to_string()));
        }
        if before.peer_role != self.peer_role {
            out.push(change(
                "connection",
                "peer-role",
                self.peer_role.to_string(),
            ));
        }
        if before.peer_disk != self.peer_disk {
            out.push(change(
                "peer-device",
                "peer-disk",
                self.peer_disk.to_string(),
            ));
        }
        let connected = self.conn == ConnState::Connected;
        self.persist_flags(out);
        // The peer lost its disk: this node now holds the only copy, a new generation.
        let peer_diskless = connected && self.peer_disk == DiskState::Diskless;
        if peer_diskless && self.disk == DiskState::UpToDate && !self.peer_diskless_generation {
            self.peer_diskless_generation = true;
            out.push(Action::Log(
                "the peer lost its disk: this node now holds the only copy".into(),
            ));
            out.push(Action::NewCurrentUuid);
        } else if !peer_diskless {
            self.peer_diskless_generation = false;
        }
        let should_serve = self.role == Role::Primary
            && (self.disk == DiskState::UpToDate
                || (connected && self.peer_disk == DiskState::UpToDate));
        if should_serve != self.serving {
            self.serving = should_serve;
            out.push(if should_serve {
                Action::StartServing
            } else {
                Action::StopServing
            });
        }
        if connected {
            let now = (self.role, self.disk, self.conn);
            if self.last_sent != Some(now) {
                self.last_sent = Some(now);
                out.push(Action::SendState {
                    role: self.role,
                    disk: self.disk,
                    conn: self.conn,
                });
            }
        } else {
            self.last_sent = None;
        }
    }

    /// What a restart must know, persisted before anything is served under it: the primary
    /// indicator, whether the data is consistent, and whether the peer is outdated (a degraded
    /// primary) or the crash of a primary is resolved.
    fn persist_flags(&mut self, out: &mut Vec<Action>) {
        let (mut set, mut clear) = (0, 0);
        let p = &mut self.persisted;
        if p.role != self.role {
            p.role = self.role;
            if self.role == Role::Primary {
                set |= flags::PRIMARY_IND;
            } else {
                clear |= flags::PRIMARY_IND;
            }
        }
        if p.disk != self.disk {
            p.disk = self.disk;
            match self.disk {
                DiskState::UpToDate | DiskState::Consistent => set |= flags::CONSISTENT,
                DiskState::Inconsistent => clear |= flags::CONSISTENT,
                _ => {}
            }
        }
        let connected = self.conn == ConnState::Connected;
        if self.role == Role::Primary && !connected && self.degraded {
            if !p.peer_outdated {
                p.peer_outdated = true;
                set |= flags::PEER_OUTDATED;
            }
        } else if connected
            && self.repl == ReplState::Established
            && self.peer_disk == DiskState::UpToDate
            && (p.peer_outdated || p.crashed_primary)
        {
            p.peer_outdated = false;
            p.crashed_primary = false;
            clear |= flags::PEER_OUTDATED | flags::CRASHED_PRIMARY;
        }
        if set | clear != 0 {
            out.push(Action::PersistFlags { set, clear });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn primary_without_uptodate_data_is_refused() {
        let now = t0();
        let (mut m, _) = Machine::new(Config::default(), Startup::consistent(), now);
        let out = m.step(now, Event::Command(Command::Primary { force: false }));
        assert!(out.contains(&Action::Refuse {
            command: Command::Primary { force: false },
            reason: Refusal::NotUpToDate(DiskState::Consistent)
        }));
        assert_eq!(m.status().role, Role::Secondary);
        let out = m.step(now, Event::Command(Command::Primary { force: true }));
        assert!(out.contains(&Action::NewCurrentUuid));
        assert!(out.contains(&Action::StartServing));
        // NewCurrentUuid is persisted before serving starts.
        let pos = |a: &Action| out.iter().position(|x| x == a).unwrap();
        assert!(pos(&Action::NewCurrentUuid) < pos(&Action::StartServing));
        assert_eq!(m.status().disk, DiskState::UpToDate);
    }

    #[test]
    fn notifications_use_drbd_words() {
        let n = Notification::Change {
            object: "resource",
            key: "role",
            value: Role::Primary.to_string(),
        };
        assert_eq!(n.to_string(), "change resource role:Primary");
        assert_eq!(
            Command::Connect {
                discard_my_data: true
            }
            .to_string(),
            "connect --discard-my-data"
        );
    }

    #[test]
    fn a_secondary_never_serves() {
        let now = t0();
        let (mut m, first) = Machine::new(
            Config {
                auto_promote: false,
                ..Config::default()
            },
            Startup::consistent(),
            now,
        );
        assert!(first.contains(&Action::Connect));
        let mut all = Vec::new();
        all.extend(m.step(now, Event::PeerConnected));
        all.extend(m.step(
            now,
            Event::Handshake {
                decision: Some(SyncDecision::NoSync {
                    rule: crate::repl::uuid::Rule {
                        number: 40,
                        adjustment: None,
                    },
                }),
                peer_role: Role::Secondary,
                peer_disk: DiskState::Consistent,
            },
        ));
        assert_eq!(m.status().disk, DiskState::UpToDate);
        assert!(!all.contains(&Action::StartServing));
        assert!(!m.status().serving);
    }

    /// A connected, established pair seen from one node (secondary, peer `peer_role`).
    fn established(peer_role: Role) -> (Machine, Instant) {
        let now = t0();
        let (mut m, _) = Machine::new(
            Config {
                auto_promote: false,
                ..Config::default()
            },
            Startup::consistent(),
            now,
        );
        m.step(now, Event::PeerConnected);
        m.step(
            now,
            Event::Handshake {
                decision: Some(SyncDecision::NoSync {
                    rule: crate::repl::uuid::Rule {
                        number: 40,
                        adjustment: None,
                    },
                }),
                peer_role,
                peer_disk: DiskState::UpToDate,
            },
        );
        assert_eq!(m.status().repl, ReplState::Established);
        (m, now)
    }

    #[test]
    fn verify_differences_start_a_bitmap_resync_from_the_primary() {
        // Neither is primary: the verify source resyncs.
        let (mut m, now) = established(Role::Secondary);
        let out = m.step(now, Event::VerifyFoundDifferences { source: true });
        assert!(out.contains(&Action::StartResync {
            direction: SyncDirection::Source,
            full: false,
            tell_peer: true
        }));
        assert_eq!(m.status().repl, ReplState::SyncSource);
        // The peer is primary: it is the source, this node the target.
        let (mut m, now) = established(Role::Primary);
        let out = m.step(now, Event::VerifyFoundDifferences { source: false });
        assert!(out.contains(&Action::StartResync {
            direction: SyncDirection::Target,
            full: false,
            tell_peer: true
        }));
        assert_eq!(m.status().repl, ReplState::SyncTarget);
        // Never the primary as a target, never while not established.
        let (mut m, now) = established(Role::Primary);
        let out = m.step(now, Event::VerifyFoundDifferences { source: true });
        assert!(!out.iter().any(|a| matches!(a, Action::StartResync { .. })));
        m.step(now, Event::PeerLost);
        let out = m.step(now, Event::VerifyFoundDifferences { source: false });
        assert!(!out.iter().any(|a| matches!(a, Action::StartResync { .. })));
    }
}
