//! The `BlockDevice` contract: the one boundary between exports (AoE, NBD) and storage.
//!
//! Every export holds an `Arc<dyn BlockDevice>` and nothing else; every backend (a file or
//! block device, the null device, the fault-injecting wrapper, later the replicated device)
//! implements it. This module owns the contract; the submodules own the implementations.
//!
//! # The contract
//!
//! * **Geometry.** [`BlockDevice::size`] is the usable size in bytes, a multiple of
//!   [`SECTOR_SIZE`]. It does not change while the device is open.
//! * **Calls are synchronous and thread-safe.** A call that returns `Ok` has completed: a read
//!   filled the whole buffer, a write is visible to every later read. Any number of threads may
//!   call at once; exports run many requests in parallel.
//! * **Order.** Writes to overlapping ranges complete in submission order. For one caller that
//!   is the order of its calls. Exports that run requests in parallel admit each request through
//!   an [`order::Sequencer`] in arrival order; a request that overlaps an earlier write (or a
//!   write that overlaps an earlier read) waits until that one has completed. Non-overlapping
//!   requests may complete in any order.
//! * **Durability.** A completed write is in the backend's volatile cache (the page cache for a
//!   buffered file) unless it was made with `fua = true`, in which case it is on stable storage
//!   when the call returns. [`BlockDevice::flush`] makes every write that *completed before the
//!   flush was submitted* stable.
//! * **Errors.** [`BlockError::Io`] (EIO) means the range may hold old data, new data or a mix;
//!   the device stays usable. [`BlockError::NoSpace`] (ENOSPC) must never happen for a write that
//!   lands inside `size()`: a file backend is preallocated at open, so a full filesystem cannot
//!   turn an acknowledged write into a lost one at writeback. An error reported by `flush` (a
//!   writeback error) means some write acknowledged earlier is not durable: the caller must treat
//!   the device as failed for durability purposes (exports report it to the client; the
//!   replicated device detaches the disk). [`BlockError::OutOfRange`] and
//!   [`BlockError::Unsupported`] are the caller's mistakes and change nothing.
//! * **Started writes.** [`BlockDevice::start_write`] splits a write in two: the call orders it
//!   (and does what can be done at once), [`WriteCompletion::wait`] returns its outcome. An
//!   export may go on with other requests meanwhile and acknowledge the write when it completes;
//!   the replicated device uses this to keep many writes in flight to the peer.
//! * **Discard and write-zeroes** are optional ([`Capabilities`]). After `write_zeroes` the
//!   range reads as zeros; after `discard` its contents are unspecified but stable.

pub mod crash;
pub mod fault;
pub mod file;
pub mod null;
pub mod order;
pub mod timed;
pub mod volatile;

use std::io;

pub use fault::{FaultConfig, FaultSpec, FaultyDevice, InjectedError, IoKind, IoRecord};
pub use file::{FileDevice, FileOpenError, OpenOptions};
pub use null::NullDevice;
pub use order::{Access, Sequencer, Ticket};

/// Bytes per logical sector: what AoE addresses and what every size is a multiple of.
pub const SECTOR_SIZE: u64 = 512;

/// What a device can do beyond read, write and flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Writes are refused with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// [`BlockDevice::discard`] is implemented.
    pub discard: bool,
    /// [`BlockDevice::write_zeroes`] is implemented efficiently (not by writing buffers).
    pub write_zeroes: bool,
}

/// Why a block operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backend reported an I/O error (EIO and friends).
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// The backend ran out of space (ENOSPC).
    #[error("no space left on the backing store")]
    NoSpace,
    /// The request does not lie within the device.
    #[error("request at offset {offset} length {len} exceeds device size {size}")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// The device was opened read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this device.
    #[error("operation not supported by this device")]
    Unsupported,
}

