//! The failover tests' client side: who answers a blade (`probe`), a client that writes
//! numbered, versioned blocks over every answering MAC as the Linux driver does (`versioned`),
//! and the check that the device holds at least every acknowledged version
//! (`verify-versions`).
//!
//! A versioned block is 4 KiB (8 sectors). Every sector starts with a magic, the block index,
//! the version and the sector's place in the block; the rest is a stream derived from
//! (block, version, sector); the block's last 8 bytes are a checksum over the rest of it. A
//! block made of sectors of two versions (a torn write), a block at the wrong place and a
//! damaged block all fail the check; an all-zero block is one never written (version 0).

use crate::{Initiator, InitiatorError, Result, Target, FAILURE_STATUS, WRITE_EXT};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use twinblade::wire::aoe::{self, ata_flags, ArgRepr, AtaRepr, Command, Frame, PacketRepr};
use twinblade::wire::MacAddr;

/// Bytes of a versioned block.
pub const BLOCK_BYTES: usize = 4096;
/// Sectors of a versioned block.
pub const BLOCK_SECTORS: u64 = (BLOCK_BYTES / 512) as u64;
const MAGIC: u64 = u64::from_le_bytes(*b"TBVERS01");

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT set a flag (returned) instead of ending the process, so a run can
/// print its summary.
pub fn stop_on_signals() -> &'static AtomicBool {
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
    &STOP
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a, 64 bit.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fills `out` (4 KiB) with version `version` of block `block`.
pub fn encode_block(block: u64, version: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK_BYTES);
    for (i, sector) in out.chunks_mut(512).enumerate() {
        sector[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sector[8..16].copy_from_slice(&block.to_le_bytes());
        sector[16..24].copy_from_slice(&version.to_le_bytes());
        sector[24..32].copy_from_slice(&(i as u64).to_le_bytes());
        let mut state =
            (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version ^ (i as u64) << 56) | 1;
        for chunk in sector[32..].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
    }
    let sum = checksum(&out[..BLOCK_BYTES - 8]);
    out[BLOCK_BYTES - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// What a versioned block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// All zeros: never written.
    Unwritten,
    /// Intact, with this version.
    Version(u64),
    /// Damaged, torn between versions or written for another block.
    Torn,
}

/// Decodes block `block` read back from the device.
pub fn decode_block(block: u64, data: &[u8]) -> BlockState {
    if data.len() != BLOCK_BYTES {
        return BlockState::Torn;
    }
    if data.iter().all(|&b| b == 0) {
        return BlockState::Unwritten;
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC || word(8) != block {
        return BlockState::Torn;
    }
    let version = word(16);
    if checksum(&data[..BLOCK_BYTES - 8]) != word(BLOCK_BYTES - 8) {
        return BlockState::Torn;
    }
    // The checksum covers every sector; still, compare with a fresh encoding so a block
    // whose sectors agree but whose body is not this version's never passes.
    let mut expected = vec![0u8; BLOCK_BYTES];
    encode_block(block, version, &mut expected);
    if expected != data {
        return BlockState::Torn;
    }
    BlockState::Version(version)
}

/// What one probe saw: the answers to one config query, sent once with a tag of its own.
///
/// Answers are counted per query, not per MAC: two nodes sharing a service MAC answer from
/// the same MAC, and only the second answer carrying the query's tag shows the second node.
/// A node with several ports on the client's segment would answer once per port (the test
/// networks give each node one port there).
#[derive(Debug, Clone, Default)]
pub struct ProbeSample {
    /// Since the start of the run.
    pub at: Duration,
    /// Each MAC that answered and how many times, sorted by MAC.
    pub answers: Vec<(MacAddr, usize)>,
}

impl ProbeSample {
    /// Answers in all.
    pub fn count(&self) -> usize {
        self.answers.iter().map(|(_, n)| n).sum()
    }

    /// Distinct MACs that answered, sorted.
    pub fn macs(&self) -> Vec<MacAddr> {
        self.answers.iter().map(|(mac, _)| *mac).collect()
    }

    /// Counts one answer from `mac`.
    pub fn heard(&mut self, mac: MacAddr) {
        match self.answers.binary_search_by_key(&mac, |(m, _)| *m) {
            Ok(i) => self.answers[i].1 += 1,
            Err(i) => self.answers.insert(i, (mac, 1)),
        }
    }

    /// The probe log's form: `-` for none, else `mac[,mac]` with `*N` after a MAC that
    /// answered N > 1 times.
    pub fn answers_text(&self) -> String {
        if self.answers.is_empty() {
            return "-".into();
        }
        let each: Vec<String> = self
            .answers
            .iter()
            .map(|(mac, n)| match n {
                1 => mac.to_string(),
                n => format!("{mac}*{n}"),
            })
            .collect();
        each.join(",")
    }
}

/// What `probe` should do.
#[derive(Debug, Clone, Copy)]
pub struct ProbePlan {
    /// Blade.
    pub shelf: u16,
    /// Blade.
    pub slot: u8,
    /// A probe this often.
    pub every: Duration,
    /// Answers collected this long.
    pub window: Duration,
    /// Run this long (or until stop).
    pub duration: Option<Duration>,
}

/// The outcome of a run of probes.
#[derive(Debug, Clone, Default)]
pub struct ProbeSummary {
    /// Probes made.
    pub probes: u64,
    /// Probes nobody answered.
    pub none: u64,
    /// Probes answered exactly once.
    pub one: u64,
    /// Probes answered two or more times: two nodes answering, from two MACs or one shared.
    pub two: u64,
    /// Probes two or more distinct MACs answered (a subset of `two`).
    pub two_macs: u64,
    /// Probes one MAC answered two or more times (a subset of `two`): two nodes at one
    /// shared service MAC.
    pub same_mac: u64,
    /// The most answers one probe got.
    pub most: usize,
    /// Every MAC seen answering, sorted.
    pub macs: Vec<MacAddr>,
}

impl ProbeSummary {
    /// Counts one sample.
    pub fn add(&mut self, sample: &ProbeSample) {
        self.probes += 1;
        let count = sample.count();
        match count {
            0 => self.none += 1,
            1 => self.one += 1,
            _ => self.two += 1,
        }
        if sample.answers.len() > 1 {
            self.two_macs += 1;
        }
        if sample.answers.iter().any(|(_, n)| *n > 1) {
            self.same_mac += 1;
        }
        self.most = self.most.max(count);
        for (mac, _) in &sample.answers {
            if !self.macs.contains(mac) {
                self.macs.push(*mac);
                self.macs.sort();
            }
        }
    }
}

fn config_query(init: &mut Initiator, shelf: u16, slot: u8) -> (u32, Vec<u8>) {
    let header = init.header(MacAddr::BROADCAST, shelf, slot, Command::Config);
    (header.tag, PacketRepr::config_query(header).to_frame())
}

impl Initiator {
    /// One probe: a config query for `shelf.slot` with a tag of its own, sent once; every
    /// answer carrying that tag within `window`, counted per source MAC (see [`ProbeSample`]).
    pub fn probe_once(&mut self, shelf: u16, slot: u8, window: Duration) -> Result<ProbeSample> {
        let (tag, frame) = config_query(self, shelf, slot);
        self.socket.send(&frame)?;
        let deadline = Instant::now() + window;
        let mut sample = ProbeSample::default();
        let mut buf = vec![0u8; 65536];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(len) = self.socket.recv(&mut buf, left)? else {
                break;
            };
            let Ok(view) = Frame::new_checked(&buf[..len]) else {
                continue;
            };
            if view.is_response()
                && view.command() == Command::Config
                && view.tag() == tag
                && view.shelf() == shelf
                && view.slot() == slot
            {
                sample.heard(view.src());
            }
        }
        Ok(sample)
    }

    /// Probes as `plan` says until its duration passes or `stop` is set, calling `each` with
    /// every sample.
    pub fn probe(
        &mut self,
        plan: &ProbePlan,
        stop: &AtomicBool,
        mut each: impl FnMut(&ProbeSample) -> std::io::Result<()>,
    ) -> Result<ProbeSummary> {
        let ProbePlan {
            shelf,
            slot,
            every,
            window,
            duration,
        } = *plan;
        let started = Instant::now();
        let mut summary = ProbeSummary::default();
        let mut next = started;
        while !stop.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            next += every;
            if next < now {
                next = now + every; // fell behind (a busy machine): no burst to catch up
            }
            let at = now.duration_since(started);
            let mut sample = self.probe_once(shelf, slot, window)?;
            sample.at = at;
            each(&sample)?;
            summary.add(&sample);
        }
        Ok(summary)
    }
}

