//! Failover under `fencing = resource-only` in the simulated pair (`twinblade::cluster::sim`):
//! network faults, heartbeat blocks, freezes, power loss and a rival on the wire, with a client
//! writing to whichever node answers. After every step the two safety properties are checked:
//! never two nodes answering, and the node that answers holds every acknowledged write.

mod common;
use common::check_safety;
use std::time::Duration;
use twinblade::cluster::sim::{Pair, BLOCKS, STEP};
use twinblade::cluster::{
    Action, Command, Config, ConnState, DiskState, Event, ReplState, Role, Startup,
};
use twinblade::repl::uuid::UuidSet;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// What happened during [`run`].
#[derive(Debug, Default)]
struct Trace {
    /// Per step, the node that answered (if any).
    answering: Vec<Option<usize>>,
    /// Writes acknowledged.
    acked: usize,
}

impl Trace {
    /// Steps at which node `n` answered.
    fn steps_answered_by(&self, n: usize) -> usize {
        self.answering.iter().filter(|a| **a == Some(n)).count()
    }

    /// How many steps at the end all had node `n` answering.
    fn answering_at_the_end(&self, n: usize) -> usize {
        self.answering
            .iter()
            .rev()
            .take_while(|a| **a == Some(n))
            .count()
    }

    /// The first step at which node `n` answered.
    fn first_answer_by(&self, n: usize) -> Option<usize> {
        self.answering.iter().position(|a| *a == Some(n))
    }

    /// The last step at which node `n` answered.
    fn last_answer_by(&self, n: usize) -> Option<usize> {
        self.answering.iter().rposition(|a| *a == Some(n))
    }
}

/// Advances `d` one step at a time; if `writes`, a client writes one block per step to
/// whichever node answers. Checks both safety properties after every step.
fn run(pair: &mut Pair, d: Duration, writes: bool, context: &str) -> Trace {
    let mut trace = Trace::default();
    let steps = d.as_millis() / STEP.as_millis();
    for step in 0..steps {
        pair.advance(STEP);
        check_safety(pair, context);
        let answering = (0..2).find(|&n| pair.answers(n));
        if let (true, Some(n)) = (writes, answering) {
            if pair.write(n, step as usize % BLOCKS).is_some() {
                trace.acked += 1;
            }
            check_safety(pair, context);
        }
        trace.answering.push(answering);
    }
    trace
}

/// A healthy pair after its first second: node 0 primary, connected, in sync.
fn started_pair() -> Pair {
    let mut pair = Pair::healthy();
    run(&mut pair, secs(1), false, "start");
    assert_eq!(pair.serving(), [true, false]);
    assert!(pair.answers(0));
    pair
}

fn saw(pair: &Pair, n: usize, pred: impl Fn(&Action) -> bool) -> bool {
    pair.nodes[n].actions.iter().any(pred)
}

fn checked_the_wire(pair: &Pair, n: usize) -> bool {
    saw(pair, n, |a| *a == Action::CheckWire)
}

fn heartbeat_dead_time(pair: &Pair) -> Duration {
    pair.nodes[0].machine.config().heartbeat_dead_time
}

/// Both connected, nothing left to resync, same data, node `primary` the only primary.
fn assert_rejoined(pair: &Pair, primary: usize) {
    assert!(pair.is_connected(), "reconnected");
    for n in 0..2 {
        let s = pair.nodes[n].status();
        assert_eq!(s.conn, ConnState::Connected, "node {n}");
        assert_eq!(s.repl, ReplState::Established, "node {n} resynced");
        assert_eq!(s.disk, DiskState::UpToDate, "node {n}");
    }
    assert!(pair.in_sync(), "both disks hold the same data");
    assert_eq!(pair.role(primary), Role::Primary);
    assert_eq!(pair.role(1 - primary), Role::Secondary);
    for b in 0..BLOCKS {
        assert!(
            pair.nodes[1 - primary].blocks[b] >= pair.acked[b],
            "block {b}: an acknowledged write is missing on the secondary"
        );
    }
}

