//! Ordering of overlapping requests for exports that run requests in parallel.
//!
//! The [`BlockDevice`](super::BlockDevice) contract says writes to overlapping ranges complete
//! in submission order. A single caller gets that for free; an export that hands requests to a
//! pool of threads does not, because a later request may overtake an earlier one. The export
//! therefore [`admit`](Sequencer::admit)s every request *in arrival order* (on the one thread
//! that reads requests off the wire) and gets a [`Ticket`]; the worker that runs the request
//! first [`wait`](Ticket::wait)s on the ticket, does the I/O, then drops the ticket.
//!
//! A ticket is ready when no *earlier* admitted ticket that conflicts with it is still alive.
//! Two requests conflict when their byte ranges overlap and at least one of them writes; a
//! [`Access::Barrier`] (a flush) conflicts with everything, earlier and later, whatever the
//! range. Reads never wait for reads and disjoint requests never wait for each other.
//!
//! Because a ticket only ever waits for earlier tickets, waiting cannot deadlock, with one
//! exception the caller must avoid: holding a ticket while waiting on a later one that conflicts
//! with it.
//!
//! The implementation scans the in-flight set on admission checks and wakes every waiter on
//! every completion. That is O(in-flight) per check, which is fine for the few hundred requests
//! an export keeps in flight.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What a request does to its range, for conflict detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads the range; conflicts only with writes and barriers.
    Read,
    /// Changes the range (write, write-zeroes, discard); conflicts with anything overlapping.
    Write,
    /// A flush: conflicts with every earlier and every later request, whatever its range.
    Barrier,
}

/// One admitted, not yet completed request.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    /// Exclusive; saturates at `u64::MAX` so a range near the top of the space stays valid.
    end: u64,
    access: Access,
}

