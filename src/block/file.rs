//! A [`BlockDevice`] backed by a regular file or a block device.
//!
//! Opened through [`OpenOptions`], like vblade's command line: read-only, `O_DIRECT`, `O_SYNC`,
//! and a window (`-o` offset / `-l` length, in 512-byte sectors) that exports only part of the
//! file. Every offset the device is given is relative to the window.
//!
//! # No ENOSPC after acknowledgement
//!
//! A sparse image file on a full filesystem would accept a buffered write into the page cache
//! and then fail at writeback, after the client has been told the write succeeded. So a
//! regular file opened for writing is preallocated over the whole window (`fallocate` mode 0:
//! real blocks, size unchanged); discard re-preallocates the range it punched. A filesystem
//! without `fallocate` gets a warning and no guarantee.
//!
//! # O_DIRECT
//!
//! Direct I/O needs buffers, offsets and lengths aligned to the device's logical block size,
//! which may be 4096. Requests that are not 4096-aligned (the window may start at any sector,
//! and clients send 512-byte requests) go through an aligned bounce buffer; a partially covered
//! 4 KiB block (or logical block, if a block device's is larger) at either end is read,
//! modified and written back, under a per-block lock so two disjoint requests in the same block
//! cannot undo each other; discard and write-zeroes take the same locks. The read-modify-write may touch
//! sectors just outside the window (never beyond the end of the backing file): two exports that
//! share a 4 KiB block of one file must not both use `O_DIRECT`. A backing file whose size is
//! not a multiple of 4096 on a 4K-sector disk cannot have its last partial block written with
//! `O_DIRECT`; such a write fails with EIO/EINVAL rather than extend the file.
//!
//! # Discard and write-zeroes
//!
//! | backing | discard | write-zeroes |
//! |---------|---------|--------------|
//! | regular file | punch hole, then re-preallocate | `FALLOC_FL_ZERO_RANGE` (keeps the allocation) |
//! | block device | `BLKDISCARD` (only whole logical blocks) | `BLKZEROOUT` |
//!
//! Discard support is probed at open without changing anything (a hole punched past end of
//! file, a zero-length `BLKDISCARD`). `FALLOC_FL_ZERO_RANGE` cannot be probed harmlessly (past
//! end of file it allocates blocks that only a truncate frees), so a regular file starts out
//! advertising efficient write-zeroes and the first "not supported" from the kernel turns the
//! capability off; write-zeroes then (and from then on) writes zero buffers. Any later "not
//! supported" for discard likewise turns discard off.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{
    check_range, BlockDevice, BlockError, Capabilities, Result, WriteCompletion, SECTOR_SIZE,
};

/// Alignment of every `O_DIRECT` transfer (offset, length and memory): the largest logical
/// block size in common use. A block device with larger logical blocks uses its own size.
const DIRECT_ALIGN: u64 = 4096;

/// Number of locks that serialise read-modify-write of partial blocks; blocks hash onto them.
const RMW_LOCK_STRIPES: usize = 64;

/// Chunk size when write-zeroes has to fall back to writing buffers.
const ZERO_CHUNK: u64 = 1 << 20;

/// How to open a [`FileDevice`]. Defaults: read-write, buffered, whole file, preallocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    read_only: bool,
    direct: bool,
    sync: bool,
    offset_sectors: u64,
    length_sectors: Option<u64>,
    preallocate: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            direct: false,
            sync: false,
            offset_sectors: 0,
            length_sectors: None,
            preallocate: true,
        }
    }
}

impl OpenOptions {
    /// The defaults: read-write, buffered, whole file, preallocated.
    pub fn new() -> Self {
        Self::default()
    }

    /// Open read-only: writes, discards and write-zeroes fail with [`BlockError::ReadOnly`].
    pub fn read_only(&mut self, read_only: bool) -> &mut Self {
        self.read_only = read_only;
        self
    }

    /// Open with `O_DIRECT`, bypassing the page cache.
    pub fn direct(&mut self, direct: bool) -> &mut Self {
        self.direct = direct;
        self
    }

    /// Open with `O_SYNC`: every write is stable when it returns (so FUA costs nothing extra).
    pub fn sync(&mut self, sync: bool) -> &mut Self {
        self.sync = sync;
        self
    }

    /// Start the exported window this many 512-byte sectors into the file (vblade's `-o`).
    pub fn offset_sectors(&mut self, offset_sectors: u64) -> &mut Self {
        self.offset_sectors = offset_sectors;
        self
    }

    /// Export only this many sectors after the offset (vblade's `-l`); `None`: up to the end.
    pub fn length_sectors(&mut self, length_sectors: Option<u64>) -> &mut Self {
        self.length_sectors = length_sectors;
        self
    }

    /// Allocate the window of a regular file at open (default `true`). Turning this off
    /// gives up the guarantee that a write inside the device never fails with ENOSPC.
    pub fn preallocate(&mut self, preallocate: bool) -> &mut Self {
        self.preallocate = preallocate;
        self
    }

