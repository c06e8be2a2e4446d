//! `GET /metrics`: the node's state in the Prometheus text exposition format (version 0.0.4),
//! served on `[node.NAME] metrics = "ADDR:PORT"` (off by default) by one task of the daemon's
//! supervisor tree.
//!
//! Everything comes from what `status` already reads — each resource's [`Snapshot`] and its
//! [`OpsSnapshot`] (engine loop, failover outcomes, the exports' own counters, the replicated
//! device's latency histograms) — at scrape time. The one thing the I/O path does for the
//! metrics is time each client read, write and flush at the replicated device
//! ([`crate::block::timed`]: two clock reads and two relaxed atomic adds per request, no lock,
//! no allocation). The shared secret is in none of these.
//!
//! [`render`] is pure (a list of [`ResourceView`]s and the heartbeat paths in, text out);
//! [`MetricsServer`] is a minimal HTTP/1.1 responder: one request per connection, answered
//! in turn by the accept task (a client gets 5 s to send its request).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resource::{
    AoeTotals, FailoverOutcome, NbdTotals, OpsSnapshot, PathSnapshot, Resource, ResyncFigures,
    Snapshot,
};
use crate::cluster::{ConnState, DiskState, ReplState, Role};
use crate::ha::gate::Authority;
use crate::supervisor::Supervisor;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics show of one resource.
#[derive(Debug, Clone)]
pub struct ResourceView {
    /// Resource name.
    pub name: String,
    /// This node's role.
    pub role: Role,
    /// The peer's role.
    pub peer_role: Role,
    /// Connection state.
    pub conn: ConnState,
    /// Replication state.
    pub repl: ReplState,
    /// Local disk state.
    pub disk: DiskState,
    /// The peer's disk state.
    pub peer_disk: DiskState,
    /// The service group runs here.
    pub serving: bool,
    /// The serve gate's grounds.
    pub authority: Authority,
    /// The gate lets replies out now.
    pub answering: bool,
    /// Device size, bytes.
    pub size: u64,
    /// Out-of-sync bytes.
    pub out_of_sync: u64,
    /// A resync runs now.
    pub syncing: bool,
    /// Resync rate since it started, bytes/s (0 when none runs).
    pub resync_rate: f64,
    /// Resync time left at that rate, seconds (0 when none runs or unknown).
    pub resync_eta: f64,
    /// Client bytes read, written; bytes sent to the peer; writes completed without it.
    pub read_bytes: u64,
    /// Client bytes written.
    pub written_bytes: u64,
    /// Bytes sent to the peer.
    pub sent_bytes: u64,
    /// Writes completed without the peer (marked out of sync).
    pub writes_marked: u64,
    /// 4 KiB blocks the last verify found different.
    pub verify_mismatches: u64,
    /// Time left on the lease (`None`: none held).
    pub lease_left: Option<Duration>,
    /// Lease lapses while serving.
    pub lease_lapses: u64,
    /// The peer is heard on some path.
    pub peer_heard: bool,
    /// Engine loop, failovers, export counters.
    pub ops: OpsSnapshot,
}

impl ResourceView {
    /// From what `status` reads.
    pub fn of(name: &str, s: &Snapshot, ops: OpsSnapshot) -> ResourceView {
        let syncing = matches!(
            s.status.repl,
            ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::PausedSyncS
                | ReplState::PausedSyncT
        );
        let f = ResyncFigures::of(s.resync_total, s.out_of_sync, s.resync_secs);
        ResourceView {
            name: name.to_string(),
            role: s.status.role,
            peer_role: s.status.peer_role,
            conn: s.status.conn,
            repl: s.status.repl,
            disk: s.status.disk,
            peer_disk: s.status.peer_disk,
            serving: s.status.serving,
            authority: s.status.authority,
            answering: s.ha.answering,
            size: s.size,
            out_of_sync: s.out_of_sync,
            syncing,
            resync_rate: if syncing { f.rate_mbps * 1e6 } else { 0.0 },
            resync_eta: if syncing { f.eta_secs } else { 0.0 },
            read_bytes: s.read_bytes,
            written_bytes: s.written_bytes,
            sent_bytes: s.sent_bytes,
            writes_marked: s.writes_marked,
            verify_mismatches: s.verify.blocks,
            lease_left: s.ha.lease_left,
            lease_lapses: s.ha.lease_lapses,
            peer_heard: s.ha.peer_heard,
            ops,
        }
    }
}

