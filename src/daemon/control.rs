//! The control socket: a Unix stream socket the CLI verbs talk to.
//!
//! Protocol: the client sends one line, `VERB [RESOURCE] [FLAGS…]`; the server answers with
//! lines of output and a last line `.OK` or `.ERR message`. `events` streams lines until the
//! client hangs up. The path is selectable (`--control`, `$TWINBLADE_CONTROL`) so two nodes can
//! run on one machine.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::{Command, ReplState};
use crate::ratelimit::LogLimiter;
use crate::supervisor::Supervisor;

mod switchover;

use super::resource::{HaSnapshot, Input, Resource, ResyncFigures, Snapshot};

/// The control protocol's live-progress line: the client shows it in place (carriage return).
pub const PROGRESS_PREFIX: &str = ".PROGRESS ";

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    /// The accept task and one thread per client.
    group: Supervisor,
}

/// What a client's thread waits on: its own token, through the supervisor's runtime.
struct Client {
    group: Supervisor,
    token: CancellationToken,
}

impl Client {
    fn stopping(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Waits `d` or until the daemon stops.
    fn pause(&self, d: Duration) {
        self.group.sleep_on(&self.token, d);
    }
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and serves requests for `resources`: an accept
    /// task and a thread per client, all in `group`.
    pub fn start(
        path: &Path,
        resources: Vec<Arc<Resource>>,
        group: Supervisor,
    ) -> std::io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another twinblade is running there", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // Root-only (the owner's): every verb can demote, invalidate or cut the power. Set
        // before the first accept; a client that connected in between is refused by
        // `may_control` below.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path)?);
        listener.set_nonblocking(true)?;
        let listener = {
            let _runtime = group.runtime().enter();
            tokio::net::UnixListener::from_std(listener)?
        };
        let clients = group.clone();
        group.spawn_task("control", move |token| async move {
            static LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(10), 3);
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let stream = match accepted {
                    Ok((s, _)) if !may_control(&s, owner) => {
                        crate::warn_limited!(
                            LIMIT,
                            "control socket: refused a client of another user ({:?})",
                            s.peer_cred().map(|c| c.uid()).ok()
                        );
                        continue;
                    }
                    Ok((s, _)) => s.into_std(),
                    Err(e) => Err(e),
                };
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        crate::warn_limited!(LIMIT, "control socket: {e}");
                        continue;
                    }
                };
                let resources = resources.clone();
                let group = clients.clone();
                let started = clients.spawn("control-client", move |token| {
                    serve(stream, &resources, &Client { group, token })
                });
                if let Err(e) = started {
                    crate::warn_limited!(LIMIT, "control socket: cannot serve a client: {e}");
                }
            }
        });
        Ok(ControlServer {
            path: path.to_path_buf(),
            group,
        })
    }

    /// Stops accepting, ends every client's request, and removes the socket.
    pub fn stop(self) {
        self.group.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the control socket at `path` for `status` and reads the answer to its last line: `Ok`
/// once the daemon answers there (what `READY=1` waits for).
pub fn probe(path: &Path, timeout: Duration) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    writeln!(stream, "status")?;
    let mut last = String::new();
    for line in BufReader::new(stream).lines() {
        last = line?;
        if last.starts_with(".OK") || last.starts_with(".ERR") {
            break;
        }
    }
    if last == ".OK" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{}: status answered {last:?}",
            path.display()
        )))
    }
}

/// The control socket's mode: read and write for its owner (root, as the daemon runs) only.
pub const SOCKET_MODE: u32 = 0o600;

/// Whether the client at the other end of `stream` may use the control socket: root, or
/// `owner`, the socket's owner (the user the daemon runs as). The mode already keeps others
/// out; this covers a client that connected between `bind` and the `chmod`.
fn may_control(stream: &tokio::net::UnixStream, owner: u32) -> bool {
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == owner)
}

fn serve(stream: UnixStream, resources: &[Arc<Resource>], client: &Client) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut out = stream;
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = handle(&words, resources, &mut out, client);
    let _ = match result {
        Ok(()) => writeln!(out, ".OK"),
        Err(e) => writeln!(out, ".ERR {e}"),
    };
}

