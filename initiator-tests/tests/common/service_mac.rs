//! The service-MAC scenarios, shared by the ring and the `recvmmsg` frame paths (each runs in
//! a test binary of its own, as the frame path is chosen by an environment variable): a blade
//! at a service MAC is found and served at that MAC and not at its interface's (whose own MAC
//! never changes), the interface takes the MAC only while the blade's socket is open, the MAC
//! moves to another node with the client none the wiser, and announces repeat while the gate
//! is open and stop when it closes.
//!
//! Namespaces are named `tbv…` (veths `vv…`), apart from every other suite's.

use super::aoe_gate::wait_until;
use super::{in_namespace, Lab};
use std::process::Command as Process;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinblade::block::{BlockDevice, FileDevice};
use twinblade::export::aoe::probe::{self, PROBE_TAG};
use twinblade::export::aoe::{
    service_mac_for, AoeServer, BladeConfig, BladeStats, Export, RivalAlarm,
};
use twinblade::ha::clock::LeaseClock;
use twinblade::ha::gate::{Authority, ServeGate};
use twinblade::net::{Interface, PacketSocket};
use twinblade::supervisor::Root;
use twinblade::wire::aoe::{self, ata_flags, AtaRepr, Command, Frame};
use twinblade::wire::MacAddr;
use twinblade_initiator::{Initiator, Target};

const SHELF: u16 = 0;
const SLOT: u8 = 5;
const READ_EXT: u8 = 0x24;
const WRITE_EXT: u8 = 0x34;
/// Status bits that mean failure (BSY|DF|DRQ|ERR).
const FAILURE_STATUS: u8 = 0xA9;
/// Sectors per request: two fit a 1500-byte frame.
const SECTORS: u8 = 2;

fn lab() -> Lab {
    Lab::bridged_named("tbv", "vv", 1500, 1)
}

fn the_service_mac() -> MacAddr {
    service_mac_for(("tbv-node-a", "tbv-node-b"), SHELF, SLOT)
}

fn shared_disk(lab: &Lab) -> Arc<dyn BlockDevice> {
    let path = lab.backing_file("disk.img", 1 << 20, 0);
    Arc::new(FileDevice::open(&path).unwrap())
}

/// Starts the blade at `mac` on eth0 of the namespace this runs in.
fn serve_here(
    device: Arc<dyn BlockDevice>,
    gate: Arc<ServeGate>,
    mac: MacAddr,
) -> (Root, AoeServer, Arc<BladeStats>) {
    serve_guarded_here(device, gate, mac, None)
}

/// [`serve_here`] with multiple-mount protection.
fn serve_guarded_here(
    device: Arc<dyn BlockDevice>,
    gate: Arc<ServeGate>,
    mac: MacAddr,
    guard: Option<RivalAlarm>,
) -> (Root, AoeServer, Arc<BladeStats>) {
    let root = Root::threads_only("test", CancellationToken::new());
    let server = AoeServer::start(
        vec![Export {
            config: BladeConfig::new(SHELF, SLOT),
            device,
            interfaces: vec!["eth0".into()],
            gate,
            guard,
            service_mac: Some(mac),
        }],
        root.group("aoe"),
    )
    .unwrap();
    let stats = server.stats()[0].1.clone();
    (root, server, stats)
}

/// `ip -n NS …` output.
fn ip_output(ns: &str, args: &[&str]) -> String {
    let out = Process::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?} in {ns}");
    String::from_utf8(out.stdout).unwrap()
}

/// The MAC `ip link show eth0` reports in `ns`.
fn link_mac(ns: &str) -> MacAddr {
    let shown = ip_output(ns, &["link", "show", "eth0"]);
    let mac = shown
        .split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether in {shown:?}"));
    mac.parse().unwrap()
}