/// Every resource of the daemon and the heartbeat paths (the node's, shared by all).
pub fn views(resources: &[Arc<Resource>]) -> (Vec<ResourceView>, Vec<PathSnapshot>) {
    let mut paths = Vec::new();
    let views = resources
        .iter()
        .map(|r| {
            let s = r.snapshot();
            if paths.is_empty() {
                paths = s.ha.paths.clone();
            }
            ResourceView::of(&r.spec.name, &s, r.ops_snapshot())
        })
        .collect();
    (views, paths)
}

/// A label value, escaped as the text format wants (`\\`, `\"`, `\n`).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `{a="x",b="y"}` from pairs.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Reads one state of a resource (for a state set).
type Getter<'a, S> = &'a dyn Fn(&ResourceView) -> S;

/// The text being built, one family at a time (a family's samples stay together).
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: Vec<(String, String)>) {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (l, v) in samples {
            let _ = writeln!(self.0, "{name}{l} {v}");
        }
    }

    /// A histogram family: per resource and kind of request (label `op`), the cumulative
    /// `_bucket{le}` counts, `_sum` and `_count`.
    fn latency(&mut self, views: &[ResourceView], name: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} histogram");
        for r in views {
            let l = &r.ops.latency;
            for (op, h) in [("read", &l.read), ("write", &l.write), ("flush", &l.flush)] {
                let base = [("resource", r.name.as_str()), ("op", op)];
                for (le, count) in h.cumulative() {
                    let le = float(le);
                    let l = labels(&[base[0], base[1], ("le", &le)]);
                    let _ = writeln!(self.0, "{name}_bucket{l} {count}");
                }
                let l = labels(&base);
                let _ = writeln!(self.0, "{name}_sum{l} {}", float(h.sum_secs()));
                let _ = writeln!(self.0, "{name}_count{l} {}", h.count());
            }
        }
    }

    /// One sample per resource.
    fn per_resource(
        &mut self,
        views: &[ResourceView],
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&ResourceView) -> Option<String>,
    ) {
        let samples = views
            .iter()
            .filter_map(|r| value(r).map(|v| (labels(&[("resource", &r.name)]), v)))
            .collect();
        self.family(name, kind, help, samples);
    }

    /// A state set: one sample per possible state, 1 for the current one.
    fn state_set<S: Copy + PartialEq>(
        &mut self,
        views: &[ResourceView],
        (name, help, label): (&str, &str, &str),
        all: &[S],
        text: impl Fn(S) -> &'static str,
        extra: &[(&str, Getter<'_, S>)],
    ) {
        let mut samples = Vec::new();
        for r in views {
            for (which, get) in extra {
                let current = get(r);
                for &s in all {
                    let mut l = vec![("resource", r.name.as_str())];
                    if !which.is_empty() {
                        l.push(("disk", which));
                    }
                    l.push((label, text(s)));
                    samples.push((labels(&l), u64::from(s == current).to_string()));
                }
            }
        }
        self.family(name, "gauge", help, samples);
    }
}

fn secs(d: Duration) -> String {
    float(d.as_secs_f64())
}

fn n(v: u64) -> Option<String> {
    Some(v.to_string())
}

fn flag(b: bool) -> Option<String> {
    n(u64::from(b))
}

fn authority_str(a: Authority) -> &'static str {
    match a {
        Authority::Closed => "closed",
        Authority::Lease => "lease",
        Authority::Open => "open",
    }
}

