//! Random faults and writes against a simulated pair.
//!
//! * Link faults (proptest): two connected nodes never both serve, and two connected nodes
//!   with nothing left to resync hold the same data.
//! * Seeded schedules of network faults, heartbeat blocks, freezes, power losses, crashes and
//!   restarts under resource-only fencing, with a client writing to whichever node answers:
//!   after every step at most one node answers and it holds every acknowledged write; once
//!   everything is healed the pair is back together (or waits for the operator after a split
//!   brain the handshake found) and both nodes hold every acknowledged write. A failure prints
//!   the seed and the schedule.
//! * The same with a witness, each node's way to it cut and restored at random and the witness
//!   restarting: here the faults may take every channel between the nodes away (the case only
//!   a third vote decides), and the safety properties still hold at every step.

use proptest::prelude::*;
use std::time::Duration;
use twinblade::cluster::sim::{Pair, BLOCKS, STEP};
use twinblade::cluster::{Config, ConnState, ReplState, Startup};
use twinblade::ha::witness::Book;
use twinblade::repl::uuid::UuidSet;

#[derive(Debug, Clone, Copy)]
enum Op {
    Advance(u64),
    Write(usize, usize),
    Cut,
    Drop,
    Restore,
    Stall(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (100u64..20_000).prop_map(Op::Advance),
        4 => (0usize..2, 0usize..BLOCKS).prop_map(|(n, b)| Op::Write(n, b)),
        1 => Just(Op::Cut),
        1 => Just(Op::Drop),
        2 => Just(Op::Restore),
        1 => (0usize..2, any::<bool>()).prop_map(|(n, s)| Op::Stall(n, s)),
    ]
}

fn settled(pair: &Pair) -> bool {
    pair.is_connected()
        && pair.nodes.iter().all(|n| {
            let s = n.status();
            s.conn == ConnState::Connected
                && s.repl == ReplState::Established
                && n.pending.is_empty()
        })
}

proptest! {
    #[test]
    fn connected_nodes_never_both_serve(ops in proptest::collection::vec(op(), 1..40)) {
        let mut pair = Pair::healthy();
        pair.advance(Duration::from_secs(1));
        for op in ops {
            match op {
                Op::Advance(ms) => pair.advance(Duration::from_millis(ms)),
                Op::Write(n, b) => { let _ = pair.write(n, b); }
                Op::Cut => pair.cut(),
                Op::Drop => pair.drop_traffic(),
                Op::Restore => pair.restore(),
                Op::Stall(n, s) => pair.stall_writes(n, s),
            }
            let connected = pair.nodes.iter().all(|n| n.status().conn == ConnState::Connected);
            if pair.is_connected() && connected {
                prop_assert!(pair.serving_count() <= 1, "both serve while connected: {:?}", op);
            }
            if settled(&pair) {
                prop_assert!(pair.in_sync(), "connected, nothing to resync, data differs after {:?}", op);
            }
        }
    }
}

/// A fault the seeded schedules inject.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Cut,
    DropLink,
    ReplicationNet(bool),
    ClientNet(bool),
    BlockHeartbeat(usize, bool),
    Freeze(usize),
    Thaw(usize),
    PowerLoss(usize),
    Crash(usize),
    Restart(usize),
    Heal,
    WitnessReach(usize, bool),
    WitnessRestart,
}