impl BlockError {
    /// Classifies an `io::Error` from a backend.
    pub fn from_io(err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockError::NoSpace,
            _ => BlockError::Io(err),
        }
    }

    /// The same error again, for answering several requests that failed as one.
    pub fn duplicate(&self) -> BlockError {
        match self {
            BlockError::Io(e) => BlockError::Io(io::Error::new(e.kind(), e.to_string())),
            BlockError::NoSpace => BlockError::NoSpace,
            &BlockError::OutOfRange { offset, len, size } => {
                BlockError::OutOfRange { offset, len, size }
            }
            BlockError::ReadOnly => BlockError::ReadOnly,
            BlockError::Unsupported => BlockError::Unsupported,
        }
    }

    /// The errno an export reports for this error (NBD sends it on the wire).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io(_) => libc::EIO,
            BlockError::NoSpace => libc::ENOSPC,
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::Unsupported => libc::EOPNOTSUPP,
        }
    }
}

/// Result of a block operation.
pub type Result<T> = std::result::Result<T, BlockError>;

/// A block device as exports see it. See the module docs for the full contract.
pub trait BlockDevice: Send + Sync {
    /// Usable size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;

    /// What this device supports beyond read/write/flush.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `data` at `offset`. With `fua`, the data is on stable storage when this returns.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()>;

    /// Starts a write whose completion may come later, from another thread: what
    /// [`WriteCompletion::wait`] returns is what [`write_at`](Self::write_at) would have. The
    /// write is ordered when this returns: a later call that overlaps it sees it and lands
    /// after it. A device that has nothing to wait for (the default) completes it here.
    fn start_write(&self, data: &[u8], offset: u64, fua: bool) -> Result<WriteCompletion> {
        self.write_at(data, offset, fua)?;
        Ok(WriteCompletion::done())
    }

    /// Reads into `bufs`, back to back from `offset`, as one read of their total length.
    /// `scratch` is room the default (one read, then a copy into each buffer) may use; a
    /// device that scatters by itself (a buffered file: `preadv`) leaves it alone.
    fn read_vectored(
        &self,
        bufs: &mut [&mut [u8]],
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        read_vectored_via_scratch(self, bufs, offset, scratch)
    }

    /// [`start_write`](Self::start_write) of `bufs` laid back to back from `offset`, as one
    /// write. `scratch` is room the default (gather into it, then one write) may use.
    fn start_write_vectored(
        &self,
        bufs: &[&[u8]],
        offset: u64,
        fua: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<WriteCompletion> {
        self.start_write(gather(bufs, scratch), offset, fua)
    }

    /// Makes every write that completed before this call stable.
    fn flush(&self) -> Result<()>;

    /// Tells the device that `len` bytes at `offset` are no longer needed.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(BlockError::Unsupported)
    }

    /// Whether `len` bytes at `offset` are known to read as zeros without reading them (a hole
    /// or an unwritten extent of a file). `false` means "not known", never "not zero"; the
    /// default knows nothing. A resync and a verify use it to skip reading unused space.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// Makes `len` bytes at `offset` read as zeros.
    ///
    /// The default writes zero buffers, so every device supports it; devices that can do
    /// better advertise [`Capabilities::write_zeroes`].
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_range(self.size(), offset, len)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done, fua)?;
            done += n;
        }
        Ok(())
    }
}

/// A shared device is a device: wrappers such as [`FaultyDevice`] can sit on an `Arc`.
impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        (**self).write_at(data, offset, fua)
    }

    fn start_write(&self, data: &[u8], offset: u64, fua: bool) -> Result<WriteCompletion> {
        (**self).start_write(data, offset, fua)
    }

    fn read_vectored(
        &self,
        bufs: &mut [&mut [u8]],
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        (**self).read_vectored(bufs, offset, scratch)
    }

    fn start_write_vectored(
        &self,
        bufs: &[&[u8]],
        offset: u64,
        fua: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<WriteCompletion> {
        (**self).start_write_vectored(bufs, offset, fua, scratch)
    }

    fn flush(&self) -> Result<()> {
        (**self).flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, fua)
    }
}

