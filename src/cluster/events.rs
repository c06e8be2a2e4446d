//! What goes into the cluster [`Machine`](super::Machine) and what comes out: its
//! [`Config`], the [`Startup`] facts, [`Event`]s (with operator [`Command`]s and a peer's
//! [`Terms`]), and the [`Action`]s it returns (with [`Notification`]s and refusals). Plain
//! data; the rules that connect them are in [`super::machine`].

use super::{ConnState, DisconnectReason, DiskState, Role, SyncDecision, SyncDirection};
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
    /// What a node does before it serves without its peer (DRBD's `fencing`).
    pub fencing: Fencing,
    /// Silence on every heartbeat path (and the replication link) after which the peer is
    /// declared gone (`[cluster] heartbeat-dead-time`). Only under [`Fencing::ResourceOnly`].
    pub heartbeat_dead_time: Duration,
    /// How long a wire-guard answer ("somebody answers our shelf.slot") holds off a promotion
    /// before the guard is asked again.
    pub wire_recheck: Duration,
    /// How much longer than a primary a secondary waits, once the peer is silent, before it
    /// asks the wire guard (see [`super::machine`]): longer than one wire-guard check.
    pub takeover_delay: Duration,
    /// A fence command is configured (`[cluster] fence-peer`): one more condition of the
    /// promotion gate under [`Fencing::ResourceOnly`] (see [`super::machine`]'s `vouch`).
    pub fence_peer: bool,
    /// How long a fence command that did not vouch for the peer holds off the next try.
    pub fence_retry: Duration,
    /// A witness is configured (`[cluster] witness`): its grant is one more condition of the
    /// promotion gate under [`Fencing::ResourceOnly`] (see [`super::machine`]'s `vouch`).
    pub witness: bool,
    /// How long an unreachable witness holds off the next claim.
    pub witness_retry: Duration,
    /// How many ping targets are configured (`[cluster] ping`; 0: none). With targets, a node
    /// never serves alone while it reaches fewer than the peer last did (see
    /// [`super::machine`]'s `reach`).
    pub ping_targets: u8,
    /// How long a primary must reach fewer ping targets than its connected, UpToDate
    /// secondary before the pair switches over (`[cluster] ping-switch-delay`).
    pub ping_switch_delay: Duration,
    /// The preferred primary takes its resource back from a healthy peer by a planned
    /// switchover once it is UpToDate again (heartbeat's `auto_failback`; see
    /// [`super::machine`]'s `switchover`).
    pub auto_failback: bool,
    /// How long the preferred node must be connected and UpToDate first (keepalived's
    /// `preempt_delay`).
    pub failback_delay: Duration,
}

/// What a node must know before it serves without its peer (DRBD's `fencing` policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// `dont-care`: a node that loses the replication link promotes (or goes on serving) at
    /// once. Fast, and a cut link splits the brain: only for tests and for pairs whose
    /// replication link cannot fail alone.
    DontCare,
    /// `resource-only` (the default): a primary that loses the link acknowledges nothing the
    /// peer lacks until the peer has persisted `Outdated` (asked over another heartbeat path)
    /// or has been silent on every path with nobody answering the shelf.slot; a secondary
    /// promotes alone only on the second condition; a primary answers clients only under a
    /// lease. See [`super::machine`].
    ResourceOnly,
}

impl fmt::Display for Fencing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fencing::DontCare => "dont-care",
            Fencing::ResourceOnly => "resource-only",
        })
    }
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
            fencing: Fencing::ResourceOnly,
            heartbeat_dead_time: Duration::from_secs(1),
            wire_recheck: Duration::from_secs(2),
            takeover_delay: Duration::from_millis(500),
            fence_peer: false,
            fence_retry: Duration::from_secs(5),
            witness: false,
            witness_retry: Duration::from_secs(2),
            ping_targets: 0,
            ping_switch_delay: Duration::from_secs(10),
            auto_failback: false,
            failback_delay: Duration::from_secs(30),
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
    /// `outdate`: persist `Outdated` on a Secondary that is not connected to a Primary (DRBD's
    /// `drbdadm outdate`): this node will not promote itself until it resyncs from the peer.
    /// What a peer's fence command asks for over another path.
    Outdate,
    /// `switchover`: a planned move of the primary role to the connected, UpToDate peer
    /// (on the primary: drain, demote, and let the peer promote; on the secondary: ask the
    /// primary to do that).
    Switchover,
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
            Command::Outdate => f.write_str("outdate"),
            Command::Switchover => f.write_str("switchover"),
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
    /// The heartbeat heard the peer on some path: what it says about this resource (`None`
    /// if its heartbeat names no such resource: it runs without it).
    PeerHeard(Option<PeerSeen>),
    /// The heartbeat has heard nothing from the peer on any path for its dead time.
    PeerSilent,
    /// The wire guard ([`Action::CheckWire`]) finished: `answered` if some other MAC answers
    /// this resource's shelf.slot on the client network.
    WireChecked {
        /// Somebody else answers.
        answered: bool,
    },
    /// While serving, another MAC answered this resource's shelf.slot: multiple-mount
    /// protection.
    RivalAnswered,
    /// The service group (floating IP, AoE, NBD) could not be started; what it had started
    /// was undone. A primary demotes and stays secondary until the operator promotes it.
    ServiceFailed,
    /// The whole process stood still this long (SIGSTOP, a hung kernel, a suspended VM), as
    /// the heartbeat thread — which never sleeps longer than an interval — noticed.
    StoodStill {
        /// How long.
        length: Duration,
    },
    /// The fence command ([`Action::FencePeer`]) finished.
    FenceResult {
        /// How it ended.
        outcome: FenceOutcome,
    },
    /// The witness answered a claim ([`Action::AskWitness`]) for `generation`, this node's
    /// current data generation when it was sent (or did not answer in time).
    WitnessAnswered {
        /// The generation claimed.
        generation: u64,
        /// What the witness said.
        verdict: WitnessVerdict,
    },
    /// How many ping targets each node reaches changed (`[cluster] ping`): `own` as this
    /// node's prober measures it, `peer` as the peer's heartbeat last reported it (kept after
    /// the peer falls silent: it is what the peer reached when last heard). `None`: not
    /// measured, or the sender has no ping targets.
    Reach {
        /// Targets this node reaches.
        own: Option<u8>,
        /// Targets the peer last said it reaches.
        peer: Option<u8>,
    },
    /// Time passed.
    Tick,
}

