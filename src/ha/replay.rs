//! Replay protection for heartbeats: accept a datagram only if its (boot nonce, sequence) is new.
//!
//! Keep one [`ReplayWindow`] per sender, shared by all paths, and feed it only datagrams whose
//! tag verified ([`crate::wire::heartbeat::HeartbeatRepr::parse_authenticated`]).
//!
//! # The rule
//!
//! * **Same boot nonce as the current one**: accepted if the sequence was not seen yet and is
//!   less than [`WINDOW`] behind the highest one seen. The sender numbers datagrams with one
//!   counter for all paths, so the window absorbs mild reordering between paths.
//! * **A different boot nonce** means the peer restarted. Accepted only if the sequence
//!   restarted low (below [`RESTART_LIMIT`]) and the nonce is not one of the last
//!   [`RETIRED_NONCES`] boots we saw; then the window starts afresh with it.
//! * **The first datagram** after our own start is accepted with any nonce and sequence: we
//!   know nothing about the sender yet.
//!
//! # What this does and does not stop
//!
//! * Without the secret nobody can forge a datagram: the tag covers nonce and sequence.
//! * A recorded datagram replayed later is refused: its sequence was seen or fell out of the
//!   window; one from a boot we saw end is refused by its retired nonce.
//! * Limits: right after our own start, a recorded datagram of the peer's current boot can be
//!   accepted once (and one from an older boot can take the window, so the live peer's
//!   datagrams are refused until the caller calls [`ReplayWindow::forget`]). A peer restart we
//!   did not hear within its first [`RESTART_LIMIT`] datagrams is refused for the same reason:
//!   the caller should `forget` when [`crate::ha::liveness`] declares the peer dead.
//!   Replay only ever makes a peer look alive or silent; it cannot change what it says.

use std::collections::VecDeque;

/// How many sequence numbers behind the highest one are still accepted (once each).
pub const WINDOW: u64 = 64;
/// A new boot nonce is believed only with a sequence below this.
pub const RESTART_LIMIT: u64 = 1024;
/// How many ended boots are remembered and refused.
pub const RETIRED_NONCES: usize = 8;

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// This sequence was already accepted.
    #[error("duplicate sequence {0}")]
    Duplicate(u64),
    /// The sequence is [`WINDOW`] or more behind the highest one seen.
    #[error("sequence {0} is older than the replay window")]
    TooOld(u64),
    /// The boot nonce belongs to a boot that has ended.
    #[error("boot nonce {0:#x} belongs to an ended boot")]
    EndedBoot(u64),
    /// A new boot nonce whose sequence did not restart low.
    #[error("new boot nonce {nonce:#x} with sequence {sequence}, not a restart")]
    NotARestart {
        /// The new nonce.
        nonce: u64,
        /// Its sequence, at least [`RESTART_LIMIT`].
        sequence: u64,
    },
}

/// What accepting a datagram revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The first datagram since we started (or since [`ReplayWindow::forget`]).
    First,
    /// A new sequence of the current boot.
    Fresh,
    /// The sender restarted: a new boot nonce, sequence restarted low.
    PeerRestarted,
}

/// One boot of the sender: its nonce, the highest sequence seen and which of the
/// [`WINDOW`] sequences below it were seen (bit `i` is `highest - i`).
#[derive(Debug, Clone, Copy)]
struct Boot {
    nonce: u64,
    highest: u64,
    seen: u64,
}

impl Boot {
    fn starting_at(nonce: u64, sequence: u64) -> Boot {
        Boot {
            nonce,
            highest: sequence,
            seen: 1,
        }
    }

    fn accept(&mut self, sequence: u64) -> Result<(), Refused> {
        if sequence > self.highest {
            let ahead = sequence - self.highest;
            self.seen = if ahead >= WINDOW {
                0
            } else {
                self.seen << ahead
            };
            self.seen |= 1;
            self.highest = sequence;
            return Ok(());
        }
        let behind = self.highest - sequence;
        if behind >= WINDOW {
            return Err(Refused::TooOld(sequence));
        }
        let bit = 1u64 << behind;
        if self.seen & bit != 0 {
            return Err(Refused::Duplicate(sequence));
        }
        self.seen |= bit;
        Ok(())
    }
}

/// The replay state for one sender. Pure: no clock, no I/O.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    current: Option<Boot>,
    retired: VecDeque<u64>,
}

impl ReplayWindow {
    /// A window that has seen nothing.
    pub fn new() -> ReplayWindow {
        ReplayWindow::default()
    }

    /// Decides whether an authenticated datagram with this boot nonce and sequence is new, and
    /// records it if so.
    pub fn accept(&mut self, nonce: u64, sequence: u64) -> Result<Accepted, Refused> {
        if let Some(boot) = &mut self.current {
            if boot.nonce == nonce {
                return boot.accept(sequence).map(|()| Accepted::Fresh);
            }
        }
        if self.retired.contains(&nonce) {
            return Err(Refused::EndedBoot(nonce));
        }
        let Some(ended) = self.current else {
            self.current = Some(Boot::starting_at(nonce, sequence));
            return Ok(Accepted::First);
        };
        if sequence >= RESTART_LIMIT {
            return Err(Refused::NotARestart { nonce, sequence });
        }
        self.retire(ended.nonce);
        self.current = Some(Boot::starting_at(nonce, sequence));
        Ok(Accepted::PeerRestarted)
    }

