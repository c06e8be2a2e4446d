//! The simulated third votes: the witness (a shared book, per-node reachability and answer
//! delay, a restart) and the fence command (a scripted outcome and run time per node).

use super::*;

impl Pair {
    /// Gives the pair a witness: `book` (shared with any other pair that uses it), and the
    /// pair's and its nodes' names there. Configure the machines with `witness: true`.
    pub fn set_witness(&mut self, book: Arc<Mutex<Book>>, pair: &str, nodes: [&str; 2]) {
        self.witness = Some(book);
        self.names = (pair.into(), nodes.map(String::from));
    }

    /// Whether node `n` reaches the witness (cut or restored).
    pub fn set_witness_reachable(&mut self, n: usize, reachable: bool) {
        self.nodes[n].witness_reachable = reachable;
    }

    /// How long the witness's verdict takes to reach node `n`.
    pub fn set_witness_delay(&mut self, n: usize, delay: Duration) {
        self.nodes[n].witness_delay = delay;
    }

    /// The witness restarts: its book is what it reads back from its file.
    pub fn restart_witness(&mut self) {
        if let Some(book) = &self.witness {
            let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
            let text = book.to_text();
            *book = Book::from_text(&text).expect("the witness reads back its book");
        }
    }

    /// Node `n`'s name at the witness.
    pub fn name(&self, n: usize) -> &str {
        &self.names.1[n]
    }

    /// Delivers the witness's verdicts whose time has come.
    pub(super) fn finish_witness_claims(&mut self) {
        for n in 0..2 {
            let node = &self.nodes[n];
            let Some((due, generation)) = node.witness_due else {
                continue;
            };
            if !node.up || due > self.now {
                continue;
            }
            let reachable = node.witness_reachable;
            let verdict = match (&self.witness, reachable) {
                (Some(book), true) => {
                    let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
                    let outcome = book.claim(&self.names.0, RESOURCE, &self.names.1[n], generation);
                    match outcome.verdict {
                        Verdict::Granted => WitnessVerdict::Granted,
                        _ => WitnessVerdict::Held(NodeName::new(&outcome.holder)),
                    }
                }
                _ => WitnessVerdict::Unreachable,
            };
            self.nodes[n].witness_due = None;
            self.queue.push_back((
                n,
                Event::WitnessAnswered {
                    generation,
                    verdict,
                },
            ));
        }
    }

    /// Scripts node `n`'s fence command: it runs for `takes`, then ends in `outcome`.
    pub fn set_fence(&mut self, n: usize, outcome: FenceOutcome, takes: Duration) {
        self.nodes[n].fence = (outcome, takes);
    }

    /// Ends the fence commands whose time has come, making exits 4 and 7 true first.
    pub(super) fn finish_fence_commands(&mut self) {
        for n in 0..2 {
            let node = &self.nodes[n];
            if !node.up || node.fence_due.is_none_or(|due| due > self.now) {
                continue;
            }
            self.nodes[n].fence_due = None;
            let outcome = self.nodes[n].fence.0;
            let peer = 1 - n;
            if self.nodes[peer].up {
                match outcome {
                    FenceOutcome::Exit(4) => {
                        self.queue
                            .push_back((peer, Event::Command(Command::Outdate)));
                        self.pump();
                    }
                    FenceOutcome::Exit(7) => self.power_loss(peer),
                    _ => {}
                }
            }
            self.queue.push_back((n, Event::FenceResult { outcome }));
        }
    }
}
