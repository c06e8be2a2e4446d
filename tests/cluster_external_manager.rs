//! External-manager mode (`auto-promote = false`): with Pacemaker (appliance/ocf/twinblade) or an
//! operator deciding, a node never promotes itself — not at startup, not when its Primary dies —
//! yet stays promotable by command once its data is UpToDate.

use std::time::Duration;
use twinblade::cluster::sim::Pair;
use twinblade::cluster::{Command, Config, DiskState, Role, Startup};
use twinblade::repl::uuid::UuidSet;

fn pair(auto_promote: bool) -> Pair {
    let uuids = UuidSet {
        current: 0x1000,
        ..Default::default()
    };
    let config = Config {
        auto_promote,
        ..Config::default()
    };
    Pair::new(
        [
            Config {
                preferred_primary: true,
                ..config.clone()
            },
            config,
        ],
        [Startup::consistent(); 2],
        [uuids; 2],
    )
}

/// The primary loses power; the secondary is left alone for `secs` seconds.
fn primary_dies(pair: &mut Pair, secs: u64) {
    pair.command(0, Command::Primary { force: false });
    assert_eq!(pair.serving(), [true, false]);
    pair.write(0, 1).unwrap();
    pair.power_loss(0);
    pair.advance(Duration::from_secs(secs));
}

#[test]
fn nobody_promotes_itself_and_the_manager_promotes_the_survivor() {
    let mut pair = pair(false);
    pair.advance(Duration::from_secs(5));
    assert!(pair.is_connected());
    assert_eq!(
        pair.serving_count(),
        0,
        "a connected pair waits for the manager"
    );
    assert_eq!(pair.nodes[0].status().disk, DiskState::UpToDate);

    primary_dies(&mut pair, 30);
    assert_eq!(
        pair.role(1),
        Role::Secondary,
        "no failover without the manager"
    );
    assert!(!pair.serving()[1]);
    // What the agent scores: the survivor's data is still UpToDate, so it can be promoted.
    assert_eq!(pair.nodes[1].status().disk, DiskState::UpToDate);
    pair.command(1, Command::Primary { force: false });
    assert!(!pair.nodes[1].refused(Command::Primary { force: false }));
    assert_eq!(pair.serving(), [false, true]);
    assert!(pair.write(1, 2).is_some());
}

#[test]
fn with_auto_promote_the_same_pair_fails_over_by_itself() {
    // The contrast that makes the test above mean something.
    let mut pair = pair(true);
    pair.advance(Duration::from_secs(5));
    assert_eq!(
        pair.serving(),
        [true, false],
        "the preferred node promotes itself"
    );
    primary_dies(&mut pair, 30);
    assert_eq!(pair.serving(), [false, true]);
}