    /// Opens `path`, a regular file or a block device.
    pub fn open(&self, path: impl AsRef<Path>) -> std::result::Result<FileDevice, FileOpenError> {
        let path = path.as_ref().to_path_buf();
        let mut flags = 0;
        if self.direct {
            flags |= libc::O_DIRECT;
        }
        if self.sync {
            flags |= libc::O_SYNC;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .custom_flags(flags)
            .open(&path)
            .map_err(|source| {
                // Filesystems without direct I/O (tmpfs before 6.6, some FUSE) refuse the flag
                // at open with EINVAL.
                if self.direct && source.raw_os_error() == Some(libc::EINVAL) {
                    FileOpenError::DirectIoUnsupported { path: path.clone() }
                } else {
                    FileOpenError::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;

        let size_error = |source| FileOpenError::Size {
            path: path.clone(),
            source,
        };
        let file_type = file.metadata().map_err(size_error)?.file_type();
        let is_block_device = file_type.is_block_device();
        let (raw_size, logical_block) = if is_block_device {
            (
                block_device_size(&file).map_err(size_error)?,
                block_device_logical_block_size(&file).map_err(size_error)?,
            )
        } else if file_type.is_file() {
            (file.metadata().map_err(size_error)?.len(), SECTOR_SIZE)
        } else {
            return Err(FileOpenError::NotFileOrBlockDevice { path });
        };

        // A trailing partial sector is not addressable, exactly as in vblade.
        let backing_len = raw_size - raw_size % SECTOR_SIZE;
        let size_sectors = backing_len / SECTOR_SIZE;
        if self.offset_sectors >= size_sectors {
            return Err(FileOpenError::OffsetTooLarge {
                path,
                offset_sectors: self.offset_sectors,
                size_sectors,
            });
        }
        let available_sectors = size_sectors - self.offset_sectors;
        let window_sectors = match self.length_sectors {
            None => available_sectors,
            Some(0) => return Err(FileOpenError::EmptyWindow { path }),
            Some(length_sectors) if length_sectors > available_sectors => {
                return Err(FileOpenError::LengthTooLarge {
                    path,
                    length_sectors,
                    available_sectors,
                })
            }
            Some(length_sectors) => length_sectors,
        };
        let window_start = self.offset_sectors * SECTOR_SIZE;
        let size = window_sectors * SECTOR_SIZE;

        let writable = !self.read_only;
        let preallocate = writable && self.preallocate && !is_block_device;
        if preallocate {
            match fallocate(&file, 0, window_start, size) {
                Ok(()) => {}
                Err(err) if is_unsupported(&err) => tracing::warn!(
                    path = %path.display(),
                    "filesystem cannot preallocate; a full filesystem may lose acknowledged writes"
                ),
                Err(source) => return Err(FileOpenError::Preallocate { path, source }),
            }
        }

        let discard = match (writable, is_block_device) {
            (false, _) => false,
            (true, true) => probe_block_discard(&file),
            (true, false) => probe_punch_hole(&file, raw_size),
        };

        Ok(FileDevice {
            file,
            path,
            is_block_device,
            read_only: self.read_only,
            direct: self.direct,
            sync: self.sync,
            preallocate,
            window_start,
            size,
            backing_len,
            logical_block,
            direct_align: logical_block.max(DIRECT_ALIGN),
            discard_supported: AtomicBool::new(discard),
            dsync_supported: AtomicBool::new(true),
            zero_range_supported: AtomicBool::new(writable),
            rmw_locks: (0..RMW_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }
}

/// Why [`OpenOptions::open`] failed. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileOpenError {
    /// The file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path given to `open`.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// `O_DIRECT` was requested on a filesystem that does not support it.
    #[error("{}: the filesystem does not support O_DIRECT", path.display())]
    DirectIoUnsupported {
        /// The path given to `open`.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{}: not a regular file or block device", path.display())]
    NotFileOrBlockDevice {
        /// The path given to `open`.
        path: PathBuf,
    },
    /// The size could not be determined.
    #[error("cannot determine the size of {}: {source}", path.display())]
    Size {
        /// The path given to `open`.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// The window offset is at or beyond the end (this includes files under one sector).
    #[error(
        "{}: offset of {offset_sectors} sectors is not inside the {size_sectors}-sector file",
        path.display()
    )]
    OffsetTooLarge {
        /// The path given to `open`.
        path: PathBuf,
        /// The requested offset.
        offset_sectors: u64,
        /// Whole sectors in the file.
        size_sectors: u64,
    },
    /// The window length runs past the end.
    #[error(
        "{}: length of {length_sectors} sectors exceeds the {available_sectors} sectors after the offset",
        path.display()
    )]
    LengthTooLarge {
        /// The path given to `open`.
        path: PathBuf,
        /// The requested length.
        length_sectors: u64,
        /// Sectors between the offset and the end.
        available_sectors: u64,
    },
    /// A window length of zero sectors was requested.
    #[error("{}: a window of 0 sectors exports nothing", path.display())]
    EmptyWindow {
        /// The path given to `open`.
        path: PathBuf,
    },
    /// Preallocating the window failed (typically the filesystem is full).
    #[error("cannot preallocate {}: {source}", path.display())]
    Preallocate {
        /// The path given to `open`.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
}

/// A regular file or block device (or a window of one) as a [`BlockDevice`].
pub struct FileDevice {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    read_only: bool,
    direct: bool,
    sync: bool,
    /// Whether the window was preallocated at open, so discard must re-preallocate.
    preallocate: bool,
    /// Byte offset of the window in the backing file.
    window_start: u64,
    /// Window size in bytes.
    size: u64,
    /// Addressable bytes of the whole backing file; direct I/O never reaches beyond it.
    backing_len: u64,
    /// Logical block size of a block device (what `BLKDISCARD`/`BLKZEROOUT` need); 512 for files.
    logical_block: u64,
    /// Alignment of `O_DIRECT` transfers.
    direct_align: u64,
    discard_supported: AtomicBool,
    /// Files: `FALLOC_FL_ZERO_RANGE` has not failed as unsupported yet. Block devices:
    /// `BLKZEROOUT` has not failed as unsupported (the kernel falls back itself, so it won't).
    zero_range_supported: AtomicBool,
    /// `pwritev2(RWF_DSYNC)` has not failed as unsupported yet.
    dsync_supported: AtomicBool,
    /// Serialise changes to a partly covered aligned block under `O_DIRECT`.
    rmw_locks: Box<[Mutex<()>]>,
}

impl fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDevice")
            .field("path", &self.path)
            .field("is_block_device", &self.is_block_device)
            .field("read_only", &self.read_only)
            .field("direct", &self.direct)
            .field("sync", &self.sync)
            .field("window_start", &self.window_start)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileDevice {
    /// Opens `path` read-write with the default [`OpenOptions`].
    pub fn open(path: impl AsRef<Path>) -> std::result::Result<Self, FileOpenError> {
        OpenOptions::new().open(path)
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Byte offset of the exported window in the backing file.
    pub fn window_offset(&self) -> u64 {
        self.window_start
    }

    /// Whether a transfer of `len` bytes at absolute `offset` from/to `ptr` can go straight
    /// to the kernel. Buffered I/O always can; direct I/O needs everything aligned.
    fn is_direct_ready(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        !self.direct
            || (offset.is_multiple_of(self.direct_align)
                && (len as u64).is_multiple_of(self.direct_align)
                && (ptr as usize as u64).is_multiple_of(self.direct_align))
    }

    /// The aligned span covering `[offset, offset + len)` for direct I/O, clipped at the end
    /// of the backing file so a transfer never extends it.
    fn direct_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let align = self.direct_align;
        let start = offset - offset % align;
        let end = (offset + len).div_ceil(align) * align;
        (start, end.min(self.backing_len))
    }

    /// Under `O_DIRECT`, the (at most two) aligned blocks that `[offset, offset + len)` covers
    /// only partly, as absolute byte offsets: the blocks a bounced write must read back.
    fn partial_blocks(&self, offset: u64, len: u64) -> Vec<u64> {
        if !self.direct || len == 0 {
            return Vec::new();
        }
        let (start, end) = self.direct_span(offset, len);
        let last_byte = offset + len - 1;
        let tail_block = last_byte - last_byte % self.direct_align;
        let mut blocks = Vec::with_capacity(2);
        if offset > start {
            blocks.push(start);
        }
        if offset + len < end && blocks.last() != Some(&tail_block) {
            blocks.push(tail_block);
        }
        blocks
    }

    /// Locks the given blocks (absolute byte offsets) for read-modify-write. Every change to
    /// a partly covered block under `O_DIRECT` (bounced writes, and discard and write-zeroes,
    /// which must not be undone by a bounced write's stale copy) holds these. Stripes are
    /// taken in a fixed order, so two holders cannot deadlock.
    fn lock_blocks(&self, blocks: &[u64]) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = blocks
            .iter()
            .map(|block| (block / self.direct_align % RMW_LOCK_STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|stripe| {
                self.rmw_locks[stripe]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            })
            .collect()
    }

    /// Reads at an absolute offset through an aligned bounce buffer (direct I/O).
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.direct_span(offset, buf.len() as u64);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, self.direct_align);
        self.file.read_exact_at(bounce.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes at an absolute offset through an aligned bounce buffer (direct I/O), reading
    /// back the rest of any partially covered block first.
    fn write_bounced(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.direct_span(offset, data.len() as u64);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, self.direct_align);
        let partial = self.partial_blocks(offset, data.len() as u64);
        let _guards = self.lock_blocks(&partial);
        for &block in &partial {
            let block_end = (block + self.direct_align).min(end);
            let at = (block - start) as usize;
            self.file.read_exact_at(
                &mut bounce.as_mut_slice()[at..at + (block_end - block) as usize],
                block,
            )?;
        }
        let at = (offset - start) as usize;
        bounce.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
        self.file.write_all_at(bounce.as_slice(), start)
    }

    /// Writes `data` at `at` durably with `pwritev2(RWF_DSYNC)`: only this range is written
    /// back, where a `write` + `fdatasync` would write back every dirty page of the file (with
    /// internal meta-data, all the data). `Ok(false)`: the kernel does not support it and
    /// nothing was written.
    #[allow(unsafe_code)]
    fn write_all_dsync(&self, mut data: &[u8], mut at: u64) -> io::Result<bool> {
        if !self.dsync_supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut first = true;
        while !data.is_empty() {
            let iov = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            // SAFETY: one iovec over a live slice; the fd is open for the device's lifetime.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    at as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) if first => {
                        self.dsync_supported.store(false, Ordering::Relaxed);
                        return Ok(false);
                    }
                    _ => return Err(err),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            first = false;
            data = &data[n as usize..];
            at += n as u64;
        }
        Ok(true)
    }

    /// Makes completed writes stable (fdatasync).
    fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(BlockError::from_io)
    }

    /// Refuses writes on a read-only device and checks the range, in that order.
    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)
    }

