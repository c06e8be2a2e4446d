//! The activity log: which extents may have writes in flight or not yet durable.
//!
//! The data is divided into extents (4 MiB by default). At most `al-extents` of them are
//! *hot* at once; each hot extent occupies a slot. A write may only touch hot extents, and an
//! extent becomes hot only through a **transaction** written (FUA) to the on-disk ring before
//! the first write into it. Hot extents stay hot until a cold extent needs their slot; then the
//! least recently used one with no write in flight is evicted in the same transaction. So a
//! random-write workload whose working set fits in the log costs no meta-data I/O at all; only
//! a write into a cold extent costs one transaction (up to 64 extents per transaction).
//!
//! # Transactions and recovery
//!
//! Transaction `n` is written to ring slot `n % ring length`. Besides its updates (slot →
//! extent) it carries a *context*: the contents of up to 916 consecutive slots, starting where
//! the previous transaction's context ended. The ring is long enough that the contexts of all
//! but the newest transaction name every slot (`(ring - 1) * 916 >= al-extents`), so after a
//! crash that tore the newest transaction the log is still complete. A *reset* transaction
//! empties every slot first; the first transaction after attach is one.
//!
//! [`recover`] walks back from the newest valid transaction through consecutive numbers, stops
//! at a reset, and replays oldest to newest. If some slot is named by none of the replayed
//! transactions (only possible if more than the newest transaction was lost), the result is
//! marked incomplete and the caller must treat the whole device as out of sync.
//!
//! This module is pure: no I/O. [`super::MetaStore`] does the writing and the ordering.

use std::collections::{BTreeSet, HashMap};

use crate::wire::ondisk::{
    AlKind, AlTransaction, AlTransactionRepr, AL_CONTEXT_PER_TR, AL_FREE, AL_UPDATES_PER_TR,
};
use crate::wire::Error as WireError;

/// The in-memory activity log.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    md_uuid: u64,
    ring_len: u32,
    slots: Vec<u32>,
    index: HashMap<u32, usize>,
    refs: Vec<u32>,
    pending: Vec<bool>,
    last_use: Vec<u64>,
    tick: u64,
    next_number: u64,
    context_cursor: usize,
    needs_reset: bool,
}

/// A transaction to write, and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The transaction.
    pub transaction: AlTransactionRepr,
    /// Ring slot it goes to.
    pub ring_slot: u32,
    /// Extents that become hot.
    pub loaded: Vec<u32>,
    /// Extents that leave the log: their bitmap pages and data must be durable first.
    pub evicted: Vec<u32>,
}

/// Why no transaction could be planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// Every slot holds an extent with a write in flight (or one this request needs).
    Full,
    /// The request needs more extents than there are slots.
    TooLarge,
}

