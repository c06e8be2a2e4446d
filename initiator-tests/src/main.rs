//! `aoe-init`: the user-space AoE initiator's command line, for tests and benchmarks.
//!
//! Prints results as `key=value` pairs on one line so scripts can parse them.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use twinblade_initiator::failover::{self, VersionedPlan, BLOCK_BYTES, BLOCK_SECTORS};
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
    /// Count who answers a blade: every --every-ms a config query with a tag of its own, sent
    /// once; the answers carrying that tag within --window-ms, counted per query (two nodes
    /// at one shared service MAC answer from one MAC, twice). Until --seconds or
    /// SIGTERM/SIGINT; then `probes=N none=A one=B two=C two_macs=D same_mac=E most=F
    /// macs=...` (two: probes answered two or more times, whatever the MACs; two_macs: by two
    /// or more MACs; same_mac: one MAC answered twice or more; most: most answers to a probe).
    Probe {
        /// Blade, e.g. e0.3.
        target: String,
        /// Milliseconds between probes.
        #[arg(long, default_value_t = 200)]
        every_ms: u64,
        /// Milliseconds to collect answers to each probe.
        #[arg(long, default_value_t = 150)]
        window_ms: u64,
        /// Run this long (default: until SIGTERM or SIGINT).
        #[arg(long)]
        seconds: Option<f64>,
        /// One line per probe: `t_ms answers macs` (macs: `-`, or `mac[,mac]`, with `*N`
        /// after a MAC that answered N > 1 times).
        #[arg(long)]
        log: Option<std::path::PathBuf>,
    },
    /// A client that fails over as the Linux aoe driver does: it uses every MAC answering the
    /// blade (rediscovered at start, every second and after a timeout), round-robin, and writes
    /// numbered 4 KiB blocks with increasing versions; each write is resent (new tag, next MAC)
    /// until acknowledged. Until --seconds or SIGTERM; then the acknowledged versions go to
    /// --acks and `acked=N stall_max_ms=... stall_p50_ms=... gaps_over_500ms=[...]` is printed
    /// (and `double_answers=N`: discovery queries answered twice or more, from one MAC or
    /// several: two nodes serving).
    /// Exit status 1 if a write went unacknowledged for --give-up-s.
    Versioned {
        /// Blade, e.g. e0.3.
        target: String,
        /// Blocks of 4 KiB in the region.
        #[arg(long, default_value_t = 256)]
        blocks: u64,
        /// Start of the region in bytes (multiple of 4096; suffix K, M, G allowed).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        /// Frames in flight.
        #[arg(short = 'q', long, default_value_t = 8)]
        outstanding: usize,
        /// Sectors per frame (default: the smallest any answering MAC advertises).
        #[arg(long)]
        sectors: Option<u8>,
        /// Run this long (default: until SIGTERM or SIGINT).
        #[arg(long)]
        seconds: Option<f64>,
        /// Resend a frame after this many milliseconds (new tag, next MAC).
        #[arg(long, default_value_t = 200)]
        retransmit_ms: u64,
        /// Give up if a block write is unacknowledged this many seconds.
        #[arg(long, default_value_t = 60)]
        give_up_s: u64,
        /// The last acknowledged version of every block (for verify-versions).
        #[arg(long)]
        acks: std::path::PathBuf,
        /// Every acknowledgement: `t_ms block version mac`.
        #[arg(long)]
        ack_log: Option<std::path::PathBuf>,
        /// Versions start above this (default: from the clock, so a later run's versions are
        /// higher than an earlier run's on the same region).
        #[arg(long)]
        version_base: Option<u64>,
    },
    /// Read the region a `versioned` run wrote (from one answering MAC) and check that every
    /// block is intact and holds at least its last acknowledged version. Exit status 1 if a
    /// block is behind or torn.
    VerifyVersions {
        /// Blade, e.g. e0.3.
        target: String,
        /// The acknowledged versions `versioned --acks` wrote.
        #[arg(long)]
        acks: std::path::PathBuf,
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
        Cmd::Probe {
            target,
            every_ms,
            window_ms,
            seconds,
            log,
        } => probe(&mut init, &target, every_ms, window_ms, seconds, log)?,
        Cmd::Versioned {
            target,
            blocks,
            offset,
            outstanding,
            sectors,
            seconds,
            retransmit_ms,
            give_up_s,
            acks,
            ack_log,
            version_base,
        } => {
            if !offset.is_multiple_of(BLOCK_BYTES as u64) || blocks == 0 {
                return Err("--offset must be a multiple of 4096 and --blocks positive".into());
            }
            let stop = failover::stop_on_signals();
            let (shelf, slot) = parse_target(&target)?;
            let found = init.find(shelf, slot, Duration::from_secs(30))?;
            let capacity = init.identify(&found)? * 512;
            if offset + blocks * BLOCK_BYTES as u64 > capacity {
                return Err(format!("{blocks} blocks at {offset} exceed {capacity} bytes").into());
            }
            let spf = sectors
                .unwrap_or(found.sectors_per_frame)
                .clamp(1, BLOCK_SECTORS as u8);
            let version_base = version_base.unwrap_or_else(|| {
                // Milliseconds since the epoch, shifted: room for 2^20 versions per block per
                // millisecond between runs.
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                ms << 20
            });
            let plan = VersionedPlan {
                shelf,
                slot,
                blocks,
                start_sector: offset / 512,
                outstanding: outstanding.max(1),
                sectors_per_frame: spf,
                retransmit_after: Duration::from_millis(retransmit_ms),
                give_up_after: Duration::from_secs(give_up_s),
                duration: seconds.map(Duration::from_secs_f64),
                rediscover_every: Duration::from_secs(1),
                forget_after: Duration::from_millis(2500),
                version_base,
                drain: Duration::from_secs(5),
            };
            let mut log_file = match &ack_log {
                Some(path) => Some(std::io::BufWriter::new(
                    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
                )),
                None => None,
            };
            let report = init.versioned(
                &plan,
                stop,
                log_file.as_mut().map(|f| f as &mut dyn std::io::Write),
            )?;
            if let Some(mut f) = log_file {
                std::io::Write::flush(&mut f)?;
            }
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&acks).map_err(|e| format!("{}: {e}", acks.display()))?,
            );
            failover::write_acks(
                &mut out,
                plan.start_sector,
                version_base,
                &report.last_acked,
                &report.unfinished,
            )?;
            std::io::Write::flush(&mut out)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let gaps: Vec<String> = report
                .long_gaps
                .iter()
                .map(|(at, gap)| format!("{:.0}@{:.0}", ms(*gap), ms(*at)))
                .collect();
            let macs = |m: &[twinblade::wire::MacAddr]| {
                m.iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            println!(
                "target={target} acked={} seconds={:.1} stall_max_ms={:.0} stall_p50_ms={:.1} gaps_over_500ms=[{}] tail_ms={:.0} retransmits={} errors={} unfinished={} sectors_per_frame={spf} macs_seen={} acked_by={} double_answers={} started_unix_ms={} base={version_base}{}",
                report.acked,
                report.elapsed.as_secs_f64(),
                ms(report.stall_max()),
                ms(report.stall_p50()),
                gaps.join(","),
                ms(report.tail),
                report.retransmits,
                report.errors,
                report.unfinished.iter().filter(|&&u| u).count(),
                macs(&report.macs_seen),
                macs(&report.acked_by),
                report.double_answers,
                report.started_unix_ms,
                if report.gave_up { " gave_up=1" } else { "" },
            );
            if report.gave_up {
                return Err(
                    format!("a write went unacknowledged for {give_up_s} s: gave up").into(),
                );
            }
        }
        Cmd::VerifyVersions { target, acks } => {
            let text =
                std::fs::read_to_string(&acks).map_err(|e| format!("{}: {e}", acks.display()))?;
            let acked =
                failover::parse_acks(&text).map_err(|e| format!("{}: {e}", acks.display()))?;
            let (shelf, slot) = parse_target(&target)?;
            let found = init.find(shelf, slot, Duration::from_secs(30))?;
            let data = init.read_blocks(&found, acked.offset / 512, acked.versions.len() as u64)?;
            let report = failover::verify_versions(&data, &acked);
            println!(
                "target={target} mac={} blocks={} ok={} behind={} torn={} torn_unfinished={}",
                found.mac,
                report.blocks,
                report.ok,
                report.behind.len(),
                report.torn.len(),
                report.torn_unfinished
            );
            for (block, have, want) in report.behind.iter().take(20) {
                println!("behind block={block} have={have} acked={want}");
            }
            for block in report.torn.iter().take(20) {
                println!("torn block={block}");
            }
            if !report.behind.is_empty() || !report.torn.is_empty() {
                return Err(format!(
                    "{} blocks behind their acknowledged version, {} torn",
                    report.behind.len(),
                    report.torn.len()
                )
                .into());
            }
        }
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

fn probe(
    init: &mut Initiator,
    target: &str,
    every_ms: u64,
    window_ms: u64,
    seconds: Option<f64>,
    log: Option<std::path::PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let stop = failover::stop_on_signals();
    let (shelf, slot) = parse_target(target)?;
    let mut log = match &log {
        Some(path) => Some(std::io::LineWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => None,
    };
    let plan = failover::ProbePlan {
        shelf,
        slot,
        every: Duration::from_millis(every_ms.max(1)),
        window: Duration::from_millis(window_ms),
        duration: seconds.map(Duration::from_secs_f64),
    };
    let summary = init.probe(&plan, stop, |sample| {
        if let Some(log) = log.as_mut() {
            writeln!(
                log,
                "{} {} {}",
                sample.at.as_millis(),
                sample.count(),
                sample.answers_text()
            )?;
        }
        Ok(())
    })?;
    let macs: Vec<String> = summary.macs.iter().map(|m| m.to_string()).collect();
    println!(
        "target={target} probes={} none={} one={} two={} two_macs={} same_mac={} most={} macs={}",
        summary.probes,
        summary.none,
        summary.one,
        summary.two,
        summary.two_macs,
        summary.same_mac,
        summary.most,
        macs.join(",")
    );
    Ok(())
}