/// What `versioned` should do.
#[derive(Debug, Clone)]
pub struct VersionedPlan {
    /// Blade.
    pub shelf: u16,
    /// Blade.
    pub slot: u8,
    /// Blocks (4 KiB each) of the region.
    pub blocks: u64,
    /// First sector of the region.
    pub start_sector: u64,
    /// Writes (frames) in flight.
    pub outstanding: usize,
    /// Sectors per frame (at most what the targets advertise).
    pub sectors_per_frame: u8,
    /// Resend a frame unanswered for this long (new tag, next MAC).
    pub retransmit_after: Duration,
    /// Give up if one block's write is unacknowledged for this long.
    pub give_up_after: Duration,
    /// Run this long (or until stop).
    pub duration: Option<Duration>,
    /// Rediscover every MAC that answers this often (and at once after a timeout).
    pub rediscover_every: Duration,
    /// A MAC that answered no config query for this long is dropped.
    pub forget_after: Duration,
    /// Versions written are `version_base + 1`, `+ 2`, ... per block.
    pub version_base: u64,
    /// After stop, wait this long for the writes in flight.
    pub drain: Duration,
}

/// What `versioned` measured.
#[derive(Debug, Clone, Default)]
pub struct VersionedReport {
    /// Block writes acknowledged (every frame of the block).
    pub acked: u64,
    /// Per block, the last acknowledged version (0: none).
    pub last_acked: Vec<u64>,
    /// Gaps between consecutive acknowledgements.
    pub gaps: Vec<Duration>,
    /// Gaps over 500 ms: (start of the gap since the run began, gap).
    pub long_gaps: Vec<(Duration, Duration)>,
    /// Time from the last acknowledgement to the end of the run.
    pub tail: Duration,
    /// Frames resent.
    pub retransmits: u64,
    /// Errors the target reported (AoE error flag, ATA failure status), all retried.
    pub errors: u64,
    /// Distinct MACs that acknowledged writes.
    pub acked_by: Vec<MacAddr>,
    /// Every MAC that answered a config query.
    pub macs_seen: Vec<MacAddr>,
    /// Discovery queries (each sent once, with a tag of its own) answered two or more times:
    /// two nodes answering, even from one shared service MAC.
    pub double_answers: u64,
    /// A write went unacknowledged for the give-up time.
    pub gave_up: bool,
    /// Per block, whether a write was still unfinished at the end (after the drain): such a
    /// block may hold a mix of the acknowledged version and the next.
    pub unfinished: Vec<bool>,
    /// Wall time.
    pub elapsed: Duration,
    /// When the run started (the origin of the ack log's `t_ms`), in milliseconds since the
    /// Unix epoch: lets a script place an event it timed with the clock among the acks.
    pub started_unix_ms: u64,
}

