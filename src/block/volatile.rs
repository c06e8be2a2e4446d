//! A volatile write cache in front of a real device: a test hook that turns `kill -9` into a
//! power cut.
//!
//! Killing a process never tests crash safety, because the kernel's page cache survives it.
//! [`VolatileCache`] keeps every non-FUA write in the process's memory instead, as a disk's
//! write cache would, so whatever was not flushed dies with the process:
//!
//! * a write without FUA lands in the cache (whole 512-byte sectors; a partial sector is
//!   merged with what is below it); reads see the cache on top of the device;
//! * [`flush`](BlockDevice::flush) writes the cache to the device in sector order, then
//!   flushes the device;
//! * a write with FUA goes straight through to the device (with FUA) and updates any cached
//!   sectors it overlaps, so an older cached version can never later overwrite it;
//! * when the cache holds more than its cap, it writes itself back (without flushing the
//!   device), as a real disk may at any time;
//! * [`VolatileCache::cut_power`] is the power cut: it writes back a seeded random subset of
//!   the cached sectors (or none), forgets the rest, and fails every later call.
//!
//! Every call holds one lock for its whole duration, so a flush never races a read's overlay or
//! a FUA write. This is a test device: it trades speed for being obviously right.
//!
//! [`Prefix`] shows the first bytes of a device: the data area of a file whose internal
//! meta-data sits behind it, so one cache serves both the data and the meta-data of one file,
//! and a flush of either flushes both, like a real disk.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use super::crash::SplitMix64;
use super::{check_range, BlockDevice, BlockError, Capabilities, Result, SECTOR_SIZE};

const SECTOR: usize = SECTOR_SIZE as usize;

/// The default cap: past this many cached bytes the cache writes itself back.
pub const DEFAULT_CAP: u64 = 256 << 20;

/// What a power cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CutReport {
    /// Cached sectors that reached the device.
    pub kept: u64,
    /// Cached sectors that were lost.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Cache {
    /// Sector number → its newest unflushed contents.
    sectors: BTreeMap<u64, Box<[u8]>>,
    /// The power was cut: every call fails.
    dead: bool,
    writebacks: u64,
}

/// A device behind a volatile write cache (see the module docs).
#[derive(Debug)]
pub struct VolatileCache<D: BlockDevice> {
    inner: D,
    cap: u64,
    cache: Mutex<Cache>,
}

fn lock(m: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn power_off() -> BlockError {
    BlockError::Io(io::Error::other("the power was cut"))
}

impl<D: BlockDevice> VolatileCache<D> {
    /// Puts a cache of at most `cap` bytes in front of `inner`.
    pub fn new(inner: D, cap: u64) -> Self {
        Self {
            inner,
            cap: cap.max(SECTOR_SIZE),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The device behind the cache.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Bytes in the cache (not yet on the device).
    pub fn cached_bytes(&self) -> u64 {
        lock(&self.cache).sectors.len() as u64 * SECTOR_SIZE
    }

    /// How often the cache wrote itself back because it was full.
    pub fn writebacks(&self) -> u64 {
        lock(&self.cache).writebacks
    }

    /// Cuts the power: with `keep = Some(seed)` each cached sector independently reaches the
    /// device or not (a seeded choice); with `None` every cached sector is lost. Every later
    /// call fails with an I/O error.
    pub fn cut_power(&self, keep: Option<u64>) -> CutReport {
        self.hold_for_cut().cut(keep)
        // The lock is released here; the cache stays dead.
    }

    /// Takes the cache's lock and keeps it: no call gets through until the returned guard is
    /// dropped. A process that cuts every cache it has while holding all of them, then aborts,
    /// loses power at one instant.
    pub fn hold_for_cut(&self) -> Held<'_, D> {
        Held {
            dev: self,
            cache: lock(&self.cache),
        }
    }

    /// Writes every cached sector to the device, coalescing runs. On error the cache is kept
    /// (writing it again is harmless).
    fn write_back(&self, c: &mut Cache) -> Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let mut next = None;
        for (&sector, data) in &c.sectors {
            if next != Some(sector) && !run.is_empty() {
                self.inner.write_at(&run, run_start * SECTOR_SIZE, false)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = sector;
            }
            run.extend_from_slice(data);
            next = Some(sector + 1);
        }
        if !run.is_empty() {
            self.inner.write_at(&run, run_start * SECTOR_SIZE, false)?;
        }
        c.sectors.clear();
        Ok(())
    }

    /// The current contents of one sector: cached, else the device's.
    fn current(&self, c: &Cache, sector: u64) -> Result<Box<[u8]>> {
        if let Some(data) = c.sectors.get(&sector) {
            return Ok(data.clone());
        }
        let mut buf = vec![0u8; SECTOR].into_boxed_slice();
        self.inner.read_at(&mut buf, sector * SECTOR_SIZE)?;
        Ok(buf)
    }
}

/// A [`VolatileCache`] whose lock is held (see [`VolatileCache::hold_for_cut`]).
pub struct Held<'a, D: BlockDevice> {
    dev: &'a VolatileCache<D>,
    cache: MutexGuard<'a, Cache>,
}

