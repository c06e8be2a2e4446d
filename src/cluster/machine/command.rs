//! The operator's commands, as `Machine` methods: `primary` (with `--force`), `secondary`,
//! `connect`, `disconnect`, `invalidate`, `invalidate-remote`, pausing and resuming a resync,
//! what each refuses and why, and the promotion they share with automatic promotion.

use super::*;

impl Machine {
    fn refuse(command: Command, reason: Refusal, out: &mut Vec<Action>) {
        out.push(Action::Refuse { command, reason });
    }

    pub(super) fn command(&mut self, c: Command, out: &mut Vec<Action>) {
        let connected = self.conn == ConnState::Connected;
        match c {
            Command::Primary { .. } if self.giving_over() => {
                // The peer may be promoting this very moment.
                Self::refuse(c, Refusal::SwitchoverRunning, out)
            }
            Command::Primary { force } => {
                self.held_secondary = false;
                if self.role == Role::Primary {
                    out.push(Action::Log("already primary".into()));
                    return;
                }
                if self.linked() && self.peer_role == Role::Primary {
                    return Self::refuse(c, Refusal::PeerIsPrimary, out);
                }
                if !self.linked() && self.peer_seen().is_some_and(|p| p.serving) {
                    return Self::refuse(c, Refusal::PeerIsPrimary, out);
                }
                self.rival = false;
                self.may_have_been_replaced = false;
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
                self.alone = false;
                self.fencing_peer = false;
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
            Command::Outdate => self.outdate(c, out),
            Command::Switchover => self.switchover_command(out),
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

    pub(super) fn promote(&mut self, out: &mut Vec<Action>) {
        self.role = Role::Primary;
        self.promote_alone = false;
        self.held_secondary = false;
        if self.conn != ConnState::Connected {
            // A new generation: whatever the peer holds is now older.
            out.push(Action::NewCurrentUuid);
            self.marked_without_generation = false;
            self.degraded = true;
            // Promoted without the peer: through the promotion gate, or by the operator.
            self.alone = true;
        }
        out.push(Action::Log("promoted to primary".into()));
    }
}