impl VersionedReport {
    /// The longest gap between acknowledgements.
    pub fn stall_max(&self) -> Duration {
        self.gaps.iter().copied().max().unwrap_or_default()
    }

    /// The median gap between acknowledgements.
    pub fn stall_p50(&self) -> Duration {
        if self.gaps.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.gaps.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }
}

struct Part {
    block: u64,
    version: u64,
    part: usize,
    sent_at: Instant,
    mac: MacAddr,
    frame: Vec<u8>,
}

struct BlockWrite {
    version: u64,
    parts_left: usize,
    started: Instant,
}

/// The MACs answering the blade, as the Linux driver keeps its targets: every MAC that
/// answers a config query (or announces itself) is used, round-robin.
struct Paths {
    macs: Vec<(MacAddr, Instant)>,
    next: usize,
    seen: Vec<MacAddr>,
}

impl Paths {
    fn heard(&mut self, mac: MacAddr, now: Instant) {
        if !self.seen.contains(&mac) {
            self.seen.push(mac);
        }
        match self.macs.iter_mut().find(|(m, _)| *m == mac) {
            Some(entry) => entry.1 = now,
            None => self.macs.push((mac, now)),
        }
    }

    fn forget_older_than(&mut self, limit: Duration, now: Instant) {
        self.macs.retain(|(_, t)| now.duration_since(*t) <= limit);
    }

