//! Two simulated nodes (`twinblade::cluster::sim`): roles, failover, split brain, startup
//! waits, ko-count and disk failure, with explicit time and link faults.
//!
//! The split-brain and link-timeout tests run with `fencing = dont-care` (DRBD's old default,
//! still supported): a node that loses the replication link acts at once, which is what makes
//! a split brain on purpose. The failover timing and the safety properties under the default
//! `resource-only` fencing are in `cluster_failover.rs`.

use std::time::Duration;
use twinblade::cluster::machine::Notification;
use twinblade::cluster::sim::{Pair, STEP};
use twinblade::cluster::{
    Action, Command, Config, ConnState, DisconnectReason, DiskState, Fencing, Refusal, ReplState,
    Role, Startup,
};
use twinblade::repl::uuid::UuidSet;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A pair like [`Pair::healthy`], but under `fencing = dont-care`.
fn dont_care_pair() -> Pair {
    let uuids = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let dont_care = Config {
        fencing: Fencing::DontCare,
        ..Config::default()
    };
    Pair::new(
        [
            Config {
                preferred_primary: true,
                ..dont_care.clone()
            },
            dont_care,
        ],
        [Startup::consistent(); 2],
        [uuids; 2],
    )
}

fn saw(pair: &Pair, n: usize, pred: impl Fn(&Action) -> bool) -> bool {
    pair.nodes[n].actions.iter().any(pred)
}

fn split_brain_seen(pair: &Pair, n: usize) -> bool {
    saw(pair, n, |a| {
        matches!(a, Action::Notify(Notification::SplitBrain(_)))
    })
}

fn resync_started(pair: &Pair, n: usize) -> bool {
    saw(pair, n, |a| matches!(a, Action::StartResync { .. }))
}

#[test]
fn exactly_one_node_serves_when_both_are_up() {
    let mut pair = Pair::healthy();
    for _ in 0..100 {
        pair.advance(Duration::from_millis(300));
        assert!(pair.serving_count() <= 1, "two nodes serve");
    }
    assert!(pair.is_connected());
    assert_eq!(pair.serving(), [true, false], "the preferred node serves");
    assert_eq!(pair.role(1), Role::Secondary);
    let s1 = pair.nodes[1].status();
    assert_eq!(
        (s1.disk, s1.peer_role, s1.peer_disk),
        (DiskState::UpToDate, Role::Primary, DiskState::UpToDate)
    );
    // The secondary is silent: it never started anything.
    assert!(!saw(&pair, 1, |a| *a == Action::StartServing));
    // Writes are mirrored.
    for b in 0..8 {
        pair.write(0, b).unwrap();
    }
    assert_eq!(pair.write(1, 0), None, "a secondary serves nothing");
    assert!(pair.in_sync());
}

#[test]
fn non_preferred_node_serves_while_the_preferred_one_resyncs() {
    // Node 1 wrote while node 0 was away: node 0 must become sync target, node 1 serves.
    let base = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let mut newer = base;
    newer.new_current(0x2000);
    let mut pair = Pair::new(
        [
            Config {
                preferred_primary: true,
                ..Config::default()
            },
            Config::default(),
        ],
        [Startup::consistent(); 2],
        [base, newer],
    );
    pair.advance(secs(1));
    assert_eq!(
        pair.nodes[0].status().repl,
        ReplState::Established,
        "resync finished"
    );
    assert_eq!(pair.serving(), [false, true]);
    pair.advance(secs(30));
    assert_eq!(
        pair.serving(),
        [false, true],
        "no preemption after the resync"
    );
    assert_eq!(pair.nodes[0].status().disk, DiskState::UpToDate);
}

#[test]
fn failover_and_crashed_primary_resyncs_its_activity_log() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    assert_eq!(pair.serving(), [true, false]);
    pair.write(0, 1).unwrap();
    // Node 0 crashes with a write on its disk that never reached node 1.
    pair.nodes[0].blocks[2] = 999;
    pair.nodes[0].bitmap.insert(2);
    pair.crash(0);
    // The close is seen at once, but node 1 waits until the heartbeat has been silent for its
    // dead time (1 s), gives a primary that might have lost the link too half a dead time to
    // answer first, and asks the wire guard.
    let dead_time = pair.nodes[1].machine.config().heartbeat_dead_time;
    pair.advance(dead_time + dead_time / 2 - STEP);
    assert_eq!(pair.serving(), [false, false], "no failover before that");
    pair.advance(2 * STEP);
    assert_eq!(pair.serving(), [false, true], "node 1 took over");
    assert!(saw(&pair, 1, |a| *a == Action::CheckWire));
    let v = pair.write(1, 3).unwrap();
    // Node 0 returns as a crashed primary; it waits, meets node 1 and becomes sync target.
    pair.restart(
        0,
        Config {
            preferred_primary: true,
            ..Config::default()
        },
        Startup {
            disk: DiskState::Consistent,
            crashed_primary: true,
            degraded: false,
        },
    );
    pair.advance(secs(3));
    assert!(pair.is_connected());
    assert!(saw(&pair, 0, |a| matches!(
        a,
        Action::StartResync {
            direction: twinblade::cluster::SyncDirection::Target,
            full: false,
            ..
        }
    )));
    assert!(
        pair.in_sync(),
        "the crashed primary's extra write was undone"
    );
    assert_eq!(pair.nodes[0].blocks[3], v);
    assert_eq!(pair.serving(), [false, true], "no preemption");
    assert!(!pair.nodes[0].status().crashed_primary);
}

