//! What `status` and `events` show of one resource: the snapshot, resync and verify figures,
//! and the `events` subscribers. Reads the other roles' counters; decides nothing.

use super::*;

impl Engine {
    /// One `events` line about a running resync or verify, at most once a second (`force`:
    /// now, e.g. the final one).
    pub(super) fn publish_progress(&mut self, force: bool) {
        if !force && self.last_progress_event.elapsed() < PROGRESS_EVENT_INTERVAL {
            return;
        }
        let s = self.machine.status();
        let syncing = matches!(
            s.repl,
            ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::PausedSyncS
                | ReplState::PausedSyncT
        );
        let verifying = self.res.verify.running.load(Ordering::Relaxed);
        if verifying && s.repl != ReplState::Established {
            // A resync (or a lost connection) makes the comparison meaningless.
            self.res.verify.abort.store(true, Ordering::Relaxed);
        }
        if !force && !syncing && !verifying {
            return;
        }
        self.last_progress_event = Instant::now();
        let name = &self.res.spec.name;
        if syncing || (force && !verifying) {
            let p = ResyncFigures::of(
                self.res.progress.total.load(Ordering::Relaxed),
                self.res.meta.out_of_sync_bytes(),
                self.res.progress.secs(self.res.now_ms()),
            );
            self.res.publish(format!(
                "change resource name:{name} replication:{} done:{:.1} rate:{:.1}MB/s eta:{:.0}s out-of-sync:{}KiB resync-sent:{} resync-same:{} resync-zero:{}",
                s.repl,
                p.percent,
                p.rate_mbps,
                p.eta_secs,
                self.res.meta.out_of_sync_bytes() / 1024,
                self.res.progress.sent.load(Ordering::Relaxed),
                self.res.progress.same.load(Ordering::Relaxed),
                self.res.progress.zero.load(Ordering::Relaxed),
            ));
        }
        if verifying || (force && !syncing) {
            let v = self.res.verify_snapshot();
            let f = ResyncFigures::of(v.total, v.total.saturating_sub(v.done), v.secs);
            self.res.publish(format!(
                "change resource name:{name} verify:{} verify-done:{:.1} rate:{:.1}MB/s eta:{:.0}s out-of-sync-blocks:{}{}",
                if v.running { "running" } else if v.failed { "failed" } else { "finished" },
                f.percent,
                f.rate_mbps,
                f.eta_secs,
                v.blocks,
                if v.ranges.is_empty() { String::new() } else { format!(" ranges:{}", v.ranges_text().replace(' ', ",")) }
            ));
        }
    }
}

impl Resource {
    /// Records the witness's verdict for `status`.
    pub(super) fn note_witness(&self, generation: u64, verdict: crate::cluster::WitnessVerdict) {
        let now = Instant::now();
        if verdict == crate::cluster::WitnessVerdict::Unreachable {
            *lock(&self.witness_unreachable) = Some(now);
        }
        *lock(&self.last_witness) = Some((generation, verdict, now));
    }

    /// The witness's line in `status`: where it is, its last verdict and how long ago, and
    /// when it was last unreachable (a warning while that is the last word).
    fn witness_line(&self) -> Option<String> {
        let spec = self.spec.witness.as_ref()?;
        let mut line = format!("{} as {}/{}", spec.addr, spec.pair, spec.node);
        let last = *lock(&self.last_witness);
        match last {
            Some((generation, verdict, at)) => {
                line += &format!(
                    ", last verdict: {}, {:.1}s ago",
                    crate::daemon::witness::describe(generation, verdict),
                    at.elapsed().as_secs_f64()
                );
                if verdict == crate::cluster::WitnessVerdict::Unreachable {
                    line += " (warning: a node that loses its peer will not serve alone)";
                }
            }
            None => line += ", no claim yet",
        }
        if let (Some((reachable, at)), _) = *lock(&self.witness_poll) {
            line += &format!(
                "; {} at the last query {:.1}s ago",
                if reachable {
                    "reachable"
                } else {
                    "unreachable (warning: a node that loses its peer will not serve alone)"
                },
                at.elapsed().as_secs_f64()
            );
        }
        if let Some(at) = *lock(&self.witness_unreachable) {
            line += &format!("; last unreachable {:.1}s ago", at.elapsed().as_secs_f64());
        }
        Some(line)
    }