fn pick<'a>(
    resources: &'a [Arc<Resource>],
    name: Option<&str>,
) -> Result<Vec<&'a Arc<Resource>>, String> {
    match name {
        None | Some("all") => Ok(resources.iter().collect()),
        Some(n) => resources
            .iter()
            .find(|r| r.spec.name == n)
            .map(|r| vec![r])
            .ok_or_else(|| format!("no resource named {n}")),
    }
}

fn handle(
    words: &[&str],
    resources: &[Arc<Resource>],
    out: &mut UnixStream,
    client: &Client,
) -> Result<(), String> {
    let (verb, rest) = words.split_first().ok_or("empty request")?;
    if *verb == "fault" {
        // Test hook: `fault RES SPEC...`; the specs are plain words.
        let (res, specs) = rest.split_first().ok_or("fault: RES SPEC... expected")?;
        let r = pick(resources, Some(res))?;
        let text = r[0].inject(specs)?;
        writeln!(out, "{text}").map_err(|e| e.to_string())?;
        return Ok(());
    }
    let flags: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|w| w.starts_with("--"))
        .collect();
    let names: Vec<&str> = rest
        .iter()
        .copied()
        .filter(|w| !w.starts_with("--"))
        .collect();
    if names.len() > 1 {
        return Err(format!("{verb}: at most one resource, got {}", names.len()));
    }
    let json = flags.contains(&"--json");
    let known = |allowed: &[&str]| -> Result<(), String> {
        match flags.iter().find(|f| !allowed.contains(f)) {
            Some(f) => Err(format!("{verb}: unknown option {f}")),
            None => Ok(()),
        }
    };
    let targets = pick(resources, names.first().copied())?;
    let command = match *verb {
        "status" => {
            known(&["--json"])?;
            let text = if json {
                let items: Vec<String> = targets
                    .iter()
                    .map(|r| status_json(&r.spec.name, &r.snapshot()))
                    .collect();
                format!("[{}]", items.join(","))
            } else {
                targets
                    .iter()
                    .map(|r| status_text(&r.spec.name, &r.snapshot()))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            writeln!(out, "{text}").map_err(|e| e.to_string())?;
            return Ok(());
        }
        "events" => {
            known(&["--json"])?;
            let (tx, rx) = std::sync::mpsc::channel();
            for r in &targets {
                r.subscribe(tx.clone());
            }
            drop(tx);
            while !client.stopping() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(line) => {
                        let line = if json { event_json(&line) } else { line };
                        if writeln!(out, "{line}").is_err() {
                            return Ok(());
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => return Ok(()),
                }
            }
            return Ok(());
        }
        "primary" => {
            known(&["--force"])?;
            Command::Primary {
                force: flags.contains(&"--force"),
            }
        }
        "secondary" => Command::Secondary,
        "connect" => {
            known(&["--discard-my-data"])?;
            Command::Connect {
                discard_my_data: flags.contains(&"--discard-my-data"),
            }
        }
        "disconnect" => Command::Disconnect,
        "invalidate" => Command::Invalidate,
        "invalidate-remote" => Command::InvalidateRemote,
        "pause-sync" => Command::PauseSync,
        "outdate" => Command::Outdate,
        "switchover" => {
            known(&[])?;
            return switchover::switchover(&targets, out, client);
        }
        "resume-sync" => {
            known(&["--wait"])?;
            if flags.contains(&"--wait") {
                return resume_and_wait(&targets, out, client);
            }
            Command::ResumeSync
        }
        "verify" => {
            known(&["--wait"])?;
            return verify(&targets, flags.contains(&"--wait"), out, client);
        }
        other => return Err(format!("unknown verb {other}")),
    };
    if !matches!(command, Command::Primary { .. } | Command::Connect { .. }) {
        known(&[])?;
    }
    let mut failed = Vec::new();
    for r in targets {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        r.send(Input::Command(command, tx));
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(text)) => {
                if !text.is_empty() {
                    let _ = writeln!(out, "{}: {text}", r.spec.name);
                }
            }
            Ok(Err(e)) => failed.push(format!("{}: {e}", r.spec.name)),
            Err(_) => failed.push(format!("{}: no answer from the engine", r.spec.name)),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn send_command(r: &Resource, command: Command) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    r.send(Input::Command(command, tx));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(result) => result,
        Err(_) => Err(format!("{}: no answer from the engine", r.spec.name)),
    }
}

fn syncing(repl: ReplState) -> bool {
    matches!(
        repl,
        ReplState::SyncSource
            | ReplState::SyncTarget
            | ReplState::PausedSyncS
            | ReplState::PausedSyncT
    )
}