/// The seeded generator of the schedules (xorshift64, like the simulator's).
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Xorshift {
        Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_fault(rng: &mut Xorshift, witness: bool) -> Fault {
    let n = rng.below(2) as usize;
    if witness && rng.below(4) == 0 {
        return match rng.below(5) {
            0 => Fault::WitnessRestart,
            1 | 2 => Fault::WitnessReach(n, false),
            _ => Fault::WitnessReach(n, true),
        };
    }
    match rng.below(15) {
        0 => Fault::Cut,
        1 => Fault::DropLink,
        2 => Fault::ReplicationNet(false),
        3 => Fault::ReplicationNet(true),
        4 => Fault::ClientNet(false),
        5 => Fault::ClientNet(true),
        6 => Fault::BlockHeartbeat(n, true),
        7 => Fault::BlockHeartbeat(n, false),
        8 => Fault::Freeze(n),
        9 | 10 => Fault::Thaw(n),
        11 => Fault::PowerLoss(n),
        12 => Fault::Crash(n),
        13 => Fault::Restart(n),
        _ => Fault::Heal,
    }
}

fn config(n: usize, witness: bool) -> Config {
    Config {
        preferred_primary: n == 0,
        witness,
        ..Config::default()
    }
}

/// Applies `fault`; a network fault that would leave the two nodes no channel to each other
/// (see [`Pair::nodes_keep_a_channel`]) is taken back. Returns whether it was applied.
fn inject(pair: &mut Pair, fault: Fault, witness: bool) -> bool {
    match fault {
        Fault::Cut => pair.cut(),
        Fault::DropLink => pair.drop_traffic(),
        Fault::ReplicationNet(up) => pair.set_replication_net(up),
        Fault::ClientNet(up) => pair.set_client_net(up),
        Fault::BlockHeartbeat(n, blocked) => pair.block_heartbeat(n, blocked),
        Fault::Freeze(n) => pair.freeze(n),
        Fault::Thaw(n) => pair.thaw(n),
        Fault::PowerLoss(n) => pair.power_loss(n),
        Fault::Crash(n) => pair.crash(n),
        Fault::Restart(n) => {
            if pair.nodes[n].up {
                return false;
            }
            pair.restart_from_disk(n, config(n, witness));
        }
        Fault::Heal => pair.heal(),
        Fault::WitnessReach(n, up) => pair.set_witness_reachable(n, up),
        Fault::WitnessRestart => pair.restart_witness(),
    }
    if witness || pair.nodes_keep_a_channel() {
        return true;
    }
    match fault {
        Fault::Cut | Fault::DropLink => pair.restore(),
        Fault::ReplicationNet(_) => pair.set_replication_net(true),
        Fault::ClientNet(_) => pair.set_client_net(true),
        Fault::BlockHeartbeat(n, _) => pair.block_heartbeat(n, false),
        _ => unreachable!("only network faults take channels away"),
    }
    false
}

/// Both safety properties, now.
fn safety_violation(pair: &Pair) -> Option<String> {
    if pair.answering_count() > 1 {
        return Some(format!(
            "both nodes answer:\n  {:?}\n  {:?}",
            pair.nodes[0].status(),
            pair.nodes[1].status()
        ));
    }
    pair.missing_acked_write().map(|(n, block, acked, served)| {
        format!(
            "node {n} answers block {block} at version {served}, version {acked} was acknowledged"
        )
    })
}

/// One seeded schedule: 60 s of faults and client writes (to whichever node answers), then
/// everything healed. Returns the faults injected, or a violation of a safety property.
fn run_schedule(
    seed: u64,
    witness: bool,
    schedule: &mut Vec<(Duration, Fault)>,
) -> Result<(), String> {
    let mut rng = Xorshift::new(seed);
    let mut pair = Pair::new(
        [config(0, witness), config(1, witness)],
        [Startup::consistent(); 2],
        [UuidSet {
            current: 0x1000,
            ..Default::default()
        }; 2],
    );
    if witness {
        let book = std::sync::Arc::new(std::sync::Mutex::new(Book::default()));
        pair.set_witness(book, "lab", ["alpha", "beta"]);
    }
    pair.advance(Duration::from_secs(1));
    let start = pair.now;
    let steps = Duration::from_secs(60).as_millis() / STEP.as_millis();
    for _ in 0..steps {
        if rng.below(12) == 0 {
            let fault = random_fault(&mut rng, witness);
            if inject(&mut pair, fault, witness) {
                schedule.push((pair.now - start, fault));
            }
            if let Some(v) = safety_violation(&pair) {
                return Err(v);
            }
        }
        pair.advance(STEP);
        if let Some(v) = safety_violation(&pair) {
            return Err(v);
        }
        if let Some(n) = (0..2).find(|&n| pair.answers(n)) {
            pair.write(n, rng.below(BLOCKS as u64) as usize);
            if let Some(v) = safety_violation(&pair) {
                return Err(format!("after a write to node {n}: {v}"));
            }
        }
    }
    // Everything healed: the pair comes back together with every acknowledged write.
    pair.heal();
    for n in 0..2 {
        pair.thaw(n);
        pair.set_witness_reachable(n, true);
        if !pair.nodes[n].up {
            pair.restart_from_disk(n, config(n, witness));
        }
    }
    for _ in 0..(Duration::from_secs(90).as_millis() / STEP.as_millis()) {
        pair.advance(STEP);
        if let Some(v) = safety_violation(&pair) {
            return Err(format!("while healing: {v}"));
        }
    }
    // A split brain found by the UUID handshake (each side started a generation while the
    // other was away, one after the other) waits for the operator: safe, not back together.
    if pair
        .nodes
        .iter()
        .any(|n| n.status().conn == ConnState::StandAlone)
    {
        return Ok(());
    }
    let answering: Vec<usize> = (0..2).filter(|&n| pair.answers(n)).collect();
    let missing = (0..BLOCKS).find(|&b| pair.nodes.iter().any(|n| n.blocks[b] < pair.acked[b]));
    if answering.len() != 1 || !settled(&pair) || missing.is_some() {
        return Err(format!(
            "not back together after healing: answering {answering:?}, settled {}, acknowledged block missing on a node: {missing:?}\n  {:?}\n  {:?}",
            settled(&pair),
            pair.nodes[0].status(),
            pair.nodes[1].status()
        ));
    }
    Ok(())
}

#[test]
fn seeded_fault_schedules_keep_both_safety_properties() {
    seeded_schedules(false);
}

#[test]
fn seeded_fault_schedules_with_a_witness_keep_both_safety_properties() {
    seeded_schedules(true);
}

fn seeded_schedules(witness: bool) {
    for seed in 0..300 {
        let mut schedule = Vec::new();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_schedule(seed, witness, &mut schedule)
        }));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(violation)) => violation,
            Err(_) => "the simulation panicked (see above)".to_string(),
        };
        let schedule: Vec<String> = schedule
            .iter()
            .map(|(at, fault)| format!("  {:>6} ms  {fault:?}", at.as_millis()))
            .collect();
        panic!("seed {seed}: {failure}\nschedule:\n{}", schedule.join("\n"));
    }
}
