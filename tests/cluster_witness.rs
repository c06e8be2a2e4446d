//! The witness as a condition of the promotion gate, in the simulated pair
//! (`twinblade::cluster::sim`, a shared [`Book`], per-node reachability, simulated time): a
//! node that lost its peer serves alone only with the witness's grant of its generation. After
//! every step: never two nodes answering, and the node that answers holds every acknowledged
//! write.

mod common;
use common::run;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use twinblade::cluster::sim::Pair;
use twinblade::cluster::{Action, Config, ConnState, DiskState, FenceOutcome, Role, Startup};
use twinblade::ha::witness::Book;
use twinblade::repl::uuid::UuidSet;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn config() -> Config {
    Config {
        witness: true,
        ..Config::default()
    }
}

fn preferred() -> Config {
    Config {
        preferred_primary: true,
        ..config()
    }
}

/// A pair with a witness (`book`, as `pair` with nodes `names`), node 0 primary, in sync,
/// after its first two seconds with a client writing.
fn started_pair(book: &Arc<Mutex<Book>>, pair_name: &str, names: [&str; 2]) -> Pair {
    started_pair_with(book, pair_name, names, [preferred(), config()])
}

fn started_pair_with(
    book: &Arc<Mutex<Book>>,
    pair_name: &str,
    names: [&str; 2],
    configs: [Config; 2],
) -> Pair {
    let uuids = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let mut pair = Pair::new(configs, [Startup::consistent(); 2], [uuids; 2]);
    pair.set_witness(book.clone(), pair_name, names);
    run(&mut pair, secs(3.0), "start", |_| {});
    assert!(pair.answers(0), "node 0 serves");
    assert!(pair.is_connected());
    assert_eq!(pair.nodes[0].witness_asks + pair.nodes[1].witness_asks, 0);
    pair
}

fn book() -> Arc<Mutex<Book>> {
    Arc::new(Mutex::new(Book::default()))
}

fn logged(pair: &Pair, n: usize, pred: impl Fn(&str) -> bool) -> bool {
    pair.nodes[n]
        .actions
        .iter()
        .any(|a| matches!(a, Action::Log(l) if pred(l)))
}

/// The networks split so that the nodes lose each other entirely (replication network down;
/// the client network down stands for a client network split in two halves: neither wire guard
/// sees the other node), both reaching the witness.
fn split(pair: &mut Pair) {
    pair.set_replication_net(false);
    pair.set_client_net(false);
}

/// (a) Both halves reach the witness: exactly one node serves, at no step two; whichever
/// claims first wins — the primary, which asks at once, or, when its answer is slow, the
/// secondary.
#[test]
fn a_split_with_both_halves_reaching_the_witness_leaves_exactly_one_serving() {
    for (slow, winner) in [(None, 0), (Some(0), 1)] {
        let context = format!("slow witness answer on {slow:?}");
        let book = book();
        let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
        if let Some(n) = slow {
            pair.set_witness_delay(n, secs(2.0));
        }
        split(&mut pair);
        let acked = run(&mut pair, secs(15.0), &context, |_| {});
        let loser = 1 - winner;
        assert!(pair.answers(winner), "{context}: node {winner} serves");
        assert!(!pair.answers(loser), "{context}");
        assert_eq!(pair.role(loser), Role::Secondary, "{context}");
        assert_eq!(
            pair.nodes[loser].status().disk,
            DiskState::Outdated,
            "{context}"
        );
        assert!(acked > 0, "{context}: writes acknowledged after the split");
        let holder = pair.name(winner).to_string();
        assert!(
            logged(&pair, loser, |l| l.starts_with("witness: generation ")
                && l.ends_with(&format!("held by {holder}: not serving alone"))),
            "{context}: {:?}",
            pair.nodes[loser].actions
        );
        let reason = if winner == 0 {
            "serving without the peer: "
        } else {
            "auto-promote: "
        };
        assert!(
            logged(&pair, winner, |l| l.starts_with(reason)
                && l.contains("witness granted generation 0000000000001000")),
            "{context}: {:?}",
            pair.nodes[winner].actions
        );
        // The split heals: the loser resyncs from the winner, nothing lost.
        pair.heal();
        run(&mut pair, secs(10.0), &context, |_| {});
        assert!(pair.is_connected(), "{context}");
        assert!(pair.answers(winner), "{context}");
        assert!(pair.in_sync(), "{context}");
    }
}

