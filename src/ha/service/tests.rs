//! Two heartbeat services talking over loopback. Every test uses its own 127.0.N.0/24
//! addresses and port, so tests run in parallel. Time assertions are loose on purpose: the
//! waits allow seconds, and nothing asserts how quickly something happened.

use super::*;
use crate::supervisor::Root;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicUsize;

const SECRET: &[u8] = b"loopback heartbeat secret";
const INTERVAL: Duration = Duration::from_millis(50);
const DEAD_TIME: Duration = Duration::from_millis(600);
/// The longest any test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(5);

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, host))
}

/// Settings for `node`, whose addresses end in `.our` on each of `nets`, the peer's in `.their`.
fn settings(node: &str, peer: &str, nets: &[u8], our: u8, their: u8) -> HeartbeatSettings {
    HeartbeatSettings {
        port: 47700 + u16::from(nets[0]),
        interval: INTERVAL,
        dead_time: DEAD_TIME,
        ..HeartbeatSettings::new(
            node,
            peer,
            SECRET,
            nets.iter()
                .enumerate()
                .map(|(id, &net)| HeartbeatPath {
                    id: id as u8,
                    local: ip(net, our),
                    peer: ip(net, their),
                })
                .collect(),
        )
    }
}

fn pair(nets: &[u8]) -> (HeartbeatSettings, HeartbeatSettings) {
    (
        settings("alpha", "beta", nets, 2, 3),
        settings("beta", "alpha", nets, 3, 2),
    )
}

fn started(settings: HeartbeatSettings) -> (Root, Heartbeat) {
    let root = Root::threads_only(&settings.node.clone(), CancellationToken::new());
    let heartbeat = Heartbeat::start(settings, &root).expect("heartbeat starts");
    (root, heartbeat)
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hears_on_every_path(heartbeat: &Heartbeat) -> bool {
    heartbeat
        .paths()
        .iter()
        .all(|path| !path.silent && path.last_heard_age.is_some() && path.rtt.is_some())
}

fn counter() -> (Arc<AtomicUsize>, Box<dyn Fn() + Send + Sync>) {
    let count = Arc::new(AtomicUsize::new(0));
    let callback = {
        let count = count.clone();
        Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })
    };
    (count, callback)
}

const PRIMARY_SERVING: LocalResource = LocalResource {
    role: Role::Primary,
    serving: true,
    up_to_date: true,
    outdated: false,
    outdate_request: false,
    handing_over: false,
    wants_switchover: false,
};