/// `resume-sync --wait`: resume a paused resync (a running one is only watched), then show
/// its progress on one line until it ends. An error if the connection drops first.
fn resume_and_wait(
    targets: &[&Arc<Resource>],
    out: &mut UnixStream,
    client: &Client,
) -> Result<(), String> {
    for r in targets {
        let s = r.snapshot();
        if matches!(
            s.status.repl,
            ReplState::PausedSyncS | ReplState::PausedSyncT
        ) || !syncing(s.status.repl)
        {
            send_command(r, Command::ResumeSync).map_err(|e| format!("{}: {e}", r.spec.name))?;
        }
    }
    for r in targets {
        let name = &r.spec.name;
        loop {
            if client.stopping() {
                return Err("the daemon is stopping".into());
            }
            let s = r.snapshot();
            if !syncing(s.status.repl) {
                if s.status.conn != crate::cluster::ConnState::Connected {
                    return Err(format!(
                        "{name}: connection lost before the resync finished (connection:{})",
                        s.status.conn
                    ));
                }
                let f = figures(&s);
                writeln!(
                    out,
                    "{name}: resync finished: {} bytes in {:.1}s ({:.1}MB/s); sent:{} same:{} zero:{} out-of-sync:{}KiB",
                    s.resync_total,
                    s.resync_secs,
                    f.rate_mbps,
                    s.resync_sent,
                    s.resync_same,
                    s.resync_zero,
                    s.out_of_sync / 1024
                )
                .map_err(|e| e.to_string())?;
                break;
            }
            let f = figures(&s);
            writeln!(
                out,
                "{PROGRESS_PREFIX}{name}: {} done:{:.1}% rate:{:.1}MB/s eta:{:.0}s out-of-sync:{}KiB sent:{} same:{} zero:{}",
                s.status.repl,
                f.percent,
                f.rate_mbps,
                f.eta_secs,
                s.out_of_sync / 1024,
                s.resync_sent,
                s.resync_same,
                s.resync_zero
            )
            .map_err(|e| e.to_string())?;
            client.pause(Duration::from_millis(250));
        }
    }
    Ok(())
}

/// `verify [--wait]`: start an online verify; with `--wait`, show its progress until it ends
/// and report what it found. An error if the connection drops first.
fn verify(
    targets: &[&Arc<Resource>],
    wait: bool,
    out: &mut UnixStream,
    client: &Client,
) -> Result<(), String> {
    let mut runs = Vec::new();
    for r in targets {
        let before = r.snapshot().verify.runs;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        r.send(Input::Verify(tx));
        let text = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(result) => result.map_err(|e| format!("{}: {e}", r.spec.name))?,
            Err(_) => return Err(format!("{}: no answer from the engine", r.spec.name)),
        };
        writeln!(out, "{}: {text}", r.spec.name).map_err(|e| e.to_string())?;
        runs.push(before);
    }
    if !wait {
        return Ok(());
    }
    for (r, before) in targets.iter().zip(runs) {
        let name = &r.spec.name;
        loop {
            if client.stopping() {
                return Err("the daemon is stopping".into());
            }
            let v = r.snapshot().verify;
            let f = ResyncFigures::of(v.total, v.total.saturating_sub(v.done), v.secs);
            if v.runs > before && !v.running {
                if v.failed {
                    return Err(format!(
                        "{name}: verify stopped (connection lost or resync started) after {} of {} bytes; {} block(s) out of sync so far",
                        v.done, v.total, v.blocks
                    ));
                }
                let mut line = format!(
                    "{name}: verify finished: {} bytes compared in {:.1}s ({:.1}MB/s); out-of-sync blocks:{}",
                    v.done, v.secs, f.rate_mbps, v.blocks
                );
                if v.blocks > 0 {
                    line += &format!(
                        " ranges: out-of-sync {} (marked for resync)",
                        v.ranges_text().replace(' ', ", out-of-sync ")
                    );
                }
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                break;
            }
            writeln!(
                out,
                "{PROGRESS_PREFIX}{name}: verify done:{:.1}% rate:{:.1}MB/s eta:{:.0}s out-of-sync blocks:{}",
                f.percent, f.rate_mbps, f.eta_secs, v.blocks
            )
            .map_err(|e| e.to_string())?;
            client.pause(Duration::from_millis(250));
        }
    }
    Ok(())
}

