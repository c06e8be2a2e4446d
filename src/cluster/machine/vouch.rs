//! The fence command's vouch (`[cluster] fence-peer`, DRBD's fence-peer handler), as
//! `Machine` methods, and the `outdate` command it usually ends in on the other node.
//!
//! With a fence command configured, it is one more condition of the one promotion gate
//! ([`Machine::gate_passed`]): a node that lost its peer and passed the other conditions (the
//! peer silent on every path, the wire guard clear) runs the command ([`Action::FencePeer`])
//! and serves alone only when it exits 4 (the peer persisted Outdated) or 7 (the peer was
//! fenced: powered off). That covers both moments a node would serve without its peer:
//!
//! * a Secondary's promotion that no peer confirmed (failover), and
//! * a Primary that lost the replication link and would acknowledge writes the peer lacks —
//!   unless the peer persisted `Outdated` at our request over a heartbeat path: that is the
//!   peer's own confirmation, and the command is not run (it is not run at all while the peer
//!   is heard anywhere: then the peer answers the request itself).
//!
//! Any other outcome (5 = unreachable, another code, a signal, the timeout) refuses: the node
//! does not serve alone, says why, and tries again after [`Config::fence_retry`] while the
//! need lasts — asking the wire guard again first, so a node that meanwhile took over is seen
//! rather than fenced. A vouch holds only for the silence it was obtained in: once the peer is
//! heard (on a path or the link), it is forgotten, and a result that arrives after that is
//! ignored. Under `fencing = dont-care` none of this applies.
//!
//! # The witness (`[cluster] witness`)
//!
//! The same pattern, one condition later: once the other conditions hold (and the fence
//! command, if configured, vouched), the node claims the resource from its current data
//! generation at the witness ([`Action::AskWitness`]) and serves alone only when it is
//! *granted*. Held (another node holds that generation) is final for that generation: the
//! holder serves, or served, without us; our data is Outdated until we resync from it (a
//! primary demotes), logged with the holder's name. Unreachable refuses, and the claim is sent
//! again after [`Config::witness_retry`] while the need lasts (the wire guard first). A grant
//! belongs to the silence it was obtained in, like the fence command's vouch; a claim again
//! for the same generation is granted again, so forgetting it costs nothing. Because every node
//! that would serve alone must hold the grant for the generation it serves from, a node that
//! stood still (SIGSTOP) need not wait for the handshake: a grant proves that nobody served
//! alone from its generation meanwhile; a refusal tells it somebody did.

use super::*;

/// Where the claim at the witness stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Witness {
    /// Not claimed in this silence of the peer.
    Unasked,
    /// Sent; `stale` once the peer was heard meanwhile (its verdict then counts for nothing
    /// but a refusal).
    Asking {
        /// The peer was heard since the claim went out.
        stale: bool,
    },
    /// This generation is ours to serve alone from.
    Granted(u64),
    /// No verdict, at this time: claimed again after the back-off.
    Unreachable(Instant),
}

/// Where the fence command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vouch {
    /// Not run in this silence of the peer.
    Unasked,
    /// Running; `stale` once the peer was heard meanwhile (its result is then ignored).
    Running {
        /// The peer was heard since it started.
        stale: bool,
    },
    /// Exit 4 or 7: the peer cannot serve.
    Vouched(FenceOutcome),
    /// Any other outcome, at this time: tried again after the back-off.
    Refused(FenceOutcome, Instant),
}

impl Machine {
    /// The fence command's condition of the promotion gate: met when none is configured, or
    /// when it vouched for the peer in this silence.
    pub(super) fn fence_vouched(&self) -> bool {
        !self.config.fence_peer || matches!(self.vouch, Vouch::Vouched(_))
    }

    /// The witness's condition of the promotion gate: met when none is configured, or when it
    /// granted our generation in this silence.
    pub(super) fn witness_granted(&self) -> bool {
        !self.config.witness || matches!(self.witness, Witness::Granted(_))
    }

    /// Standing still leaves it open whether the peer served meanwhile — unless a witness is
    /// configured: then its verdict on our generation answers exactly that.
    pub(super) fn replaced_unknown(&self) -> bool {
        self.may_have_been_replaced && !self.config.witness
    }