/// (b) The primary loses power; the secondary cannot reach the witness: nobody promotes, the
/// secondary keeps claiming after each back-off; once the witness is reachable it is granted.
#[test]
fn a_secondary_that_cannot_reach_the_witness_does_not_promote() {
    let book = book();
    let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
    pair.set_witness_reachable(1, false);
    pair.power_loss(0);
    let acked = run(&mut pair, secs(12.0), "unreachable", |p| {
        assert_eq!(p.role(1), Role::Secondary, "node 1 never promotes");
    });
    assert_eq!(acked, 0);
    assert!(
        pair.nodes[1].witness_asks >= 2,
        "claimed again after the back-off ({})",
        pair.nodes[1].witness_asks
    );
    assert!(logged(&pair, 1, |l| l.starts_with(
        "witness unreachable: not serving alone; trying again in "
    )));
    assert!(book.lock().unwrap().is_empty(), "nothing granted");
    pair.set_witness_reachable(1, true);
    let acked = run(&mut pair, secs(6.0), "reachable", |_| {});
    assert_eq!(pair.role(1), Role::Primary);
    assert!(acked > 0);
    assert_eq!(
        book.lock().unwrap().query("lab", "r0", 0x1000).holder,
        "beta"
    );
}

/// (c) The witness unreachable from the primary only, and the nodes lose each other: the
/// secondary, granted, serves; the primary answers nothing alone, and once it reaches the
/// witness it hears the generation is held and steps down.
#[test]
fn a_primary_that_cannot_reach_the_witness_never_serves_alone() {
    let book = book();
    let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
    pair.set_witness_reachable(0, false);
    split(&mut pair);
    // (It answers under its lease until the lease runs out: that is not alone.)
    let alone = |p: &Pair| p.answers(0) && p.nodes[0].status().conn != ConnState::Connected;
    let acked = run(&mut pair, secs(10.0), "split", |p| {
        assert!(!alone(p), "node 0 never answers alone");
    });
    assert!(pair.answers(1), "node 1 serves with the grant");
    assert!(acked > 0);
    assert!(pair.nodes[0].witness_asks >= 1);
    pair.set_witness_reachable(0, true);
    run(&mut pair, secs(6.0), "reachable again", |p| {
        assert!(!alone(p), "node 0 never answers alone");
    });
    assert_eq!(pair.role(0), Role::Secondary, "node 0 stepped down");
    assert_eq!(pair.nodes[0].status().disk, DiskState::Outdated);
    assert!(logged(&pair, 0, |l| l.ends_with("held by beta: not serving alone")));
    pair.heal();
    run(&mut pair, secs(10.0), "healed", |_| {});
    assert!(pair.is_connected());
    assert!(pair.answers(1));
    assert!(pair.in_sync());
}

/// (d) The witness restarts between the two claims: it still knows whom it granted.
#[test]
fn the_witness_remembers_its_grants_across_its_restart() {
    let book = book();
    let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
    pair.set_witness_reachable(1, false);
    split(&mut pair);
    run(&mut pair, secs(3.0), "split", |_| {});
    assert!(pair.answers(0), "node 0 serves with the grant");
    pair.restart_witness();
    pair.set_witness_reachable(1, true);
    run(&mut pair, secs(8.0), "after the restart", |_| {});
    assert!(pair.answers(0));
    assert_eq!(pair.role(1), Role::Secondary);
    assert!(logged(&pair, 1, |l| l
        .ends_with("held by alpha: not serving alone")));
}