impl ActivityLog {
    /// An empty log whose next transaction is number `next_number` (a reset).
    pub fn new(al_extents: u32, ring_len: u32, md_uuid: u64, next_number: u64) -> Self {
        let n = al_extents as usize;
        ActivityLog {
            md_uuid,
            ring_len,
            slots: vec![AL_FREE; n],
            index: HashMap::new(),
            refs: vec![0; n],
            pending: vec![false; n],
            last_use: vec![0; n],
            tick: 0,
            next_number,
            context_cursor: 0,
            needs_reset: true,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The number the next transaction gets.
    pub fn next_number(&self) -> u64 {
        self.next_number
    }

    /// Whether `extent` is hot and committed (writes may go to it).
    pub fn is_hot(&self, extent: u32) -> bool {
        self.index.get(&extent).is_some_and(|&s| !self.pending[s])
    }

    /// Hot extents (committed or being committed), sorted.
    pub fn hot_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Writes in flight, summed over all extents.
    pub fn in_flight(&self) -> u64 {
        self.refs.iter().map(|&r| r as u64).sum()
    }

    /// If every extent is hot and committed, counts a write in flight on each and returns true.
    pub fn try_acquire(&mut self, extents: &[u32]) -> bool {
        if !extents.iter().all(|&e| self.is_hot(e)) {
            return false;
        }
        self.tick += 1;
        for e in extents {
            let s = self.index[e];
            self.refs[s] += 1;
            self.last_use[s] = self.tick;
        }
        true
    }

    /// Ends a write on each extent.
    pub fn release(&mut self, extents: &[u32]) {
        for e in extents {
            if let Some(&s) = self.index.get(e) {
                self.refs[s] = self.refs[s].saturating_sub(1);
            }
        }
    }

    /// Plans the next transaction towards making all of `wanted` hot. `Ok(None)`: nothing
    /// to do. The plan is applied to the in-memory state at once, with the loaded extents
    /// marked pending until [`commit`](Self::commit).
    pub fn plan(&mut self, wanted: &[u32]) -> Result<Option<Plan>, PlanError> {
        if wanted.len() > self.slots.len() {
            return Err(PlanError::TooLarge);
        }
        let cold: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|e| !self.index.contains_key(e))
            .take(AL_UPDATES_PER_TR)
            .collect();
        if cold.is_empty() {
            return Ok(None);
        }
        // Free slots first, then least recently used idle extents not in this request.
        let mut free: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s] == AL_FREE)
            .collect();
        free.reverse();
        let mut victims: Vec<usize> = (0..self.slots.len())
            .filter(|&s| {
                self.slots[s] != AL_FREE
                    && self.refs[s] == 0
                    && !self.pending[s]
                    && !wanted.contains(&self.slots[s])
            })
            .collect();
        victims.sort_by_key(|&s| std::cmp::Reverse(self.last_use[s]));
        let mut updates = Vec::new();
        let mut loaded = Vec::new();
        let mut evicted = Vec::new();
        for e in cold {
            let slot = match free.pop() {
                Some(s) => s,
                None => match victims.pop() {
                    Some(s) => {
                        let old = self.slots[s];
                        self.index.remove(&old);
                        evicted.push(old);
                        s
                    }
                    None => break,
                },
            };
            self.slots[slot] = e;
            self.index.insert(e, slot);
            self.pending[slot] = true;
            self.refs[slot] = 0;
            updates.push((slot as u16, e));
            loaded.push(e);
        }
        if updates.is_empty() {
            return Err(PlanError::Full);
        }
        let n = self.slots.len();
        let ctx_len = n.min(AL_CONTEXT_PER_TR);
        let context_start = self.context_cursor;
        let context = (0..ctx_len)
            .map(|i| self.slots[(context_start + i) % n])
            .collect();
        self.context_cursor = (context_start + ctx_len) % n;
        let number = self.next_number;
        self.next_number += 1;
        let kind = if std::mem::take(&mut self.needs_reset) {
            AlKind::Reset
        } else {
            AlKind::Update
        };
        Ok(Some(Plan {
            transaction: AlTransactionRepr {
                md_uuid: self.md_uuid,
                number,
                kind,
                updates,
                context_start: context_start as u16,
                context,
            },
            ring_slot: (number % self.ring_len as u64) as u32,
            loaded,
            evicted,
        }))
    }

    /// Marks a planned transaction durable: its extents may now be written.
    pub fn commit(&mut self, plan: &Plan) {
        for e in &plan.loaded {
            if let Some(&s) = self.index.get(e) {
                self.pending[s] = false;
            }
        }
    }

    /// Empties the log (clean shutdown). Returns false if a write is in flight.
    pub fn clear(&mut self) -> bool {
        if self.in_flight() > 0 || self.pending.iter().any(|&p| p) {
            return false;
        }
        self.slots.fill(AL_FREE);
        self.index.clear();
        self.needs_reset = true;
        true
    }
}

/// What [`recover`] found in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Extents the log names (they may hold writes the peer lacks, or the other way round).
    pub extents: BTreeSet<u32>,
    /// Whether every slot was accounted for. If not, the caller must resync everything.
    pub complete: bool,
    /// Number of the newest valid transaction.
    pub newest: Option<u64>,
    /// Transactions replayed.
    pub replayed: usize,
    /// Ring slots holding a valid transaction of this meta-data.
    pub valid: usize,
    /// Ring slots holding anything else (never written, torn, corrupt, foreign).
    pub invalid: usize,
}

