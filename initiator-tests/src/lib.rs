//! A user-space AoE initiator for tests and benchmarks.
//!
//! It discovers blades with a broadcast config query, reads their size with IDENTIFY, and
//! runs pipelined reads and writes with a chosen number of outstanding frames, moving many
//! frames per syscall (`sendmmsg`/`recvmmsg`). Written data follows a pattern derived from
//! (seed, sector) so reads can be verified without keeping a copy. Lost frames are resent
//! under a new tag after a timeout, as the Linux driver does, so a run survives a target that
//! goes away and comes back (or moves to another MAC that announces itself).
//!
//! Frames are built and parsed only with `twinblade::wire::aoe`.

pub mod failover;

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};
use twinblade::net::{Interface, PacketSocket};
use twinblade::wire::aoe::{
    self, ata_flags, ArgRepr, AtaRepr, Command, Frame, HeaderRepr, PacketRepr,
};
use twinblade::wire::MacAddr;

/// ATA commands the initiator sends.
const READ_EXT: u8 = 0x24;
const WRITE_EXT: u8 = 0x34;
const IDENTIFY: u8 = 0xEC;
const FLUSH_EXT: u8 = 0xEA;
/// Status bits that mean failure (BSY|DF|DRQ|ERR), as the Linux driver checks.
const FAILURE_STATUS: u8 = 0xA9;

/// A blade that answered discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// MAC it answered from.
    pub mac: MacAddr,
    /// Advertised buffer count.
    pub buffer_count: u16,
    /// Advertised sectors per frame.
    pub sectors_per_frame: u8,
    /// Firmware version.
    pub firmware: u16,
    /// Config string.
    pub config: Vec<u8>,
}

/// Errors of the initiator.
#[derive(Debug)]
pub enum InitiatorError {
    /// Socket trouble.
    Io(io::Error),
    /// Nothing answered in time.
    Timeout(String),
    /// The target answered with an error.
    Target(String),
}

impl std::fmt::Display for InitiatorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitiatorError::Io(e) => write!(f, "I/O: {e}"),
            InitiatorError::Timeout(what) => write!(f, "timed out: {what}"),
            InitiatorError::Target(what) => write!(f, "target error: {what}"),
        }
    }
}

impl std::error::Error for InitiatorError {}

impl From<io::Error> for InitiatorError {
    fn from(e: io::Error) -> Self {
        InitiatorError::Io(e)
    }
}

/// Result of the initiator.
pub type Result<T> = std::result::Result<T, InitiatorError>;

/// What a pipelined run should do.
#[derive(Debug, Clone)]
pub struct IoPlan {
    /// Write (pattern) or read.
    pub write: bool,
    /// First sector.
    pub start_sector: u64,
    /// Sectors in all.
    pub sectors: u64,
    /// Sectors per frame (default: what the target advertised).
    pub sectors_per_frame: u8,
    /// Frames in flight.
    pub outstanding: usize,
    /// Pattern seed (writes write it, reads verify it if `verify`).
    pub seed: u64,
    /// Check read data against the pattern.
    pub verify: bool,
    /// Resend a frame unanswered for this long.
    pub retransmit_after: Duration,
    /// Give up if nothing at all is answered for this long.
    pub give_up_after: Duration,
    /// Random (frame-aligned) order instead of sequential.
    pub random: bool,
    /// Reads only: also write what was read into this file, at the device offset (a copy of
    /// the device range to compare with a model).
    pub out: Option<std::sync::Arc<std::fs::File>>,
}

/// What a pipelined run measured.
#[derive(Debug, Clone, Default)]
pub struct IoReport {
    /// Bytes transferred (each once, whatever the retransmits).
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per-frame latency (send of the answered copy to reply).
    pub latencies: Vec<Duration>,
    /// Frames sent again after a timeout.
    pub retransmits: u64,
    /// Sectors whose data did not match the pattern.
    pub mismatched_sectors: u64,
    /// Longest time without any completion.
    pub longest_stall: Duration,
    /// Syscalls made (sendmmsg + recvmmsg + poll timeouts).
    pub syscalls: u64,
}

impl IoReport {
    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }

    /// Latency percentile `p` (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }
}

