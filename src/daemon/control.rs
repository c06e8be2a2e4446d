//! The control socket: a Unix stream socket the CLI verbs talk to.
//!
//! Protocol: the client sends one line, `VERB [RESOURCE] [FLAGS…]`; the server answers with
//! lines of output and a last line `.OK` or `.ERR message`. `events` streams lines until the
//! client hangs up. The path is selectable (`--control`, `$TWINBLADE_CONTROL`) so two nodes can
//! run on one machine.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::{Command, ReplState};

use super::resource::{Input, Resource, Snapshot};

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    cancel: CancellationToken,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and serves requests for `resources`.
    pub fn start(
        path: &Path,
        resources: Vec<Arc<Resource>>,
        parent: CancellationToken,
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
        listener.set_nonblocking(true)?;
        let cancel = parent.child_token();
        let token = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !token.is_cancelled() {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let resources = resources.clone();
                            let token = token.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-client".into())
                                .spawn(move || serve(stream, &resources, &token));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            cancel,
            thread,
        })
    }

    /// Stops accepting and removes the socket.
    pub fn stop(self) {
        self.cancel.cancel();
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, resources: &[Arc<Resource>], cancel: &CancellationToken) {
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
    let result = handle(&words, resources, &mut out, cancel);
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
    cancel: &CancellationToken,
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
            while !cancel.is_cancelled() {
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
        "resume-sync" => Command::ResumeSync,
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
        let (pct, rate, eta) = progress(s);
        t += &format!(" done:{pct:.2}% rate:{rate:.1}MB/s eta:{eta:.0}s");
    }
    t += &format!(" out-of-sync:{}KiB\n", s.out_of_sync / 1024);
    t += &format!(
        "  protocol:{} durability:{} size:{} serving:{} uuids:{}\n",
        s.protocol, s.durability, s.size, st.serving, s.uuids
    );
    t += &format!(
        "  read:{}KiB written:{}KiB sent:{}KiB writes-marked-out-of-sync:{}",
        s.read_bytes / 1024,
        s.written_bytes / 1024,
        s.sent_bytes / 1024,
        s.writes_marked
    );
    t
}

fn progress(s: &Snapshot) -> (f64, f64, f64) {
    let remaining = s.out_of_sync as f64;
    let total = (s.resync_total as f64).max(remaining).max(1.0);
    let pct = 100.0 * (1.0 - remaining / total);
    let rate = if s.resync_secs > 0.0 {
        s.resync_done as f64 / s.resync_secs / 1e6
    } else {
        0.0
    };
    let eta = if rate > 0.0 {
        remaining / 1e6 / rate
    } else {
        0.0
    };
    (pct, rate, eta)
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The same as one JSON object.
pub fn status_json(name: &str, s: &Snapshot) -> String {
    let st = &s.status;
    let (pct, rate, eta) = progress(s);
    format!(
        concat!(
            "{{\"name\":\"{}\",\"role\":\"{}\",\"disk\":\"{}\",\"detached\":{},",
            "\"peer\":{{\"name\":\"{}\",\"connection\":\"{}\",\"role\":\"{}\",",
            "\"replication\":\"{}\",\"peer-disk\":\"{}\"}},",
            "\"out-of-sync\":{},\"resync\":{{\"done-percent\":{:.2},\"rate-mbps\":{:.1},\"eta-seconds\":{:.0}}},",
            "\"protocol\":\"{}\",\"durability\":\"{}\",\"size\":{},\"serving\":{},\"uuids\":\"{}\",",
            "\"io\":{{\"read\":{},\"written\":{},\"sent\":{},\"writes-marked\":{}}}}}"
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
        pct,
        rate,
        eta,
        s.protocol,
        s.durability,
        s.size,
        st.serving,
        s.uuids,
        s.read_bytes,
        s.written_bytes,
        s.sent_bytes,
        s.writes_marked
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
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line == ".OK" {
            return 0;
        }
        if let Some(e) = line.strip_prefix(".ERR ") {
            eprintln!("twinblade: {e}");
            return 1;
        }
        let mut lock = stdout.lock();
        if writeln!(lock, "{line}").is_err() {
            return 0;
        }
        let _ = lock.flush();
    }
    eprintln!("twinblade: the daemon closed the control connection");
    3
}
