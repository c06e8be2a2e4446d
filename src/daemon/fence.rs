//! The fence command (`[cluster] fence-peer`), run the way DRBD runs its fence-peer handler,
//! so that DRBD's scripts can be reused.
//!
//! * Run directly (no shell), its own process group, stdin from /dev/null, in the daemon's
//!   environment plus `TWINBLADE_RESOURCE`, `TWINBLADE_NODE`, `TWINBLADE_PEER` (the peer's
//!   node name), `TWINBLADE_PEER_ADDRESSES` (the peer's replication and heartbeat addresses,
//!   space-separated) and DRBD's `DRBD_RESOURCE` and `DRBD_PEER`.
//! * Its stdout and stderr go to the log, line by line, at most [`MAX_LINES`] lines of at most
//!   [`MAX_LINE`] bytes per run (the rest is counted).
//! * Exit 4 (peer outdated) and 7 (peer fenced: powered off) vouch for the peer; 5 (peer
//!   unreachable), any other code, a signal, or running past `fence-timeout` (its whole process
//!   group is then killed) do not. What the machine makes of it: [`crate::cluster::machine`]'s
//!   `vouch`.
//!
//! The engine runs it on a thread of the resource's crew and gets the outcome back as an input
//! (like the wire guard): the engine never waits for it.

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cluster::FenceOutcome;

/// Output lines logged per run, at most.
pub const MAX_LINES: usize = 20;
/// Bytes of one output line logged, at most.
pub const MAX_LINE: usize = 300;
/// How often a running command is looked at.
const POLL: Duration = Duration::from_millis(20);

/// What the fence command is and what it is told.
#[derive(Debug, Clone)]
pub struct FenceSpec {
    /// The command (an absolute path).
    pub command: PathBuf,
    /// How long it may run.
    pub timeout: Duration,
    /// The resource.
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// The peer's node name.
    pub peer: String,
    /// The peer's addresses: replication, then heartbeat paths (no duplicates).
    pub peer_addresses: Vec<IpAddr>,
}

impl FenceSpec {
    /// The environment the command gets on top of the daemon's.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        let addresses: Vec<String> = self.peer_addresses.iter().map(|a| a.to_string()).collect();
        vec![
            ("TWINBLADE_RESOURCE", self.resource.clone()),
            ("TWINBLADE_NODE", self.node.clone()),
            ("TWINBLADE_PEER", self.peer.clone()),
            ("TWINBLADE_PEER_ADDRESSES", addresses.join(" ")),
            ("DRBD_RESOURCE", self.resource.clone()),
            ("DRBD_PEER", self.peer.clone()),
        ]
    }
}

/// Runs the command to its end (or its timeout, or `stop`) and says how it ended.
pub fn run(spec: &FenceSpec, stop: &CancellationToken) -> FenceOutcome {
    let name = &spec.resource;
    let started = Instant::now();
    tracing::warn!(resource = %name, "running the fence command {} against {}", spec.command.display(), spec.peer);
    let mut child = match Command::new(&spec.command)
        .envs(spec.environment())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(resource = %name, "fence command {}: cannot run it: {e}", spec.command.display());
            return FenceOutcome::CouldNotRun;
        }
    };
    let pid = child.id() as i32;
    let logged = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(log_lines(out, "stdout", name.clone(), logged.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(log_lines(err, "stderr", name.clone(), logged.clone()));
    }
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break match (status.code(), status.signal()) {
                    (Some(code), _) => FenceOutcome::Exit(code),
                    (None, Some(signal)) => FenceOutcome::Signal(signal),
                    (None, None) => FenceOutcome::CouldNotRun,
                };
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(resource = %name, "fence command: cannot wait for it: {e}");
                kill_group(pid);
                let _ = child.wait();
                break FenceOutcome::CouldNotRun;
            }
        }
        if started.elapsed() >= spec.timeout || stop.is_cancelled() {
            kill_group(pid);
            let _ = child.wait();
            break FenceOutcome::TimedOut;
        }
        std::thread::sleep(POLL);
    };
    // The pipes close when the last process of the group is gone; a reader still blocked then
    // holds a pipe of a process that left the group: it is not waited for.
    for r in readers {
        if r.is_finished() {
            let _ = r.join();
        }
    }
    let took = started.elapsed();
    if outcome.vouches() {
        tracing::warn!(resource = %name, "{outcome} after {took:.1?}");
    } else {
        tracing::error!(resource = %name, "{outcome} after {took:.1?}");
    }
    outcome
}

/// SIGKILL to the command's whole process group (it leads it: `process_group(0)`).
#[allow(unsafe_code)]
fn kill_group(pid: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Logs what the command writes on one stream, line by line, within the run's budget.
fn log_lines(
    stream: impl Read + Send + 'static,
    which: &'static str,
    resource: String,
    logged: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        let mut dropped = 0usize;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if logged.fetch_add(1, Ordering::Relaxed) >= MAX_LINES {
                dropped += 1;
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            let cut = truncate(text, MAX_LINE);
            let more = if cut.len() < text.len() { " …" } else { "" };
            tracing::info!(resource = %resource, "fence command {which}: {cut}{more}");
        }
        if dropped > 0 {
            tracing::info!(resource = %resource, "fence command {which}: {dropped} more line(s) not logged");
        }
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("fence");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn spec(command: PathBuf, timeout: Duration) -> FenceSpec {
        FenceSpec {
            command,
            timeout,
            resource: "r0".into(),
            node: "alpha".into(),
            peer: "beta".into(),
            peer_addresses: vec!["192.168.1.2".parse().unwrap(), "10.0.0.2".parse().unwrap()],
        }
    }

    #[test]
    fn exit_codes_signals_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let token = CancellationToken::new();
        for (body, outcome) in [
            ("exit 7", FenceOutcome::Exit(7)),
            ("exit 4", FenceOutcome::Exit(4)),
            ("exit 5", FenceOutcome::Exit(5)),
            ("echo garbage; exit 1", FenceOutcome::Exit(1)),
            ("kill -TERM $$", FenceOutcome::Signal(15)),
        ] {
            let s = spec(script(dir.path(), body), Duration::from_secs(30));
            assert_eq!(run(&s, &token), outcome, "{body}");
        }
        // The environment, checked by the script itself: exit 4 only if all of it is there.
        let body = r#"[ "$TWINBLADE_RESOURCE" = r0 ] && [ "$DRBD_RESOURCE" = r0 ] &&
[ "$TWINBLADE_PEER" = beta ] && [ "$DRBD_PEER" = beta ] && [ "$TWINBLADE_NODE" = alpha ] &&
[ "$TWINBLADE_PEER_ADDRESSES" = "192.168.1.2 10.0.0.2" ] && exit 4
exit 1"#;
        let s = spec(script(dir.path(), body), Duration::from_secs(30));
        assert_eq!(run(&s, &token), FenceOutcome::Exit(4));
        let missing = spec(dir.path().join("missing"), Duration::from_secs(1));
        assert_eq!(run(&missing, &token), FenceOutcome::CouldNotRun);
    }

    #[test]
    fn past_the_timeout_the_whole_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-alive");
        // A child in the background that would outlive its parent, and the parent hanging.
        let body = format!("(sleep 2; touch {}) &\nsleep 30\nexit 7", marker.display());
        let s = spec(script(dir.path(), &body), Duration::from_millis(300));
        assert_eq!(run(&s, &CancellationToken::new()), FenceOutcome::TimedOut);
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "the background child was killed with the group"
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééé", 3), "é");
    }
}
