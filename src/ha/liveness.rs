//! Is the peer alive? Pure bookkeeping over several independent heartbeat paths.
//!
//! The peer is declared dead only when **every** path has been silent for `dead_time`: one
//! path going quiet is a broken cable or switch, not a dead node, and taking over then would
//! risk two primaries. A path never heard from counts as silent, so a node that starts alone
//! does not believe in a peer it has not heard.
//!
//! Time is passed in (`now: Instant`), never read here, so tests use explicit instants.

use std::time::{Duration, Instant};

/// A heartbeat path's id, as carried in the heartbeat datagram.
pub type PathId = u8;

/// `heard` named a path this [`Liveness`] was not built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown heartbeat path {0}")]
pub struct UnknownPath(pub PathId);

/// One path as [`Liveness::status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathStatus {
    /// The path.
    pub path: PathId,
    /// How long ago the peer was last heard on this path; `None` if never.
    pub last_heard_age: Option<Duration>,
    /// The smoothed round trip on this path; `None` before the first echo reply.
    pub rtt: Option<Duration>,
    /// Whether the path has been silent for the dead time.
    pub silent: bool,
}

#[derive(Debug, Clone, Copy)]
struct PathState {
    path: PathId,
    last_heard: Option<Instant>,
    rtt: Option<Duration>,
}

/// The liveness of one peer over a fixed set of paths.
#[derive(Debug, Clone)]
pub struct Liveness {
    dead_time: Duration,
    paths: Vec<PathState>,
}

impl Liveness {
    /// Tracks `paths` (duplicates are kept once); the peer is dead after `dead_time` of silence
    /// on all of them.
    pub fn new(paths: &[PathId], dead_time: Duration) -> Liveness {
        let mut states: Vec<PathState> = Vec::with_capacity(paths.len());
        for &path in paths {
            if !states.iter().any(|state| state.path == path) {
                states.push(PathState {
                    path,
                    last_heard: None,
                    rtt: None,
                });
            }
        }
        Liveness {
            dead_time,
            paths: states,
        }
    }

    /// Records an authenticated, non-replayed datagram from the peer on `path` at `now`, with
    /// the round trip it measured if it was an echo reply. The round trip is smoothed like
    /// TCP's SRTT (RFC 6298): `srtt = 7/8 srtt + 1/8 sample`, so one slow reply does not
    /// swing it.
    pub fn heard(
        &mut self,
        path: PathId,
        now: Instant,
        rtt: Option<Duration>,
    ) -> Result<(), UnknownPath> {
        let state = self
            .paths
            .iter_mut()
            .find(|state| state.path == path)
            .ok_or(UnknownPath(path))?;
        // Datagrams handled out of order must not move the last-heard time backwards.
        state.last_heard = Some(state.last_heard.map_or(now, |last| last.max(now)));
        if let Some(sample) = rtt {
            state.rtt = Some(match state.rtt {
                None => sample,
                Some(smoothed) => smoothed * 7 / 8 + sample / 8,
            });
        }
        Ok(())
    }

    fn is_silent(&self, state: &PathState, now: Instant) -> bool {
        state
            .last_heard
            .is_none_or(|last| now.saturating_duration_since(last) >= self.dead_time)
    }

    /// Whether `path` has been silent for the dead time; `None` for an unknown path.
    pub fn path_silent(&self, path: PathId, now: Instant) -> Option<bool> {
        self.paths
            .iter()
            .find(|state| state.path == path)
            .map(|state| self.is_silent(state, now))
    }

    /// Every path, in the order given to [`new`](Self::new).
    pub fn status(&self, now: Instant) -> Vec<PathStatus> {
        self.paths
            .iter()
            .map(|state| PathStatus {
                path: state.path,
                last_heard_age: state
                    .last_heard
                    .map(|last| now.saturating_duration_since(last)),
                rtt: state.rtt,
                silent: self.is_silent(state, now),
            })
            .collect()
    }

    /// True only when every path has been silent for the dead time (also with no paths at
    /// all: then the peer can never be heard).
    pub fn peer_dead(&self, now: Instant) -> bool {
        self.paths.iter().all(|state| self.is_silent(state, now))
    }

    /// The dead time.
    pub fn dead_time(&self) -> Duration {
        self.dead_time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_secs(3);
    const REPL: PathId = 0;
    const CLIENT: PathId = 1;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn never_heard_is_dead() {
        let t0 = Instant::now();
        let live = Liveness::new(&[REPL, CLIENT], DEAD);
        assert!(live.peer_dead(t0));
        assert_eq!(live.path_silent(REPL, t0), Some(true));
        assert_eq!(live.status(t0)[0].last_heard_age, None);
    }

    #[test]
    fn one_silent_path_keeps_the_peer_alive() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL, CLIENT], DEAD);
        live.heard(REPL, t0, None).unwrap();
        live.heard(CLIENT, t0, None).unwrap();
        // The replication link goes quiet; the client network keeps talking.
        for s in 1..=10 {
            live.heard(CLIENT, t0 + Duration::from_secs(s), None)
                .unwrap();
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(live.path_silent(REPL, now), Some(true));
        assert_eq!(live.path_silent(CLIENT, now), Some(false));
        assert!(!live.peer_dead(now));
    }

    #[test]
    fn all_silent_is_dead_exactly_after_dead_time() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL, CLIENT], DEAD);
        live.heard(REPL, t0, None).unwrap();
        live.heard(CLIENT, t0 + ms(500), None).unwrap();
        assert!(!live.peer_dead(t0 + ms(500) + DEAD - Duration::from_nanos(1)));
        assert!(live.peer_dead(t0 + ms(500) + DEAD));
    }

    #[test]
    fn a_path_that_comes_back_revives_the_peer() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL, CLIENT], DEAD);
        live.heard(REPL, t0, None).unwrap();
        assert!(live.peer_dead(t0 + DEAD));
        live.heard(CLIENT, t0 + DEAD + ms(1), None).unwrap();
        assert!(!live.peer_dead(t0 + DEAD + ms(1)));
    }

    #[test]
    fn late_datagrams_do_not_move_time_backwards() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL], DEAD);
        live.heard(REPL, t0 + ms(1000), None).unwrap();
        live.heard(REPL, t0, None).unwrap();
        assert_eq!(live.status(t0 + ms(1500))[0].last_heard_age, Some(ms(500)));
    }

    #[test]
    fn unknown_paths_are_refused() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL, REPL], DEAD);
        assert_eq!(live.status(t0).len(), 1);
        assert_eq!(live.heard(9, t0, None), Err(UnknownPath(9)));
        assert_eq!(live.path_silent(9, t0), None);
        assert!(Liveness::new(&[], DEAD).peer_dead(t0));
    }

    #[test]
    fn round_trip_is_smoothed_deterministically() {
        let t0 = Instant::now();
        let mut live = Liveness::new(&[REPL, CLIENT], DEAD);
        live.heard(REPL, t0, Some(ms(8))).unwrap();
        assert_eq!(live.status(t0)[0].rtt, Some(ms(8)));
        live.heard(REPL, t0, Some(ms(16))).unwrap();
        assert_eq!(live.status(t0)[0].rtt, Some(ms(9)));
        live.heard(REPL, t0, None).unwrap();
        assert_eq!(live.status(t0)[0].rtt, Some(ms(9)));
        assert_eq!(live.status(t0)[1].rtt, None);
    }
}
