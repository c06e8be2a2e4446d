//! The command line: subcommands, their arguments, and what each one runs.
//!
//! `twinblade vblade ...` takes exactly vblade's arguments so an existing setup can swap the
//! binary; `twinblade aoe ...` serves several blades from one process; `twinblade nbd ...`
//! is a qemu-nbd-like NBD front end; `create-md` / `dump-md` manage a resource's meta-data.

use crate::block::{BlockDevice, OpenOptions, SECTOR_SIZE};
use crate::export::aoe::{AoeServer, BladeConfig, Export};
use crate::wire::MacAddr;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Process exit codes.
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
    Nbd(crate::export::nbd::cli::NbdArgs),
    /// Write fresh meta-data (superblock, activity log, bitmap) for a resource, like `drbdadm create-md`.
    CreateMd(crate::meta::cli::CreateMdArgs),
    /// Print a resource's meta-data, like `drbdadm dump-md`.
    DumpMd(crate::meta::cli::DumpMdArgs),
    /// Run the node: replicate, fail over, serve AoE/NBD while primary (foreground).
    Run(crate::daemon::RunArgs),
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
    res: ResArgs,
    /// One JSON array of objects.
    #[arg(long)]
    json: bool,
}

/// `events [RES] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    res: ResArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// `resume-sync|verify [RES] [--wait]`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    #[command(flatten)]
    res: ResArgs,
    /// Show progress on one line until it ends; exit status 1 if the connection drops first.
    #[arg(long)]
    wait: bool,
}

/// `primary [RES] [--force]`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    res: ResArgs,
    /// Accept data that is not UpToDate (the first promotion after create-md).
    #[arg(long)]
    force: bool,
}

/// `connect [RES] [--discard-my-data]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    res: ResArgs,
    /// This node loses the split brain: its changes are overwritten by the peer's.
    #[arg(long)]
    discard_my_data: bool,
}

fn control_request(verb: &str, res: &ResArgs, flags: &[(&str, bool)]) -> i32 {
    let mut words = vec![verb.to_string()];
    words.extend(res.res.clone());
    words.extend(flags.iter().filter(|f| f.1).map(|f| f.0.to_string()));
    crate::daemon::control::request(&crate::daemon::control_path(res.control.clone()), &words)
}

fn run_daemon(args: crate::daemon::RunArgs) -> i32 {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    if let Err(err) = ctrlc::set_handler(move || on_signal.cancel()) {
        eprintln!("twinblade: cannot install signal handler: {err}");
        return ExitCode::Failure as i32;
    }
    match crate::daemon::run(args, cancel) {
        Ok(()) => ExitCode::Ok as i32,
        Err(e @ crate::daemon::RunError::Config(_)) => {
            eprintln!("twinblade run: {e}");
            ExitCode::Usage as i32
        }
        Err(e) => {
            eprintln!("twinblade run: {e}");
            ExitCode::Failure as i32
        }
    }
}

/// vblade's arguments.
#[derive(Debug, clap::Args)]
pub struct VbladeArgs {
    /// Buffer count advertised to initiators (outstanding frames the target queues).
    #[arg(short = 'b', default_value_t = crate::export::aoe::blade::DEFAULT_BUFFER_COUNT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub bufcnt: u16,
    /// Open the backing store with O_DIRECT.
    #[arg(short = 'd')]
    pub direct: bool,
    /// Open the backing store with O_SYNC.
    #[arg(short = 's')]
    pub sync: bool,
    /// Read-only: writes are refused.
    #[arg(short = 'r')]
    pub read_only: bool,
    /// Only answer these initiator MACs (comma-separated; vblade allows up to 32).
    #[arg(short = 'm', value_delimiter = ',')]
    pub mask: Vec<MacAddr>,
    /// Start of the exported range in the backing store, in sectors.
    #[arg(short = 'o', default_value_t = 0, value_parser = parse_c_integer)]
    pub offset: u64,
    /// Length of the exported range, in sectors (default: to the end).
    #[arg(short = 'l', value_parser = parse_c_integer)]
    pub length: Option<u64>,
    /// Shelf (major) address, 0..65534.
    #[arg(value_parser = clap::value_parser!(u16).range(0..0xFFFF))]
    pub shelf: u16,
    /// Slot (minor) address, 0..254.
    #[arg(value_parser = clap::value_parser!(u8).range(0..0xFF))]
    pub slot: u8,
    /// Network interface (an alias label such as `eth0:0` means its base interface).
    pub netif: String,
    /// Backing file or block device.
    pub filename: PathBuf,
}