#[test]
fn replication_network_down_outdates_the_secondary_and_the_primary_goes_on() {
    let mut pair = started_pair();
    pair.set_replication_net(false);
    let trace = run(&mut pair, secs(30), true, "replication network down");
    assert!(trace.answering.iter().all(|a| *a != Some(1)), "no failover");
    assert_eq!(pair.role(1), Role::Secondary);
    assert_eq!(
        pair.nodes[1].status().disk,
        DiskState::Outdated,
        "the primary had the secondary outdated over the client network's heartbeat path"
    );
    assert!(pair.nodes[1].flags & twinblade::wire::ondisk::flags::OUTDATED != 0);
    // The heartbeat over the client network keeps the primary's lease. The link is declared
    // dead after twice the heartbeat dead time of silence; from then on the primary answers
    // nothing the secondary lacks until the secondary has persisted Outdated: one heartbeat
    // round trip, a pause of a few steps, never a second node answering.
    let dead_time = heartbeat_dead_time(&pair);
    let link_dropped = (2 * dead_time).as_millis() / STEP.as_millis();
    let pause: Vec<usize> = (0..trace.answering.len())
        .filter(|&i| trace.answering[i] != Some(0))
        .collect();
    assert!(
        !pause.is_empty() && pause.len() <= 3,
        "the primary pauses only while it fences its peer: {pause:?}"
    );
    assert!(
        pause.iter().all(|&i| i + 1 >= link_dropped as usize),
        "no pause before the link is dropped: {pause:?}"
    );
    assert!(trace.acked > 200, "the client's writes went on");
    assert!(!pair.in_sync(), "the secondary missed writes");

    // Heal: the nodes reconnect and resync without any command.
    pair.set_replication_net(true);
    run(&mut pair, secs(5), true, "healed");
    assert_rejoined(&pair, 0);
}

#[test]
fn power_loss_of_the_primary_fails_over_after_the_dead_time_and_the_wire_guard() {
    let mut pair = started_pair();
    run(&mut pair, secs(2), true, "before");
    pair.power_loss(0);
    let dead_time = heartbeat_dead_time(&pair);
    let trace = run(&mut pair, secs(5), true, "after the power loss");
    let first = trace.first_answer_by(1).expect("node 1 took over");
    let took = STEP * (first as u32 + 1);
    // Silent for the dead time, then half a dead time for a primary that lost the link at
    // the same moment to answer first, then the wire guard.
    let expected = dead_time + dead_time / 2;
    assert!(
        took >= expected && took <= expected + 2 * STEP,
        "took over after {took:?}"
    );
    assert!(checked_the_wire(&pair, 1));
    assert!(
        pair.nodes[1].status().conn == ConnState::Connecting,
        "the link was dropped as dead, not seen closing"
    );
    assert!(trace.acked > 30);
    for b in 0..BLOCKS {
        assert!(pair.nodes[1].blocks[b] >= pair.acked[b]);
    }
}

#[test]
fn a_frozen_primary_is_replaced_and_rejoins_as_secondary() {
    for frozen_for in [3, 15, 30] {
        let context = format!("frozen for {frozen_for} s");
        let mut pair = started_pair();
        run(&mut pair, secs(2), true, &context);
        pair.freeze(0);
        let trace = run(&mut pair, secs(frozen_for), true, &context);
        assert!(
            trace.first_answer_by(1).is_some(),
            "{context}: node 1 took over"
        );
        assert_eq!(
            trace.last_answer_by(0),
            None,
            "{context}: a frozen node answers nothing"
        );
        pair.thaw(0);
        check_safety(&pair, &context);
        let after = run(&mut pair, secs(15), true, &context);
        assert_eq!(
            after.steps_answered_by(0),
            0,
            "{context}: the woken node never answers"
        );
        assert!(
            saw(
                &pair,
                0,
                |a| matches!(a, Action::Log(l) if l.contains("demoting"))
            ),
            "{context}: the woken node demoted itself"
        );
        assert!(
            saw(&pair, 0, |a| matches!(
                a,
                Action::StartResync {
                    direction: twinblade::cluster::SyncDirection::Target,
                    ..
                }
            )),
            "{context}: the woken node resynced from the new primary"
        );
        assert_rejoined(&pair, 1);
        assert!(after.acked > 100, "{context}: the client's writes went on");
    }
}

