//! `[cluster]`: what both nodes share — the secret, the heartbeat's timers and port, the third
//! votes (a fence command, a witness), the ping targets — and the timings derived from them.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Secret;

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cluster {
    /// Authenticates every peer connection and every heartbeat (or `shared-secret-file`).
    pub shared_secret: Option<Secret>,
    /// A file holding the secret instead (mode 0600 or stricter; see [`secret`]).
    pub shared_secret_file: Option<PathBuf>,
    /// The secret [`Config::load`] read from `shared-secret-file`.
    #[serde(skip)]
    pub file_secret: Option<Secret>,
    /// UDP port of the heartbeat on every path (default [`DEFAULT_HEARTBEAT_PORT`]).
    pub heartbeat_port: Option<u16>,
    /// Seconds between heartbeats on each path (default 0.2).
    pub heartbeat_interval: Option<f64>,
    /// Seconds of silence on every heartbeat path (and the replication link) after which the
    /// peer is declared gone (default 1.0; at least three intervals).
    pub heartbeat_dead_time: Option<f64>,
    /// The fence command (an absolute path, run directly, DRBD's fence-peer handler contract):
    /// one more condition of the promotion gate. See [`crate::daemon::fence`].
    pub fence_peer: Option<PathBuf>,
    /// Seconds the fence command may run before its process group is killed (default 10).
    pub fence_timeout: Option<f64>,
    /// The pair's name at the witness (default: the two node names, sorted, joined by "-").
    pub name: Option<String>,
    /// The witness, `ADDR:PORT` (see [`crate::ha::witness`]): its grant is one more condition
    /// of the promotion gate.
    pub witness: Option<String>,
    /// Seconds to wait for the witness's answer per try (default 0.5; [`WITNESS_TRIES`] tries).
    pub witness_timeout: Option<f64>,
    /// Ping targets on the client network (heartbeat's `ping`): each node counts the ones it
    /// reaches, and the pair never fails over to the node that reaches fewer (see
    /// [`crate::cluster::machine`]'s `reach`). At most [`MAX_PING_TARGETS`].
    pub ping: Option<Vec<String>>,
    /// Seconds between echo requests to each target (default 1.0).
    pub ping_interval: Option<f64>,
    /// Seconds without an echo reply after which a target counts as unreachable (default 3.0;
    /// at least two intervals).
    pub ping_dead_time: Option<f64>,
    /// Seconds the primary must reach fewer targets than its secondary before the pair
    /// switches over (default 10).
    pub ping_switch_delay: Option<f64>,
}

/// The most ping targets `[cluster] ping` may list.
pub const MAX_PING_TARGETS: usize = 16;
/// Default seconds between echo requests to each ping target.
pub const DEFAULT_PING_INTERVAL: f64 = 1.0;
/// Default seconds without a reply before a ping target counts as unreachable.
pub const DEFAULT_PING_DEAD_TIME: f64 = 3.0;
/// Default seconds a primary reaching fewer targets waits before the switchover.
pub const DEFAULT_PING_SWITCH_DELAY: f64 = 10.0;

/// Default seconds per try at the witness.
pub const DEFAULT_WITNESS_TIMEOUT: f64 = 0.5;
/// Claims sent to the witness before it counts as unreachable.
pub const WITNESS_TRIES: u32 = 3;

/// The heartbeat's UDP port unless `[cluster] heartbeat-port` says otherwise.
pub const DEFAULT_HEARTBEAT_PORT: u16 = 7790;
/// Default seconds between heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL: f64 = 0.2;
/// Default heartbeat dead time, seconds.
pub const DEFAULT_HEARTBEAT_DEAD_TIME: f64 = 1.0;
/// Default seconds the fence command may run.
pub const DEFAULT_FENCE_TIMEOUT: f64 = 10.0;
/// Most heartbeat paths a node may list.
pub const MAX_HEARTBEAT_PATHS: usize = 4;

impl Cluster {
    /// The heartbeat's UDP port.
    pub fn heartbeat_port(&self) -> u16 {
        self.heartbeat_port.unwrap_or(DEFAULT_HEARTBEAT_PORT)
    }

