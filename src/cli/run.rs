//! `twinblade run`: starts the daemon in the foreground and turns how it ended into an exit
//! status. The daemon itself, and its arguments, are [`crate::daemon`]. Also
//! `twinblade release-ips`, which takes back what a daemon killed while serving left in the
//! kernel (its floating IPs), for a service manager's stop hook.

use super::exit::{cancel_on_signal, ExitCode};
use crate::daemon::{RunArgs, RunError};

/// Runs the daemon until SIGINT or SIGTERM; returns the exit status.
pub fn run(args: RunArgs) -> i32 {
    let cancel = match cancel_on_signal() {
        Ok(cancel) => cancel,
        Err(code) => return code as i32,
    };
    match crate::daemon::run(args, cancel) {
        Ok(()) => ExitCode::Ok as i32,
        Err(e @ RunError::Config(_)) => {
            eprintln!("twinblade run: {e}");
            ExitCode::Usage as i32
        }
        Err(e) => {
            eprintln!("twinblade run: {e}");
            ExitCode::Failure as i32
        }
    }
}

/// `twinblade release-ips`: removes every floating IP of the configuration from this node's
/// client interface where it is still held (a daemon killed while serving leaves it there).
/// Refuses while a daemon of this node answers on the control socket: a running daemon owns
/// its addresses.
pub fn release_ips(args: RunArgs) -> i32 {
    let config = match crate::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinblade release-ips: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let node = match config.this_node(args.node.as_deref()) {
        Ok(n) => n.to_string(),
        Err(e) => {
            eprintln!("twinblade release-ips: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let control = crate::daemon::control_path(args.control);
    if std::os::unix::net::UnixStream::connect(&control).is_ok() {
        eprintln!(
            "twinblade release-ips: a daemon answers on {}; it owns its addresses (stop it first)",
            control.display()
        );
        return ExitCode::Failure as i32;
    }
    let interface = &config.nodes[&node].interface;
    let mut code = ExitCode::Ok;
    for (name, res) in &config.resources {
        let Some(ip) = res.floating_ip() else {
            continue;
        };
        match crate::net::address::remove(interface, &ip) {
            Ok(crate::net::address::Removed::Removed) => {
                println!("{name}: removed {ip} from {interface}")
            }
            Ok(crate::net::address::Removed::WasNotThere) => {
                println!("{name}: {ip} not on {interface}")
            }
            Err(e) => {
                eprintln!("twinblade release-ips: {name}: {e}");
                code = ExitCode::Failure;
            }
        }
    }
    code as i32
}