/// Parses one ring slot; anything but a transaction of this meta-data, in its own ring slot,
/// naming only existing slots, is rejected.
pub fn parse_slot(
    block: &[u8],
    ring_slot: u32,
    ring_len: u32,
    md_uuid: u64,
    al_extents: u32,
) -> Result<AlTransactionRepr, WireError> {
    let tr = AlTransactionRepr::parse(&AlTransaction::new_checked(block)?)?;
    let bad = |field| WireError::Malformed { field };
    if tr.md_uuid != md_uuid {
        return Err(bad("md_uuid"));
    }
    if tr.number % ring_len as u64 != ring_slot as u64 {
        return Err(bad("number"));
    }
    if tr.updates.iter().any(|&(s, _)| s as u32 >= al_extents)
        || tr.context_start as u32 >= al_extents
    {
        return Err(bad("slot"));
    }
    Ok(tr)
}

/// Rebuilds the log's contents from the ring (`ring[i]` is ring slot `i`, already checked with
/// [`parse_slot`]).
pub fn recover(ring: &[Result<AlTransactionRepr, WireError>], al_extents: u32) -> Recovery {
    let ring_len = ring.len() as u64;
    let valid = ring.iter().filter(|r| r.is_ok()).count();
    let mut rec = Recovery {
        valid,
        invalid: ring.len() - valid,
        ..Default::default()
    };
    let Some(newest) = ring.iter().flatten().map(|t| t.number).max() else {
        // Nothing valid at all: the log cannot say what was hot.
        rec.complete = false;
        return rec;
    };
    rec.newest = Some(newest);
    let mut chain: Vec<&AlTransactionRepr> = Vec::new();
    let mut k = newest;
    while (chain.len() as u64) < ring_len {
        match &ring[(k % ring_len) as usize] {
            Ok(t) if t.number == k => {
                chain.push(t);
                if t.kind == AlKind::Reset || k == 0 {
                    break;
                }
                k -= 1;
            }
            _ => break,
        }
    }
    chain.reverse();
    let n = al_extents as usize;
    let mut slots: Vec<Option<u32>> = vec![None; n];
    if chain.first().is_some_and(|t| t.kind == AlKind::Reset) {
        slots.fill(Some(AL_FREE));
    }
    for t in &chain {
        for &(s, e) in &t.updates {
            slots[s as usize] = Some(e);
        }
        for (i, &e) in t.context.iter().enumerate() {
            slots[(t.context_start as usize + i) % n] = Some(e);
        }
    }
    rec.replayed = chain.len();
    rec.complete = slots.iter().all(|s| s.is_some());
    rec.extents = slots
        .iter()
        .flatten()
        .copied()
        .filter(|&e| e != AL_FREE)
        .collect();
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes plans into a simulated ring, committing each.
    fn run(
        al: &mut ActivityLog,
        ring: &mut [Result<AlTransactionRepr, WireError>],
        wanted: &[u32],
    ) -> Vec<Plan> {
        let mut plans = Vec::new();
        while let Some(plan) = al.plan(wanted).unwrap() {
            ring[plan.ring_slot as usize] = Ok(plan.transaction.clone());
            al.commit(&plan);
            plans.push(plan);
        }
        assert!(al.try_acquire(wanted));
        al.release(wanted);
        plans
    }

    fn empty_ring(n: usize) -> Vec<Result<AlTransactionRepr, WireError>> {
        (0..n)
            .map(|_| Err(WireError::Malformed { field: "magic" }))
            .collect()
    }

    #[test]
    fn hot_extents_cost_no_transaction() {
        let mut al = ActivityLog::new(7, 8, 1, 0);
        let mut ring = empty_ring(8);
        let plans = run(&mut al, &mut ring, &[3, 4]);
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].transaction.kind, AlKind::Reset);
        assert_eq!(plans[0].loaded, vec![3, 4]);
        assert!(run(&mut al, &mut ring, &[4]).is_empty());
        assert!(run(&mut al, &mut ring, &[3, 4]).is_empty());
        let plans = run(&mut al, &mut ring, &[9]);
        assert_eq!(plans[0].transaction.kind, AlKind::Update);
        assert_eq!(al.hot_extents(), vec![3, 4, 9]);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_idle_extent() {
        let mut al = ActivityLog::new(7, 8, 1, 0);
        let mut ring = empty_ring(8);
        for e in 0..7 {
            run(&mut al, &mut ring, &[e]);
        }
        // Keep extent 0 busy; touch 1 so 2 is the oldest idle one.
        assert!(al.try_acquire(&[0]));
        assert!(al.try_acquire(&[1]));
        al.release(&[1]);
        let plans = run(&mut al, &mut ring, &[100]);
        assert_eq!(plans[0].evicted, vec![2]);
        assert!(!al.is_hot(2) && al.is_hot(100) && al.is_hot(0));
        assert!(!al.clear(), "a write is in flight");
        al.release(&[0]);
        assert!(al.clear());
        assert!(al.hot_extents().is_empty());
    }

    #[test]
    fn full_log_refuses_and_pending_extents_are_not_hot() {
        let mut al = ActivityLog::new(2, 8, 1, 0);
        let mut ring = empty_ring(8);
        run(&mut al, &mut ring, &[1, 2]);
        assert!(al.try_acquire(&[1, 2]));
        assert_eq!(al.plan(&[3]), Err(PlanError::Full));
        assert_eq!(al.plan(&[1, 2, 3]), Err(PlanError::TooLarge));
        al.release(&[1, 2]);
        let plan = al.plan(&[3]).unwrap().unwrap();
        assert!(!al.is_hot(3), "pending until committed");
        assert!(!al.try_acquire(&[3]));
        al.commit(&plan);
        assert!(al.try_acquire(&[3]));
    }

    #[test]
    fn recovery_of_an_empty_ring_is_incomplete() {
        let rec = recover(&empty_ring(8), 7);
        assert!(!rec.complete);
        assert_eq!(rec.newest, None);
        assert_eq!(rec.invalid, 8);
    }

    #[test]
    fn parse_slot_rejects_foreign_and_misplaced_transactions() {
        let mut al = ActivityLog::new(7, 8, 5, 3);
        let plan = al.plan(&[1, 2, 3]).unwrap().unwrap();
        let block = plan.transaction.to_block();
        assert!(parse_slot(&block, 3, 8, 5, 7).is_ok());
        assert!(parse_slot(&block, 4, 8, 5, 7).is_err());
        assert!(parse_slot(&block, 3, 8, 6, 7).is_err());
        assert!(parse_slot(&block, 3, 8, 5, 1).is_err());
        assert!(parse_slot(&block[..100], 3, 8, 5, 7).is_err());
    }

    proptest! {
        /// Random workloads on small logs; after each transaction the ring, with the newest
        /// transaction possibly torn, recovers exactly the hot set of the last durable one.
        #[test]
        fn recovery_rebuilds_the_hot_set(
            al_extents in 1u32..40,
            extra_ring in 0u32..3,
            requests in proptest::collection::vec(proptest::collection::vec(0u32..120, 1..4), 1..80),
            tear_last in any::<bool>(),
        ) {
            // Small logs with a tiny ring to stress context rotation; the ring is the smallest
            // that satisfies the capacity rule.
            let ring_len = ((al_extents as usize).div_ceil(AL_CONTEXT_PER_TR) as u32 + 1).max(2) + extra_ring;
            let mut al = ActivityLog::new(al_extents, ring_len, 9, 0);
            let mut ring = empty_ring(ring_len as usize);
            let mut durable_hot: BTreeSet<u32> = BTreeSet::new();
            for mut req in requests {
                req.sort_unstable();
                req.dedup();
                req.truncate(al_extents as usize);
                loop {
                    let plan = match al.plan(&req) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => panic!("{e:?}"),
                    };
                    if tear_last {
                        // The newest transaction may be torn: the previous state must come back.
                        let mut torn = ring.clone();
                        torn[plan.ring_slot as usize] = Err(WireError::Malformed { field: "checksum" });
                        let rec = recover(&torn, al_extents);
                        if !durable_hot.is_empty() {
                            prop_assert!(rec.complete);
                            prop_assert_eq!(&rec.extents, &durable_hot);
                        }
                    }
                    ring[plan.ring_slot as usize] = Ok(plan.transaction.clone());
                    al.commit(&plan);
                    durable_hot = al.hot_extents().into_iter().collect();
                    let rec = recover(&ring, al_extents);
                    prop_assert!(rec.complete);
                    prop_assert_eq!(&rec.extents, &durable_hot);
                }
                prop_assert!(al.try_acquire(&req));
                al.release(&req);
            }
        }
    }
}
