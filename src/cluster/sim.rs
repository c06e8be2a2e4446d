//! A deterministic two-node simulation: two [`Machine`]s, a simulated link, explicit time, and
//! toy disks (a few numbered blocks, a bitmap, generation UUIDs).
//!
//! It executes every [`Action`] the way the daemon must (serving, connecting, UUID rotations,
//! bitmap marking, resync with union bitmaps), so tests can check the properties that matter:
//! exactly one node serves, a split brain is detected and not synced, a resync leaves both
//! disks equal. Pure: no sockets, no threads, no real time; UUIDs come from a seeded generator.
//!
//! # Networks and heartbeat paths
//!
//! Two networks join the nodes. The **replication network** carries the replication link (a
//! TCP connection) and heartbeat path 0; the **client network** carries heartbeat path 1, the
//! clients and the wire guard ([`Action::CheckWire`]). Clients reach both nodes whenever the
//! client network is up (it is not split in halves here: that is the case resource-only
//! fencing cannot cover, see [`super::machine`]).
//!
//! A node hears its peer on a path when both processes run, neither is frozen, neither has its
//! heartbeat blocked, and the path's network is up. Every [`STEP`] a running node that hears
//! its peer on some path gets [`Event::PeerHeard`] with what the peer says about itself; one
//! that has heard nothing on any path for the heartbeat dead time gets [`Event::PeerSilent`].
//! The replication link, while it carries traffic, gives both sides [`Event::PeerAlive`].
//!
//! A node *answers* clients ([`Node::answers`]) when it runs, is not frozen, serves, and its
//! serve gate is open: [`Authority::Open`], or [`Authority::Lease`] while the peer heard this
//! node (on a path or over the link) within two thirds of the heartbeat dead time.
//!
//! # Faults
//!
//! After raft-rs's test network, and then some:
//!
//! * [`Pair::cut`]: the connection breaks, both sides see it close at once.
//! * [`Pair::drop_traffic`]: the link silently loses everything (only timeouts notice); the
//!   heartbeat paths still work.
//! * [`Pair::set_replication_net`]: the replication network goes down: the link is silent and
//!   heartbeat path 0 too (nothing closes).
//! * [`Pair::set_client_net`]: the client network goes down: heartbeat path 1 is silent and
//!   the wire guard cannot see the other node.
//! * [`Pair::block_heartbeat`]: both heartbeat paths of one node are dropped (a firewall rule);
//!   the link is untouched.
//! * [`Pair::freeze`] / [`Pair::thaw`] (SIGSTOP / SIGCONT): a frozen node processes no events
//!   and no ticks, sends nothing and answers nothing, but its kernel keeps the TCP connection
//!   open, so the peer sees silence, never a close. Events for it while frozen (a connection
//!   closed by the peer, a state message sent before the link went silent) wait in its socket
//!   buffers and are delivered, in order, when it is thawed, at the current time: its machine
//!   sees the time jump.
//! * [`Pair::power_loss`]: the links go dark first (the peer sees no close), then the process
//!   dies.
//! * [`Pair::crash`] (kill -9): the process dies and the kernel closes the connection: the peer
//!   sees the close at once.
//! * [`Pair::stall_writes`]: heartbeats answer but a node's disk never completes a write.
//! * [`Pair::restore`] heals the link; [`Pair::heal`] heals every network fault.
//!
//! # The fence command
//!
//! Each node has a scripted fence command ([`Pair::set_fence`]): [`Action::FencePeer`] ends,
//! after the scripted time, in the scripted [`FenceOutcome`]. What exits 4 and 7 claim is made
//! true when the peer runs: exit 4 outdates it (the `outdate` command, as `fence-peer-ask`
//! does), exit 7 cuts its power (as `fence-peer-poweroff` does). Other outcomes change nothing.
//!
//! # Ping targets
//!
//! [`Pair::set_reach`] sets how many ping targets a node reaches; its heartbeat carries the
//! figure to the peer, which keeps the last one it heard while the node is silent
//! (`sim/reach.rs`).
//!
//! # The witness
//!
//! [`Pair::set_witness`] gives the pair a witness: a [`Book`] that may be shared with other
//! pairs, and the pair's and nodes' names at it. [`Action::AskWitness`] claims the node's
//! current generation: the verdict comes after the node's answer delay
//! ([`Pair::set_witness_delay`]) if the node reaches the witness then
//! ([`Pair::set_witness_reachable`]), and as "unreachable" after [`WITNESS_GIVES_UP`]
//! otherwise. [`Pair::restart_witness`] reads the book back from its text, as the witness does
//! at its start.
//!
//! # Client writes and the two safety properties
//!
//! [`Pair::write`] acknowledges a write only if the node answers and the write is complete:
//! on the peer too while the machine replicates, on the local disk alone otherwise. The pair
//! records the last acknowledged version of every block, so a test can check, after every
//! step, that at most one node answers ([`Pair::answering_count`]) and that the node that
//! answers holds every acknowledged write ([`Pair::missing_acked_write`]).

