//! The floating IP primitives against a real kernel: adding, removing and finding an address
//! over rtnetlink inside a network namespace, and gratuitous ARP seen from a peer namespace
//! across a veth pair (counted on a raw socket, and in the peer's neighbour table).
//!
//! Namespaces are named `tbi<pid><n>a` / `tbi<pid><n>b`, a prefix no other test uses, and only
//! the ones a test created are deleted.

mod common;

use common::{in_namespace, require_root};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use twinblade::net::address::{self, Added, AddressError, FloatingIp, Removed};
use twinblade::net::{Interface, PacketSocket};
use twinblade::wire::arp::{self, ArpRepr, Operation};
use twinblade::wire::MacAddr;

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

/// The virtual MAC the announcements carry: locally administered, not either veth's own.
const VIRTUAL_MAC: MacAddr = MacAddr([0x02, 0x54, 0x42, 0x1b, 0x00, 0x64]);
/// The MAC the peer believes the floating IP is at before the announcement.
const STALE_MAC: MacAddr = MacAddr([0x02, 0x54, 0x42, 0x1b, 0x00, 0x01]);

/// Two namespaces joined by one veth pair, `eth0` in each: `node` (10.77.0.1/24) where the
/// floating IP goes, `peer` (10.77.0.2/24) that watches it arrive.
struct Pair {
    node: String,
    peer: String,
}

