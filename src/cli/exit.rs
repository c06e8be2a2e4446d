//! The process exit codes every subcommand returns, and the signal hook of the ones that serve
//! until stopped.

use tokio_util::sync::CancellationToken;

/// Process exit codes. `check-config` uses them so: 0 valid, 1 the file is valid but this
/// machine does not fit it (an interface, address, disk or secret file), 2 the file is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// Clean exit.
    Ok = 0,
    /// A runtime failure (device, network).
    Failure = 1,
    /// Bad command line or configuration.
    Usage = 2,
}

/// A token that SIGINT or SIGTERM cancels; `Err` (already reported) if the handler cannot be
/// installed.
pub fn cancel_on_signal() -> Result<CancellationToken, ExitCode> {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    if let Err(err) = ctrlc::set_handler(move || on_signal.cancel()) {
        eprintln!("twinblade: cannot install signal handler: {err}");
        return Err(ExitCode::Failure);
    }
    Ok(cancel)
}
