//! A [`BlockDevice`] that simulates a power cut: what was not flushed may be lost or torn.
//!
//! Killing a process never tests crash safety, because the page cache survives it. This device
//! keeps an in-memory **durable image** plus a **volatile layer**: the writes that completed
//! since the last flush, in order. Reads see both. Then:
//!
//! * a write with `fua = true` goes straight to the durable image;
//! * [`flush`](BlockDevice::flush) moves the whole volatile layer into the durable image;
//! * [`CrashDevice::crash`] cuts the power *now* and returns the durable image that survives as
//!   a new device, according to a [`CrashMode`]:
//!   * [`CrashMode::DropAll`]: every unflushed write is lost;
//!   * [`CrashMode::KeepSubset`]: each 512-byte sector of each unflushed write independently
//!     reached the disk or not (a seeded choice), applied in write order — so a multi-sector
//!     write may be half there, and an older version of a sector may win over a newer one;
//!   * [`CrashMode::TearSector`]: like `KeepSubset`, and in addition one sector of one
//!     unflushed write is torn: a random prefix of it is new, the rest is what was there.
//!
//! # Crashing at every durability point
//!
//! With [`CrashDevice::record_history`], the device logs every write and flush. A *durability
//! point* is a flush or a FUA write: the moments something becomes durable.
//! [`CrashDevice::crash_at`] rebuilds the disk as a power cut **while point `k` was in flight**
//! would leave it: everything made durable before it, plus the chosen subset of what was
//! volatile — and a FUA write that was in flight counts as volatile (it may be lost or torn).
//! Point [`durability_points`](CrashDevice::durability_points) means "now". Property tests
//! run a workload once and then crash it at every point, in every mode.
//!
//! Several devices can share one power supply ([`CrashDevice::record_group_history`]): their
//! operations go into one log, points are counted across all of them, and
//! [`CrashDevice::crash_group_at`] cuts the power to all of them at the same moment — what a
//! node with its data and meta-data on two disks sees.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{check_range, BlockDevice, Capabilities, Result, SECTOR_SIZE};

/// What a simulated power cut does with the writes that were not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unflushed write is lost.
    DropAll,
    /// A seeded, arbitrary subset of the unflushed sectors survives.
    KeepSubset(u64),
    /// A seeded subset survives and one unflushed sector is torn.
    TearSector(u64),
}

/// One logged operation.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
}

#[derive(Debug, Clone)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

#[derive(Debug)]
struct History {
    /// Durable image of each device when recording started.
    bases: Vec<Vec<u8>>,
    /// (device index, operation), in the order they happened.
    ops: Vec<(usize, Op)>,
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    /// Unflushed writes in order; reads see them on top of `durable`.
    volatile: Vec<Pending>,
    history: Option<(Arc<Mutex<History>>, usize)>,
    writes: u64,
    fua_writes: u64,
    flushes: u64,
}

/// An in-memory device with a volatile write cache that a simulated crash can drop or tear.
#[derive(Debug)]
pub struct CrashDevice {
    size: u64,
    state: Mutex<State>,
}

/// A small deterministic generator (splitmix64) so crash modes are reproducible from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

impl CrashDevice {
    /// A zero-filled device of `size` bytes (rounded down to whole sectors).
    pub fn new(size: u64) -> Self {
        Self::from_image(vec![0; (size - size % SECTOR_SIZE) as usize])
    }

