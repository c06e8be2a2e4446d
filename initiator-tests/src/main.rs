//! `aoe-init`: the user-space AoE initiator's command line, for tests and benchmarks.
//!
//! Prints results as `key=value` pairs on one line so scripts can parse them.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use twinblade_initiator::{parse_size, parse_target, write_pattern_into, Initiator, IoPlan};

#[derive(Parser)]
#[command(
    name = "aoe-init",
    about = "User-space AoE initiator (tests and benchmarks)"
)]
struct Cli {
    /// Interface to use.
    #[arg(short, long, default_value = "eth0")]
    interface: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List blades that answer a broadcast config query.
    Discover {
        /// How long to collect answers, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Print a blade's capacity.
    Identify {
        /// Blade, e.g. e0.3.
        target: String,
    },
    /// Write the pattern, or read (and verify) it, pipelined.
    Write(IoArgs),
    /// Read pipelined, optionally verifying the pattern.
    Read(IoArgs),
    /// FLUSH CACHE EXT.
    Flush {
        /// Blade, e.g. e0.3.
        target: String,
    },
    /// No network: apply what `write --seed S --offset O --bytes B` writes to a model file
    /// (created if missing), so a test can compare the device with it.
    Model {
        /// The model file.
        file: std::path::PathBuf,
        /// Bytes the write covered (suffix K, M, G allowed).
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Start offset in bytes (multiple of 512).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct IoArgs {
    /// Blade, e.g. e0.3.
    target: String,
    /// Frames in flight.
    #[arg(short = 'q', long, default_value_t = 16)]
    outstanding: usize,
    /// Bytes to transfer (suffix K, M, G allowed); default: the whole device from --offset.
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// Start offset in bytes (multiple of 512).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Pattern seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Verify read data against the pattern.
    #[arg(long)]
    verify: bool,
    /// Sectors per frame (default: the target's advertised maximum).
    #[arg(long)]
    sectors: Option<u8>,
    /// Random frame order.
    #[arg(long)]
    random: bool,
    /// Resend a frame after this many milliseconds.
    #[arg(long, default_value_t = 200)]
    retransmit_ms: u64,
    /// Give up after this many seconds without progress.
    #[arg(long, default_value_t = 30)]
    give_up_s: u64,
    /// Print p50/p99 latency.
    #[arg(long)]
    latency: bool,
    /// Reads only: write what was read into this file at the device offsets (created if
    /// missing), to compare with a model.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aoe-init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Cmd::Model {
        file,
        bytes,
        offset,
        seed,
    } = &cli.command
    {
        if !offset.is_multiple_of(512) || !bytes.is_multiple_of(512) {
            return Err("--offset and --bytes must be multiples of 512".into());
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        write_pattern_into(&f, *seed, offset / 512, bytes / 512)?;
        println!(
            "model={} offset={offset} bytes={bytes} seed={seed}",
            file.display()
        );
        return Ok(());
    }
    let mut init = Initiator::open(&cli.interface)?;
    match cli.command {
        Cmd::Discover { wait_ms } => {
            for t in init.discover(0xFFFF, 0xFF, Duration::from_millis(wait_ms))? {
                println!(
                    "target=e{}.{} mac={} bufcnt={} sectors={} firmware={:#06x} config={:?}",
                    t.shelf,
                    t.slot,
                    t.mac,
                    t.buffer_count,
                    t.sectors_per_frame,
                    t.firmware,
                    String::from_utf8_lossy(&t.config)
                );
            }
        }
        Cmd::Identify { target } => {
            let (shelf, slot) = parse_target(&target)?;
            let t = init.find(shelf, slot, Duration::from_secs(10))?;
            let sectors = init.identify(&t)?;
            println!(
                "target={target} mac={} sectors={sectors} bytes={}",
                t.mac,
                sectors * 512
            );
        }
        Cmd::Flush { target } => {
            let (shelf, slot) = parse_target(&target)?;
            let t = init.find(shelf, slot, Duration::from_secs(10))?;
            init.flush(&t)?;
            println!("target={target} flush=ok");
        }
        Cmd::Write(args) => io(&mut init, args, true)?,
        Cmd::Read(args) => io(&mut init, args, false)?,
        Cmd::Model { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn io(init: &mut Initiator, args: IoArgs, write: bool) -> Result<(), Box<dyn std::error::Error>> {
    let (shelf, slot) = parse_target(&args.target)?;
    let target = init.find(shelf, slot, Duration::from_secs(10))?;
    let capacity = init.identify(&target)? * 512;
    if !args.offset.is_multiple_of(512) {
        return Err("--offset must be a multiple of 512".into());
    }
    let bytes = args.bytes.unwrap_or(capacity.saturating_sub(args.offset));
    if args.offset + bytes > capacity || !bytes.is_multiple_of(512) {
        return Err(format!(
            "range {}+{} does not fit the device ({capacity} bytes) in whole sectors",
            args.offset, bytes
        )
        .into());
    }
    if write && args.out.is_some() {
        return Err("--out is for reads".into());
    }
    let out = match &args.out {
        Some(path) => Some(std::sync::Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => None,
    };
    let plan = IoPlan {
        write,
        start_sector: args.offset / 512,
        sectors: bytes / 512,
        sectors_per_frame: args.sectors.unwrap_or(target.sectors_per_frame),
        outstanding: args.outstanding.max(1),
        seed: args.seed,
        verify: args.verify,
        retransmit_after: Duration::from_millis(args.retransmit_ms),
        give_up_after: Duration::from_secs(args.give_up_s),
        random: args.random,
        out,
    };
    let report = init.run(&target, &plan)?;
    let frames = report.latencies.len().max(1) as f64;
    print!(
        "op={} target={} bytes={} seconds={:.3} mb_s={:.1} iops={:.0} outstanding={} sectors_per_frame={} retransmits={} mismatched_sectors={} longest_stall_ms={:.1} syscalls_per_frame={:.2}",
        if write { "write" } else { "read" },
        args.target,
        report.bytes,
        report.elapsed.as_secs_f64(),
        report.mb_per_s(),
        frames / report.elapsed.as_secs_f64().max(1e-9),
        plan.outstanding,
        plan.sectors_per_frame,
        report.retransmits,
        report.mismatched_sectors,
        report.longest_stall.as_secs_f64() * 1e3,
        report.syscalls as f64 / frames,
    );
    if args.latency {
        print!(
            " p50_us={:.1} p99_us={:.1}",
            report.percentile(50.0).as_secs_f64() * 1e6,
            report.percentile(99.0).as_secs_f64() * 1e6
        );
    }
    println!();
    if args.verify && report.mismatched_sectors > 0 {
        return Err(format!(
            "{} sectors did not match the pattern",
            report.mismatched_sectors
        )
        .into());
    }
    Ok(())
}
