//! The service group against a real kernel, in a namespace: it starts floating IP → AoE at
//! the service MAC → NBD on the floating IP, stops in reverse leaving nothing behind, a step
//! that fails undoes the steps before it, and the floating IP is announced (a burst, then a
//! refresh) and kept (its kernel lifetime renewed) only while the serve gate is open.

mod common;

use common::{in_namespace, Lab};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinblade::block::null::NullDevice;
use twinblade::block::BlockDevice;
use twinblade::daemon::resource::service::{GroupError, ServiceGroup, ServiceSpec};
use twinblade::export::aoe::{responders, RivalAlarm};
use twinblade::ha::clock::LeaseClock;
use twinblade::ha::gate::Authority;
use twinblade::ha::gate::ServeGate;
use twinblade::net::{Interface, PacketSocket};
use twinblade::supervisor::Root;
use twinblade::wire::arp::{self, ArpRepr};
use twinblade::wire::MacAddr;

const SERVICE_MAC: MacAddr = MacAddr([0x02, 0x54, 0x42, 0x5e, 0x00, 0x07]);
const FLOATING: &str = "10.77.0.100/24";
const NBD_PORT: u16 = 10809;

fn spec(nbd_port: u16) -> ServiceSpec {
    ServiceSpec {
        name: "r0".into(),
        aoe: (7, 3),
        interface: "eth0".into(),
        service_mac: Some(SERVICE_MAC),
        floating_ip: Some(FLOATING.parse().unwrap()),
        nbd: Some(SocketAddr::new("10.77.0.100".parse().unwrap(), nbd_port)),
    }
}

fn lab() -> Lab {
    let lab = Lab::new(1500, 1);
    let ok = Command::new("ip")
        .args([
            "-n",
            &lab.client_ns,
            "addr",
            "add",
            "10.77.0.10/24",
            "dev",
            "eth0",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    lab
}

fn holds_floating_ip(lab: &Lab) -> bool {
    let out = Command::new("ip")
        .args([
            "-n",
            &lab.target_ns,
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("inet 10.77.0.100/24")
}

/// Who answers e7.3 on the client's wire.
fn answering(lab: &Lab) -> Vec<MacAddr> {
    in_namespace(&lab.client_ns, || {
        responders("eth0", 7, 3, Duration::from_millis(300), 3).unwrap()
    })
}

fn nbd_connects(lab: &Lab, port: u16) -> bool {
    in_namespace(&lab.client_ns, move || {
        let addr = SocketAddr::new("10.77.0.100".parse().unwrap(), port);
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    })
}

/// Starts the group in the target namespace; the root (runtime and threads) lives there too.
fn start(lab: &Lab, spec: ServiceSpec) -> (Root, Result<ServiceGroup, GroupError>) {
    start_gated(lab, spec, ServeGate::always_open())
}

fn start_gated(
    lab: &Lab,
    spec: ServiceSpec,
    gate: Arc<ServeGate>,
) -> (Root, Result<ServiceGroup, GroupError>) {
    lab.in_target(move || {
        let root = Root::new("test", CancellationToken::new(), 1).unwrap();
        let device: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(64 << 20));
        let started = ServiceGroup::start(
            &spec,
            device,
            gate,
            RivalAlarm::new(|_| {}),
            &root.group("crew"),
        )
        .map(|s| s.group);
        (root, started)
    })
}

#[test]
fn the_group_serves_at_the_floating_ip_and_service_mac_and_leaves_nothing_behind() {
    let lab = lab();
    let (root, group) = start(&lab, spec(NBD_PORT));
    let group = group.unwrap();
    assert!(holds_floating_ip(&lab));
    assert_eq!(answering(&lab), vec![SERVICE_MAC]);
    assert!(nbd_connects(&lab, NBD_PORT));

    lab.in_target(move || group.stop("r0"));
    assert!(
        !holds_floating_ip(&lab),
        "the floating IP outlived the group"
    );
    assert_eq!(answering(&lab), Vec::<MacAddr>::new());
    assert!(!nbd_connects(&lab, NBD_PORT));
    drop(root);
}

#[test]
fn a_step_that_fails_undoes_the_steps_before_it() {
    let lab = lab();
    // The NBD port is taken on every address: the last step fails.
    let taken = lab.in_target(|| std::net::TcpListener::bind(("0.0.0.0", NBD_PORT)).unwrap());
    let (root, group) = start(&lab, spec(NBD_PORT));
    let err = group.err().expect("the group started on a taken port");
    assert!(
        matches!(err, GroupError::Nbd { .. })
            && err.to_string().starts_with("NBD on 10.77.0.100:10809"),
        "{err}"
    );
    assert!(
        !holds_floating_ip(&lab),
        "the floating IP was not taken back"
    );
    assert_eq!(
        answering(&lab),
        Vec::<MacAddr>::new(),
        "AoE was not stopped"
    );
    drop(taken);

    // The first step fails: no such interface; nothing is started.
    let (root2, group) = start(
        &lab,
        ServiceSpec {
            interface: "nosuch0".into(),
            ..spec(NBD_PORT)
        },
    );
    let err = group.err().expect("started on a missing interface");
    assert!(matches!(err, GroupError::FloatingIp { .. }), "{err}");
    assert!(err.to_string().contains("nosuch0"), "{err}");
    assert!(!nbd_connects(&lab, NBD_PORT));
    drop((root, root2));
}

/// Gratuitous ARPs for 10.77.0.100 heard in the client namespace within `window`.
fn garps_heard(lab: &Lab, window: Duration) -> usize {
    in_namespace(&lab.client_ns, move || {
        let socket =
            PacketSocket::open(&Interface::by_name("eth0").unwrap(), arp::ETHERTYPE).unwrap();
        let mut buf = vec![0u8; 2048];
        let until = std::time::Instant::now() + window;
        let mut heard = 0;
        while std::time::Instant::now() < until {
            let Some(len) = socket.recv(&mut buf, Duration::from_millis(20)).unwrap() else {
                continue;
            };
            let garp = arp::Packet::new_checked(&buf[..len])
                .and_then(|p| ArpRepr::parse(&p))
                .is_ok_and(|r| r.is_gratuitous() && r.sender_ip.to_string() == "10.77.0.100");
            heard += usize::from(garp);
        }
        heard
    })
}

#[test]
fn the_floating_ip_is_announced_and_kept_only_while_the_gate_is_open() {
    let lab = lab();
    let gate = ServeGate::new(LeaseClock::new());
    let (root, group) = start_gated(&lab, spec(NBD_PORT + 1), gate.clone());
    let group = group.unwrap();
    assert!(holds_floating_ip(&lab));
    assert_eq!(
        garps_heard(&lab, Duration::from_millis(700)),
        0,
        "announced through a shut gate"
    );
    gate.set(Authority::Open);
    // The burst: five, 200 ms apart; then one a second.
    let burst = garps_heard(&lab, Duration::from_millis(1100));
    assert!(
        (4..=6).contains(&burst),
        "{burst} announcements in the first 1.1 s"
    );
    let refresh = garps_heard(&lab, Duration::from_millis(2500));
    assert!((2..=3).contains(&refresh), "{refresh} refreshes in 2.5 s");
    gate.set(Authority::Closed);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        garps_heard(&lab, Duration::from_millis(1500)),
        0,
        "announced after the gate shut"
    );
    lab.in_target(move || group.stop("r0"));
    drop(root);
}
