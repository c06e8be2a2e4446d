//! The fence command as a condition of the promotion gate, in the simulated pair
//! (`twinblade::cluster::sim`, scripted fence outcomes, simulated time): a node promotes or
//! serves alone without a peer's confirmation exactly when its fence command exits 4 (peer
//! outdated) or 7 (peer fenced). After every step: never two nodes answering, and the node
//! that answers holds every acknowledged write.

mod common;
use common::run;
use std::time::Duration;
use twinblade::cluster::sim::Pair;
use twinblade::cluster::{Action, Config, DiskState, FenceOutcome, Fencing, Role};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Every outcome a fence command can have, with how long it runs: 4 and 7 vouch.
fn outcomes() -> Vec<(FenceOutcome, Duration, bool)> {
    vec![
        (FenceOutcome::Exit(4), secs(0.3), true),
        (FenceOutcome::Exit(7), secs(0.3), true),
        (FenceOutcome::Exit(5), secs(0.3), false),
        (FenceOutcome::Exit(1), secs(0.3), false),
        (FenceOutcome::Exit(3), secs(0.3), false),
        (FenceOutcome::Signal(9), secs(0.1), false),
        (FenceOutcome::TimedOut, secs(2.0), false),
    ]
}

/// A pair with a fence command on both nodes (or with `fencing`), node 0 primary, in sync,
/// after its first second.
fn started_pair(fencing: Fencing) -> Pair {
    let config = Config {
        fence_peer: true,
        fencing,
        ..Config::default()
    };
    let mut pair = Pair::synced([
        Config {
            preferred_primary: true,
            ..config.clone()
        },
        config,
    ]);
    run(&mut pair, secs(1.0), "start", |_| {});
    assert!(pair.answers(0), "node 0 serves");
    assert_eq!(pair.nodes[0].fence_runs + pair.nodes[1].fence_runs, 0);
    pair
}

fn logged(pair: &Pair, n: usize, pred: impl Fn(&str) -> bool) -> bool {
    pair.nodes[n]
        .actions
        .iter()
        .any(|a| matches!(a, Action::Log(l) if pred(l)))
}

#[test]
fn failover_promotes_exactly_on_exit_4_and_7() {
    for (outcome, takes, vouches) in outcomes() {
        let context = format!("{outcome}");
        let mut pair = started_pair(Fencing::ResourceOnly);
        pair.set_fence(1, outcome, takes);
        run(&mut pair, secs(2.0), &context, |_| {});
        pair.power_loss(0);
        let acked = run(&mut pair, secs(12.0), &context, |p| {
            // Never promoted before the command answered.
            if p.role(1) == Role::Primary {
                assert!(p.nodes[1].fence_runs > 0, "{context}: promoted unfenced");
            }
        });
        assert!(pair.nodes[1].fence_runs >= 1, "{context}: the command ran");
        if vouches {
            assert_eq!(pair.role(1), Role::Primary, "{context}");
            assert!(pair.answers(1), "{context}");
            assert!(
                acked > 0,
                "{context}: writes acknowledged after the failover"
            );
            // The log says which vouch allowed it.
            assert!(
                logged(&pair, 1, |l| l.starts_with("auto-promote: ")
                    && l.contains(&outcome.to_string())),
                "{context}: {:?}",
                pair.nodes[1].actions
            );
            assert_eq!(pair.nodes[1].fence_runs, 1, "{context}: run once");
        } else {
            assert_eq!(pair.role(1), Role::Secondary, "{context}");
            assert_eq!(pair.answering_count(), 0, "{context}");
            assert_eq!(acked, 0, "{context}");
            assert!(
                logged(&pair, 1, |l| l
                    == format!(
                    "{outcome}: not serving alone; trying again in 5s while the peer stays silent"
                )),
                "{context}: {:?}",
                pair.nodes[1].actions
            );
            assert!(
                pair.nodes[1].fence_runs >= 2,
                "{context}: retried after the back-off ({} runs)",
                pair.nodes[1].fence_runs
            );
            // The peer comes back: it is met again and serves, nothing lost.
            pair.restart_from_disk(
                0,
                Config {
                    fence_peer: true,
                    preferred_primary: true,
                    ..Config::default()
                },
            );
            run(&mut pair, secs(8.0), &context, |_| {});
            assert!(pair.is_connected(), "{context}: reconnected");
        }
    }
}