use super::machine::{
    Action, Authority, Command, Config, Event, FenceOutcome, Machine, NodeName, PeerSeen, Startup,
    Status, Terms, WitnessVerdict,
};
use super::persist::{self, Keeper, SourceStarted};
use super::{ConnState, DiskState, ReplState, Role, SyncDirection};
use crate::ha::witness::Book;
use crate::repl::uuid::{decide, HandshakeContext, UuidSet};
use crate::wire::repl::{ChecksumAlg, Durability, ReplProtocol};
use crate::wire::witness::Verdict;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod faults;
mod reach;
mod votes;

/// Number of blocks on each simulated disk.
pub const BLOCKS: usize = 16;
/// Granularity of [`Pair::advance`].
pub const STEP: Duration = Duration::from_millis(100);
/// How long a node waits for a witness it cannot reach (three tries of 0.5 s).
pub const WITNESS_GIVES_UP: Duration = Duration::from_millis(1500);
/// The resource's name at the witness.
pub const RESOURCE: &str = "r0";

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    /// The state machine (replaced on [`Pair::restart`]).
    pub machine: Machine,
    /// Whether the process is running (it may still be frozen).
    pub up: bool,
    /// Generation UUIDs, as the meta-data would hold them.
    pub uuids: UuidSet,
    /// The data: block versions.
    pub blocks: [u64; BLOCKS],
    /// Out-of-sync blocks.
    pub bitmap: BTreeSet<usize>,
    /// Writes sent to the peer and not acknowledged: (block, value, sent at).
    pub pending: Vec<(usize, u64, Instant)>,
    /// Whether the exports run here.
    pub serving: bool,
    /// The node wants a connection (last connection action was Connect).
    pub wants_connect: bool,
    /// Every action this node was asked to perform.
    pub actions: Vec<Action>,
    /// Disk detached.
    pub detached: bool,
    /// This node's resync role while one runs.
    pub resync: Option<(SyncDirection, bool)>,
    /// Writes to this node's disk hang (never complete).
    pub stalled: bool,
    /// Superblock flags, as the persistent executor wrote them.
    pub flags: u32,
    /// The size agreed with a smaller peer, once one was met.
    pub agreed_size: Option<u64>,
    /// What this node offers a peer (its usable size shrinks with [`Action::Shrink`]).
    pub terms: Terms,
    /// A resync this node started as the source: what it sends the target.
    source_started: Option<SourceStarted>,
    /// Client writes go to the peer ([`Action::Replicate`]).
    pub replicating: bool,
    /// The new UUIDs the persistent executor drew for this node, in order (so a test can
    /// replay this node's actions through another executor backend and compare).
    pub fresh_uuids: Vec<u64>,
    /// When the peer last heard this node's heartbeat (on any path).
    pub heard_by_peer: Option<Instant>,
    /// When this node last heard its peer's heartbeat (on any path).
    pub heard_peer: Option<Instant>,
    /// When the process started (the heartbeat's silence counts from here at first).
    pub started: Instant,
    /// Stopped (SIGSTOP): processes nothing until thawed.
    pub frozen: bool,
    /// When it was frozen.
    pub frozen_at: Option<Instant>,
    /// Events that arrived while frozen, delivered on thaw.
    held: Vec<Event>,
    /// Both of this node's heartbeat paths are dropped.
    pub heartbeat_blocked: bool,
    /// What this node's fence command does: its outcome, and how long it runs.
    pub fence: (FenceOutcome, Duration),
    /// A fence command runs and ends at this time.
    fence_due: Option<Instant>,
    /// How many times the fence command was started.
    pub fence_runs: usize,
    /// This node reaches the witness.
    pub witness_reachable: bool,
    /// How long the witness's verdict takes to arrive here.
    pub witness_delay: Duration,
    /// A claim in flight: when its verdict (or the give-up) is due, and the generation.
    witness_due: Option<(Instant, u64)>,
    /// How many claims this node sent.
    pub witness_asks: usize,
    /// How many ping targets this node reaches (`None`: none configured).
    pub reach: Option<u8>,
    /// What the peer's heartbeat last said it reaches.
    pub peer_reach: Option<u8>,
    /// The figures last fed to the machine.
    reach_fed: Option<(Option<u8>, Option<u8>)>,
}

