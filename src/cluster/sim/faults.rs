//! The simulated faults: cutting and restoring the networks and the link, blocking a node's
//! heartbeat, freezing, power loss, stalled writes, crashes and restarts.

use super::*;

impl Pair {
    /// Breaks the connection: both sides see it close.
    pub fn cut(&mut self) {
        self.cut = true;
        self.disconnect_link();
    }

    /// Silently loses all traffic on the replication link (state messages, pings, writes
    /// hang); the heartbeat paths are untouched.
    pub fn drop_traffic(&mut self) {
        self.dropping = true;
    }

    /// Heals the link; the nodes reconnect on the next [`Pair::advance`].
    pub fn restore(&mut self) {
        self.cut = false;
        self.dropping = false;
    }

    /// Takes the replication network down (the link and heartbeat path 0 fall silent; nothing
    /// closes) or brings it back.
    pub fn set_replication_net(&mut self, up: bool) {
        self.replication_net_up = up;
    }

    /// Takes the client network down (heartbeat path 1 falls silent, the wire guard sees
    /// nobody) or brings it back.
    pub fn set_client_net(&mut self, up: bool) {
        self.client_net_up = up;
    }

    /// Whether the client network is up.
    pub fn client_net_up(&self) -> bool {
        self.client_net_up
    }

    /// Whether the replication network is up.
    pub fn replication_net_up(&self) -> bool {
        self.replication_net_up
    }

    /// Whether the link is cut or silently dropping.
    pub fn link_broken(&self) -> bool {
        self.cut || self.dropping
    }

    /// Whether the two nodes keep some channel to each other (ignoring what happens to the
    /// nodes themselves): a heartbeat path, or the replication link. Without one, each node
    /// sees only silence; the wire guard still keeps them from answering together, but not
    /// from the case no two-node cluster can decide without a third vote: a node that passed
    /// its gate against a peer that was alive but unheard, served alone, and then died (or
    /// froze) before the peer's wire guard saw it — the peer then passes its own gate without
    /// those writes. (The client network down with the link and path 0 gone too stands for a
    /// client network split in halves, the other undecidable case: see [`super::machine`].)
    pub fn nodes_keep_a_channel(&self) -> bool {
        let blocked = self.nodes.iter().any(|n| n.heartbeat_blocked);
        let heartbeat = !blocked && (self.replication_net_up || self.client_net_up);
        let link = self.replication_net_up && !self.link_broken();
        heartbeat || link
    }

    /// Drops both heartbeat paths of node `n` (or lets them through again).
    pub fn block_heartbeat(&mut self, n: usize, blocked: bool) {
        self.nodes[n].heartbeat_blocked = blocked;
    }

    /// Heals every network fault: the link, both networks, the heartbeat blocks.
    pub fn heal(&mut self) {
        self.restore();
        self.replication_net_up = true;
        self.client_net_up = true;
        for node in &mut self.nodes {
            node.heartbeat_blocked = false;
        }
    }

    /// Stops node `n` (SIGSTOP): see the module docs.
    pub fn freeze(&mut self, n: usize) {
        if self.nodes[n].up {
            self.nodes[n].frozen = true;
            self.nodes[n].frozen_at = Some(self.now);
        }
    }

    /// Continues node `n` (SIGCONT): it processes what arrived while it was stopped, at the
    /// current time.
    pub fn thaw(&mut self, n: usize) {
        if !self.nodes[n].frozen {
            return;
        }
        self.nodes[n].frozen = false;
        // The heartbeat thread notices the pause first (the daemon's `Heartbeat::pauses`).
        if let Some(at) = self.nodes[n].frozen_at.take() {
            let length = self.now.saturating_duration_since(at);
            self.queue.push_back((n, Event::StoodStill { length }));
        }
        for event in std::mem::take(&mut self.nodes[n].held) {
            self.queue.push_back((n, event));
        }
        self.pump();
    }

    /// Whether node `n` is frozen.
    pub fn is_frozen(&self, n: usize) -> bool {
        self.nodes[n].frozen
    }

    /// Node `n` loses power: its links go dark first, so the peer sees no close, only
    /// silence; then the process is gone.
    pub fn power_loss(&mut self, n: usize) {
        self.stop_process(n);
        if self.connected {
            self.connected = false;
            self.job = None;
            for node in &mut self.nodes {
                node.resync = None;
            }
        }
    }

    /// Makes writes to node `n`'s disk hang (or complete again).
    pub fn stall_writes(&mut self, n: usize, stalled: bool) {
        self.nodes[n].stalled = stalled;
    }

    /// Kills node `n` (kill -9): its peer sees the connection close.
    pub fn crash(&mut self, n: usize) {
        self.stop_process(n);
        self.disconnect_link();
    }

    /// The process dies. Writes it had sent to the peer and not seen acknowledged are on its
    /// own disk and in its activity log: they are out of sync at the next start.
    pub(super) fn stop_process(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        for (block, _, _) in node.pending.drain(..) {
            node.bitmap.insert(block);
        }
        node.up = false;
        node.frozen = false;
        node.held.clear();
        node.serving = false;
        node.wants_connect = false;
        node.fence_due = None;
        node.witness_due = None;
    }

    /// Starts node `n` again with a new machine; its disk and UUIDs are what it had.
    pub fn restart(&mut self, n: usize, config: Config, startup: Startup) {
        let uuids = self.nodes[n].uuids;
        let (node, actions) = Node::new(config, startup, uuids, self.now);
        let old = std::mem::replace(&mut self.nodes[n], node);
        self.nodes[n].blocks = old.blocks;
        self.nodes[n].bitmap = old.bitmap;
        self.nodes[n].flags = old.flags;
        self.nodes[n].agreed_size = old.agreed_size;
        self.nodes[n].terms = old.terms;
        // A firewall rule outlives the process.
        self.nodes[n].heartbeat_blocked = old.heartbeat_blocked;
        // So does the fence command's script, and the way to the witness.
        self.nodes[n].fence = old.fence;
        self.nodes[n].witness_reachable = old.witness_reachable;
        self.nodes[n].witness_delay = old.witness_delay;
        // The network the targets are on does not restart with the process.
        self.nodes[n].reach = old.reach;
        self.execute(n, actions);
        self.pump();
    }

    /// Starts node `n` again the way the daemon does: from what its superblock says (a primary
    /// indicator still set is turned into the crashed-primary flag at attach).
    pub fn restart_from_disk(&mut self, n: usize, config: Config) {
        use crate::wire::ondisk::flags;
        let startup = self.nodes[n].startup_from_disk();
        let node = &mut self.nodes[n];
        if node.flags & flags::PRIMARY_IND != 0 {
            node.flags = (node.flags & !flags::PRIMARY_IND) | flags::CRASHED_PRIMARY;
        }
        self.restart(n, config, startup);
    }
}
