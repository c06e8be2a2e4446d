//! Meeting the peer, as `Machine` methods: its terms (size, shared settings), the transport
//! coming up, the UUID handshake's decision (connect, resync, or stand alone), and what the
//! peer says afterwards (its role and disk, the resyncs it starts).

use super::*;

impl Machine {
    pub(super) fn peer_offered(&mut self, ours: Terms, theirs: Terms, out: &mut Vec<Action>) {
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

    pub(super) fn peer_connected(&mut self, now: Instant, out: &mut Vec<Action>) {
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

    pub(super) fn handshake(
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
                self.alone = false;
                self.fencing_peer = false;
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
        self.alone = false;
        self.fencing_peer = false;
        self.may_have_been_replaced = false;
        let marked = std::mem::take(&mut self.marked_without_generation);
        match decision.direction() {
            None if marked && consistent(self.disk) && consistent(peer_disk) => {
                // Same UUIDs, but our bitmap holds writes the peer never got: they go to it.
                out.push(Action::Log(
                    "writes the peer lacks are marked out of sync here: resyncing them to it"
                        .into(),
                ));
                self.repl = ReplState::Established;
                self.disk = DiskState::UpToDate;
                self.start_resync(SyncDirection::Source, false, true, out);
            }
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

    pub(super) fn peer_state(&mut self, role: Role, disk: DiskState, out: &mut Vec<Action>) {
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
            self.stop_resync_without_a_disk();
            if self.role == Role::Primary && self.disk != DiskState::Diskless {
                out.push(Action::MarkOutOfSync);
                out.push(Action::NewCurrentUuid);
                // The new generation for a diskless peer: started here, not again in finish.
                self.peer_diskless_generation = true;
                self.degraded = true;
            }
        }
        self.peer_role = role;
        self.peer_disk = disk;
    }

    pub(super) fn peer_started_resync(
        &mut self,
        direction: SyncDirection,
        full: bool,
        out: &mut Vec<Action>,
    ) {
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
}