    /// The machine's status plus what status shows beside it.
    pub fn snapshot(&self) -> Snapshot {
        let published = self.published();
        Snapshot {
            status: published.status,
            peer: self.spec.identity.peer.clone(),
            out_of_sync: self.meta.out_of_sync_bytes(),
            size: self.device.size(),
            detached: self.device.is_detached(),
            resync_total: self.progress.total.load(Ordering::Relaxed),
            resync_done: self.progress.done.load(Ordering::Relaxed),
            resync_secs: self.progress.secs(self.now_ms()),
            resync_sent: self.progress.sent.load(Ordering::Relaxed),
            resync_same: self.progress.same.load(Ordering::Relaxed),
            resync_zero: self.progress.zero.load(Ordering::Relaxed),
            verify: self.verify_snapshot(),
            read_bytes: self.device.counters.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.device.counters.written_bytes.load(Ordering::Relaxed),
            sent_bytes: self.device.counters.sent_bytes.load(Ordering::Relaxed),
            writes_marked: self.device.counters.writes_marked.load(Ordering::Relaxed),
            uuids: self.uuid_set(published.uuid_flags),
            protocol: self.spec.protocol,
            durability: self.spec.durability,
            csums: self.spec.csums,
            ha: self.ha_snapshot(&published.status),
        }
    }

    fn ha_snapshot(&self, status: &crate::cluster::Status) -> HaSnapshot {
        let lease = self.gate.lease();
        HaSnapshot {
            authority: Some(status.authority),
            answering: self.gate.may_answer(),
            lease_left: lease
                .until()
                .map(|until| until.saturating_duration_since(Instant::now())),
            lease_lapses: self.lease_lapses.load(Ordering::Relaxed),
            outdate_request: status.outdate_request,
            peer_heard: status.peer_heard,
            paths: self.heartbeat_paths(),
            last_failover: lock(&self.last_failover).clone(),
            last_fence: lock(&self.last_fence).map(|(outcome, at)| {
                format!(
                    "{outcome} ({}), {:.1}s ago",
                    if outcome.vouches() {
                        "vouched"
                    } else {
                        "refused"
                    },
                    at.elapsed().as_secs_f64()
                )
            }),
            witness: self.witness_line(),
            reach: (self.heartbeat.own_reach(), self.heartbeat.peer_reach()),
            service_mac: self.service.service_mac,
            floating_ip: self.service.floating_ip.map(|ip| {
                let held = crate::net::address::holds(&self.service.interface, &ip);
                (ip, held.ok())
            }),
        }
    }

    fn verify_snapshot(&self) -> VerifySnapshot {
        let v = &self.verify;
        let now = self.now_ms();
        let end = match v.ended_ms.load(Ordering::Relaxed) {
            0 => now,
            e => e,
        };
        VerifySnapshot {
            running: v.running.load(Ordering::Relaxed),
            runs: v.runs.load(Ordering::Relaxed),
            total: v.total.load(Ordering::Relaxed),
            done: v.done.load(Ordering::Relaxed),
            secs: end.saturating_sub(v.started_ms.load(Ordering::Relaxed)) as f64 / 1000.0,
            blocks: v.blocks.load(Ordering::Relaxed),
            ranges: lock(&v.ranges).clone(),
            failed: v.failed.load(Ordering::Relaxed),
        }
    }

    /// Subscribes to event lines; the current state comes first, as `exists` lines.
    pub fn subscribe(&self, tx: Sender<String>) {
        let s = self.snapshot();
        let name = &self.spec.name;
        let _ = tx.send(format!(
            "exists resource name:{name} role:{} disk:{}",
            s.status.role, s.status.disk
        ));
        let _ = tx.send(format!(
            "exists connection name:{name} peer-node:{} connection:{} role:{}",
            s.peer, s.status.conn, s.status.peer_role
        ));
        let _ = tx.send(format!(
            "exists peer-device name:{name} peer-node:{} replication:{} peer-disk:{} out-of-sync:{}",
            s.peer,
            s.status.repl,
            s.status.peer_disk,
            s.out_of_sync / 1024
        ));
        let _ = tx.send("exists -".to_string());
        lock(&self.subscribers).push(tx);
    }

    pub(super) fn publish(&self, line: String) {
        lock(&self.subscribers).retain(|s| s.send(line.clone()).is_ok());
    }
}

/// Percent done, rate and time left of a resync or verify.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResyncFigures {
    /// Percent done.
    pub percent: f64,
    /// MB/s (10^6 bytes) since it started.
    pub rate_mbps: f64,
    /// Seconds left at that rate (0 if unknown).
    pub eta_secs: f64,
}

impl ResyncFigures {
    /// From the bytes to do, the bytes left and the seconds so far.
    pub fn of(total: u64, remaining: u64, secs: f64) -> ResyncFigures {
        let total = total.max(remaining);
        let done = total - remaining;
        let percent = if total == 0 {
            100.0
        } else {
            100.0 * done as f64 / total as f64
        };
        let rate_mbps = if secs > 0.0 {
            done as f64 / secs / 1e6
        } else {
            0.0
        };
        let eta_secs = if rate_mbps > 0.0 {
            remaining as f64 / 1e6 / rate_mbps
        } else {
            0.0
        };
        ResyncFigures {
            percent,
            rate_mbps,
            eta_secs,
        }
    }
}