/// `drbdadm status` style text.
pub fn status_text(name: &str, s: &Snapshot) -> String {
    let st = &s.status;
    let mut t = format!("{name} role:{}\n", st.role);
    t += &format!(
        "  disk:{}{}\n",
        st.disk,
        if s.detached {
            " (detached after an I/O error)"
        } else {
            ""
        }
    );
    t += &format!(
        "  {} connection:{} role:{}\n",
        s.peer, st.conn, st.peer_role
    );
    t += &format!("    replication:{} peer-disk:{}", st.repl, st.peer_disk);
    if matches!(
        st.repl,
        ReplState::SyncSource
            | ReplState::SyncTarget
            | ReplState::PausedSyncS
            | ReplState::PausedSyncT
    ) {
        let f = figures(s);
        t += &format!(
            " done:{:.2}% rate:{:.1}MB/s eta:{:.0}s",
            f.percent, f.rate_mbps, f.eta_secs
        );
    }
    t += &format!(" out-of-sync:{}KiB\n", s.out_of_sync / 1024);
    match st.handover {
        Some(crate::cluster::Handover::Giving { why, .. }) => {
            t += &format!("  switchover ({why}): stepped down for {}\n", s.peer)
        }
        Some(crate::cluster::Handover::Asking { why, .. }) => {
            t += &format!("  switchover ({why}): asked {} to hand over\n", s.peer)
        }
        None => {}
    }
    if s.resync_total > 0 || s.resync_sent + s.resync_same + s.resync_zero > 0 {
        t += &format!(
            "  resync: total:{}KiB sent:{}KiB same:{}KiB zero:{}KiB in {:.1}s\n",
            s.resync_total / 1024,
            s.resync_sent / 1024,
            s.resync_same / 1024,
            s.resync_zero / 1024,
            s.resync_secs
        );
    }
    let v = &s.verify;
    if v.running || v.runs > 0 {
        let f = ResyncFigures::of(v.total, v.total.saturating_sub(v.done), v.secs);
        t += &format!(
            "  verify:{} done:{:.2}% rate:{:.1}MB/s out-of-sync-blocks:{}",
            if v.running {
                "running"
            } else if v.failed {
                "failed"
            } else {
                "finished"
            },
            f.percent,
            f.rate_mbps,
            v.blocks
        );
        if !v.ranges.is_empty() {
            t += &format!(" ranges:{}", v.ranges_text());
        }
        t += "\n";
    }
    t += &format!(
        "  protocol:{} durability:{} csums:{} size:{} serving:{} uuids:{}\n",
        s.protocol, s.durability, s.csums, s.size, st.serving, s.uuids
    );
    t += &format!(
        "  read:{}KiB written:{}KiB sent:{}KiB writes-marked-out-of-sync:{}\n",
        s.read_bytes / 1024,
        s.written_bytes / 1024,
        s.sent_bytes / 1024,
        s.writes_marked
    );
    t += &ha_text(&s.ha);
    t
}

fn millis(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{}ms", d.as_millis()))
}

/// The serve gate and the heartbeat paths, as `status` shows them.
fn ha_text(ha: &HaSnapshot) -> String {
    let authority = ha.authority.map_or("-".into(), |a| a.to_string());
    let mut t = format!(
        "  gate:{authority} answering:{} lease-left:{} lease-lapses:{} peer-heard:{}{}",
        ha.answering,
        millis(ha.lease_left),
        ha.lease_lapses,
        ha.peer_heard,
        if ha.outdate_request {
            " outdating-peer"
        } else {
            ""
        }
    );
    for p in &ha.paths {
        t += &format!(
            "\n  heartbeat path {} {} -> {}: {} last-heard:{} rtt:{}",
            p.id,
            p.local,
            p.peer,
            if p.silent { "silent" } else { "up" },
            millis(p.last_heard),
            p.rtt
                .map_or_else(|| "-".into(), |d| format!("{}us", d.as_micros()))
        );
    }
    t += &format!(
        "\n  service mac:{}",
        ha.service_mac
            .map_or_else(|| "own".into(), |m| m.to_string())
    );
    if let Some((ip, held)) = &ha.floating_ip {
        t += &format!(
            " floating-ip:{ip} held:{}",
            held.map_or_else(|| "unknown".into(), |h| h.to_string())
        );
    }
    if let Some(line) = &ha.last_failover {
        t += &format!("\n  last failover: {line}");
    }
    if let Some(line) = &ha.last_fence {
        t += &format!("\n  last fence-peer: {line}");
    }
    if let Some(line) = &ha.witness {
        t += &format!("\n  witness: {line}");
    }
    if let (Some(own), peer) = ha.reach {
        let peer = peer.map_or("nothing".into(), |p| p.to_string());
        t += &format!("\n  ping: reaching {own} targets; the peer reported {peer}");
    }
    t
}