impl Keeper for Node {
    fn uuids(&self) -> UuidSet {
        self.uuids
    }

    fn store_uuids(&mut self, uuids: UuidSet) -> Result<(), String> {
        self.uuids.current = uuids.current;
        self.uuids.bitmap = uuids.bitmap;
        self.uuids.history = uuids.history;
        Ok(())
    }

    fn change_flags(&mut self, set: u32, clear: u32) -> Result<(), String> {
        self.flags = (self.flags | set) & !clear;
        Ok(())
    }

    fn store_agreed_size(&mut self, size: u64) -> Result<(), String> {
        self.agreed_size = Some(size);
        Ok(())
    }

    fn mark_all_out_of_sync(&mut self) -> Result<(), String> {
        self.bitmap.extend(0..BLOCKS);
        Ok(())
    }
}

impl Node {
    fn new(config: Config, startup: Startup, uuids: UuidSet, now: Instant) -> (Node, Vec<Action>) {
        let (machine, actions) = Machine::new(config, startup, now);
        (
            Node {
                machine,
                up: true,
                uuids,
                blocks: [0; BLOCKS],
                bitmap: BTreeSet::new(),
                pending: Vec::new(),
                serving: false,
                wants_connect: false,
                actions: Vec::new(),
                detached: startup.disk == DiskState::Diskless,
                resync: None,
                stalled: false,
                flags: 0,
                agreed_size: None,
                terms: Terms {
                    size: BLOCKS as u64 * 4096,
                    protocol: ReplProtocol::C,
                    durability: Durability::Node,
                    checksum_alg: ChecksumAlg::Xxh3_128,
                },
                source_started: None,
                replicating: false,
                fresh_uuids: Vec::new(),
                heard_by_peer: None,
                heard_peer: None,
                started: now,
                frozen: false,
                frozen_at: None,
                held: Vec::new(),
                heartbeat_blocked: false,
                fence: (FenceOutcome::Exit(1), Duration::ZERO),
                fence_due: None,
                fence_runs: 0,
                witness_reachable: true,
                witness_delay: Duration::ZERO,
                witness_due: None,
                witness_asks: 0,
                reach: None,
                peer_reach: None,
                reach_fed: None,
            },
            actions,
        )
    }

    /// The machine's status.
    pub fn status(&self) -> Status {
        self.machine.status()
    }

    /// What this node's heartbeat tells its peer about the resource.
    pub fn seen_by_peer(&self, now: Instant) -> PeerSeen {
        let s = self.status();
        PeerSeen {
            role: s.role,
            serving: self.answers(now),
            up_to_date: s.disk == DiskState::UpToDate,
            outdated: s.disk == DiskState::Outdated,
            outdate_request: s.outdate_request,
            handing_over: s.handing_over(),
            wants_switchover: s.wants_switchover(),
        }
    }