#[test]
fn two_nodes_see_each_other_exchange_state_and_notice_a_death() {
    let (alpha_settings, beta_settings) = pair(&[1, 2]);
    let (alpha_root, alpha) = started(alpha_settings);
    let (beta_root, beta) = started(beta_settings);
    assert!(!alpha.single_path());

    // Alive on both paths, round trips measured, leases granted by the echoes.
    wait_until("alpha hears beta on every path", || {
        hears_on_every_path(&alpha)
    });
    wait_until("beta hears alpha on every path", || {
        hears_on_every_path(&beta)
    });
    wait_until("both alive", || !alpha.peer_dead() && !beta.peer_dead());
    wait_until("alpha's lease", || alpha.lease().valid());
    wait_until("beta's lease", || beta.lease().valid());
    let report = alpha.paths();
    assert_eq!(report.len(), 2);
    assert_eq!(
        (report[1].id, report[1].local, report[1].peer),
        (1, ip(2, 2), ip(2, 3))
    );
    assert!(report.iter().all(|path| path.rtt.unwrap() < PATIENCE));

    // A published state reaches the peer and fires its subscriber.
    let (beta_told, on_change) = counter();
    beta.subscribe("r0", on_change);
    alpha.publish("r0", PRIMARY_SERVING);
    wait_until("beta learns r0", || {
        beta.peer_resource("r0")
            == Some(PeerResource {
                role: Role::Primary,
                serving: true,
                up_to_date: true,
                outdated: false,
                outdate_request: false,
                handing_over: false,
                wants_switchover: false,
            })
    });
    wait_until("beta's subscriber", || beta_told.load(Ordering::SeqCst) > 0);
    assert_eq!(beta.peer_resource("r1"), None);

    // A change (here: asking the peer to outdate itself) arrives too.
    let told_before = beta_told.load(Ordering::SeqCst);
    alpha.publish(
        "r0",
        LocalResource {
            outdate_request: true,
            ..PRIMARY_SERVING
        },
    );
    wait_until("beta learns of the outdate request", || {
        beta.peer_resource("r0").is_some_and(|r| r.outdate_request)
    });
    wait_until("beta's subscriber again", || {
        beta_told.load(Ordering::SeqCst) > told_before
    });

    // Beta stops: alpha declares it dead, forgets its state, and its lease lapses.
    let (alpha_told, on_change) = counter();
    alpha.subscribe("r0", on_change);
    beta.publish(
        "r0",
        LocalResource {
            role: Role::Secondary,
            serving: false,
            ..PRIMARY_SERVING
        },
    );
    wait_until("alpha learns beta's r0", || {
        alpha.peer_resource("r0").is_some()
    });
    beta_root.stop();
    let told_before = alpha_told.load(Ordering::SeqCst);
    wait_until("alpha declares beta dead", || alpha.peer_dead());
    assert_eq!(alpha.peer_resource("r0"), None);
    assert!(alpha.paths().iter().all(|path| path.silent));
    wait_until("alpha's lease lapses", || !alpha.lease().valid());
    wait_until("alpha's subscriber hears of the death", || {
        alpha_told.load(Ordering::SeqCst) > told_before
    });

    // A new beta process (a restart: new boot nonce) is believed at once.
    let (_beta_root, beta) = started(pair(&[1, 2]).1);
    beta.publish("r0", PRIMARY_SERVING);
    wait_until("alpha hears the restarted beta", || !alpha.peer_dead());
    wait_until("alpha learns the restarted beta's r0", || {
        alpha
            .peer_resource("r0")
            .is_some_and(|r| r.role == Role::Primary)
    });
    wait_until("alpha's lease again", || alpha.lease().valid());
    alpha_root.stop();
}

#[test]
fn a_peer_with_the_wrong_secret_stays_dead() {
    let (alpha_settings, mut beta_settings) = pair(&[3]);
    beta_settings.secret = b"another secret".to_vec();
    let (_alpha_root, alpha) = started(alpha_settings);
    let (_beta_root, beta) = started(beta_settings);
    assert!(alpha.single_path());
    wait_until("alpha refuses beta's datagrams", || {
        alpha.bad_datagrams() > 0
    });
    wait_until("alpha declares beta dead", || alpha.peer_dead());
    wait_until("beta declares alpha dead", || beta.peer_dead());
    assert!(!alpha.lease().valid() && !beta.lease().valid());
    assert_eq!(alpha.paths()[0].last_heard_age, None);
}

#[test]
fn a_datagram_from_someone_else_is_refused() {
    let (alpha_settings, _) = pair(&[4]);
    let (_alpha_root, alpha) = started(alpha_settings);
    let stranger = UdpSocket::bind((ip(4, 3), 0)).unwrap();
    let repr = HeartbeatRepr {
        kind: Kind::Heartbeat,
        path: 0,
        role: Role::Secondary,
        flags: StatusFlags::default(),
        name: "gamma".to_string(),
        boot_nonce: 1,
        sequence: 0,
        sent_us: 0,
        echo_us: 0,
        reach: None,
        resources: Vec::new(),
    };
    let target = SocketAddr::new(ip(4, 2), 47704);
    stranger
        .send_to(&repr.to_signed_vec(SECRET), target)
        .unwrap();
    wait_until("alpha refuses gamma", || alpha.bad_datagrams() == 1);
    // An echo of a heartbeat alpha never sent does not grant a lease.
    let forged_echo = HeartbeatRepr {
        kind: Kind::EchoReply,
        name: "beta".to_string(),
        echo_us: 1,
        ..repr
    };
    stranger
        .send_to(&forged_echo.to_signed_vec(SECRET), target)
        .unwrap();
    wait_until("alpha refuses the echo", || alpha.bad_datagrams() == 2);
    assert!(!alpha.lease().valid());
    assert_eq!(alpha.paths()[0].last_heard_age, None);
}