#[test]
fn split_brain_made_on_purpose_is_detected_and_not_synced() {
    let mut pair = dont_care_pair();
    pair.advance(secs(1));
    pair.cut();
    pair.advance(secs(1));
    // Node 1 failed over by itself: both serve on their side of the partition.
    assert_eq!(pair.serving(), [true, true]);
    pair.write(0, 0).unwrap();
    pair.write(1, 1).unwrap();
    pair.restore();
    pair.advance(secs(2));
    for n in 0..2 {
        assert!(
            split_brain_seen(&pair, n),
            "node {n} did not see the split brain"
        );
        assert_eq!(pair.nodes[n].status().conn, ConnState::StandAlone);
        assert!(!resync_started(&pair, n), "split brain must not sync");
    }
    assert!(!pair.in_sync());
    pair.advance(secs(30));
    assert!(!pair.is_connected(), "StandAlone stays StandAlone");

    // Resolution: node 1 gives up its changes.
    pair.command(1, Command::Secondary);
    pair.command(
        1,
        Command::Connect {
            discard_my_data: true,
        },
    );
    pair.command(
        0,
        Command::Connect {
            discard_my_data: false,
        },
    );
    pair.advance(secs(3));
    assert!(pair.is_connected());
    assert!(pair.in_sync(), "node 1 got node 0's data");
    assert_eq!(pair.nodes[1].blocks[0], pair.nodes[0].blocks[0]);
    assert_eq!(pair.serving(), [true, false]);
    assert_eq!(pair.nodes[1].status().disk, DiskState::UpToDate);
    assert_eq!(pair.nodes[0].uuids.current, pair.nodes[1].uuids.current);
}

#[test]
fn split_brain_between_two_manual_primaries_is_detected() {
    let manual = Config {
        auto_promote: false,
        fencing: Fencing::DontCare,
        ..Config::default()
    };
    let uuids = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let mut pair = Pair::new(
        [manual.clone(), manual],
        [Startup::consistent(); 2],
        [uuids; 2],
    );
    pair.advance(secs(1));
    assert_eq!(
        pair.serving_count(),
        0,
        "nobody promotes without auto_promote"
    );
    pair.command(0, Command::Primary { force: false });
    pair.command(1, Command::Primary { force: false });
    assert!(pair.nodes[1].refused(Command::Primary { force: false }));
    assert!(pair.nodes[1].actions.contains(&Action::Refuse {
        command: Command::Primary { force: false },
        reason: Refusal::PeerIsPrimary
    }));
    pair.drop_traffic();
    pair.block_heartbeat(0, true);
    pair.block_heartbeat(1, true);
    pair.advance(secs(12));
    // Silence: both dropped the other after dead_time; the operator promotes node 1 as well.
    assert_eq!(pair.nodes[1].status().conn, ConnState::Connecting);
    pair.command(1, Command::Primary { force: false });
    assert_eq!(pair.serving(), [true, true]);
    pair.heal();
    pair.advance(secs(2));
    assert!(split_brain_seen(&pair, 0) && split_brain_seen(&pair, 1));
    assert!(saw(&pair, 0, |a| *a
        == Action::Disconnect {
            reason: DisconnectReason::BothPrimary
        }));
}

#[test]
fn startup_waits_for_the_peer() {
    let config = |preferred| Config {
        preferred_primary: preferred,
        wfc_timeout: Some(secs(10)),
        ..Config::default()
    };
    let uuids = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let mut pair = Pair::new(
        [config(true), config(false)],
        [Startup::consistent(); 2],
        [uuids; 2],
    );
    // Both restarted at once but cannot see each other: neither promotes, even after the wait.
    pair.cut();
    pair.advance(secs(5));
    assert!(!pair.nodes[0].machine.startup_wait_over());
    pair.advance(secs(60));
    assert!(pair.nodes[0].machine.startup_wait_over());
    assert_eq!(pair.serving_count(), 0);
    assert_eq!(pair.nodes[0].status().disk, DiskState::Consistent);
    assert!(pair.nodes[0]
        .actions
        .iter()
        .any(|a| matches!(a, Action::Log(l) if l.contains("not provably UpToDate"))));
    // Once they meet, the preferred node serves.
    pair.restore();
    pair.advance(secs(1));
    assert_eq!(pair.serving(), [true, false]);
}