    /// A device whose durable contents are `image` (truncated to whole sectors).
    pub fn from_image(mut image: Vec<u8>) -> Self {
        image.truncate(image.len() - image.len() % SECTOR_SIZE as usize);
        CrashDevice {
            size: image.len() as u64,
            state: Mutex::new(State {
                durable: image,
                volatile: Vec::new(),
                history: None,
                writes: 0,
                fua_writes: 0,
                flushes: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts logging every write and flush, from the current state, for
    /// [`crash_at`](Self::crash_at). Unflushed writes already present are logged as the first
    /// (non-FUA) operations.
    pub fn record_history(&self) {
        Self::record_group_history(&[self]);
    }

    /// Like [`record_history`](Self::record_history) for devices that share a power supply:
    /// one log, points counted across all of them.
    pub fn record_group_history(devices: &[&CrashDevice]) {
        let history = Arc::new(Mutex::new(History {
            bases: Vec::new(),
            ops: Vec::new(),
        }));
        for (i, dev) in devices.iter().enumerate() {
            let mut st = dev.lock();
            let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
            h.bases.push(st.durable.clone());
            for p in &st.volatile {
                h.ops.push((
                    i,
                    Op::Write {
                        offset: p.offset,
                        data: p.data.clone(),
                        fua: false,
                    },
                ));
            }
            drop(h);
            st.history = Some((history.clone(), i));
        }
    }

    fn history(&self) -> (Arc<Mutex<History>>, usize) {
        self.lock()
            .history
            .clone()
            .expect("record_history was not called")
    }

    /// Number of durability points (flushes and FUA writes) logged since
    /// [`record_history`](Self::record_history), on this device and those sharing its log.
    pub fn durability_points(&self) -> usize {
        let Some((history, _)) = self.lock().history.clone() else {
            return 0;
        };
        let h = history.lock().unwrap_or_else(|e| e.into_inner());
        h.ops.iter().filter(|(_, op)| is_point(op)).count()
    }

    /// Cuts the power now and returns what survives, as a new device.
    pub fn crash(&self, mode: CrashMode) -> CrashDevice {
        let st = self.lock();
        CrashDevice::from_image(settle(st.durable.clone(), pending(&st.volatile), mode))
    }

    /// Cuts the power while durability point `point` (0-based, in log order) was in flight and
    /// returns what survives of this device. `point == durability_points()` is the same as
    /// [`crash`](Self::crash).
    ///
    /// Panics if history is not being recorded or `point` is beyond the end.
    pub fn crash_at(&self, point: usize, mode: CrashMode) -> CrashDevice {
        let (history, index) = self.history();
        let h = history.lock().unwrap_or_else(|e| e.into_inner());
        CrashDevice::from_image(replay(&h, index, point, mode))
    }

    /// Cuts the power to every device of a group (see
    /// [`record_group_history`](Self::record_group_history)) at the same moment: while point
    /// `point` was in flight. Returns the survivors in the order the group was formed.
    pub fn crash_group_at(
        devices: &[&CrashDevice],
        point: usize,
        mode: CrashMode,
    ) -> Vec<CrashDevice> {
        devices.iter().map(|d| d.crash_at(point, mode)).collect()
    }

    /// Calls `f` once for every durability point of a recorded group (`devices` in the order
    /// the group was formed, or one device that recorded alone), in order, and once more for
    /// "now": the [`Cut`] crashes the group while that point was in flight. The same images as
    /// [`crash_group_at`](Self::crash_group_at) for each point, but the log is replayed once
    /// instead of once per point, mode and device — what makes crashing at every point of
    /// every case cheap enough for property tests.
    ///
    /// Panics if `devices` is not exactly the recorded group.
    pub fn for_each_crash_point(devices: &[&CrashDevice], mut f: impl FnMut(&Cut<'_>)) {
        let (history, _) = devices[0].history();
        for (i, d) in devices.iter().enumerate() {
            let (h, index) = d.history();
            assert!(
                Arc::ptr_eq(&h, &history) && index == i,
                "device {i} is not member {i} of the recorded group"
            );
        }
        // A snapshot, so `f` may use the devices (and their log) freely.
        let (mut durable, ops) = {
            let h = history.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(h.bases.len(), devices.len(), "not the whole recorded group");
            (h.bases.clone(), h.ops.clone())
        };
        let mut volatile: Vec<Vec<Pending>> = vec![Vec::new(); devices.len()];
        let mut point = 0;
        for (dev, op) in &ops {
            if is_point(op) {
                let in_flight = match op {
                    Op::Write { offset, data, .. } => Some((*dev, *offset, &data[..])),
                    Op::Flush => None,
                };
                f(&Cut {
                    point,
                    durable: &durable,
                    volatile: &volatile,
                    in_flight,
                });
                point += 1;
            }
            match op {
                Op::Write {
                    offset,
                    data,
                    fua: true,
                } => {
                    apply(&mut durable[*dev], *offset, data);
                    supersede(&mut volatile[*dev], *offset, data.len() as u64);
                }
                Op::Write { offset, data, .. } => volatile[*dev].push(Pending {
                    offset: *offset,
                    data: data.clone(),
                }),
                Op::Flush => {
                    for p in volatile[*dev].drain(..) {
                        apply(&mut durable[*dev], p.offset, &p.data);
                    }
                }
            }
        }
        f(&Cut {
            point,
            durable: &durable,
            volatile: &volatile,
            in_flight: None,
        });
    }

    /// The durable image: what [`CrashMode::DropAll`] would leave.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// What reads see now.
    pub fn image(&self) -> Vec<u8> {
        let st = self.lock();
        let mut image = st.durable.clone();
        for p in &st.volatile {
            apply(&mut image, p.offset, &p.data);
        }
        image
    }

    /// Number of writes in the volatile layer.
    pub fn unflushed_writes(&self) -> usize {
        self.lock().volatile.len()
    }

    /// Writes so far (FUA included).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// FUA writes so far.
    pub fn fua_writes(&self) -> u64 {
        self.lock().fua_writes
    }

    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
}

/// A crash group frozen while one durability point was in flight (see
/// [`CrashDevice::for_each_crash_point`]).
#[derive(Debug)]
pub struct Cut<'a> {
    point: usize,
    durable: &'a [Vec<u8>],
    volatile: &'a [Vec<Pending>],
    /// The FUA write that was in flight: (device, offset, bytes). It may be lost or torn.
    in_flight: Option<(usize, u64, &'a [u8])>,
}

impl Cut<'_> {
    /// The durability point in flight (the number of points, for "now").
    pub fn point(&self) -> usize {
        self.point
    }

    /// Cuts the power: what survives of each device of the group, in group order.
    pub fn crash(&self, mode: CrashMode) -> Vec<CrashDevice> {
        (0..self.durable.len())
            .map(|i| {
                let extra = self
                    .in_flight
                    .filter(|&(dev, _, _)| dev == i)
                    .map(|(_, offset, data)| (offset, data));
                let writes = pending(&self.volatile[i]).chain(extra);
                CrashDevice::from_image(settle(
                    self.durable[i].clone(),
                    writes,
                    device_mode(mode, i),
                ))
            })
            .collect()
    }
}

fn is_point(op: &Op) -> bool {
    matches!(op, Op::Flush | Op::Write { fua: true, .. })
}

/// Each device of a group gets its own random choices from one seed.
fn device_mode(mode: CrashMode, index: usize) -> CrashMode {
    let mix = |seed: u64| seed ^ (index as u64).wrapping_mul(0x9e37_79b9);
    match mode {
        CrashMode::DropAll => CrashMode::DropAll,
        CrashMode::KeepSubset(seed) => CrashMode::KeepSubset(mix(seed)),
        CrashMode::TearSector(seed) => CrashMode::TearSector(mix(seed)),
    }
}

/// Rebuilds device `index` of a history as a power cut during point `point` leaves it.
fn replay(h: &History, index: usize, point: usize, mode: CrashMode) -> Vec<u8> {
    let mode = device_mode(mode, index);
    let mut durable = h.bases[index].clone();
    let mut volatile: Vec<Pending> = Vec::new();
    let mut seen = 0;
    for (dev, op) in &h.ops {
        let point_op = is_point(op);
        if point_op && seen == point {
            // In flight: a FUA write may or may not have landed; a flush had not finished.
            if let (true, Op::Write { offset, data, .. }) = (*dev == index, op) {
                volatile.push(Pending {
                    offset: *offset,
                    data: data.clone(),
                });
            }
            return settle(durable, pending(&volatile), mode);
        }
        if *dev == index {
            match op {
                Op::Write { offset, data, fua } => {
                    if *fua {
                        apply(&mut durable, *offset, data);
                        supersede(&mut volatile, *offset, data.len() as u64);
                    } else {
                        volatile.push(Pending {
                            offset: *offset,
                            data: data.clone(),
                        });
                    }
                }
                Op::Flush => {
                    for p in volatile.drain(..) {
                        apply(&mut durable, p.offset, &p.data);
                    }
                }
            }
        }
        if point_op {
            seen += 1;
        }
    }
    assert_eq!(seen, point, "durability point {point} beyond the log");
    settle(durable, pending(&volatile), mode)
}

fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let o = offset as usize;
    image[o..o + data.len()].copy_from_slice(data);
}

/// Cuts `[offset, offset + len)` out of the volatile writes: a FUA write replaced those bytes
/// in the cache too, so the older cached versions can never reach the disk after it.
fn supersede(volatile: &mut Vec<Pending>, offset: u64, len: u64) {
    let end = offset + len;
    let mut kept = Vec::with_capacity(volatile.len());
    for p in volatile.drain(..) {
        let p_end = p.offset + p.data.len() as u64;
        if p_end <= offset || p.offset >= end {
            kept.push(p);
            continue;
        }
        if p.offset < offset {
            kept.push(Pending {
                offset: p.offset,
                data: p.data[..(offset - p.offset) as usize].to_vec(),
            });
        }
        if p_end > end {
            kept.push(Pending {
                offset: end,
                data: p.data[(end - p.offset) as usize..].to_vec(),
            });
        }
    }
    *volatile = kept;
}

fn pending(volatile: &[Pending]) -> impl Iterator<Item = (u64, &[u8])> + Clone {
    volatile.iter().map(|p| (p.offset, &p.data[..]))
}

/// Applies `mode` to the volatile writes (offset, bytes; in write order) on top of `durable`.
fn settle<'a>(
    mut durable: Vec<u8>,
    volatile: impl Iterator<Item = (u64, &'a [u8])> + Clone,
    mode: CrashMode,
) -> Vec<u8> {
    let sector = SECTOR_SIZE as usize;
    let (seed, tear) = match mode {
        CrashMode::DropAll => return durable,
        CrashMode::KeepSubset(seed) => (seed, false),
        CrashMode::TearSector(seed) => (seed, true),
    };
    let mut rng = SplitMix64::new(seed);
    let total_sectors: usize = volatile
        .clone()
        .map(|(_, data)| data.len().div_ceil(sector))
        .sum();
    let torn = (tear && total_sectors > 0).then(|| rng.below(total_sectors as u64) as usize);
    let mut index = 0;
    for (offset, data) in volatile {
        for (i, chunk) in data.chunks(sector).enumerate() {
            let at = offset as usize + i * sector;
            if Some(index) == torn {
                // A prefix of 1..len-1 bytes is new; the rest keeps what was there.
                let cut = if chunk.len() > 1 {
                    1 + rng.below(chunk.len() as u64 - 1) as usize
                } else {
                    chunk.len()
                };
                durable[at..at + cut].copy_from_slice(&chunk[..cut]);
            } else if rng.next_u64() & 1 == 1 {
                durable[at..at + chunk.len()].copy_from_slice(chunk);
            }
            index += 1;
        }
    }
    durable
}

impl BlockDevice for CrashDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let st = self.lock();
        let o = offset as usize;
        let end = o + buf.len();
        buf.copy_from_slice(&st.durable[o..end]);
        for p in &st.volatile {
            let (p_start, p_end) = (p.offset as usize, p.offset as usize + p.data.len());
            let (from, to) = (p_start.max(o), p_end.min(end));
            if from < to {
                buf[from - o..to - o].copy_from_slice(&p.data[from - p_start..to - p_start]);
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let mut st = self.lock();
        st.writes += 1;
        if fua {
            st.fua_writes += 1;
            apply(&mut st.durable, offset, data);
            supersede(&mut st.volatile, offset, data.len() as u64);
        } else if !data.is_empty() {
            st.volatile.push(Pending {
                offset,
                data: data.to_vec(),
            });
        }
        if let Some((h, index)) = &st.history {
            if fua || !data.is_empty() {
                let op = Op::Write {
                    offset,
                    data: data.to_vec(),
                    fua,
                };
                h.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .ops
                    .push((*index, op));
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        st.flushes += 1;
        let volatile = std::mem::take(&mut st.volatile);
        for p in &volatile {
            apply(&mut st.durable, p.offset, &p.data);
        }
        if let Some((h, index)) = &st.history {
            h.lock()
                .unwrap_or_else(|e| e.into_inner())
                .ops
                .push((*index, Op::Flush));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{contract_suite, pattern, read};
    use super::*;

    #[test]
    fn passes_the_block_device_contract() {
        let dev = CrashDevice::new(1 << 20);
        contract_suite(&dev);
        // The contract suite ends with a flush: everything is durable.
        assert_eq!(dev.unflushed_writes(), 0);
        assert_eq!(dev.durable_image(), dev.image());
    }

    #[test]
    fn unflushed_writes_vanish_in_drop_all() {
        let dev = CrashDevice::new(64 * 1024);
        dev.write_at(&pattern(1, 4096), 0, false).unwrap();
        dev.flush().unwrap();
        dev.write_at(&pattern(2, 4096), 0, false).unwrap();
        dev.write_at(&pattern(3, 4096), 8192, false).unwrap();
        assert_eq!(read(&dev, 0, 4096), pattern(2, 4096), "reads see the cache");
        let after = dev.crash(CrashMode::DropAll);
        assert_eq!(read(&after, 0, 4096), pattern(1, 4096));
        assert_eq!(read(&after, 8192, 4096), vec![0; 4096]);
        assert_eq!(after.unflushed_writes(), 0);
        assert_eq!(after.size(), dev.size());
    }

    #[test]
    fn fua_writes_survive_every_crash() {
        let dev = CrashDevice::new(64 * 1024);
        dev.write_at(&pattern(4, 4096), 4096, true).unwrap();
        dev.write_at(&pattern(5, 4096), 0, false).unwrap();
        for mode in [
            CrashMode::DropAll,
            CrashMode::KeepSubset(7),
            CrashMode::TearSector(7),
        ] {
            let after = dev.crash(mode);
            assert_eq!(read(&after, 4096, 4096), pattern(4, 4096), "{mode:?}");
        }
        assert_eq!(dev.fua_writes(), 1);
    }

    #[test]
    fn keep_subset_keeps_whole_sectors_of_either_version() {
        let dev = CrashDevice::new(64 * 1024);
        let old = pattern(6, 8192);
        dev.write_at(&old, 0, false).unwrap();
        dev.flush().unwrap();
        let new = pattern(7, 8192);
        dev.write_at(&new, 0, false).unwrap();
        let mut saw_old = false;
        let mut saw_new = false;
        for seed in 0..32 {
            let after = read(&dev.crash(CrashMode::KeepSubset(seed)), 0, 8192);
            for s in 0..16 {
                let got = &after[s * 512..(s + 1) * 512];
                let is_old = got == &old[s * 512..(s + 1) * 512];
                let is_new = got == &new[s * 512..(s + 1) * 512];
                assert!(is_old || is_new, "sector {s} is a mix with seed {seed}");
                saw_old |= is_old;
                saw_new |= is_new;
            }
        }
        assert!(saw_old && saw_new, "the subset is not arbitrary");
        // The same seed gives the same result.
        assert_eq!(
            dev.crash(CrashMode::KeepSubset(3)).image(),
            dev.crash(CrashMode::KeepSubset(3)).image()
        );
    }

    #[test]
    fn tear_sector_mixes_exactly_one_sector() {
        let dev = CrashDevice::new(16 * 1024);
        dev.write_at(&vec![0xaa; 4096], 0, false).unwrap();
        dev.flush().unwrap();
        dev.write_at(&vec![0x55; 4096], 0, false).unwrap();
        for seed in 0..64 {
            let after = read(&dev.crash(CrashMode::TearSector(seed)), 0, 4096);
            let mixed = after
                .chunks(512)
                .filter(|s| s.contains(&0xaa) && s.contains(&0x55))
                .count();
            assert_eq!(mixed, 1, "seed {seed}");
        }
        // Without unflushed writes, a tear changes nothing.
        dev.flush().unwrap();
        assert_eq!(dev.crash(CrashMode::TearSector(1)).image(), dev.image());
    }

    #[test]
    fn fua_write_supersedes_the_cached_older_version() {
        let dev = CrashDevice::new(16 * 1024);
        dev.write_at(&[1; 2048], 0, false).unwrap();
        dev.write_at(&[2; 512], 512, true).unwrap();
        dev.flush().unwrap();
        assert_eq!(dev.durable_image(), dev.image());
        let dev = CrashDevice::new(16 * 1024);
        dev.write_at(&[1; 2048], 0, false).unwrap();
        dev.write_at(&[2; 512], 512, true).unwrap();
        for seed in 0..16 {
            let after = read(&dev.crash(CrashMode::KeepSubset(seed)), 512, 512);
            assert_eq!(
                after,
                vec![2; 512],
                "an older cached sector overwrote a FUA write"
            );
        }
    }

    #[test]
    fn crash_at_replays_each_durability_point() {
        let dev = CrashDevice::new(32 * 1024);
        dev.record_history();
        dev.write_at(&[1; 512], 0, false).unwrap(); // volatile
        dev.flush().unwrap(); // point 0
        dev.write_at(&[2; 512], 512, false).unwrap(); // volatile
        dev.write_at(&[3; 512], 1024, true).unwrap(); // point 1 (FUA)
        dev.write_at(&[4; 512], 1536, false).unwrap(); // volatile
        assert_eq!(dev.durability_points(), 2);

        // Crash while the flush (point 0) was in flight: the first write may be lost.
        let c = dev.crash_at(0, CrashMode::DropAll);
        assert_eq!(read(&c, 0, 2048), vec![0; 2048]);
        // Crash while the FUA write (point 1) was in flight: it may be lost too.
        let c = dev.crash_at(1, CrashMode::DropAll);
        assert_eq!(read(&c, 0, 512), vec![1; 512]);
        assert_eq!(read(&c, 512, 1536), vec![0; 1536]);
        // "Now".
        let c = dev.crash_at(2, CrashMode::DropAll);
        assert_eq!(read(&c, 1024, 512), vec![3; 512]);
        assert_eq!(read(&c, 512, 512), vec![0; 512]);
        assert_eq!(read(&c, 1536, 512), vec![0; 512]);
        assert_eq!(c.image(), dev.crash(CrashMode::DropAll).image());
        // A torn in-flight FUA write: one of the two volatile sectors is torn.
        let mut torn_fua = false;
        for seed in 0..32 {
            let c = dev.crash_at(1, CrashMode::TearSector(seed));
            let s = read(&c, 1024, 512);
            torn_fua |= s.contains(&3) && s.contains(&0);
        }
        assert!(torn_fua, "the in-flight FUA write was never torn");
    }

    #[test]
    fn a_group_crashes_at_one_moment() {
        let meta = CrashDevice::new(8192);
        let data = CrashDevice::new(8192);
        CrashDevice::record_group_history(&[&meta, &data]);
        data.write_at(&[1; 512], 0, false).unwrap();
        data.flush().unwrap(); // point 0
        meta.write_at(&[2; 512], 0, true).unwrap(); // point 1
        data.write_at(&[3; 512], 512, false).unwrap();
        meta.flush().unwrap(); // point 2: flushes only the meta device
        assert_eq!(meta.durability_points(), 3);
        assert_eq!(data.durability_points(), 3);
        let at = |p| CrashDevice::crash_group_at(&[&meta, &data], p, CrashMode::DropAll);
        let cut = at(1);
        assert_eq!(
            read(&cut[0], 0, 512),
            vec![0; 512],
            "the FUA write was in flight"
        );
        assert_eq!(read(&cut[1], 0, 512), vec![1; 512]);
        let cut = at(3);
        assert_eq!(read(&cut[0], 0, 512), vec![2; 512]);
        assert_eq!(
            read(&cut[1], 512, 512),
            vec![0; 512],
            "a flush of one device left the other"
        );
    }

    #[test]
    fn for_each_crash_point_matches_crash_group_at() {
        let a = CrashDevice::new(16 * 1024);
        let b = CrashDevice::new(8 * 1024);
        a.write_at(&[7; 1024], 0, false).unwrap(); // cached before recording
        CrashDevice::record_group_history(&[&a, &b]);
        let mut rng = SplitMix64::new(5);
        for i in 0..60u64 {
            let (dev, size) = if rng.below(3) == 0 {
                (&b, 8 * 1024)
            } else {
                (&a, 16 * 1024)
            };
            match rng.below(5) {
                0 => dev.flush().unwrap(),
                r => {
                    let len = 512 * (1 + rng.below(4));
                    let at = 512 * rng.below((size - len) / 512);
                    dev.write_at(&vec![i as u8 + 1; len as usize], at, r == 1)
                        .unwrap();
                }
            }
        }
        let total = a.durability_points();
        let mut seen = Vec::new();
        CrashDevice::for_each_crash_point(&[&a, &b], |cut| {
            let k = cut.point();
            for mode in [
                CrashMode::DropAll,
                CrashMode::KeepSubset(k as u64),
                CrashMode::TearSector(k as u64 * 3),
            ] {
                let fast: Vec<Vec<u8>> = cut.crash(mode).iter().map(|d| d.image()).collect();
                let slow: Vec<Vec<u8>> = CrashDevice::crash_group_at(&[&a, &b], k, mode)
                    .iter()
                    .map(|d| d.image())
                    .collect();
                assert_eq!(fast, slow, "point {k} {mode:?}");
            }
            seen.push(k);
        });
        assert_eq!(seen, (0..=total).collect::<Vec<_>>());
        assert!(total > 10, "the workload made too few points to compare");
    }

    #[test]
    fn record_history_starts_with_the_cache() {
        let dev = CrashDevice::new(8192);
        dev.write_at(&[9; 512], 0, false).unwrap();
        dev.record_history();
        assert_eq!(dev.durability_points(), 0);
        assert_eq!(
            read(&dev.crash_at(0, CrashMode::DropAll), 0, 512),
            vec![0; 512]
        );
        dev.flush().unwrap();
        assert_eq!(
            read(&dev.crash_at(1, CrashMode::DropAll), 0, 512),
            vec![9; 512]
        );
        assert_eq!(dev.flushes(), 1);
        assert_eq!(dev.writes(), 1);
    }
}