fn ha_json(ha: &HaSnapshot) -> String {
    let num = |d: Option<Duration>, unit: fn(Duration) -> u128| {
        d.map_or_else(|| "null".into(), |d| unit(d).to_string())
    };
    let paths: Vec<String> = ha
        .paths
        .iter()
        .map(|p| {
            format!(
                "{{\"id\":{},\"local\":\"{}\",\"peer\":\"{}\",\"silent\":{},\"last-heard-ms\":{},\"rtt-us\":{}}}",
                p.id,
                p.local,
                p.peer,
                p.silent,
                num(p.last_heard, |d| d.as_millis()),
                num(p.rtt, |d| d.as_micros())
            )
        })
        .collect();
    format!(
        "{{\"gate\":\"{}\",\"answering\":{},\"lease-left-ms\":{},\"lease-lapses\":{},\"outdate-request\":{},\"peer-heard\":{},\"paths\":[{}],\"last-failover\":{},\"last-fence-peer\":{},\"witness\":{},\"ping-reach\":{},\"peer-ping-reach\":{},\"service-mac\":{},\"floating-ip\":{},\"floating-ip-held\":{}}}",
        ha.authority.map_or("-".into(), |a| a.to_string()),
        ha.answering,
        num(ha.lease_left, |d| d.as_millis()),
        ha.lease_lapses,
        ha.outdate_request,
        ha.peer_heard,
        paths.join(","),
        ha.last_failover
            .as_ref()
            .map_or_else(|| "null".into(), |l| format!("\"{}\"", esc(l))),
        ha.last_fence
            .as_ref()
            .map_or_else(|| "null".into(), |l| format!("\"{}\"", esc(l))),
        ha.witness
            .as_ref()
            .map_or_else(|| "null".into(), |l| format!("\"{}\"", esc(l))),
        ha.reach.0.map_or_else(|| "null".into(), |n| n.to_string()),
        ha.reach.1.map_or_else(|| "null".into(), |n| n.to_string()),
        ha.service_mac
            .map_or_else(|| "null".into(), |m| format!("\"{m}\"")),
        ha.floating_ip
            .map_or_else(|| "null".into(), |(ip, _)| format!("\"{ip}\"")),
        ha.floating_ip
            .and_then(|(_, held)| held)
            .map_or_else(|| "null".into(), |h| h.to_string()),
    )
}