    /// Whether this node answers clients at `now`: it runs, is not frozen, serves, and its serve
    /// gate is open (a lease holds while the peer heard it within two thirds of the heartbeat
    /// dead time).
    pub fn answers(&self, now: Instant) -> bool {
        if !self.up || self.frozen || !self.serving {
            return false;
        }
        match self.status().authority {
            Authority::Closed => false,
            Authority::Open => true,
            Authority::Lease => self
                .heard_by_peer
                .is_some_and(|t| now < t + self.machine.config().heartbeat_dead_time * 2 / 3),
        }
    }

    /// What the daemon would read from this node's superblock at its next start.
    pub fn startup_from_disk(&self) -> Startup {
        use crate::wire::ondisk::flags;
        let disk = if self.detached {
            DiskState::Diskless
        } else if self.flags & flags::CONSISTENT == 0 {
            DiskState::Inconsistent
        } else if self.flags & flags::OUTDATED != 0 {
            DiskState::Outdated
        } else {
            DiskState::Consistent
        };
        Startup {
            disk,
            crashed_primary: self.flags & (flags::PRIMARY_IND | flags::CRASHED_PRIMARY) != 0,
            degraded: self.flags & flags::PEER_OUTDATED != 0,
        }
    }

    /// Whether this node refused `command` at any time.
    pub fn refused(&self, command: Command) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Refuse { command: c, .. } if *c == command))
    }
}

/// A running resync between the two nodes.
#[derive(Debug, Clone, Copy)]
struct Job {
    source: usize,
    full: bool,
    source_at_start: UuidSet,
    remaining: Duration,
}

/// Two nodes and the link between them.
#[derive(Debug)]
pub struct Pair {
    /// The nodes.
    pub nodes: [Node; 2],
    /// Simulated time.
    pub now: Instant,
    /// How long a resync takes.
    pub resync_time: Duration,
    connected: bool,
    cut: bool,
    dropping: bool,
    replication_net_up: bool,
    client_net_up: bool,
    queue: VecDeque<(usize, Event)>,
    job: Option<Job>,
    rng: u64,
    next_value: u64,
    /// The last acknowledged version of every block (0: none acknowledged yet).
    pub acked: [u64; BLOCKS],
    /// The witness's book (shared with other pairs), if the pair has one.
    witness: Option<Arc<Mutex<Book>>>,
    /// The pair's name and the nodes' names at the witness.
    names: (String, [String; 2]),
}

impl Pair {
    /// Two nodes started at the same instant with the same data (block versions 0) and the
    /// given UUIDs (use the same set for "in sync").
    pub fn new(configs: [Config; 2], startups: [Startup; 2], uuids: [UuidSet; 2]) -> Pair {
        let now = Instant::now();
        let [c0, c1] = configs;
        let (n0, a0) = Node::new(c0, startups[0], uuids[0], now);
        let (n1, a1) = Node::new(c1, startups[1], uuids[1], now);
        let mut pair = Pair {
            nodes: [n0, n1],
            now,
            resync_time: Duration::from_secs(1),
            connected: false,
            cut: false,
            dropping: false,
            replication_net_up: true,
            client_net_up: true,
            queue: VecDeque::new(),
            job: None,
            rng: 0x9e37_79b9_7f4a_7c15,
            next_value: 1,
            acked: [0; BLOCKS],
            witness: None,
            names: ("alpha-beta".into(), ["alpha".into(), "beta".into()]),
        };
        pair.execute(0, a0);
        pair.execute(1, a1);
        pair.pump();
        pair
    }

    /// Two nodes with consistent data in sync (the same UUIDs), with these configurations.
    pub fn synced(configs: [Config; 2]) -> Pair {
        let uuids = UuidSet {
            current: 0x1000,
            ..Default::default()
        };
        Pair::new(configs, [Startup::consistent(); 2], [uuids; 2])
    }