/// The online verify's state for status.
#[derive(Debug, Clone, Default)]
pub struct VerifySnapshot {
    /// Running now.
    pub running: bool,
    /// Verifies finished since the daemon started.
    pub runs: u64,
    /// Bytes to compare.
    pub total: u64,
    /// Bytes compared.
    pub done: u64,
    /// Seconds it ran (so far).
    pub secs: f64,
    /// 4 KiB blocks that differ.
    pub blocks: u64,
    /// The first mismatched ranges (offset, length).
    pub ranges: Vec<(u64, u64)>,
    /// The last verify stopped early.
    pub failed: bool,
}

impl VerifySnapshot {
    /// `4096@1052672 8192@2097152` (length@offset, bytes).
    pub fn ranges_text(&self) -> String {
        let mut t = self
            .ranges
            .iter()
            .map(|(o, l)| format!("{l}@{o}"))
            .collect::<Vec<_>>()
            .join(" ");
        if self.blocks > 0 && self.ranges.len() >= MAX_VERIFY_RANGES {
            t += " ...";
        }
        t
    }
}

/// What `status` shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The machine's states.
    pub status: crate::cluster::Status,
    /// Peer name.
    pub peer: String,
    /// Out-of-sync bytes.
    pub out_of_sync: u64,
    /// Device size.
    pub size: u64,
    /// Local disk detached.
    pub detached: bool,
    /// Resync: bytes to copy.
    pub resync_total: u64,
    /// Resync: bytes copied.
    pub resync_done: u64,
    /// Resync: seconds since it started (until it ended).
    pub resync_secs: f64,
    /// Resync: block data moved over the wire.
    pub resync_sent: u64,
    /// Resync: bytes found equal by checksum.
    pub resync_same: u64,
    /// Resync: bytes sent as zero markers.
    pub resync_zero: u64,
    /// Online verify.
    pub verify: VerifySnapshot,
    /// Client bytes read.
    pub read_bytes: u64,
    /// Client bytes written.
    pub written_bytes: u64,
    /// Bytes sent to the peer.
    pub sent_bytes: u64,
    /// Writes completed without the peer.
    pub writes_marked: u64,
    /// Generation UUIDs.
    pub uuids: UuidSet,
    /// Protocol.
    pub protocol: ReplProtocol,
    /// Durability.
    pub durability: Durability,
    /// Block digest of full sync and verify.
    pub csums: ChecksumAlg,
    /// Who may answer clients, and what the heartbeat hears.
    pub ha: HaSnapshot,
}

/// The serve gate, its lease and the heartbeat paths, for `status`.
#[derive(Debug, Clone, Default)]
pub struct HaSnapshot {
    /// The gate's grounds: closed, lease or open.
    pub authority: Option<Authority>,
    /// Whether the gate lets replies out right now.
    pub answering: bool,
    /// Time left on the lease (`None`: no lease held).
    pub lease_left: Option<Duration>,
    /// Lease lapses while serving under it, since start.
    pub lease_lapses: u64,
    /// This primary asks the peer to persist Outdated.
    pub outdate_request: bool,
    /// The peer is heard on some path (or the replication link).
    pub peer_heard: bool,
    /// Each heartbeat path.
    pub paths: Vec<PathSnapshot>,
    /// The last failover's timeline (how it ended, then each milestone).
    pub last_failover: Option<String>,
    /// The fence command's last outcome, whether it vouched, and how long ago.
    pub last_fence: Option<String>,
    /// The witness's last verdict and its age, and when it was last unreachable (`None`: no
    /// witness configured).
    pub witness: Option<String>,
    /// The ping targets this node reaches and the peer last reported (`None`: not measured,
    /// or no targets configured).
    pub reach: (Option<u8>, Option<u8>),
    /// The MAC the blade answers from while served (`None`: the interface's own).
    pub service_mac: Option<crate::wire::MacAddr>,
    /// The floating IP, and whether this node's interface holds it now (`None`: could not
    /// ask).
    pub floating_ip: Option<(crate::net::address::FloatingIp, Option<bool>)>,
}

/// One heartbeat path, for `status`.
#[derive(Debug, Clone)]
pub struct PathSnapshot {
    /// Path id (its index in `heartbeat = [...]`).
    pub id: u8,
    /// Our address.
    pub local: std::net::IpAddr,
    /// The peer's.
    pub peer: std::net::IpAddr,
    /// Since the peer was last heard on it (`None`: never).
    pub last_heard: Option<Duration>,
    /// Smoothed round trip (`None`: no echo yet).
    pub rtt: Option<Duration>,
    /// Silent for the dead time.
    pub silent: bool,
}
