//! [`Machine`]: one node's role/connection/disk/replication state and the rules that move it.
//!
//! # Timers
//!
//! * **Startup wait.** A freshly started node does not decide anything until it has met its
//!   peer, or until `wfc_timeout` (`degr_wfc_timeout` if it was a degraded primary when it went
//!   down) has passed. Even then it promotes itself only if its data is *provably* UpToDate: it
//!   was the degraded primary (the peer is known to be older). So when both nodes restart at
//!   once, neither becomes primary alone; they wait for each other.
//! * **Replication link.** While connected, any sign of life on the link ([`Event::PeerAlive`])
//!   must arrive within `dead_time`, or the link is dropped.
//! * **Heartbeat.** The heartbeat ([`crate::ha`]) reports the peer heard on some path
//!   ([`Event::PeerHeard`]) or silent on every path for `heartbeat_dead_time`
//!   ([`Event::PeerSilent`]). The peer is *silent* only when the heartbeat says so **and** the
//!   replication link has carried nothing for that long either.
//! * **ko-count.** A peer that answers heartbeats but has not completed the oldest pending write
//!   within `ko_count × timeout` is dropped: a stuck secondary must not stall the primary.
//!
//! # Automatic promotion (`auto_promote`)
//!
//! * Connected, nobody Primary: the node with UpToDate data promotes if it is the
//!   `preferred_primary`, or if the peer's data is not UpToDate. No preemption: a node never
//!   promotes while the peer is Primary.
//! * Peer lost (or never met, after the startup wait): a Secondary with UpToDate data promotes
//!   (failover) — under `fencing = resource-only` only through the **promotion gate**: the peer
//!   is silent on every heartbeat path and the link, and the wire guard ([`Action::CheckWire`])
//!   found no other MAC answering the shelf.slot. A peer heard on any path is never replaced.
//!   The secondary asks the wire guard only `takeover_delay` (0.5 s) after that silence began: a
//!   primary that lost the link at the same moment asks at once, passes, and answers by then.
//!   (Asked together, neither would see the other answering, and both would pass.)
//! * An Outdated node never promotes itself; nor does one that saw a rival answer its
//!   shelf.slot, until the operator says `primary`; nor, with ping targets, one that reaches
//!   fewer than the peer last did (`reach`).
//! * StandAlone (operator `disconnect`, split brain, unrelated data): never.
//!
//! # Who may answer a client: the serve gate and its lease (`fencing = resource-only`)
//!
//! Every reply the exports send is checked against the gate's [`Authority`] immediately before
//! it leaves ([`crate::ha::gate`]). A primary's authority is:
//!
//! * **Lease** while connected to a peer with a disk. The lease runs to `sent + ⅔·D` (D is the
//!   heartbeat dead time) for the latest heartbeat or replication ping, sent at `sent` on this
//!   node's monotonic clock, that the peer *acknowledged* (an echo reply, a ping answer).
//! * **Closed** after the replication link is lost, until the peer is fenced: it persisted
//!   `Outdated` at our request (asked over any heartbeat path that still works, DRBD's
//!   resource-only fencing), or it passed the promotion gate's test from our side (silent
//!   everywhere for D, nobody else answering). Only then does the primary start a new data
//!   generation and answer again — writes the peer lacks become dirty bits, never errors.
//! * **Open** after that, or when the peer is diskless, Outdated, Inconsistent — a peer that
//!   cannot promote itself — or when the operator promoted this node by hand.
//!
//! ## Why no acknowledged write is lost, and no two nodes answer at once
//!
//! What each node knows, and by which clock (all `CLOCK_MONOTONIC`, which keeps running while a
//! process is stopped; only *rates* must agree, to well under the ⅓·D margin):
//!
//! 1. The secondary S promotes alone only after hearing nothing from the primary P for D on its
//!    own clock, on any path. If P's heartbeat or ping sent at `t` was acknowledged by S, S
//!    heard P at some instant ≥ `t`, so S cannot promote before `t + D`. P's lease from that
//!    acknowledgement ends at `t + ⅔·D`: P has stopped answering before S may start. A P that
//!    is frozen (SIGSTOP, a hung kernel) wakes up with its monotonic clock past its lease: it
//!    answers nothing, and when it hears S serving it demotes itself (marking its own unsent
//!    writes out of sync for the resync that follows) rather than start a generation of its
//!    own. Having stood still longer than a lease, it cannot know whether S served and died
//!    meanwhile: it neither passes the gate nor asks S to step aside until the handshake
//!    (or the operator) settles whose data is newer — a primary that finds the link lost
//!    after such a pause demotes itself.
//! 2. While connected, P acknowledges a write only after S has it (protocol C). When the link
//!    breaks, P acknowledges nothing S lacks until S is Outdated on disk (S will never promote:
//!    the flag survives its restart) or S is provably gone (then S was not serving either: by
//!    1, with the roles swapped, S answers only under a lease or the gate). So every write P
//!    acknowledged is on S, or S can never serve again without a resync *from* P.
//! 3. The wire guard closes the gap the heartbeat cannot see: a node that serves on the client
//!    network but is silent on every heartbeat path (both heartbeat networks blocked) still
//!    answers a config query for its shelf.slot, and nobody promotes while anyone answers.
//!    While serving, a primary that sees another MAC answer its shelf.slot stops
//!    ([`Event::RivalAnswered`], multiple-mount protection). A node whose guard saw somebody
//!    answer knows that somebody serves without it: its data is Outdated from then on, so it
//!    cannot pass the gate later, once that node is gone, without the writes it acknowledged.
//!
//! With a third vote — a fence command or a witness (`vouch`) — the gate has one more
//! condition each, and the cases below are covered: a witness grants one generation to one
//! node, so two halves that both reach it never both serve alone.
//!
//! What this cannot prevent without a third vote (a witness or a fence command): the client
//! network split in two halves while the replication link is also cut. Each half then sees
//! only its own node, both are silent to each other on every path, and each passes its gate.
//! The UUID handshake detects the split brain when the link returns. Nor this, with every
//! heartbeat path and the link gone while the client network works: one node passes its gate
//! against a peer that is alive but unheard, serves alone, and dies (or freezes) before the
//! peer's wire guard has seen it answer; the peer then passes its own gate without the writes
//! acknowledged meanwhile.
//!
//! Under `fencing = dont-care` the gate and the lease are off: a node that loses the link
//! promotes (or goes on serving) at once, DRBD's default.

