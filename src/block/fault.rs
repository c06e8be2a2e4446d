//! A wrapper that injects errors and delays into any device and records every call.
//!
//! Tests use it to prove what reached the device (that a client's FLUSH became a
//! [`flush`](BlockDevice::flush), that FUA survived the export path) and to see how exports
//! behave when the disk fails or is slow. Faults and delays are changed at runtime through
//! `&self`, so a test can break the disk in the middle of a run.
//!
//! An injected error is returned *instead of* calling the wrapped device: the device is left
//! exactly as it was, which makes "the error changed nothing else" checkable.
//!
//! # Which faults apply to which calls
//!
//! | call | error | delay |
//! |------|-------|-------|
//! | `read_at` | `read_error` | `read_delay` |
//! | `write_at`, `write_zeroes`, `discard` | `write_error` | `write_delay` |
//! | `flush` | `flush_error` (its `range` is ignored) | `flush_delay` |
//!
//! The delay is slept before the error check, like a slow disk that then fails.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{BlockDevice, BlockError, Capabilities, Result};

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedError {
    /// An I/O error: surfaces as [`BlockError::Io`] carrying EIO.
    Eio,
    /// Out of space: surfaces as [`BlockError::NoSpace`].
    Enospc,
}

impl InjectedError {
    fn to_block_error(self) -> BlockError {
        let errno = match self {
            InjectedError::Eio => libc::EIO,
            InjectedError::Enospc => libc::ENOSPC,
        };
        BlockError::from_io(io::Error::from_raw_os_error(errno))
    }
}

/// When one class of calls fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSpec {
    /// What the failing call returns.
    pub error: InjectedError,
    /// Fail only this many more matching calls (`None`: every matching call). Counts down as
    /// calls fail; [`FaultyDevice::faults`] shows what is left.
    pub remaining: Option<u64>,
    /// Fail only calls whose byte range overlaps this one (`None`: any range).
    pub range: Option<Range<u64>>,
}

impl FaultSpec {
    /// Every call fails with `error`.
    pub fn always(error: InjectedError) -> Self {
        Self {
            error,
            remaining: None,
            range: None,
        }
    }

    /// The next `count` calls fail with `error`.
    pub fn next(count: u64, error: InjectedError) -> Self {
        Self {
            error,
            remaining: Some(count),
            range: None,
        }
    }

    /// Calls touching `range` fail with `error`.
    pub fn in_range(range: Range<u64>, error: InjectedError) -> Self {
        Self {
            error,
            remaining: None,
            range: Some(range),
        }
    }

    /// Decides whether a call covering `[offset, offset + len)` fails, consuming one of the
    /// remaining failures if so. `range_matters` is false for flushes, which have no range.
    fn trigger(&mut self, offset: u64, len: u64, range_matters: bool) -> Option<BlockError> {
        if self.remaining == Some(0) {
            return None;
        }
        if let (Some(range), true) = (&self.range, range_matters) {
            let end = offset.saturating_add(len);
            // An empty call still "touches" its offset, so a zero-length request at a bad
            // spot fails too.
            let overlaps = if len == 0 {
                range.contains(&offset)
            } else {
                offset < range.end && range.start < end
            };
            if !overlaps {
                return None;
            }
        }
        if let Some(remaining) = &mut self.remaining {
            *remaining -= 1;
        }
        Some(self.error.to_block_error())
    }
}

/// Every fault and delay of a [`FaultyDevice`]. The default injects nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultConfig {
    /// Fault for `read_at`.
    pub read_error: Option<FaultSpec>,
    /// Fault for `write_at`, `write_zeroes` and `discard`.
    pub write_error: Option<FaultSpec>,
    /// Fault for `flush`.
    pub flush_error: Option<FaultSpec>,
    /// Sleep before every `read_at`.
    pub read_delay: Duration,
    /// Sleep before every `write_at`, `write_zeroes` and `discard`.
    pub write_delay: Duration,
    /// Sleep before every `flush`.
    pub flush_delay: Duration,
}

/// The kind of a recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
    /// `write_zeroes`.
    WriteZeroes,
}

/// One call made to a [`FaultyDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRecord {
    /// Which call.
    pub kind: IoKind,
    /// Byte offset (0 for a flush).
    pub offset: u64,
    /// Length in bytes (0 for a flush).
    pub len: u64,
    /// The `fua` argument (false for calls that have none).
    pub fua: bool,
    /// When the call arrived (before any delay).
    pub at: Instant,
    /// Whether the call returned `Ok`.
    pub ok: bool,
}