#[test]
fn a_single_heartbeat_path_lost_is_no_failover() {
    // Path 1 (the client network) alone.
    let mut pair = started_pair();
    pair.set_client_net(false);
    let trace = run(&mut pair, secs(30), true, "client network down");
    assert_eq!(
        trace.steps_answered_by(0),
        trace.answering.len(),
        "the primary answers throughout"
    );
    assert!(pair.is_connected());
    assert!(
        !checked_the_wire(&pair, 1),
        "nobody even thought of failing over"
    );
    pair.set_client_net(true);
    run(&mut pair, secs(2), true, "client network back");
    assert_rejoined(&pair, 0);

    // Path 0 goes with the replication network: the link is lost, but path 1 still hears.
    let mut pair = started_pair();
    pair.set_replication_net(false);
    run(&mut pair, secs(30), true, "replication network down");
    assert_eq!(pair.role(1), Role::Secondary, "no failover");
    assert!(!checked_the_wire(&pair, 1));
}

#[test]
fn both_heartbeat_paths_blocked_while_the_link_works_is_no_failover() {
    let mut pair = started_pair();
    pair.block_heartbeat(0, true);
    let trace = run(&mut pair, secs(30), true, "heartbeat blocked");
    assert_eq!(
        trace.steps_answered_by(0),
        trace.answering.len(),
        "the primary answers throughout: the link counts as hearing it"
    );
    assert!(pair.is_connected());
    assert_eq!(pair.role(1), Role::Secondary);
    assert!(!checked_the_wire(&pair, 1));
    pair.block_heartbeat(0, false);
    run(&mut pair, secs(2), true, "heartbeat back");
    assert_rejoined(&pair, 0);
}

#[test]
fn heartbeat_blocked_and_link_dropped_never_makes_two_primaries() {
    let mut pair = started_pair();
    pair.block_heartbeat(0, true);
    pair.drop_traffic();
    let dead_time = heartbeat_dead_time(&pair);
    let trace = run(&mut pair, secs(30), true, "heartbeat blocked, link dropped");
    // The primary answers only while its lease holds...
    let lapsed = trace
        .answering
        .iter()
        .position(|a| *a != Some(0))
        .expect("the primary stopped answering");
    assert!(
        STEP * lapsed as u32 <= dead_time * 2 / 3,
        "the primary stopped answering when its lease lapsed"
    );
    // ...then both find the other silent everywhere. The primary passes its gate first and
    // serves alone; the secondary's wire guard sees it answering and does not promote.
    assert_eq!(trace.steps_answered_by(1), 0, "no second primary");
    assert!(checked_the_wire(&pair, 1));
    assert!(saw(&pair, 1, |a| matches!(
        a,
        Action::Log(l) if l.contains("another MAC answers")
    )));
    assert!(
        trace.answering_at_the_end(0) * STEP.as_millis() as usize >= 25_000,
        "the primary answers again"
    );
    assert!(trace.acked > 200);
}

#[test]
fn the_wire_guard_stops_a_promotion_while_the_peer_answers_unheard() {
    // Node 0 serves alone (Open) after node 1 died; node 1 comes back as a degraded primary
    // (it believes its data is the newest) with the link cut and its heartbeat blocked: the
    // only thing that can tell it node 0 serves is the wire guard.
    let mut pair = started_pair();
    pair.crash(1);
    let trace = run(&mut pair, secs(5), true, "node 1 down");
    assert!(trace.answering_at_the_end(0) > 0);
    pair.cut();
    pair.block_heartbeat(1, true);
    let config = Config {
        degr_wfc_timeout: Some(secs(10)),
        ..Config::default()
    };
    let degraded = Startup {
        disk: DiskState::Consistent,
        crashed_primary: false,
        degraded: true,
    };
    pair.restart(1, config, degraded);
    let trace = run(&mut pair, secs(30), true, "node 1 back, unheard");
    assert_eq!(trace.steps_answered_by(1), 0, "node 1 never answers");
    assert_eq!(trace.steps_answered_by(0), trace.answering.len());
    assert!(checked_the_wire(&pair, 1));
    assert!(saw(&pair, 1, |a| matches!(
        a,
        Action::Log(l) if l.contains("another MAC answers")
    )));
    assert_eq!(pair.role(1), Role::Secondary);
}

