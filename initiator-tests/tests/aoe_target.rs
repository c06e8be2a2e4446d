//! The AoE target as a real process on a real (virtual) Ethernet link, driven by the
//! user-space initiator from another network namespace.

mod common;

use common::Lab;
use std::time::Duration;
use twinblade::net::{Interface, PacketSocket};
use twinblade::wire::aoe::{self, ArgRepr, AtaRepr, Command, Frame, HeaderRepr, PacketRepr};
use twinblade::wire::MacAddr;
use twinblade_initiator::{fill_pattern, Initiator, IoPlan, Target};

const MIB: u64 = 1 << 20;

fn plan(write: bool, bytes: u64, outstanding: usize, target: &Target, seed: u64) -> IoPlan {
    IoPlan {
        write,
        start_sector: 0,
        sectors: bytes / 512,
        sectors_per_frame: target.sectors_per_frame,
        outstanding,
        seed,
        verify: !write,
        retransmit_after: Duration::from_millis(500),
        give_up_after: Duration::from_secs(20),
        random: false,
        out: None,
    }
}

/// Checks that `file` holds pattern `seed` in its first `bytes` bytes starting at `file_offset`.
fn assert_file_holds_pattern(file: &std::path::Path, file_offset: u64, bytes: u64, seed: u64) {
    let data = std::fs::read(file).unwrap();
    let mut expected = vec![0u8; 512];
    for sector in 0..bytes / 512 {
        fill_pattern(seed, sector, &mut expected);
        let at = (file_offset + sector * 512) as usize;
        assert_eq!(
            &data[at..at + 512],
            &expected[..],
            "sector {sector} of the backing file"
        );
    }
}

#[test]
fn serves_pattern_at_mtu_1500_and_9000_without_drops_at_64_outstanding() {
    for (mtu, sectors) in [(1500, 2u8), (9000, 17u8)] {
        let mut lab = Lab::new(mtu, 1);
        let file = lab.backing_file("disk.img", 32 << 20, 0);
        lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
        let reports = lab.in_client(move || {
            let mut init = Initiator::open("eth0").unwrap();
            let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
            assert_eq!(
                target.sectors_per_frame, sectors,
                "sectors per frame at MTU {mtu}"
            );
            assert_eq!(target.buffer_count, 64);
            assert_eq!(init.identify(&target).unwrap(), 65536);
            let write = init
                .run(&target, &plan(true, 16 * MIB, 16, &target, 7))
                .unwrap();
            let read = init
                .run(&target, &plan(false, 16 * MIB, 64, &target, 7))
                .unwrap();
            let write64 = init
                .run(&target, &plan(true, 16 * MIB, 64, &target, 8))
                .unwrap();
            (write, read, write64)
        });
        let (write, read, write64) = reports;
        assert_eq!(read.mismatched_sectors, 0);
        assert_eq!(read.bytes, 16 * MIB);
        assert_eq!(
            read.retransmits, 0,
            "64 outstanding reads must not be dropped (MTU {mtu})"
        );
        assert_eq!(
            write64.retransmits, 0,
            "64 outstanding writes must not be dropped (MTU {mtu})"
        );
        println!(
            "MTU {mtu}: write q16 {:.0} MB/s, read q64 {:.0} MB/s, write q64 {:.0} MB/s",
            write.mb_per_s(),
            read.mb_per_s(),
            write64.mb_per_s()
        );
        assert_file_holds_pattern(&file, 0, 16 * MIB, 8);
    }
}

#[test]
fn recvmmsg_fallback_serves_the_same() {
    // The default frame path uses PACKET_MMAP rings; the fallback must work as well.
    let mut lab = Lab::new(9000, 1);
    let file = lab.backing_file("disk.img", 8 << 20, 0);
    let index = lab.start_target_with_env(
        &["vblade", "0", "3", "eth0", file.to_str().unwrap()],
        &[("TWINBLADE_AOE_IO", "mmsg")],
    );
    let read = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        init.run(&target, &plan(true, 4 * MIB, 64, &target, 5))
            .unwrap();
        init.run(&target, &plan(false, 4 * MIB, 64, &target, 5))
            .unwrap()
    });
    assert_eq!(read.mismatched_sectors, 0);
    assert_eq!(read.retransmits, 0);
    assert_file_holds_pattern(&file, 0, 4 * MIB, 5);
    lab.stop_target(index);
    assert!(!lab
        .target_log(index)
        .contains("PACKET_MMAP rings unavailable"));
}