impl<D: BlockDevice> Held<'_, D> {
    /// The power cut of [`VolatileCache::cut_power`], keeping the lock.
    pub fn cut(&mut self, keep: Option<u64>) -> CutReport {
        let mut report = CutReport::default();
        let mut rng = keep.map(SplitMix64::new);
        for (&sector, data) in &self.cache.sectors {
            let survives = rng.as_mut().is_some_and(|r| r.next_u64() & 1 == 1);
            if survives
                && self
                    .dev
                    .inner
                    .write_at(data, sector * SECTOR_SIZE, false)
                    .is_ok()
            {
                report.kept += 1;
            } else {
                report.lost += 1;
            }
        }
        self.cache.sectors.clear();
        self.cache.dead = true;
        report
    }
}

/// The part of `[offset, offset + len)` that lies in `sector`: where it starts in the sector,
/// and which bytes of the request it is.
fn piece(offset: u64, len: u64, sector: u64) -> (usize, std::ops::Range<usize>) {
    let start = (sector * SECTOR_SIZE).max(offset);
    let stop = ((sector + 1) * SECTOR_SIZE).min(offset + len);
    (
        (start - sector * SECTOR_SIZE) as usize,
        (start - offset) as usize..(stop - offset) as usize,
    )
}

/// The sectors `[offset, offset + len)` touches, each with its [`piece`].
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let first = offset / SECTOR_SIZE;
    let last = if len == 0 {
        first
    } else {
        (offset + len - 1) / SECTOR_SIZE + 1
    };
    (first..last).map(move |sector| {
        let (in_sector, part) = piece(offset, len, sector);
        (sector, in_sector, part)
    })
}

impl<D: BlockDevice> BlockDevice for VolatileCache<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.inner.capabilities().read_only,
            discard: false,
            write_zeroes: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let c = lock(&self.cache);
        if c.dead {
            return Err(power_off());
        }
        self.inner.read_at(buf, offset)?;
        if c.sectors.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR_SIZE;
        let last = (offset + buf.len() as u64 - 1) / SECTOR_SIZE;
        for (&sector, data) in c.sectors.range(first..=last) {
            let (in_sector, part) = piece(offset, buf.len() as u64, sector);
            buf[part.clone()].copy_from_slice(&data[in_sector..in_sector + part.len()]);
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        check_range(self.size(), offset, data.len() as u64)?;
        if self.inner.capabilities().read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut c = lock(&self.cache);
        if c.dead {
            return Err(power_off());
        }
        if fua {
            self.inner.write_at(data, offset, true)?;
            // Newer than anything cached: fold it into the overlapping cached sectors, so a
            // later write-back cannot put an older version on top of it.
            for (sector, in_sector, part) in pieces(offset, data.len() as u64) {
                if let Some(cached) = c.sectors.get_mut(&sector) {
                    cached[in_sector..in_sector + part.len()].copy_from_slice(&data[part]);
                }
            }
            return Ok(());
        }
        for (sector, in_sector, part) in pieces(offset, data.len() as u64) {
            let contents = if part.len() == SECTOR {
                Box::<[u8]>::from(&data[part])
            } else {
                let mut s = self.current(&c, sector)?;
                s[in_sector..in_sector + part.len()].copy_from_slice(&data[part]);
                s
            };
            c.sectors.insert(sector, contents);
        }
        if c.sectors.len() as u64 * SECTOR_SIZE > self.cap {
            self.write_back(&mut c)?;
            c.writebacks += 1;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut c = lock(&self.cache);
        if c.dead {
            return Err(power_off());
        }
        self.write_back(&mut c)?;
        self.inner.flush()
    }
}