#[test]
fn a_rival_on_the_wire_stops_the_primary() {
    let mut pair = started_pair();
    pair.step(0, Event::RivalAnswered);
    assert!(!pair.answers(0));
    assert_eq!(pair.role(0), Role::Secondary);
    assert!(saw(&pair, 0, |a| *a == Action::StopServing));
    let trace = run(&mut pair, secs(10), true, "after the rival");
    assert_eq!(
        trace.steps_answered_by(0),
        0,
        "no automatic promotion after a rival"
    );
    // The operator resumes.
    pair.command(0, Command::Primary { force: false });
    run(&mut pair, secs(1), true, "resumed");
    assert!(pair.answers(0));
}

#[test]
fn a_silent_link_is_dropped_while_the_heartbeat_hears_and_nobody_fails_over() {
    let mut pair = started_pair();
    pair.drop_traffic();
    let dead_time = heartbeat_dead_time(&pair);
    run(&mut pair, 2 * dead_time - STEP, true, "link silent");
    assert!(
        pair.is_connected(),
        "not yet: twice the heartbeat dead time"
    );
    let trace = run(&mut pair, secs(10), true, "link dropped");
    assert_ne!(pair.nodes[0].status().conn, ConnState::Connected);
    assert_eq!(pair.role(1), Role::Secondary);
    assert_eq!(pair.nodes[1].status().disk, DiskState::Outdated);
    assert!(
        trace.answering_at_the_end(0) > 80,
        "the primary answers again"
    );
    pair.restore();
    run(&mut pair, secs(3), true, "link back");
    assert_rejoined(&pair, 0);
}

#[test]
fn crashed_secondary_leaves_the_primary_answering() {
    let mut pair = started_pair();
    pair.crash(1);
    let trace = run(&mut pair, secs(5), true, "secondary down");
    assert!(
        trace.answering_at_the_end(0) >= 40,
        "the primary answers again within a second"
    );
    let uuids: UuidSet = pair.nodes[0].uuids;
    assert_ne!(
        uuids.bitmap, 0,
        "a new generation, the old one kept for the resync"
    );
}

#[test]
fn a_frozen_primary_woken_after_its_successor_died_serves_nothing_old() {
    let mut pair = started_pair();
    pair.freeze(0);
    let trace = run(&mut pair, secs(5), true, "node 0 frozen");
    assert!(trace.first_answer_by(1).is_some(), "node 1 took over");
    assert!(trace.acked > 20);
    // The new primary dies; the old one wakes up to silence and an empty wire.
    pair.power_loss(1);
    pair.thaw(0);
    let trace = run(&mut pair, secs(30), true, "node 0 woken, node 1 gone");
    assert_eq!(
        trace.steps_answered_by(0),
        0,
        "the woken node cannot know it was not replaced: it must not serve its old data"
    );
    assert_eq!(pair.role(0), Role::Secondary);
    assert!(saw(&pair, 0, |a| matches!(
        a,
        Action::Log(l) if l.contains("stood still")
    )));
    // Node 1 comes back: the handshake settles whose data is newer.
    pair.restart_from_disk(1, Config::default());
    run(&mut pair, secs(10), true, "node 1 back");
    assert_rejoined(&pair, 1);
}

#[test]
fn a_secondary_that_saw_the_primary_serve_alone_never_serves_without_its_writes() {
    // The link is cut and the secondary's heartbeat blocked: the primary passes its gate first
    // and serves alone; the secondary's wire guard sees it.
    let mut pair = started_pair();
    pair.block_heartbeat(1, true);
    pair.cut();
    let trace = run(&mut pair, secs(5), true, "unheard");
    assert_eq!(trace.steps_answered_by(1), 0);
    assert!(
        trace.answering_at_the_end(0) > 30,
        "the primary serves alone"
    );
    assert_eq!(
        pair.nodes[1].status().disk,
        DiskState::Outdated,
        "somebody serves without it: its data is old"
    );
    // The primary dies: the secondary's guard now finds nobody, but it knows it is behind.
    pair.power_loss(0);
    let trace = run(&mut pair, secs(30), true, "primary gone");
    assert_eq!(trace.steps_answered_by(1), 0, "no failover to old data");
    assert_eq!(pair.role(1), Role::Secondary);
}