#[test]
fn start_refuses_what_cannot_work() {
    let root = Root::threads_only("t", CancellationToken::new());
    // 192.0.2.1 (TEST-NET-1) is not an address of this machine.
    let mut not_ours = settings("alpha", "beta", &[5], 2, 3);
    not_ours.paths[0].local = "192.0.2.1".parse().unwrap();
    match Heartbeat::start(not_ours, &root) {
        Err(HeartbeatError::Bind { address, .. }) => {
            assert_eq!(address, "192.0.2.1:47705".parse().unwrap())
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // An address and port in use (another daemon) is refused, not shared.
    let (_first_root, _first) = started(settings("alpha", "beta", &[5], 2, 3));
    match Heartbeat::start(settings("alpha", "beta", &[5], 2, 3), &root) {
        Err(HeartbeatError::Bind { address, .. }) => {
            assert_eq!(address, "127.0.5.2:47705".parse().unwrap())
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let no_paths = HeartbeatSettings {
        paths: Vec::new(),
        ..settings("alpha", "beta", &[5], 2, 3)
    };
    assert!(matches!(
        Heartbeat::start(no_paths, &root),
        Err(HeartbeatError::Settings(_))
    ));
    let mut mixed_families = settings("alpha", "beta", &[5], 2, 3);
    mixed_families.paths[0].peer = "::1".parse().unwrap();
    assert!(matches!(
        Heartbeat::start(mixed_families, &root),
        Err(HeartbeatError::Settings(_))
    ));
    let too_fast = HeartbeatSettings {
        dead_time: INTERVAL,
        ..settings("alpha", "beta", &[5], 2, 3)
    };
    assert!(matches!(
        Heartbeat::start(too_fast, &root),
        Err(HeartbeatError::Settings(_))
    ));
    assert!(root.children().is_empty());
}

#[test]
fn defaults_and_lease_time() {
    let settings = HeartbeatSettings::new("a", "b", "s", Vec::new());
    assert_eq!(settings.port, 7790);
    assert_eq!(settings.interval, Duration::from_millis(200));
    assert_eq!(settings.dead_time, Duration::from_secs(1));
    assert_eq!(settings.lease_time(), Duration::from_nanos(666_666_666));
    assert!(!format!("{settings:?}").contains("secret: "));
}

#[test]
fn the_peer_is_not_dead_before_the_dead_time_has_passed() {
    let (alpha_settings, _) = pair(&[6]);
    let before_start = Instant::now();
    let (_root, alpha) = started(alpha_settings);
    let (told, on_change) = counter();
    alpha.subscribe("r0", on_change);
    // Right after start nothing has been heard, but nothing could have been yet. (Checked
    // only if this thread really ran within the dead time of the start.)
    let dead = alpha.peer_dead();
    if before_start.elapsed() < DEAD_TIME {
        assert!(!dead);
    }
    wait_until("alpha declares the absent peer dead", || alpha.peer_dead());
    wait_until("the subscriber hears of it", || {
        told.load(Ordering::SeqCst) > 0
    });
}

/// A dead time long enough that a test stalled by a busy machine does not see the peer die
/// or an echo go stale between two steps.
const PATIENT_DEAD_TIME: Duration = Duration::from_secs(2);

/// Alpha's heartbeat state without its thread, fed datagrams one by one.
fn driven(net: u8, dead_time: Duration) -> (Heartbeat, Runner) {
    Heartbeat::prepare(HeartbeatSettings {
        dead_time,
        ..settings("alpha", "beta", &[net], 2, 3)
    })
    .expect("alpha prepares")
}

/// A datagram from beta, signed with the shared secret.
fn from_beta(
    kind: Kind,
    boot_nonce: u64,
    sequence: u64,
    echo_us: u64,
    r0: Option<Role>,
) -> Vec<u8> {
    HeartbeatRepr {
        kind,
        path: 0,
        role: Role::Secondary,
        flags: StatusFlags::default(),
        name: "beta".to_string(),
        boot_nonce,
        sequence,
        sent_us: 5,
        echo_us,
        reach: None,
        resources: r0
            .map(|role| ResourceEntry {
                name: "r0".to_string(),
                role,
                flags: ResourceFlags::default(),
            })
            .into_iter()
            .collect(),
    }
    .to_signed_vec(SECRET)
}

fn beta_address(net: u8) -> SocketAddr {
    SocketAddr::new(ip(net, 3), 47700 + u16::from(net))
}

#[test]
fn reordered_datagrams_do_not_undo_newer_state() {
    let (alpha, mut runner) = driven(10, PATIENT_DEAD_TIME);
    let from = beta_address(10);
    let (told, on_change) = counter();
    alpha.subscribe("r0", on_change);
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 1, 10, 0, Some(Role::Primary)),
        from,
    );
    assert_eq!(alpha.peer_resource("r0").unwrap().role, Role::Primary);
    assert_eq!(told.load(Ordering::SeqCst), 1);
    // Sequence 9 arrives late on another path: alive, but its entries are stale.
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 1, 9, 0, Some(Role::Secondary)),
        from,
    );
    assert_eq!(alpha.peer_resource("r0").unwrap().role, Role::Primary);
    assert_eq!(told.load(Ordering::SeqCst), 1);
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 1, 11, 0, Some(Role::Secondary)),
        from,
    );
    assert_eq!(alpha.peer_resource("r0").unwrap().role, Role::Secondary);
    assert_eq!(told.load(Ordering::SeqCst), 2);
    // The same state again tells nobody; a replayed datagram changes nothing.
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 1, 12, 0, Some(Role::Secondary)),
        from,
    );
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 1, 10, 0, Some(Role::Primary)),
        from,
    );
    assert_eq!(alpha.peer_resource("r0").unwrap().role, Role::Secondary);
    assert_eq!(told.load(Ordering::SeqCst), 2);
    assert_eq!(alpha.bad_datagrams(), 1);
}