/// The first `len` bytes of a device (see the module docs).
#[derive(Debug)]
pub struct Prefix<D: BlockDevice> {
    inner: D,
    len: u64,
}

impl<D: BlockDevice> Prefix<D> {
    /// The first `len` bytes of `inner` (rounded down to whole sectors; at most its size).
    pub fn new(inner: D, len: u64) -> Self {
        let len = len.min(inner.size());
        Self {
            len: len - len % SECTOR_SIZE,
            inner,
        }
    }
}

impl<D: BlockDevice> BlockDevice for Prefix<D> {
    fn size(&self) -> u64 {
        self.len
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        check_range(self.len, offset, data.len() as u64)?;
        self.inner.write_at(data, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.len, offset, len)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_range(self.len, offset, len)?;
        self.inner.write_zeroes(offset, len, fua)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::CrashDevice;
    use crate::block::testing::{contract_suite, pattern, read};
    use std::sync::Arc;

    const SIZE: u64 = 256 * 1024;

    fn cache(cap: u64) -> VolatileCache<Arc<CrashDevice>> {
        VolatileCache::new(Arc::new(CrashDevice::new(SIZE)), cap)
    }

    /// What the device under the cache holds (everything it was given, flushed or not: for a
    /// process killed with -9 that is the disk).
    fn below(c: &VolatileCache<Arc<CrashDevice>>, offset: u64, len: usize) -> Vec<u8> {
        c.inner().image()[offset as usize..offset as usize + len].to_vec()
    }

    #[test]
    fn keeps_the_block_device_contract() {
        contract_suite(&cache(DEFAULT_CAP));
        // Also with a cap so small that it writes back all the time.
        contract_suite(&cache(4096));
        contract_suite(&Prefix::new(cache(DEFAULT_CAP), SIZE - 8192));
    }

    #[test]
    fn reads_see_cached_writes_and_the_device_does_not() {
        let c = cache(DEFAULT_CAP);
        c.write_at(&pattern(1, 4096), 8192, false).unwrap();
        // Unaligned write on top: merged with the cached sector below it.
        c.write_at(&pattern(2, 100), 8192 + 700, false).unwrap();
        let mut want = pattern(1, 4096);
        want[700..800].copy_from_slice(&pattern(2, 100));
        assert_eq!(read(&c, 8192, 4096), want);
        assert_eq!(read(&c, 8192 + 650, 200), want[650..850].to_vec());
        assert_eq!(
            below(&c, 8192, 4096),
            vec![0; 4096],
            "nothing reached the device"
        );
        assert_eq!(c.cached_bytes(), 4096);
    }

    #[test]
    fn flush_persists_in_order() {
        let c = cache(DEFAULT_CAP);
        c.write_at(&pattern(1, 8192), 0, false).unwrap();
        c.write_at(&pattern(2, 512), 1024, false).unwrap();
        c.write_at(&pattern(3, 4096), 65536, false).unwrap();
        let flushes = c.inner().flushes();
        c.flush().unwrap();
        assert_eq!(c.inner().flushes(), flushes + 1, "the device was flushed");
        let mut want = pattern(1, 8192);
        want[1024..1536].copy_from_slice(&pattern(2, 512));
        assert_eq!(c.inner().durable_image()[..8192], want[..]);
        assert_eq!(
            c.inner().durable_image()[65536..65536 + 4096],
            pattern(3, 4096)[..]
        );
        assert_eq!(c.cached_bytes(), 0);
    }

    #[test]
    fn fua_goes_through_and_is_never_overwritten_by_older_cached_data() {
        let c = cache(DEFAULT_CAP);
        c.write_at(&pattern(1, 4096), 0, false).unwrap();
        // FUA over the middle of the cached range, and partly over one sector.
        c.write_at(&pattern(2, 1100), 1024, true).unwrap();
        assert_eq!(
            c.inner().durable_image()[1024..2124],
            pattern(2, 1100)[..],
            "FUA data is durable at once"
        );
        let mut want = pattern(1, 4096);
        want[1024..2124].copy_from_slice(&pattern(2, 1100));
        assert_eq!(read(&c, 0, 4096), want);
        c.flush().unwrap();
        assert_eq!(
            c.inner().durable_image()[..4096],
            want[..],
            "the flush kept the FUA data"
        );
    }

    #[test]
    fn dropping_the_cache_loses_unflushed_writes() {
        let dev = Arc::new(CrashDevice::new(SIZE));
        {
            let c = VolatileCache::new(dev.clone(), DEFAULT_CAP);
            c.write_at(&pattern(1, 4096), 0, false).unwrap();
            c.flush().unwrap();
            c.write_at(&pattern(2, 4096), 0, false).unwrap();
            c.write_at(&pattern(3, 512), 8192, true).unwrap();
            assert_eq!(read(&c, 0, 4096), pattern(2, 4096));
        }
        assert_eq!(
            dev.image()[..4096],
            pattern(1, 4096)[..],
            "unflushed write lost"
        );
        assert_eq!(
            dev.image()[8192..8704],
            pattern(3, 512)[..],
            "FUA write kept"
        );
    }

    #[test]
    fn power_cut_drops_or_keeps_a_seeded_subset_and_then_fails() {
        let run = |keep: Option<u64>| {
            let c = cache(DEFAULT_CAP);
            c.write_at(&pattern(1, 64 * 512), 0, false).unwrap();
            let report = c.cut_power(keep);
            assert!(matches!(
                c.read_at(&mut [0; 512], 0),
                Err(BlockError::Io(_))
            ));
            assert!(matches!(
                c.write_at(&[0; 512], 0, true),
                Err(BlockError::Io(_))
            ));
            assert!(c.flush().is_err());
            let image = c.inner().image();
            let kept = (0..64)
                .filter(|&s| {
                    image[s * 512..(s + 1) * 512] == pattern(1, 64 * 512)[s * 512..(s + 1) * 512]
                })
                .count() as u64;
            let zero = (0..64)
                .filter(|&s| image[s * 512..(s + 1) * 512].iter().all(|&b| b == 0))
                .count() as u64;
            assert_eq!(kept + zero, 64, "every sector is old or new, never torn");
            assert_eq!((report.kept, report.lost), (kept, 64 - kept));
            image
        };
        let none = run(None);
        assert!(none[..64 * 512].iter().all(|&b| b == 0));
        let a = run(Some(7));
        assert_eq!(a, run(Some(7)), "the same seed keeps the same sectors");
        assert_ne!(a, run(Some(8)));
        assert_ne!(a, none);
    }

    #[test]
    fn a_full_cache_writes_itself_back() {
        let c = cache(8192);
        c.write_at(&pattern(1, 8192), 0, false).unwrap();
        assert_eq!(c.writebacks(), 0);
        c.write_at(&pattern(2, 512), 16384, false).unwrap();
        assert_eq!(c.writebacks(), 1);
        assert_eq!(below(&c, 0, 8192), pattern(1, 8192));
        assert_eq!(c.cached_bytes(), 0);
    }

    #[test]
    fn prefix_limits_the_size() {
        let p = Prefix::new(cache(DEFAULT_CAP), 10_000);
        assert_eq!(p.size(), 9728);
        assert!(matches!(
            p.write_at(&[0; 512], 9728, false),
            Err(BlockError::OutOfRange { .. })
        ));
    }
}