/// The rest of a write started by [`BlockDevice::start_write`].
pub trait PendingWrite: Send {
    /// Whether [`finish`](Self::finish) would return without waiting.
    fn poll(&mut self) -> bool;
    /// Waits for the write to complete and returns its outcome.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Calls `done` with the outcome once the write completes, on whichever thread completes
    /// it (at once if it has). The default waits here; a device that completes writes on a
    /// thread of its own hands `done` to that thread instead.
    fn then(self: Box<Self>, done: Box<dyn FnOnce(Result<()>) + Send>) {
        done(self.finish())
    }
}

/// A started write: complete already, or waiting for something (a peer's acknowledgement).
#[must_use = "a started write must be waited for before it is acknowledged"]
pub struct WriteCompletion(Option<Box<dyn PendingWrite>>);

impl WriteCompletion {
    /// A write that has completed successfully.
    pub fn done() -> Self {
        WriteCompletion(None)
    }

    /// A write that completes when `pending` says so.
    pub fn pending(pending: Box<dyn PendingWrite>) -> Self {
        WriteCompletion(Some(pending))
    }

    /// Whether [`wait`](Self::wait) would return without waiting.
    pub fn poll(&mut self) -> bool {
        self.0.as_mut().is_none_or(|p| p.poll())
    }

    /// Calls `done` with the outcome when the write completes (see [`PendingWrite::then`]).
    pub fn then(self, done: Box<dyn FnOnce(Result<()>) + Send>) {
        match self.0 {
            None => done(Ok(())),
            Some(pending) => pending.then(done),
        }
    }

    /// Waits for the write; `Ok` once it has completed as `write_at` defines.
    pub fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(pending) => pending.finish(),
        }
    }
}

impl std::fmt::Debug for WriteCompletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "WriteCompletion(pending)"
        } else {
            "WriteCompletion(done)"
        })
    }
}

/// `bufs` laid back to back in `scratch` (grown if need be): the data of one write.
pub(crate) fn gather<'a>(bufs: &[&[u8]], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if scratch.len() < total {
        scratch.resize(total, 0);
    }
    let mut at = 0;
    for b in bufs {
        scratch[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }
    &scratch[..total]
}