    /// Write-zeroes the slow way, by writing zero buffers, with one sync at the end for FUA.
    fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let zeros = AlignedBuf::zeroed(ZERO_CHUNK.min(len) as usize, self.direct_align);
        let mut done = 0;
        while done < len {
            let n = ZERO_CHUNK.min(len - done);
            self.write_at(&zeros.as_slice()[..n as usize], offset + done, false)?;
            done += n;
        }
        if fua && !self.sync {
            self.sync_data()?;
        }
        Ok(())
    }

    /// Discard on a regular file: punch a hole, then preallocate it again (if preallocating).
    fn discard_file(&self, start: u64, len: u64) -> Result<()> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, punch, start, len) {
            Ok(()) => {}
            Err(err) if is_unsupported(&err) => {
                self.discard_supported.store(false, Ordering::Relaxed);
                return Err(BlockError::Unsupported);
            }
            Err(err) => return Err(BlockError::from_io(err)),
        }
        if self.preallocate {
            // Give the range its blocks back so later writes to it cannot hit ENOSPC.
            match fallocate(&self.file, 0, start, len) {
                Ok(()) => {}
                Err(err) if is_unsupported(&err) => {}
                Err(err) => return Err(BlockError::from_io(err)),
            }
        }
        Ok(())
    }

    /// Discard on a block device: `BLKDISCARD` of the whole logical blocks in the range.
    fn discard_block_device(&self, start: u64, len: u64) -> Result<()> {
        // The kernel takes only whole logical blocks; shrink inwards. Discarding less than
        // asked is allowed, as the contents after discard are unspecified anyway.
        let block = self.logical_block;
        let aligned_start = start.div_ceil(block) * block;
        let aligned_end = (start + len) / block * block;
        if aligned_end <= aligned_start {
            return Ok(());
        }
        match ioctl_range(
            &self.file,
            BLKDISCARD,
            aligned_start,
            aligned_end - aligned_start,
        ) {
            Ok(()) => Ok(()),
            Err(err) if is_unsupported(&err) => {
                self.discard_supported.store(false, Ordering::Relaxed);
                Err(BlockError::Unsupported)
            }
            Err(err) => Err(BlockError::from_io(err)),
        }
    }

    /// Zeroes the range in the kernel if it can; `Ok(false)` means fall back to buffers.
    fn zero_range_in_kernel(&self, start: u64, len: u64) -> Result<bool> {
        let result = if self.is_block_device {
            if !start.is_multiple_of(self.logical_block) || !len.is_multiple_of(self.logical_block)
            {
                return Ok(false);
            }
            ioctl_range(&self.file, BLKZEROOUT, start, len)
        } else {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            fallocate(&self.file, mode, start, len)
        };
        match result {
            Ok(()) => Ok(true),
            Err(err) if is_unsupported(&err) => {
                self.zero_range_supported.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(err) => Err(BlockError::from_io(err)),
        }
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            discard: !self.read_only && self.discard_supported.load(Ordering::Relaxed),
            write_zeroes: !self.read_only && self.zero_range_supported.load(Ordering::Relaxed),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let at = self.window_start + offset;
        let result = if self.is_direct_ready(buf.as_ptr(), at, buf.len()) {
            self.file.read_exact_at(buf, at)
        } else {
            self.read_bounced(buf, at)
        };
        result.map_err(BlockError::from_io)
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        if self.is_block_device || len == 0 || check_range(self.size, offset, len).is_err() {
            return false;
        }
        let at = self.window_start + offset;
        match seek_data(&self.file, at) {
            // No data at or after `at` within the file, or the next data starts past the range.
            Ok(None) => true,
            Ok(Some(next)) => next >= at + len,
            Err(_) => false,
        }
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_write(offset, data.len() as u64)?;
        if !data.is_empty() {
            let at = self.window_start + offset;
            let direct_ready = self.is_direct_ready(data.as_ptr(), at, data.len());
            if fua && !self.sync && (direct_ready || !self.direct) {
                match self.write_all_dsync(data, at) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {} // unsupported: write, then fdatasync
                    Err(e) => return Err(BlockError::from_io(e)),
                }
            }
            let result = if direct_ready {
                self.file.write_all_at(data, at)
            } else {
                self.write_bounced(data, at)
            };
            result.map_err(BlockError::from_io)?;
        }
        if fua && !self.sync {
            self.sync_data()?;
        }
        Ok(())
    }

    fn read_vectored(
        &self,
        bufs: &mut [&mut [u8]],
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        if self.direct {
            // Alignment rules apply to each buffer: one aligned read, then copies.
            return super::read_vectored_via_scratch(self, bufs, offset, scratch);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(self.size, offset, total as u64)?;
        let mut iovecs = iovecs(bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())));
        let at = self.window_start + offset;
        vectored_all(self.file.as_raw_fd(), &mut iovecs, at, false).map_err(BlockError::from_io)
    }

    fn start_write_vectored(
        &self,
        bufs: &[&[u8]],
        offset: u64,
        fua: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<WriteCompletion> {
        if self.direct || fua {
            // Direct I/O wants aligned buffers and FUA its own path: gather, then write.
            self.write_at(super::gather(bufs, scratch), offset, fua)?;
            return Ok(WriteCompletion::done());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check_write(offset, total as u64)?;
        let mut iovecs = iovecs(bufs.iter().map(|b| (b.as_ptr().cast_mut(), b.len())));
        let at = self.window_start + offset;
        vectored_all(self.file.as_raw_fd(), &mut iovecs, at, true).map_err(BlockError::from_io)?;
        Ok(WriteCompletion::done())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if !self.discard_supported.load(Ordering::Relaxed) {
            return Err(BlockError::Unsupported);
        }
        if len == 0 {
            return Ok(());
        }
        let start = self.window_start + offset;
        let _guards = self.lock_blocks(&self.partial_blocks(start, len));
        if self.is_block_device {
            self.discard_block_device(start, len)
        } else {
            self.discard_file(start, len)
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let zeroed_in_kernel = self.zero_range_supported.load(Ordering::Relaxed) && {
            let start = self.window_start + offset;
            let _guards = self.lock_blocks(&self.partial_blocks(start, len));
            self.zero_range_in_kernel(start, len)?
        };
        if !zeroed_in_kernel {
            return self.write_zero_buffers(offset, len, fua);
        }
        // fallocate and BLKZEROOUT are not covered by O_SYNC, so FUA always needs the sync.
        if fua {
            self.sync_data()?;
        }
        Ok(())
    }
}

/// A zeroed byte buffer whose start is aligned for `O_DIRECT` transfers.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align` (a power of two) in memory.
    fn zeroed(len: usize, align: u64) -> Self {
        let align = align as usize;
        let storage = vec![0u8; len + align];
        let misalignment = storage.as_ptr() as usize % align;
        let start = (align - misalignment) % align;
        Self {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// True when the kernel says the operation is not implemented for this file.
fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Probes `FALLOC_FL_PUNCH_HOLE` on a writable regular file without touching it: the hole is
/// punched one block past end of file (keeping the size), where there is nothing to free.
fn probe_punch_hole(file: &File, file_len: u64) -> bool {
    let past_end = file_len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    !matches!(
        fallocate(file, mode, past_end, DIRECT_ALIGN),
        Err(ref err) if is_unsupported(err)
    )
}

/// Probes `BLKDISCARD` with an empty range: unsupported devices say EOPNOTSUPP before the
/// kernel looks at the range; supporting ones reject it (EINVAL) or do nothing.
fn probe_block_discard(file: &File) -> bool {
    !matches!(ioctl_range(file, BLKDISCARD, 0, 0), Err(ref err) if is_unsupported(err))
}

/// `lseek(fd, at, SEEK_DATA)`: the first byte of data at or after `at` (holes and, on ext4 and
/// xfs, unwritten extents are not data); `None` if there is none before the end of the file.
#[allow(unsafe_code)]
fn seek_data(file: &File, at: u64) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: lseek takes only integers; the descriptor is open for as long as `file`. It moves
    // the shared file offset, which nothing here uses (all I/O is positional).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// `fallocate(2)` over `[offset, offset + len)`, retried on EINTR.
#[allow(unsafe_code)]
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = |_| io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(too_big)?;
    let len = libc::off_t::try_from(len).map_err(too_big)?;
    loop {
        // SAFETY: fallocate takes only integers; the descriptor is open for as long as `file`.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `_IO(0x12, 119)`: discard a `[start, len]` byte range of a block device.
const BLKDISCARD: libc::Ioctl = 0x1277;
/// `_IO(0x12, 127)`: zero a `[start, len]` byte range of a block device.
const BLKZEROOUT: libc::Ioctl = 0x127f;

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes. The direction bits sit at
/// bit 29 on these architectures and bit 30 elsewhere; the size field is `sizeof(size_t)`.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl =
    (0x4000_0000 | (std::mem::size_of::<usize>() << 16) | 0x1272) as libc::Ioctl;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl =
    (0x8000_0000usize | (std::mem::size_of::<usize>() << 16) | 0x1272) as libc::Ioctl;

/// Size of a block device in bytes (`BLKGETSIZE64`).
#[allow(unsafe_code)]
fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local
    // u64; the descriptor is open for as long as `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical block size of a block device (`BLKSSZGET`): the unit of discard and zero-out.
#[allow(unsafe_code)]
fn block_device_logical_block_size(file: &File) -> io::Result<u64> {
    let mut block: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local int;
    // the descriptor is open for as long as `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut block as *mut _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    match u64::try_from(block) {
        Ok(block) if block >= SECTOR_SIZE && block.is_power_of_two() => Ok(block),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// A block device ioctl that takes a `[start, len]` pair of u64 byte counts.
#[allow(unsafe_code)]
fn ioctl_range(file: &File, request: libc::Ioctl, start: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [start, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64s through the pointer, which points at a
    // live local array of two u64s; the descriptor is open for as long as `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One iovec per `(base, len)`.
fn iovecs(bufs: impl Iterator<Item = (*mut u8, usize)>) -> Vec<libc::iovec> {
    bufs.map(|(base, len)| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    })
    .collect()
}

/// `preadv`/`pwritev` of every byte the iovecs describe, from `at`, resuming after short
/// transfers (the iovecs are consumed).
fn vectored_all(
    fd: std::os::fd::RawFd,
    iovecs: &mut [libc::iovec],
    mut at: u64,
    write: bool,
) -> io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let rest = &iovecs[first..];
        let count = rest.len().min(1024) as libc::c_int;
        // SAFETY: every iovec describes a live buffer the caller lends us for this call
        // (mutable for reads); the fd is open.
        #[allow(unsafe_code)]
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), count, at as libc::off_t)
            } else {
                libc::preadv(fd, rest.as_ptr(), count, at as libc::off_t)
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                if write {
                    io::ErrorKind::WriteZero
                } else {
                    io::ErrorKind::UnexpectedEof
                },
                "short vectored transfer",
            ));
        }
        at += n as u64;
        let mut done = n as usize;
        while done > 0 && first < iovecs.len() {
            let iov = &mut iovecs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                #[allow(unsafe_code)]
                {
                    iov.iov_base =
                        unsafe { (iov.iov_base as *mut u8).add(done) } as *mut libc::c_void;
                }
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing::{
        contract_suite, open_or_skip, pattern, read, read_only_suite, scratch_dir, sparse_file,
    };
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// Bytes actually allocated to a file.
    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// A file of `len` bytes filled with `pattern(seed, ..)`.
    fn filled_file(dir: &Path, name: &str, len: usize, seed: u8) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pattern(seed, len)).unwrap();
        path
    }

    #[test]
    fn known_zero_sees_holes_and_not_data() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "zero.img", 4 * MIB);
        let dev = FileDevice::open(&path).unwrap();
        assert!(dev.known_zero(0, 4 * MIB), "a sparse file is all holes");
        dev.write_at(&[7u8; 4096], MIB, false).unwrap();
        assert!(!dev.known_zero(0, 4 * MIB));
        assert!(!dev.known_zero(MIB, 4096));
        // Never claims a range with data; the range after it may be a hole again.
        let mut buf = vec![0u8; 4096];
        for off in (0..4 * MIB).step_by(4096) {
            if dev.known_zero(off, 4096) {
                dev.read_at(&mut buf, off).unwrap();
                assert!(buf.iter().all(|&b| b == 0), "known_zero lied at {off}");
            }
        }
        assert!(!dev.known_zero(0, 8 * MIB), "out of range is not known");
    }

    #[test]
    fn buffered_file_passes_contract() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "buffered.img", MIB);
        let dev = FileDevice::open(&path).unwrap();
        assert_eq!(dev.size(), MIB);
        assert_eq!(dev.path(), path);
        assert!(!dev.is_block_device());
        contract_suite(&dev);
    }

    #[test]
    fn direct_file_passes_contract() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "direct.img", MIB);
        let Some(dev) = open_or_skip(OpenOptions::new().direct(true), &path) else {
            return;
        };
        contract_suite(&dev);
    }

    #[test]
    fn sync_file_passes_contract() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "sync.img", MIB);
        let dev = OpenOptions::new().sync(true).open(&path).unwrap();
        contract_suite(&dev);
    }

    #[test]
    fn direct_sync_file_passes_contract() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "direct-sync.img", MIB);
        let Some(dev) = open_or_skip(OpenOptions::new().direct(true).sync(true), &path) else {
            return;
        };
        contract_suite(&dev);
    }

    /// Runs the contract on a window and checks nothing outside it changed.
    fn check_window(direct: bool, offset_sectors: u64, length_sectors: u64) {
        let dir = scratch_dir();
        let file_len = 2 * MIB as usize;
        let path = filled_file(dir.path(), "window.img", file_len, 9);
        let options = OpenOptions::new()
            .direct(direct)
            .offset_sectors(offset_sectors)
            .length_sectors(Some(length_sectors))
            .clone();
        let Some(dev) = open_or_skip(&options, &path) else {
            return;
        };
        let start = (offset_sectors * SECTOR_SIZE) as usize;
        let end = start + (length_sectors * SECTOR_SIZE) as usize;
        assert_eq!(dev.size(), (end - start) as u64);
        assert_eq!(dev.window_offset(), start as u64);
        // The window shows the file's bytes at the offset.
        assert_eq!(
            read(&dev, 0, 4096),
            pattern(9, file_len)[start..start + 4096]
        );

        contract_suite(&dev);
        let marker = pattern(99, 512);
        dev.write_at(&marker, 0, false).unwrap();
        dev.write_at(&marker, dev.size() - 512, false).unwrap();
        dev.flush().unwrap();
        drop(dev);

        let original = pattern(9, file_len);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), file_len, "file size changed");
        assert_eq!(
            after[..start],
            original[..start],
            "bytes before the window changed"
        );
        assert_eq!(
            after[end..],
            original[end..],
            "bytes after the window changed"
        );
        assert_eq!(after[start..start + 512], marker[..]);
        assert_eq!(after[end - 512..end], marker[..]);
    }

    #[test]
    fn buffered_window_stays_inside() {
        check_window(false, 3, 1000);
    }

    #[test]
    fn direct_window_at_4k_boundary_stays_inside() {
        check_window(true, 8, 1024);
    }

    #[test]
    fn direct_window_off_4k_boundary_uses_read_modify_write() {
        // One sector in: every 4 KiB device block straddles two 4 KiB file blocks.
        check_window(true, 1, 1021);
    }

    #[test]
    fn direct_partial_block_writes_do_not_lose_each_other() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "rmw.img", MIB);
        let Some(dev) = open_or_skip(OpenOptions::new().direct(true).offset_sectors(1), &path)
        else {
            return;
        };
        // Sixteen threads, each rewriting its own sector of the same few 4 KiB blocks: a
        // read-modify-write without the block locks would put back stale neighbours.
        let rounds = 40u8;
        std::thread::scope(|scope| {
            for sector in 0..16u64 {
                let dev = &dev;
                scope.spawn(move || {
                    for round in 0..rounds {
                        let data = pattern(sector as u8 * 8 + round, 512);
                        dev.write_at(&data, sector * 512, false).unwrap();
                    }
                });
            }
        });
        for sector in 0..16u64 {
            let expected = pattern(sector as u8 * 8 + rounds - 1, 512);
            assert_eq!(read(&dev, sector * 512, 512), expected, "sector {sector}");
        }
    }

    #[test]
    fn direct_write_zeroes_is_not_undone_by_neighbouring_writes() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "zero-rmw.img", MIB);
        let Some(dev) = open_or_skip(OpenOptions::new().direct(true), &path) else {
            return;
        };
        // Sector 0 of each of four blocks is written then zeroed, over and over, while other
        // threads rewrite sectors 1..8 of the same blocks: a bounced neighbour write holding
        // a stale copy of sector 0 must not put the data back after the zeroing.
        let rounds = 100u8;
        std::thread::scope(|scope| {
            for block in 0..4u64 {
                let dev = &dev;
                scope.spawn(move || {
                    for round in 0..rounds {
                        let sector0 = block * 4096;
                        dev.write_at(&pattern(round, 512), sector0, false).unwrap();
                        dev.write_zeroes(sector0, 512, false).unwrap();
                        // Only this thread writes sector 0, so it must stay zero; give a stale
                        // neighbour write time to land first.
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        assert!(
                            read(dev, sector0, 512).iter().all(|&b| b == 0),
                            "zeroed sector of block {block} came back in round {round}"
                        );
                    }
                });
                for sector in 1..8u64 {
                    scope.spawn(move || {
                        for round in 0..rounds {
                            let data = pattern(round ^ sector as u8, 512);
                            dev.write_at(&data, block * 4096 + sector * 512, false)
                                .unwrap();
                        }
                    });
                }
            }
        });
        for block in 0..4u64 {
            assert!(
                read(&dev, block * 4096, 512).iter().all(|&b| b == 0),
                "zeroed sector of block {block} came back"
            );
            for sector in 1..8u64 {
                let expected = pattern((rounds - 1) ^ sector as u8, 512);
                assert_eq!(read(&dev, block * 4096 + sector * 512, 512), expected);
            }
        }
    }

    #[test]
    fn direct_tail_not_4k_aligned_does_not_grow_file() {
        let dir = scratch_dir();
        // Nine sectors and a stray partial one: the last 4 KiB block is cut short.
        let path = filled_file(dir.path(), "tail.img", 9 * 512 + 100, 4);
        let Some(dev) = open_or_skip(OpenOptions::new().direct(true), &path) else {
            return;
        };
        assert_eq!(dev.size(), 9 * 512);
        let data = pattern(5, 512);
        dev.write_at(&data, 8 * 512, true).unwrap();
        assert_eq!(read(&dev, 8 * 512, 512), data);
        assert_eq!(
            read(&dev, 0, 9 * 512)[..8 * 512],
            pattern(4, 9 * 512 + 100)[..8 * 512]
        );
        drop(dev);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), 9 * 512 + 100);
        assert_eq!(after[8 * 512..9 * 512], data[..]);
        assert_eq!(after[9 * 512..], pattern(4, 9 * 512 + 100)[9 * 512..]);
    }

    #[test]
    fn size_is_rounded_down_to_sectors() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "odd.img", 1000);
        assert_eq!(FileDevice::open(&path).unwrap().size(), 512);
    }

    #[test]
    fn file_under_one_sector_is_refused() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "tiny.img", 100);
        let err = FileDevice::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                FileOpenError::OffsetTooLarge {
                    offset_sectors: 0,
                    size_sectors: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("tiny.img"), "{err}");
    }

    #[test]
    fn window_is_checked_like_vblade() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "win.img", 100 * 512);
        let open = |offset, length| {
            OpenOptions::new()
                .offset_sectors(offset)
                .length_sectors(length)
                .open(&path)
        };
        assert_eq!(open(0, None).unwrap().size(), 100 * 512);
        assert_eq!(open(10, None).unwrap().size(), 90 * 512);
        assert_eq!(open(10, Some(90)).unwrap().size(), 90 * 512);
        assert_eq!(open(99, Some(1)).unwrap().size(), 512);
        assert!(matches!(
            open(100, None),
            Err(FileOpenError::OffsetTooLarge {
                offset_sectors: 100,
                size_sectors: 100,
                ..
            })
        ));
        assert!(matches!(
            open(10, Some(91)),
            Err(FileOpenError::LengthTooLarge {
                length_sectors: 91,
                available_sectors: 90,
                ..
            })
        ));
        assert!(matches!(
            open(0, Some(0)),
            Err(FileOpenError::EmptyWindow { .. })
        ));
        let message = open(u64::MAX, None).unwrap_err().to_string();
        assert!(message.contains("win.img"), "{message}");
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = scratch_dir();
        let missing = dir.path().join("missing.img");
        let err = FileDevice::open(&missing).unwrap_err();
        assert!(matches!(&err, FileOpenError::Open { source, .. }
            if source.kind() == io::ErrorKind::NotFound));
        assert!(err.to_string().contains("missing.img"), "{err}");

        let err = OpenOptions::new()
            .read_only(true)
            .open("/dev/null")
            .unwrap_err();
        assert!(
            matches!(err, FileOpenError::NotFileOrBlockDevice { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("/dev/null"));

        let err = OpenOptions::new()
            .read_only(true)
            .open(dir.path())
            .unwrap_err();
        assert!(
            matches!(err, FileOpenError::NotFileOrBlockDevice { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn opening_for_writing_preallocates_the_window() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "prealloc.img", 4 * MIB);
        assert_eq!(allocated(&path), 0);
        let dev = FileDevice::open(&path).unwrap();
        assert!(
            allocated(&path) >= 4 * MIB,
            "allocated {}",
            allocated(&path)
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * MIB);
        assert!(read(&dev, 0, 4096).iter().all(|&b| b == 0));
    }

    #[test]
    fn preallocation_covers_only_the_window() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "prealloc-window.img", 4 * MIB);
        let _dev = OpenOptions::new()
            .offset_sectors(2048) // 1 MiB in
            .length_sectors(Some(2048)) // 1 MiB long
            .open(&path)
            .unwrap();
        let allocated = allocated(&path);
        assert!((MIB..2 * MIB).contains(&allocated), "allocated {allocated}");
    }

    #[test]
    fn preallocation_can_be_turned_off() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "sparse.img", 4 * MIB);
        let _dev = OpenOptions::new().preallocate(false).open(&path).unwrap();
        assert_eq!(allocated(&path), 0);
    }

    #[test]
    fn open_probes_leave_no_trace() {
        let dir = scratch_dir();
        let path = filled_file(dir.path(), "probe.img", 10_000, 3);
        let before = std::fs::read(&path).unwrap();
        let blocks_with_prealloc = {
            let _dev = FileDevice::open(&path).unwrap();
            allocated(&path)
        };
        let _again = FileDevice::open(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(
            allocated(&path),
            blocks_with_prealloc,
            "probe left blocks behind"
        );
    }

    #[test]
    fn read_only_refuses_changes_and_does_not_preallocate() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "ro.img", MIB);
        let dev = OpenOptions::new().read_only(true).open(&path).unwrap();
        assert_eq!(allocated(&path), 0);
        read_only_suite(&dev);
        dev.flush().unwrap();
    }

    #[test]
    fn capabilities_of_a_disk_file() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "caps.img", MIB);
        let caps = FileDevice::open(&path).unwrap().capabilities();
        // The scratch directory is on a disk filesystem (ext4, xfs, btrfs) with both.
        assert_eq!(
            caps,
            Capabilities {
                read_only: false,
                discard: true,
                write_zeroes: true
            }
        );
    }

    #[test]
    fn write_zeroes_and_discard_keep_the_allocation() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "keep.img", 4 * MIB);
        let dev = FileDevice::open(&path).unwrap();
        dev.write_at(&pattern(1, 2 * MIB as usize), 0, false)
            .unwrap();
        dev.flush().unwrap();
        let before = allocated(&path);

        dev.write_zeroes(0, MIB, true).unwrap();
        assert!(read(&dev, 0, MIB as usize).iter().all(|&b| b == 0));
        assert!(allocated(&path) >= before, "write_zeroes freed blocks");

        dev.discard(MIB, MIB).unwrap();
        dev.flush().unwrap();
        assert!(allocated(&path) >= before, "discard did not re-preallocate");
        assert_eq!(read(&dev, MIB, 4096), read(&dev, MIB, 4096));
    }

    #[test]
    fn discard_without_preallocation_frees_blocks() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "thin.img", 4 * MIB);
        let dev = OpenOptions::new().preallocate(false).open(&path).unwrap();
        dev.write_at(&pattern(1, 2 * MIB as usize), 0, false)
            .unwrap();
        dev.flush().unwrap();
        let before = allocated(&path);
        dev.discard(0, MIB).unwrap();
        assert!(allocated(&path) + MIB <= before, "discard freed nothing");
    }

    #[test]
    fn tmpfs_file_passes_contract() {
        let shm = Path::new("/dev/shm");
        let Ok(dir) = tempfile::tempdir_in(shm) else {
            eprintln!("note: skipping, no /dev/shm");
            return;
        };
        let path = sparse_file(dir.path(), "shm.img", MIB);
        let dev = FileDevice::open(&path).unwrap();
        // tmpfs punches holes; whether it zeroes ranges depends on the kernel.
        assert!(dev.capabilities().discard);
        contract_suite(&dev);
        eprintln!("tmpfs capabilities after use: {:?}", dev.capabilities());
    }

    #[test]
    fn write_zeroes_falls_back_to_writing_buffers() {
        let dir = scratch_dir();
        for direct in [false, true] {
            let path = sparse_file(dir.path(), "fallback.img", MIB);
            let Some(dev) = open_or_skip(OpenOptions::new().direct(direct), &path) else {
                continue;
            };
            // What an EOPNOTSUPP from the kernel leaves behind.
            dev.zero_range_supported.store(false, Ordering::Relaxed);
            assert!(!dev.capabilities().write_zeroes);
            contract_suite(&dev);
            dev.write_at(&pattern(1, 3 * 512), 0, false).unwrap();
            dev.write_zeroes(512, 512, true).unwrap();
            let after = read(&dev, 0, 3 * 512);
            assert_eq!(after[..512], pattern(1, 3 * 512)[..512]);
            assert!(after[512..1024].iter().all(|&b| b == 0));
            assert_eq!(after[1024..], pattern(1, 3 * 512)[1024..]);
        }
    }

    #[test]
    fn discard_reports_unsupported_once_the_kernel_says_so() {
        let dir = scratch_dir();
        let path = sparse_file(dir.path(), "nodiscard.img", MIB);
        let dev = FileDevice::open(&path).unwrap();
        dev.discard_supported.store(false, Ordering::Relaxed);
        assert!(!dev.capabilities().discard);
        contract_suite(&dev);
    }

    /// A loop device over a scratch file, detached on drop.
    struct LoopDevice(PathBuf);

    impl LoopDevice {
        fn attach(file: &Path) -> Option<Self> {
            let output = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .ok()?;
            if !output.status.success() {
                return None;
            }
            let name = String::from_utf8(output.stdout).ok()?;
            Some(Self(PathBuf::from(name.trim())))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn block_device_passes_contract() {
        let dir = scratch_dir();
        let backing = filled_file(dir.path(), "loop.img", 4 * MIB as usize, 7);
        let Some(loop_dev) = LoopDevice::attach(&backing) else {
            eprintln!("note: skipping, cannot attach a loop device (needs root and losetup)");
            return;
        };

        let dev = FileDevice::open(&loop_dev.0).unwrap();
        assert!(dev.is_block_device());
        assert_eq!(dev.size(), 4 * MIB);
        assert_eq!(read(&dev, 0, 4096), pattern(7, 4096));
        // Loop devices over a file support discard (they punch holes).
        assert!(dev.capabilities().discard);
        assert!(dev.capabilities().write_zeroes);
        contract_suite(&dev);
        dev.write_zeroes(0, MIB, true).unwrap();
        assert!(read(&dev, 0, MIB as usize).iter().all(|&b| b == 0));
        // Discard of less than a logical block does nothing, successfully.
        dev.discard(MIB, 100).unwrap();
        drop(dev);

        if let Some(dev) = open_or_skip(
            OpenOptions::new()
                .direct(true)
                .offset_sectors(3)
                .length_sectors(Some(4000)),
            &loop_dev.0,
        ) {
            assert_eq!(dev.size(), 4000 * 512);
            contract_suite(&dev);
        }

        let dev = OpenOptions::new()
            .read_only(true)
            .open(&loop_dev.0)
            .unwrap();
        read_only_suite(&dev);
    }
}
