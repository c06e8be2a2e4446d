//! The probes count answers per query, not MACs: two nodes serving one blade from one shared
//! service MAC (what a split brain looks like once the MAC moves with the service) answer a
//! single query twice from the same MAC, and both the test client's probe (`aoe-init probe`,
//! `Initiator::probe_once`) and the daemon's wire guard (`probe::responders_counted`) see two.
//!
//! Real AoE servers in namespaces on one bridge: `target` and `t0` serve, `client` probes as
//! the failover tests' client does, `t1` asks as a secondary's wire guard does. Namespaces are
//! named `tbw…` (veths `vw…`), apart from every other suite's. Needs root.

mod common;

use common::{in_namespace, Lab};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinblade::block::{BlockDevice, FileDevice};
use twinblade::export::aoe::probe::{self, Responders};
use twinblade::export::aoe::{service_mac_for, AoeServer, BladeConfig, Export};
use twinblade::ha::gate::ServeGate;
use twinblade::supervisor::Root;
use twinblade::wire::MacAddr;
use twinblade_initiator::failover::{ProbeSample, ProbeSummary};
use twinblade_initiator::Initiator;

const SHELF: u16 = 0;
const SLOT: u8 = 7;

fn lab() -> Lab {
    Lab::bridged_named("tbw", "vw", 1500, 2)
}

fn shared_mac() -> MacAddr {
    service_mac_for(("tbw-node-a", "tbw-node-b"), SHELF, SLOT)
}

/// Starts the blade at `mac` on eth0 of namespace `ns`.
fn serve_in(ns: &str, device: Arc<dyn BlockDevice>, mac: MacAddr) -> (Root, AoeServer) {
    in_namespace(ns, move || {
        let root = Root::threads_only("test", CancellationToken::new());
        let server = AoeServer::start(
            vec![Export {
                config: BladeConfig::new(SHELF, SLOT),
                device,
                interfaces: vec!["eth0".into()],
                gate: ServeGate::always_open(),
                guard: None,
                service_mac: Some(mac),
            }],
            root.group("aoe"),
        )
        .unwrap();
        (root, server)
    })
}

/// `probes` probes from the client, as `aoe-init probe` makes them.
fn probes_from_client(lab: &Lab, probes: usize) -> Vec<ProbeSample> {
    lab.in_client(move || {
        let mut init = Initiator::open("eth0").unwrap();
        (0..probes)
            .map(|_| {
                init.probe_once(SHELF, SLOT, Duration::from_millis(150))
                    .unwrap()
            })
            .collect()
    })
}

/// What a secondary's wire guard hears from namespace `ns`.
fn wire_guard_from(ns: &str) -> Responders {
    in_namespace(ns, || {
        probe::responders_counted("eth0", SHELF, SLOT, Duration::from_millis(600), 3).unwrap()
    })
}

/// `aoe-init probe` itself, in the client namespace for about a second: its summary line.
fn aoe_init_probe(lab: &Lab) -> String {
    let out = Process::new("ip")
        .args(["netns", "exec", &lab.client_ns])
        .arg(env!("CARGO_BIN_EXE_aoe-init"))
        .args([
            "-i",
            "eth0",
            "probe",
            &format!("e{SHELF}.{SLOT}"),
            "--seconds",
            "1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "aoe-init probe: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn one_node_at_the_shared_mac_answers_each_probe_once() {
    let lab = lab();
    let mac = shared_mac();
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(lab.backing_file("disk.img", 1 << 20, 0)).unwrap());
    let (_root, server) = serve_in(&lab.target_ns, device, mac);

    let samples = probes_from_client(&lab, 5);
    let mut summary = ProbeSummary::default();
    for sample in &samples {
        assert_eq!(sample.answers, vec![(mac, 1)], "{sample:?}");
        summary.add(sample);
    }
    assert_eq!((summary.one, summary.two), (5, 0));

    let guard = wire_guard_from(&lab.extra_target_ns[1]);
    assert_eq!(guard.macs, vec![mac]);
    assert_eq!(guard.most_per_query, 1, "{guard:?}");
    assert!(!guard.is_empty());

    let line = aoe_init_probe(&lab);
    assert!(field(&line, "probes") >= 3, "{line}");
    assert_eq!(field(&line, "two"), 0, "{line}");
    assert_eq!(field(&line, "one"), field(&line, "probes"), "{line}");
    server.stop();
}

#[test]
fn two_nodes_at_one_shared_mac_are_two_answers_to_each_probe() {
    let lab = lab();
    let mac = shared_mac();
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(lab.backing_file("disk.img", 1 << 20, 0)).unwrap());
    let (_root_a, server_a) = serve_in(&lab.target_ns, device.clone(), mac);
    let (_root_b, server_b) = serve_in(&lab.extra_target_ns[0], device, mac);

    // Counting MACs, as the probe did, would see one; counting answers per query sees two.
    let samples = probes_from_client(&lab, 5);
    let mut summary = ProbeSummary::default();
    for sample in &samples {
        summary.add(sample);
    }
    assert_eq!(summary.macs, vec![mac]);
    assert_eq!(summary.two_macs, 0, "{samples:?}");
    assert!(
        summary.two >= 4 && summary.same_mac == summary.two,
        "two answers per probe expected: {samples:?}"
    );
    assert!(
        samples.iter().all(|s| s.count() <= 2),
        "more answers than nodes: {samples:?}"
    );

    let guard = wire_guard_from(&lab.extra_target_ns[1]);
    assert_eq!(guard.macs, vec![mac], "{guard:?}");
    assert_eq!(guard.most_per_query, 2, "{guard:?}");

    let line = aoe_init_probe(&lab);
    assert!(field(&line, "two") >= 3, "{line}");
    assert_eq!(field(&line, "two_macs"), 0, "{line}");
    assert_eq!(field(&line, "same_mac"), field(&line, "two"), "{line}");

    // One of them stops: one answer again.
    server_b.stop();
    let samples = probes_from_client(&lab, 3);
    assert!(
        samples.iter().all(|s| s.answers == vec![(mac, 1)]),
        "{samples:?}"
    );
    server_a.stop();
}