/// Arguments of `twinblade aoe`.
#[derive(Debug, clap::Args)]
pub struct AoeArgs {
    /// Buffer count advertised by every blade.
    #[arg(short = 'b', long = "bufcnt", default_value_t = crate::export::aoe::blade::DEFAULT_BUFFER_COUNT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub bufcnt: u16,
    /// Open backing stores with O_DIRECT.
    #[arg(short = 'd', long)]
    pub direct: bool,
    /// Open backing stores with O_SYNC.
    #[arg(short = 's', long)]
    pub sync: bool,
    /// Export read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Exports as `eSHELF.SLOT@IFACE[,IFACE..]=PATH`.
    #[arg(required = true, value_parser = parse_export_spec)]
    pub exports: Vec<ExportSpec>,
}

/// One `eS.L@ifaces=path` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// Interfaces.
    pub interfaces: Vec<String>,
    /// Backing store.
    pub path: PathBuf,
}

/// Parses an integer the way C's `strtoll(s, _, 0)` does: decimal, `0x` hex or `0` octal.
fn parse_c_integer(s: &str) -> Result<u64, String> {
    let parsed = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8)
    } else {
        s.parse()
    };
    parsed.map_err(|e| format!("{s:?} is not a non-negative integer: {e}"))
}

/// Parses `eS.L` into shelf and slot.
pub fn parse_blade_name(name: &str) -> Result<(u16, u8), String> {
    let bad = || format!("{name:?} is not a blade name like e0.3 (shelf 0..65534, slot 0..254)");
    let rest = name.strip_prefix('e').ok_or_else(bad)?;
    let (shelf, slot) = rest.split_once('.').ok_or_else(bad)?;
    let shelf: u16 = shelf.parse().map_err(|_| bad())?;
    let slot: u8 = slot.parse().map_err(|_| bad())?;
    if shelf == 0xFFFF || slot == 0xFF {
        return Err(bad());
    }
    Ok((shelf, slot))
}

fn parse_export_spec(s: &str) -> Result<ExportSpec, String> {
    let form = "expected eSHELF.SLOT@IFACE[,IFACE..]=PATH";
    let (name, rest) = s.split_once('@').ok_or_else(|| format!("{s:?}: {form}"))?;
    let (ifaces, path) = rest
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: {form}"))?;
    let (shelf, slot) = parse_blade_name(name)?;
    let interfaces: Vec<String> = ifaces.split(',').map(base_interface).collect();
    if interfaces.iter().any(|i| i.is_empty()) || path.is_empty() {
        return Err(format!("{s:?}: {form}"));
    }
    Ok(ExportSpec {
        shelf,
        slot,
        interfaces,
        path: PathBuf::from(path),
    })
}

/// `eth0:0` (an old-style alias label) names the interface `eth0`, as the kernel's ioctls do.
fn base_interface(name: &str) -> String {
    name.split(':').next().unwrap_or(name).to_string()
}

/// Parses the process arguments, runs the subcommand and returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match cli.command {
        Command::Vblade(args) => run_vblade(args),
        Command::Aoe(args) => run_aoe(args),
        Command::Nbd(args) => crate::export::nbd::cli::run(args),
        Command::CreateMd(args) => crate::meta::cli::run_create_md(args),
        Command::DumpMd(args) => crate::meta::cli::run_dump_md(args),
        Command::Run(args) => run_daemon(args),
        Command::Status(a) => control_request("status", &a.res, &[("--json", a.json)]),
        Command::Events(a) => control_request("events", &a.res, &[("--json", a.json)]),
        Command::Primary(a) => control_request("primary", &a.res, &[("--force", a.force)]),
        Command::Secondary(a) => control_request("secondary", &a, &[]),
        Command::Connect(a) => control_request(
            "connect",
            &a.res,
            &[("--discard-my-data", a.discard_my_data)],
        ),
        Command::Disconnect(a) => control_request("disconnect", &a, &[]),
        Command::Invalidate(a) => control_request("invalidate", &a, &[]),
        Command::InvalidateRemote(a) => control_request("invalidate-remote", &a, &[]),
        Command::PauseSync(a) => control_request("pause-sync", &a, &[]),
        Command::ResumeSync(a) => control_request("resume-sync", &a.res, &[("--wait", a.wait)]),
        Command::Verify(a) => control_request("verify", &a.res, &[("--wait", a.wait)]),
        Command::Fault(a) => {
            let mut words = vec!["fault".to_string(), a.res];
            words.extend(a.specs);
            crate::daemon::control::request(&crate::daemon::control_path(a.control), &words)
        }
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

