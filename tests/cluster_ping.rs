//! Ping targets (`[cluster] ping`) in the simulated pair (`twinblade::cluster::sim`, per-node
//! reach set by the test, simulated time): never fail over to the node that reaches fewer
//! targets; a primary that reaches fewer than its secondary for the switch delay hands over;
//! a shorter blip does nothing; no failback when its reach returns. After every step: never
//! two nodes answering, and the node that answers holds every acknowledged write.

mod common;
use common::run;
use std::time::Duration;
use twinblade::cluster::sim::Pair;
use twinblade::cluster::{Action, Config, Notification, Role};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Two ping targets, switch delay 10 s.
fn config() -> Config {
    Config {
        ping_targets: 2,
        ping_switch_delay: secs(10.0),
        ..Config::default()
    }
}

/// A pair with two ping targets that both nodes reach, node 0 primary, in sync, after its
/// first three seconds with a client writing.
fn started_pair() -> Pair {
    let mut pair = Pair::synced([
        Config {
            preferred_primary: true,
            ..config()
        },
        config(),
    ]);
    pair.set_reach(0, Some(2));
    pair.set_reach(1, Some(2));
    run(&mut pair, secs(3.0), "start", |_| {});
    assert!(pair.answers(0), "node 0 serves");
    assert!(pair.is_connected());
    pair
}

fn logged(pair: &Pair, n: usize, pred: impl Fn(&str) -> bool) -> bool {
    pair.nodes[n]
        .actions
        .iter()
        .any(|a| matches!(a, Action::Log(l) if pred(l)))
}

fn refused_ping(pair: &Pair, n: usize) -> bool {
    pair.nodes[n].actions.iter().any(|a| {
        matches!(a, Action::Notify(Notification::Change { key: "promotion", value, .. }) if value == "refused-ping")
    })
}

/// The primary dies while the secondary reaches fewer targets than it did: the secondary
/// does not take over, and says why with the figures; once it reaches as many, it does.
#[test]
fn no_failover_to_a_node_that_reaches_fewer() {
    for beta_reach in [0, 1] {
        let mut pair = started_pair();
        pair.set_reach(1, Some(beta_reach));
        run(&mut pair, secs(1.0), "beta loses targets", |_| {});
        pair.power_loss(0);
        run(&mut pair, secs(10.0), "alpha gone", |p| {
            assert!(
                !p.answers(1),
                "beta serves while reaching {beta_reach} of 2"
            );
        });
        assert_eq!(pair.role(1), Role::Secondary);
        let text = format!("ping: reaches {beta_reach} of 2 targets, the peer reached 2");
        assert!(logged(&pair, 1, |l| l.contains(&text)), "{text}");
        assert!(refused_ping(&pair, 1));
        // Nothing else was asked: no wire guard, no promotion.
        assert!(!pair.nodes[1]
            .actions
            .iter()
            .any(|a| matches!(a, Action::CheckWire)));
        // Its network comes back: it reaches what the dead primary last reported.
        pair.set_reach(1, Some(2));
        run(&mut pair, secs(5.0), "beta reaches both", |_| {});
        assert!(pair.answers(1), "beta serves once it reaches as many");
    }
}

/// Reaching as many as the dead primary last reported, or more, the secondary fails over.
#[test]
fn failover_when_the_secondary_reaches_as_many_or_more() {
    // Equal.
    let mut pair = started_pair();
    pair.power_loss(0);
    run(&mut pair, secs(5.0), "alpha gone", |_| {});
    assert!(pair.answers(1), "beta took over");
    assert!(!refused_ping(&pair, 1));
    // More: alpha reached one, beta two (alpha dies before its switch delay ends).
    let mut pair = started_pair();
    pair.set_reach(0, Some(1));
    run(&mut pair, secs(2.0), "alpha loses a target", |_| {});
    assert!(pair.answers(0));
    pair.power_loss(0);
    run(&mut pair, secs(5.0), "alpha gone", |_| {});
    assert!(pair.answers(1), "beta took over");
    // Nobody reaches any target: nobody serves alone.
    let mut pair = started_pair();
    pair.set_reach(1, Some(0));
    pair.set_reach(0, Some(0));
    run(&mut pair, secs(1.0), "the targets are gone", |_| {});
    pair.power_loss(0);
    run(&mut pair, secs(5.0), "alpha gone", |p| {
        assert!(!p.answers(1))
    });
    assert!(logged(&pair, 1, |l| l
        .contains("ping: reaches 0 of 2 targets, the peer reached 0")));
}

/// A peer without ping targets (it reports none) does not hold back a node that reaches some.
#[test]
fn a_peer_without_targets_counts_as_reaching_none() {
    let mut pair = started_pair();
    pair.set_reach(0, None);
    run(&mut pair, secs(1.0), "alpha reports no targets", |_| {});
    pair.power_loss(0);
    run(&mut pair, secs(5.0), "alpha gone", |_| {});
    assert!(pair.answers(1), "beta took over");
}

