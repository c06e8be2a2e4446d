//! `twinblade run` as systemd and Prometheus see it: one real daemon (node alpha on the
//! loopback interface, its peer beta never there), no namespaces, no privileges beyond root's
//! control socket.
//!
//! * systemd: a fake `$NOTIFY_SOCKET` (a datagram socket this test binds). `READY=1` comes
//!   once the control socket is up (checked with the daemon frozen right after it); then
//!   `WATCHDOG=1` repeatedly; an engine stalled through the test hook
//!   (`fault r0 engine-stall-ms=N`) stops the pings until it moves again; `STOPPING=1` at
//!   SIGTERM, and an orderly exit.
//! * Prometheus: `GET /metrics` from the same daemon, checked by the crate's format lint
//!   (and by `promtool check metrics` when it is installed), with this node's states; and from
//!   a pair (alpha on 127.0.0.1, beta on 127.0.0.2, both on `lo`) during a full sync (rate and
//!   ETA), after client I/O over NBD (the write, read and flush latency histograms count it)
//!   and after a failover (kill -9 of the primary; the survivor answers an AoE query sent
//!   on `lo`, and counts a served failover with its duration).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "metrics-must-not-show-this-9c1e";
/// Generous: a loaded CI machine may take long to start a debug build.
const PATIENCE: Duration = Duration::from_secs(60);

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    control: PathBuf,
    notify: UnixDatagram,
    metrics: String,
    /// Every notification received so far, in order.
    seen: Vec<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test changes in [`loopback_pair`]'s configuration.
struct LoopbackPair<'a> {
    aoe: &'a str,
    /// Extra keys of `[node.alpha]` and `[node.beta]`.
    alpha: &'a str,
    beta: &'a str,
    /// Extra keys of `[resource.r0]`.
    resource: &'a str,
    alpha_disk: &'a Path,
    beta_disk: &'a Path,
    /// The heartbeat's UDP port and the resource's TCP port.
    ports: (u16, u16),
}

/// A pair on the loopback interface (alpha 127.0.0.1, beta 127.0.0.2), one resource `r0` with
/// internal meta-data.
fn loopback_pair(p: LoopbackPair<'_>) -> String {
    format!(
        r#"
[cluster]
shared-secret = "{SECRET}"
heartbeat-port = {hb}
[node.alpha]
address = "127.0.0.1"
interface = "lo"
{alpha}
[node.beta]
address = "127.0.0.2"
interface = "lo"
{beta}
[resource.r0]
aoe = "{aoe}"
port = {port}
{resource}
[resource.r0.on.alpha]
disk = "{alpha_disk}"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "{beta_disk}"
meta-disk = "internal"
"#,
        hb = p.ports.0,
        port = p.ports.1,
        alpha = p.alpha,
        beta = p.beta,
        aoe = p.aoe,
        resource = p.resource,
        alpha_disk = p.alpha_disk.display(),
        beta_disk = p.beta_disk.display(),
    )
}

fn twinblade() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_twinblade"));
    c.env_remove("TWINBLADE_NODE")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    c
}

