//! `twinblade run`: starts the daemon in the foreground and turns how it ended into an exit
//! status. The daemon itself, and its arguments, are [`crate::daemon`].

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