    /// What let this node through the gate, for the log: the silence, the wire guard and, with
    /// a fence command, its exit; with a witness, its grant.
    pub(super) fn gate_reason(&self) -> String {
        if self.config.fencing == Fencing::DontCare {
            return "no peer, UpToDate data".into();
        }
        let mut why =
            String::from("the peer is silent on every path and nobody answers its shelf.slot");
        if let Vouch::Vouched(outcome) = self.vouch {
            if self.config.fence_peer {
                why += &format!("; {outcome}");
            }
        }
        if let Witness::Granted(generation) = self.witness {
            if self.config.witness {
                why += &format!("; witness granted generation {generation:016X}");
            }
        }
        why
    }

    /// A Secondary promotes through the gate (failover).
    pub(super) fn auto_promote_alone(&mut self, out: &mut Vec<Action>) {
        if !self.gate_passed() {
            return;
        }
        out.push(Action::Log(format!("auto-promote: {}", self.gate_reason())));
        self.promote(out);
    }

    /// Once per step, before the gate is looked at: a vouch is forgotten once the peer is
    /// heard; a refusal's back-off, once over, lets the wire guard and then the command be
    /// asked again.
    pub(super) fn renew_vouch(&mut self) {
        if !self.peer_silent() {
            self.vouch = match self.vouch {
                Vouch::Running { .. } => Vouch::Running { stale: true },
                _ => Vouch::Unasked,
            };
            self.witness = match self.witness {
                Witness::Asking { .. } => Witness::Asking { stale: true },
                _ => Witness::Unasked,
            };
            return;
        }
        if let Witness::Unreachable(at) = self.witness {
            if self.now.saturating_duration_since(at) >= self.config.witness_retry {
                self.witness = Witness::Unasked;
                if self.wire == Wire::Clear {
                    self.wire = Wire::Unasked;
                }
            }
        }
        if let Vouch::Refused(_, at) = self.vouch {
            if self.now.saturating_duration_since(at) >= self.config.fence_retry {
                self.vouch = Vouch::Unasked;
                if self.wire == Wire::Clear {
                    self.wire = Wire::Unasked;
                }
            }
        }
    }

    /// The wire guard found nobody else answering and this node would serve alone: run the
    /// fence command if it is configured and has not run in this silence.
    pub(super) fn ask_fence(&mut self, out: &mut Vec<Action>) {
        if !self.config.fence_peer
            || self.vouch != Vouch::Unasked
            || self.wire != Wire::Clear
            || self.rival
            || self.replaced_unknown()
        {
            return;
        }
        out.push(Action::Log(
            "the peer is silent on every path and nobody answers its shelf.slot: running the fence command".into(),
        ));
        self.vouch = Vouch::Running { stale: false };
        out.push(Action::FencePeer);
    }

    /// The wire guard found nobody else answering, the fence command (if any) vouched, and
    /// this node would serve alone: claim our generation at the witness.
    pub(super) fn ask_witness(&mut self, out: &mut Vec<Action>) {
        if !self.config.witness
            || self.witness != Witness::Unasked
            || self.wire != Wire::Clear
            || !self.fence_vouched()
            || self.rival
        {
            return;
        }
        out.push(Action::Log(
            "the peer is silent on every path and nobody answers its shelf.slot: claiming our generation at the witness".into(),
        ));
        self.witness = Witness::Asking { stale: false };
        out.push(Action::AskWitness);
    }

