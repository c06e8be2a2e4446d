//! The simulated ping targets: how many targets each node reaches (set by the test, as the
//! prober would measure it), and what each node's heartbeat last told its peer. Every
//! [`STEP`](super::STEP) a running node whose figures changed gets [`Event::Reach`], as the
//! engine feeds it.

use super::*;

impl Pair {
    /// Node `n` now reaches `reach` ping targets (`None`: it has none configured).
    pub fn set_reach(&mut self, n: usize, reach: Option<u8>) {
        self.nodes[n].reach = reach;
    }

    /// After a heartbeat round: a node that heard its peer takes the peer's reach (one that
    /// did not keeps the last it heard); each running node whose figures changed is told.
    pub(super) fn feed_reach(&mut self, heard: bool) {
        for n in 0..2 {
            let peer = 1 - n;
            if !self.nodes[n].up || self.nodes[n].frozen {
                continue;
            }
            if heard {
                self.nodes[n].peer_reach = self.nodes[peer].reach;
            }
            let figures = (self.nodes[n].reach, self.nodes[n].peer_reach);
            if self.nodes[n].reach_fed != Some(figures) {
                self.nodes[n].reach_fed = Some(figures);
                self.queue.push_back((
                    n,
                    Event::Reach {
                        own: figures.0,
                        peer: figures.1,
                    },
                ));
            }
        }
    }
}
