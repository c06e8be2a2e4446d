//! Resource-only fencing and the promotion gate, as `Machine` methods: when a node that lost
//! its peer may serve alone (the peer silent on every path and nobody answering the
//! shelf.slot, or the peer persisted `Outdated`), what the heartbeat, the wire guard and
//! multiple-mount protection report, a process that stood still, and a service that could not
//! start (each takes a node out of serving). The argument that this
//! never lets two nodes answer at once is in the parent module's docs.

use super::*;

impl Machine {
    /// Under resource-only fencing: may this node serve without its peer right now? The peer
    /// is silent on every path for the dead time and the wire guard found nobody else
    /// answering the shelf.slot, and — with a fence command configured — it vouched for the
    /// peer (exit 4 or 7), and — with a witness — it granted our generation (see `vouch`).
    pub(super) fn gate_passed(&self) -> bool {
        match self.config.fencing {
            Fencing::DontCare => true,
            Fencing::ResourceOnly => {
                !self.rival
                    && !self.replaced_unknown()
                    && self.peer_silent()
                    && self.wire == Wire::Clear
                    && self.fence_vouched()
                    && self.witness_granted()
            }
        }
    }

    /// Would passing the promotion gate let this node serve? Then the wire guard is worth
    /// asking.
    pub(super) fn wants_to_serve_alone(&self) -> bool {
        self.fencing_peer
            || (self.role == Role::Secondary
                && self.promote_alone
                && self.config.auto_promote
                && self.startup_wait_over
                && self.disk == DiskState::UpToDate
                && self.conn == ConnState::Connecting
                && !self.rival
                && self.reach_allows_alone())
    }

    /// Resource-only fencing, once per step: a primary that lost the replication link serves
    /// again once the peer is Outdated or provably gone; the wire guard is asked whenever its
    /// answer would let this node serve alone.
    pub(super) fn fence(&mut self, out: &mut Vec<Action>) {
        if self.config.fencing != Fencing::ResourceOnly {
            return;
        }
        self.renew_vouch();
        if self.fencing_peer && self.replaced_unknown() {
            // Our data may be older than what the peer acknowledged while we stood still:
            // asking it to step aside could throw its writes away. The handshake decides.
            out.push(Action::Log(
                "lost the replication link after standing still: the peer may have served meanwhile; demoting (our unsent writes stay marked out of sync)".into(),
            ));
            self.role = Role::Secondary;
            self.fencing_peer = false;
            self.alone = false;
            self.promote_alone = false;
            return;
        }
        if self.fencing_peer {
            if self.peer_seen().is_some_and(|p| p.outdated) {
                return self.serve_alone("the peer persisted Outdated", out);
            }
            if self.gate_passed() {
                let why = self.gate_reason();
                return self.serve_alone(&why, out);
            }
        }
        if !(self.peer_silent() && self.wants_to_serve_alone()) {
            self.could_serve_alone_since = None;
            return;
        }
        // A primary that lost the link and a secondary that lost it too measure the same
        // silence and would ask the wire guard at the same moment; neither answers yet, so both
        // would pass. The primary asks at once; the secondary gives it `takeover_delay` (longer
        // than one guard check) to start answering first, and then sees it.
        let since = *self.could_serve_alone_since.get_or_insert(self.now);
        let head_start = if self.fencing_peer {
            std::time::Duration::ZERO
        } else {
            self.config.takeover_delay
        };
        if self.now.saturating_duration_since(since) < head_start {
            return;
        }
        let ask = match self.wire {
            Wire::Unasked => true,
            Wire::Answered(at) => {
                self.now.saturating_duration_since(at) >= self.config.wire_recheck
            }
            Wire::Checking | Wire::Clear => false,
        };
        if ask {
            self.wire = Wire::Checking;
            out.push(Action::CheckWire);
        }
        // Nobody else answers: with a fence command, it decides; then a witness.
        self.ask_fence(out);
        self.ask_witness(out);
    }

    /// A primary whose peer is fenced (or gone) serves alone: a new generation first.
    pub(super) fn serve_alone(&mut self, why: &str, out: &mut Vec<Action>) {
        self.fencing_peer = false;
        self.alone = true;
        out.push(Action::Log(format!("serving without the peer: {why}")));
        if self.role == Role::Primary && self.disk != DiskState::Diskless {
            out.push(Action::NewCurrentUuid);
            self.marked_without_generation = false;
            self.degraded = true;
        }
    }