    pub(super) fn witness_answered(
        &mut self,
        generation: u64,
        verdict: WitnessVerdict,
        out: &mut Vec<Action>,
    ) {
        let Witness::Asking { stale } = self.witness else {
            out.push(Action::Log(format!(
                "witness: a verdict on generation {generation:016X} ignored, not asked for"
            )));
            return;
        };
        let word = match verdict {
            WitnessVerdict::Granted => "granted".to_string(),
            WitnessVerdict::Held(holder) => format!("held-by-{holder}"),
            WitnessVerdict::Unreachable => "unreachable".to_string(),
        };
        out.push(Action::Notify(Notification::Change {
            object: "resource",
            key: "witness",
            value: format!("{word}:{generation:016X}"),
        }));
        match verdict {
            WitnessVerdict::Granted if stale => {
                self.witness = Witness::Unasked;
                out.push(Action::Log(format!(
                    "witness granted generation {generation:016X}: not used, the peer was heard meanwhile"
                )));
            }
            WitnessVerdict::Granted => {
                self.witness = Witness::Granted(generation);
                out.push(Action::Log(format!(
                    "witness granted generation {generation:016X}: this node may serve alone"
                )));
            }
            WitnessVerdict::Held(holder) if stale => {
                // The peer was heard since: the handshake or the heartbeat settles it; the
                // next silence claims again and hears the same.
                self.witness = Witness::Unasked;
                out.push(Action::Log(format!(
                    "witness: generation {generation:016X} held by {holder}; the peer was heard meanwhile"
                )));
            }
            WitnessVerdict::Held(holder) => {
                // Final for this generation: the holder serves (or served) without us, and
                // whatever it acknowledged we lack.
                self.witness = Witness::Unasked;
                out.push(Action::Log(format!(
                    "witness: generation {generation:016X} held by {holder}: not serving alone"
                )));
                if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
                    out.push(Action::Log(format!(
                        "{holder} serves this resource without us: data Outdated until we resync from it"
                    )));
                    self.disk = DiskState::Outdated;
                }
                self.promote_alone = false;
                if self.role == Role::Primary && self.conn != ConnState::Connected {
                    out.push(Action::Log(format!(
                        "{holder} holds the witness's grant and this node cannot prove it may serve: demoting"
                    )));
                    self.role = Role::Secondary;
                    self.alone = false;
                    self.fencing_peer = false;
                }
            }
            WitnessVerdict::Unreachable => {
                self.witness = if stale {
                    Witness::Unasked
                } else {
                    Witness::Unreachable(self.now)
                };
                out.push(Action::Log(format!(
                    "witness unreachable: not serving alone; trying again in {:?} while the peer stays silent",
                    self.config.witness_retry
                )));
            }
        }
    }

    pub(super) fn fence_result(&mut self, outcome: FenceOutcome, out: &mut Vec<Action>) {
        match self.vouch {
            Vouch::Running { stale: false } => {}
            Vouch::Running { stale: true } => {
                self.vouch = Vouch::Unasked;
                out.push(Action::Log(format!(
                    "{outcome}: ignored, the peer was heard while it ran"
                )));
                return;
            }
            _ => {
                out.push(Action::Log(format!("{outcome}: ignored, not asked for")));
                return;
            }
        }
        let vouches = outcome.vouches();
        out.push(Action::Notify(Notification::Change {
            object: "resource",
            key: "fence-peer",
            value: format!(
                "{}:{}",
                if vouches { "vouched" } else { "refused" },
                outcome.word()
            ),
        }));
        if vouches {
            self.vouch = Vouch::Vouched(outcome);
            out.push(Action::Log(format!(
                "{outcome}: the peer cannot serve; this node may serve alone"
            )));
        } else {
            self.vouch = Vouch::Refused(outcome, self.now);
            out.push(Action::Log(format!(
                "{outcome}: not serving alone; trying again in {:?} while the peer stays silent",
                self.config.fence_retry
            )));
        }
    }

    /// `outdate` (DRBD's `drbdadm outdate`): a Secondary not connected to a Primary persists
    /// `Outdated` and will not promote itself until it resyncs from the peer.
    pub(super) fn outdate(&mut self, c: Command, out: &mut Vec<Action>) {
        let refuse = |reason| Action::Refuse { command: c, reason };
        if self.role == Role::Primary {
            return out.push(refuse(Refusal::IsPrimary));
        }
        if self.linked() && self.peer_role == Role::Primary {
            return out.push(refuse(Refusal::PeerIsPrimary));
        }
        match self.disk {
            DiskState::UpToDate | DiskState::Consistent => {
                out.push(Action::Log(
                    "outdate: data Outdated until we resync from the peer; this node will not promote itself".into(),
                ));
                self.disk = DiskState::Outdated;
                self.promote_alone = false;
            }
            DiskState::Outdated => out.push(Action::Log("already Outdated".into())),
            d => out.push(Action::Log(format!(
                "data is {d}: it cannot be promoted anyway"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> Config {
        Config {
            fence_peer: true,
            ..Config::default()
        }
    }

    /// A Secondary with UpToDate data under `config` whose peer (a Primary) was just lost:
    /// silent on every path, after the takeover delay, the wire guard clear. Returns what the
    /// guard's answer made the machine do.
    fn lost_primary_under(config: Config) -> (Machine, Instant, Vec<Action>) {
        let now = Instant::now();
        let (mut m, _) = Machine::new(config, Startup::consistent(), now);
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
                peer_role: Role::Primary,
                peer_disk: DiskState::UpToDate,
            },
        );
        m.step(now, Event::PeerHeard(None));
        m.step(now, Event::PeerLost);
        let now = now + Duration::from_secs(1);
        m.step(now, Event::PeerSilent);
        let now = now + Duration::from_secs(1);
        let out = m.step(now, Event::Tick);
        assert!(out.contains(&Action::CheckWire), "{out:?}");
        let out = m.step(now, Event::WireChecked { answered: false });
        (m, now, out)
    }

    /// [`lost_primary_under`] with a fence command: the command is running.
    fn lost_primary() -> (Machine, Instant) {
        let (m, now, out) = lost_primary_under(config());
        assert!(out.contains(&Action::FencePeer), "{out:?}");
        assert_eq!(
            m.status().role,
            Role::Secondary,
            "not before the command vouched"
        );
        (m, now)
    }

    #[test]
    fn promotes_only_on_exit_4_or_7_and_says_why() {
        for (outcome, promotes) in [
            (FenceOutcome::Exit(4), true),
            (FenceOutcome::Exit(7), true),
            (FenceOutcome::Exit(5), false),
            (FenceOutcome::Exit(3), false),
            (FenceOutcome::Exit(1), false),
            (FenceOutcome::Signal(9), false),
            (FenceOutcome::TimedOut, false),
            (FenceOutcome::CouldNotRun, false),
        ] {
            let (mut m, now) = lost_primary();
            let out = m.step(now, Event::FenceResult { outcome });
            assert_eq!(m.status().role == Role::Primary, promotes, "{outcome}");
            let logs: Vec<&String> = out
                .iter()
                .filter_map(|a| match a {
                    Action::Log(l) => Some(l),
                    _ => None,
                })
                .collect();
            if promotes {
                assert!(
                    logs.iter().any(
                        |l| l.starts_with("auto-promote: ") && l.contains(&outcome.to_string())
                    ),
                    "{logs:?}"
                );
            } else {
                assert!(
                    logs.iter()
                        .any(|l| l.contains(&format!("{outcome}: not serving alone"))),
                    "{logs:?}"
                );
            }
        }
    }

    #[test]
    fn a_refusal_is_retried_after_the_back_off_with_the_wire_asked_first() {
        let (mut m, now) = lost_primary();
        m.step(
            now,
            Event::FenceResult {
                outcome: FenceOutcome::Exit(5),
            },
        );
        let retry = m.config().fence_retry;
        let out = m.step(now + retry / 2, Event::Tick);
        assert!(!out.contains(&Action::FencePeer) && !out.contains(&Action::CheckWire));
        let later = now + retry;
        let out = m.step(later, Event::Tick);
        assert!(out.contains(&Action::CheckWire), "{out:?}");
        let out = m.step(later, Event::WireChecked { answered: false });
        assert!(out.contains(&Action::FencePeer), "{out:?}");
        m.step(
            later,
            Event::FenceResult {
                outcome: FenceOutcome::Exit(7),
            },
        );
        assert_eq!(m.status().role, Role::Primary);
    }

    #[test]
    fn a_result_after_the_peer_was_heard_is_ignored() {
        let (mut m, now) = lost_primary();
        m.step(now, Event::PeerHeard(None));
        let out = m.step(
            now,
            Event::FenceResult {
                outcome: FenceOutcome::Exit(7),
            },
        );
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Log(l) if l.contains("ignored"))));
        // Silent again: the old vouch does not count, the command runs again.
        let now = now + Duration::from_secs(2);
        m.step(now, Event::PeerSilent);
        assert_eq!(m.status().role, Role::Secondary);
        let now = now + Duration::from_secs(1);
        let out = m.step(now, Event::Tick);
        assert!(out.contains(&Action::CheckWire), "{out:?}");
        let out = m.step(now, Event::WireChecked { answered: false });
        assert!(out.contains(&Action::FencePeer), "{out:?}");
        assert_eq!(m.status().role, Role::Secondary);
    }

    #[test]
    fn dont_care_ignores_the_command() {
        let now = Instant::now();
        let (mut m, _) = Machine::new(
            Config {
                fencing: Fencing::DontCare,
                wfc_timeout: Some(Duration::from_secs(1)),
                degr_wfc_timeout: Some(Duration::from_secs(1)),
                ..config()
            },
            Startup {
                degraded: true,
                ..Startup::consistent()
            },
            now,
        );
        let out = m.step(now + Duration::from_secs(2), Event::Tick);
        assert!(!out.contains(&Action::FencePeer), "{out:?}");
        assert_eq!(m.status().role, Role::Primary);
    }

    /// A Secondary with a witness (and no fence command) whose primary was just lost: the
    /// wire guard is clear and the claim is out.
    fn lost_primary_with_a_witness() -> (Machine, Instant) {
        let (m, now, out) = lost_primary_under(Config {
            witness: true,
            ..Config::default()
        });
        assert!(out.contains(&Action::AskWitness), "{out:?}");
        assert!(!out.contains(&Action::FencePeer), "{out:?}");
        assert_eq!(m.status().role, Role::Secondary, "not before the grant");
        (m, now)
    }

    #[test]
    fn the_witness_decides_granted_held_or_unreachable() {
        let answered = |verdict| {
            let (mut m, now) = lost_primary_with_a_witness();
            let out = m.step(
                now,
                Event::WitnessAnswered {
                    generation: 0x1A2B,
                    verdict,
                },
            );
            (m, now, out)
        };
        let (m, _, out) = answered(WitnessVerdict::Granted);
        assert_eq!(m.status().role, Role::Primary);
        assert!(out.contains(&Action::NewCurrentUuid), "{out:?}");
        assert!(out.iter().any(|a| matches!(a, Action::Log(l)
            if l.starts_with("auto-promote: ") && l.ends_with("witness granted generation 0000000000001A2B"))), "{out:?}");

        let (mut m, now, out) = answered(WitnessVerdict::Held(NodeName::new("alpha")));
        assert_eq!(m.status().role, Role::Secondary);
        assert_eq!(m.status().disk, DiskState::Outdated);
        assert!(out.contains(&Action::Log(
            "witness: generation 0000000000001A2B held by alpha: not serving alone".into()
        )));
        // Never again from that generation: nothing more is asked.
        let out = m.step(now + Duration::from_secs(30), Event::Tick);
        assert!(!out.contains(&Action::AskWitness) && !out.contains(&Action::CheckWire));

        let (mut m, now, _) = answered(WitnessVerdict::Unreachable);
        assert_eq!(m.status().role, Role::Secondary);
        let retry = m.config().witness_retry;
        let out = m.step(now + retry / 2, Event::Tick);
        assert!(!out.contains(&Action::AskWitness) && !out.contains(&Action::CheckWire));
        let later = now + retry;
        let out = m.step(later, Event::Tick);
        assert!(
            out.contains(&Action::CheckWire),
            "the wire guard first: {out:?}"
        );
        let out = m.step(later, Event::WireChecked { answered: false });
        assert!(out.contains(&Action::AskWitness), "{out:?}");
        m.step(
            later,
            Event::WitnessAnswered {
                generation: 0x1A2B,
                verdict: WitnessVerdict::Granted,
            },
        );
        assert_eq!(m.status().role, Role::Primary);
    }

    #[test]
    fn a_grant_after_the_peer_was_heard_is_not_used() {
        let (mut m, now) = lost_primary_with_a_witness();
        m.step(now, Event::PeerHeard(None));
        m.step(
            now,
            Event::WitnessAnswered {
                generation: 1,
                verdict: WitnessVerdict::Granted,
            },
        );
        assert_eq!(m.status().role, Role::Secondary);
        let out = m.step(
            now,
            Event::WitnessAnswered {
                generation: 1,
                verdict: WitnessVerdict::Granted,
            },
        );
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Log(l) if l.contains("not asked for"))));
    }

    #[test]
    fn outdate_on_a_disconnected_secondary_only() {
        let now = Instant::now();
        let (mut m, _) = Machine::new(config(), Startup::consistent(), now);
        let out = m.step(now, Event::Command(Command::Outdate));
        assert_eq!(m.status().disk, DiskState::Outdated);
        assert!(
            out.contains(&Action::PersistFlags {
                set: crate::wire::ondisk::flags::OUTDATED,
                clear: 0
            }),
            "{out:?}"
        );
        let (mut p, _) = Machine::new(config(), Startup::consistent(), now);
        p.step(now, Event::Command(Command::Primary { force: true }));
        let out = p.step(now, Event::Command(Command::Outdate));
        assert!(out.contains(&Action::Refuse {
            command: Command::Outdate,
            reason: Refusal::IsPrimary
        }));
        assert_eq!(p.status().disk, DiskState::UpToDate);
    }
}
