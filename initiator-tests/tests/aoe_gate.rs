//! The serve gate, the wire probe and multiple-mount protection of the AoE target, on real
//! (virtual) Ethernet segments: a closed gate answers nothing, `responders` finds exactly who
//! serves an address, and a guarded blade reports a rival serving its address.

mod common;

use common::aoe_gate::wait_until;
use common::{in_namespace, Lab};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinblade::block::{BlockDevice, NullDevice};
use twinblade::export::aoe::probe::PROBE_TAG;
use twinblade::export::aoe::{responders, AoeServer, BladeConfig, Export, RivalAlarm};
use twinblade::ha::gate::ServeGate;
use twinblade::net::{Interface, PacketSocket};
use twinblade::supervisor::Root;
use twinblade::wire::aoe::{self, Command, Frame};
use twinblade::wire::MacAddr;

#[test]
fn a_closed_gate_answers_nothing_until_it_opens_on_the_ring_path() {
    common::aoe_gate::closed_gate_withholds_answers_until_it_opens();
}

/// Starts an always-open blade at `0.slot` on eth0 of the namespace this runs in.
fn serve_here(slot: u8, guard: Option<RivalAlarm>) -> (Root, AoeServer, MacAddr) {
    let root = Root::threads_only("test", CancellationToken::new());
    let device: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20));
    let server = AoeServer::start(
        vec![Export {
            config: BladeConfig::new(0, slot),
            device,
            interfaces: vec!["eth0".into()],
            gate: ServeGate::always_open(),
            guard,
            service_mac: None,
        }],
        root.group("aoe"),
    )
    .unwrap();
    (root, server, Interface::by_name("eth0").unwrap().mac)
}

#[test]
fn responders_finds_the_target_and_only_it() {
    let mut lab = Lab::bridged(1500, 1);
    let file = lab.backing_file("disk.img", 1 << 20, 0);
    let index = lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
    let target_mac = lab.in_target(|| Interface::by_name("eth0").unwrap().mac);
    // Another node on the segment serving another address must not count.
    let (_other_root, other, other_mac) =
        in_namespace(&lab.extra_target_ns[0], || serve_here(4, None));
    assert_ne!(other_mac, target_mac);

    let found = lab.in_client(|| responders("eth0", 0, 3, Duration::from_secs(1), 3).unwrap());
    assert_eq!(found, vec![target_mac]);
    let of_the_other =
        lab.in_client(|| responders("eth0", 0, 4, Duration::from_secs(1), 3).unwrap());
    assert_eq!(of_the_other, vec![other_mac]);

    lab.stop_target(index);
    let after_stop = lab.in_client(|| responders("eth0", 0, 3, Duration::from_secs(1), 3).unwrap());
    assert!(after_stop.is_empty(), "answered by {after_stop:?}");
    let nobody = lab.in_client(|| responders("eth0", 0, 9, Duration::from_millis(500), 2).unwrap());
    assert!(nobody.is_empty(), "answered by {nobody:?}");
    other.stop();
}

#[test]
fn a_guarded_blade_reports_a_rival_serving_its_address() {
    let lab = Lab::bridged(1500, 1);
    let (alarm_tx, alarms) = mpsc::channel();
    let alarm_tx = Mutex::new(alarm_tx);
    let guard = RivalAlarm::new(move |rival| {
        let _ = alarm_tx.lock().unwrap().send(rival);
    });
    let (_root_a, guarded, guarded_mac) = lab.in_target(move || serve_here(3, Some(guard)));
    let guarded_stats = guarded.stats()[0].1.clone();

    // Alone on the segment: the guarded blade asks every second, and nobody (not even the
    // blade itself) answers. Counted on the wire: two of its queries.
    let answers_to_probes = lab.in_client(move || {
        let iface = Interface::by_name("eth0").unwrap();
        let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
        let mut buf = vec![0u8; 2048];
        let (mut queries, mut answers) = (0, 0);
        wait_until("two rival queries from the guarded blade", || {
            if let Some(len) = socket.recv(&mut buf, Duration::from_millis(100)).unwrap() {
                let frame = Frame::new_checked(&buf[..len]).unwrap();
                if frame.command() == Command::Config && frame.tag() == PROBE_TAG {
                    if frame.is_response() {
                        answers += 1;
                    } else if frame.src() == guarded_mac && frame.dst() == MacAddr::BROADCAST {
                        queries += 1;
                    }
                }
            }
            queries >= 2
        });
        answers
    });
    assert_eq!(answers_to_probes, 0);
    assert!(alarms.try_recv().is_err(), "an alarm with no rival");
    assert_eq!(
        guarded_stats.requests.load(Relaxed),
        0,
        "the blade took its own query for a request"
    );

    // A rival serves the same address on the same segment.
    let (_root_b, rival, rival_mac) = in_namespace(&lab.extra_target_ns[0], || serve_here(3, None));
    let reported = alarms
        .recv_timeout(Duration::from_secs(30))
        .expect("the rival was never reported");
    assert_eq!(reported, rival_mac);
    rival.stop();
    guarded.stop();
    let all: Vec<MacAddr> = alarms.try_iter().collect();
    assert!(all.iter().all(|&mac| mac == rival_mac), "reported {all:?}");
}