impl Daemon {
    fn start(watchdog_usec: u64) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::File::create(d.join("r0.img"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let metrics = format!("127.0.0.1:{}", free_tcp_port());
        let config = d.join("twinblade.toml");
        let text = loopback_pair(LoopbackPair {
            aoe: "e9.9",
            alpha: &format!("metrics = \"{metrics}\""),
            beta: "",
            resource: "",
            alpha_disk: &d.join("r0.img"),
            beta_disk: Path::new("/dev/sdb"),
            ports: (free_udp_port(), free_tcp_port()),
        });
        std::fs::write(&config, text).unwrap();
        let out = twinblade()
            .args(["create-md", "r0", "--node", "alpha", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "create-md: {out:?}");
        let notify_path = d.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(PATIENCE)).unwrap();
        let control = d.join("control.sock");
        let log = std::fs::File::create(d.join("daemon.log")).unwrap();
        let child = twinblade()
            .args(["run", "--node", "alpha", "--config"])
            .arg(&config)
            .arg("--control")
            .arg(&control)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", watchdog_usec.to_string())
            .env("TWINBLADE_TEST_FAULTS", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            child,
            dir,
            control,
            notify,
            metrics,
            seen: Vec::new(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The next notification (panics, with the daemon's log, after [`PATIENCE`]).
    fn next(&mut self) -> String {
        let mut buf = vec![0u8; 4096];
        match self.notify.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                m
            }
            Err(e) => panic!(
                "no notification ({e}); so far {:?}; daemon log:\n{}",
                self.seen,
                self.log()
            ),
        }
    }

    /// Notifications up to and including the first that `stop` accepts.
    fn until(&mut self, stop: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "gave up waiting; got {got:?}; daemon log:\n{}",
                self.log()
            );
            let m = self.next();
            got.push(m.clone());
            if stop(&m) {
                return got;
            }
        }
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        twinblade()
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.metrics).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

fn lines(m: &str) -> impl Iterator<Item = &str> {
    m.split('\n')
}

fn is(m: &str, assignment: &str) -> bool {
    lines(m).any(|l| l == assignment)
}

fn status_of(m: &str) -> Option<&str> {
    lines(m).find_map(|l| l.strip_prefix("STATUS="))
}

#[test]
fn systemd_hears_ready_after_the_control_socket_then_pings_that_stop_when_an_engine_hangs() {
    // Pings every second; an engine that has not gone round its loop for a second stops them.
    let mut d = Daemon::start(2_000_000);

    let before = d.until(|m| is(m, "READY=1"));
    // Frozen right away: what READY=1 promised must already be there.
    d.signal(libc::SIGSTOP);
    let mode = std::fs::metadata(&d.control)
        .unwrap_or_else(|e| panic!("READY=1 before the control socket exists: {e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    UnixStream::connect(&d.control).expect("READY=1 before the control socket listens");
    d.signal(libc::SIGCONT);
    assert!(
        status_of(&before[0]).is_some_and(|s| s.contains("attaching")),
        "{before:?}"
    );
    let ready = before.last().unwrap();
    assert!(
        status_of(ready).is_some_and(|s| s.starts_with("running; r0: Secondary Inconsistent")),
        "{ready}"
    );
    let status = d.ctl(&["status", "r0"]);
    assert!(status.status.success(), "{status:?}");

    // Pings, repeatedly.
    for _ in 0..3 {
        d.until(|m| is(m, "WATCHDOG=1"));
    }

    // A hung engine: the pings stop while it stands still and come back after.
    let out = d.ctl(&["fault", "r0", "engine-stall-ms=6000"]);
    assert!(out.status.success(), "{out:?}");
    let withheld = d.until(|m| status_of(m).is_some_and(|s| s.contains("pings withheld")));
    assert!(
        status_of(withheld.last().unwrap())
            .unwrap()
            .contains("resource r0: engine stalled for"),
        "{withheld:?}"
    );
    let during = d.until(|m| status_of(m).is_some_and(|s| s.starts_with("running")));
    assert!(
        !during.iter().any(|m| is(m, "WATCHDOG=1")),
        "pinged while the engine was stalled: {during:?}"
    );
    assert!(!is(during.last().unwrap(), "WATCHDOG=1"), "{during:?}");
    d.until(|m| is(m, "WATCHDOG=1"));
    assert!(d.log().contains("watchdog pings withheld"), "{}", d.log());

    // The orderly stop says so first.
    d.signal(libc::SIGTERM);
    d.until(|m| is(m, "STOPPING=1"));
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(!d.control.exists(), "control socket left behind");
}

#[test]
fn metrics_show_this_nodes_states_in_a_valid_text_format_and_never_the_secret() {
    let mut d = Daemon::start(0);
    d.until(|m| is(m, "READY=1"));
    // No watchdog asked for: no pings, READY and STATUS only.
    assert!(!d.seen.iter().any(|m| is(m, "WATCHDOG=1")), "{:?}", d.seen);

    let reply = d.get("/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    twinblade::daemon::metrics::lint(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert!(!body.contains(SECRET));
    for line in [
        r#"twinblade_role{resource="r0",role="Secondary"} 1"#,
        r#"twinblade_role{resource="r0",role="Primary"} 0"#,
        r#"twinblade_disk_state{resource="r0",disk="local",state="Inconsistent"} 1"#,
        r#"twinblade_serving{resource="r0"} 0"#,
        r#"twinblade_lease_held{resource="r0"} 0"#,
        r#"twinblade_failovers_total{resource="r0",outcome="served"} 0"#,
        r#"twinblade_written_bytes_total{resource="r0"} 0"#,
        r#"twinblade_heartbeat_path_silent{path="0",local="127.0.0.1",peer="127.0.0.2"} 1"#,
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?}:\n{body}");
    }
    let connected = body
        .lines()
        .filter(|l| {
            l.starts_with("twinblade_connection_state{resource=\"r0\"") && l.ends_with(" 1")
        })
        .count();
    assert_eq!(connected, 1, "{body}");
    assert!(
        !body.contains("twinblade_aoe_requests_total"),
        "never served, yet AoE counters:\n{body}"
    );
    assert!(d.get("/").starts_with("HTTP/1.1 404 "));

    promtool(d.dir.path(), body);

    d.signal(libc::SIGTERM);
    d.until(|m| is(m, "STOPPING=1"));
    assert!(d.child.wait().unwrap().success(), "{}", d.log());
}

/// `promtool check metrics` on `body`, when promtool is installed (the Debian package
/// `prometheus`); the crate's own lint above runs either way.
fn promtool(dir: &Path, body: &str) {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, body).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output();
    match out {
        Ok(o) if o.status.code() == Some(127) => {
            eprintln!(
                "promtool is not installed: skipped `promtool check metrics` (the format lint ran)"
            )
        }
        Ok(o) => assert!(
            o.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("cannot run sh for promtool: {e}"),
    }
}

/// One node of a pair on the loopback interface (alpha on 127.0.0.1, beta on 127.0.0.2).
struct Node {
    child: Child,
    control: PathBuf,
    metrics: String,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn scrape(&self) -> String {
        let Ok(mut s) = TcpStream::connect(&self.metrics) else {
            return String::new();
        };
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        twinblade::daemon::metrics::lint(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        body.to_string()
    }

    /// Scrapes until `ok` accepts a scrape (panics with the last one after [`PATIENCE`]).
    fn scrape_until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let body = self.scrape();
            if ok(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{}: never {what}; last scrape:\n{body}\nlog:\n{}",
                self.metrics,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The value of the series `series` (name and labels, exactly as printed).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A broadcast AoE config query for `e9.8` on `lo`: a client's request the new primary answers.
fn query_blade(socket: &twinblade::net::PacketSocket) {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&[0x88, 0xa2]);
    f[14] = 0x10;
    f[16..18].copy_from_slice(&9u16.to_be_bytes());
    f[18] = 8;
    f[19] = 1;
    f[20..24].copy_from_slice(&[0x80, 0, 0, 7]);
    socket.send(&f).unwrap();
}

#[test]
fn metrics_follow_a_resync_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (hb, port) = (free_udp_port(), free_tcp_port());
    let metrics = [
        format!("127.0.0.1:{}", free_tcp_port()),
        format!("127.0.0.2:{}", free_tcp_port()),
    ];
    let nbd = format!("127.0.0.1:{}", free_tcp_port());
    // Alpha's data differs from beta's zeros in every block, so the full sync really sends
    // 16 MiB at the 2 MiB/s limit (equal or zero blocks would be skipped and the sync over
    // before a scrape could see it).
    let pattern: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(d.join("alpha.img"), &pattern).unwrap();
    std::fs::File::create(d.join("beta.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let config = d.join("twinblade.toml");
    let text = loopback_pair(LoopbackPair {
        aoe: "e9.8",
        alpha: &format!("metrics = \"{}\"", metrics[0]),
        beta: &format!("metrics = \"{}\"", metrics[1]),
        resource: &format!("mac = \"own\"\nresync-rate-max = \"2M\"\nnbd = \"{nbd}\""),
        alpha_disk: &d.join("alpha.img"),
        beta_disk: &d.join("beta.img"),
        ports: (hb, port),
    });
    std::fs::write(&config, text).unwrap();
    let start = |name: &str, metrics: &str| {
        let out = twinblade()
            .args(["create-md", "r0", "--node", name, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "create-md: {out:?}");
        let control = d.join(format!("{name}.sock"));
        let log = d.join(format!("{name}.log"));
        let child = twinblade()
            .args(["run", "--node", name, "--config"])
            .arg(&config)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Node {
            child,
            control,
            metrics: metrics.to_string(),
            log,
        }
    };
    let mut alpha = start("alpha", &metrics[0]);
    let beta = start("beta", &metrics[1]);
    let connected = r#"twinblade_connection_state{resource="r0",state="Connected"}"#;
    alpha.scrape_until("connected", |b| value(b, connected) == Some(1.0));

    let out = twinblade()
        .args(["primary", "r0", "--force", "--control"])
        .arg(&alpha.control)
        .output()
        .unwrap();
    assert!(out.status.success(), "primary --force: {out:?}");

    // During the full sync, rate limited to 2 MiB/s: 16 MiB take about 8 s.
    let during = alpha.scrape_until("resyncing with a rate and an ETA", |b| {
        value(
            b,
            r#"twinblade_replication_state{resource="r0",state="SyncSource"}"#,
        ) == Some(1.0)
            && value(
                b,
                r#"twinblade_resync_rate_bytes_per_second{resource="r0"}"#,
            )
            .is_some_and(|r| r > 0.0)
            && value(b, r#"twinblade_resync_eta_seconds{resource="r0"}"#).is_some_and(|e| e > 0.0)
    });
    assert_eq!(
        value(&during, r#"twinblade_role{resource="r0",role="Primary"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&during, r#"twinblade_resync_running{resource="r0"}"#),
        Some(1.0)
    );
    assert!(
        value(&during, r#"twinblade_out_of_sync_bytes{resource="r0"}"#).unwrap() > 0.0,
        "{during}"
    );
    assert_eq!(
        value(
            &during,
            r#"twinblade_disk_state{resource="r0",disk="peer",state="Inconsistent"}"#
        ),
        Some(1.0),
        "{during}"
    );
    let target = beta.scrape();
    assert_eq!(
        value(
            &target,
            r#"twinblade_replication_state{resource="r0",state="SyncTarget"}"#
        ),
        Some(1.0),
        "{target}"
    );
    assert_eq!(
        value(&target, r#"twinblade_role{resource="r0",role="Secondary"}"#),
        Some(1.0)
    );

    let after = alpha.scrape_until("in sync", |b| {
        value(
            b,
            r#"twinblade_disk_state{resource="r0",disk="peer",state="UpToDate"}"#,
        ) == Some(1.0)
    });
    assert_eq!(
        value(&after, r#"twinblade_out_of_sync_bytes{resource="r0"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&after, r#"twinblade_resync_running{resource="r0"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&after, r#"twinblade_resync_eta_seconds{resource="r0"}"#),
        Some(0.0)
    );
    beta.scrape_until("up to date", |b| {
        value(
            b,
            r#"twinblade_disk_state{resource="r0",disk="local",state="UpToDate"}"#,
        ) == Some(1.0)
    });

    // Client I/O over NBD on the primary: replicated writes (protocol C: until beta's
    // acknowledgement), reads and a flush, each in its latency histogram.
    let latency = |op: &str, what: &str| {
        format!(r#"twinblade_io_latency_seconds{what}{{resource="r0",op="{op}"}}"#)
    };
    let before = alpha.scrape();
    assert_eq!(value(&before, &latency("write", "_count")), Some(0.0));
    {
        use std::io::{Seek as _, SeekFrom};
        let mut tcp = TcpStream::connect(&nbd).unwrap();
        let export = nbd::client::handshake(&mut tcp, b"r0").unwrap();
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        for i in 0..8u64 {
            client.seek(SeekFrom::Start(i << 16)).unwrap();
            client.write_all(&[i as u8 | 0x40; 4096]).unwrap();
        }
        client.flush().unwrap();
        let mut back = [0u8; 4096];
        client.seek(SeekFrom::Start(3 << 16)).unwrap();
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, [0x43; 4096]);
    }
    let io = alpha.scrape();
    let writes = value(&io, &latency("write", "_count")).unwrap();
    assert!(writes >= 8.0, "{io}");
    assert_eq!(
        value(
            &io,
            r#"twinblade_io_latency_seconds_bucket{resource="r0",op="write",le="+Inf"}"#
        ),
        Some(writes),
        "{io}"
    );
    // A replicated write over loopback takes more than nothing and less than 10 s.
    assert!(value(&io, &latency("write", "_sum")).unwrap() > 0.0, "{io}");
    assert_eq!(
        value(
            &io,
            r#"twinblade_io_latency_seconds_bucket{resource="r0",op="write",le="10"}"#
        ),
        Some(writes),
        "{io}"
    );
    assert!(
        value(&io, &latency("read", "_count")).unwrap() >= 1.0,
        "{io}"
    );
    assert!(
        value(&io, &latency("flush", "_count")).unwrap() >= 1.0,
        "{io}"
    );
    promtool(d, &io);

    // Failover: alpha dies; beta takes over and answers a client's query.
    let _ = alpha.child.kill();
    let _ = alpha.child.wait();
    let lo = twinblade::net::Interface::by_name("lo").unwrap();
    let socket = twinblade::net::PacketSocket::open(&lo, 0x88a2).unwrap();
    let served = r#"twinblade_failovers_total{resource="r0",outcome="served"}"#;
    let took_over = beta.scrape_until("served after a failover", |b| {
        query_blade(&socket);
        value(b, served) == Some(1.0)
    });
    assert_eq!(
        value(
            &took_over,
            r#"twinblade_role{resource="r0",role="Primary"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&took_over, r#"twinblade_serving{resource="r0"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &took_over,
            r#"twinblade_connection_state{resource="r0",state="Connected"}"#
        ),
        Some(0.0)
    );
    assert!(
        value(
            &took_over,
            r#"twinblade_last_failover_seconds{resource="r0"}"#
        )
        .is_some_and(|s| s > 0.0),
        "{took_over}"
    );
    assert!(
        value(&took_over, r#"twinblade_aoe_replies_total{resource="r0"}"#)
            .is_some_and(|n| n >= 1.0),
        "{took_over}"
    );
    assert!(!took_over.contains(SECRET));
    promtool(d, &took_over);
}

#[test]
fn a_taken_metrics_port_stops_the_start_before_any_disk_is_attached() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("twinblade.toml");
    // No disk at all: the metrics address is refused first.
    let text = loopback_pair(LoopbackPair {
        aoe: "e9.7",
        alpha: &format!("metrics = \"{}\"", taken.local_addr().unwrap()),
        beta: "",
        resource: "",
        alpha_disk: &d.join("missing.img"),
        beta_disk: Path::new("/dev/sdb"),
        ports: (free_udp_port(), free_tcp_port()),
    });
    std::fs::write(&config, text).unwrap();
    let out = twinblade()
        .args(["run", "--node", "alpha", "--config"])
        .arg(&config)
        .arg("--control")
        .arg(d.join("control.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("metrics on {}", taken.local_addr().unwrap())),
        "{stderr}"
    );
    assert!(!stderr.contains("missing.img"), "{stderr}");
}
