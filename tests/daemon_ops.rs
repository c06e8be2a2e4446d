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
//!   (and by `promtool check metrics` when it is installed), with this node's states.

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
        std::fs::write(
            &config,
            format!(
                r#"
[cluster]
shared-secret = "{SECRET}"
heartbeat-port = {hb}
[node.alpha]
address = "127.0.0.1"
interface = "lo"
metrics = "{metrics}"
[node.beta]
address = "127.0.0.2"
interface = "lo"
[resource.r0]
aoe = "e9.9"
port = {port}
[resource.r0.on.alpha]
disk = "{d}/r0.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "/dev/sdb"
meta-disk = "internal"
"#,
                hb = free_udp_port(),
                port = free_tcp_port(),
                d = d.display()
            ),
        )
        .unwrap();
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