/// Resync figures: remaining = the out-of-sync bytes now (both nodes see them fall).
fn figures(s: &Snapshot) -> ResyncFigures {
    ResyncFigures::of(s.resync_total, s.out_of_sync, s.resync_secs)
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The same as one JSON object.
pub fn status_json(name: &str, s: &Snapshot) -> String {
    let st = &s.status;
    let f = figures(s);
    let v = &s.verify;
    let vf = ResyncFigures::of(v.total, v.total.saturating_sub(v.done), v.secs);
    let ranges: Vec<String> = v
        .ranges
        .iter()
        .map(|(o, l)| format!("{{\"offset\":{o},\"length\":{l}}}"))
        .collect();
    format!(
        concat!(
            "{{\"name\":\"{}\",\"role\":\"{}\",\"disk\":\"{}\",\"detached\":{},",
            "\"peer\":{{\"name\":\"{}\",\"connection\":\"{}\",\"role\":\"{}\",",
            "\"replication\":\"{}\",\"peer-disk\":\"{}\"}},",
            "\"out-of-sync\":{},\"resync\":{{\"done-percent\":{:.2},\"rate-mbps\":{:.1},\"eta-seconds\":{:.0},",
            "\"total\":{},\"seconds\":{:.3}}},",
            "\"resync_sent\":{},\"resync_same\":{},\"resync_zero\":{},",
            "\"verify\":{{\"state\":\"{}\",\"runs\":{},\"done-percent\":{:.2},\"rate-mbps\":{:.1},",
            "\"seconds\":{:.3},\"out-of-sync-blocks\":{},\"ranges\":[{}]}},",
            "\"protocol\":\"{}\",\"durability\":\"{}\",\"csums\":\"{}\",\"size\":{},\"serving\":{},\"uuids\":\"{}\",",
            "\"io\":{{\"read\":{},\"written\":{},\"sent\":{},\"writes-marked\":{}}},\"ha\":{}}}"
        ),
        esc(name),
        st.role,
        st.disk,
        s.detached,
        esc(&s.peer),
        st.conn,
        st.peer_role,
        st.repl,
        st.peer_disk,
        s.out_of_sync,
        f.percent,
        f.rate_mbps,
        f.eta_secs,
        s.resync_total,
        s.resync_secs,
        s.resync_sent,
        s.resync_same,
        s.resync_zero,
        if v.running {
            "running"
        } else if v.failed {
            "failed"
        } else if v.runs > 0 {
            "finished"
        } else {
            "none"
        },
        v.runs,
        vf.percent,
        vf.rate_mbps,
        v.secs,
        v.blocks,
        ranges.join(","),
        s.protocol,
        s.durability,
        s.csums,
        s.size,
        st.serving,
        s.uuids,
        s.read_bytes,
        s.written_bytes,
        s.sent_bytes,
        s.writes_marked,
        ha_json(&s.ha)
    )
}

fn event_json(line: &str) -> String {
    format!("{{\"event\":\"{}\"}}", esc(line))
}

/// Client side: sends one request and prints the answer. Returns the exit status.
pub fn request(path: &Path, words: &[String]) -> i32 {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "twinblade: cannot reach the daemon at {}: {e} (is `twinblade run` running? --control selects another socket)",
                path.display()
            );
            return 3;
        }
    };
    if writeln!(stream, "{}", words.join(" ")).is_err() {
        eprintln!("twinblade: the daemon closed the control connection");
        return 3;
    }
    let reader = BufReader::new(stream);
    let stdout = std::io::stdout();
    let mut live = false;
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line == ".OK" {
            return 0;
        }
        if let Some(e) = line.strip_prefix(".ERR ") {
            if live {
                println!();
            }
            eprintln!("twinblade: {e}");
            return 1;
        }
        let mut lock = stdout.lock();
        if let Some(p) = line.strip_prefix(PROGRESS_PREFIX) {
            // One live line: back to its start, overwrite, clear the rest.
            live = true;
            if write!(lock, "\r{p}\x1b[K").is_err() {
                return 0;
            }
            let _ = lock.flush();
            continue;
        }
        let text = if live {
            live = false;
            format!("\r{line}\x1b[K")
        } else {
            line
        };
        if writeln!(lock, "{text}").is_err() {
            return 0;
        }
        let _ = lock.flush();
    }
    eprintln!("twinblade: the daemon closed the control connection");
    3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ConnState, DiskState, Role, Status};
    use crate::daemon::resource::VerifySnapshot;
    use crate::wire::repl::{Durability, ReplProtocol};

    fn snapshot() -> Snapshot {
        Snapshot {
            status: Status {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                conn: ConnState::Connected,
                repl: ReplState::SyncSource,
                peer_role: Role::Secondary,
                peer_disk: DiskState::Inconsistent,
                serving: true,
                degraded: false,
                crashed_primary: false,
                authority: crate::cluster::Authority::Lease,
                outdate_request: false,
                peer_heard: true,
                handover: None,
            },
            peer: "beta".into(),
            out_of_sync: 25 << 20,
            size: 1 << 30,
            detached: false,
            resync_total: 100 << 20,
            resync_done: 75 << 20,
            resync_secs: 2.0,
            resync_sent: 50 << 20,
            resync_same: 20 << 20,
            resync_zero: 5 << 20,
            verify: VerifySnapshot {
                runs: 1,
                total: 1 << 30,
                done: 1 << 30,
                secs: 0.5,
                blocks: 1,
                ranges: vec![(1_052_672, 4096)],
                ..VerifySnapshot::default()
            },
            read_bytes: 0,
            written_bytes: 0,
            sent_bytes: 0,
            writes_marked: 0,
            uuids: Default::default(),
            protocol: ReplProtocol::C,
            durability: Durability::Node,
            csums: crate::wire::repl::ChecksumAlg::Xxh3_128,
            ha: HaSnapshot {
                authority: Some(crate::cluster::Authority::Lease),
                answering: true,
                lease_left: Some(Duration::from_millis(480)),
                lease_lapses: 0,
                outdate_request: false,
                peer_heard: true,
                paths: vec![crate::daemon::resource::PathSnapshot {
                    id: 1,
                    local: "10.0.0.1".parse().unwrap(),
                    peer: "10.0.0.2".parse().unwrap(),
                    last_heard: Some(Duration::from_millis(120)),
                    rtt: Some(Duration::from_micros(85)),
                    silent: false,
                }],
                last_failover: Some(
                    "served: peer last heard 0.000s, declared lost +1.004s, first reply +1.900s"
                        .into(),
                ),
                last_fence: Some("fence-peer exit 7 (peer fenced) (vouched), 3.2s ago".into()),
                witness: None,
                reach: (Some(2), Some(1)),
                service_mac: Some(crate::wire::MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55])),
                floating_ip: Some(("10.77.0.100/24".parse().unwrap(), Some(true))),
            },
        }
    }

    #[test]
    fn the_socket_is_for_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        // As permissive as a umask gets, so the mode below is the server's doing.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.path().join("control.sock");
        let root =
            crate::supervisor::Root::new("control-test", CancellationToken::new(), 1).unwrap();
        let server = ControlServer::start(&path, Vec::new(), root.group("control")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "control socket mode {mode:o}");
        // Its owner still gets answers.
        let mut client = UnixStream::connect(&path).unwrap();
        writeln!(client, "status").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut client, &mut answer).unwrap();
        assert!(answer.lines().any(|l| l == ".OK"), "{answer:?}");
        server.stop();
        root.stop();
        assert!(!path.exists());
    }

    #[test]
    fn status_shows_resync_figures_and_verify_results() {
        let s = snapshot();
        let text = status_text("r0", &s);
        assert!(
            text.contains(
                "replication:SyncSource peer-disk:Inconsistent done:75.00% rate:39.3MB/s eta:1s"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "resync: total:102400KiB sent:51200KiB same:20480KiB zero:5120KiB in 2.0s"
            ),
            "{text}"
        );
        assert!(
            text.contains("verify:finished done:100.00%")
                && text.contains("out-of-sync-blocks:1 ranges:4096@1052672"),
            "{text}"
        );
        assert!(
            text.contains(
                "gate:lease answering:true lease-left:480ms lease-lapses:0 peer-heard:true"
            ) && text
                .contains("heartbeat path 1 10.0.0.1 -> 10.0.0.2: up last-heard:120ms rtt:85us"),
            "{text}"
        );
        assert!(
            text.contains("last failover: served: peer last heard 0.000s, declared lost +1.004s"),
            "{text}"
        );
        assert!(
            text.contains("service mac:02:11:22:33:44:55 floating-ip:10.77.0.100/24 held:true"),
            "{text}"
        );
        assert!(
            text.contains("last fence-peer: fence-peer exit 7 (peer fenced) (vouched), 3.2s ago"),
            "{text}"
        );
        let json = status_json("r0", &s);
        // The field names a benchmark reads.
        for field in [
            "\"resync_sent\":52428800,",
            "\"resync_same\":20971520,",
            "\"resync_zero\":5242880,",
            "\"done-percent\":75.00,",
            "\"eta-seconds\":1,",
            "\"out-of-sync-blocks\":1,",
            "\"ranges\":[{\"offset\":1052672,\"length\":4096}]",
            "\"state\":\"finished\"",
            "\"gate\":\"lease\",\"answering\":true,\"lease-left-ms\":480,",
            "\"paths\":[{\"id\":1,\"local\":\"10.0.0.1\",\"peer\":\"10.0.0.2\",\"silent\":false,\"last-heard-ms\":120,\"rtt-us\":85}]",
            "\"last-failover\":\"served: peer last heard 0.000s,",
            "\"last-fence-peer\":\"fence-peer exit 7 (peer fenced) (vouched), 3.2s ago\"",
            "\"service-mac\":\"02:11:22:33:44:55\",\"floating-ip\":\"10.77.0.100/24\",\"floating-ip-held\":true}",
        ] {
            assert!(json.contains(field), "{field} missing in {json}");
        }
        assert_eq!(json.matches('{').count(), json.matches('}').count());
    }
}