#[test]
fn announces_when_serving_starts() {
    let mut lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", 4 << 20, 0);
    let client_ns = lab.client_ns.clone();
    // Listen before the target starts; the announce is the first thing it sends.
    let listener = std::thread::spawn(move || {
        common::in_namespace(&client_ns, || {
            let iface = Interface::by_name("eth0").unwrap();
            let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
            let mut buf = vec![0u8; 2000];
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Some(len) = socket.recv(&mut buf, Duration::from_millis(100)).unwrap() {
                    let repr =
                        PacketRepr::parse(&Frame::new_checked(&buf[..len]).unwrap()).unwrap();
                    return Some(repr);
                }
            }
            None
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
    let announce = listener.join().unwrap().expect("no announce within 10 s");
    assert!(announce.header.response);
    assert_eq!(announce.header.tag, 0);
    assert_eq!(announce.header.dst, MacAddr::BROADCAST);
    assert_eq!((announce.header.shelf, announce.header.slot), (0, 3));
    let ArgRepr::Config(cfg) = announce.arg else {
        panic!("announce is not a config response")
    };
    assert_eq!((cfg.buffer_count, cfg.sector_count), (64, 2));
}

#[test]
fn mask_list_restricts_initiators() {
    let mut lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", 4 << 20, 0);
    let client_mac = lab.in_client(|| Interface::by_name("eth0").unwrap().mac);
    let stranger = lab.start_target(&[
        "vblade",
        "-m",
        "02:00:00:00:00:99",
        "0",
        "3",
        "eth0",
        file.to_str().unwrap(),
    ]);
    let found = lab.in_client(|| {
        Initiator::open("eth0")
            .unwrap()
            .discover(0xFFFF, 0xFF, Duration::from_millis(800))
            .unwrap()
    });
    assert!(
        found.is_empty(),
        "a masked target answered a stranger: {found:?}"
    );
    lab.stop_target(stranger);
    lab.start_target(&[
        "vblade",
        "-m",
        &format!("02:00:00:00:00:99,{client_mac}"),
        "0",
        "3",
        "eth0",
        file.to_str().unwrap(),
    ]);
    let found = lab.in_client(|| {
        Initiator::open("eth0")
            .unwrap()
            .discover(0xFFFF, 0xFF, Duration::from_millis(800))
            .unwrap()
    });
    assert_eq!(found.len(), 1, "a listed initiator must be answered");
}

#[test]
fn read_only_target_refuses_writes_and_keeps_data() {
    let mut lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", 4 << 20, 0xAB);
    lab.start_target(&["vblade", "-r", "0", "3", "eth0", file.to_str().unwrap()]);
    let result = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        init.run(&target, &plan(true, MIB, 4, &target, 1))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let err = result.expect_err("write to a read-only target succeeded");
    assert!(err.contains("ATA status 0x41"), "{err}");
    assert!(std::fs::read(&file).unwrap().iter().all(|b| *b == 0xAB));
}

#[test]
fn offset_and_length_select_a_window() {
    let mut lab = Lab::new(9000, 1);
    let file = lab.backing_file("disk.img", 8 << 20, 0);
    // 2048 sectors in, 4096 sectors long: like vblade's -o/-l.
    lab.start_target(&[
        "vblade",
        "-o",
        "2048",
        "-l",
        "4096",
        "0",
        "3",
        "eth0",
        file.to_str().unwrap(),
    ]);
    let sectors = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        let sectors = init.identify(&target).unwrap();
        init.run(&target, &plan(true, 2 * MIB, 16, &target, 3))
            .unwrap();
        sectors
    });
    assert_eq!(sectors, 4096);
    assert_file_holds_pattern(&file, MIB, 2 * MIB, 3);
    assert!(
        std::fs::read(&file).unwrap()[..MIB as usize]
            .iter()
            .all(|b| *b == 0),
        "data before the window was touched"
    );
}

#[test]
fn vblade_front_end_rejects_a_window_beyond_the_file() {
    let lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", MIB as usize, 0);
    let out = lab.run_target_command(&[
        "vblade",
        "-o",
        "4096",
        "0",
        "3",
        "eth0",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    let out = lab.run_target_command(&["vblade", "0", "3", "eth9", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missing interface is a clear error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("eth9"));
}

#[test]
fn several_blades_on_several_interfaces() {
    let mut lab = Lab::new(9000, 2);
    let f3 = lab.backing_file("e0.3.img", 4 << 20, 0);
    let f4 = lab.backing_file("e0.4.img", 4 << 20, 0);
    lab.start_target(&[
        "aoe",
        &format!("e0.3@eth0={}", f3.display()),
        &format!("e0.4@eth0,eth1={}", f4.display()),
    ]);
    let (on_eth0, on_eth1) = lab.in_client(|| {
        let mut eth0 = Initiator::open("eth0").unwrap();
        let mut eth1 = Initiator::open("eth1").unwrap();
        let mut on_eth0: Vec<_> = eth0
            .discover(0xFFFF, 0xFF, Duration::from_millis(800))
            .unwrap()
            .iter()
            .map(|t| (t.shelf, t.slot))
            .collect();
        on_eth0.sort();
        let on_eth1: Vec<_> = eth1
            .discover(0xFFFF, 0xFF, Duration::from_millis(800))
            .unwrap()
            .iter()
            .map(|t| (t.shelf, t.slot))
            .collect();
        let t3 = eth0.find(0, 3, Duration::from_secs(5)).unwrap();
        eth0.run(&t3, &plan(true, MIB, 16, &t3, 33)).unwrap();
        let t4 = eth1.find(0, 4, Duration::from_secs(5)).unwrap();
        eth1.run(&t4, &plan(true, MIB, 16, &t4, 44)).unwrap();
        (on_eth0, on_eth1)
    });
    assert_eq!(on_eth0, vec![(0, 3), (0, 4)]);
    assert_eq!(on_eth1, vec![(0, 4)]);
    assert_file_holds_pattern(&f3, 0, MIB, 33);
    assert_file_holds_pattern(&f4, 0, MIB, 44);
}

fn raw_frame(
    src: MacAddr,
    dst: MacAddr,
    command: Command,
    arg: ArgRepr,
    version: u8,
    extra: &[u8],
) -> Vec<u8> {
    let repr = PacketRepr {
        header: HeaderRepr {
            dst,
            src,
            version,
            response: false,
            error: None,
            shelf: 0,
            slot: 3,
            command,
            tag: 0x4242,
        },
        arg,
    };
    let mut buf = vec![0u8; (repr.buffer_len() + extra.len()).max(60)];
    repr.emit(&mut Frame::new_unchecked(&mut buf[..]));
    buf[repr.buffer_len()..repr.buffer_len() + extra.len()].copy_from_slice(extra);
    buf
}

#[test]
fn bad_frames_get_errors_or_silence_and_never_stop_the_target() {
    let mut lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", 4 << 20, 0);
    let index = lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
    lab.in_client(|| {
        let iface = Interface::by_name("eth0").unwrap();
        let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        let me = iface.mac;
        let ask = |frame: &[u8]| -> Option<Vec<u8>> {
            socket.send(frame).unwrap();
            let mut buf = vec![0u8; 2000];
            let deadline = std::time::Instant::now() + Duration::from_millis(400);
            while std::time::Instant::now() < deadline {
                if let Some(len) = socket.recv(&mut buf, Duration::from_millis(50)).unwrap() {
                    let view = Frame::new_checked(&buf[..len]).unwrap();
                    if view.is_response() && view.tag() == 0x4242 {
                        return Some(buf[..len].to_vec());
                    }
                }
            }
            None
        };
        let read = |sectors| {
            ArgRepr::Ata(AtaRepr {
                aflags: 0x40,
                err_feature: 0,
                sector_count: sectors,
                cmd_status: 0x24,
                lba: 0,
            })
        };
        // Unsupported version: error 5.
        let reply =
            ask(&raw_frame(me, target.mac, Command::Ata, read(1), 2, &[])).expect("error 5 reply");
        assert_eq!(Frame::new_checked(&reply[..]).unwrap().error(), 5);
        // Unknown command: error 1.
        let reply = ask(&raw_frame(
            me,
            target.mac,
            Command::Unknown(9),
            ArgRepr::Unknown,
            1,
            &[],
        ))
        .expect("error 1 reply");
        assert_eq!(Frame::new_checked(&reply[..]).unwrap().error(), 1);
        // Sector count beyond the frame at MTU 1500: error 2.
        let reply =
            ask(&raw_frame(me, target.mac, Command::Ata, read(3), 1, &[])).expect("error 2 reply");
        assert_eq!(Frame::new_checked(&reply[..]).unwrap().error(), 2);
        // Short write payload: error 2.
        let write = ArgRepr::Ata(AtaRepr {
            aflags: 0x41,
            err_feature: 0,
            sector_count: 2,
            cmd_status: 0x34,
            lba: 0,
        });
        let reply = ask(&raw_frame(
            me,
            target.mac,
            Command::Ata,
            write,
            1,
            &[7u8; 600],
        ))
        .expect("error 2 reply");
        assert_eq!(Frame::new_checked(&reply[..]).unwrap().error(), 2);
        // Truncated ATA argument: silence.
        let mut truncated = raw_frame(me, target.mac, Command::Ata, read(1), 1, &[]);
        truncated.truncate(30);
        assert!(ask(&truncated).is_none());
        // A storm of garbage addressed to us.
        let mut state = 0x1234_5678_9abc_def0u64;
        for i in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 14 + (state % 1400) as usize;
            let mut frame: Vec<u8> = (0..len).map(|j| (state >> (j % 56)) as u8).collect();
            frame[..6].copy_from_slice(&target.mac.0);
            frame[6..12].copy_from_slice(&me.0);
            frame[12..14].copy_from_slice(&[0x88, 0xa2]);
            if frame.len() > 19 && i % 2 == 0 {
                frame[14] = 0x10;
                frame[16..19].copy_from_slice(&[0, 0, 3]);
            }
            socket.send(&frame).unwrap();
        }
        // Still serving, data intact.
        let report = init.run(&target, &plan(true, MIB, 16, &target, 9)).unwrap();
        assert_eq!(report.bytes, MIB);
        let report = init
            .run(&target, &plan(false, MIB, 16, &target, 9))
            .unwrap();
        assert_eq!(report.mismatched_sectors, 0);
    });
    let status = lab.stop_target(index);
    assert!(
        status.success(),
        "target exit status after SIGTERM: {status:?}"
    );
    let log = lab.target_log(index);
    assert!(
        log.contains("stopped"),
        "the target logs its counters when it stops: {log}"
    );
    // Logs the network can trigger are rate-limited: 5000 bad frames, a handful of lines.
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings < 50, "{warnings} warning lines for a frame storm");
}

#[test]
fn overlapping_writes_in_one_batch_keep_arrival_order() {
    let mut lab = Lab::new(1500, 1);
    let file = lab.backing_file("disk.img", 4 << 20, 0);
    lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
    lab.in_client(|| {
        let iface = Interface::by_name("eth0").unwrap();
        let socket = PacketSocket::open(&iface, aoe::ETHERTYPE).unwrap();
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        for round in 0..20u8 {
            let frames: Vec<Vec<u8>> = (0..32u8)
                .map(|i| {
                    let write = ArgRepr::Ata(AtaRepr {
                        aflags: 0x41,
                        err_feature: 0,
                        sector_count: 2,
                        cmd_status: 0x34,
                        lba: u64::from(i % 3),
                    });
                    raw_frame(
                        iface.mac,
                        target.mac,
                        Command::Ata,
                        write,
                        1,
                        &[round.wrapping_mul(32).wrapping_add(i); 1024],
                    )
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
            socket.send_batch(&refs).unwrap();
            let mut replies = 0;
            let mut buf = vec![0u8; 2000];
            while replies < 32 {
                let len = socket
                    .recv(&mut buf, Duration::from_secs(5))
                    .unwrap()
                    .expect("reply");
                if Frame::new_checked(&buf[..len]).unwrap().is_response() {
                    replies += 1;
                }
            }
            // The last writes to sectors 0..=3 were frames 30 (lba 0) and 31 (lba 1).
            let ata = AtaRepr {
                aflags: 0x40,
                err_feature: 0,
                sector_count: 2,
                cmd_status: 0x24,
                lba: 0,
            };
            let (_, data) = init.ata(&target, ata, &[], Duration::from_secs(5)).unwrap();
            let last = round.wrapping_mul(32);
            assert!(
                data[..512].iter().all(|b| *b == last.wrapping_add(30)),
                "sector 0 in round {round}"
            );
            assert!(
                data[512..1024].iter().all(|b| *b == last.wrapping_add(31)),
                "sector 1 in round {round}"
            );
        }
    });
}

/// The `open(2)` flags of the descriptors process `pid` holds on `file`.
fn open_flags_of(pid: u32, file: &std::path::Path) -> Vec<i32> {
    let file = file.canonicalize().unwrap();
    let mut flags = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(file.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap();
        let octal = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .expect("flags line")
            .trim();
        flags.push(i32::from_str_radix(octal, 8).unwrap());
    }
    flags
}

#[test]
fn vblade_flags_b_d_s_take_effect() {
    let mut lab = Lab::new(9000, 1);
    let file = lab.backing_file("disk.img", 8 << 20, 0);
    // vblade's defaults: 64 buffers here (vblade's own is 16), buffered, not synchronous.
    let plain = lab.start_target(&["vblade", "0", "3", "eth0", file.to_str().unwrap()]);
    let buffers = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        init.find(0, 3, Duration::from_secs(5))
            .unwrap()
            .buffer_count
    });
    assert_eq!(buffers, 64);
    let flags = open_flags_of(lab.target_pid(plain), &file);
    assert!(!flags.is_empty(), "the target holds the backing file open");
    assert!(flags
        .iter()
        .all(|f| f & (libc::O_DIRECT | libc::O_SYNC) == 0));
    lab.stop_target(plain);

    let tuned = lab.start_target(&[
        "vblade",
        "-b",
        "16",
        "-d",
        "-s",
        "0",
        "3",
        "eth0",
        file.to_str().unwrap(),
    ]);
    let (buffers, read) = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 3, Duration::from_secs(5)).unwrap();
        init.run(&target, &plan(true, 2 * MIB, 16, &target, 12))
            .unwrap();
        let read = init
            .run(&target, &plan(false, 2 * MIB, 16, &target, 12))
            .unwrap();
        (target.buffer_count, read)
    });
    assert_eq!(buffers, 16, "-b sets the advertised buffer count");
    assert_eq!(read.mismatched_sectors, 0);
    let flags = open_flags_of(lab.target_pid(tuned), &file);
    assert!(!flags.is_empty(), "the target holds the backing file open");
    assert!(
        flags
            .iter()
            .all(|f| f & libc::O_DIRECT != 0 && f & libc::O_SYNC == libc::O_SYNC),
        "-d and -s open the file O_DIRECT|O_SYNC: {flags:?}"
    );
    assert_file_holds_pattern(&file, 0, 2 * MIB, 12);
}

