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

use std::sync::{Mutex, MutexGuard};

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
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Flush,
}

#[derive(Debug, Clone)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

#[derive(Debug)]
struct History {
    base: Vec<u8>,
    ops: Vec<Op>,
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    volatile: Vec<Pending>,
    history: Option<History>,
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
                current: image.clone(),
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
        let mut st = self.lock();
        let ops = st
            .volatile
            .iter()
            .map(|p| Op::Write {
                offset: p.offset,
                data: p.data.clone(),
                fua: false,
            })
            .collect();
        st.history = Some(History {
            base: st.durable.clone(),
            ops,
        });
    }

    /// Number of durability points (flushes and FUA writes) logged since
    /// [`record_history`](Self::record_history).
    pub fn durability_points(&self) -> usize {
        self.lock().history.as_ref().map_or(0, |h| {
            h.ops
                .iter()
                .filter(|op| matches!(op, Op::Flush | Op::Write { fua: true, .. }))
                .count()
        })
    }

    /// Cuts the power now and returns what survives, as a new device.
    pub fn crash(&self, mode: CrashMode) -> CrashDevice {
        let st = self.lock();
        CrashDevice::from_image(settle(st.durable.clone(), &st.volatile, mode))
    }

    /// Cuts the power while durability point `point` (0-based, in log order) was in flight and
    /// returns what survives. `point == durability_points()` is the same as [`crash`](Self::crash).
    ///
    /// Panics if history is not being recorded or `point` is beyond the end.
    pub fn crash_at(&self, point: usize, mode: CrashMode) -> CrashDevice {
        let st = self.lock();
        let history = st.history.as_ref().expect("record_history was not called");
        let mut durable = history.base.clone();
        let mut volatile: Vec<Pending> = Vec::new();
        let mut seen = 0;
        for op in &history.ops {
            let is_point = matches!(op, Op::Flush | Op::Write { fua: true, .. });
            if is_point && seen == point {
                // In flight: a FUA write may or may not have landed; a flush had not finished.
                if let Op::Write { offset, data, .. } = op {
                    volatile.push(Pending {
                        offset: *offset,
                        data: data.clone(),
                    });
                }
                return CrashDevice::from_image(settle(durable, &volatile, mode));
            }
            match op {
                Op::Write { offset, data, fua } => {
                    if *fua {
                        apply(&mut durable, *offset, data);
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
            if is_point {
                seen += 1;
            }
        }
        assert_eq!(seen, point, "durability point {point} beyond the log");
        CrashDevice::from_image(settle(durable, &volatile, mode))
    }

    /// The durable image: what [`CrashMode::DropAll`] would leave.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// What reads see now.
    pub fn image(&self) -> Vec<u8> {
        self.lock().current.clone()
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

fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let o = offset as usize;
    image[o..o + data.len()].copy_from_slice(data);
}

/// Applies `mode` to the volatile writes on top of `durable`.
fn settle(mut durable: Vec<u8>, volatile: &[Pending], mode: CrashMode) -> Vec<u8> {
    let sector = SECTOR_SIZE as usize;
    let (seed, tear) = match mode {
        CrashMode::DropAll => return durable,
        CrashMode::KeepSubset(seed) => (seed, false),
        CrashMode::TearSector(seed) => (seed, true),
    };
    let mut rng = SplitMix64::new(seed);
    let total_sectors: usize = volatile.iter().map(|p| p.data.len().div_ceil(sector)).sum();
    let torn = (tear && total_sectors > 0).then(|| rng.below(total_sectors as u64) as usize);
    let mut index = 0;
    for p in volatile {
        for (i, chunk) in p.data.chunks(sector).enumerate() {
            let at = p.offset as usize + i * sector;
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
        buf.copy_from_slice(&st.current[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let mut st = self.lock();
        st.writes += 1;
        apply(&mut st.current, offset, data);
        if fua {
            st.fua_writes += 1;
            apply(&mut st.durable, offset, data);
        } else if !data.is_empty() {
            st.volatile.push(Pending {
                offset,
                data: data.to_vec(),
            });
        }
        if let Some(h) = st.history.as_mut() {
            if fua || !data.is_empty() {
                h.ops.push(Op::Write {
                    offset,
                    data: data.to_vec(),
                    fua,
                });
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
        if let Some(h) = st.history.as_mut() {
            h.ops.push(Op::Flush);
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
        for mode in [CrashMode::DropAll, CrashMode::KeepSubset(7), CrashMode::TearSector(7)] {
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
                .filter(|s| s.iter().any(|&b| b == 0xaa) && s.iter().any(|&b| b == 0x55))
                .count();
            assert_eq!(mixed, 1, "seed {seed}");
        }
        // Without unflushed writes, a tear changes nothing.
        dev.flush().unwrap();
        assert_eq!(dev.crash(CrashMode::TearSector(1)).image(), dev.image());
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
    fn record_history_starts_with_the_cache() {
        let dev = CrashDevice::new(8192);
        dev.write_at(&[9; 512], 0, false).unwrap();
        dev.record_history();
        assert_eq!(dev.durability_points(), 0);
        assert_eq!(read(&dev.crash_at(0, CrashMode::DropAll), 0, 512), vec![0; 512]);
        dev.flush().unwrap();
        assert_eq!(read(&dev.crash_at(1, CrashMode::DropAll), 0, 512), vec![9; 512]);
        assert_eq!(dev.flushes(), 1);
        assert_eq!(dev.writes(), 1);
    }
}