/// The witness's answer to a claim, as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitnessVerdict {
    /// This node holds the grant for the generation: it may serve alone from it.
    Granted,
    /// Another node (named) holds it: never serve alone from it.
    Held(NodeName),
    /// No verdict within the timeout and tries.
    Unreachable,
}

/// A node name small enough to copy (a witness's names are at most 64 bytes; longer ones are
/// cut on a character boundary).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NodeName {
    len: u8,
    bytes: [u8; 64],
}

impl NodeName {
    /// `name`, cut to 64 bytes.
    pub fn new(name: &str) -> NodeName {
        let mut end = name.len().min(64);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 64];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        NodeName {
            len: end as u8,
            bytes,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// How a fence command ended (DRBD's fence-peer handler contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// It exited with this code: 4 (peer outdated) and 7 (peer fenced, powered off) vouch
    /// for the peer; 5 is "peer unreachable"; any other code failed.
    Exit(i32),
    /// A signal ended it.
    Signal(i32),
    /// It ran past `fence-timeout` and its process group was killed.
    TimedOut,
    /// It could not be started at all.
    CouldNotRun,
}

impl FenceOutcome {
    /// Exit 4 or 7: the peer cannot serve (it persisted Outdated, or it is powered off).
    pub fn vouches(&self) -> bool {
        matches!(self, FenceOutcome::Exit(4) | FenceOutcome::Exit(7))
    }

    /// A short word for `events` and status: `exit-7`, `signal-9`, `timeout`, `not-run`.
    pub fn word(&self) -> String {
        match self {
            FenceOutcome::Exit(c) => format!("exit-{c}"),
            FenceOutcome::Signal(s) => format!("signal-{s}"),
            FenceOutcome::TimedOut => "timeout".into(),
            FenceOutcome::CouldNotRun => "not-run".into(),
        }
    }
}

impl fmt::Display for FenceOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceOutcome::Exit(c) => {
                let meaning = match c {
                    3 => "peer already outdated: not trusted, 4 or 7 expected",
                    4 => "peer outdated",
                    5 => "peer unreachable",
                    6 => "peer is primary",
                    7 => "peer fenced",
                    _ => "failed",
                };
                write!(f, "fence-peer exit {c} ({meaning})")
            }
            FenceOutcome::Signal(s) => write!(f, "fence-peer killed by signal {s}"),
            FenceOutcome::TimedOut => f.write_str("fence-peer timed out (process group killed)"),
            FenceOutcome::CouldNotRun => f.write_str("fence-peer could not be started"),
        }
    }
}

/// What the peer's heartbeat says about one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSeen {
    /// The peer's role.
    pub role: Role,
    /// The peer answers clients for it.
    pub serving: bool,
    /// The peer's data is UpToDate.
    pub up_to_date: bool,
    /// The peer has persisted `Outdated`: it will not promote itself.
    pub outdated: bool,
    /// The peer (a primary that lost the replication link) asks us to persist `Outdated`.
    pub outdate_request: bool,
    /// The peer stepped down for us in a planned switchover: take over.
    pub handing_over: bool,
    /// The peer (a Secondary) asks us, its Primary, to hand over (its operator's
    /// `switchover`, or its auto-failback).
    pub wants_switchover: bool,
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
    /// Nobody is primary: there is nothing to switch over (use `primary`).
    NoPrimary,
    /// A switchover is under way already.
    SwitchoverRunning,
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
            Refusal::NoPrimary => f.write_str("neither node is primary (use `primary`)"),
            Refusal::SwitchoverRunning => f.write_str("a switchover is under way already"),
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
    /// Another node answers for this resource while this one serves: it stopped serving.
    Rival,
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notification::Change { object, key, value } => {
                write!(f, "change {object} {key}:{value}")
            }
            Notification::SplitBrain(why) => write!(f, "call helper split-brain: {why}"),
            Notification::Rival => f.write_str(
                "alarm multiple-mount: another MAC answers this resource's shelf.slot; stopped serving",
            ),
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
    /// Send client writes to the peer from now on (`true`: connected, and the peer has a
    /// disk), or stop (`false`: writes complete here and are marked out of sync).
    Replicate(bool),
    /// The peer no longer receives writes: mark every write it has not acknowledged, and every
    /// write from now on, in the bitmap; complete pending writes locally.
    MarkOutOfSync,
    /// Stop using the local disk (after an I/O error); serve through the peer if possible.
    Detach,
    /// Ask the client network whether any other MAC answers this resource's shelf.slot (the
    /// wire guard); the answer comes back as [`Event::WireChecked`].
    CheckWire,
    /// Run the fence command (`[cluster] fence-peer`) against the peer, off the engine
    /// thread; its outcome comes back as [`Event::FenceResult`].
    FencePeer,
    /// Claim the right to serve alone from this node's current data generation at the witness
    /// (`[cluster] witness`), off the engine thread; the verdict comes back as
    /// [`Event::WitnessAnswered`].
    AskWitness,
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
