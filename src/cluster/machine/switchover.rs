//! Planned switchover: the primary role moves to the connected, UpToDate peer with nothing
//! lost — the operator's `switchover`, a returning preferred node's `auto-failback`, or a
//! primary that reaches fewer ping targets than its peer.
//!
//! The handover runs over the heartbeat's resource flags, so it needs no message of its own:
//!
//! 1. The primary stops serving (the exports stop, the floating IP goes: nothing is answered
//!    from here any more), demotes, and sends its new role on the replication link; its
//!    heartbeat says *handing over*. Every write it acknowledged is on the peer already
//!    (protocol C, connected, UpToDate).
//! 2. The secondary promotes once the peer is Secondary on the link **and** its heartbeat says
//!    it hands over and does not serve. Both orders of arrival work; neither alone suffices.
//! 3. If the peer has not promoted within [`HANDOVER_TIMEOUT`], the old primary (still
//!    connected and UpToDate) takes the role back: a switchover never leaves the pair without
//!    a primary. A lost connection ends the handover; the usual failover rules take over.
//!
//! A secondary asks for a switchover by the heartbeat flag *wants switchover*; the primary
//! answers with step 1 when it is connected to that secondary and the secondary is UpToDate.
//!
//! Failback: with `auto_failback`, the preferred node, connected and UpToDate (no resync
//! running) while the peer serves, asks for a switchover once that has held for
//! `failback_delay`. Not after the operator moved the role away by hand (`secondary` or
//! `switchover` on this node): that holds until the operator's next `primary` or `switchover`.

use super::*;
use std::time::Duration;

/// How long a primary that stepped down waits for its peer to promote before it takes the
/// role back.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a secondary's request stays up before it is given up.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a switchover started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The operator's `switchover` (on either node).
    Operator,
    /// The preferred node came back and `auto-failback` is on.
    Failback,
    /// The primary reaches fewer ping targets than its peer.
    Ping,
}

impl std::fmt::Display for SwitchoverReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SwitchoverReason::Operator => "the operator's switchover",
            SwitchoverReason::Failback => "auto-failback",
            SwitchoverReason::Ping => "ping targets",
        })
    }
}

/// A switchover under way on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// This node (the old primary) stepped down for the peer at `since`.
    Giving {
        /// When it stepped down.
        since: Instant,
        /// Why.
        why: SwitchoverReason,
    },
    /// This node (a secondary) asked the primary to step down at `since`.
    Asking {
        /// When it asked.
        since: Instant,
        /// Why.
        why: SwitchoverReason,
    },
}

impl Machine {
    /// The pair is in a state to move the primary role: connected, replication established,
    /// both disks UpToDate.
    pub(super) fn switchable(&self) -> bool {
        self.conn == ConnState::Connected
            && self.repl == ReplState::Established
            && self.disk == DiskState::UpToDate
            && self.peer_disk == DiskState::UpToDate
    }

    /// `switchover`, on either node.
    pub(super) fn switchover_command(&mut self, out: &mut Vec<Action>) {
        let c = Command::Switchover;
        let refuse = |reason, out: &mut Vec<Action>| {
            out.push(Action::Refuse { command: c, reason });
        };
        if self.handover.is_some() {
            return refuse(Refusal::SwitchoverRunning, out);
        }
        if self.conn != ConnState::Connected || self.repl != ReplState::Established {
            return refuse(
                if matches!(self.repl, ReplState::SyncTarget | ReplState::PausedSyncT) {
                    Refusal::SyncTarget
                } else {
                    Refusal::NotConnected
                },
                out,
            );
        }
        if self.disk != DiskState::UpToDate {
            return refuse(Refusal::NotUpToDate(self.disk), out);
        }
        if self.peer_disk != DiskState::UpToDate {
            return refuse(Refusal::PeerNotUpToDate, out);
        }
        match (self.role, self.peer_role) {
            (Role::Primary, _) => self.give_over(SwitchoverReason::Operator, out),
            (_, Role::Primary) => {
                // Asked by hand: whatever held this node back no longer does.
                self.held_secondary = false;
                self.ask_over(SwitchoverReason::Operator, out);
            }
            _ => refuse(Refusal::NoPrimary, out),
        }
    }

