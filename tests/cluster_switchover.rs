//! Planned switchover and auto-failback in the simulated pair (`twinblade::cluster::sim`): a
//! client writes to whichever node answers; after every step nobody answers twice and the
//! node that answers holds every acknowledged write (`common::check_safety`).

mod common;
use common::run;
use std::time::Duration;
use twinblade::cluster::sim::Pair;
use twinblade::cluster::{Command, Config, ConnState, Handover, Role, HANDOVER_TIMEOUT};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Node 0 preferred; `failback` turns on its auto-failback with a 5 s delay.
fn pair(failback: bool) -> Pair {
    let mut pair = Pair::synced([preferred_config(failback), Config::default()]);
    run(&mut pair, secs(1), "start", |_| {});
    assert_eq!(pair.role(0), Role::Primary);
    assert!(pair.answers(0));
    pair
}

fn preferred_config(failback: bool) -> Config {
    Config {
        preferred_primary: true,
        auto_failback: failback,
        failback_delay: secs(5),
        ..Config::default()
    }
}

/// Who answers at every step of a run, and how many steps nobody did.
fn gap_steps(pair: &mut Pair, d: Duration, context: &str) -> (usize, usize) {
    let mut gap = 0;
    let acked = run(pair, d, context, |p| {
        if p.answering_count() == 0 {
            gap += 1;
        }
    });
    (acked, gap)
}

#[test]
fn switchover_on_the_primary_moves_the_role_and_loses_nothing() {
    let mut pair = pair(false);
    run(&mut pair, secs(1), "before", |_| {});
    pair.command(0, Command::Switchover);
    assert!(!pair.nodes[0].refused(Command::Switchover));
    let (acked, gap) = gap_steps(&mut pair, secs(2), "switchover");
    assert!(acked > 0, "the client kept writing");
    // The simulated handover completes within a step (a real one pauses for a moment).
    assert!(gap <= 1, "steps nobody answered: {gap}");
    assert_eq!(
        [pair.role(0), pair.role(1)],
        [Role::Secondary, Role::Primary]
    );
    assert!(pair.answers(1) && !pair.answers(0));
    assert_eq!(pair.nodes[0].status().handover, None);
    assert_eq!(pair.nodes[0].status().conn, ConnState::Connected);
    // The preferred node, moved away by hand, does not take it back by itself.
    run(&mut pair, secs(30), "after", |_| {});
    assert!(pair.answers(1));
    assert!(pair.in_sync() || pair.nodes[0].status().conn == ConnState::Connected);
}

#[test]
fn switchover_asked_on_the_secondary_moves_the_role_and_back() {
    let mut pair = pair(false);
    pair.command(1, Command::Switchover);
    assert!(!pair.nodes[1].refused(Command::Switchover));
    assert!(matches!(
        pair.nodes[1].status().handover,
        Some(Handover::Asking { .. })
    ));
    run(&mut pair, secs(2), "to node 1", |_| {});
    assert_eq!(
        [pair.role(0), pair.role(1)],
        [Role::Secondary, Role::Primary]
    );
    assert!(pair.answers(1));
    // And back, asked on the primary this time.
    pair.command(1, Command::Switchover);
    run(&mut pair, secs(2), "back to node 0", |_| {});
    assert_eq!(
        [pair.role(0), pair.role(1)],
        [Role::Primary, Role::Secondary]
    );
    assert!(pair.answers(0));
}

#[test]
fn switchover_is_refused_unless_both_are_connected_and_up_to_date() {
    let mut pair = pair(false);
    pair.cut();
    run(&mut pair, secs(5), "cut", |_| {});
    pair.command(0, Command::Switchover);
    pair.command(1, Command::Switchover);
    assert!(pair.nodes[0].refused(Command::Switchover));
    assert!(pair.nodes[1].refused(Command::Switchover));
    run(&mut pair, secs(1), "refused", |_| {});
    assert_eq!(pair.role(1), Role::Secondary);
    // Nobody primary: nothing to switch over.
    let mut idle = pair_without_primary();
    idle.command(0, Command::Switchover);
    assert!(idle.nodes[0].refused(Command::Switchover));
    run(&mut idle, secs(1), "idle", |_| {});
}

