//! Ping targets (`[cluster] ping`), as `Machine` methods: what each node's reach — the number
//! of targets on the client network it gets echo replies from — decides.
//!
//! * **Never fail over to the node that reaches fewer.** A node serves alone after losing its
//!   peer (the failover promotion, and the startup wait's) only if it reaches at least one
//!   target and at least as many as the peer last reported before it fell silent. It is one
//!   more condition of the promotion gate, checked first: a node that fails it does not ask
//!   the wire guard, the fence command or the witness (a grant it could not use would only
//!   hold off the node that can). The refusal is logged with the figures ("ping: reaches 0 of
//!   2 targets, the peer reached 2") and notified as `promotion:refused-ping`.
//! * **A primary that reaches fewer than its secondary hands over.** Connected, replication
//!   established, the secondary UpToDate, and the primary's reach below the secondary's for
//!   `ping-switch-delay` without a break: the primary starts a planned switchover
//!   (`switchover`, reason [`SwitchoverReason::Ping`]; keepalived's `preempt_delay`-like
//!   damping: a blip shorter than the delay does nothing).
//! * **No failback to the node that reaches fewer**: `auto-failback` waits while the preferred
//!   node reaches fewer targets than the primary.
//! * **No failback by ping.** Only *fewer* moves the resource: once the other node serves,
//!   the old primary regaining its network reaches as many, not more, and nothing happens.
//!
//! Without ping targets none of this applies. A reach not measured yet counts as 0; a peer
//! that never reported one (or has no targets) counts as reaching none.

use super::*;

/// What the machine knows about the two nodes' reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct ReachState {
    /// Targets this node reaches (`None`: not measured yet).
    own: Option<u8>,
    /// Targets the peer last reported (kept while it is silent).
    peer: Option<u8>,
    /// Since when this primary has reached fewer than its secondary.
    fewer_since: Option<Instant>,
    /// The refusal last logged, so it is said once per change of the figures.
    refused: Option<(u8, u8)>,
}

impl Machine {
    /// [`Event::Reach`]: new figures.
    pub(super) fn reach_changed(&mut self, own: Option<u8>, peer: Option<u8>) {
        self.reach.own = own;
        self.reach.peer = peer;
    }

    fn own_reach(&self) -> u8 {
        self.reach.own.unwrap_or(0)
    }

    fn peer_reach(&self) -> u8 {
        self.reach.peer.unwrap_or(0)
    }

    /// The ping condition of serving alone: met without ping targets, or when this node reaches
    /// some target and no fewer than the peer last reported.
    pub(super) fn reach_allows_alone(&self) -> bool {
        self.config.ping_targets == 0
            || (self.own_reach() > 0 && self.own_reach() >= self.peer_reach())
    }

    /// Says once per change of the figures why the ping condition refuses serving alone.
    pub(super) fn refuse_by_reach(&mut self, out: &mut Vec<Action>) {
        let figures = (self.own_reach(), self.peer_reach());
        if self.reach.refused == Some(figures) {
            return;
        }
        self.reach.refused = Some(figures);
        out.push(Action::Log(format!(
            "not serving alone: ping: reaches {} of {} targets, the peer reached {}",
            figures.0, self.config.ping_targets, figures.1
        )));
        out.push(Action::Notify(Notification::Change {
            object: "resource",
            key: "promotion",
            value: "refused-ping".into(),
        }));
    }

    /// Once per step: a primary reaching fewer targets than its healthy secondary for the
    /// switch delay starts a planned switchover.
    pub(super) fn reach_step(&mut self, out: &mut Vec<Action>) {
        if self.reach_allows_alone() {
            self.reach.refused = None;
        }
        let fewer = self.role == Role::Primary
            && self.peer_role == Role::Secondary
            && self.handover.is_none()
            && self.switchable()
            && self.reaches_fewer();
        if !fewer {
            self.reach.fewer_since = None;
            return;
        }
        let since = *self.reach.fewer_since.get_or_insert(self.now);
        if self.now.saturating_duration_since(since) < self.config.ping_switch_delay {
            return;
        }
        self.reach.fewer_since = None;
        let why = format!(
            "ping: reaches {} of {} targets, the secondary {}, for {:?}",
            self.own_reach(),
            self.config.ping_targets,
            self.peer_reach(),
            self.config.ping_switch_delay
        );
        out.push(Action::Log(why));
        self.give_over(SwitchoverReason::Ping, out);
    }

    /// With ping targets: this node reaches fewer than the peer last reported. A node that
    /// does is not worth a switchover to (`auto-failback` waits).
    pub(super) fn reaches_fewer(&self) -> bool {
        self.config.ping_targets > 0 && self.own_reach() < self.peer_reach()
    }
}