/// Every channel between two live nodes gone (replication network down, node 1's heartbeat
/// blocked), the client network up: the primary serves again only on its fence command's
/// exit 4 or 7; the secondary, whose command fails, never promotes.
#[test]
fn a_primary_that_lost_its_peer_serves_again_only_when_fenced() {
    for (outcome, takes, vouches) in outcomes() {
        let context = format!("{outcome}");
        let mut pair = started_pair(Fencing::ResourceOnly);
        pair.set_fence(0, outcome, takes);
        pair.set_fence(1, FenceOutcome::Exit(5), secs(0.3));
        run(&mut pair, secs(2.0), &context, |_| {});
        pair.set_replication_net(false);
        pair.block_heartbeat(1, true);
        let mut answered_after_cut = false;
        let acked = run(&mut pair, secs(10.0), &context, |p| {
            let fenced = p.nodes[0].actions.iter().any(|a| {
                matches!(a, Action::Log(l) if l.starts_with(&format!("{outcome}: the peer cannot serve")))
            });
            if p.answers(0) && p.nodes[0].status().conn != twinblade::cluster::ConnState::Connected
            {
                answered_after_cut = true;
                assert!(
                    fenced,
                    "{context}: node 0 answers without its peer, unfenced"
                );
            }
            assert_eq!(
                p.role(1),
                Role::Secondary,
                "{context}: node 1 never promotes"
            );
        });
        assert!(
            pair.nodes[0].fence_runs >= 1,
            "{context}: node 0 ran its command"
        );
        assert_eq!(answered_after_cut, vouches, "{context}");
        if vouches {
            assert!(acked > 0, "{context}");
            assert!(
                logged(&pair, 0, |l| l.starts_with("serving without the peer: ")
                    && l.contains(&outcome.to_string())),
                "{context}"
            );
            if outcome == FenceOutcome::Exit(4) {
                assert_eq!(
                    pair.nodes[1].status().disk,
                    DiskState::Outdated,
                    "{context}"
                );
            } else {
                assert!(!pair.nodes[1].up, "{context}: node 1 powered off");
            }
        } else {
            assert_eq!(acked, 0, "{context}");
            assert_eq!(pair.answering_count(), 0, "{context}");
            assert!(pair.nodes[0].fence_runs >= 2, "{context}: retried");
        }
    }
}

/// The replication link cut with the heartbeat still heard: the peer persists Outdated at the
/// primary's request, which is the peer's own confirmation: no fence command runs.
#[test]
fn a_peer_outdated_over_the_heartbeat_needs_no_fence_command() {
    let mut pair = started_pair(Fencing::ResourceOnly);
    pair.set_fence(0, FenceOutcome::Exit(5), secs(0.3));
    pair.set_fence(1, FenceOutcome::Exit(5), secs(0.3));
    pair.cut();
    let acked = run(&mut pair, secs(5.0), "cut", |_| {});
    assert!(pair.answers(0));
    assert!(acked > 0);
    assert_eq!(pair.nodes[1].status().disk, DiskState::Outdated);
    assert_eq!(pair.nodes[0].fence_runs + pair.nodes[1].fence_runs, 0);
    assert!(logged(&pair, 0, |l| l
        == "serving without the peer: the peer persisted Outdated"));
}

#[test]
fn dont_care_ignores_the_fence_command() {
    let mut pair = started_pair(Fencing::DontCare);
    pair.set_fence(1, FenceOutcome::Exit(5), secs(0.3));
    pair.power_loss(0);
    run(&mut pair, secs(12.0), "dont-care", |_| {});
    assert_eq!(pair.role(1), Role::Primary);
    assert_eq!(pair.nodes[1].fence_runs, 0);
}
