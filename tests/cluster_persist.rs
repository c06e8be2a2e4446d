//! What the machine persists, through the one executor (`cluster::persist`) the daemon runs
//! too: superblock flags, a new generation when the peer loses its disk, the size agreed with a
//! smaller peer, and a peer refused for its terms — which changes nothing.

use std::time::Duration;
use twinblade::cluster::sim::{Pair, BLOCKS};
use twinblade::cluster::{Action, Command, Config, Event, PeerRefusal, Startup, Terms};
use twinblade::wire::ondisk::flags;
use twinblade::wire::repl::{ChecksumAlg, Durability, ReplProtocol};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn terms(size: u64, protocol: ReplProtocol, durability: Durability) -> Terms {
    Terms {
        size,
        protocol,
        durability,
        checksum_alg: ChecksumAlg::Xxh3_128,
    }
}

const SIZE: u64 = BLOCKS as u64 * 4096;

fn refusals(pair: &Pair, n: usize) -> Vec<PeerRefusal> {
    pair.nodes[n]
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::RefusePeer { reason } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn flags_follow_role_disk_and_a_degraded_primary() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    let f0 = pair.nodes[0].flags;
    assert_eq!(
        f0 & flags::PRIMARY_IND,
        flags::PRIMARY_IND,
        "the primary says so"
    );
    assert_eq!(f0 & flags::CONSISTENT, flags::CONSISTENT);
    assert_eq!(pair.nodes[1].flags & flags::PRIMARY_IND, 0);
    // The primary loses its peer for good: the peer is outdated, and that is on disk.
    pair.nodes[1].up = false;
    pair.cut();
    pair.advance(secs(1));
    assert_ne!(pair.nodes[0].flags & flags::PEER_OUTDATED, 0);
    // Demotion clears the primary indicator.
    pair.command(0, Command::Secondary);
    assert_eq!(pair.nodes[0].flags & flags::PRIMARY_IND, 0);
    assert_ne!(
        pair.nodes[0].flags & flags::PEER_OUTDATED,
        0,
        "still outdated"
    );
}

#[test]
fn the_outdated_mark_goes_once_the_peer_is_up_to_date_again() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    pair.crash(1);
    pair.advance(secs(1));
    assert_ne!(pair.nodes[0].flags & flags::PEER_OUTDATED, 0);
    pair.restart(1, Config::default(), Startup::consistent());
    pair.advance(secs(5));
    assert!(pair.is_connected());
    assert_eq!(pair.nodes[0].flags & flags::PEER_OUTDATED, 0);
    assert!(pair.in_sync());
}

#[test]
fn a_peer_that_loses_its_disk_starts_a_new_generation_on_the_primary() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    let before = pair.nodes[0].uuids;
    pair.step(1, Event::LocalIoError);
    pair.advance(secs(1));
    let after = pair.nodes[0].uuids;
    assert_ne!(after.current, before.current, "a new generation");
    assert_eq!(
        after.bitmap, before.current,
        "the bitmap counts from the old one"
    );
    let generations = pair.nodes[0]
        .actions
        .iter()
        .filter(|a| **a == Action::NewCurrentUuid)
        .count();
    pair.advance(secs(2));
    let again = pair.nodes[0]
        .actions
        .iter()
        .filter(|a| **a == Action::NewCurrentUuid)
        .count();
    assert_eq!(generations, again, "once per loss, not per step");
    let before_loss = pair.nodes[0]
        .actions
        .iter()
        .position(|a| matches!(a, Action::Log(l) if l.contains("detached its disk")))
        .expect("the primary heard that the peer detached");
    assert_eq!(
        pair.nodes[0].actions[before_loss..]
            .iter()
            .filter(|a| **a == Action::NewCurrentUuid)
            .count(),
        1,
        "exactly one new generation for one lost peer disk"
    );
}

#[test]
fn a_peer_with_other_terms_is_refused_and_nothing_is_persisted() {
    for other in [
        terms(SIZE, ReplProtocol::A, Durability::Node),
        terms(SIZE, ReplProtocol::C, Durability::Power),
        Terms {
            checksum_alg: ChecksumAlg::Crc32c,
            ..terms(SIZE, ReplProtocol::C, Durability::Node)
        },
        // Also smaller: refused for the terms before any shrinking.
        terms(SIZE / 2, ReplProtocol::B, Durability::Node),
    ] {
        let mut pair = Pair::healthy();
        pair.cut();
        pair.set_terms(1, other);
        let before = [0, 1].map(|n| (pair.nodes[n].uuids, pair.nodes[n].flags));
        pair.restore();
        pair.advance(secs(3));
        assert!(!pair.is_connected(), "{other:?} was accepted");
        for (n, before) in before.into_iter().enumerate() {
            let r = refusals(&pair, n);
            assert!(
                matches!(r.first(), Some(PeerRefusal::Terms { .. })),
                "node {n}: {r:?}"
            );
            if other.checksum_alg != ChecksumAlg::Xxh3_128 {
                let (here, there) = if n == 0 {
                    ("xxh3-128", "crc32c")
                } else {
                    ("crc32c", "xxh3-128")
                };
                assert_eq!(
                    r[0].to_string(),
                    format!("its configuration differs (csums {here} here, {there} there); it must be identical on both nodes"),
                    "node {n}"
                );
            }
            assert_eq!(pair.nodes[n].agreed_size, None, "node {n} shrank");
            assert_eq!(
                (pair.nodes[n].uuids, pair.nodes[n].flags),
                before,
                "node {n} persisted something for a refused peer"
            );
            assert!(!pair.nodes[n]
                .actions
                .iter()
                .any(|a| matches!(a, Action::Shrink { .. })));
        }
    }
}

#[test]
fn a_node_not_serving_shrinks_to_a_smaller_peer_and_says_so() {
    let mut pair = Pair::healthy();
    pair.cut();
    pair.set_terms(1, terms(SIZE / 2, ReplProtocol::C, Durability::Node));
    pair.restore();
    pair.advance(secs(2));
    assert!(pair.is_connected());
    assert_eq!(pair.nodes[0].agreed_size, Some(SIZE / 2));
    assert_eq!(pair.nodes[0].terms.size, SIZE / 2);
    assert_eq!(
        pair.nodes[1].agreed_size, None,
        "the smaller node keeps its size"
    );
    assert!(pair.nodes[0].actions.iter().any(|a| matches!(
        a,
        Action::Notify(twinblade::cluster::Notification::Change { key: "size", .. })
    )));
}

#[test]
fn a_serving_node_refuses_a_peer_smaller_than_what_it_serves() {
    let mut pair = Pair::healthy();
    pair.advance(secs(1));
    assert_eq!(pair.serving(), [true, false]);
    pair.crash(1);
    pair.set_terms(1, terms(SIZE / 2, ReplProtocol::C, Durability::Node));
    pair.restart(1, Config::default(), Startup::consistent());
    pair.advance(secs(3));
    assert!(!pair.is_connected());
    assert_eq!(
        pair.serving(),
        [true, false],
        "still serving the whole device"
    );
    assert_eq!(pair.nodes[0].agreed_size, None);
    assert_eq!(pair.nodes[0].terms.size, SIZE);
    assert!(matches!(
        refusals(&pair, 0).first(),
        Some(PeerRefusal::SmallerThanServed { .. })
    ));
}