pub use super::events::{
    Action, Command, Config, Event, FenceOutcome, Fencing, NodeName, Notification, PeerRefusal,
    PeerSeen, Refusal, SharedSettings, Startup, Terms, WitnessVerdict,
};
use super::{ConnState, DisconnectReason, DiskState, ReplState, Role, SyncDecision, SyncDirection};
pub use crate::ha::gate::Authority;

mod command;
mod fencing;
mod handshake;
mod reach;
mod switchover;
mod vouch;
use crate::repl::uuid::UuidFlags;
use crate::wire::ondisk::flags;
use std::time::Instant;
pub use switchover::{Handover, SwitchoverReason, HANDOVER_TIMEOUT};

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
    /// On what grounds the exports may answer clients (the serve gate).
    pub authority: Authority,
    /// A primary that lost the replication link asks the peer, over the heartbeat, to persist
    /// `Outdated` (resource-only fencing).
    pub outdate_request: bool,
    /// The heartbeat hears the peer on some path (or the replication link is alive).
    pub peer_heard: bool,
    /// A planned switchover under way on this node, if any.
    pub handover: Option<Handover>,
}

impl Status {
    /// This node stepped down for its peer (the heartbeat flag *handing over*).
    pub fn handing_over(&self) -> bool {
        matches!(self.handover, Some(Handover::Giving { .. }))
    }

    /// This node asks its peer to hand over (the heartbeat flag *wants switchover*).
    pub fn wants_switchover(&self) -> bool {
        matches!(self.handover, Some(Handover::Asking { .. }))
    }
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
    /// Client writes go to the peer (the last [`Action::Replicate`]).
    replicating: bool,
    /// What the heartbeat last said about the peer.
    heard: Heard,
    /// The wire guard: whether somebody else answers our shelf.slot.
    wire: Wire,
    /// Serving without the peer is vouched for: the peer persisted Outdated, or it was silent
    /// on every path with nobody answering, or the operator promoted this node by hand.
    alone: bool,
    /// A primary that lost the replication link waits to learn that the peer cannot serve
    /// (it persisted Outdated, or it is gone) before it answers clients again.
    fencing_peer: bool,
    /// Another MAC answered our shelf.slot while we served: no automatic promotion until the
    /// operator says `primary`.
    rival: bool,
    /// Writes the peer lacks were marked out of sync when the link was lost, and no new data
    /// generation has started since (resource-only fencing defers it): the UUIDs still match
    /// the peer's, so a handshake would find nothing to resync.
    marked_without_generation: bool,
    /// Since when this node would serve alone if the wire guard found nobody answering (the
    /// peer silent everywhere, this node fencing it or ready to fail over).
    could_serve_alone_since: Option<Instant>,
    /// This process stood still (SIGSTOP, a hung kernel) for longer than a lease: the peer may
    /// have passed its gate, promoted and acknowledged writes meanwhile, and died since, so
    /// silence and an empty wire prove nothing. No serving alone through the gate until a
    /// handshake with the peer or the operator's `primary`.
    may_have_been_replaced: bool,
    /// The fence command's vouch for serving alone (see `vouch`).
    vouch: vouch::Vouch,
    /// The witness's vouch for serving alone (see `vouch`).
    witness: vouch::Witness,
    /// Both nodes' reach of the ping targets (see `reach`).
    reach: reach::ReachState,
    /// A planned switchover under way (see `switchover`).
    handover: Option<Handover>,
    /// Since when an `auto-failback` has been due (see `switchover`).
    failback_since: Option<Instant>,
    /// The time of the step being taken.
    now: Instant,
}