/// The expected content of `sector` for pattern `seed`: sector number and seed, then a
/// xorshift stream, so misplaced, stale and torn sectors all show.
pub fn fill_pattern(seed: u64, sector: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), 512);
    out[0..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    let mut state = seed ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for chunk in out[16..].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Writes pattern `seed` for `sectors` sectors from `start_sector` into `file` at the same
/// byte offsets: what a write of that pattern leaves on the device (a test's model).
pub fn write_pattern_into(
    file: &std::fs::File,
    seed: u64,
    start_sector: u64,
    sectors: u64,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 2048;
    let mut buf = vec![0u8; (CHUNK * 512) as usize];
    let mut done = 0;
    while done < sectors {
        let n = CHUNK.min(sectors - done);
        let chunk = &mut buf[..(n * 512) as usize];
        for (i, sector) in chunk.chunks_mut(512).enumerate() {
            fill_pattern(seed, start_sector + done + i as u64, sector);
        }
        file.write_all_at(chunk, (start_sector + done) * 512)?;
        done += n;
    }
    Ok(())
}

/// Where an initiator's tags start: apart from every other initiator's on the machine. Two
/// initiators on one interface (a test's writer and its probe) share its MAC, so each hears
/// the other's answers: had both started at the same tag, one's config query would be counted
/// answered twice by the other.
fn first_tag() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (std::process::id().wrapping_mul(0x9E37_79B9) ^ nanos.rotate_left(16)) & 0x7FFF_FFFF
}

/// An initiator bound to one interface.
pub struct Initiator {
    socket: PacketSocket,
    mac: MacAddr,
    next_tag: u32,
}

struct InFlight {
    first_sector: u64,
    sectors: u8,
    sent_at: Instant,
    frame: Vec<u8>,
}

impl Initiator {
    /// Opens a raw AoE socket on `interface` (needs CAP_NET_RAW).
    pub fn open(interface: &str) -> Result<Initiator> {
        let iface = Interface::by_name(interface)?;
        let socket = PacketSocket::open(&iface, aoe::ETHERTYPE)?;
        socket.set_buffer_sizes(32 << 20)?;
        Ok(Initiator {
            socket,
            mac: iface.mac,
            next_tag: first_tag(),
        })
    }

    fn tag(&mut self) -> u32 {
        // Sequential from a start of its own (see `first_tag`). Bit 31 clear: the Linux driver
        // reserves it for its own config queries. Never 0: that is an announce's.
        self.next_tag = (self.next_tag + 1) & 0x7FFF_FFFF;
        if self.next_tag == 0 {
            self.next_tag = 1;
        }
        self.next_tag
    }

    fn header(&mut self, dst: MacAddr, shelf: u16, slot: u8, command: Command) -> HeaderRepr {
        HeaderRepr {
            dst,
            src: self.mac,
            version: aoe::VERSION,
            response: false,
            error: None,
            shelf,
            slot,
            command,
            tag: self.tag(),
        }
    }

