//! systemd's service notification protocol (`sd_notify(3)`), the few lines of it the daemon
//! needs: one datagram per state change to the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a
//! path, or `@name` in the abstract namespace). Without the variable nothing is sent.
//!
//! What `twinblade run` says: `STATUS=` while it starts; `READY=1` once every resource is
//! attached and the control socket answered a `status` request; `WATCHDOG=1` every half
//! `$WATCHDOG_USEC`, from the watchdog thread, but only while every resource's engine went
//! round its loop within that half interval ([`stalled`]) — a hung engine stops the pings, so
//! systemd kills the daemon and the peer takes over; `STOPPING=1` when the orderly stop
//! begins.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use super::resource::Resource;
use crate::supervisor::Supervisor;

/// The socket systemd listens on.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// The watchdog interval in microseconds, set by systemd with `WatchdogSec=`.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// The process the watchdog is meant for (absent: this one).
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` when it is unset or empty (not started by systemd).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os(NOTIFY_SOCKET_ENV)?;
        let path = path.to_str()?.to_string();
        if path.is_empty() {
            return None;
        }
        match Notifier::connect(&path) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("{NOTIFY_SOCKET_ENV}={path}: {e}; systemd will not be notified");
                None
            }
        }
    }

    /// To the socket at `path` (`@name`: the abstract namespace).
    pub fn connect(path: &str) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends `state` (`READY=1`, `STATUS=…`, newline-separated assignments).
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        Ok(())
    }

    /// [`Notifier::send`], a failure logged (systemd may have gone; the daemon carries on).
    pub fn tell(&self, state: &str) {
        if let Err(e) = self.send(state) {
            crate::warn_limited!(LIMIT, "cannot notify systemd ({state:?}): {e}");
        }
    }
}

static LIMIT: crate::ratelimit::LogLimiter =
    crate::ratelimit::LogLimiter::new(Duration::from_secs(60), 3);

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), if it is meant for
/// this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var(WATCHDOG_USEC_ENV).ok().as_deref(),
        std::env::var(WATCHDOG_PID_ENV).ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    match usec?.trim().parse::<u64>().ok()? {
        0 => None,
        us => Some(Duration::from_micros(us)),
    }
}

/// The engines that have not gone round their loop within `limit`: (resource, since when).
/// Empty: the daemon is alive.
pub fn stalled(engines: &[(String, Duration)], limit: Duration) -> Vec<(String, Duration)> {
    engines
        .iter()
        .filter(|(_, idle)| *idle > limit)
        .cloned()
        .collect()
}

/// One `STATUS=` line: each resource's role, disk and connection.
pub fn status_line(resources: &[Arc<Resource>]) -> String {
    let parts: Vec<String> = resources
        .iter()
        .map(|r| {
            let s = r.snapshot().status;
            format!(
                "{}: {} {} {}{}",
                r.spec.name,
                s.role,
                s.disk,
                s.conn,
                if s.serving { " serving" } else { "" }
            )
        })
        .collect();
    parts.join("; ")
}

/// How often the watchdog thread looks when systemd set no watchdog (only `STATUS=`).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the watchdog thread in `group`: every half watchdog interval it pings systemd if
/// every engine went round its loop within that half interval, and updates `STATUS=` when it
/// changed. A stalled engine is logged and the pings withheld until it moves again.
pub fn start_watchdog(
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
    resources: Vec<Arc<Resource>>,
    group: &Supervisor,
) -> io::Result<()> {
    let period = watchdog.map_or(STATUS_INTERVAL, |w| w / 2);
    let sleeper = group.clone();
    group.spawn("watchdog", move |token| {
        let mut last_status = String::new();
        let mut withheld = false;
        loop {
            let engines: Vec<(String, Duration)> = resources
                .iter()
                .map(|r| (r.spec.name.clone(), r.engine_idle()))
                .collect();
            let stuck = stalled(&engines, period);
            let status = if stuck.is_empty() {
                if withheld {
                    tracing::info!("every resource engine runs again: watchdog pings resume");
                    withheld = false;
                }
                format!("running; {}", status_line(&resources))
            } else {
                let what: Vec<String> = stuck
                    .iter()
                    .map(|(name, idle)| format!("resource {name}: engine stalled for {idle:.1?}"))
                    .collect();
                if !withheld {
                    tracing::error!(
                        "{}; watchdog pings withheld (systemd restarts the daemon)",
                        what.join(", ")
                    );
                    withheld = true;
                }
                format!("{}; watchdog pings withheld", what.join(", "))
            };
            if status != last_status {
                notifier.tell(&format!("STATUS={status}"));
                last_status = status;
            }
            if watchdog.is_some() && !withheld {
                notifier.tell("WATCHDOG=1");
            }
            if !sleeper.sleep_on(&token, period) {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_for_this_process_only() {
        let me = 4242;
        assert_eq!(
            parse_watchdog(Some("10000000"), None, me),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_watchdog(Some("10000000"), Some("4242"), me),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_watchdog(Some("10000000"), Some("1"), me), None);
        assert_eq!(parse_watchdog(Some("0"), None, me), None);
        assert_eq!(parse_watchdog(Some("x"), None, me), None);
        assert_eq!(parse_watchdog(None, None, me), None);
    }

    #[test]
    fn a_stalled_engine_is_named_and_a_moving_one_is_not() {
        let limit = Duration::from_secs(5);
        let engines = vec![
            ("r0".to_string(), Duration::from_millis(50)),
            ("r1".to_string(), Duration::from_secs(7)),
        ];
        assert_eq!(
            stalled(&engines, limit),
            vec![("r1".to_string(), Duration::from_secs(7))]
        );
        assert!(stalled(&engines[..1], limit).is_empty());
        assert!(stalled(&[], limit).is_empty());
    }

    #[test]
    fn datagrams_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("twinblade-notify-test-{}", std::process::id());
        let abs =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.send("WATCHDOG=1").unwrap();
        let len = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