#[test]
fn only_echoes_of_our_recent_heartbeats_renew_the_lease() {
    const STALE_AGE: Duration = PATIENT_DEAD_TIME.saturating_add(Duration::from_millis(100));
    // Let the process clock run long enough that a stale send time exists.
    while clock::now_nanos() < STALE_AGE.as_nanos() as u64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (alpha, mut runner) = driven(11, PATIENT_DEAD_TIME);
    let from = beta_address(11);
    // A heartbeat from beta is no echo: it says beta is alive, not that it heard us.
    runner.handle(0, &from_beta(Kind::Heartbeat, 1, 0, 0, None), from);
    assert!(!alpha.peer_dead());
    assert!(!alpha.lease().valid());

    runner.send_heartbeats();
    let sent_us = *runner.recent_sends.back().unwrap();
    runner.handle(
        0,
        &from_beta(Kind::EchoReply, 1, 1, sent_us + 1, None),
        from,
    );
    assert_eq!(
        alpha.bad_datagrams(),
        1,
        "an echo of a heartbeat we never sent"
    );
    assert!(!alpha.lease().valid());

    runner.handle(0, &from_beta(Kind::EchoReply, 1, 2, sent_us, None), from);
    let sent = clock::instant_at(sent_us * 1000);
    let lease_until = sent + PATIENT_DEAD_TIME * 2 / 3;
    assert_eq!(alpha.lease().until(), Some(lease_until));
    assert!(alpha.paths()[0].rtt.is_some());

    // Send times we did remember, but that are in the future or older than the dead time.
    let now_us = clock::now_nanos() / 1000;
    let future_us = now_us + 10_000_000;
    let stale_us = now_us - STALE_AGE.as_micros() as u64;
    runner.recent_sends.extend([stale_us, future_us]);
    runner.handle(0, &from_beta(Kind::EchoReply, 1, 3, future_us, None), from);
    runner.handle(0, &from_beta(Kind::EchoReply, 1, 4, stale_us, None), from);
    assert_eq!(alpha.bad_datagrams(), 3);
    assert_eq!(alpha.lease().until(), Some(lease_until));
    // Those refusals did not consume their sequences.
    runner.handle(0, &from_beta(Kind::EchoReply, 1, 3, sent_us, None), from);
    assert_eq!(alpha.bad_datagrams(), 3);
}