#[test]
fn degraded_primary_restarting_alone_promotes_after_degr_wfc_timeout() {
    let uuids = UuidSet {
        current: 0x1000,
        bitmap: 0x800,
        ..Default::default()
    };
    let config = Config {
        degr_wfc_timeout: Some(secs(60)),
        ..Config::default()
    };
    let degraded = Startup {
        disk: DiskState::Consistent,
        crashed_primary: false,
        degraded: true,
    };
    let mut pair = Pair::new(
        [config.clone(), config],
        [degraded, Startup::consistent()],
        [uuids; 2],
    );
    pair.crash(1);
    pair.advance(secs(59));
    assert_eq!(pair.serving_count(), 0, "still waiting for the peer");
    pair.advance(secs(2));
    assert_eq!(pair.serving(), [true, false]);
    assert_eq!(pair.nodes[0].status().disk, DiskState::UpToDate);
}

#[test]
fn ko_count_drops_a_stalled_peer() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    pair.stall_writes(1, true);
    assert_eq!(
        pair.write(0, 4),
        None,
        "a write the peer's disk never completes is not acknowledged"
    );
    let limit = secs(6 * 7);
    pair.advance(limit - secs(1));
    assert!(
        pair.is_connected(),
        "heartbeats still answer: not dropped yet"
    );
    pair.advance(secs(2));
    assert!(saw(&pair, 0, |a| *a
        == Action::Disconnect {
            reason: DisconnectReason::KoCount
        }));
    assert!(
        saw(&pair, 0, |a| *a == Action::MarkOutOfSync),
        "the stuck write was marked out of sync"
    );
    assert!(pair.nodes[0].pending.is_empty());
    assert!(pair.serving()[0], "the primary keeps serving");
    pair.advance(secs(3));
    assert!(pair.answers(0), "the primary answers again");
    assert!(
        saw(
            &pair,
            1,
            |a| matches!(a, Action::Notify(n) if n.to_string() == "change device disk:Outdated")
        ),
        "the dropped secondary knows its data is old"
    );
    pair.advance(secs(30));
    assert!(
        !pair.serving()[1],
        "a secondary dropped by its primary never promotes itself"
    );
    // Once the secondary's disk recovers, writes complete and a resync brings it back.
    pair.stall_writes(1, false);
    let v = pair.write(0, 5).unwrap();
    assert_eq!(pair.nodes[0].blocks[5], v);
    pair.advance(secs(60));
    assert!(pair.in_sync(), "resynced after the stall");
    assert_eq!(pair.nodes[1].status().disk, DiskState::UpToDate);
}

#[test]
fn silent_link_is_detected_by_dead_time() {
    // Under dont-care only the link's own dead time counts (resource-only drops a silent link
    // sooner while the heartbeat hears the peer: see cluster_failover.rs).
    let mut pair = dont_care_pair();
    pair.advance(secs(1));
    pair.drop_traffic();
    pair.advance(secs(10));
    assert_eq!(pair.nodes[0].status().conn, ConnState::Connected);
    pair.advance(secs(1));
    for n in 0..2 {
        assert!(saw(&pair, n, |a| *a
            == Action::Disconnect {
                reason: DisconnectReason::Timeout
            }));
    }
    assert_eq!(pair.nodes[0].status().peer_disk, DiskState::DUnknown);
}

#[test]
fn local_disk_failure_detaches_and_serves_through_the_peer() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    pair.write(0, 0).unwrap();
    pair.step(0, twinblade::cluster::Event::LocalIoError);
    let s0 = pair.nodes[0].status();
    assert_eq!(s0.disk, DiskState::Diskless);
    assert!(saw(&pair, 0, |a| *a == Action::Detach));
    assert!(s0.serving, "the primary serves through the peer");
    assert_eq!(pair.nodes[1].status().peer_disk, DiskState::Diskless);
    let v = pair.write(0, 6).unwrap();
    assert_eq!(pair.nodes[1].blocks[6], v, "the write went to the peer");
    // Losing the peer too leaves nothing to serve.
    pair.cut();
    assert!(!pair.nodes[0].serving);
}