    /// Forgets the current boot (not the ended ones), so the next datagram of a boot not yet
    /// seen is accepted as [`Accepted::First`], with any sequence. For when the peer has been
    /// declared dead.
    pub fn forget(&mut self) {
        if let Some(ended) = self.current.take() {
            self.retire(ended.nonce);
        }
    }

    fn retire(&mut self, nonce: u64) {
        if self.retired.len() == RETIRED_NONCES {
            self.retired.pop_front();
        }
        self.retired.push_back(nonce);
    }

    /// The current boot nonce, if any datagram was accepted.
    pub fn boot_nonce(&self) -> Option<u64> {
        self.current.map(|boot| boot.nonce)
    }
}

/// Drives a window with (nonce, sequence) pairs read from `data` (3 bytes each: a nonce out of
/// four so boots collide, a 16-bit sequence) and checks that no pair is ever accepted twice.
/// Four nonces are fewer than [`RETIRED_NONCES`], so an ended boot is never forgotten here.
/// The fuzzer cannot forge tags, so this is how it reaches the window.
pub fn fuzz_window(data: &[u8]) {
    let mut window = ReplayWindow::new();
    let mut accepted = std::collections::HashSet::new();
    for chunk in data.chunks_exact(3) {
        let nonce = u64::from(chunk[0] & 3);
        let sequence = u64::from(u16::from_be_bytes([chunk[1], chunk[2]]));
        if window.accept(nonce, sequence).is_ok() {
            assert!(
                accepted.insert((nonce, sequence)),
                "({nonce}, {sequence}) accepted twice"
            );
            assert_eq!(window.boot_nonce(), Some(nonce));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_each_sequence_once() {
        let mut window = ReplayWindow::new();
        assert_eq!(window.accept(7, 100), Ok(Accepted::First));
        assert_eq!(window.accept(7, 101), Ok(Accepted::Fresh));
        assert_eq!(window.accept(7, 101), Err(Refused::Duplicate(101)));
        assert_eq!(window.accept(7, 100), Err(Refused::Duplicate(100)));
    }

    #[test]
    fn tolerates_reordering_within_the_window() {
        let mut window = ReplayWindow::new();
        window.accept(7, 10).unwrap();
        window.accept(7, 10 + WINDOW - 1).unwrap();
        assert_eq!(window.accept(7, 11), Ok(Accepted::Fresh));
        assert_eq!(window.accept(7, 11), Err(Refused::Duplicate(11)));
        window.accept(7, 10 + WINDOW).unwrap();
        assert_eq!(window.accept(7, 10), Err(Refused::TooOld(10)));
        assert_eq!(window.accept(7, 12), Ok(Accepted::Fresh));
    }

    #[test]
    fn a_big_jump_clears_the_window() {
        let mut window = ReplayWindow::new();
        window.accept(7, 5).unwrap();
        window.accept(7, 5 + 1000).unwrap();
        assert_eq!(window.accept(7, 5 + 999), Ok(Accepted::Fresh));
        assert_eq!(window.accept(7, 5), Err(Refused::TooOld(5)));
    }

    #[test]
    fn a_restart_with_a_low_sequence_resets_the_window() {
        let mut window = ReplayWindow::new();
        window.accept(7, 5000).unwrap();
        assert_eq!(window.accept(8, 0), Ok(Accepted::PeerRestarted));
        assert_eq!(window.boot_nonce(), Some(8));
        assert_eq!(window.accept(8, 1), Ok(Accepted::Fresh));
        assert_eq!(window.accept(8, 0), Err(Refused::Duplicate(0)));
    }

    #[test]
    fn a_new_nonce_with_a_high_sequence_is_refused() {
        let mut window = ReplayWindow::new();
        window.accept(7, 0).unwrap();
        assert_eq!(
            window.accept(8, RESTART_LIMIT),
            Err(Refused::NotARestart {
                nonce: 8,
                sequence: RESTART_LIMIT
            })
        );
        assert_eq!(window.boot_nonce(), Some(7));
    }

    #[test]
    fn an_ended_boot_is_refused() {
        let mut window = ReplayWindow::new();
        window.accept(7, 0).unwrap();
        window.accept(8, 0).unwrap();
        assert_eq!(window.accept(7, 1), Err(Refused::EndedBoot(7)));
        window.forget();
        assert_eq!(window.accept(8, 50), Err(Refused::EndedBoot(8)));
        assert_eq!(window.accept(9, 5000), Ok(Accepted::First));
    }

    #[test]
    fn remembers_only_the_last_ended_boots() {
        let mut window = ReplayWindow::new();
        window.accept(0, 0).unwrap();
        for nonce in 1..=RETIRED_NONCES as u64 + 1 {
            assert_eq!(window.accept(nonce, 0), Ok(Accepted::PeerRestarted));
        }
        // Nonce 0 fell out of the memory; nonce 1 is still remembered.
        assert_eq!(window.accept(1, 0), Err(Refused::EndedBoot(1)));
        assert_eq!(window.accept(0, 0), Ok(Accepted::PeerRestarted));
    }

    proptest! {
        #[test]
        fn never_accepts_a_pair_twice(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz_window(&data);
        }
    }
}
