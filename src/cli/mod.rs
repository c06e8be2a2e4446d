//! The command line: the one place that parses arguments, sets up logging and starts servers.
//!
//! This file holds the clap top level and the dispatch; each subcommand's arguments and what it
//! runs live in a file of their own, over the library parts they use:
//!
//! * [`aoe`]: `vblade` (vblade's own command line) and `aoe` (several blades, one process).
//! * [`nbd`]: `nbd`, a qemu-nbd-like NBD front end.
//! * [`md`]: `create-md` and `dump-md`, a resource's meta-data.
//! * [`run`]: `run`, the daemon in the foreground.
//! * [`check`]: `check-config`, the configuration validated without running it.
//! * [`ctl`]: the verbs a running daemon answers (`status`, `primary`, `connect`, …).
//! * [`witness`]: `witness`, the third vote on another machine, and `witness-ask`.
//! * [`exit`]: the exit codes they all return.

pub mod aoe;
pub mod check;
pub mod ctl;
pub mod exit;
pub mod md;
pub mod nbd;
pub mod run;
pub mod witness;

use clap::{Parser, Subcommand};

use aoe::{AoeArgs, VbladeArgs};
use ctl::{ConnectArgs, EventsArgs, FaultArgs, PrimaryArgs, ResArgs, StatusArgs, WaitArgs};
use md::{CreateMdArgs, DumpMdArgs};
use nbd::NbdArgs;

/// twinblade: highly available SAN appliance (replicated block device, AoE and NBD targets).
#[derive(Debug, Parser)]
#[command(name = "twinblade", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one file or device over AoE with vblade's command line.
    ///
    /// `twinblade vblade [-b bufcnt] [-d] [-s] [-r] [-m mac[,mac..]] [-o offset] [-l length]
    /// SHELF SLOT NETIF FILENAME`. Offsets and lengths are in 512-byte sectors. Only `-b`
    /// differs from vblade: it defaults to 64, the Linux driver's window.
    Vblade(VbladeArgs),
    /// Serve several blades from one process: `twinblade aoe e0.3@eth0=/path e0.4@eth0,eth1=/dev/sdb`.
    Aoe(AoeArgs),
    /// Serve one file or device over NBD, like qemu-nbd.
    Nbd(NbdArgs),
    /// Write fresh meta-data (superblock, activity log, bitmap) for a resource, like `drbdadm create-md`.
    CreateMd(CreateMdArgs),
    /// Print a resource's meta-data, like `drbdadm dump-md`.
    DumpMd(DumpMdArgs),
    /// Run the node: replicate, fail over, serve AoE/NBD while primary (foreground).
    Run(crate::daemon::RunArgs),
    /// Validate the configuration for this node and its peer and print the effective settings,
    /// like `drbdadm dump` / `keepalived -t`; starts and changes nothing. Exit status: 0 valid,
    /// 1 this machine does not fit it, 2 the file is invalid.
    CheckConfig(check::CheckConfigArgs),
    /// Remove this node's floating IPs a killed daemon left on its interface (a service
    /// manager's stop hook; refused while the daemon runs).
    ReleaseIps(crate::daemon::RunArgs),
    /// Roles, connection and disk states, out-of-sync bytes, resync progress, I/O counters.
    Status(StatusArgs),
    /// A stream of state changes, like `drbdsetup events2`.
    Events(EventsArgs),
    /// Promote to primary (serve the device). `--force` accepts data that is not UpToDate.
    Primary(PrimaryArgs),
    /// Demote to secondary: stop serving first.
    Secondary(ResArgs),
    /// Connect to the peer again; `--discard-my-data` loses a split brain on purpose.
    Connect(ConnectArgs),
    /// Leave the peer (StandAlone) until `connect`.
    Disconnect(ResArgs),
    /// Throw away the local data and resync all of it from the peer.
    Invalidate(ResArgs),
    /// Resync all of the peer's data from here.
    InvalidateRemote(ResArgs),
    /// Pause a running resync.
    PauseSync(ResArgs),
    /// Persist Outdated on a Secondary not connected to a Primary (like `drbdadm outdate`): it
    /// will not promote itself until it resyncs from the peer. What a peer's fence command
    /// (appliance/fence/fence-peer-ask) asks for over another path. Refused on a Primary.
    Outdate(ResArgs),
    /// Planned switchover: the primary drains and demotes, the connected UpToDate peer
    /// promotes, the service (MAC, floating IP, NBD) moves; nothing acknowledged is lost.
    /// Run on either node; prints how long the move took
    Switchover(ResArgs),
    /// Resume a paused resync; `--wait` shows its progress (done, MB/s, ETA) until it ends.
    ResumeSync(WaitArgs),
    /// Online verify: compare the crc32c of every 4 KiB block with the peer's, report the
    /// ranges that differ and resync them. Needs a connected pair with both disks UpToDate.
    Verify(WaitArgs),
    /// Test hook: make the data disk slow or failing (`write-delay-ms=N`, `write-error`,
    /// `read-error`, `clear`); needs a daemon started with TWINBLADE_TEST_FAULTS=1. Or cut the
    /// node's power (`power-cut [keep-subset SEED]`); needs TWINBLADE_TEST_POWER_CUT=1.
    #[command(hide = true)]
    Fault(FaultArgs),
    /// Run a witness for one or more pairs (on a third machine): grants the right to serve a
    /// resource alone to at most one node per data generation, and remembers it.
    Witness(witness::WitnessArgs),
    /// Ask a witness who holds a resource's grant for a generation (`--claim` claims it).
    /// Exit status: 0 granted or free, 1 held by another node or no answer.
    WitnessAsk(witness::WitnessAskArgs),
}