/// [`BlockDevice::read_vectored`]'s default: one read into `scratch`, then a copy into each
/// buffer.
pub fn read_vectored_via_scratch<D: BlockDevice + ?Sized>(
    device: &D,
    bufs: &mut [&mut [u8]],
    offset: u64,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if scratch.len() < total {
        scratch.resize(total, 0);
    }
    device.read_at(&mut scratch[..total], offset)?;
    let mut at = 0;
    for b in bufs.iter_mut() {
        let n = b.len();
        b.copy_from_slice(&scratch[at..at + n]);
        at += n;
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Shared test helpers: the contract suites every backend runs, and scratch files.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::path::{Path, PathBuf};

    /// A deterministic, position-dependent byte pattern, different for each `seed`.
    pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed.wrapping_mul(97))
            .collect()
    }

    /// Reads `len` bytes at `offset`, panicking on error.
    pub(crate) fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        dev.read_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        buf
    }

    fn assert_out_of_range<T: std::fmt::Debug>(result: Result<T>, what: &str) {
        assert!(
            matches!(result, Err(BlockError::OutOfRange { .. })),
            "{what}: expected OutOfRange, got {result:?}"
        );
    }

    /// What every device satisfies, including ones that store nothing or refuse writes:
    /// geometry, range checks, flush.
    pub(crate) fn geometry_suite(dev: &dyn BlockDevice) {
        let size = dev.size();
        assert!(size > 0, "device is empty");
        assert_eq!(size % SECTOR_SIZE, 0, "size {size} is not whole sectors");
        let caps = dev.capabilities();

        let mut sector = [0u8; SECTOR_SIZE as usize];
        dev.read_at(&mut sector, size - SECTOR_SIZE).unwrap();
        dev.read_at(&mut [], size).unwrap();
        assert_out_of_range(dev.read_at(&mut sector, size), "read at end");
        assert_out_of_range(dev.read_at(&mut sector, size - 256), "read across end");
        assert_out_of_range(dev.read_at(&mut sector, u64::MAX - 100), "read overflowing");
        match dev.read_at(&mut sector, size + SECTOR_SIZE) {
            Err(BlockError::OutOfRange {
                offset,
                len,
                size: reported,
            }) => {
                assert_eq!(
                    (offset, len, reported),
                    (size + SECTOR_SIZE, SECTOR_SIZE, size)
                );
            }
            other => panic!("read past end: {other:?}"),
        }

        if !caps.read_only {
            assert_out_of_range(dev.write_at(&sector, size - 256, false), "write across end");
            assert_out_of_range(dev.write_at(&sector, u64::MAX, true), "write overflowing");
            assert_out_of_range(
                dev.write_zeroes(size - SECTOR_SIZE, 2 * SECTOR_SIZE, false),
                "write_zeroes across end",
            );
            if caps.discard {
                assert_out_of_range(dev.discard(size, SECTOR_SIZE), "discard past end");
            }
            dev.write_at(&[], size, false).unwrap();
        }
        dev.flush().unwrap();
    }

    /// The full contract for a writable device that stores data. Needs at least 64 KiB.
    pub(crate) fn contract_suite(dev: &dyn BlockDevice) {
        geometry_suite(dev);
        let size = dev.size();
        assert!(size >= 64 * 1024, "contract suite needs 64 KiB, got {size}");
        assert!(!dev.capabilities().read_only);

        // Read-after-write at assorted offsets, lengths and alignments, with and without FUA.
        let cases: &[(u64, usize)] = &[
            (0, 512),
            (512, 1024),
            (4096, 4096),
            (1536, 8192),
            (3584, 1024),
            (size - 512, 512),
            (size - 8192, 8192),
            (size - 4608, 4608),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(i as u8 + 1, len);
            dev.write_at(&data, offset, i % 2 == 0).unwrap();
            assert_eq!(
                read(dev, offset, len),
                data,
                "read-after-write at {offset}+{len}"
            );
        }

        // Vectored writes and reads: buffers of odd sizes laid back to back, with and without
        // FUA; what one wrote the other and a plain read see.
        let lens = [512usize, 1024, 8704, 512, 2048];
        let parts: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| pattern(100 + i as u8, len))
            .collect();
        let whole: Vec<u8> = parts.concat();
        let mut scratch = Vec::new();
        for (offset, fua) in [(1536u64, false), (size - whole.len() as u64, true)] {
            let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            dev.start_write_vectored(&slices, offset, fua, &mut scratch)
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(
                read(dev, offset, whole.len()),
                whole,
                "vectored write at {offset}"
            );
            let mut back: Vec<Vec<u8>> = lens.iter().map(|&len| vec![0u8; len]).collect();
            let mut bufs: Vec<&mut [u8]> = back.iter_mut().map(|b| b.as_mut_slice()).collect();
            dev.read_vectored(&mut bufs, offset, &mut scratch).unwrap();
            assert_eq!(back, parts, "vectored read at {offset}");
        }
        let mut one = [0u8; 512];
        assert!(matches!(
            dev.read_vectored(&mut [&mut one[..]], size, &mut scratch),
            Err(BlockError::OutOfRange { .. })
        ));

        // Buffers that are not aligned in memory (O_DIRECT backends must bounce them).
        let mut backing = vec![0u8; 4096 + 1024 + 1];
        let data = pattern(42, 1024);
        backing[1..1025].copy_from_slice(&data);
        dev.write_at(&backing[1..1025], 8192, false).unwrap();
        dev.read_at(&mut backing[4097..], 8192).unwrap();
        assert_eq!(&backing[4097..], &data[..]);

        // A small overwrite replaces exactly its range.
        let outer = pattern(50, 16384);
        dev.write_at(&outer, 16384, false).unwrap();
        let inner = pattern(51, 1024);
        dev.write_at(&inner, 16384 + 512, true).unwrap();
        let mut expected = outer.clone();
        expected[512..1536].copy_from_slice(&inner);
        assert_eq!(read(dev, 16384, 16384), expected);

        // A refused write changes nothing.
        let tail = pattern(60, 4096);
        dev.write_at(&tail, size - 4096, false).unwrap();
        assert_out_of_range(
            dev.write_at(&pattern(61, 4096), size - 2048, false),
            "write across end",
        );
        assert_out_of_range(
            dev.write_zeroes(size - 2048, 4096, false),
            "write_zeroes across end",
        );
        assert_eq!(read(dev, size - 4096, 4096), tail);

        // write_zeroes zeroes exactly its range.
        for fua in [false, true] {
            let around = pattern(70 + fua as u8, 16384);
            dev.write_at(&around, 0, false).unwrap();
            dev.write_zeroes(4096 - 512, 8192, fua).unwrap();
            let mut expected = around.clone();
            expected[4096 - 512..12288 - 512].fill(0);
            assert_eq!(read(dev, 0, 16384), expected, "write_zeroes fua={fua}");
        }
        dev.write_zeroes(0, 0, false).unwrap();

        // discard: unspecified but stable contents inside, nothing changes outside.
        let around = pattern(80, 16384);
        dev.write_at(&around, 0, false).unwrap();
        if dev.capabilities().discard {
            dev.discard(4096, 8192).unwrap();
            let first = read(dev, 0, 16384);
            assert_eq!(first[..4096], around[..4096]);
            assert_eq!(first[12288..], around[12288..]);
            assert_eq!(read(dev, 0, 16384), first, "discarded range is not stable");
            // The range is still usable afterwards.
            let again = pattern(81, 8192);
            dev.write_at(&again, 4096, true).unwrap();
            assert_eq!(read(dev, 4096, 8192), again);
        } else {
            assert!(matches!(
                dev.discard(4096, 8192),
                Err(BlockError::Unsupported)
            ));
            assert_eq!(read(dev, 0, 16384), around);
        }

        // Parallel disjoint writers each see their own data.
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                scope.spawn(move || {
                    for round in 0..8u8 {
                        let offset = 32768 + t as u64 * 2048;
                        let data = pattern(t * 16 + round, 2048);
                        dev.write_at(&data, offset, round % 4 == 0).unwrap();
                        assert_eq!(read(dev, offset, 2048), data);
                    }
                });
            }
        });
        dev.flush().unwrap();
    }

    /// A read-only device reads and refuses every change with `ReadOnly`.
    pub(crate) fn read_only_suite(dev: &dyn BlockDevice) {
        geometry_suite(dev);
        let caps = dev.capabilities();
        assert!(caps.read_only);
        assert!(!caps.discard && !caps.write_zeroes);
        let before = read(dev, 0, 4096);
        for result in [
            dev.write_at(&[1; 512], 0, false),
            dev.write_at(&[1; 512], dev.size(), true),
            dev.write_zeroes(0, 512, false),
            dev.discard(0, 512),
        ] {
            assert!(matches!(result, Err(BlockError::ReadOnly)), "{result:?}");
        }
        assert_eq!(read(dev, 0, 4096), before);
    }

    /// A scratch directory on a disk filesystem (tmpfs may lack O_DIRECT and fallocate modes).
    pub(crate) fn scratch_dir() -> tempfile::TempDir {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        if std::fs::create_dir_all(&target).is_ok() {
            if let Ok(dir) = tempfile::tempdir_in(&target) {
                return dir;
            }
        }
        tempfile::tempdir_in("/var/tmp").expect("no scratch directory")
    }

    /// A sparse file of `len` bytes in `dir`.
    pub(crate) fn sparse_file(dir: &Path, name: &str, len: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    /// Opens `path`, or prints a note and returns `None` when the filesystem lacks O_DIRECT.
    pub(crate) fn open_or_skip(options: &OpenOptions, path: &Path) -> Option<FileDevice> {
        match options.open(path) {
            Ok(dev) => Some(dev),
            Err(FileOpenError::DirectIoUnsupported { .. }) => {
                eprintln!("note: skipping, O_DIRECT unsupported on {}", path.display());
                None
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn from_io_classifies_errors() {
        let err = |errno| BlockError::from_io(io::Error::from_raw_os_error(errno));
        assert!(matches!(err(libc::ENOSPC), BlockError::NoSpace));
        assert!(matches!(err(libc::EDQUOT), BlockError::NoSpace));
        assert!(matches!(err(libc::EIO), BlockError::Io(_)));
        assert!(matches!(
            BlockError::from_io(io::Error::other("no errno")),
            BlockError::Io(_)
        ));
    }

    #[test]
    fn errno_matches_each_error() {
        assert_eq!(BlockError::Io(io::Error::other("x")).errno(), libc::EIO);
        assert_eq!(BlockError::NoSpace.errno(), libc::ENOSPC);
        let range = BlockError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(range.errno(), libc::EINVAL);
        assert_eq!(BlockError::ReadOnly.errno(), libc::EPERM);
        assert_eq!(BlockError::Unsupported.errno(), libc::EOPNOTSUPP);
    }

    #[test]
    fn check_range_bounds() {
        assert!(check_range(1024, 0, 1024).is_ok());
        assert!(check_range(1024, 1024, 0).is_ok());
        assert!(check_range(1024, 1024, 1).is_err());
        assert!(check_range(1024, 1025, 0).is_err());
        assert!(check_range(1024, u64::MAX, 2).is_err());
    }

    #[test]
    fn default_write_zeroes_writes_buffers() {
        /// A device with only the required methods, so the trait default is what runs.
        struct Plain(std::sync::Mutex<Vec<u8>>);
        impl BlockDevice for Plain {
            fn size(&self) -> u64 {
                self.0.lock().unwrap().len() as u64
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                check_range(self.size(), offset, buf.len() as u64)?;
                let o = offset as usize;
                buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
                Ok(())
            }
            fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<()> {
                check_range(self.size(), offset, data.len() as u64)?;
                let o = offset as usize;
                self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            fn flush(&self) -> Result<()> {
                Ok(())
            }
        }
        let dev = Plain(std::sync::Mutex::new(vec![0xee; 3 << 20]));
        assert_eq!(dev.capabilities(), Capabilities::default());
        contract_suite(&dev);
        dev.write_at(&[0xee; 3 << 20], 0, false).unwrap();
        dev.write_zeroes(512, (2 << 20) + 512, false).unwrap();
        let all = read(&dev, 0, 3 << 20);
        assert!(all[..512].iter().all(|&b| b == 0xee));
        assert!(all[512..(2 << 20) + 1024].iter().all(|&b| b == 0));
        assert!(all[(2 << 20) + 1024..].iter().all(|&b| b == 0xee));
    }

    fn faulty_file(dir: &std::path::Path) -> FaultyDevice<FileDevice> {
        let path = sparse_file(dir, "faulty.img", 1 << 20);
        FaultyDevice::new(FileDevice::open(&path).unwrap())
    }

    #[test]
    fn faulty_file_device_passes_contract() {
        let dir = scratch_dir();
        contract_suite(&faulty_file(dir.path()));
    }

    #[test]
    fn overlapping_writes_complete_in_submission_order() {
        let dir = scratch_dir();
        let dev = Arc::new(faulty_file(dir.path()));
        let sequencer = Sequencer::new();
        let first_data = pattern(1, 8192);
        let second_data = pattern(2, 8192);

        // Every write takes a while, so without ordering the later-started first write
        // would land last.
        dev.set_write_delay(Duration::from_millis(100));
        let first = sequencer.admit(0, 8192, Access::Write);
        let second = sequencer.admit(4096, 8192, Access::Write);

        let second_writer = {
            let dev = Arc::clone(&dev);
            let data = second_data.clone();
            thread::spawn(move || {
                second.wait();
                dev.write_at(&data, 4096, false).unwrap();
            })
        };
        // Give the second writer a head start so it really is waiting.
        thread::sleep(Duration::from_millis(20));
        let first_writer = {
            let dev = Arc::clone(&dev);
            let data = first_data.clone();
            thread::spawn(move || {
                first.wait();
                dev.write_at(&data, 0, false).unwrap();
            })
        };
        first_writer.join().unwrap();
        second_writer.join().unwrap();

        let mut expected = first_data[..4096].to_vec();
        expected.extend_from_slice(&second_data);
        assert_eq!(read(&*dev, 0, 12288), expected);
        let writes: Vec<u64> = dev
            .records()
            .iter()
            .filter(|r| r.kind == IoKind::Write)
            .map(|r| r.offset)
            .collect();
        assert_eq!(writes, vec![0, 4096], "completion order");
        assert_eq!(sequencer.in_flight(), 0);
    }

    #[test]
    fn injected_enospc_surfaces_and_changes_nothing() {
        let dir = scratch_dir();
        let dev = faulty_file(dir.path());
        let original = pattern(3, 8192);
        dev.write_at(&original, 0, false).unwrap();
        let flushes = dev.flushes();

        dev.set_faults(FaultConfig {
            write_error: Some(FaultSpec::next(3, InjectedError::Enospc)),
            ..Default::default()
        });
        let err = dev.write_at(&pattern(4, 4096), 0, true).unwrap_err();
        assert!(matches!(err, BlockError::NoSpace), "{err:?}");
        assert_eq!(err.errno(), libc::ENOSPC);
        assert!(matches!(
            dev.write_zeroes(0, 4096, false),
            Err(BlockError::NoSpace)
        ));
        assert!(matches!(dev.discard(0, 4096), Err(BlockError::NoSpace)));
        assert_eq!(
            read(&dev, 0, 8192),
            original,
            "failed calls changed the data"
        );
        assert_eq!(dev.fua_writes(), 0);
        assert_eq!(dev.flushes(), flushes);

        // The faults are used up; the device works again.
        let next = pattern(5, 4096);
        dev.write_at(&next, 0, false).unwrap();
        assert_eq!(read(&dev, 0, 4096), next);
    }

    #[test]
    fn injected_eio_surfaces_and_changes_nothing() {
        let dir = scratch_dir();
        let dev = faulty_file(dir.path());
        let original = pattern(6, 16384);
        dev.write_at(&original, 0, false).unwrap();
        let is_eio = |err: &BlockError| matches!(err, BlockError::Io(e) if e.raw_os_error() == Some(libc::EIO));

        dev.set_faults(FaultConfig {
            read_error: Some(FaultSpec::in_range(8192..8704, InjectedError::Eio)),
            write_error: Some(FaultSpec::in_range(4096..4608, InjectedError::Eio)),
            flush_error: Some(FaultSpec::next(1, InjectedError::Eio)),
            ..Default::default()
        });
        let mut buf = vec![0; 4096];
        let err = dev.read_at(&mut buf, 6144).unwrap_err();
        assert!(is_eio(&err), "{err:?}");
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(read(&dev, 0, 8192), original[..8192]);

        let err = dev.write_at(&pattern(7, 1024), 4096, false).unwrap_err();
        assert!(is_eio(&err), "{err:?}");
        dev.write_at(&pattern(8, 512), 0, false).unwrap();

        let err = dev.flush().unwrap_err();
        assert!(is_eio(&err), "{err:?}");
        dev.flush().unwrap();
        assert_eq!(dev.flushes(), 1);

        dev.clear_faults();
        let mut expected = original.clone();
        expected[..512].copy_from_slice(&pattern(8, 512));
        assert_eq!(read(&dev, 0, 16384), expected);
    }

    #[test]
    fn flush_and_fua_reach_the_file_device() {
        let dir = scratch_dir();
        let dev = faulty_file(dir.path());
        dev.write_at(&[1; 512], 0, true).unwrap();
        dev.write_at(&[1; 512], 512, false).unwrap();
        dev.flush().unwrap();
        assert_eq!((dev.fua_writes(), dev.flushes()), (1, 1));
    }
}
