//! `twinblade vblade` and `twinblade aoe`: the AoE front ends.
//!
//! `vblade` takes exactly vblade's arguments, so an existing setup can swap the binary; `aoe`
//! serves several blades from one process. Both serve until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use super::exit::{cancel_on_signal, ExitCode};
use crate::block::{BlockDevice, OpenOptions, SECTOR_SIZE};
use crate::export::aoe::blade::DEFAULT_BUFFER_COUNT;
use crate::export::aoe::{AoeServer, BladeConfig, Export};
use crate::ha::gate::ServeGate;
use crate::supervisor::Root;
use crate::wire::MacAddr;

/// vblade's arguments.
#[derive(Debug, clap::Args)]
pub struct VbladeArgs {
    /// Buffer count advertised to initiators (outstanding frames the target queues).
    #[arg(short = 'b', default_value_t = DEFAULT_BUFFER_COUNT,
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
    #[arg(short = 'b', long = "bufcnt", default_value_t = DEFAULT_BUFFER_COUNT,
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
pub(super) fn base_interface(name: &str) -> String {
    name.split(':').next().unwrap_or(name).to_string()
}

/// Runs `twinblade vblade`; returns the exit status.
pub fn run_vblade(args: VbladeArgs) -> i32 {
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
        // A standalone target: no peer could be answering instead.
        gate: ServeGate::always_open(),
        guard: None,
        service_mac: None,
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
    serve(vec![export])
}

/// Runs `twinblade aoe`; returns the exit status.
pub fn run_aoe(args: AoeArgs) -> i32 {
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
            // A standalone target: no peer could be answering instead.
            gate: ServeGate::always_open(),
            guard: None,
            service_mac: None,
        });
    }
    serve(exports)
}

/// Serves until SIGINT/SIGTERM.
fn serve(exports: Vec<Export>) -> i32 {
    let cancel = match cancel_on_signal() {
        Ok(cancel) => cancel,
        Err(code) => return code as i32,
    };
    let root = match Root::new("aoe", cancel, 1) {
        Ok(root) => root,
        Err(err) => {
            eprintln!("twinblade: {err}");
            return ExitCode::Failure as i32;
        }
    };
    let server = match AoeServer::start(exports, root.group("aoe-server")) {
        Ok(server) => server,
        Err(err) => {
            eprintln!("twinblade: {err}");
            return ExitCode::Failure as i32;
        }
    };
    root.wait();
    server.stop();
    ExitCode::Ok as i32
}

#[cfg(test)]
mod tests {
    use super::*;

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