/// Two connected secondaries: auto-promote off.
fn pair_without_primary() -> Pair {
    let off = Config {
        auto_promote: false,
        ..Config::default()
    };
    let mut pair = Pair::synced([off.clone(), off]);
    run(&mut pair, secs(1), "start", |_| {});
    pair
}

#[test]
fn a_peer_that_never_takes_over_gets_the_role_back() {
    let mut pair = pair(false);
    // The peer hears nothing of the handover (its heartbeat is blocked; the link is up).
    pair.block_heartbeat(1, true);
    pair.command(0, Command::Switchover);
    run(&mut pair, HANDOVER_TIMEOUT - secs(1), "waiting", |p| {
        assert_eq!(p.role(1), Role::Secondary)
    });
    assert!(!pair.answers(0), "stepped down and waiting");
    run(&mut pair, secs(2), "timed out", |_| {});
    assert_eq!(pair.role(0), Role::Primary);
    assert!(pair.answers(0));
    assert_eq!(pair.role(1), Role::Secondary);
}

#[test]
fn primary_is_refused_on_a_node_that_is_handing_over() {
    let mut pair = pair(false);
    pair.block_heartbeat(1, true);
    pair.command(0, Command::Switchover);
    assert!(!pair.nodes[0].refused(Command::Switchover));
    pair.command(0, Command::Primary { force: false });
    pair.command(0, Command::Switchover);
    assert!(pair.nodes[0].refused(Command::Primary { force: false }));
    assert!(pair.nodes[0].refused(Command::Switchover));
    assert_eq!(pair.role(0), Role::Secondary);
}

#[test]
fn auto_failback_brings_the_preferred_node_back_after_its_delay() {
    let mut pair = pair(true);
    pair.power_loss(0);
    run(&mut pair, secs(5), "failover", |_| {});
    assert!(pair.answers(1), "node 1 took over");
    pair.restart_from_disk(0, preferred_config(true));
    let mut back_at = None;
    let mut step = 0;
    run(&mut pair, secs(30), "failback", |p| {
        step += 1;
        if back_at.is_none() && p.answers(0) {
            back_at = Some(step);
        }
    });
    let back_at = back_at.expect("node 0 took its resource back");
    assert!(pair.answers(0) && !pair.answers(1));
    assert_eq!(pair.role(1), Role::Secondary);
    // Not before the delay: the restart, the handshake and the resync come first.
    let steps_per_sec = 1000 / twinblade::cluster::sim::STEP.as_millis() as usize;
    assert!(
        back_at > 5 * steps_per_sec,
        "back after {back_at} steps, before failback-delay"
    );
}

#[test]
fn without_auto_failback_the_survivor_keeps_serving() {
    let mut pair = pair(false);
    pair.power_loss(0);
    run(&mut pair, secs(5), "failover", |_| {});
    assert!(pair.answers(1));
    pair.restart_from_disk(0, preferred_config(false));
    run(&mut pair, secs(60), "returned", |p| {
        assert_ne!(p.role(0), Role::Primary, "no preemption")
    });
    assert!(pair.answers(1));
    assert_eq!(pair.nodes[0].status().conn, ConnState::Connected);
}

#[test]
fn auto_failback_waits_for_a_resync_to_finish() {
    let mut pair = pair(true);
    pair.power_loss(0);
    run(&mut pair, secs(5), "failover", |_| {});
    // Writes on node 1 while node 0 is away: node 0 comes back behind.
    pair.restart_from_disk(0, preferred_config(true));
    run(&mut pair, secs(30), "failback", |p| {
        if p.answers(0) {
            assert!(p.in_sync(), "took the role back before the resync finished");
        }
    });
    assert!(pair.answers(0));
}

#[test]
fn auto_failback_does_not_undo_the_operators_switchover() {
    let mut pair = pair(true);
    pair.command(0, Command::Switchover);
    run(&mut pair, secs(60), "moved by hand", |_| {});
    assert!(pair.answers(1), "the preferred node took it back");
    // The operator's `primary` on node 0 would be refused (the peer is primary), but a
    // switchover asked there brings it back, and then failback is armed again.
    pair.command(0, Command::Switchover);
    run(&mut pair, secs(2), "asked back", |_| {});
    assert!(pair.answers(0));
}