    /// Time between heartbeats.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.heartbeat_interval
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
        )
    }

    /// Silence on every path after which the peer is gone.
    pub fn heartbeat_dead_time(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.heartbeat_dead_time
                .unwrap_or(DEFAULT_HEARTBEAT_DEAD_TIME),
        )
    }

    /// How long the wire guard listens for anyone answering a shelf.slot: a fifth of the dead
    /// time, at most 200 ms (the default profile's; the fast profile's 0.5 s gives 100 ms).
    pub fn wire_guard_wait(&self) -> std::time::Duration {
        (self.heartbeat_dead_time() / 5).min(std::time::Duration::from_millis(200))
    }

    /// The head start a primary gets over its secondary in the promotion gate (see
    /// [`crate::cluster::machine`]): half the dead time, and at least two wire-guard waits, so
    /// that a primary that passed its own gate answers before the secondary looks.
    pub fn takeover_delay(&self) -> std::time::Duration {
        (self.heartbeat_dead_time() / 2).max(self.wire_guard_wait() * 2)
    }

    /// How long the fence command may run.
    pub fn fence_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.fence_timeout.unwrap_or(DEFAULT_FENCE_TIMEOUT))
    }

    /// How long a fence command that did not vouch holds off the next try: its own timeout,
    /// at least 2 s and at most 30 s.
    pub fn fence_retry(&self) -> std::time::Duration {
        self.fence_timeout().clamp(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(30),
        )
    }

    /// The witness's address, if one is configured (and parses: `validate` made sure).
    pub fn witness_addr(&self) -> Option<std::net::SocketAddr> {
        let text = self.witness.as_deref()?;
        text.parse().ok().or_else(|| {
            let ip: IpAddr = text.parse().ok()?;
            Some((ip, crate::ha::witness::DEFAULT_PORT).into())
        })
    }

    /// How long one try at the witness waits for its answer.
    pub fn witness_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.witness_timeout.unwrap_or(DEFAULT_WITNESS_TIMEOUT))
    }

    /// How long an unreachable witness holds off the next claim: its tries' time, 1..30 s.
    pub fn witness_retry(&self) -> std::time::Duration {
        (self.witness_timeout() * WITNESS_TRIES).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
        )
    }

    /// The ping targets (empty when none are configured; `validate` made sure they parse).
    pub fn ping_targets(&self) -> Vec<IpAddr> {
        self.ping
            .iter()
            .flatten()
            .filter_map(|t| t.parse().ok())
            .collect()
    }

    /// Time between echo requests to each ping target.
    pub fn ping_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.ping_interval.unwrap_or(DEFAULT_PING_INTERVAL))
    }

    /// Silence after which a ping target counts as unreachable.
    pub fn ping_dead_time(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.ping_dead_time.unwrap_or(DEFAULT_PING_DEAD_TIME))
    }

    /// How long the primary must reach fewer targets than its secondary before a switchover.
    pub fn ping_switch_delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.ping_switch_delay.unwrap_or(DEFAULT_PING_SWITCH_DELAY),
        )
    }

    fn validate_ping(&self) -> Result<(), (String, String)> {
        if let Some(targets) = &self.ping {
            let key = || "cluster.ping".to_string();
            if targets.is_empty() {
                return Err((
                    key(),
                    "empty list: name at least one IP address on the client network, or leave the key out".into(),
                ));
            }
            if targets.len() > MAX_PING_TARGETS {
                return Err((
                    key(),
                    format!("{} targets; at most {MAX_PING_TARGETS}", targets.len()),
                ));
            }
            for (i, t) in targets.iter().enumerate() {
                match t.parse::<IpAddr>() {
                    Err(_) => return Err((key(), format!("{t:?} is not an IP address"))),
                    Ok(IpAddr::V6(_)) => {
                        return Err((
                            key(),
                            format!("{t} is an IPv6 address; only IPv4 targets are supported"),
                        ))
                    }
                    Ok(IpAddr::V4(_)) => {}
                }
                if targets[..i].contains(t) {
                    return Err((key(), format!("{t} is listed twice")));
                }
            }
        }
        let interval = self.ping_interval.unwrap_or(DEFAULT_PING_INTERVAL);
        if !interval.is_finite() || !(0.05..=60.0).contains(&interval) {
            return Err((
                "cluster.ping-interval".into(),
                format!("{interval} is not a number of seconds in 0.05..60"),
            ));
        }
        let dead = self.ping_dead_time.unwrap_or(DEFAULT_PING_DEAD_TIME);
        if !dead.is_finite() || !(0.1..=600.0).contains(&dead) {
            return Err((
                "cluster.ping-dead-time".into(),
                format!("{dead} is not a number of seconds in 0.1..600"),
            ));
        }
        if dead < 2.0 * interval {
            return Err((
                "cluster.ping-dead-time".into(),
                format!("{dead} s must be at least two ping intervals ({interval} s each)"),
            ));
        }
        let delay = self.ping_switch_delay.unwrap_or(DEFAULT_PING_SWITCH_DELAY);
        if !delay.is_finite() || !(0.0..=3600.0).contains(&delay) {
            return Err((
                "cluster.ping-switch-delay".into(),
                format!("{delay} is not a number of seconds in 0..3600"),
            ));
        }
        Ok(())
    }

    /// What only the node that runs the fence command can check, at its start: the file
    /// exists and is executable.
    pub fn check_fence_peer(&self) -> Result<(), (String, String)> {
        use std::os::unix::fs::PermissionsExt;
        let Some(path) = &self.fence_peer else {
            return Ok(());
        };
        let key = || "cluster.fence-peer".to_string();
        let meta =
            std::fs::metadata(path).map_err(|e| (key(), format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err((key(), format!("{} is not a file", path.display())));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err((key(), format!("{} is not executable", path.display())));
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if let Some(path) = &self.fence_peer {
            if !path.is_absolute() {
                return Err((
                    "cluster.fence-peer".into(),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if self.witness.is_some() && self.witness_addr().is_none() {
            return Err((
                "cluster.witness".into(),
                format!(
                    "{:?} is not ADDRESS:PORT (or an address)",
                    self.witness.as_deref().unwrap_or_default()
                ),
            ));
        }
        if let Some(t) = self.witness_timeout {
            if !t.is_finite() || !(0.01..=30.0).contains(&t) {
                return Err((
                    "cluster.witness-timeout".into(),
                    format!("{t} is not a number of seconds in 0.01..30"),
                ));
            }
        }
        if let Some(t) = self.fence_timeout {
            if !t.is_finite() || t <= 0.0 || t > 3600.0 {
                return Err((
                    "cluster.fence-timeout".into(),
                    format!("{t} is not a number of seconds in (0, 3600]"),
                ));
            }
        }
        self.validate_ping()?;
        self.validate_secret_keys()?;
        if self.heartbeat_port == Some(0) {
            return Err(("cluster.heartbeat-port".into(), "must not be 0".into()));
        }
        let interval = self
            .heartbeat_interval
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        if !interval.is_finite() || !(0.01..=10.0).contains(&interval) {
            return Err((
                "cluster.heartbeat-interval".into(),
                format!("{interval} is not a number of seconds in 0.01..10"),
            ));
        }
        let dead = self
            .heartbeat_dead_time
            .unwrap_or(DEFAULT_HEARTBEAT_DEAD_TIME);
        if !dead.is_finite() || !(0.05..=120.0).contains(&dead) {
            return Err((
                "cluster.heartbeat-dead-time".into(),
                format!("{dead} is not a number of seconds in 0.05..120"),
            ));
        }
        // As heartbeat refuses deadtime <= 2 x keepalive: one lost datagram must not kill a peer.
        if dead < 3.0 * interval {
            return Err((
                "cluster.heartbeat-dead-time".into(),
                format!("{dead} s must be at least three heartbeat intervals ({interval} s each)"),
            ));
        }
        Ok(())
    }
}