/// Parses the process arguments, runs the subcommand and returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match cli.command {
        Command::Vblade(args) => aoe::run_vblade(args),
        Command::Aoe(args) => aoe::run_aoe(args),
        Command::Nbd(args) => nbd::run(args),
        Command::CreateMd(args) => md::run_create_md(args),
        Command::DumpMd(args) => md::run_dump_md(args),
        Command::Run(args) => run::run(args),
        Command::CheckConfig(args) => check::run(args),
        Command::ReleaseIps(args) => run::release_ips(args),
        Command::Status(a) => ctl::request("status", &a.res, &[("--json", a.json)]),
        Command::Events(a) => ctl::request("events", &a.res, &[("--json", a.json)]),
        Command::Primary(a) => ctl::request("primary", &a.res, &[("--force", a.force)]),
        Command::Secondary(a) => ctl::request("secondary", &a, &[]),
        Command::Connect(a) => ctl::request(
            "connect",
            &a.res,
            &[("--discard-my-data", a.discard_my_data)],
        ),
        Command::Disconnect(a) => ctl::request("disconnect", &a, &[]),
        Command::Invalidate(a) => ctl::request("invalidate", &a, &[]),
        Command::InvalidateRemote(a) => ctl::request("invalidate-remote", &a, &[]),
        Command::PauseSync(a) => ctl::request("pause-sync", &a, &[]),
        Command::Outdate(a) => ctl::request("outdate", &a, &[]),
        Command::Switchover(a) => ctl::request("switchover", &a, &[]),
        Command::ResumeSync(a) => ctl::request("resume-sync", &a.res, &[("--wait", a.wait)]),
        Command::Verify(a) => ctl::request("verify", &a.res, &[("--wait", a.wait)]),
        Command::Fault(a) => ctl::fault(a),
        Command::Witness(a) => witness::run(a),
        Command::WitnessAsk(a) => witness::ask_once(a),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vblade_command_line_parses_like_vblade() {
        let cli = Cli::try_parse_from([
            "twinblade",
            "vblade",
            "-b",
            "16",
            "-d",
            "-s",
            "-r",
            "-m",
            "00:11:22:33:44:55,001122334466",
            "-o",
            "0x10",
            "-l",
            "2048",
            "0",
            "3",
            "eth0:0",
            "/dev/drbd0",
        ])
        .unwrap();
        let Command::Vblade(args) = cli.command else {
            panic!("not vblade")
        };
        assert_eq!(args.bufcnt, 16);
        assert!(args.direct && args.sync && args.read_only);
        assert_eq!(args.mask.len(), 2);
        assert_eq!(args.offset, 16);
        assert_eq!(args.length, Some(2048));
        assert_eq!((args.shelf, args.slot), (0, 3));
        assert_eq!(aoe::base_interface(&args.netif), "eth0");
    }

    #[test]
    fn vblade_defaults_to_64_buffers() {
        let cli = Cli::try_parse_from(["twinblade", "vblade", "0", "3", "eth0", "f"]).unwrap();
        let Command::Vblade(args) = cli.command else {
            panic!("not vblade")
        };
        assert_eq!(args.bufcnt, 64);
    }

    #[test]
    fn vblade_rejects_bad_arguments() {
        for bad in [
            vec!["twinblade", "vblade", "0", "3", "eth0"],
            vec!["twinblade", "vblade", "-b", "0", "0", "3", "eth0", "f"],
            vec!["twinblade", "vblade", "65535", "3", "eth0", "f"],
            vec!["twinblade", "vblade", "0", "255", "eth0", "f"],
            vec![
                "twinblade",
                "vblade",
                "-m",
                "nonsense",
                "0",
                "3",
                "eth0",
                "f",
            ],
            vec!["twinblade", "vblade", "-o", "-1", "0", "3", "eth0", "f"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