/// Whether eth0 in `ns` has `mac` on its unicast address list (what a packet socket's
/// `PACKET_MR_UNICAST` membership adds): `bridge fdb show dev eth0` lists it as `self`.
fn interface_takes(ns: &str, mac: MacAddr) -> bool {
    let out = Process::new("bridge")
        .args(["-n", ns, "fdb", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bridge fdb show in {ns}");
    let listed = String::from_utf8(out.stdout).unwrap();
    let wanted = mac.to_string();
    listed
        .lines()
        .any(|line| line.starts_with(&wanted) && line.contains("self"))
}

/// Sends a Query Config for the blade to `dst` from the client's eth0 and returns the source
/// MACs of the answers heard within `wait` (announces excluded), in order.
fn config_answers_from(dst: MacAddr, wait: Duration) -> Vec<MacAddr> {
    let iface = Interface::by_name("eth0").unwrap();
    let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
    let mut query = probe::config_query(iface.mac, SHELF, SLOT);
    Frame::new_unchecked(&mut query[..]).set_dst(dst);
    socket.send(&query).unwrap();
    let deadline = std::time::Instant::now() + wait;
    let mut buf = vec![0u8; 4096];
    let mut sources = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Some(len) = socket.recv(&mut buf, left).unwrap() else {
            break;
        };
        let Ok(frame) = Frame::new_checked(&buf[..len]) else {
            continue;
        };
        if frame.is_response() && frame.tag() == PROBE_TAG && frame.slot() == SLOT {
            sources.push(frame.src());
        }
    }
    sources
}

fn transfer(command: u8, lba: u64) -> AtaRepr {
    AtaRepr {
        aflags: ata_flags::EXTENDED
            | if command == WRITE_EXT {
                ata_flags::WRITE
            } else {
                0
            },
        err_feature: 0,
        sector_count: SECTORS,
        cmd_status: command,
        lba,
    }
}

fn pattern(seed: u8, lba: u64) -> Vec<u8> {
    (0..usize::from(SECTORS) * 512)
        .map(|i| seed ^ (lba as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// Writes `pattern(seed, lba)` at each of `lbas` through `target`, then reads each back.
/// Returns how many writes and reads succeeded with the right data.
fn write_and_verify(init: &mut Initiator, target: &Target, seed: u8, lbas: &[u64]) -> usize {
    let wait = Duration::from_secs(30);
    let mut good = 0;
    for &lba in lbas {
        let data = pattern(seed, lba);
        let (reply, _) = init
            .ata(target, transfer(WRITE_EXT, lba), &data, wait)
            .unwrap();
        assert_eq!(
            reply.cmd_status & FAILURE_STATUS,
            0,
            "write at {lba} failed"
        );
        let (reply, read) = init
            .ata(target, transfer(READ_EXT, lba), &[], wait)
            .unwrap();
        assert_eq!(reply.cmd_status & FAILURE_STATUS, 0, "read at {lba} failed");
        assert_eq!(&read[..data.len()], &data[..], "data at {lba}");
        good += 1;
    }
    good
}

/// Found and served at the service MAC, never at the interface's; the interface's MAC is
/// unchanged and takes the service MAC only while the server runs.
pub fn a_blade_at_a_service_mac_is_found_and_served_there_and_only_there() {
    let lab = lab();
    let service_mac = the_service_mac();
    let own_mac = link_mac(&lab.target_ns);
    assert_ne!(own_mac, service_mac);
    assert!(!interface_takes(&lab.target_ns, service_mac));

    let device = shared_disk(&lab);
    let (_root, server, stats) =
        lab.in_target(move || serve_here(device, ServeGate::always_open(), service_mac));
    assert_eq!(
        link_mac(&lab.target_ns),
        own_mac,
        "the interface's MAC changed"
    );
    assert!(
        interface_takes(&lab.target_ns, service_mac),
        "the service MAC is not on eth0's unicast list while serving"
    );

    let (found, written, at_service, at_interface) = lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        let found = init.discover(SHELF, SLOT, Duration::from_secs(1)).unwrap();
        let target = init.find(SHELF, SLOT, Duration::from_secs(30)).unwrap();
        let written = write_and_verify(&mut init, &target, 0x5a, &[0, 2, 100]);
        let at_service = config_answers_from(service_mac, Duration::from_millis(500));
        let at_interface = config_answers_from(own_mac, Duration::from_millis(500));
        (found, written, at_service, at_interface)
    });
    assert!(!found.is_empty(), "discovery found nothing");
    assert!(
        found.iter().all(|t| t.mac == service_mac),
        "found at {:?}",
        found.iter().map(|t| t.mac).collect::<Vec<_>>()
    );
    assert_eq!(written, 3);
    assert_eq!(stats.writes.load(Relaxed), 3, "{}", stats.summary());
    assert_eq!(stats.reads.load(Relaxed), 3, "{}", stats.summary());
    assert_eq!(at_service, vec![service_mac]);
    assert!(
        at_interface.is_empty(),
        "answered at the interface's MAC by {at_interface:?}"
    );
    assert!(stats.announces.load(Relaxed) >= 1);

    server.stop();
    assert_eq!(link_mac(&lab.target_ns), own_mac);
    assert!(
        !interface_takes(&lab.target_ns, service_mac),
        "the service MAC outlived the server's socket"
    );
}

/// The MAC moves from one node to another; the client's next requests, to the MAC it knew,
/// are answered by the new node.
pub fn the_service_mac_moves_to_another_node_and_the_client_follows_without_rediscovery() {
    let lab = lab();
    let service_mac = the_service_mac();
    let node_b = lab.extra_target_ns[0].clone();
    let device = shared_disk(&lab);

    let on_a = device.clone();
    let (_root_a, server_a, stats_a) =
        lab.in_target(move || serve_here(on_a, ServeGate::always_open(), service_mac));
    let (target, before) = lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(SHELF, SLOT, Duration::from_secs(30)).unwrap();
        let before = write_and_verify(&mut init, &target, 0x11, &[0, 8, 16]);
        (target, before)
    });
    assert_eq!(target.mac, service_mac);
    assert_eq!(before, 3);
    assert_eq!(stats_a.writes.load(Relaxed), 3);

    server_a.stop();
    assert!(!interface_takes(&lab.target_ns, service_mac));
    let (_root_b, server_b, stats_b) = in_namespace(&node_b, move || {
        serve_here(device, ServeGate::always_open(), service_mac)
    });
    assert!(interface_takes(&node_b, service_mac));

    // The same Target, never rediscovered: its requests go to the MAC A had.
    let (after, earlier_data_intact) = lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        let wait = Duration::from_secs(30);
        let (_, read) = init.ata(&target, transfer(READ_EXT, 8), &[], wait).unwrap();
        let intact = read[..usize::from(SECTORS) * 512] == pattern(0x11, 8)[..];
        let after = write_and_verify(&mut init, &target, 0x22, &[0, 24]);
        (after, intact)
    });
    assert!(earlier_data_intact, "B does not serve what A wrote");
    assert_eq!(after, 2);
    assert_eq!(
        stats_a.writes.load(Relaxed),
        3,
        "A answered after it stopped"
    );
    assert_eq!(stats_b.writes.load(Relaxed), 2, "{}", stats_b.summary());
    assert_eq!(stats_b.reads.load(Relaxed), 3, "{}", stats_b.summary());

    // The bridge forwards the MAC to B's port now (B's announces moved the entry).
    let bridge = lab.bridge_ns().unwrap();
    let fdb = String::from_utf8(
        Process::new("bridge")
            .args(["-n", bridge, "fdb", "show", "br", "br0"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let entries: Vec<&str> = fdb
        .lines()
        .filter(|line| line.starts_with(&service_mac.to_string()))
        .collect();
    assert_eq!(entries.len(), 1, "{fdb}");
    // Bridge ports are named after the lab's port order: target, client, then node B.
    assert!(
        entries[0]
            .split_whitespace()
            .any(|word| word.ends_with("2b")),
        "the bridge still forwards the service MAC elsewhere: {fdb}"
    );
    server_b.stop();
}

/// Counted announces: a burst when the gate opens, refreshes while open, none while closed.
pub fn announces_repeat_while_the_gate_is_open_and_stop_when_it_closes() {
    let lab = lab();
    let service_mac = the_service_mac();
    let device = shared_disk(&lab);
    let gate = ServeGate::new(LeaseClock::new());
    let served = gate.clone();
    let (_root, server, stats) = lab.in_target(move || serve_here(device, served, service_mac));

    // Counted on the wire by the client: unsolicited config responses from the service MAC.
    let listener = {
        let client_ns = lab.client_ns.clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            in_namespace(&client_ns, move || {
                let iface = Interface::by_name("eth0").unwrap();
                let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = vec![0u8; 4096];
                let mut heard = Vec::new();
                while !stopped.is_cancelled() {
                    let Some(len) = socket.recv(&mut buf, Duration::from_millis(50)).unwrap()
                    else {
                        continue;
                    };
                    let Ok(frame) = Frame::new_checked(&buf[..len]) else {
                        continue;
                    };
                    if frame.is_response()
                        && frame.command() == Command::Config
                        && frame.tag() == 0
                        && frame.dst() == MacAddr::BROADCAST
                    {
                        heard.push(frame.src());
                    }
                }
                heard
            })
        });
        ready.recv().unwrap();
        (stop, handle)
    };

    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stats.announces.load(Relaxed), 0, "announced while closed");

    gate.set(Authority::Open);
    // Three at once, then refreshes: wait for two of those.
    wait_until("three announces and two refreshes", || {
        stats.announces.load(Relaxed) >= 5
    });

    gate.set(Authority::Closed);
    // Whatever the port thread was sending as the gate closed is out within a tick or two.
    std::thread::sleep(Duration::from_millis(300));
    let when_closed = stats.announces.load(Relaxed);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        stats.announces.load(Relaxed),
        when_closed,
        "announced while closed"
    );

    let (stop, handle) = listener;
    stop.cancel();
    let heard = handle.join().unwrap();
    assert!(
        heard.len() as u64 >= when_closed.min(5),
        "heard {} announces, counted {when_closed}",
        heard.len()
    );
    assert!(
        heard.iter().all(|&mac| mac == service_mac),
        "announced from {heard:?}"
    );
    assert_eq!(heard.len() as u64, when_closed, "heard {heard:?}");

    // Opened again: a new burst.
    gate.set(Authority::Open);
    wait_until("a new burst", || {
        stats.announces.load(Relaxed) >= when_closed + 3
    });
    server.stop();
}