#[test]
fn a_restart_revokes_the_lease_and_replaces_the_state() {
    let (alpha, mut runner) = driven(12, PATIENT_DEAD_TIME);
    let from = beta_address(12);
    runner.send_heartbeats();
    let sent_us = *runner.recent_sends.back().unwrap();
    runner.handle(
        0,
        &from_beta(Kind::EchoReply, 1, 7, sent_us, Some(Role::Primary)),
        from,
    );
    assert!(alpha.lease().until().is_some());
    assert!(alpha.peer_resource("r0").is_some());
    runner.handle(0, &from_beta(Kind::Heartbeat, 2, 0, 0, None), from);
    assert_eq!(alpha.lease().until(), None);
    assert_eq!(alpha.peer_resource("r0"), None);
    assert_eq!(alpha.bad_datagrams(), 0);
}

#[test]
fn a_restart_heard_late_is_believed_once_the_peer_is_dead() {
    let (alpha, mut runner) = driven(13, DEAD_TIME);
    let from = beta_address(13);
    runner.handle(0, &from_beta(Kind::Heartbeat, 1, 0, 0, None), from);
    // A new boot well past its first datagrams: not believed while the old boot is alive.
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 2, 5000, 0, Some(Role::Primary)),
        from,
    );
    assert_eq!(alpha.bad_datagrams(), 1);
    assert_eq!(alpha.peer_resource("r0"), None);
    wait_until("beta's first boot is declared dead", || alpha.peer_dead());
    runner.handle(
        0,
        &from_beta(Kind::Heartbeat, 2, 5001, 0, Some(Role::Primary)),
        from,
    );
    assert_eq!(alpha.bad_datagrams(), 1);
    assert!(!alpha.peer_dead());
    assert_eq!(alpha.peer_resource("r0").unwrap().role, Role::Primary);
    // The old boot is over for good.
    runner.handle(0, &from_beta(Kind::Heartbeat, 1, 1, 0, None), from);
    assert_eq!(alpha.bad_datagrams(), 2);
}

#[test]
fn the_reach_travels_to_the_peer_and_outlives_its_death() {
    let (alpha_settings, beta_settings) = pair(&[20]);
    let (alpha_root, alpha) = started(alpha_settings);
    let (_beta_root, beta) = started(beta_settings);
    let (changes, on_change) = counter();
    beta.subscribe("r0", on_change);
    wait_until("beta hears alpha", || beta.peer_heard());
    assert_eq!(beta.peer_reach(), None, "alpha has no ping targets yet");
    alpha.publish_reach(Some(2));
    assert_eq!(alpha.own_reach(), Some(2));
    wait_until("beta hears alpha's reach", || beta.peer_reach() == Some(2));
    wait_until("beta's subscriber was told", || {
        changes.load(Ordering::SeqCst) > 0
    });
    alpha.publish_reach(Some(1));
    wait_until("beta hears the new reach", || beta.peer_reach() == Some(1));
    // Alpha dies: beta keeps what it last heard.
    alpha_root.stop();
    wait_until("beta declares alpha dead", || beta.peer_dead());
    assert_eq!(beta.peer_reach(), Some(1));
    // Our own reach is published to our own subscribers too.
    let before = changes.load(Ordering::SeqCst);
    beta.publish_reach(Some(0));
    assert_eq!(changes.load(Ordering::SeqCst), before + 1);
    beta.publish_reach(Some(0));
    assert_eq!(
        changes.load(Ordering::SeqCst),
        before + 1,
        "no change, no call"
    );
}