    pub(super) fn peer_heard_event(&mut self, seen: Option<PeerSeen>, out: &mut Vec<Action>) {
        if matches!(self.heard, Heard::Silent(_)) {
            out.push(Action::Log("the heartbeat hears the peer again".into()));
        }
        self.heard = Heard::Alive(seen);
        if self.wire != Wire::Checking {
            self.wire = Wire::Unasked;
        }
        let Some(seen) = seen else { return };
        if self.config.fencing != Fencing::ResourceOnly {
            return;
        }
        if seen.outdate_request && self.role == Role::Secondary {
            if self.conn == ConnState::Connected {
                out.push(Action::Log(
                    "the primary lost the replication link: dropping ours too".into(),
                ));
                self.drop_peer(DisconnectReason::Timeout, out);
            }
            if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
                out.push(Action::Log(
                    "the primary lost the replication link and asks us to step aside: data Outdated until we resync from it".into(),
                ));
                self.disk = DiskState::Outdated;
                self.promote_alone = false;
            }
        }
        if seen.serving && self.role == Role::Primary && self.conn != ConnState::Connected {
            if self.alone {
                // This node passed the gate (or the operator promoted it): the peer is a
                // primary that woke up and will step down when it hears us, or a true split
                // that multiple-mount protection and the handshake report. Stay.
                out.push(Action::Log(
                    "the peer says it serves this resource too; this node serves by the promotion gate and stays".into(),
                ));
                return;
            }
            out.push(Action::Log(
                "the peer serves this resource and this node cannot prove it may: demoting".into(),
            ));
            self.role = Role::Secondary;
            self.alone = false;
            self.fencing_peer = false;
            self.promote_alone = false;
            if self.disk == DiskState::UpToDate {
                // The peer's data is the newer now.
                self.disk = DiskState::Outdated;
            }
        }
    }

    pub(super) fn wire_checked(&mut self, answered: bool, out: &mut Vec<Action>) {
        if self.wire != Wire::Checking {
            return;
        }
        if answered {
            self.wire = Wire::Answered(self.now);
            out.push(Action::Log(
                "wire guard: another MAC answers this resource's shelf.slot; not serving alone"
                    .into(),
            ));
            // Somebody serves without us: whatever it acknowledges, we lack. Were we to pass
            // the gate once it is gone, we would serve without its writes.
            if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
                out.push(Action::Log(
                    "another node serves this resource without us: data Outdated until we resync from it".into(),
                ));
                self.disk = DiskState::Outdated;
            }
            self.promote_alone = false;
            if self.role == Role::Primary && self.conn != ConnState::Connected {
                out.push(Action::Log(
                    "another node serves this resource and this node cannot prove it may: demoting"
                        .into(),
                ));
                self.role = Role::Secondary;
                self.alone = false;
                self.fencing_peer = false;
            }
        } else if self.peer_silent() {
            self.wire = Wire::Clear;
            out.push(Action::Log(
                "wire guard: nobody else answers this resource's shelf.slot".into(),
            ));
        } else {
            self.wire = Wire::Unasked;
        }
    }

    /// The process stood still (SIGSTOP, a hung kernel): longer than a lease, and the peer
    /// may have passed its gate, served and died since.
    pub(super) fn stood_still(&mut self, length: std::time::Duration, out: &mut Vec<Action>) {
        let lease = self.config.heartbeat_dead_time * 2 / 3;
        if self.config.fencing != Fencing::ResourceOnly
            || length < lease
            || self.may_have_been_replaced
        {
            return;
        }
        out.push(Action::Log(format!(
            "this node stood still for {length:?}: the peer may have served meanwhile; not serving alone until it is met again or the operator says `primary`"
        )));
        self.may_have_been_replaced = true;
    }

    pub(super) fn rival_answered(&mut self, out: &mut Vec<Action>) {
        // Only a node that answers has a rival; one whose gate is shut hears its successor.
        if !self.serving || self.authority() == Authority::Closed {
            return;
        }
        out.push(Action::Log(
            "another MAC answers this resource's shelf.slot: stopping (multiple-mount protection); `primary` resumes".into(),
        ));
        out.push(Action::Notify(Notification::Rival));
        self.role = Role::Secondary;
        self.alone = false;
        self.fencing_peer = false;
        self.promote_alone = false;
        self.held_secondary = true;
        self.rival = true;
    }

    pub(super) fn service_failed(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Primary {
            return;
        }
        out.push(Action::Log(
            "the service could not start: demoting; `primary` tries again".into(),
        ));
        out.push(Action::Notify(Notification::Change {
            object: "resource",
            key: "service",
            value: "failed".into(),
        }));
        self.role = Role::Secondary;
        self.alone = false;
        self.fencing_peer = false;
        self.promote_alone = false;
        self.held_secondary = true;
    }
}
