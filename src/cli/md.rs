//! `twinblade create-md RES` and `twinblade dump-md RES`.
//!
//! Both read the configuration (`--config`, default `/etc/twinblade.toml`), pick the local node
//! (`--node`, else `$TWINBLADE_NODE`, else the host name) and act on that node's
//! `resource.RES.on.NODE` disks: `meta-disk = "internal"` puts the meta-data at the end of
//! `disk`; any other value is the path of a separate device or file for it.
//!
//! # create-md
//!
//! Writes fresh meta-data: superblock (uuids "just created", AL clean, not consistent), an
//! empty activity log and a clear bitmap. It refuses — exit status 1, naming what it found and
//! where — when the meta-data area holds existing twinblade meta-data, a filesystem, swap,
//! LUKS, LVM, MD RAID or partition-table signature, or (internal) when a filesystem at the
//! start of the disk is larger than the usable size that remains; `--force` overwrites. It
//! prints the layout and, for internal meta-data, the usable size, which is smaller than the
//! disk.
//!
//! # dump-md
//!
//! Read-only; prints the lines (or, with `--json`, the object) described in
//! [`crate::meta::dump`]. Exit status: 0 printed, 1 no or damaged meta-data or an I/O error,
//! 2 configuration error.

use std::path::{Path, PathBuf};

use super::exit::ExitCode;
use crate::block::{BlockDevice, FileDevice, OpenOptions};
use crate::config::{Config, MetaDisk};
use crate::meta::dump::{dump_fields, to_json};
use crate::meta::layout::BM_BLOCK_SIZE;
use crate::meta::{create, inspect, CreateOptions, LayoutParams};
use crate::wire::ondisk::MetaKind;

/// Arguments of `twinblade create-md`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateMdArgs {
    /// Resource name (a `[resource.NAME]` of the configuration).
    pub res: String,
    /// Overwrite existing meta-data or a filesystem/partition signature in the meta-data area.
    #[arg(long)]
    pub force: bool,
    /// Configuration file.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// This node's name (default: $TWINBLADE_NODE, else the host name).
    #[arg(long)]
    pub node: Option<String>,
}

/// Arguments of `twinblade dump-md`.
#[derive(Debug, Clone, clap::Args)]
pub struct DumpMdArgs {
    /// Resource name (a `[resource.NAME]` of the configuration).
    pub res: String,
    /// Configuration file.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// This node's name (default: $TWINBLADE_NODE, else the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Print one JSON object instead of `key: value` lines.
    #[arg(long)]
    pub json: bool,
}

/// The disks of one resource on this node.
struct Target {
    node: String,
    disk: PathBuf,
    meta_disk: MetaDisk,
    params: LayoutParams,
}

fn target(config: &Path, res: &str, node: Option<&str>) -> Result<Target, String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let resource = cfg.resource(res).map_err(|e| e.to_string())?;
    let node = cfg.this_node(node).map_err(|e| e.to_string())?;
    let on = &resource.on[node];
    Ok(Target {
        node: node.to_string(),
        disk: on.disk.clone(),
        meta_disk: on.meta_disk.clone(),
        params: resource.layout_params(),
    })
}

fn open(path: &Path, read_only: bool) -> Result<FileDevice, String> {
    OpenOptions::new()
        .read_only(read_only)
        .preallocate(false)
        .open(path)
        .map_err(|e| e.to_string())
}

/// Runs `twinblade create-md`; returns the exit status.
pub fn run_create_md(args: CreateMdArgs) -> i32 {
    let t = match target(&args.config, &args.res, args.node.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("twinblade create-md: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let prefix = format!("twinblade create-md: {} on {}", args.res, t.node);
    let opts = CreateOptions {
        name: args.res.clone(),
        params: t.params,
        force: args.force,
    };
    let (result, meta_path, disk_size) = match &t.meta_disk {
        MetaDisk::Internal => {
            let dev = match open(&t.disk, false) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{prefix}: {e}");
                    return ExitCode::Failure as i32;
                }
            };
            (
                create(&dev, 0, MetaKind::Internal, &opts),
                t.disk.clone(),
                dev.size(),
            )
        }
        MetaDisk::External(meta_path) => {
            let data = match open(&t.disk, true) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{prefix}: {e}");
                    return ExitCode::Failure as i32;
                }
            };
            let meta = match open(meta_path, false) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{prefix}: {e}");
                    return ExitCode::Failure as i32;
                }
            };
            (
                create(&meta, data.size(), MetaKind::External, &opts),
                meta_path.clone(),
                data.size(),
            )
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{prefix}: {}: {e}", meta_path.display());
            return ExitCode::Failure as i32;
        }
    };
    for f in &report.overwritten {
        eprintln!("{prefix}: overwrote {f}");
    }
    let l = &report.layout;
    let kind = match l.kind {
        MetaKind::Internal => "internal",
        MetaKind::External => "external",
    };
    println!(
        "{prefix}: {kind} meta-data written to {}",
        meta_path.display()
    );
    println!("md-uuid: {:016X}", report.md_uuid);
    println!("meta-data: {} bytes at byte {}", l.md_size, l.md_offset);
    println!(
        "activity-log: {} transactions at byte {}, {} extents of {} bytes",
        l.al_transactions,
        l.al_offset,
        l.al_extents,
        l.extent_size()
    );
    println!(
        "bitmap: {} pages at byte {}, {BM_BLOCK_SIZE} bytes per bit",
        l.bm_pages, l.bm_offset
    );
    println!(
        "usable size: {} bytes ({} sectors) of a {} byte disk{}",
        l.data_size,
        l.data_size / 512,
        disk_size,
        if l.kind == MetaKind::Internal {
            " (the internal meta-data takes the rest)"
        } else {
            ""
        }
    );
    ExitCode::Ok as i32
}

/// Runs `twinblade dump-md`; returns the exit status.
pub fn run_dump_md(args: DumpMdArgs) -> i32 {
    let t = match target(&args.config, &args.res, args.node.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("twinblade dump-md: {e}");
            return ExitCode::Usage as i32;
        }
    };
    let prefix = format!("twinblade dump-md: {} on {}", args.res, t.node);
    let (kind, meta_path, result) = match &t.meta_disk {
        MetaDisk::Internal => match open(&t.disk, true) {
            Ok(dev) => (
                MetaKind::Internal,
                t.disk.clone(),
                inspect(&dev, 0, MetaKind::Internal),
            ),
            Err(e) => {
                eprintln!("{prefix}: {e}");
                return ExitCode::Failure as i32;
            }
        },
        MetaDisk::External(meta_path) => {
            let opened = open(&t.disk, true).and_then(|d| Ok((d, open(meta_path, true)?)));
            match opened {
                Ok((data, meta)) => (
                    MetaKind::External,
                    meta_path.clone(),
                    inspect(&meta, data.size(), MetaKind::External),
                ),
                Err(e) => {
                    eprintln!("{prefix}: {e}");
                    return ExitCode::Failure as i32;
                }
            }
        }
    };
    let insp = match result {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{prefix}: {}: {e}", meta_path.display());
            return ExitCode::Failure as i32;
        }
    };
    let fields = dump_fields(&insp, &t.node, kind, &meta_path);
    let text = if args.json {
        format!("{}\n", to_json(&fields))
    } else {
        fields
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", v.text()))
            .collect()
    };
    // A reader that stops early (`| grep -q`, `| head`) is not an error worth a panic.
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("{prefix}: writing the dump: {e}");
            ExitCode::Failure as i32
        }
        _ => ExitCode::Ok as i32,
    }
}