/// What the heartbeat says about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// Nothing yet (just started): neither alive nor provably gone.
    Unknown,
    /// Heard on some path, with what it says about this resource.
    Alive(Option<PeerSeen>),
    /// Silent on every path for the heartbeat dead time, since this instant.
    Silent(Instant),
}

/// The wire guard's state (only meaningful while the peer is silent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Not asked since the peer was last heard.
    Unasked,
    /// A check is running.
    Checking,
    /// Nobody else answers.
    Clear,
    /// Somebody else answered at this time.
    Answered(Instant),
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
            replicating: false,
            heard: Heard::Unknown,
            wire: Wire::Unasked,
            alone: false,
            fencing_peer: false,
            rival: false,
            marked_without_generation: false,
            could_serve_alone_since: None,
            may_have_been_replaced: false,
            vouch: vouch::Vouch::Unasked,
            witness: vouch::Witness::Unasked,
            reach: reach::ReachState::default(),
            handover: None,
            failback_since: None,
            now,
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
            authority: self.authority(),
            outdate_request: self.fencing_peer,
            peer_heard: self.peer_heard(),
            handover: self.handover,
        }
    }

    /// On what grounds the exports may answer: see the module docs.
    fn authority(&self) -> Authority {
        if !self.serving {
            Authority::Closed
        } else if self.config.fencing == Fencing::DontCare
            || self.alone
            || (self.conn == ConnState::Connected && self.peer_disk == DiskState::Diskless)
        {
            Authority::Open
        } else if self.conn == ConnState::Connected {
            Authority::Lease
        } else {
            Authority::Closed
        }
    }

    /// The peer shows a sign of life: on a heartbeat path, or on the replication link within
    /// the heartbeat dead time.
    fn peer_heard(&self) -> bool {
        matches!(self.heard, Heard::Alive(_)) || self.link_alive(self.config.heartbeat_dead_time)
    }

    /// The peer is provably silent: nothing on any heartbeat path for the dead time, and
    /// nothing on the replication link either.
    fn peer_silent(&self) -> bool {
        matches!(self.heard, Heard::Silent(_)) && !self.link_alive(self.config.heartbeat_dead_time)
    }

    fn link_alive(&self, within: std::time::Duration) -> bool {
        self.linked()
            && self
                .last_alive
                .is_some_and(|t| self.now.saturating_duration_since(t) < within)
    }

    /// What the peer's heartbeat says about this resource, if it is heard.
    fn peer_seen(&self) -> Option<PeerSeen> {
        match self.heard {
            Heard::Alive(seen) => seen,
            _ => None,
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
        self.now = now;
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
            Event::PeerHeard(seen) => self.peer_heard_event(seen, &mut out),
            Event::PeerSilent => {
                if !matches!(self.heard, Heard::Silent(_)) {
                    out.push(Action::Log(
                        "the heartbeat hears nothing from the peer on any path".into(),
                    ));
                    self.heard = Heard::Silent(now);
                }
            }
            Event::WireChecked { answered } => self.wire_checked(answered, &mut out),
            Event::RivalAnswered => self.rival_answered(&mut out),
            Event::ServiceFailed => self.service_failed(&mut out),
            Event::StoodStill { length } => self.stood_still(length, &mut out),
            Event::FenceResult { outcome } => self.fence_result(outcome, &mut out),
            Event::WitnessAnswered {
                generation,
                verdict,
            } => self.witness_answered(generation, verdict, &mut out),
            Event::Reach { own, peer } => self.reach_changed(own, peer),
            Event::Tick => self.tick(now, &mut out),
        }
        self.reach_step(&mut out);
        self.fence(&mut out);
        self.follow_switchover(&mut out);
        self.maybe_promote(&mut out);
        self.finish(before, &mut out);
        out
    }

    /// Transport up (handshaking or connected).
    fn linked(&self) -> bool {
        matches!(self.conn, ConnState::Handshaking | ConnState::Connected)
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

    /// The peer is gone (or we dropped it): what a primary must do, and forget its state.
    fn lose_peer(&mut self, out: &mut Vec<Action>) {
        let was_connected = self.conn == ConnState::Connected;
        if was_connected && self.role == Role::Secondary {
            // Failover: if our data is UpToDate, we may take over.
            self.promote_alone = true;
        }
        if was_connected && self.role == Role::Primary {
            let both_disks =
                self.disk != DiskState::Diskless && self.peer_disk != DiskState::Diskless;
            if both_disks {
                out.push(Action::MarkOutOfSync);
            }
            // A peer with consistent data could promote itself: under resource-only fencing,
            // answer nothing until it is Outdated or provably gone (see `fence`).
            let peer_could_serve =
                matches!(self.peer_disk, DiskState::UpToDate | DiskState::Consistent);
            if self.config.fencing == Fencing::ResourceOnly && both_disks && peer_could_serve {
                self.fencing_peer = true;
                self.marked_without_generation = true;
                out.push(Action::Log(
                    "lost the replication link: answering nothing until the peer is Outdated or provably gone".into(),
                ));
            } else {
                if both_disks {
                    out.push(Action::NewCurrentUuid);
                }
                self.degraded = true;
                self.alone = true;
            }
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
        self.stop_resync_without_a_disk();
    }

    /// A resync needs both disks: once one is gone, the pair is just Established (what is
    /// still out of sync stays marked for the next one).
    pub(super) fn stop_resync_without_a_disk(&mut self) {
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
        if self.linked() && self.config.fencing == Fencing::ResourceOnly {
            if let Some(last) = self.last_alive {
                let quiet = now.saturating_duration_since(last);
                let dead_time = self.config.heartbeat_dead_time;
                if matches!(self.heard, Heard::Silent(_)) && quiet >= dead_time {
                    out.push(Action::Log(
                        "the peer is silent on every heartbeat path and on the replication link"
                            .into(),
                    ));
                    return self.drop_peer(DisconnectReason::Timeout, out);
                }
                if self.conn == ConnState::Connected
                    && matches!(self.heard, Heard::Alive(_))
                    && quiet >= 2 * dead_time
                {
                    out.push(Action::Log(
                        "the replication link is silent while the heartbeat hears the peer: dropping the link".into(),
                    ));
                    return self.drop_peer(DisconnectReason::Timeout, out);
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
                    || self.giving_over()
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
            ConnState::Connecting if self.promote_alone && !self.reach_allows_alone() => {
                return self.refuse_by_reach(out)
            }
            ConnState::Connecting if self.promote_alone && !self.gate_passed() => return,
            ConnState::Connecting if self.promote_alone => return self.auto_promote_alone(out),
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
        // Writes reach the peer whenever the connection is established and it has a disk;
        // attached before anything is served under it.
        let replicate = connected && self.peer_disk != DiskState::Diskless;
        if replicate != self.replicating {
            self.replicating = replicate;
            out.push(Action::Replicate(replicate));
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
                DiskState::UpToDate | DiskState::Consistent => {
                    set |= flags::CONSISTENT;
                    clear |= flags::OUTDATED;
                }
                DiskState::Outdated => set |= flags::OUTDATED,
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
    fn a_service_that_cannot_start_demotes_and_holds_until_the_operator() {
        let now = t0();
        let (mut m, _) = Machine::new(Config::default(), Startup::consistent(), now);
        m.step(now, Event::Command(Command::Primary { force: true }));
        assert!(m.status().serving);
        let out = m.step(now, Event::ServiceFailed);
        assert!(out.contains(&Action::StopServing), "{out:?}");
        assert_eq!(m.status().role, Role::Secondary);
        // Not promoted again by itself (a loop of failing starts), only by the operator.
        let out = m.step(now, Event::Tick);
        assert!(!out.contains(&Action::StartServing), "{out:?}");
        assert_eq!(m.status().role, Role::Secondary);
        let out = m.step(now, Event::Command(Command::Primary { force: false }));
        assert!(out.contains(&Action::StartServing), "{out:?}");
        // A secondary is not demoted by a late report.
        let (mut s, _) = Machine::new(Config::default(), Startup::consistent(), now);
        assert!(s.step(now, Event::ServiceFailed).is_empty());
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