/// A memory device whose writes are visible at once but complete only `delay` later, from
/// whichever thread waits: what a replicated write waiting for the peer looks like to the frame
/// path. Counts writes that were still pending when first polled.
struct LateCompletingDevice {
    data: std::sync::Mutex<Vec<u8>>,
    delay: Duration,
    pending_at_poll: std::sync::Arc<std::sync::atomic::AtomicU64>,
    completed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Writes started and not yet finished, and the most there ever were at once.
    in_flight: std::sync::Arc<InFlight>,
    /// The thread that completes writes in order, as a peer link's reader does.
    completer: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

/// A thread that runs what it is sent, in order.
fn completer_thread() -> std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>> {
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    std::thread::spawn(move || rx.into_iter().for_each(|job| job()));
    tx
}

/// Counts writes between `start_write` and their completion.
#[derive(Default)]
struct InFlight {
    now: std::sync::atomic::AtomicU64,
    most: std::sync::atomic::AtomicU64,
}

impl InFlight {
    fn start(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
    }

    fn end(&self) {
        self.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct LateWrite {
    due: std::time::Instant,
    in_flight: std::sync::Arc<InFlight>,
    polled_pending: bool,
    pending_at_poll: std::sync::Arc<std::sync::atomic::AtomicU64>,
    completed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    completer: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl twinblade::block::PendingWrite for LateWrite {
    fn poll(&mut self) -> bool {
        let ready = std::time::Instant::now() >= self.due;
        if !ready && !self.polled_pending {
            self.polled_pending = true;
            self.pending_at_poll
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ready
    }

    fn finish(self: Box<Self>) -> twinblade::block::Result<()> {
        std::thread::sleep(
            self.due
                .saturating_duration_since(std::time::Instant::now()),
        );
        self.completed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight.end();
        Ok(())
    }

    /// Completes on the device's completer thread, as the replicated device does on the
    /// link's reader.
    fn then(self: Box<Self>, done: Box<dyn FnOnce(twinblade::block::Result<()>) + Send>) {
        let completer = self.completer.clone();
        let _ = completer.send(Box::new(move || done(self.finish())));
    }
}

impl twinblade::block::BlockDevice for LateCompletingDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> twinblade::block::Result<()> {
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> twinblade::block::Result<()> {
        self.start_write(data, offset, fua)?.wait()
    }

    fn start_write(
        &self,
        data: &[u8],
        offset: u64,
        _fua: bool,
    ) -> twinblade::block::Result<twinblade::block::WriteCompletion> {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        self.in_flight.start();
        Ok(twinblade::block::WriteCompletion::pending(Box::new(
            LateWrite {
                due: std::time::Instant::now() + self.delay,
                in_flight: self.in_flight.clone(),
                polled_pending: false,
                pending_at_poll: self.pending_at_poll.clone(),
                completed: self.completed.clone(),
                completer: self.completer.lock().unwrap().clone(),
            },
        )))
    }

    fn flush(&self) -> twinblade::block::Result<()> {
        Ok(())
    }
}

#[test]
fn writes_that_complete_later_are_answered_when_they_complete_and_read_back() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    let lab = Lab::new(9000, 1);
    let pending_at_poll = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(InFlight::default());
    let device = Arc::new(LateCompletingDevice {
        in_flight: in_flight.clone(),
        data: std::sync::Mutex::new(vec![0u8; 16 << 20]),
        delay: Duration::from_millis(5),
        pending_at_poll: pending_at_poll.clone(),
        completed: completed.clone(),
        completer: std::sync::Mutex::new(completer_thread()),
    });
    let served: Arc<dyn twinblade::block::BlockDevice> = device.clone();
    let (_root, server) = lab.in_target(move || {
        let root = twinblade::supervisor::Root::threads_only(
            "test",
            tokio_util::sync::CancellationToken::new(),
        );
        let server = twinblade::export::aoe::AoeServer::start(
            vec![twinblade::export::aoe::Export {
                config: twinblade::export::aoe::BladeConfig::new(0, 5),
                device: served,
                interfaces: vec!["eth0".into()],
                gate: twinblade::ha::gate::ServeGate::always_open(),
                guard: None,
                service_mac: None,
            }],
            root.group("aoe"),
        )
        .unwrap();
        (root, server)
    });
    let (write, read) = lab.in_client(|| {
        let mut init = Initiator::open("eth0").unwrap();
        let target = init.find(0, 5, Duration::from_secs(5)).unwrap();
        let write = init
            .run(&target, &plan(true, 8 * MIB, 64, &target, 11))
            .unwrap();
        let read = init
            .run(&target, &plan(false, 8 * MIB, 16, &target, 11))
            .unwrap();
        (write, read)
    });
    server.stop();
    assert_eq!(read.mismatched_sectors, 0);
    assert_eq!(write.retransmits, 0);
    let writes = completed.load(Relaxed);
    let deferred = pending_at_poll.load(Relaxed);
    let most_in_flight = in_flight.most.load(Relaxed);
    println!(
        "{writes} writes started, {deferred} still pending when the frame path polled them, \
         at most {most_in_flight} in flight at once; 8 MiB written in {:?}",
        write.elapsed
    );
    assert!(deferred > 0, "no write was left to complete later");
    // The frame path goes on while writes complete: had it waited for each write before
    // taking the next frame, no two writes would ever have been in flight together. Counted,
    // not timed, so a slow or busy machine cannot fail it.
    assert!(
        most_in_flight >= 2,
        "at most {most_in_flight} write(s) in flight at once: the frame path waited for each"
    );
    let data = device.data.lock().unwrap();
    let mut expected = vec![0u8; 512];
    for sector in 0..8 * MIB / 512 {
        fill_pattern(11, sector, &mut expected);
        let at = (sector * 512) as usize;
        assert_eq!(&data[at..at + 512], &expected[..], "sector {sector}");
    }
}
