//! `switchover RES`: asks the engine for a planned switchover (see
//! [`crate::cluster::machine`]'s `switchover`) and waits until the other node serves, or this
//! one, printing how long the move took: the pause a client sees is at most that.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Authority, Command, Role, HANDOVER_TIMEOUT};

use super::super::resource::Resource;
use super::{send_command, Client};

/// How long past the machine's own handover timeout the verb waits for the outcome.
const GRACE: Duration = Duration::from_secs(5);

/// Runs `switchover` for each target, one after the other.
pub(super) fn switchover(
    targets: &[&Arc<Resource>],
    out: &mut UnixStream,
    client: &Client,
) -> Result<(), String> {
    for r in targets {
        one(r, out, client).map_err(|e| format!("{}: {e}", r.spec.name))?;
    }
    Ok(())
}

fn one(r: &Resource, out: &mut UnixStream, client: &Client) -> Result<(), String> {
    let name = &r.spec.name;
    let (local, peer) = (&r.spec.identity.local, &r.spec.identity.peer);
    let was_primary = r.snapshot().status.role == Role::Primary;
    let (from, to) = if was_primary {
        (local, peer)
    } else {
        (peer, local)
    };
    let start = Instant::now();
    send_command(r, Command::Switchover)?;
    let mut stopped_serving = None;
    loop {
        if client.stopping() {
            return Err("the daemon is stopping".into());
        }
        let s = r.snapshot().status;
        let waited = start.elapsed();
        if was_primary {
            if !s.serving && stopped_serving.is_none() {
                stopped_serving = Some(waited);
            }
            if s.handover.is_none() {
                if s.role == Role::Primary {
                    return Err(format!(
                        "{peer} did not take over; {local} is primary again (see the log)"
                    ));
                }
                if s.peer_role == Role::Primary {
                    let stop = stopped_serving.unwrap_or(waited);
                    return writeln!(
                        out,
                        "{name}: switchover {from} -> {to}: {from} stopped serving after {:.3} s, {to} primary after {:.3} s",
                        stop.as_secs_f64(),
                        waited.as_secs_f64()
                    )
                    .map_err(|e| e.to_string());
                }
            }
        } else if s.role == Role::Primary && s.serving && s.authority != Authority::Closed {
            return writeln!(
                out,
                "{name}: switchover {from} -> {to}: {to} serving after {:.3} s",
                waited.as_secs_f64()
            )
            .map_err(|e| e.to_string());
        } else if s.handover.is_none() && waited > Duration::from_millis(500) {
            return Err(format!(
                "{from} did not hand over (role {}, peer {}; see the log)",
                s.role, s.peer_role
            ));
        }
        if waited > HANDOVER_TIMEOUT + GRACE {
            return Err(format!(
                "no outcome after {} s (role {}, peer {})",
                waited.as_secs(),
                s.role,
                s.peer_role
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