/// The exposition text of `views` and the heartbeat `paths`.
pub fn render(views: &[ResourceView], paths: &[PathSnapshot]) -> String {
    let mut t = Text(String::new());
    t.state_set(
        views,
        (
            "twinblade_role",
            "This node's role for the resource (1 for the current one).",
            "role",
        ),
        Role::ALL,
        Role::as_str,
        &[("", &|r| r.role)],
    );
    t.state_set(
        views,
        (
            "twinblade_peer_role",
            "The peer's role as last known (1 for the current one).",
            "role",
        ),
        Role::ALL,
        Role::as_str,
        &[("", &|r| r.peer_role)],
    );
    t.state_set(
        views,
        (
            "twinblade_connection_state",
            "The replication connection's state (1 for the current one).",
            "state",
        ),
        ConnState::ALL,
        ConnState::as_str,
        &[("", &|r| r.conn)],
    );
    t.state_set(
        views,
        (
            "twinblade_replication_state",
            "The replication state (1 for the current one).",
            "state",
        ),
        ReplState::ALL,
        ReplState::as_str,
        &[("", &|r| r.repl)],
    );
    t.state_set(
        views,
        ("twinblade_disk_state", "Disk state of this node (disk=\"local\") and of the peer (disk=\"peer\"), 1 for the current one.", "state"),
        DiskState::ALL,
        DiskState::as_str,
        &[("local", &|r| r.disk), ("peer", &|r| r.peer_disk)],
    );
    t.state_set(
        views,
        ("twinblade_serve_authority", "On what grounds this node may answer clients: closed, lease or open (1 for the current one).", "authority"),
        &[Authority::Closed, Authority::Lease, Authority::Open],
        authority_str,
        &[("", &|r| r.authority)],
    );
    t.per_resource(
        views,
        "twinblade_serving",
        "gauge",
        "1 while this node runs the resource's service group (floating IP, AoE, NBD).",
        |r| flag(r.serving),
    );
    t.per_resource(
        views,
        "twinblade_answering",
        "gauge",
        "1 while the serve gate lets replies to clients out.",
        |r| flag(r.answering),
    );
    t.per_resource(
        views,
        "twinblade_size_bytes",
        "gauge",
        "Size of the replicated device.",
        |r| n(r.size),
    );
    t.per_resource(
        views,
        "twinblade_out_of_sync_bytes",
        "gauge",
        "Bytes marked out of sync with the peer.",
        |r| n(r.out_of_sync),
    );
    t.per_resource(
        views,
        "twinblade_resync_running",
        "gauge",
        "1 while a resync runs (or is paused).",
        |r| flag(r.syncing),
    );
    t.per_resource(
        views,
        "twinblade_resync_rate_bytes_per_second",
        "gauge",
        "Average rate of the running resync since it started (0 when none runs).",
        |r| Some(float(r.resync_rate)),
    );
    t.per_resource(
        views,
        "twinblade_resync_eta_seconds",
        "gauge",
        "Time the running resync needs at that rate (0 when none runs or not known yet).",
        |r| Some(float(r.resync_eta)),
    );
    t.per_resource(
        views,
        "twinblade_read_bytes_total",
        "counter",
        "Bytes clients read from the device.",
        |r| n(r.read_bytes),
    );
    t.per_resource(
        views,
        "twinblade_written_bytes_total",
        "counter",
        "Bytes clients wrote to the device.",
        |r| n(r.written_bytes),
    );
    t.per_resource(
        views,
        "twinblade_replicated_bytes_total",
        "counter",
        "Bytes of client writes sent to the peer.",
        |r| n(r.sent_bytes),
    );
    t.per_resource(
        views,
        "twinblade_writes_without_peer_total",
        "counter",
        "Writes completed without the peer (marked out of sync).",
        |r| n(r.writes_marked),
    );
    if !views.is_empty() {
        t.latency(
            views,
            "twinblade_io_latency_seconds",
            "Client reads, writes and flushes by how long the replicated device took to complete them on this node (a write until the peer's acknowledgement under protocol C or B; a flush until the peer's barrier acknowledgement).",
        );
    }
    t.per_resource(
        views,
        "twinblade_verify_mismatched_blocks",
        "gauge",
        "4 KiB blocks the last online verify found different.",
        |r| n(r.verify_mismatches),
    );
    t.per_resource(
        views,
        "twinblade_lease_held",
        "gauge",
        "1 while this node holds an unexpired lease to serve the resource.",
        |r| flag(r.lease_left.is_some_and(|d| !d.is_zero())),
    );
    t.per_resource(
        views,
        "twinblade_lease_seconds_left",
        "gauge",
        "Time left on the lease (0: none held, or lapsed).",
        |r| Some(secs(r.lease_left.unwrap_or_default())),
    );
    t.per_resource(
        views,
        "twinblade_lease_lapses_total",
        "counter",
        "Times the lease lapsed while serving under it.",
        |r| n(r.lease_lapses),
    );
    t.per_resource(
        views,
        "twinblade_peer_heard",
        "gauge",
        "1 while the peer is heard on some heartbeat path or the replication link.",
        |r| flag(r.peer_heard),
    );
    let failovers = views
        .iter()
        .flat_map(|r| {
            FailoverOutcome::ALL.iter().enumerate().map(|(i, o)| {
                (
                    labels(&[("resource", &r.name), ("outcome", o.as_str())]),
                    r.ops.failovers[i].to_string(),
                )
            })
        })
        .collect();
    t.family("twinblade_failovers_total", "counter", "Failovers this node timed, by how they ended: served (took over and answered a client), demoted, peer_back (the peer was heard again), timed_out.", failovers);
    t.per_resource(views, "twinblade_last_failover_seconds", "gauge", "The last served failover: from the peer last heard (or the link lost) to the first client request answered.", |r| r.ops.last_failover.map(secs));
    t.per_resource(
        views,
        "twinblade_engine_idle_seconds",
        "gauge",
        "Since the resource's engine last went round its loop (the watchdog's liveness check).",
        |r| Some(secs(r.ops.engine_idle)),
    );
    let aoe = |f: fn(&AoeTotals) -> u64| {
        move |r: &ResourceView| r.ops.aoe.as_ref().map(|a| f(a).to_string())
    };
    t.per_resource(
        views,
        "twinblade_aoe_requests_total",
        "counter",
        "AoE frames addressed to the resource's blade since it last started serving.",
        aoe(|a| a.requests),
    );
    t.per_resource(
        views,
        "twinblade_aoe_replies_total",
        "counter",
        "AoE replies sent since serving started.",
        aoe(|a| a.replies),
    );
    t.per_resource(
        views,
        "twinblade_aoe_reads_total",
        "counter",
        "ATA reads completed over AoE since serving started.",
        aoe(|a| a.reads),
    );
    t.per_resource(
        views,
        "twinblade_aoe_writes_total",
        "counter",
        "ATA writes completed over AoE since serving started.",
        aoe(|a| a.writes),
    );
    t.per_resource(
        views,
        "twinblade_aoe_flushes_total",
        "counter",
        "Flushes completed over AoE since serving started.",
        aoe(|a| a.flushes),
    );
    t.per_resource(
        views,
        "twinblade_aoe_read_bytes_total",
        "counter",
        "Bytes read over AoE since serving started.",
        aoe(|a| a.bytes_read),
    );
    t.per_resource(
        views,
        "twinblade_aoe_written_bytes_total",
        "counter",
        "Bytes written over AoE since serving started.",
        aoe(|a| a.bytes_written),
    );
    t.per_resource(
        views,
        "twinblade_aoe_error_replies_total",
        "counter",
        "AoE error replies since serving started.",
        aoe(|a| a.aoe_errors),
    );
    t.per_resource(
        views,
        "twinblade_aoe_ata_errors_total",
        "counter",
        "ATA commands answered with an error status since serving started.",
        aoe(|a| a.ata_errors),
    );
    t.per_resource(
        views,
        "twinblade_aoe_dropped_total",
        "counter",
        "AoE frames dropped (truncated, malformed or masked) since serving started.",
        aoe(|a| a.dropped),
    );
    t.per_resource(
        views,
        "twinblade_aoe_gated_total",
        "counter",
        "AoE replies withheld by the closed serve gate since serving started.",
        aoe(|a| a.gated),
    );
    let nbd = |f: fn(&NbdTotals) -> u64| {
        move |r: &ResourceView| r.ops.nbd.as_ref().map(|a| f(a).to_string())
    };
    t.per_resource(
        views,
        "twinblade_nbd_connections_total",
        "counter",
        "NBD connections accepted since serving started.",
        nbd(|s| s.connections),
    );
    t.per_resource(
        views,
        "twinblade_nbd_requests_total",
        "counter",
        "NBD requests received since serving started.",
        nbd(|s| s.requests),
    );
    t.per_resource(
        views,
        "twinblade_nbd_error_replies_total",
        "counter",
        "NBD requests answered with an error since serving started.",
        nbd(|s| s.error_replies),
    );
    t.per_resource(
        views,
        "twinblade_nbd_protocol_errors_total",
        "counter",
        "NBD connections closed for breaking the protocol since serving started.",
        nbd(|s| s.protocol_errors),
    );
    let path_labels = |p: &PathSnapshot| {
        labels(&[
            ("path", &p.id.to_string()),
            ("local", &p.local.to_string()),
            ("peer", &p.peer.to_string()),
        ])
    };
    t.family(
        "twinblade_heartbeat_last_heard_seconds",
        "gauge",
        "Since the peer was last heard on the heartbeat path (absent: never heard).",
        paths
            .iter()
            .filter_map(|p| p.last_heard.map(|d| (path_labels(p), secs(d))))
            .collect(),
    );
    t.family(
        "twinblade_heartbeat_round_trip_seconds",
        "gauge",
        "Smoothed round trip on the heartbeat path (absent: no echo yet).",
        paths
            .iter()
            .filter_map(|p| p.rtt.map(|d| (path_labels(p), secs(d))))
            .collect(),
    );
    t.family(
        "twinblade_heartbeat_path_silent",
        "gauge",
        "1 while the heartbeat path has been silent for the dead time.",
        paths
            .iter()
            .map(|p| (path_labels(p), u64::from(p.silent).to_string()))
            .collect(),
    );
    t.0
}

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_REQUEST: usize = 8192;