    /// The next MAC in turn, avoiding `not` if another one is there.
    fn pick(&mut self, not: Option<MacAddr>) -> Option<MacAddr> {
        if self.macs.is_empty() {
            return None;
        }
        for _ in 0..self.macs.len() {
            let mac = self.macs[self.next % self.macs.len()].0;
            self.next = self.next.wrapping_add(1);
            if Some(mac) != not || self.macs.len() == 1 {
                return Some(mac);
            }
        }
        None
    }
}

impl Initiator {
    fn write_part_frame(
        &mut self,
        mac: MacAddr,
        plan: &VersionedPlan,
        block: u64,
        version: u64,
        part: usize,
    ) -> (u32, Vec<u8>) {
        let spf = usize::from(plan.sectors_per_frame);
        let first = part * spf;
        let sectors = spf.min(BLOCK_SECTORS as usize - first);
        let header = self.header(mac, plan.shelf, plan.slot, Command::Ata);
        let tag = header.tag;
        let repr = PacketRepr {
            header,
            arg: ArgRepr::Ata(AtaRepr {
                aflags: ata_flags::EXTENDED | ata_flags::WRITE,
                err_feature: 0,
                sector_count: sectors as u8,
                cmd_status: WRITE_EXT,
                lba: plan.start_sector + block * BLOCK_SECTORS + first as u64,
            }),
        };
        let mut data = vec![0u8; BLOCK_BYTES];
        encode_block(block, version, &mut data);
        let len = repr.buffer_len();
        let mut frame = vec![0u8; (len + sectors * 512).max(aoe::MIN_FRAME_LEN)];
        repr.emit(&mut Frame::new_unchecked(&mut frame[..]));
        frame[len..len + sectors * 512]
            .copy_from_slice(&data[first * 512..(first + sectors) * 512]);
        (tag, frame)
    }

