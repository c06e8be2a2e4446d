//! What the simulated-pair tests share: the two safety checks after every step, and a client
//! that writes to whichever node answers.

use std::time::Duration;
use twinblade::cluster::sim::{Pair, BLOCKS, STEP};

/// Checks both safety properties now: never two nodes answering, and the node that answers
/// holds every acknowledged write.
pub fn check_safety(pair: &Pair, context: &str) {
    assert!(
        pair.answering_count() <= 1,
        "{context}: both nodes answer ({:?} / {:?})",
        pair.nodes[0].status(),
        pair.nodes[1].status()
    );
    if let Some((n, block, acked, served)) = pair.missing_acked_write() {
        panic!("{context}: node {n} answers with block {block} at version {served}, but version {acked} was acknowledged");
    }
}

/// Advances `d` step by step, a client writing one block per step to whichever node answers;
/// checks both safety properties after every step and calls `each` too. Returns how many
/// writes were acknowledged.
#[allow(dead_code)] // not every test binary that shares this module runs a client
pub fn run(pair: &mut Pair, d: Duration, context: &str, mut each: impl FnMut(&Pair)) -> usize {
    let mut acked = 0;
    for step in 0..(d.as_millis() / STEP.as_millis()) {
        pair.advance(STEP);
        check_safety(pair, context);
        each(pair);
        if let Some(n) = (0..2).find(|&n| pair.answers(n)) {
            if pair.write(n, step as usize % BLOCKS).is_some() {
                acked += 1;
            }
            check_safety(pair, context);
            each(pair);
        }
    }
    acked
}