    /// Step 1: stop serving and demote, for the peer to take over.
    pub(super) fn give_over(&mut self, why: SwitchoverReason, out: &mut Vec<Action>) {
        out.push(Action::Log(format!(
            "switchover ({why}): stepping down for the peer"
        )));
        self.role = Role::Secondary;
        self.alone = false;
        self.fencing_peer = false;
        self.promote_alone = false;
        // Moved away on purpose: no failback (nor automatic promotion while connected) until
        // the operator says otherwise. Ping targets only move the role where clients are:
        // auto-failback, if configured, may bring it back.
        self.held_secondary = why != SwitchoverReason::Ping;
        self.failback_since = None;
        self.handover = Some(Handover::Giving {
            since: self.now,
            why,
        });
    }

    /// A secondary asks its primary to hand over.
    pub(super) fn ask_over(&mut self, why: SwitchoverReason, out: &mut Vec<Action>) {
        out.push(Action::Log(format!(
            "switchover ({why}): asking the peer to hand over"
        )));
        self.handover = Some(Handover::Asking {
            since: self.now,
            why,
        });
    }

    /// Runs after every event: answers the peer's flags, ends or times out a handover, and
    /// starts a failback when it is due.
    pub(super) fn follow_switchover(&mut self, out: &mut Vec<Action>) {
        let seen = self.peer_seen();
        if self.conn != ConnState::Connected {
            if let Some(h) = self.handover.take() {
                out.push(Action::Log(format!(
                    "switchover ended: the connection to the peer is gone ({h:?})"
                )));
            }
            self.failback_since = None;
            return;
        }
        match self.handover {
            Some(Handover::Giving { since, why }) => {
                if self.peer_role == Role::Primary {
                    out.push(Action::Log(format!(
                        "switchover ({why}): the peer is primary"
                    )));
                    self.handover = None;
                } else if self.now.saturating_duration_since(since) >= HANDOVER_TIMEOUT {
                    self.handover = None;
                    if self.switchable() {
                        out.push(Action::Log(format!(
                            "switchover ({why}): the peer did not take over within {} s; primary again",
                            HANDOVER_TIMEOUT.as_secs()
                        )));
                        self.held_secondary = false;
                        self.promote(out);
                    }
                }
            }
            Some(Handover::Asking { since, why }) => {
                if self.role == Role::Primary {
                    self.handover = None;
                } else if self.now.saturating_duration_since(since) >= ASK_TIMEOUT {
                    out.push(Action::Log(format!(
                        "switchover ({why}): the peer did not hand over within {} s",
                        ASK_TIMEOUT.as_secs()
                    )));
                    self.handover = None;
                }
            }
            None => {}
        }
        // Step 2: the peer stepped down for us.
        if self.role == Role::Secondary
            && self.peer_role == Role::Secondary
            && matches!(self.handover, None | Some(Handover::Asking { .. }))
            && seen.is_some_and(|p| p.handing_over && !p.serving && p.role != Role::Primary)
            && self.repl == ReplState::Established
            && self.disk == DiskState::UpToDate
        {
            out.push(Action::Log(
                "switchover: the peer handed over; taking over".into(),
            ));
            self.handover = None;
            self.promote(out);
            return;
        }
        // The peer asks us to step down.
        if self.role == Role::Primary
            && self.handover.is_none()
            && seen.is_some_and(|p| p.wants_switchover && p.role == Role::Secondary)
            && self.switchable()
        {
            out.push(Action::Log(
                "switchover: the peer asks for the primary role".into(),
            ));
            self.give_over(SwitchoverReason::Operator, out);
            return;
        }
        self.failback(out);
    }

    /// `auto-failback`: the preferred node takes its resource back once it has been connected
    /// and UpToDate for `failback_delay` while the peer serves.
    fn failback(&mut self, out: &mut Vec<Action>) {
        let due = self.config.auto_failback
            && self.config.preferred_primary
            && self.config.auto_promote
            && self.role == Role::Secondary
            && self.peer_role == Role::Primary
            && !self.held_secondary
            && self.handover.is_none()
            && self.switchable()
            && !self.reaches_fewer();
        if !due {
            self.failback_since = None;
            return;
        }
        let since = *self.failback_since.get_or_insert(self.now);
        if self.now.saturating_duration_since(since) >= self.config.failback_delay {
            self.failback_since = None;
            self.ask_over(SwitchoverReason::Failback, out);
        }
    }

    /// While this node hands over, it must not promote itself again (the preferred node
    /// would, at once: nobody is primary for a moment).
    pub(super) fn giving_over(&self) -> bool {
        matches!(self.handover, Some(Handover::Giving { .. }))
    }
}