fn run(args: &[&str]) -> String {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Pair {
    fn new() -> Pair {
        require_root();
        let id = std::process::id() % 10000 * 100 + NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        let pair = Pair {
            node: format!("tbi{id}a"),
            peer: format!("tbi{id}b"),
        };
        for ns in [&pair.node, &pair.peer] {
            assert!(
                !Path::new("/var/run/netns").join(ns).exists(),
                "namespace {ns} already exists; not ours to reuse"
            );
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (node_end, peer_end) = (format!("tbi{id}x"), format!("tbi{id}y"));
        run(&[
            "ip", "link", "add", &node_end, "type", "veth", "peer", "name", &peer_end,
        ]);
        run(&["ip", "link", "set", &node_end, "netns", &pair.node]);
        run(&["ip", "link", "set", &peer_end, "netns", &pair.peer]);
        for (ns, end, own) in [
            (&pair.node, &node_end, "10.77.0.1/24"),
            (&pair.peer, &peer_end, "10.77.0.2/24"),
        ] {
            run(&["ip", "-n", ns, "link", "set", end, "name", "eth0"]);
            run(&["ip", "-n", ns, "addr", "add", own, "dev", "eth0"]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        pair
    }

    fn in_node<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_namespace(&self.node, f)
    }

    /// `ip -o addr show dev eth0` in the node namespace.
    fn node_addresses(&self) -> String {
        run(&["ip", "-n", &self.node, "-o", "addr", "show", "dev", "eth0"])
    }

    /// The peer's neighbour entry for `ip` on eth0 (empty if none).
    fn peer_neighbour(&self, ip: Ipv4Addr) -> String {
        run(&[
            "ip",
            "-n",
            &self.peer,
            "neigh",
            "show",
            &ip.to_string(),
            "dev",
            "eth0",
        ])
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.node, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn floating(s: &str) -> FloatingIp {
    s.parse().unwrap()
}

#[test]
fn add_holds_and_remove_are_idempotent() {
    let pair = Pair::new();
    for (ip, listed_as) in [
        (floating("10.77.0.100/24"), "inet 10.77.0.100/24"),
        (floating("fd00:77::100/64"), "inet6 fd00:77::100/64"),
    ] {
        let steps = pair.in_node(move || {
            let before = address::holds("eth0", &ip).unwrap();
            let first = address::add("eth0", &ip).unwrap();
            let held = address::holds("eth0", &ip).unwrap();
            let second = address::add("eth0", &ip).unwrap();
            (before, first, held, second)
        });
        assert_eq!(steps, (false, Added::Added, true, Added::AlreadyThere));
        let listed = pair.node_addresses();
        assert_eq!(listed.matches(listed_as).count(), 1, "{listed}");

        let steps = pair.in_node(move || {
            let first = address::remove("eth0", &ip).unwrap();
            let held = address::holds("eth0", &ip).unwrap();
            let second = address::remove("eth0", &ip).unwrap();
            (first, held, second)
        });
        assert_eq!(steps, (Removed::Removed, false, Removed::WasNotThere));
        let listed = pair.node_addresses();
        assert!(!listed.contains(listed_as), "{listed}");
        // The node's own address is untouched.
        assert!(listed.contains("inet 10.77.0.1/24"), "{listed}");
    }
}

#[test]
fn an_ipv4_address_is_its_prefix_too() {
    let pair = Pair::new();
    let narrow = floating("10.77.0.100/24");
    let wide = floating("10.77.0.100/16");
    let (held_wide, removed_wide, still_narrow) = pair.in_node(move || {
        address::add("eth0", &narrow).unwrap();
        (
            address::holds("eth0", &wide).unwrap(),
            address::remove("eth0", &wide).unwrap(),
            address::holds("eth0", &narrow).unwrap(),
        )
    });
    assert!(!held_wide);
    assert_eq!(removed_wide, Removed::WasNotThere);
    assert!(still_narrow);
}

#[test]
fn a_missing_interface_is_named_in_the_error() {
    let pair = Pair::new();
    let ip = floating("10.77.0.100/24");
    let errors = pair.in_node(move || {
        vec![
            address::add("nosuch0", &ip).unwrap_err(),
            address::remove("nosuch0", &ip).unwrap_err(),
            address::holds("nosuch0", &ip).unwrap_err(),
            address::announce(
                "nosuch0",
                Ipv4Addr::new(10, 77, 0, 100),
                VIRTUAL_MAC,
                1,
                Duration::ZERO,
            )
            .unwrap_err(),
        ]
    });
    assert_eq!(errors.len(), 4);
    for error in errors {
        assert!(
            matches!(error, AddressError::NoSuchInterface { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("\"nosuch0\""), "{message}");
        assert!(message.contains("10.77.0.100"), "{message}");
    }
}

/// Counts, on the peer's eth0, gratuitous ARP requests for `ip` from `mac` until `stop`.
/// Sends `()` on `ready` once its socket is open.
fn count_announcements(
    peer_ns: String,
    ip: Ipv4Addr,
    mac: MacAddr,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        in_namespace(&peer_ns, move || {
            let eth0 = Interface::by_name("eth0").unwrap();
            let socket = PacketSocket::open(&eth0, arp::ETHERTYPE).unwrap();
            ready.send(()).unwrap();
            let (mut matching, mut other) = (0u32, 0u32);
            let mut buf = vec![0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Some(len) = socket.recv(&mut buf, Duration::from_millis(50)).unwrap() else {
                    continue;
                };
                let parsed = arp::Packet::new_checked(&buf[..len])
                    .and_then(|packet| ArpRepr::parse(&packet));
                match parsed {
                    Ok(repr)
                        if repr.is_gratuitous()
                            && repr.operation == Operation::Request
                            && repr.sender_ip == ip
                            && repr.sender_mac == mac
                            && repr.src == mac
                            && repr.dst.is_broadcast() =>
                    {
                        matching += 1
                    }
                    _ => other += 1,
                }
            }
            (matching, other)
        })
    })
}

/// Runs an announcement of `count` frames from the node while the peer counts them; returns
/// what the peer counted (matching, other ARP frames).
fn announce_and_count(pair: &Pair, ip: Ipv4Addr, count: u32) -> (u32, u32) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = count_announcements(pair.peer.clone(), ip, VIRTUAL_MAC, ready_tx, stop.clone());
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("listener ready");
    let sent = pair.in_node(move || {
        address::announce("eth0", ip, VIRTUAL_MAC, count, Duration::from_millis(100)).unwrap()
    });
    assert_eq!(sent, count);
    // The frames are already on the veth when announce returns; the grace period only lets
    // the listener drain them (and would catch any extra ones).
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    listener.join().unwrap()
}

#[test]
fn announce_sends_exactly_count_gratuitous_arps_and_moves_the_peers_entry() {
    let pair = Pair::new();
    let ip = Ipv4Addr::new(10, 77, 0, 100);
    pair.in_node(move || address::add("eth0", &floating("10.77.0.100/24")).unwrap());
    // The peer knows the floating IP at its old home, as a client does before a failover.
    // Linux updates an existing entry on gratuitous ARP; it creates new ones only with
    // arp_accept (tested below).
    run(&[
        "ip",
        "-n",
        &pair.peer,
        "neigh",
        "replace",
        &ip.to_string(),
        "lladdr",
        &STALE_MAC.to_string(),
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    assert!(pair.peer_neighbour(ip).contains(&STALE_MAC.to_string()));

    let (matching, _other) = announce_and_count(&pair, ip, 3);
    assert_eq!(matching, 3);
    let entry = pair.peer_neighbour(ip);
    assert!(
        entry.contains(&format!("lladdr {VIRTUAL_MAC}")),
        "peer's entry did not move: {entry:?}"
    );
}

#[test]
fn a_peer_with_arp_accept_learns_the_address_from_the_announcement() {
    let pair = Pair::new();
    let ip = Ipv4Addr::new(10, 77, 0, 101);
    run(&[
        "ip",
        "netns",
        "exec",
        &pair.peer,
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_accept",
    ]);
    assert_eq!(pair.peer_neighbour(ip).trim(), "");
    let (matching, _other) = announce_and_count(&pair, ip, 1);
    assert_eq!(matching, 1);
    let entry = pair.peer_neighbour(ip);
    assert!(
        entry.contains(&format!("lladdr {VIRTUAL_MAC}")),
        "peer did not learn the address: {entry:?}"
    );
    // An IPv6 address has no ARP to announce; the floating IP itself is family-neutral.
    assert!(matches!(floating("fd00:77::100/64").address, IpAddr::V6(_)));
}