/// Another node serving the blade from the same service MAC (two primaries after a MAC moved)
/// is a rival: no query reaches it (the bridge never sends a frame back where it learned the
/// destination), but its announces do, and they raise the alarm.
pub fn a_second_node_at_the_same_service_mac_is_reported_as_a_rival() {
    let lab = lab();
    let service_mac = the_service_mac();
    let device = shared_disk(&lab);
    let (alarm_tx, alarms) = std::sync::mpsc::channel();
    let alarm_tx = std::sync::Mutex::new(alarm_tx);
    let guard = RivalAlarm::new(move |rival| {
        let _ = alarm_tx.lock().unwrap().send(rival);
    });
    let on_a = device.clone();
    let (_root_a, guarded, _) = lab.in_target(move || {
        serve_guarded_here(on_a, ServeGate::always_open(), service_mac, Some(guard))
    });
    // Alone, through its own burst and a refresh or two: no alarm.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alarms.try_recv().is_err(), "an alarm with no rival");

    let (_root_b, rival, _) = in_namespace(&lab.extra_target_ns[0], move || {
        serve_here(device, ServeGate::always_open(), service_mac)
    });
    let reported = alarms
        .recv_timeout(Duration::from_secs(30))
        .expect("the rival at our own MAC was never reported");
    assert_eq!(reported, service_mac);
    rival.stop();
    guarded.stop();
}
