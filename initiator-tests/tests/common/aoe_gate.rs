//! The serve-gate scenario, shared by the ring and the `recvmmsg` frame paths (each runs in a
//! test binary of its own, as the frame path is chosen by an environment variable).

use super::Lab;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use twinblade::block::{BlockDevice, NullDevice};
use twinblade::export::aoe::{AoeServer, BladeConfig, BladeStats, Export};
use twinblade::ha::clock::LeaseClock;
use twinblade::ha::gate::{Authority, ServeGate};
use twinblade::net::Interface;
use twinblade::supervisor::Root;
use twinblade::wire::aoe::{ata_flags, AtaRepr};
use twinblade_initiator::{Initiator, InitiatorError, Target};

const READ_EXT: u8 = 0x24;
/// Status bits that mean failure (BSY|DF|DRQ|ERR).
const FAILURE_STATUS: u8 = 0xA9;

/// Waits (for as long as a very busy machine could need) until `done` holds.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < give_up, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_first_sector() -> AtaRepr {
    AtaRepr {
        aflags: ata_flags::EXTENDED,
        err_feature: 0,
        sector_count: 1,
        cmd_status: READ_EXT,
        lba: 0,
    }
}

/// A blade behind a closed gate answers neither a config query nor a read (and counts both
/// as gated); once the gate opens it answers both.
pub fn closed_gate_withholds_answers_until_it_opens() {
    let lab = Lab::new(1500, 1);
    let gate = ServeGate::new(LeaseClock::new());
    let served = gate.clone();
    let (_root, server, target_mac) = lab.in_target(move || {
        let root = Root::threads_only("test", CancellationToken::new());
        let device: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20));
        let server = AoeServer::start(
            vec![Export {
                config: BladeConfig::new(0, 7),
                device,
                interfaces: vec!["eth0".into()],
                gate: served,
                guard: None,
                service_mac: None,
            }],
            root.group("aoe"),
        )
        .unwrap();
        (root, server, Interface::by_name("eth0").unwrap().mac)
    });
    let stats: Arc<BladeStats> = server.stats()[0].1.clone();
    let target = Target {
        shelf: 0,
        slot: 7,
        mac: target_mac,
        buffer_count: 64,
        sectors_per_frame: 2,
        firmware: 0,
        config: Vec::new(),
    };

    let found = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        init.discover(0, 7, Duration::from_millis(300)).unwrap()
    });
    assert!(found.is_empty(), "a closed gate answered a config query");
    wait_until("the config query counted as gated", || {
        stats.gated.load(Relaxed) >= 1
    });

    let unanswered = target.clone();
    let read = lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        // One attempt: sent once, then waited for.
        init.ata(&unanswered, read_first_sector(), &[], Duration::ZERO)
    });
    assert!(
        matches!(read, Err(InitiatorError::Timeout(_))),
        "a closed gate answered a read: {read:?}"
    );
    wait_until("the read counted as gated", || {
        stats.gated.load(Relaxed) >= 2
    });
    let gated_while_closed = stats.gated.load(Relaxed);
    assert_eq!(gated_while_closed, 2, "{}", stats.summary());
    assert_eq!(stats.reads.load(Relaxed), 0, "a gated read was executed");

    gate.set(Authority::Open);
    let (found, read) = lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        let found = init.find(0, 7, Duration::from_secs(30)).unwrap();
        let read = init
            .ata(&target, read_first_sector(), &[], Duration::from_secs(30))
            .unwrap();
        (found, read)
    });
    assert_eq!(found.mac, target_mac);
    let (reply, data) = read;
    assert_eq!(reply.cmd_status & FAILURE_STATUS, 0, "the read failed");
    assert!(data.len() >= 512);
    assert_eq!(stats.reads.load(Relaxed), 1);
    assert_eq!(
        stats.gated.load(Relaxed),
        gated_while_closed,
        "nothing gated once open"
    );
    assert!(stats.summary().contains("gated=2"));
    server.stop();
}