    /// The versioned writer: see the module documentation. `ack_log` gets one line per
    /// acknowledged block write (`t_ms block version mac`).
    pub fn versioned(
        &mut self,
        plan: &VersionedPlan,
        stop: &AtomicBool,
        mut ack_log: Option<&mut dyn Write>,
    ) -> Result<VersionedReport> {
        assert!(plan.sectors_per_frame > 0 && plan.blocks > 0);
        let parts = (BLOCK_SECTORS as usize).div_ceil(usize::from(plan.sectors_per_frame));
        let blocks = plan.blocks as usize;
        let mut report = VersionedReport {
            last_acked: vec![0; blocks],
            ..Default::default()
        };
        let mut written = vec![0u64; blocks]; // versions handed out, per block
        let mut writing: Vec<Option<BlockWrite>> = (0..blocks).map(|_| None).collect();
        let mut in_flight: HashMap<u32, Part> = HashMap::new();
        let mut paths = Paths {
            macs: Vec::new(),
            next: 0,
            seen: Vec::new(),
        };
        // The last discovery queries' tags and how many answers each got.
        let mut discovery_tags: Vec<(u32, usize)> = Vec::new();
        let mut last_discovery: Option<Instant> = None;
        let mut cursor = 0usize;
        let started = Instant::now();
        report.started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut last_ack = started;
        let mut stopping_since: Option<Instant> = None;
        let batch = 64usize;
        let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; 9100]).collect();
        let mut lens = vec![0usize; batch];
        loop {
            let now = Instant::now();
            if stopping_since.is_none()
                && (stop.load(Ordering::SeqCst)
                    || plan
                        .duration
                        .is_some_and(|d| now.duration_since(started) >= d))
            {
                stopping_since = Some(now);
            }
            if let Some(since) = stopping_since {
                if in_flight.is_empty() || now.duration_since(since) >= plan.drain {
                    break;
                }
            }
            // Discovery: at start, every rediscover_every, and at once after a timeout.
            if last_discovery.is_none_or(|t| now.duration_since(t) >= plan.rediscover_every) {
                let (tag, frame) = config_query(self, plan.shelf, plan.slot);
                self.socket.send(&frame)?;
                discovery_tags.push((tag, 0));
                if discovery_tags.len() > 16 {
                    discovery_tags.remove(0);
                }
                last_discovery = Some(now);
                paths.forget_older_than(plan.forget_after, now);
            }
            // New block writes while there is room.
            let mut to_send: Vec<Vec<u8>> = Vec::new();
            if stopping_since.is_none() && !paths.macs.is_empty() {
                let mut scanned = 0;
                while in_flight.len() + parts <= plan.outstanding.max(parts) && scanned < blocks {
                    let block = cursor % blocks;
                    cursor = cursor.wrapping_add(1);
                    scanned += 1;
                    if writing[block].is_some() {
                        continue;
                    }
                    written[block] += 1;
                    let version = plan.version_base + written[block];
                    writing[block] = Some(BlockWrite {
                        version,
                        parts_left: parts,
                        started: now,
                    });
                    for part in 0..parts {
                        let mac = paths.pick(None).expect("a MAC");
                        let (tag, frame) =
                            self.write_part_frame(mac, plan, block as u64, version, part);
                        in_flight.insert(
                            tag,
                            Part {
                                block: block as u64,
                                version,
                                part,
                                sent_at: now,
                                mac,
                                frame: frame.clone(),
                            },
                        );
                        to_send.push(frame);
                    }
                }
            }
            if !to_send.is_empty() {
                let refs: Vec<&[u8]> = to_send.iter().map(|f| f.as_slice()).collect();
                self.socket.send_batch(&refs)?;
            }
            let n = self
                .socket
                .recv_batch(&mut bufs, &mut lens, Duration::from_millis(10))?;
            let now = Instant::now();
            for i in 0..n {
                let Ok(view) = Frame::new_checked(&bufs[i][..lens[i]]) else {
                    continue;
                };
                if !view.is_response() || view.shelf() != plan.shelf || view.slot() != plan.slot {
                    continue;
                }
                if view.command() == Command::Config {
                    // Answers to our queries, and announcements (tag 0).
                    if view.tag() == 0 {
                        paths.heard(view.src(), now);
                    } else if let Some(entry) =
                        discovery_tags.iter_mut().find(|(t, _)| *t == view.tag())
                    {
                        entry.1 += 1;
                        if entry.1 == 2 {
                            report.double_answers += 1;
                        }
                        paths.heard(view.src(), now);
                    }
                    continue;
                }
                if view.command() != Command::Ata {
                    continue;
                }
                let Some(part) = in_flight.remove(&view.tag()) else {
                    continue;
                };
                let payload = view.payload();
                let failed = view.is_error()
                    || payload.len() < aoe::ATA_ARG_LEN
                    || payload[3] & FAILURE_STATUS != 0;
                if failed {
                    // Retried: back in flight under the same tag, resent at its timeout.
                    report.errors += 1;
                    in_flight.insert(view.tag(), part);
                    continue;
                }
                if !report.acked_by.contains(&view.src()) {
                    report.acked_by.push(view.src());
                }
                let block = part.block as usize;
                let done = match writing[block].as_mut() {
                    Some(w) if w.version == part.version => {
                        w.parts_left -= 1;
                        w.parts_left == 0
                    }
                    _ => false,
                };
                if done {
                    writing[block] = None;
                    report.last_acked[block] = part.version;
                    report.acked += 1;
                    let gap = now.duration_since(last_ack);
                    if report.acked > 1 {
                        report.gaps.push(gap);
                        if gap > Duration::from_millis(500) {
                            report
                                .long_gaps
                                .push((last_ack.duration_since(started), gap));
                        }
                    }
                    last_ack = now;
                    if let Some(log) = ack_log.as_mut() {
                        writeln!(
                            log,
                            "{} {} {} {}",
                            now.duration_since(started).as_millis(),
                            part.block,
                            part.version,
                            view.src()
                        )?;
                    }
                }
            }
            // Give up on a block write unacknowledged for too long.
            if writing
                .iter()
                .flatten()
                .any(|w| now.duration_since(w.started) > plan.give_up_after)
            {
                report.gave_up = true;
                break;
            }
            // Resend what waited too long: a new tag, the next MAC, and rediscover now.
            let stale: Vec<u32> = in_flight
                .iter()
                .filter(|(_, p)| now.duration_since(p.sent_at) > plan.retransmit_after)
                .map(|(t, _)| *t)
                .collect();
            if !stale.is_empty() {
                if last_discovery.is_some_and(|t| now.duration_since(t) >= plan.retransmit_after) {
                    last_discovery = None; // at the top of the next round
                }
                let mut resend = Vec::new();
                for old in stale {
                    let mut part = in_flight.remove(&old).expect("present");
                    let Some(mac) = paths.pick(Some(part.mac)) else {
                        in_flight.insert(old, part); // nobody to send to yet
                        continue;
                    };
                    let (tag, frame) =
                        self.write_part_frame(mac, plan, part.block, part.version, part.part);
                    part.frame = frame;
                    part.mac = mac;
                    part.sent_at = now;
                    resend.push(part.frame.clone());
                    in_flight.insert(tag, part);
                    report.retransmits += 1;
                }
                if !resend.is_empty() {
                    let refs: Vec<&[u8]> = resend.iter().map(|f| f.as_slice()).collect();
                    self.socket.send_batch(&refs)?;
                }
            }
        }
        report.unfinished = writing.iter().map(Option::is_some).collect();
        report.tail = last_ack.elapsed();
        report.elapsed = started.elapsed();
        report.macs_seen = paths.seen;
        Ok(report)
    }

    /// Reads `blocks` versioned blocks from `start_sector` of `target` (one MAC).
    pub fn read_blocks(
        &mut self,
        target: &Target,
        start_sector: u64,
        blocks: u64,
    ) -> Result<Vec<u8>> {
        let path = std::env::temp_dir().join(format!(
            "aoe-init-verify-{}-{}",
            std::process::id(),
            start_sector
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let _ = std::fs::remove_file(&path);
        let file = std::sync::Arc::new(file);
        let plan = crate::IoPlan {
            write: false,
            start_sector,
            sectors: blocks * BLOCK_SECTORS,
            sectors_per_frame: target.sectors_per_frame,
            outstanding: 16,
            seed: 0,
            verify: false,
            retransmit_after: Duration::from_millis(200),
            give_up_after: Duration::from_secs(30),
            random: false,
            out: Some(file.clone()),
        };
        self.run(target, &plan)?;
        let mut data = vec![0u8; (blocks * BLOCK_SECTORS * 512) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut data, start_sector * 512)
            .map_err(InitiatorError::Io)?;
        Ok(data)
    }
}

/// The acknowledged log `versioned` writes: a header line, then `block version` per block, with
/// ` unfinished` after it when a write of the block was still unacknowledged at the end.
pub fn write_acks(
    out: &mut dyn Write,
    start_sector: u64,
    version_base: u64,
    last_acked: &[u64],
    unfinished: &[bool],
) -> std::io::Result<()> {
    writeln!(
        out,
        "# versioned offset={} blocks={} base={}",
        start_sector * 512,
        last_acked.len(),
        version_base
    )?;
    for (block, version) in last_acked.iter().enumerate() {
        if unfinished.get(block).copied().unwrap_or(false) {
            writeln!(out, "{block} {version} unfinished")?;
        } else {
            writeln!(out, "{block} {version}")?;
        }
    }
    Ok(())
}

/// What [`write_acks`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acks {
    /// Start of the region in bytes.
    pub offset: u64,
    /// Last acknowledged version per block.
    pub versions: Vec<u64>,
    /// Per block: a write was unfinished at the end.
    pub unfinished: Vec<bool>,
}

