//! The drbdadm-style verbs (`status`, `primary`, `connect`, …): their arguments, and the one
//! request each sends to a running `twinblade run` over its control socket.

use std::path::PathBuf;

use crate::daemon::{control, control_path};

/// A resource (all if omitted) and the control socket.
#[derive(Debug, Clone, clap::Args)]
pub struct ResArgs {
    /// Resource name (default: all).
    pub res: Option<String>,
    /// Control socket (default: $TWINBLADE_CONTROL, else /run/twinblade/control.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

/// `status [RES] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub(super) res: ResArgs,
    /// One JSON array of objects.
    #[arg(long)]
    pub(super) json: bool,
}

/// `events [RES] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub(super) res: ResArgs,
    /// One JSON object per line.
    #[arg(long)]
    pub(super) json: bool,
}

/// `resume-sync|verify [RES] [--wait]`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub(super) res: ResArgs,
    /// Show progress on one line until it ends; exit status 1 if the connection drops first.
    #[arg(long)]
    pub(super) wait: bool,
}

/// `primary [RES] [--force]`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub(super) res: ResArgs,
    /// Accept data that is not UpToDate (the first promotion after create-md).
    #[arg(long)]
    pub(super) force: bool,
}

/// `connect [RES] [--discard-my-data]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub(super) res: ResArgs,
    /// This node loses the split brain: its changes are overwritten by the peer's.
    #[arg(long)]
    pub(super) discard_my_data: bool,
}

/// `fault RES SPEC...`.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultArgs {
    /// Resource name.
    res: String,
    /// Faults to set.
    #[arg(required = true)]
    specs: Vec<String>,
    /// Control socket.
    #[arg(long)]
    control: Option<PathBuf>,
}

/// Sends `VERB [RES] [FLAGS]` (the flags that are set) to the daemon; returns the exit status.
pub fn request(verb: &str, res: &ResArgs, flags: &[(&str, bool)]) -> i32 {
    let mut words = vec![verb.to_string()];
    words.extend(res.res.clone());
    words.extend(flags.iter().filter(|f| f.1).map(|f| f.0.to_string()));
    control::request(&control_path(res.control.clone()), &words)
}

/// Sends `fault RES SPEC...` to the daemon; returns the exit status.
pub fn fault(args: FaultArgs) -> i32 {
    let mut words = vec!["fault".to_string(), args.res];
    words.extend(args.specs);
    control::request(&control_path(args.control), &words)
}