impl Span {
    fn conflicts_with(&self, other: &Span) -> bool {
        match (self.access, other.access) {
            (Access::Barrier, _) | (_, Access::Barrier) => true,
            (Access::Read, Access::Read) => false,
            // An empty range touches nothing, so it overlaps nothing.
            _ => {
                self.start < self.end
                    && other.start < other.end
                    && self.start < other.end
                    && other.start < self.end
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Sequence number for the next admitted ticket; admission order is sequence order.
    next_seq: u64,
    /// Live tickets by sequence number.
    in_flight: BTreeMap<u64, Span>,
}

impl State {
    /// True when a ticket admitted before `seq` that conflicts with `span` is still alive.
    fn blocked(&self, seq: u64, span: &Span) -> bool {
        self.in_flight
            .range(..seq)
            .any(|(_, earlier)| earlier.conflicts_with(span))
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes synchronous waiters when a ticket completes.
    completed: Condvar,
    /// Wakes asynchronous waiters when a ticket completes.
    completed_async: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain map that no code path leaves half-updated, so a panic elsewhere
        // while holding the lock does not make it inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Admits requests in arrival order and makes conflicting ones complete in that order.
///
/// `Send + Sync`; share it through an `Arc` (or clone it: clones share the same state).
#[derive(Debug, Clone, Default)]
pub struct Sequencer {
    shared: Arc<Shared>,
}

impl Sequencer {
    /// An empty sequencer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits a request for `len` bytes at `offset`. Never blocks.
    ///
    /// Call this in arrival order; the returned ticket waits for every earlier conflicting
    /// ticket. Dropping the ticket marks the request complete.
    pub fn admit(&self, offset: u64, len: u64, access: Access) -> Ticket {
        let span = Span {
            start: offset,
            end: offset.saturating_add(len),
            access,
        };
        let mut state = self.shared.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.in_flight.insert(seq, span);
        Ticket {
            shared: Arc::clone(&self.shared),
            seq,
            span,
        }
    }

    /// Number of admitted tickets not yet dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight.len()
    }
}

/// An admitted request. Dropping it marks the request complete and wakes waiters.
#[derive(Debug)]
#[must_use = "dropping a ticket immediately marks the request complete"]
pub struct Ticket {
    shared: Arc<Shared>,
    seq: u64,
    span: Span,
}

impl Ticket {
    /// True when no earlier conflicting ticket is alive, so the request may run now.
    pub fn is_ready(&self) -> bool {
        !self.shared.lock().blocked(self.seq, &self.span)
    }

    /// Blocks until every earlier admitted conflicting ticket has been dropped.
    pub fn wait(&self) {
        let mut state = self.shared.lock();
        while state.blocked(self.seq, &self.span) {
            state = self
                .shared
                .completed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Like [`wait`](Self::wait), for async callers: suspends instead of blocking the thread.
    pub async fn wait_async(&self) {
        loop {
            let notified = self.shared.completed_async.notified();
            tokio::pin!(notified);
            // Register before checking, so a completion between the check and the await is not
            // missed (`notify_waiters` only wakes futures that are already registered).
            notified.as_mut().enable();
            if !self.shared.lock().blocked(self.seq, &self.span) {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.lock().in_flight.remove(&self.seq);
        self.shared.completed.notify_all();
        self.shared.completed_async.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    /// Long enough that a waiter that should have blocked would have visibly run.
    const HOLD: Duration = Duration::from_millis(100);

    #[test]
    fn overlapping_writes_complete_in_admission_order() {
        let seq = Sequencer::new();
        let first = seq.admit(0, 4096, Access::Write);
        let second = seq.admit(2048, 4096, Access::Write);
        assert!(first.is_ready());
        assert!(!second.is_ready());

        let first_done = Arc::new(AtomicBool::new(false));
        let slow = {
            let first_done = Arc::clone(&first_done);
            thread::spawn(move || {
                first.wait();
                thread::sleep(HOLD);
                first_done.store(true, Ordering::SeqCst);
                drop(first);
            })
        };
        let fast = {
            let first_done = Arc::clone(&first_done);
            thread::spawn(move || {
                second.wait();
                assert!(
                    first_done.load(Ordering::SeqCst),
                    "second write ran before the first completed"
                );
            })
        };
        slow.join().unwrap();
        fast.join().unwrap();
        assert_eq!(seq.in_flight(), 0);
    }

    #[test]
    fn disjoint_writes_do_not_wait() {
        let seq = Sequencer::new();
        let _first = seq.admit(0, 4096, Access::Write);
        let second = seq.admit(4096, 4096, Access::Write);
        let started = Instant::now();
        second.wait();
        assert!(started.elapsed() < HOLD);
        assert_eq!(seq.in_flight(), 2);
    }

    #[test]
    fn reads_do_not_wait_for_reads() {
        let seq = Sequencer::new();
        let _first = seq.admit(0, 4096, Access::Read);
        let second = seq.admit(0, 4096, Access::Read);
        assert!(second.is_ready());
        second.wait();
    }

    #[test]
    fn read_waits_for_earlier_overlapping_write_and_write_for_earlier_read() {
        let seq = Sequencer::new();
        let write = seq.admit(0, 1024, Access::Write);
        let read = seq.admit(512, 512, Access::Read);
        let later_write = seq.admit(512, 512, Access::Write);
        assert!(!read.is_ready());
        drop(write);
        assert!(read.is_ready());
        assert!(
            !later_write.is_ready(),
            "a write must wait for an earlier read"
        );
        drop(read);
        assert!(later_write.is_ready());
    }

    #[test]
    fn later_ticket_never_blocks_an_earlier_one() {
        let seq = Sequencer::new();
        let first = seq.admit(0, 512, Access::Write);
        let _second = seq.admit(0, 512, Access::Write);
        assert!(first.is_ready());
    }

    #[test]
    fn adjacent_and_empty_ranges_do_not_conflict() {
        let seq = Sequencer::new();
        let _write = seq.admit(512, 512, Access::Write);
        assert!(seq.admit(0, 512, Access::Write).is_ready());
        assert!(seq.admit(1024, 512, Access::Write).is_ready());
        assert!(seq.admit(700, 0, Access::Write).is_ready());
    }

    #[test]
    fn ranges_at_the_top_of_the_space_saturate() {
        let seq = Sequencer::new();
        let _write = seq.admit(u64::MAX - 10, 100, Access::Write);
        assert!(!seq.admit(u64::MAX - 1, 1, Access::Read).is_ready());
    }

    #[test]
    fn barrier_waits_for_earlier_writes_and_later_requests_wait_for_barrier() {
        let seq = Sequencer::new();
        let write = seq.admit(0, 512, Access::Write);
        let barrier = seq.admit(0, 0, Access::Barrier);
        let later_read = seq.admit(1 << 30, 512, Access::Read);
        assert!(!barrier.is_ready());

        let write_done = Arc::new(AtomicBool::new(false));
        let writer = {
            let write_done = Arc::clone(&write_done);
            thread::spawn(move || {
                write.wait();
                thread::sleep(HOLD);
                write_done.store(true, Ordering::SeqCst);
                drop(write);
            })
        };
        barrier.wait();
        assert!(write_done.load(Ordering::SeqCst));
        assert!(
            !later_read.is_ready(),
            "requests after a barrier wait for it"
        );
        drop(barrier);
        assert!(later_read.is_ready());
        writer.join().unwrap();
    }

    #[test]
    fn barrier_waits_for_earlier_reads() {
        let seq = Sequencer::new();
        let read = seq.admit(0, 512, Access::Read);
        let barrier = seq.admit(0, 0, Access::Barrier);
        assert!(!barrier.is_ready());
        drop(read);
        assert!(barrier.is_ready());
    }

    #[test]
    fn dropping_a_blocked_ticket_is_fine() {
        let seq = Sequencer::new();
        let first = seq.admit(0, 512, Access::Write);
        let second = seq.admit(0, 512, Access::Write);
        let third = seq.admit(0, 512, Access::Write);
        drop(second);
        drop(first);
        assert!(third.is_ready());
        drop(third);
        assert_eq!(seq.in_flight(), 0);
    }

    #[test]
    fn clones_share_state() {
        let seq = Sequencer::new();
        let clone = seq.clone();
        let _write = seq.admit(0, 512, Access::Write);
        assert!(!clone.admit(0, 512, Access::Read).is_ready());
        assert_eq!(clone.in_flight(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_wait_follows_earlier_write() {
        let seq = Sequencer::new();
        let first = seq.admit(0, 4096, Access::Write);
        let second = seq.admit(0, 4096, Access::Write);
        let first_done = Arc::new(AtomicBool::new(false));

        let waiter = {
            let first_done = Arc::clone(&first_done);
            tokio::spawn(async move {
                second.wait_async().await;
                assert!(first_done.load(Ordering::SeqCst));
            })
        };
        first.wait_async().await;
        tokio::time::sleep(HOLD).await;
        first_done.store(true, Ordering::SeqCst);
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("async waiter was not woken")
            .unwrap();
    }

    #[tokio::test]
    async fn async_wait_on_ready_ticket_returns_at_once() {
        let seq = Sequencer::new();
        let _read = seq.admit(0, 512, Access::Read);
        let ticket = seq.admit(0, 512, Access::Read);
        tokio::time::timeout(Duration::from_secs(1), ticket.wait_async())
            .await
            .expect("ready ticket must not wait");
    }

    /// `(offset, len, access)` of a request in the property tests.
    type Request = (u64, u64, Access);

    /// A random request for the property tests: small ranges in a small space so that
    /// overlaps are common.
    fn request() -> impl Strategy<Value = Request> {
        let access = prop_oneof![
            4 => Just(Access::Read),
            4 => Just(Access::Write),
            1 => Just(Access::Barrier),
        ];
        (0u64..16, 0u64..6, access)
    }

    /// One step of a random admit/complete sequence.
    #[derive(Debug, Clone)]
    enum Step {
        /// Admits a request `(offset, len, access)`.
        Admit(u64, u64, Access),
        /// Completes the live ticket at this index (modulo the number alive).
        Complete(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            request().prop_map(|(offset, len, access)| Step::Admit(offset, len, access)),
            any::<usize>().prop_map(Step::Complete),
        ]
    }

    /// The reference model of readiness: an independent restatement of the rule.
    fn model_conflict(a: Request, b: Request) -> bool {
        let overlap = a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
        match (a.2, b.2) {
            (Access::Barrier, _) | (_, Access::Barrier) => true,
            (Access::Read, Access::Read) => false,
            _ => overlap,
        }
    }

    proptest! {
        /// After every admit/complete step, a live ticket is ready exactly when no earlier
        /// conflicting ticket is alive.
        #[test]
        fn readiness_matches_model(steps in proptest::collection::vec(step(), 1..80)) {
            let seq = Sequencer::new();
            // (admission index, request, ticket), in admission order.
            let mut alive: Vec<(usize, Request, Ticket)> = Vec::new();
            let mut admitted = 0usize;
            for step in steps {
                match step {
                    Step::Admit(offset, len, access) => {
                        alive.push((admitted, (offset, len, access), seq.admit(offset, len, access)));
                        admitted += 1;
                    }
                    Step::Complete(i) if !alive.is_empty() => {
                        let index = i % alive.len();
                        drop(alive.remove(index));
                    }
                    Step::Complete(_) => {}
                }
                prop_assert_eq!(seq.in_flight(), alive.len());
                for (i, (_, request, ticket)) in alive.iter().enumerate() {
                    let expected = !alive[..i].iter().any(|(_, earlier, _)| model_conflict(*earlier, *request));
                    prop_assert_eq!(ticket.is_ready(), expected);
                    if expected {
                        ticket.wait(); // must return at once
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Real threads: every ticket waits, then checks (against a model updated *before* each
        /// ticket is dropped) that no earlier conflicting request is still running.
        #[test]
        fn threads_never_overtake_conflicting_tickets(
            requests in proptest::collection::vec(request(), 1..16),
            hold_micros in proptest::collection::vec(0u64..2000, 16),
        ) {
            let seq = Sequencer::new();
            let running: Arc<Mutex<Vec<Option<Request>>>> =
                Arc::new(Mutex::new(requests.iter().copied().map(Some).collect()));
            let tickets: Vec<Ticket> = requests
                .iter()
                .map(|&(offset, len, access)| seq.admit(offset, len, access))
                .collect();
            let violations = Arc::new(Mutex::new(Vec::new()));
            let handles: Vec<_> = tickets
                .into_iter()
                .enumerate()
                .rev() // start later tickets first so they really have to wait
                .map(|(index, ticket)| {
                    let running = Arc::clone(&running);
                    let violations = Arc::clone(&violations);
                    let hold = Duration::from_micros(hold_micros[index]);
                    let me = requests[index];
                    thread::spawn(move || {
                        ticket.wait();
                        {
                            let running = running.lock().unwrap();
                            for (earlier, request) in running[..index].iter().enumerate() {
                                if let Some(request) = request {
                                    if model_conflict(*request, me) {
                                        violations.lock().unwrap().push((earlier, index));
                                    }
                                }
                            }
                        }
                        thread::sleep(hold);
                        running.lock().unwrap()[index] = None;
                        drop(ticket);
                    })
                })
                .collect();
            for handle in handles {
                handle.join().unwrap();
            }
            prop_assert!(violations.lock().unwrap().is_empty(), "{:?}", violations.lock().unwrap());
            prop_assert_eq!(seq.in_flight(), 0);
        }
    }
}