#[test]
fn secondary_disk_failure_makes_the_primary_track_changes() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    let before = pair.nodes[0].uuids;
    pair.step(1, twinblade::cluster::Event::LocalIoError);
    assert!(saw(&pair, 0, |a| *a == Action::MarkOutOfSync));
    assert_ne!(
        pair.nodes[0].uuids.current, before.current,
        "new generation"
    );
    pair.write(0, 7).unwrap();
    assert!(pair.nodes[0].bitmap.contains(&7));
    assert_eq!(pair.serving(), [true, false]);
}

#[test]
fn initial_sync_after_create_md() {
    let manual = Config {
        auto_promote: false,
        ..Config::default()
    };
    let mut pair = Pair::new(
        [manual.clone(), manual],
        [Startup::fresh(); 2],
        [UuidSet::just_created(); 2],
    );
    pair.advance(secs(1));
    assert!(pair.is_connected());
    assert_eq!(pair.nodes[0].status().disk, DiskState::Inconsistent);
    pair.command(0, Command::Primary { force: false });
    assert!(pair.nodes[0].refused(Command::Primary { force: false }));
    pair.nodes[0].blocks = [42; 16];
    pair.command(0, Command::Primary { force: true });
    assert_eq!(pair.nodes[0].status().repl, ReplState::SyncSource);
    assert_eq!(pair.nodes[1].status().repl, ReplState::SyncTarget);
    assert_eq!(pair.serving(), [true, false]);
    pair.advance(secs(2));
    assert!(pair.in_sync());
    assert_eq!(pair.nodes[1].status().disk, DiskState::UpToDate);
    assert_eq!(pair.nodes[0].uuids, pair.nodes[1].uuids);
}

#[test]
fn operator_resync_commands() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    // invalidate on the primary is refused; on the secondary it pulls everything.
    pair.command(0, Command::Invalidate);
    assert!(pair.nodes[0].refused(Command::Invalidate));
    pair.command(1, Command::PauseSync);
    assert!(pair.nodes[1].refused(Command::PauseSync));
    pair.nodes[1].blocks[9] = 12345;
    pair.command(1, Command::Invalidate);
    assert_eq!(pair.nodes[1].status().repl, ReplState::SyncTarget);
    assert_eq!(pair.nodes[0].status().repl, ReplState::SyncSource);
    pair.command(1, Command::PauseSync);
    assert_eq!(pair.nodes[1].status().repl, ReplState::PausedSyncT);
    pair.advance(secs(5));
    assert!(!pair.in_sync(), "paused");
    pair.command(1, Command::ResumeSync);
    pair.advance(secs(2));
    assert!(pair.in_sync());
    assert_eq!(pair.nodes[1].status().repl, ReplState::Established);
    // invalidate-remote from the primary.
    pair.nodes[1].blocks[3] = 777;
    pair.command(0, Command::InvalidateRemote);
    pair.advance(secs(2));
    assert!(pair.in_sync());
    // disconnect / connect.
    pair.command(1, Command::Disconnect);
    assert_eq!(pair.nodes[1].status().conn, ConnState::StandAlone);
    pair.advance(secs(5));
    assert!(!pair.is_connected());
    pair.command(
        1,
        Command::Connect {
            discard_my_data: false,
        },
    );
    assert!(!pair.nodes[1].refused(Command::Connect {
        discard_my_data: false
    }));
    pair.command(
        1,
        Command::Connect {
            discard_my_data: false,
        },
    );
    assert!(pair.nodes[1].refused(Command::Connect {
        discard_my_data: false
    }));
    pair.advance(secs(2));
    assert!(pair.is_connected());
    assert!(pair.in_sync());
    assert_eq!(pair.serving(), [true, false]);
}

#[test]
fn switchover_to_a_resync_target_and_an_explicit_secondary_holds() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    pair.command(1, Command::Invalidate);
    pair.command(1, Command::PauseSync);
    assert_eq!(pair.nodes[1].status().repl, ReplState::PausedSyncT);
    // Node 0 is the only UpToDate node, but the operator said secondary: that holds.
    pair.command(0, Command::Secondary);
    pair.advance(secs(3));
    assert_eq!(
        pair.role(0),
        Role::Secondary,
        "auto-promote undid `secondary`"
    );
    // A resync target with an UpToDate peer may serve (stale blocks come from the peer).
    let primary = Command::Primary { force: false };
    pair.command(1, primary);
    assert!(!pair.nodes[1].refused(primary));
    assert_eq!(pair.serving(), [false, true]);
    pair.command(1, Command::ResumeSync);
    pair.advance(secs(2));
    assert!(pair.in_sync());
    // The held node still fails over when the primary dies.
    pair.crash(1);
    pair.advance(secs(10));
    assert_eq!(
        pair.role(0),
        Role::Primary,
        "no failover to the held secondary"
    );
    assert_eq!(pair.serving(), [true, false]);
}