    /// The usual pair: node 0 preferred, both auto-promoting, consistent data in sync.
    pub fn healthy() -> Pair {
        Pair::synced([
            Config {
                preferred_primary: true,
                ..Config::default()
            },
            Config::default(),
        ])
    }

    /// Sets what node `n` offers its peer at the next connection (size, protocol, durability).
    pub fn set_terms(&mut self, n: usize, terms: Terms) {
        self.nodes[n].terms = terms;
    }

    /// Whether the two machines are connected through the simulated link.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Which nodes serve.
    pub fn serving(&self) -> [bool; 2] {
        [self.nodes[0].serving, self.nodes[1].serving]
    }

    /// Number of nodes serving.
    pub fn serving_count(&self) -> usize {
        self.serving().iter().filter(|&&s| s).count()
    }

    /// Feeds an event to node `n` and executes the resulting actions (a frozen node keeps it
    /// until it is thawed; a node that is down loses it).
    pub fn step(&mut self, n: usize, event: Event) {
        self.queue.push_back((n, event));
        self.pump();
    }

    /// An operator command on node `n`.
    pub fn command(&mut self, n: usize, command: Command) {
        self.step(n, Event::Command(command));
    }

    /// Advances time by `d` in [`STEP`]s: heartbeats, ticks, connection attempts, resync.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += STEP;
            if self.link_carries() {
                for n in 0..2 {
                    self.queue.push_back((n, Event::PeerAlive));
                    self.nodes[1 - n].heard_by_peer = Some(self.now);
                }
            }
            self.heartbeat();
            self.finish_fence_commands();
            self.finish_witness_claims();
            for n in 0..2 {
                if self.nodes[n].up && !self.nodes[n].frozen {
                    self.queue.push_back((n, Event::Tick));
                }
            }
            self.pump();
            self.try_connect();
            self.run_resync(STEP);
            self.pump();
        }
    }

    /// Whether the network under heartbeat `path` (0: replication, 1: client) is up.
    fn path_network_up(&self, path: usize) -> bool {
        if path == 0 {
            self.replication_net_up
        } else {
            self.client_net_up
        }
    }

    /// Whether the two nodes hear each other on heartbeat `path` now.
    pub fn hear_each_other_on(&self, path: usize) -> bool {
        let running = |node: &Node| node.up && !node.frozen && !node.heartbeat_blocked;
        running(&self.nodes[0]) && running(&self.nodes[1]) && self.path_network_up(path)
    }

    /// Whether messages sent on the replication connection reach the other side's socket.
    fn wire_carries(&self) -> bool {
        self.connected && !self.dropping && self.replication_net_up
    }

    /// Whether the replication link carries traffic both ways right now: the connection
    /// reaches the peer and both processes run (a frozen process reads nothing).
    pub fn link_carries(&self) -> bool {
        self.wire_carries() && self.nodes.iter().all(|n| n.up && !n.frozen)
    }

    /// One heartbeat round: each running node hears its peer on some path, or declares it
    /// silent after the dead time.
    fn heartbeat(&mut self) {
        let heard = (0..2).any(|path| self.hear_each_other_on(path));
        for n in 0..2 {
            let peer = 1 - n;
            if !self.nodes[n].up || self.nodes[n].frozen {
                continue;
            }
            if heard {
                self.nodes[n].heard_peer = Some(self.now);
                self.nodes[peer].heard_by_peer = Some(self.now);
                let seen = self.nodes[peer].seen_by_peer(self.now);
                self.queue.push_back((n, Event::PeerHeard(Some(seen))));
            } else {
                let since = self.nodes[n].heard_peer.unwrap_or(self.nodes[n].started);
                let dead_time = self.nodes[n].machine.config().heartbeat_dead_time;
                if self.now.saturating_duration_since(since) >= dead_time {
                    self.queue.push_back((n, Event::PeerSilent));
                }
            }
        }
        self.feed_reach(heard);
    }

    /// Whether node `n` answers clients now (serving, and its serve gate open).
    pub fn answers(&self, n: usize) -> bool {
        self.nodes[n].answers(self.now)
    }

    /// Number of nodes that answer clients now.
    pub fn answering_count(&self) -> usize {
        (0..2).filter(|&n| self.answers(n)).count()
    }

    /// The version of `block` node `n` returns to a client: its own, unless its copy is stale
    /// (detached, or a resync target that has not received the block yet) and the peer supplies
    /// it.
    pub fn served_version(&self, n: usize, block: usize) -> u64 {
        let node = &self.nodes[n];
        let stale = node.detached
            || matches!(node.resync, Some((SyncDirection::Target, full))
                if full || node.bitmap.contains(&block));
        if stale && self.link_carries() {
            self.nodes[1 - n].blocks[block]
        } else {
            node.blocks[block]
        }
    }

    /// The first acknowledged write that a node answering now does not return:
    /// `(node, block, acknowledged version, served version)`.
    pub fn missing_acked_write(&self) -> Option<(usize, usize, u64, u64)> {
        (0..2)
            .filter(|&n| self.answers(n))
            .flat_map(|n| (0..BLOCKS).map(move |b| (n, b)))
            .map(|(n, b)| (n, b, self.acked[b], self.served_version(n, b)))
            .find(|&(_, _, acked, served)| served < acked)
    }

    /// A client write of a new version to `block` through node `n`. Returns the version if
    /// the write was acknowledged: node `n` answers, and the write is complete — on the peer
    /// too while the machine replicates, on the local disk alone otherwise. A write that waits
    /// for the peer (a silent link, a stalled disk) is not acknowledged: `None`, and the client
    /// retries later.
    pub fn write(&mut self, n: usize, block: usize) -> Option<u64> {
        if !self.answers(n) {
            return None;
        }
        let v = self.next_value;
        self.next_value += 1;
        let peer = 1 - n;
        let local_disk = !self.nodes[n].detached;
        if local_disk {
            self.nodes[n].blocks[block] = v;
        }
        // The machine asked for replication; the link must carry it and the peer's disk
        // complete it.
        let complete = if self.nodes[n].replicating {
            if self.link_carries() && !self.nodes[peer].stalled {
                self.nodes[peer].blocks[block] = v;
                true
            } else {
                self.nodes[n].pending.push((block, v, self.now));
                let oldest = self.nodes[n].pending.first().map(|p| p.2);
                self.step(
                    n,
                    Event::PeerWrites {
                        oldest_pending: oldest,
                    },
                );
                false
            }
        } else if local_disk {
            self.nodes[n].bitmap.insert(block);
            true
        } else {
            panic!("node {n} serves without a disk and without a peer");
        };
        if !complete {
            return None;
        }
        self.acked[block] = self.acked[block].max(v);
        Some(v)
    }

    fn disconnect_link(&mut self) {
        if self.connected {
            self.connected = false;
            self.job = None;
            for n in 0..2 {
                self.nodes[n].resync = None;
                self.queue.push_back((n, Event::PeerLost));
            }
            self.pump();
        }
    }

    fn try_connect(&mut self) {
        let ready = |node: &Node| {
            node.up && node.wants_connect && node.status().conn == ConnState::Connecting
        };
        let frozen = self.nodes.iter().any(|n| n.frozen);
        if self.connected
            || self.cut
            || self.dropping
            || !self.replication_net_up
            || frozen
            || !ready(&self.nodes[0])
            || !ready(&self.nodes[1])
        {
            return;
        }
        // Each side judges the other's terms before anything else happens.
        let offers = [self.nodes[0].terms, self.nodes[1].terms];
        let mut refused = false;
        for n in 0..2 {
            let event = Event::PeerOffered {
                ours: offers[n],
                theirs: offers[1 - n],
            };
            let actions = self.nodes[n].machine.step(self.now, event);
            refused |= actions
                .iter()
                .any(|a| matches!(a, Action::RefusePeer { .. }));
            self.execute(n, actions);
        }
        if refused {
            return;
        }
        self.connected = true;
        let s = [self.nodes[0].status(), self.nodes[1].status()];
        let sets = [0, 1].map(|n| {
            let mut set = self.nodes[n].uuids;
            set.flags = self.nodes[n].machine.uuid_flags();
            set
        });
        for n in 0..2 {
            self.queue.push_back((n, Event::PeerConnected));
        }
        for n in 0..2 {
            let p = 1 - n;
            let decision = if s[n].disk == DiskState::Diskless || s[p].disk == DiskState::Diskless {
                None
            } else {
                let ctx = HandshakeContext {
                    local_role: s[n].role,
                    peer_role: s[p].role,
                    resolve_conflicts: n == 0,
                };
                Some(decide(&sets[n], &sets[p], &ctx))
            };
            self.queue.push_back((
                n,
                Event::Handshake {
                    decision,
                    peer_role: s[p].role,
                    peer_disk: s[p].disk,
                },
            ));
        }
        self.pump();
    }

    fn pump(&mut self) {
        while let Some((n, event)) = self.queue.pop_front() {
            if !self.nodes[n].up {
                continue;
            }
            if self.nodes[n].frozen {
                self.nodes[n].held.push(event);
                continue;
            }
            let actions = self.nodes[n].machine.step(self.now, event);
            self.execute(n, actions);
        }
    }

    fn execute(&mut self, n: usize, actions: Vec<Action>) {
        let peer = 1 - n;
        for action in actions {
            self.nodes[n].actions.push(action.clone());
            // What a restart keeps: the daemon's executor, the same code.
            let rng = &mut self.rng;
            let mut used = Vec::new();
            let started = persist::execute(&mut self.nodes[n], &action, &mut || {
                let uuid = fresh_uuid(rng);
                used.push(uuid);
                uuid
            })
            .expect("the simulated disk never fails a write");
            self.nodes[n].fresh_uuids.extend(used);
            if started.is_some() {
                self.nodes[n].source_started = started;
            }
            match action {
                Action::StartServing => {
                    assert!(!self.nodes[n].serving, "node {n} started serving twice");
                    self.nodes[n].serving = true;
                }
                Action::StopServing => self.nodes[n].serving = false,
                Action::Connect => self.nodes[n].wants_connect = true,
                Action::Disconnect { reason } => {
                    self.nodes[n].wants_connect = false;
                    if self.connected {
                        // The peer hears why unless the link is what failed.
                        let told = self.wire_carries();
                        self.connected = false;
                        self.job = None;
                        self.nodes[0].resync = None;
                        self.nodes[1].resync = None;
                        let event = if !told || reason == super::DisconnectReason::Timeout {
                            Event::PeerLost
                        } else {
                            Event::PeerDropped { reason }
                        };
                        self.queue.push_back((peer, event));
                    }
                }
                Action::SendState { role, disk, .. } => {
                    if self.wire_carries() {
                        self.queue
                            .push_back((peer, Event::PeerState { role, disk }));
                    }
                }
                Action::StartResync {
                    direction,
                    full,
                    tell_peer,
                } => {
                    self.nodes[n].resync = Some((direction, full));
                    if tell_peer && self.wire_carries() {
                        self.queue.push_back((
                            peer,
                            Event::PeerStartedResync {
                                direction: direction.mirrored(),
                                full,
                            },
                        ));
                    }
                    self.maybe_start_job();
                }
                Action::PauseResync | Action::ResumeResync => {}
                Action::NewCurrentUuid
                | Action::PersistFlags { .. }
                | Action::RefusePeer { .. } => {}
                Action::Shrink { size } => self.nodes[n].terms.size = size,
                Action::Replicate(on) => self.nodes[n].replicating = on,
                Action::MarkOutOfSync => {
                    let node = &mut self.nodes[n];
                    for (block, _, _) in node.pending.drain(..) {
                        node.bitmap.insert(block);
                    }
                }
                Action::Detach => self.nodes[n].detached = true,
                Action::CheckWire => {
                    let answered = self.client_net_up && self.nodes[peer].answers(self.now);
                    self.queue.push_back((n, Event::WireChecked { answered }));
                }
                Action::FencePeer => {
                    self.nodes[n].fence_runs += 1;
                    self.nodes[n].fence_due = Some(self.now + self.nodes[n].fence.1);
                }
                Action::AskWitness => {
                    let node = &mut self.nodes[n];
                    node.witness_asks += 1;
                    let wait = if node.witness_reachable {
                        node.witness_delay
                    } else {
                        WITNESS_GIVES_UP
                    };
                    node.witness_due = Some((self.now + wait, node.uuids.current));
                }
                Action::Notify(_) | Action::Log(_) | Action::Refuse { .. } => {}
            }
        }
    }

    /// Both sides agreed on a resync: exchange bitmaps and rotate UUIDs.
    fn maybe_start_job(&mut self) {
        let (Some((d0, f0)), Some((d1, f1))) = (self.nodes[0].resync, self.nodes[1].resync) else {
            return;
        };
        if self.job.is_some() {
            return;
        }
        assert_eq!(d0, d1.mirrored(), "both sides must agree on the direction");
        assert_eq!(f0, f1, "both sides must agree on full vs bitmap");
        let source = if d0 == SyncDirection::Source { 0 } else { 1 };
        let target = 1 - source;
        let union: BTreeSet<usize> = self.nodes[0]
            .bitmap
            .union(&self.nodes[1].bitmap)
            .copied()
            .collect();
        self.nodes[0].bitmap = union.clone();
        self.nodes[1].bitmap = union;
        let started = self.nodes[source]
            .source_started
            .take()
            .expect("the source rotated its UUIDs when it started");
        persist::adopt_sync_uuid(&mut self.nodes[target], started.sync_uuid)
            .expect("the simulated disk never fails a write");
        let source_at_start = started.at_start;
        self.job = Some(Job {
            source,
            full: f0,
            source_at_start,
            remaining: self.resync_time,
        });
    }

    fn run_resync(&mut self, dt: Duration) {
        let Some(mut job) = self.job else { return };
        let paused = self.nodes.iter().any(|n| {
            matches!(
                n.status().repl,
                ReplState::PausedSyncS | ReplState::PausedSyncT
            )
        });
        if !self.link_carries() || paused {
            return;
        }
        job.remaining = job.remaining.saturating_sub(dt);
        if !job.remaining.is_zero() {
            self.job = Some(job);
            return;
        }
        self.job = None;
        let (s, t) = (job.source, 1 - job.source);
        let blocks: Vec<usize> = if job.full {
            (0..BLOCKS).collect()
        } else {
            self.nodes[s].bitmap.iter().copied().collect()
        };
        for b in blocks {
            self.nodes[t].blocks[b] = self.nodes[s].blocks[b];
        }
        persist::finish_resync_source(&mut self.nodes[s])
            .expect("the simulated disk never fails a write");
        persist::finish_resync_target(&mut self.nodes[t], Some(&job.source_at_start))
            .expect("the simulated disk never fails a write");
        for n in 0..2 {
            self.nodes[n].bitmap.clear();
            self.nodes[n].resync = None;
            self.queue.push_back((n, Event::ResyncDone));
        }
        self.pump();
    }

    /// Whether both disks hold the same data.
    pub fn in_sync(&self) -> bool {
        self.nodes[0].blocks == self.nodes[1].blocks
    }

    /// The role of node `n`.
    pub fn role(&self, n: usize) -> Role {
        self.nodes[n].status().role
    }
}

/// The next UUID of the simulation's seeded generator (xorshift; never 0, never JC).
fn fresh_uuid(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state & !0xff) | 0x100
}