/// (e) Two pairs with the same generation UUIDs share one witness: each gets its own grant.
#[test]
fn two_pairs_sharing_a_witness_do_not_disturb_each_other() {
    let book = book();
    let mut lab = started_pair(&book, "lab", ["alpha", "beta"]);
    let mut prod = started_pair(&book, "prod", ["gamma", "delta"]);
    split(&mut lab);
    run(&mut lab, secs(5.0), "lab split", |_| {});
    assert!(lab.answers(0));
    // prod's secondary fails over from the same generation number lab's primary claimed.
    prod.power_loss(0);
    let acked = run(&mut prod, secs(8.0), "prod failover", |_| {});
    assert_eq!(prod.role(1), Role::Primary);
    assert!(acked > 0);
    assert!(logged(&prod, 1, |l| l.starts_with("auto-promote: ")
        && l.contains("witness granted generation 0000000000001000")));
    let b = book.lock().unwrap();
    assert_eq!(b.query("lab", "r0", 0x1000).holder, "alpha");
    assert_eq!(b.query("prod", "r0", 0x1000).holder, "delta");
}

/// (f) A primary frozen (SIGSTOP) while the networks split: the secondary takes over with the
/// grant; the primary wakes, finds its generation held, and never serves again alone.
#[test]
fn a_frozen_primary_that_wakes_finds_its_generation_held() {
    let book = book();
    let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
    pair.freeze(0);
    split(&mut pair);
    run(&mut pair, secs(8.0), "frozen", |_| {});
    assert!(pair.answers(1), "node 1 took over");
    pair.thaw(0);
    run(&mut pair, secs(8.0), "woken", |p| {
        assert!(!p.answers(0), "node 0 never answers again alone");
    });
    assert_eq!(pair.role(0), Role::Secondary);
    assert!(logged(&pair, 0, |l| l.ends_with("held by beta: not serving alone")));
    assert!(pair.answers(1));
}

/// A fence command and a witness: both must vouch.
#[test]
fn with_a_fence_command_too_both_must_vouch() {
    for (outcome, promotes) in [
        (FenceOutcome::Exit(5), false),
        (FenceOutcome::Exit(7), true),
    ] {
        let context = format!("{outcome}");
        let both = Config {
            fence_peer: true,
            ..config()
        };
        let book = book();
        let mut pair = started_pair_with(
            &book,
            "lab",
            ["alpha", "beta"],
            [
                Config {
                    preferred_primary: true,
                    ..both.clone()
                },
                both,
            ],
        );
        pair.set_fence(1, outcome, secs(0.3));
        pair.power_loss(0);
        run(&mut pair, secs(12.0), &context, |_| {});
        assert_eq!(pair.role(1) == Role::Primary, promotes, "{context}");
        assert!(pair.nodes[1].fence_runs >= 1, "{context}");
        // The witness is asked only once the fence command vouched.
        assert_eq!(pair.nodes[1].witness_asks > 0, promotes, "{context}");
        if promotes {
            assert!(logged(&pair, 1, |l| l.starts_with("auto-promote: ")
                && l.contains(&outcome.to_string())
                && l.contains("witness granted generation")));
        }
    }
}

/// The link cut with the heartbeat still heard: the peer persists Outdated at the primary's
/// request, which needs no witness; and under dont-care the witness is not asked at all.
#[test]
fn a_peer_outdated_at_our_request_needs_no_witness_and_dont_care_ignores_it() {
    let book = book();
    let mut pair = started_pair(&book, "lab", ["alpha", "beta"]);
    pair.set_witness_reachable(0, false);
    pair.set_witness_reachable(1, false);
    pair.cut();
    let acked = run(&mut pair, secs(5.0), "cut", |_| {});
    assert!(pair.answers(0));
    assert!(acked > 0);
    assert_eq!(pair.nodes[1].status().disk, DiskState::Outdated);
    assert_eq!(pair.nodes[0].witness_asks + pair.nodes[1].witness_asks, 0);

    let dont_care = Config {
        fencing: twinblade::cluster::Fencing::DontCare,
        ..config()
    };
    let mut pair = started_pair_with(
        &book,
        "dc",
        ["alpha", "beta"],
        [
            Config {
                preferred_primary: true,
                ..dont_care.clone()
            },
            dont_care,
        ],
    );
    pair.set_witness_reachable(1, false);
    pair.power_loss(0);
    run(&mut pair, secs(12.0), "dont-care", |_| {});
    assert_eq!(pair.role(1), Role::Primary);
    assert_eq!(pair.nodes[1].witness_asks, 0);
}