/// Parses what [`write_acks`] wrote.
pub fn parse_acks(text: &str) -> std::result::Result<Acks, String> {
    let mut offset = None;
    let mut versions = Vec::new();
    let mut unfinished = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(header) = line.strip_prefix("# versioned ") {
            for field in header.split_whitespace() {
                if let Some(v) = field.strip_prefix("offset=") {
                    offset = Some(v.parse::<u64>().map_err(|e| format!("offset: {e}"))?);
                }
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(block), Some(version), flag, None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("line {}: want `block version [unfinished]`", n + 1));
        };
        match flag {
            None => unfinished.push(false),
            Some("unfinished") => unfinished.push(true),
            Some(other) => return Err(format!("line {}: unknown flag {other:?}", n + 1)),
        }
        let block: usize = block.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        if block != versions.len() {
            return Err(format!("line {}: block {block} out of order", n + 1));
        }
        versions.push(
            version
                .parse()
                .map_err(|e| format!("line {}: {e}", n + 1))?,
        );
    }
    Ok(Acks {
        offset: offset.ok_or("no `# versioned offset=` header")?,
        versions,
        unfinished,
    })
}

/// The outcome of `verify-versions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blocks checked.
    pub blocks: u64,
    /// Intact and at least the acknowledged version.
    pub ok: u64,
    /// Intact (or unwritten) but older than acknowledged: lost writes. (block, have, acked).
    pub behind: Vec<(u64, u64, u64)>,
    /// Damaged or torn blocks.
    pub torn: Vec<u64>,
    /// Torn blocks whose last write was unfinished when the client stopped (not a failure).
    pub torn_unfinished: u64,
}