/// Wraps a device, injecting faults and delays and recording every call.
#[derive(Debug)]
pub struct FaultyDevice<D: BlockDevice> {
    inner: D,
    config: Mutex<FaultConfig>,
    /// Appended when a call returns, so the log is in completion order.
    records: Mutex<Vec<IoRecord>>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
}

/// Locks ignoring poison: a test thread that panicked mid-call must not hide the log from the
/// thread that reports the failure.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner` with no faults and no delays.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            config: Mutex::new(FaultConfig::default()),
            records: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Replaces every fault and delay.
    pub fn set_faults(&self, config: FaultConfig) {
        *lock(&self.config) = config;
    }

    /// The current configuration, with `remaining` counts as they are now.
    pub fn faults(&self) -> FaultConfig {
        lock(&self.config).clone()
    }

    /// Removes every fault and delay.
    pub fn clear_faults(&self) {
        self.set_faults(FaultConfig::default());
    }

    /// Sets the delay before every read.
    pub fn set_read_delay(&self, delay: Duration) {
        lock(&self.config).read_delay = delay;
    }

    /// Sets the delay before every write, write-zeroes and discard.
    pub fn set_write_delay(&self, delay: Duration) {
        lock(&self.config).write_delay = delay;
    }

    /// Sets the delay before every flush.
    pub fn set_flush_delay(&self, delay: Duration) {
        lock(&self.config).flush_delay = delay;
    }

    /// Every call so far, in the order the calls returned.
    pub fn records(&self) -> Vec<IoRecord> {
        lock(&self.records).clone()
    }

    /// Forgets the recorded calls (the counters keep counting).
    pub fn clear_records(&self) {
        lock(&self.records).clear();
    }

    /// Flushes that reached the wrapped device and succeeded.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// `write_at` and `write_zeroes` calls with `fua` set that reached the wrapped device and
    /// succeeded.
    pub fn fua_writes(&self) -> u64 {
        self.fua_writes.load(Ordering::SeqCst)
    }

    /// Runs one call: delay, fault check, the real call, then the record.
    fn run<T>(
        &self,
        kind: IoKind,
        offset: u64,
        len: u64,
        fua: bool,
        call: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let at = Instant::now();
        // A stalled disk stays stalled until the delay is lowered or cleared: re-read it, so
        // that `clear` also releases an I/O already waiting.
        loop {
            let delay = {
                let config = lock(&self.config);
                match kind {
                    IoKind::Read => config.read_delay,
                    IoKind::Flush => config.flush_delay,
                    IoKind::Write | IoKind::Discard | IoKind::WriteZeroes => config.write_delay,
                }
            };
            let waited = at.elapsed();
            if waited >= delay {
                break;
            }
            std::thread::sleep((delay - waited).min(Duration::from_millis(20)));
        }
        let injected = {
            let mut config = lock(&self.config);
            let spec = match kind {
                IoKind::Read => &mut config.read_error,
                IoKind::Flush => &mut config.flush_error,
                IoKind::Write | IoKind::Discard | IoKind::WriteZeroes => &mut config.write_error,
            };
            spec.as_mut()
                .and_then(|spec| spec.trigger(offset, len, kind != IoKind::Flush))
        };
        let result = match injected {
            Some(error) => Err(error),
            None => call(),
        };
        if result.is_ok() {
            match kind {
                IoKind::Flush => {
                    self.flushes.fetch_add(1, Ordering::SeqCst);
                }
                IoKind::Write | IoKind::WriteZeroes if fua => {
                    self.fua_writes.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        lock(&self.records).push(IoRecord {
            kind,
            offset,
            len,
            fua,
            at,
            ok: result.is_ok(),
        });
        result
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.run(IoKind::Read, offset, len, false, || {
            self.inner.read_at(buf, offset)
        })
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.run(IoKind::Write, offset, data.len() as u64, fua, || {
            self.inner.write_at(data, offset, fua)
        })
    }

    fn flush(&self) -> Result<()> {
        self.run(IoKind::Flush, 0, 0, false, || self.inner.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.run(IoKind::Discard, offset, len, false, || {
            self.inner.discard(offset, len)
        })
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        // An injected read error must still be seen by whoever reads.
        self.faults().read_error.is_none() && self.inner.known_zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.run(IoKind::WriteZeroes, offset, len, fua, || {
            self.inner.write_zeroes(offset, len, fua)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{testing, NullDevice, SECTOR_SIZE};
    use std::sync::Arc;

    /// A small in-memory device, so these tests see the effect (or absence) of writes.
    #[derive(Debug)]
    struct MemDevice(Mutex<Vec<u8>>);

    impl MemDevice {
        fn new(size: usize) -> Self {
            Self(Mutex::new(vec![0; size]))
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            crate::block::check_range(self.size(), offset, buf.len() as u64)?;
            let data = self.0.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<()> {
            crate::block::check_range(self.size(), offset, data.len() as u64)?;
            self.0.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    fn mem(size: usize) -> FaultyDevice<MemDevice> {
        FaultyDevice::new(MemDevice::new(size))
    }

    fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        dev.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn is_eio(err: &BlockError) -> bool {
        matches!(err, BlockError::Io(e) if e.raw_os_error() == Some(libc::EIO))
    }

    #[test]
    fn passes_through_without_faults() {
        let dev = mem(64 * 1024);
        dev.write_at(&[7; 512], 512, false).unwrap();
        assert_eq!(read(&dev, 512, 512), vec![7; 512]);
        testing::contract_suite(&dev);
    }

    #[test]
    fn records_every_call_in_completion_order() {
        let dev = FaultyDevice::new(NullDevice::new(1 << 20));
        let before = Instant::now();
        dev.write_at(&[1; 1024], 4096, true).unwrap();
        dev.read_at(&mut [0; 512], 0).unwrap();
        dev.flush().unwrap();
        dev.discard(0, 4096).unwrap();
        dev.write_zeroes(8192, 512, false).unwrap();
        assert!(dev.read_at(&mut [0; 512], 1 << 20).is_err());

        let records = dev.records();
        let summary: Vec<_> = records
            .iter()
            .map(|r| (r.kind, r.offset, r.len, r.fua, r.ok))
            .collect();
        assert_eq!(
            summary,
            vec![
                (IoKind::Write, 4096, 1024, true, true),
                (IoKind::Read, 0, 512, false, true),
                (IoKind::Flush, 0, 0, false, true),
                (IoKind::Discard, 0, 4096, false, true),
                (IoKind::WriteZeroes, 8192, 512, false, true),
                (IoKind::Read, 1 << 20, 512, false, false),
            ]
        );
        assert!(records.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(records[0].at >= before);

        dev.clear_records();
        assert!(dev.records().is_empty());
    }

    #[test]
    fn counts_successful_flushes_and_fua_writes() {
        let dev = FaultyDevice::new(NullDevice::new(1 << 20));
        dev.write_at(&[0; 512], 0, false).unwrap();
        dev.write_at(&[0; 512], 0, true).unwrap();
        dev.write_zeroes(0, 512, true).unwrap();
        dev.flush().unwrap();
        dev.flush().unwrap();
        assert_eq!(dev.fua_writes(), 2);
        assert_eq!(dev.flushes(), 2);

        dev.set_faults(FaultConfig {
            flush_error: Some(FaultSpec::always(InjectedError::Eio)),
            write_error: Some(FaultSpec::always(InjectedError::Eio)),
            ..Default::default()
        });
        assert!(dev.flush().is_err());
        assert!(dev.write_at(&[0; 512], 0, true).is_err());
        assert_eq!(dev.flushes(), 2, "a failed flush did not reach the device");
        assert_eq!(dev.fua_writes(), 2);

        dev.clear_records();
        assert_eq!(dev.flushes(), 2, "clearing records keeps the counters");
    }

    #[test]
    fn next_n_faults_then_recovers() {
        let dev = mem(8192);
        dev.write_at(&[1; 512], 0, false).unwrap();
        dev.set_faults(FaultConfig {
            write_error: Some(FaultSpec::next(2, InjectedError::Enospc)),
            ..Default::default()
        });
        for _ in 0..2 {
            assert!(matches!(
                dev.write_at(&[2; 512], 0, false),
                Err(BlockError::NoSpace)
            ));
        }
        assert_eq!(
            dev.faults().write_error.unwrap().remaining,
            Some(0),
            "remaining counts down"
        );
        assert_eq!(
            read(&dev, 0, 512),
            vec![1; 512],
            "failed writes changed nothing"
        );
        dev.write_at(&[3; 512], 0, false).unwrap();
        assert_eq!(read(&dev, 0, 512), vec![3; 512]);
    }

    #[test]
    fn range_faults_hit_only_overlapping_calls() {
        let dev = mem(8192);
        dev.write_at(&[9; 8192], 0, false).unwrap();
        dev.set_faults(FaultConfig {
            read_error: Some(FaultSpec::in_range(1024..1536, InjectedError::Eio)),
            ..Default::default()
        });
        assert_eq!(read(&dev, 0, 1024), vec![9; 1024]);
        assert_eq!(read(&dev, 1536, 512), vec![9; 512]);
        let err = dev.read_at(&mut [0; 1024], 512).unwrap_err();
        assert!(is_eio(&err), "{err:?}");
        assert_eq!(err.errno(), libc::EIO);
        let err = dev.read_at(&mut [0; 0], 1024).unwrap_err();
        assert!(is_eio(&err), "an empty read at a bad offset fails too");
        // Writes are unaffected by a read fault.
        dev.write_at(&[1; 512], 1024, false).unwrap();
    }

    #[test]
    fn write_fault_applies_to_discard_and_write_zeroes() {
        let dev = FaultyDevice::new(NullDevice::new(8192));
        dev.set_faults(FaultConfig {
            write_error: Some(FaultSpec::always(InjectedError::Eio)),
            ..Default::default()
        });
        assert!(dev.discard(0, 512).is_err());
        assert!(dev.write_zeroes(0, 512, false).is_err());
        assert!(dev.read_at(&mut [0; 512], 0).is_ok());
        assert!(dev.flush().is_ok());
    }

    #[test]
    fn flush_fault_ignores_range() {
        let dev = FaultyDevice::new(NullDevice::new(8192));
        dev.set_faults(FaultConfig {
            flush_error: Some(FaultSpec::in_range(4096..8192, InjectedError::Eio)),
            ..Default::default()
        });
        assert!(dev.flush().is_err());
    }

    #[test]
    fn faults_change_mid_run_across_threads() {
        let dev = Arc::new(FaultyDevice::new(NullDevice::new(8192)));
        let worker = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut failures = 0;
                for _ in 0..200 {
                    if dev.write_at(&[0; 512], 0, false).is_err() {
                        failures += 1;
                    }
                }
                failures
            })
        };
        dev.set_faults(FaultConfig {
            write_error: Some(FaultSpec::next(5, InjectedError::Eio)),
            ..Default::default()
        });
        let failures = worker.join().unwrap();
        // Depending on timing the worker saw at most the five injected failures.
        assert!(failures <= 5);
        let failed_records = dev.records().iter().filter(|r| !r.ok).count();
        assert_eq!(failed_records, failures);
    }

    #[test]
    fn delays_slow_down_only_their_kind() {
        let dev = FaultyDevice::new(NullDevice::new(8192));
        let delay = Duration::from_millis(50);
        dev.set_write_delay(delay);
        let started = Instant::now();
        dev.write_at(&[0; 512], 0, false).unwrap();
        assert!(started.elapsed() >= delay);
        let started = Instant::now();
        dev.read_at(&mut [0; 512], 0).unwrap();
        dev.flush().unwrap();
        assert!(started.elapsed() < delay);

        dev.set_read_delay(delay);
        dev.set_flush_delay(delay);
        let started = Instant::now();
        dev.read_at(&mut [0; 512], 0).unwrap();
        dev.flush().unwrap();
        assert!(started.elapsed() >= 2 * delay);

        dev.clear_faults();
        assert_eq!(dev.faults(), FaultConfig::default());
    }

    #[test]
    fn clearing_a_delay_releases_an_io_already_waiting() {
        let dev = std::sync::Arc::new(FaultyDevice::new(NullDevice::new(8192)));
        dev.set_write_delay(Duration::from_secs(60));
        let writer = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                dev.write_at(&[0; 512], 0, false).unwrap();
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        dev.clear_faults();
        let took = writer.join().unwrap();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn forwards_geometry_and_capabilities() {
        let dev = FaultyDevice::new(NullDevice::new(64 * SECTOR_SIZE));
        assert_eq!(dev.size(), 64 * SECTOR_SIZE);
        assert_eq!(dev.capabilities(), dev.inner().capabilities());
    }
}