/// The running `/metrics` endpoint: one task in its own group.
pub struct MetricsServer {
    group: Supervisor,
}

impl MetricsServer {
    /// Binds `addr` (before anything else starts, so that a taken port stops the daemon before
    /// it attached a disk).
    pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Serves `GET /metrics` for `resources` on `listener` (from [`MetricsServer::bind`]) until
    /// stopped.
    pub fn start(
        listener: std::net::TcpListener,
        resources: Vec<Arc<Resource>>,
        group: Supervisor,
    ) -> std::io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let listener = {
            let _runtime = group.runtime().enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        tracing::info!("serving metrics on http://{addr}/metrics");
        group.spawn_task("metrics", move |token| async move {
            static LIMIT: crate::ratelimit::LogLimiter =
                crate::ratelimit::LogLimiter::new(Duration::from_secs(60), 3);
            loop {
                let (stream, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            crate::warn_limited!(LIMIT, "metrics: {e}");
                            continue;
                        }
                    },
                };
                let resources = resources.clone();
                tokio::select! {
                    _ = token.cancelled() => return,
                    r = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, resources)) => {
                        if let Ok(Err(e)) = r {
                            crate::warn_limited!(LIMIT, "metrics: {e}");
                        }
                    }
                }
            }
        });
        Ok(MetricsServer { group })
    }

    /// Stops serving and waits.
    pub fn stop(self) {
        self.group.stop();
    }
}