fn run_vblade(args: VbladeArgs) -> i32 {
    let device = match OpenOptions::new()
        .read_only(args.read_only)
        .direct(args.direct)
        .sync(args.sync)
        .offset_sectors(args.offset)
        .length_sectors(args.length)
        .open(&args.filename)
    {
        Ok(device) => device,
        Err(err) => {
            eprintln!("twinblade vblade: {err}");
            return ExitCode::Failure as i32;
        }
    };
    let sectors = device.size() / SECTOR_SIZE;
    let mut config = BladeConfig::new(args.shelf, args.slot);
    config.buffer_count = args.bufcnt;
    config.mask = args.mask;
    let export = Export {
        config,
        device: Arc::new(device),
        interfaces: vec![base_interface(&args.netif)],
    };
    // vblade's start-up line; scripts wait for it.
    println!(
        "pid {}: e{}.{}, {} sectors {}",
        std::process::id(),
        args.shelf,
        args.slot,
        sectors,
        if args.read_only { "O_RDONLY" } else { "O_RDWR" }
    );
    serve_aoe(vec![export])
}

fn run_aoe(args: AoeArgs) -> i32 {
    let mut exports = Vec::new();
    for spec in args.exports {
        let device = match OpenOptions::new()
            .read_only(args.read_only)
            .direct(args.direct)
            .sync(args.sync)
            .open(&spec.path)
        {
            Ok(device) => device,
            Err(err) => {
                eprintln!("twinblade aoe: e{}.{}: {err}", spec.shelf, spec.slot);
                return ExitCode::Failure as i32;
            }
        };
        let mut config = BladeConfig::new(spec.shelf, spec.slot);
        config.buffer_count = args.bufcnt;
        eprintln!(
            "twinblade aoe: e{}.{} on {} from {} ({} sectors)",
            spec.shelf,
            spec.slot,
            spec.interfaces.join(","),
            spec.path.display(),
            device.size() / SECTOR_SIZE
        );
        exports.push(Export {
            config,
            device: Arc::new(device) as Arc<dyn BlockDevice>,
            interfaces: spec.interfaces,
        });
    }
    serve_aoe(exports)
}

/// Serves until SIGINT/SIGTERM.
fn serve_aoe(exports: Vec<Export>) -> i32 {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    if let Err(err) = ctrlc::set_handler(move || on_signal.cancel()) {
        eprintln!("twinblade: cannot install signal handler: {err}");
        return ExitCode::Failure as i32;
    }
    let server = match AoeServer::start(exports, cancel) {
        Ok(server) => server,
        Err(err) => {
            eprintln!("twinblade: {err}");
            return ExitCode::Failure as i32;
        }
    };
    server.wait();
    ExitCode::Ok as i32
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
        assert_eq!(base_interface(&args.netif), "eth0");
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

    #[test]
    fn export_specs_parse() {
        let spec = parse_export_spec("e12.7@eth0,eth1:0=/var/lib/x.img").unwrap();
        assert_eq!(spec.shelf, 12);
        assert_eq!(spec.slot, 7);
        assert_eq!(spec.interfaces, vec!["eth0", "eth1"]);
        assert_eq!(spec.path, PathBuf::from("/var/lib/x.img"));
        for bad in [
            "e0.3",
            "e0.3@eth0",
            "0.3@eth0=/x",
            "e0.255@eth0=/x",
            "e0.3@=/x",
            "e0.3@eth0=",
        ] {
            assert!(parse_export_spec(bad).is_err(), "{bad:?} accepted");
        }
    }
}
