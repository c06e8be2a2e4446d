//! Random link faults and writes against a simulated pair: whatever happens, two connected
//! nodes never both serve, and two connected nodes with nothing left to resync hold the same
//! data.

use proptest::prelude::*;
use std::time::Duration;
use twinblade::cluster::sim::{Pair, BLOCKS};
use twinblade::cluster::{ConnState, ReplState};

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