    /// Broadcasts a config query for `shelf.slot` (or every blade) and collects answers for
    /// `wait`.
    pub fn discover(&mut self, shelf: u16, slot: u8, wait: Duration) -> Result<Vec<Target>> {
        let header = self.header(MacAddr::BROADCAST, shelf, slot, Command::Config);
        let tag = header.tag;
        let frame = PacketRepr::config_query(header).to_frame();
        self.socket.send(&frame)?;
        let deadline = Instant::now() + wait;
        let mut found: Vec<Target> = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(len) = self.socket.recv(&mut buf, left)? else {
                break;
            };
            let Ok(frame) = Frame::new_checked(&buf[..len]) else {
                continue;
            };
            let Ok(reply) = PacketRepr::parse(&frame) else {
                continue;
            };
            // Announcements (tag 0) count too: a blade that just started says hello.
            if !reply.header.response || (reply.header.tag != tag && reply.header.tag != 0) {
                continue;
            }
            if let ArgRepr::Config(cfg) = reply.arg {
                let target = Target {
                    shelf: reply.header.shelf,
                    slot: reply.header.slot,
                    mac: reply.header.src,
                    buffer_count: cfg.buffer_count,
                    sectors_per_frame: if cfg.sector_count == 0 {
                        2
                    } else {
                        cfg.sector_count
                    },
                    firmware: cfg.firmware_version,
                    config: cfg.config,
                };
                if !found.contains(&target) {
                    found.push(target);
                }
            }
        }
        Ok(found)
    }

    /// Finds `shelf.slot`, retrying the query until `wait` passes.
    pub fn find(&mut self, shelf: u16, slot: u8, wait: Duration) -> Result<Target> {
        let deadline = Instant::now() + wait;
        loop {
            let found = self.discover(shelf, slot, Duration::from_millis(300))?;
            if let Some(t) = found
                .into_iter()
                .find(|t| t.shelf == shelf && t.slot == slot)
            {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(InitiatorError::Timeout(format!(
                    "no answer from e{shelf}.{slot}"
                )));
            }
        }
    }

    /// Sends one ATA command and waits for its reply (with retransmits). Returns the reply
    /// argument and data.
    pub fn ata(
        &mut self,
        target: &Target,
        ata: AtaRepr,
        data: &[u8],
        wait: Duration,
    ) -> Result<(AtaRepr, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65536];
        loop {
            let header = self.header(target.mac, target.shelf, target.slot, Command::Ata);
            let tag = header.tag;
            let repr = PacketRepr {
                header,
                arg: ArgRepr::Ata(ata),
            };
            let mut frame = vec![0u8; (repr.buffer_len() + data.len()).max(aoe::MIN_FRAME_LEN)];
            repr.emit(&mut Frame::new_unchecked(&mut frame[..]));
            frame[repr.buffer_len()..repr.buffer_len() + data.len()].copy_from_slice(data);
            self.socket.send(&frame)?;
            let resend_at = Instant::now() + Duration::from_millis(500);
            while Instant::now() < resend_at {
                let Some(len) = self.socket.recv(&mut buf, Duration::from_millis(50))? else {
                    continue;
                };
                let Ok(view) = Frame::new_checked(&buf[..len]) else {
                    continue;
                };
                if !view.is_response() || view.tag() != tag {
                    continue;
                }
                if view.is_error() {
                    return Err(InitiatorError::Target(format!(
                        "AoE error {}",
                        view.error()
                    )));
                }
                let Ok(PacketRepr {
                    arg: ArgRepr::Ata(reply),
                    ..
                }) = PacketRepr::parse(&view)
                else {
                    continue;
                };
                let data = view.payload()[aoe::ATA_ARG_LEN..].to_vec();
                return Ok((reply, data));
            }
            if Instant::now() >= deadline {
                return Err(InitiatorError::Timeout(format!(
                    "ATA {:#04x} to e{}.{}",
                    ata.cmd_status, target.shelf, target.slot
                )));
            }
        }
    }

    /// IDENTIFY: returns the capacity in sectors (LBA48 words).
    pub fn identify(&mut self, target: &Target) -> Result<u64> {
        let ata = AtaRepr {
            aflags: 0,
            err_feature: 0,
            sector_count: 1,
            cmd_status: IDENTIFY,
            lba: 0xA0 << 24,
        };
        let (reply, data) = self.ata(target, ata, &[], Duration::from_secs(10))?;
        if reply.cmd_status & FAILURE_STATUS != 0 || data.len() < 512 {
            return Err(InitiatorError::Target(format!(
                "IDENTIFY failed: status {:#04x}",
                reply.cmd_status
            )));
        }
        Ok(u64::from_le_bytes(
            data[200..208].try_into().expect("8 bytes"),
        ))
    }

    /// FLUSH CACHE EXT.
    pub fn flush(&mut self, target: &Target) -> Result<()> {
        let ata = AtaRepr {
            aflags: ata_flags::EXTENDED,
            err_feature: 0,
            sector_count: 0,
            cmd_status: FLUSH_EXT,
            lba: 0,
        };
        let (reply, _) = self.ata(target, ata, &[], Duration::from_secs(30))?;
        if reply.cmd_status & FAILURE_STATUS != 0 {
            return Err(InitiatorError::Target(format!(
                "FLUSH failed: status {:#04x} error {:#04x}",
                reply.cmd_status, reply.err_feature
            )));
        }
        Ok(())
    }

    fn build_frame(
        &mut self,
        target: &Target,
        plan: &IoPlan,
        first_sector: u64,
        sectors: u8,
    ) -> (u32, Vec<u8>) {
        let header = self.header(target.mac, target.shelf, target.slot, Command::Ata);
        let tag = header.tag;
        let ata = AtaRepr {
            aflags: ata_flags::EXTENDED | if plan.write { ata_flags::WRITE } else { 0 },
            err_feature: 0,
            sector_count: sectors,
            cmd_status: if plan.write { WRITE_EXT } else { READ_EXT },
            lba: first_sector,
        };
        let repr = PacketRepr {
            header,
            arg: ArgRepr::Ata(ata),
        };
        let data_len = if plan.write {
            usize::from(sectors) * 512
        } else {
            0
        };
        let mut frame = vec![0u8; (repr.buffer_len() + data_len).max(aoe::MIN_FRAME_LEN)];
        repr.emit(&mut Frame::new_unchecked(&mut frame[..]));
        if plan.write {
            let data = &mut frame[repr.buffer_len()..repr.buffer_len() + data_len];
            for (i, sector) in data.chunks_mut(512).enumerate() {
                fill_pattern(plan.seed, first_sector + i as u64, sector);
            }
        }
        (tag, frame)
    }

    /// Runs a pipelined read or write. Errors from the target (AoE error, ATA failure) end
    /// the run; lost frames are resent.
    ///
    /// A blade that moves to another MAC and announces itself there (an unsolicited config
    /// response for the same `shelf.slot`, as a node taking over does) gets everything that is
    /// still unanswered, at once, and the rest of the run.
    pub fn run(&mut self, target: &Target, plan: &IoPlan) -> Result<IoReport> {
        let mut target = target.clone();
        let target = &mut target;
        let per_frame = u64::from(plan.sectors_per_frame.max(1));
        let frames_total = plan.sectors.div_ceil(per_frame);
        let mut order: Vec<u64> = (0..frames_total).collect();
        if plan.random {
            let mut state = plan.seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
        }
        let mut next = 0usize;
        let mut in_flight: HashMap<u32, InFlight> = HashMap::new();
        let mut report = IoReport::default();
        let batch = 64usize;
        let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; 9100]).collect();
        let mut lens = vec![0usize; batch];
        let mut expected = vec![0u8; 512];
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut completed = 0u64;
        while completed < frames_total {
            // Fill the window.
            let mut to_send: Vec<Vec<u8>> = Vec::new();
            while in_flight.len() + to_send.len() < plan.outstanding && next < order.len() {
                let first = plan.start_sector + order[next] * per_frame;
                let sectors = per_frame.min(plan.start_sector + plan.sectors - first) as u8;
                next += 1;
                let (tag, frame) = self.build_frame(target, plan, first, sectors);
                in_flight.insert(
                    tag,
                    InFlight {
                        first_sector: first,
                        sectors,
                        sent_at: Instant::now(),
                        frame: frame.clone(),
                    },
                );
                to_send.push(frame);
            }
            if !to_send.is_empty() {
                let refs: Vec<&[u8]> = to_send.iter().map(|f| f.as_slice()).collect();
                self.socket.send_batch(&refs)?;
                report.syscalls += refs.len().div_ceil(64) as u64;
            }
            let n = self
                .socket
                .recv_batch(&mut bufs, &mut lens, Duration::from_millis(10))?;
            report.syscalls += 1;
            let now = Instant::now();
            for i in 0..n {
                let Ok(view) = Frame::new_checked(&bufs[i][..lens[i]]) else {
                    continue;
                };
                if view.is_response()
                    && view.command() == Command::Config
                    && view.tag() == 0
                    && view.shelf() == target.shelf
                    && view.slot() == target.slot
                    && view.src() != target.mac
                {
                    // The blade moved: resend what the old MAC did not answer to the new one.
                    target.mac = view.src();
                    for request in in_flight.values_mut() {
                        request.sent_at = now
                            .checked_sub(plan.retransmit_after + Duration::from_millis(1))
                            .unwrap_or(now);
                    }
                    continue;
                }
                if !view.is_response() || view.command() != Command::Ata {
                    continue;
                }
                let Some(request) = in_flight.remove(&view.tag()) else {
                    continue;
                };
                if view.is_error() {
                    return Err(InitiatorError::Target(format!(
                        "AoE error {} at sector {}",
                        view.error(),
                        request.first_sector
                    )));
                }
                let payload = view.payload();
                if payload.len() < aoe::ATA_ARG_LEN {
                    return Err(InitiatorError::Target("short ATA reply".into()));
                }
                let status = payload[3];
                if status & FAILURE_STATUS != 0 {
                    return Err(InitiatorError::Target(format!(
                        "ATA status {status:#04x} error {:#04x} at sector {}",
                        payload[1], request.first_sector
                    )));
                }
                let bytes = u64::from(request.sectors) * 512;
                if !plan.write {
                    let data = &payload[aoe::ATA_ARG_LEN..];
                    if (data.len() as u64) < bytes {
                        return Err(InitiatorError::Target(
                            "read reply carries too little data".into(),
                        ));
                    }
                    if let Some(out) = &plan.out {
                        use std::os::unix::fs::FileExt;
                        out.write_all_at(&data[..bytes as usize], request.first_sector * 512)?;
                    }
                    if plan.verify {
                        for (j, sector) in data[..bytes as usize].chunks(512).enumerate() {
                            fill_pattern(plan.seed, request.first_sector + j as u64, &mut expected);
                            if sector != expected.as_slice() {
                                report.mismatched_sectors += 1;
                            }
                        }
                    }
                }
                report.bytes += bytes;
                report.latencies.push(now.duration_since(request.sent_at));
                completed += 1;
                report.longest_stall = report.longest_stall.max(now.duration_since(last_progress));
                last_progress = now;
            }
            if now.duration_since(last_progress) > plan.give_up_after {
                return Err(InitiatorError::Timeout(format!(
                    "{} frames unanswered for {:?}",
                    in_flight.len(),
                    plan.give_up_after
                )));
            }
            // Resend what has waited too long, under a new tag (as the Linux driver does).
            let stale: Vec<u32> = in_flight
                .iter()
                .filter(|(_, f)| now.duration_since(f.sent_at) > plan.retransmit_after)
                .map(|(t, _)| *t)
                .collect();
            if !stale.is_empty() {
                let mut resend = Vec::new();
                for old in stale {
                    let mut request = in_flight.remove(&old).expect("present");
                    let tag = self.tag();
                    let mut frame = Frame::new_unchecked(&mut request.frame[..]);
                    frame.set_tag(tag);
                    frame.set_dst(target.mac);
                    request.sent_at = now;
                    resend.push(request.frame.clone());
                    in_flight.insert(tag, request);
                    report.retransmits += 1;
                }
                let refs: Vec<&[u8]> = resend.iter().map(|f| f.as_slice()).collect();
                self.socket.send_batch(&refs)?;
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

/// Parses `eS.L`.
pub fn parse_target(name: &str) -> std::result::Result<(u16, u8), String> {
    twinblade::cli::aoe::parse_blade_name(name)
}

/// A byte count as the command lines take it: digits with an optional K, M or G suffix
/// (binary multiples), e.g. `64K`, `8M`, `1G`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_by_sector_and_seed() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill_pattern(1, 10, &mut a);
        fill_pattern(1, 11, &mut b);
        assert_ne!(a, b);
        fill_pattern(2, 10, &mut b);
        assert_ne!(a, b);
        fill_pattern(1, 10, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn the_model_holds_what_a_write_writes_and_nothing_else() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(3000 * 512).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xAA; 512], 5 * 512).unwrap();
        // Across the helper's chunk boundary (2048 sectors).
        write_pattern_into(&file, 7, 10, 2100).unwrap();
        let mut data = vec![0u8; 3000 * 512];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut data, 0).unwrap();
        let mut expected = vec![0u8; 512];
        for sector in 0..3000u64 {
            let got = &data[sector as usize * 512..(sector as usize + 1) * 512];
            if (10..2110).contains(&sector) {
                fill_pattern(7, sector, &mut expected);
                assert_eq!(got, &expected[..], "sector {sector}");
            } else if sector == 5 {
                assert_eq!(got, &[0xAA; 512][..], "sector 5 was not written");
            } else {
                assert!(
                    got.iter().all(|&b| b == 0),
                    "sector {sector} was not written"
                );
            }
        }
    }

    #[test]
    fn percentiles() {
        let report = IoReport {
            latencies: (1..=100).map(Duration::from_micros).collect(),
            ..Default::default()
        };
        assert_eq!(report.percentile(50.0), Duration::from_micros(51));
        assert_eq!(report.percentile(99.0), Duration::from_micros(99));
    }
}