/// A blip shorter than the switch delay changes nothing.
#[test]
fn a_blip_shorter_than_the_switch_delay_does_nothing() {
    let mut pair = started_pair();
    for _ in 0..3 {
        pair.set_reach(0, Some(0));
        run(&mut pair, secs(9.0), "alpha's blip", |p| {
            assert!(p.answers(0))
        });
        pair.set_reach(0, Some(2));
        run(
            &mut pair,
            secs(1.0),
            "alpha back",
            |p| assert!(p.answers(0)),
        );
    }
    run(&mut pair, secs(20.0), "after", |p| assert!(p.answers(0)));
    assert_eq!(pair.role(0), Role::Primary);
    assert_eq!(pair.role(1), Role::Secondary);
    assert!(!logged(&pair, 0, |l| l.contains("ping: ")));
}

/// Beta took over because alpha died (reaching as many as alpha did); alpha comes back with
/// its network: it does not take the resource back.
#[test]
fn no_failback_when_reach_returns_after_a_failover() {
    let mut pair = started_pair();
    pair.power_loss(0);
    run(&mut pair, secs(5.0), "alpha gone", |_| {});
    assert!(pair.answers(1));
    // Even the preferred primary: no preemption, and reaching as many is not more.
    pair.restart_from_disk(
        0,
        Config {
            preferred_primary: true,
            ..config()
        },
    );
    pair.set_reach(0, Some(2));
    run(&mut pair, secs(30.0), "alpha back", |p| {
        assert!(!p.answers(0), "alpha took the resource back")
    });
    assert!(pair.is_connected());
    assert_eq!(pair.role(1), Role::Primary);
}

/// The primary reaches fewer targets than its secondary for the switch delay: a planned
/// switchover to the secondary, nothing acknowledged lost (checked after every step), the
/// client served on; when the old primary's reach returns it does not take the role back.
#[test]
fn a_primary_reaching_fewer_for_the_delay_switches_over_and_never_back() {
    for alpha_reach in [0, 1] {
        let mut pair = started_pair();
        pair.set_reach(0, Some(alpha_reach));
        run(&mut pair, secs(9.5), "before the delay", |p| {
            assert!(p.answers(0), "alpha still serves before the delay")
        });
        let acked = run(&mut pair, secs(5.0), "switchover", |_| {});
        assert!(pair.answers(1), "beta serves after the switchover");
        assert_eq!(pair.role(0), Role::Secondary);
        assert!(
            pair.is_connected(),
            "a planned switchover keeps the connection"
        );
        assert!(acked > 0, "the client was served across it");
        let text = format!("ping: reaches {alpha_reach} of 2 targets, the secondary 2");
        assert!(logged(&pair, 0, |l| l.contains(&text)), "{text}");
        assert!(logged(&pair, 0, |l| l.contains("switchover (ping targets)")));
        pair.set_reach(0, Some(2));
        run(&mut pair, secs(30.0), "alpha's network back", |p| {
            assert!(!p.answers(0), "alpha took the resource back")
        });
        assert_eq!(pair.role(1), Role::Primary);
        assert!(pair.in_sync());
    }
}

/// No switchover to a secondary that cannot take over: not connected (the link cut), or
/// reaching no more than the primary.
#[test]
fn no_switchover_without_a_healthy_secondary_that_reaches_more() {
    let mut pair = started_pair();
    pair.set_reach(0, Some(1));
    pair.set_reach(1, Some(1));
    run(&mut pair, secs(20.0), "both reach one", |p| {
        assert!(p.answers(0))
    });
    pair.cut();
    pair.set_reach(0, Some(0));
    run(
        &mut pair,
        secs(20.0),
        "link cut, alpha reaches none",
        |_| {},
    );
    assert_eq!(pair.role(1), Role::Secondary);
    assert!(!logged(&pair, 0, |l| l.contains("switchover")));
}

/// With auto-failback the preferred node waits while it reaches fewer than the primary.
#[test]
fn auto_failback_waits_while_the_preferred_node_reaches_fewer() {
    let failback = |preferred| Config {
        preferred_primary: preferred,
        auto_failback: true,
        failback_delay: secs(5.0),
        ..config()
    };
    let mut pair = Pair::synced([failback(true), failback(false)]);
    pair.set_reach(0, Some(2));
    pair.set_reach(1, Some(2));
    run(&mut pair, secs(3.0), "start", |_| {});
    assert!(pair.answers(0));
    pair.set_reach(0, Some(0));
    run(&mut pair, secs(15.0), "alpha loses its targets", |_| {});
    assert!(pair.answers(1), "switched over to beta");
    run(&mut pair, secs(30.0), "alpha still without targets", |p| {
        assert!(!p.answers(0), "failback to a node that reaches fewer")
    });
    pair.set_reach(0, Some(2));
    run(&mut pair, secs(15.0), "alpha's targets back", |_| {});
    assert!(pair.answers(0), "auto-failback once it reaches as many");
}