/// The status line, extra headers and body for a request head.
fn respond_to(head: &str) -> (&'static str, &'static str, bool) {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", "", true),
        ("GET", _) => ("404 Not Found", "", false),
        _ => ("405 Method Not Allowed", "Allow: GET\r\n", false),
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    resources: Vec<Arc<Resource>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let got = stream.read(&mut buf).await?;
        if got == 0 {
            break;
        }
        head.extend_from_slice(&buf[..got]);
        if head.len() > MAX_REQUEST {
            break;
        }
    }
    let (status, extra, ok) = respond_to(&String::from_utf8_lossy(&head));
    let (body, content_type) = if ok {
        let text = tokio::task::spawn_blocking(move || {
            let (views, paths) = views(&resources);
            render(&views, &paths)
        })
        .await
        .map_err(std::io::Error::other)?;
        (text, CONTENT_TYPE)
    } else {
        (format!("{status}\n"), "text/plain; charset=utf-8")
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Checks `text` against the text exposition format's rules (what `promtool check metrics`
/// checks, apart from its naming advice): every line a `# HELP`, a `# TYPE` or a sample;
/// metric and label names valid; label values quoted and escaped; values numbers; a family's
/// `# TYPE` before its samples and its samples together (a histogram's as `_bucket` with an
/// `le` label, `_sum` and `_count`); counters named `*_total`; no series twice. The first problem found, with its line number.
pub fn lint(text: &str) -> Result<(), String> {
    use std::collections::HashSet;
    fn name_ok(n: &str, colon: bool) -> bool {
        let mut c = n.chars();
        matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || (colon && f == ':'))
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || (colon && ch == ':'))
    }
    fn value_ok(v: &str) -> bool {
        matches!(v, "NaN" | "+Inf" | "-Inf") || v.parse::<f64>().is_ok()
    }
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    let mut helped: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut current = String::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let at = |what: String| Err(format!("line {}: {what}: {line:?}", i + 1));
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let (kw, name, tail) = (w.next(), w.next().unwrap_or(""), w.next().unwrap_or(""));
            if !name_ok(name, true) {
                return at("bad metric name".into());
            }
            if name != current {
                if done.contains(name) {
                    return at(format!("family {name} appears twice"));
                }
                if !current.is_empty() {
                    done.insert(std::mem::take(&mut current));
                }
                current = name.to_string();
            }
            match kw {
                Some("HELP") => {
                    if !helped.insert(name.to_string()) {
                        return at("second HELP".into());
                    }
                }
                Some("TYPE") => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail) {
                        return at(format!("unknown type {tail:?}"));
                    }
                    if tail == "counter" && !name.ends_with("_total") {
                        return at("a counter's name must end in _total".into());
                    }
                    if typed.insert(name.to_string(), tail.to_string()).is_some() {
                        return at("second TYPE".into());
                    }
                }
                _ => return at("a comment that is neither HELP nor TYPE".into()),
            }
            continue;
        }
        if line.is_empty() {
            return at("empty line".into());
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| format!("line {}: no value: {line:?}", i + 1))?;
        let name = &line[..name_end];
        if !name_ok(name, true) {
            return at("bad metric name".into());
        }
        // A histogram's samples are its name with _bucket, _sum or _count.
        let histogram = typed.get(&current).is_some_and(|t| t == "histogram");
        let suffix = name.strip_prefix(current.as_str()).unwrap_or(name);
        let own = if histogram {
            ["_bucket", "_sum", "_count"].contains(&suffix)
        } else {
            name == current
        };
        if !own || !typed.contains_key(&current) {
            return at(format!(
                "sample of {name} outside its family or before its TYPE"
            ));
        }
        let mut rest = &line[name_end..];
        let mut key = name.to_string();
        if let Some(body) = rest.strip_prefix('{') {
            // label="value",… with \\, \" and \n escapes.
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                let start = match chars.peek() {
                    Some(&(_, '}')) => {
                        end = chars.next().map(|(j, _)| j);
                        break;
                    }
                    Some(&(j, _)) => j,
                    None => break,
                };
                let mut eq = None;
                for (j, c) in chars.by_ref() {
                    if c == '=' {
                        eq = Some(j);
                        break;
                    }
                }
                let Some(eq) = eq else {
                    return at("label without =".into());
                };
                if !name_ok(&body[start..eq], false) {
                    return at(format!("bad label name {:?}", &body[start..eq]));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return at("label value not quoted".into());
                }
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, '\\' | '"' | 'n')) => {}
                            _ => return at("bad escape in a label value".into()),
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\n' => return at("newline in a label value".into()),
                        _ => {}
                    }
                }
                if !closed {
                    return at("unterminated label value".into());
                }
                match chars.peek() {
                    Some(&(_, ',')) => {
                        chars.next();
                    }
                    Some(&(_, '}')) => {}
                    _ => return at("expected , or } after a label".into()),
                }
            }
            let Some(end) = end else {
                return at("unterminated label set".into());
            };
            key.push_str(&body[..end]);
            rest = &body[end + 1..];
        }
        let label_text = &key[name.len()..];
        if histogram
            && suffix == "_bucket"
            && !label_text.starts_with("le=\"")
            && !label_text.contains(",le=\"")
        {
            return at("a histogram bucket without le".into());
        }
        let mut parts = rest.trim_start_matches(' ').split(' ');
        let value = parts.next().unwrap_or("");
        if !rest.starts_with(' ') || !value_ok(value) {
            return at(format!("bad value {value:?}"));
        }
        if let Some(ts) = parts.next() {
            if ts.parse::<i64>().is_err() || parts.next().is_some() {
                return at("bad timestamp".into());
            }
        }
        if !series.insert(key) {
            return at("the same series twice".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