/// Compares what the device holds (`data`, the region) with the acknowledged versions. A block
/// whose write was unfinished may be torn (the acknowledged version and parts of the next).
pub fn verify_versions(data: &[u8], acks: &Acks) -> VerifyReport {
    let mut report = VerifyReport::default();
    for (block, &want) in acks.versions.iter().enumerate() {
        let unfinished = acks.unfinished.get(block).copied().unwrap_or(false);
        let b = block as u64;
        report.blocks += 1;
        let Some(chunk) = data.get(block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES) else {
            report.torn.push(b);
            continue;
        };
        match decode_block(b, chunk) {
            BlockState::Torn if unfinished => {
                report.torn_unfinished += 1;
                report.ok += 1;
            }
            BlockState::Torn => report.torn.push(b),
            BlockState::Unwritten if want > 0 => report.behind.push((b, 0, want)),
            BlockState::Version(v) if v < want => report.behind.push((b, v, want)),
            _ => report.ok += 1,
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_decodes_to_its_version() {
        let mut data = vec![0u8; BLOCK_BYTES];
        encode_block(7, 123, &mut data);
        assert_eq!(decode_block(7, &data), BlockState::Version(123));
        assert_eq!(decode_block(7, &[0u8; BLOCK_BYTES]), BlockState::Unwritten);
    }

    #[test]
    fn a_block_at_the_wrong_place_is_torn() {
        let mut data = vec![0u8; BLOCK_BYTES];
        encode_block(7, 123, &mut data);
        assert_eq!(decode_block(8, &data), BlockState::Torn);
    }

    #[test]
    fn sectors_of_two_versions_are_torn() {
        let mut old = vec![0u8; BLOCK_BYTES];
        let mut new = vec![0u8; BLOCK_BYTES];
        encode_block(3, 10, &mut old);
        encode_block(3, 11, &mut new);
        assert_ne!(old, new);
        for split in 1..BLOCK_SECTORS as usize {
            let mut mixed = new.clone();
            mixed[split * 512..].copy_from_slice(&old[split * 512..]);
            assert_eq!(decode_block(3, &mixed), BlockState::Torn, "split {split}");
            let mut mixed = old.clone();
            mixed[split * 512..].copy_from_slice(&new[split * 512..]);
            assert_eq!(decode_block(3, &mixed), BlockState::Torn, "split {split}");
        }
        // Half written over zeros, as a block whose first frames landed on a fresh disk.
        let mut half = vec![0u8; BLOCK_BYTES];
        half[..1024].copy_from_slice(&new[..1024]);
        assert_eq!(decode_block(3, &half), BlockState::Torn);
    }

    #[test]
    fn any_flipped_bit_is_torn() {
        let mut data = vec![0u8; BLOCK_BYTES];
        encode_block(1, 2, &mut data);
        for byte in [
            0,
            9,
            17,
            30,
            511,
            512,
            2000,
            BLOCK_BYTES - 9,
            BLOCK_BYTES - 1,
        ] {
            let mut bad = data.clone();
            bad[byte] ^= 0x10;
            assert_eq!(decode_block(1, &bad), BlockState::Torn, "byte {byte}");
        }
    }

    #[test]
    fn verify_counts_behind_and_torn() {
        let mut data = vec![0u8; 4 * BLOCK_BYTES];
        encode_block(0, 5, &mut data[..BLOCK_BYTES]);
        encode_block(1, 4, &mut data[BLOCK_BYTES..2 * BLOCK_BYTES]);
        encode_block(2, 9, &mut data[2 * BLOCK_BYTES..3 * BLOCK_BYTES]);
        data[2 * BLOCK_BYTES + 100] ^= 1;
        // Block 3 unwritten.
        let acks = |versions: &[u64]| Acks {
            offset: 0,
            versions: versions.to_vec(),
            unfinished: vec![false; versions.len()],
        };
        let report = verify_versions(&data, &acks(&[5, 5, 9, 0]));
        assert_eq!(report.blocks, 4);
        assert_eq!(report.ok, 2); // block 0 (equal) and block 3 (nothing acknowledged)
        assert_eq!(report.behind, vec![(1, 4, 5)]);
        assert_eq!(report.torn, vec![2]);
        // Newer than acknowledged is fine (a write in flight at the end may have landed).
        let report = verify_versions(&data[..BLOCK_BYTES], &acks(&[3]));
        assert_eq!(report.ok, 1);
        // An unwritten block with an acknowledged version is behind.
        let report = verify_versions(&data[3 * BLOCK_BYTES..], &acks(&[0]));
        assert_eq!(report.ok, 1);
        let zeros = vec![0u8; BLOCK_BYTES];
        assert_eq!(verify_versions(&zeros, &acks(&[1])).behind, vec![(0, 0, 1)]);
        // A torn block whose write was unfinished is no failure; behind still is.
        let mut pending = acks(&[5, 5, 9, 0]);
        pending.unfinished = vec![true, true, true, false];
        let report = verify_versions(&data, &pending);
        assert_eq!((report.ok, report.torn_unfinished), (3, 1));
        assert_eq!(report.behind, vec![(1, 4, 5)]);
        assert!(report.torn.is_empty());
    }

    #[test]
    fn the_acks_file_round_trips() {
        let mut out = Vec::new();
        write_acks(&mut out, 2048, 77, &[0, 3, 9], &[false, true, false]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            parse_acks(&text).unwrap(),
            Acks {
                offset: 2048 * 512,
                versions: vec![0, 3, 9],
                unfinished: vec![false, true, false],
            }
        );
        assert!(parse_acks("# versioned offset=0\n0 1 maybe\n").is_err());
        assert!(parse_acks("0 1\n").is_err());
        assert!(parse_acks("# versioned offset=0 blocks=2\n1 1\n").is_err());
    }

    #[test]
    fn probe_summary_counts_answers_per_query_not_macs() {
        let mac = |b| MacAddr([2, 0, 0, 0, 0, b]);
        let mut s = ProbeSummary::default();
        let heard = [
            vec![],
            vec![mac(1)],
            vec![mac(2), mac(1)],
            vec![mac(2)],
            vec![mac(3), mac(3)], // two nodes at one shared MAC
            vec![mac(3), mac(1), mac(3)],
        ];
        let mut texts = Vec::new();
        for answers in heard {
            let mut sample = ProbeSample::default();
            for m in answers {
                sample.heard(m);
            }
            texts.push(sample.answers_text());
            s.add(&sample);
        }
        assert_eq!((s.probes, s.none, s.one, s.two), (6, 1, 2, 3));
        assert_eq!((s.two_macs, s.same_mac, s.most), (2, 2, 3));
        assert_eq!(s.macs, vec![mac(1), mac(2), mac(3)]);
        assert_eq!(texts[0], "-");
        assert_eq!(texts[2], format!("{},{}", mac(1), mac(2)));
        assert_eq!(texts[4], format!("{}*2", mac(3)));
        assert_eq!(texts[5], format!("{},{}*2", mac(1), mac(3)));
    }

    #[test]
    fn paths_round_robin_and_avoid_the_last_mac() {
        let now = Instant::now();
        let mac = |b| MacAddr([2, 0, 0, 0, 0, b]);
        let mut p = Paths {
            macs: Vec::new(),
            next: 0,
            seen: Vec::new(),
        };
        assert_eq!(p.pick(None), None);
        p.heard(mac(1), now);
        assert_eq!(p.pick(Some(mac(1))), Some(mac(1))); // the only one
        p.heard(mac(2), now);
        let picks: Vec<_> = (0..4).map(|_| p.pick(None).unwrap()).collect();
        assert!(picks.contains(&mac(1)) && picks.contains(&mac(2)));
        for _ in 0..4 {
            assert_eq!(p.pick(Some(mac(1))), Some(mac(2)));
        }
        p.forget_older_than(Duration::from_secs(1), now + Duration::from_secs(2));
        assert_eq!(p.pick(None), None);
    }
}
