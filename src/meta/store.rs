//! [`MetaStore`]: one resource's meta-data, attached, with the write-path rules enforced.
//!
//! The replication engine calls, around every write to the data device:
//!
//! ```text
//! store.write_begin(offset, len)?;      // extents hot; AL transaction durable if one was cold
//! data.write_at(..) / send to peer      // the write itself
//! store.mark_out_of_sync(offset, len);  // only if the peer did not get it — before write_end
//! store.write_end(offset, len);
//! ```
//!
//! and `mark_clean` on clean shutdown. Resync uses [`MetaStore::iterate_dirty`] and
//! [`MetaStore::clear_in_sync`] (only once the block is on both replicas at the resource's
//! durability level).
//!
//! Threads: every method takes `&self`. A write into hot extents touches only an in-memory
//! counter; one cold-extent transaction is written at a time while writes to hot extents go on.
//! After an I/O error on the meta-data the store refuses further writes ([`MetaError::Failed`]):
//! the caller detaches the disk.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::block::BlockDevice;
use crate::wire::ondisk::{flags, MetaKind, SuperblockRepr, BLOCK_LEN, SB_NAME_LEN};

use super::activity_log::{self, ActivityLog, Plan, PlanError};
use super::bitmap::{self, Bitmap};
use super::dump::{dump_fields, Inspection};
use super::generation::{random_uuid, UuidSet};
use super::layout::{internal_sb_offset, Layout, LayoutParams, EXTERNAL_SB_OFFSET};
use super::probe::{self, Finding};
use super::superblock::{self, SuperblockPair};
use super::MetaError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a resource's superblock is expected on its meta-data device.
pub fn sb_offset_for(kind: MetaKind, meta_device_size: u64) -> Result<u64, MetaError> {
    match kind {
        MetaKind::Internal => internal_sb_offset(meta_device_size).ok_or_else(|| {
            MetaError::Geometry(format!("device of {meta_device_size} bytes is too small"))
        }),
        MetaKind::External => Ok(EXTERNAL_SB_OFFSET),
    }
}

/// What create-md is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Resource name recorded in the superblock (at most 32 bytes).
    pub name: String,
    /// Activity-log geometry.
    pub params: LayoutParams,
    /// Overwrite whatever is found.
    pub force: bool,
}

/// What create-md did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateReport {
    /// The geometry written.
    pub layout: Layout,
    /// The new meta-data uuid.
    pub md_uuid: u64,
    /// What was there before and got overwritten (only with `force`).
    pub overwritten: Vec<Finding>,
}

/// What attach found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachReport {
    /// The activity log was clean: the last shutdown was orderly.
    pub was_clean: bool,
    /// Extents the activity log named after a crash; each was marked out of sync.
    pub al_extents_marked: usize,
    /// The activity log could not be rebuilt: the whole device was marked out of sync.
    pub al_incomplete: bool,
    /// Bitmap pages that failed their checks and were set entirely.
    pub corrupt_bitmap_pages: usize,
    /// The node was primary when it went down (CRASHED_PRIMARY is now set).
    pub crashed_primary: bool,
    /// Out-of-sync bytes after attach.
    pub out_of_sync_bytes: u64,
}

/// Counters, for status output and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaStats {
    /// `write_begin` calls that found every extent hot (no meta-data I/O).
    pub hot_begins: u64,
    /// Activity-log transactions written.
    pub al_transactions: u64,
    /// Extents evicted from the activity log.
    pub evictions: u64,
    /// Bitmap pages written.
    pub bitmap_page_writes: u64,
    /// Superblock writes.
    pub superblock_writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hot_begins: AtomicU64,
    al_transactions: AtomicU64,
    evictions: AtomicU64,
    bitmap_page_writes: AtomicU64,
    superblock_writes: AtomicU64,
}

#[derive(Debug)]
struct AlState {
    al: ActivityLog,
    /// A transaction (or mark_clean) is being written.
    busy: bool,
    /// mark_clean is running: no new writes may start.
    closing: bool,
    /// The superblock on disk says AL_CLEAN.
    clean_on_disk: bool,
}

/// One resource's attached meta-data.
pub struct MetaStore {
    meta: Arc<dyn BlockDevice>,
    data: Arc<dyn BlockDevice>,
    layout: Layout,
    md_uuid: u64,
    al: Mutex<AlState>,
    al_cond: Condvar,
    bitmap: Mutex<Bitmap>,
    /// Serialises bitmap write-back so an older copy of a page never lands after a newer one.
    bm_io: Mutex<()>,
    sb: Mutex<SuperblockRepr>,
    failed: AtomicBool,
    counters: Counters,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("layout", &self.layout)
            .field("md_uuid", &self.md_uuid)
            .finish_non_exhaustive()
    }
}

/// Writes fresh meta-data: zeroed activity log, clear bitmap, superblocks last.
///
/// `meta` is the device that holds the meta-data (for internal meta-data, the data device
/// itself); `data_device_size` is the size of the data device (ignored for internal).
/// Refuses, listing what it found, if the meta-data area holds existing meta-data or a known
/// filesystem, RAID, volume-manager or partition signature, or (internal) if a filesystem at
/// the start of the device is larger than the usable size — unless `opts.force`.
pub fn create(
    meta: &dyn BlockDevice,
    data_device_size: u64,
    kind: MetaKind,
    opts: &CreateOptions,
) -> Result<CreateReport, MetaError> {
    if opts.name.len() > SB_NAME_LEN || opts.name.contains('\0') {
        return Err(MetaError::Geometry(format!(
            "resource name {:?} is longer than {SB_NAME_LEN} bytes",
            opts.name
        )));
    }
    let layout = match kind {
        MetaKind::Internal => Layout::internal(meta.size(), opts.params)?,
        MetaKind::External => Layout::external(data_device_size, meta.size(), opts.params)?,
    };
    let mut found = probe::probe_meta_data(meta, layout.sb_offset)?;
    found.extend(probe::probe_area(meta, layout.md_offset, layout.md_size)?);
    if kind == MetaKind::Internal {
        if let Some((fs, size)) = probe::filesystem_size(meta)? {
            if size > layout.data_size {
                found.push(Finding {
                    what: format!(
                        "{fs} filesystem of {size} bytes at the start of the device, but internal meta-data leaves {} bytes (shrink it first)",
                        layout.data_size
                    ),
                    offset: 0,
                });
            }
        }
    }
    if !found.is_empty() && !opts.force {
        return Err(MetaError::Occupied(found));
    }

    let md_uuid = random_uuid(&mut rand::rng());
    // Old superblocks go first, so a crash part-way leaves no superblock pointing at a mix.
    let zero = vec![0u8; BLOCK_LEN];
    for copy in 0..2 {
        meta.write_at(&zero, layout.sb_copy_offset(copy), false)?;
    }
    meta.flush()?;
    for i in 0..layout.al_transactions {
        meta.write_at(&zero, layout.al_slot_offset(i), false)?;
    }
    let empty = Bitmap::new(layout.data_size, layout.bm_pages);
    for i in 0..layout.bm_pages {
        bitmap::write_page(meta, &layout, md_uuid, i, empty.page_bits(i))?;
    }
    meta.flush()?;
    let mut sb = SuperblockRepr {
        flags: flags::AL_CLEAN,
        seq: 0,
        md_uuid,
        uuids: UuidSet::just_created().to_array(),
        data_size: 0,
        md_size: 0,
        sb_offset: 0,
        al_offset: 0,
        bm_offset: 0,
        al_transactions: 0,
        al_extents: 0,
        al_extent_shift: 0,
        bm_block_shift: 0,
        kind,
        bm_pages: 0,
        name: opts.name.clone(),
        agreed_size: 0,
    };
    layout.fill_superblock(&mut sb);
    superblock::write_both(meta, &mut sb)?;
    meta.flush()?;
    Ok(CreateReport {
        layout,
        md_uuid,
        overwritten: found,
    })
}

/// Reads a resource's meta-data without changing anything. For internal meta-data the data
/// device is `meta` itself and `data_device_size` is ignored.
pub fn inspect(
    meta: &dyn BlockDevice,
    data_device_size: u64,
    kind: MetaKind,
) -> Result<Inspection, MetaError> {
    let sb_offset = sb_offset_for(kind, meta.size())?;
    let pair = SuperblockPair::read(meta, sb_offset)?;
    let Some((copy, sb)) = pair.current() else {
        if pair.any_magic() {
            let why: Vec<String> = pair
                .copies
                .iter()
                .enumerate()
                .map(|(i, c)| format!("copy {i}: {c:?}"))
                .collect();
            return Err(MetaError::Corrupt(format!(
                "both superblock copies at byte {sb_offset} are damaged ({})",
                why.join("; ")
            )));
        }
        return Err(MetaError::NoMetaData { offset: sb_offset });
    };
    let sb = sb.clone();
    if sb.kind != kind {
        return Err(MetaError::Geometry(format!(
            "the meta-data found is {:?} but {kind:?} was asked for",
            sb.kind
        )));
    }
    let layout = Layout::from_superblock(&sb);
    let data_device_size = match kind {
        MetaKind::Internal => meta.size(),
        MetaKind::External => data_device_size,
    };
    layout.check_fits(meta.size(), data_device_size)?;
    let mut ring = Vec::with_capacity(layout.al_transactions as usize);
    let mut block = vec![0u8; BLOCK_LEN];
    for i in 0..layout.al_transactions {
        meta.read_at(&mut block, layout.al_slot_offset(i))?;
        ring.push(activity_log::parse_slot(
            &block,
            i,
            layout.al_transactions,
            sb.md_uuid,
            layout.al_extents,
        ));
    }
    let al = activity_log::recover(&ring, layout.al_extents);
    let (bitmap, corrupt_pages) = bitmap::load(meta, &layout, sb.md_uuid)?;
    Ok(Inspection {
        superblocks: pair.clone(),
        copy_in_force: copy,
        superblock: sb,
        layout,
        ring,
        al,
        bitmap,
        corrupt_pages,
    })
}

impl MetaStore {
    /// Attaches a resource's meta-data. `meta` holds the meta-data; `data` is the device the
    /// replicated writes go to (for internal meta-data the same device, or a window onto its
    /// first [`data_size`](Self::data_size) bytes): it is flushed before any extent leaves the
    /// activity log.
    ///
    /// After a crash (AL not clean) every extent the activity log names is marked out of sync,
    /// or the whole device if the log cannot be rebuilt; bitmap pages that fail their checks
    /// are set entirely; the result is written back before this returns. If the node was
    /// primary, CRASHED_PRIMARY is set.
    pub fn attach(
        meta: Arc<dyn BlockDevice>,
        data: Arc<dyn BlockDevice>,
        kind: MetaKind,
    ) -> Result<(MetaStore, AttachReport), MetaError> {
        let insp = inspect(meta.as_ref(), data.size(), kind)?;
        let layout = insp.layout;
        let mut sb = insp.superblock;
        let mut bitmap = insp.bitmap;
        let was_clean = sb.flags & flags::AL_CLEAN != 0;
        let mut report = AttachReport {
            was_clean,
            al_extents_marked: 0,
            al_incomplete: false,
            corrupt_bitmap_pages: insp.corrupt_pages.len(),
            crashed_primary: false,
            out_of_sync_bytes: 0,
        };
        if !was_clean {
            if insp.al.complete {
                for &e in &insp.al.extents {
                    let start = (e as u64) << layout.al_extent_shift;
                    bitmap.set_range(start, layout.extent_size());
                }
                report.al_extents_marked = insp.al.extents.len();
            } else {
                bitmap.set_all();
                report.al_incomplete = true;
            }
        }
        let store = MetaStore {
            meta,
            data,
            layout,
            md_uuid: sb.md_uuid,
            al: Mutex::new(AlState {
                al: ActivityLog::new(
                    layout.al_extents,
                    layout.al_transactions,
                    sb.md_uuid,
                    insp.al.newest.map_or(0, |n| n + 1),
                ),
                busy: false,
                closing: false,
                clean_on_disk: was_clean,
            }),
            al_cond: Condvar::new(),
            bitmap: Mutex::new(bitmap),
            bm_io: Mutex::new(()),
            sb: Mutex::new(sb.clone()),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
        };
        // The bitmap must hold the AL's extents before any new transaction overwrites the ring.
        store.flush_bitmap()?;
        if sb.flags & flags::PRIMARY_IND != 0 && sb.flags & flags::CRASHED_PRIMARY == 0 {
            store.update_superblock(|sb| sb.flags |= flags::CRASHED_PRIMARY)?;
            sb.flags |= flags::CRASHED_PRIMARY;
        }
        report.crashed_primary = sb.flags & flags::CRASHED_PRIMARY != 0;
        report.out_of_sync_bytes = store.out_of_sync_bytes();
        Ok((store, report))
    }

    /// The geometry.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Usable data bytes.
    pub fn data_size(&self) -> u64 {
        self.layout.data_size
    }

    /// This meta-data's uuid.
    pub fn md_uuid(&self) -> u64 {
        self.md_uuid
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> SuperblockRepr {
        lock(&self.sb).clone()
    }

    /// The generation uuids.
    pub fn uuids(&self) -> UuidSet {
        UuidSet::from_array(lock(&self.sb).uuids)
    }

    /// Writes new generation uuids (durably, before returning).
    pub fn set_uuids(&self, uuids: UuidSet) -> Result<(), MetaError> {
        self.update_superblock(|sb| sb.uuids = uuids.to_array())
    }

    /// Sets and clears superblock flags (see [`flags`]) durably. AL_CLEAN is managed by the
    /// store and cannot be changed here.
    pub fn set_flags(&self, set: u32, clear: u32) -> Result<(), MetaError> {
        let set = set & !flags::AL_CLEAN;
        let clear = clear & !flags::AL_CLEAN;
        self.update_superblock(|sb| sb.flags = (sb.flags | set) & !clear)
    }

    /// Counters so far.
    pub fn stats(&self) -> MetaStats {
        let c = &self.counters;
        MetaStats {
            hot_begins: c.hot_begins.load(Ordering::Relaxed),
            al_transactions: c.al_transactions.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            bitmap_page_writes: c.bitmap_page_writes.load(Ordering::Relaxed),
            superblock_writes: c.superblock_writes.load(Ordering::Relaxed),
        }
    }

    /// Extents currently in the activity log.
    pub fn hot_extents(&self) -> Vec<u32> {
        lock(&self.al).al.hot_extents()
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<u32> {
        let shift = self.layout.al_extent_shift;
        let first = offset >> shift;
        let last = (offset + len - 1) >> shift;
        (first..=last).map(|e| e as u32).collect()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), MetaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.data_size => Ok(()),
            _ => Err(MetaError::OutOfRange {
                offset,
                len,
                size: self.layout.data_size,
            }),
        }
    }

    /// Call before writing `len` bytes at `offset` of the data. Returns once every extent the
    /// range touches is in the activity log **durably**: if one was cold, an AL transaction has
    /// been written (FUA) — after the bitmap pages of any evicted extent, and after a flush of
    /// the data device. Blocks while the log is full of extents with writes in flight.
    pub fn write_begin(&self, offset: u64, len: u64) -> Result<(), MetaError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let extents = self.extents(offset, len);
        let mut g = lock(&self.al);
        let mut cold = false;
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Err(MetaError::Failed);
            }
            if !g.closing && g.al.try_acquire(&extents) {
                if !cold {
                    self.counters.hot_begins.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            if g.busy || g.closing {
                g = self.al_cond.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let plan = match g.al.plan(&extents) {
                Ok(Some(plan)) => plan,
                Ok(None) | Err(PlanError::Full) => {
                    g = self.al_cond.wait(g).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                Err(PlanError::TooLarge) => {
                    return Err(MetaError::TooLarge {
                        extents: extents.len(),
                        slots: self.layout.al_extents,
                    })
                }
            };
            g.busy = true;
            cold = true;
            let clean_on_disk = g.clean_on_disk;
            drop(g);
            let result = self.write_transaction(&plan, clean_on_disk);
            g = lock(&self.al);
            g.busy = false;
            match result {
                Ok(()) => {
                    g.al.commit(&plan);
                    g.clean_on_disk = false;
                    self.al_cond.notify_all();
                }
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    self.al_cond.notify_all();
                    return Err(e);
                }
            }
        }
    }

    /// The I/O of one transaction, in the order the rules demand.
    fn write_transaction(&self, plan: &Plan, clean_on_disk: bool) -> Result<(), MetaError> {
        if !plan.evicted.is_empty() {
            // Rule 2: the bitmap of an extent is durable before the extent leaves the log; and
            // so is its data, or a crash could lose a write the peer has, in a block that
            // neither the log nor the bitmap names.
            let mut pages: Vec<u32> = Vec::new();
            {
                let bm = lock(&self.bitmap);
                for &e in &plan.evicted {
                    let start = (e as u64) << self.layout.al_extent_shift;
                    for p in bm.pages_for_range(start, self.layout.extent_size()) {
                        if bm.is_dirty(p) && !pages.contains(&p) {
                            pages.push(p);
                        }
                    }
                }
            }
            self.write_back(&pages)?;
            if !Arc::ptr_eq(&self.meta, &self.data) {
                self.data.flush()?;
            }
            self.meta.flush()?;
            self.counters
                .evictions
                .fetch_add(plan.evicted.len() as u64, Ordering::Relaxed);
        }
        // Rule 1: the transaction is durable before the first write into a cold extent.
        let block = plan.transaction.to_block();
        self.meta
            .write_at(&block, self.layout.al_slot_offset(plan.ring_slot), true)?;
        self.counters
            .al_transactions
            .fetch_add(1, Ordering::Relaxed);
        if clean_on_disk {
            self.update_superblock(|sb| sb.flags &= !flags::AL_CLEAN)?;
        }
        Ok(())
    }

    /// Writes the given pages if dirty (not flushed).
    fn write_back(&self, pages: &[u32]) -> Result<(), MetaError> {
        let _io = lock(&self.bm_io);
        for &p in pages {
            let bits = {
                let mut bm = lock(&self.bitmap);
                if !bm.is_dirty(p) {
                    continue;
                }
                bm.take_page(p)
            };
            if let Err(e) =
                bitmap::write_page(self.meta.as_ref(), &self.layout, self.md_uuid, p, &bits)
            {
                lock(&self.bitmap).mark_dirty(p);
                self.failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
            self.counters
                .bitmap_page_writes
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Call when the write that [`write_begin`](Self::write_begin) admitted has completed (or
    /// failed). Any [`mark_out_of_sync`](Self::mark_out_of_sync) for it must come first.
    pub fn write_end(&self, offset: u64, len: u64) {
        if len == 0 || self.check(offset, len).is_err() {
            return;
        }
        let extents = self.extents(offset, len);
        lock(&self.al).al.release(&extents);
        self.al_cond.notify_all();
    }

    /// Marks the blocks a byte range touches as out of sync (in memory; written back before
    /// their extent leaves the log, or on flush). Returns how many bits were newly set.
    ///
    /// Crash-safe while the range is inside a write between `write_begin` and `write_end`
    /// (the log covers it until the bitmap is written); otherwise call
    /// [`flush_bitmap`](Self::flush_bitmap) to make it durable.
    pub fn mark_out_of_sync(&self, offset: u64, len: u64) -> u64 {
        lock(&self.bitmap).set_range(offset, len)
    }

    /// Marks the blocks wholly inside a byte range as in sync. Returns how many bits were
    /// cleared. Call only once the blocks are on both replicas.
    pub fn clear_in_sync(&self, offset: u64, len: u64) -> u64 {
        lock(&self.bitmap).clear_range(offset, len)
    }

    /// Marks every block of the usable size out of sync (a full resync), durably.
    pub fn set_all_out_of_sync(&self) -> Result<(), MetaError> {
        let usable = self.usable_size();
        {
            let mut bitmap = lock(&self.bitmap);
            bitmap.set_all();
            bitmap.clear_range(usable, self.layout.data_size - usable);
        }
        self.flush_bitmap()
    }

    /// The usable size: the size last agreed with a smaller peer, else the whole data area.
    pub fn usable_size(&self) -> u64 {
        match lock(&self.sb).agreed_size {
            0 => self.layout.data_size,
            agreed => agreed,
        }
    }

    /// Records, durably, that the pair agreed on `size` bytes (the peer's disk is smaller),
    /// and forgets any out-of-sync bits beyond it: those blocks are no longer part of the
    /// device. Only ever shrinks.
    pub fn set_agreed_size(&self, size: u64) -> Result<(), MetaError> {
        let size = size / 4096 * 4096;
        if size >= self.usable_size() {
            return Ok(());
        }
        self.update_superblock(|sb| sb.agreed_size = size)?;
        lock(&self.bitmap).clear_range(size, self.layout.data_size - size);
        self.flush_bitmap()
    }

    /// Bytes marked out of sync.
    pub fn out_of_sync_bytes(&self) -> u64 {
        lock(&self.bitmap).out_of_sync_bytes()
    }

    /// Whether the 4 KiB block holding byte `offset` is marked out of sync.
    pub fn is_out_of_sync(&self, offset: u64) -> bool {
        lock(&self.bitmap).test(offset / super::layout::BM_BLOCK_SIZE)
    }

    /// The out-of-sync byte ranges (runs of set bits), in order, as of now.
    pub fn iterate_dirty(&self) -> impl Iterator<Item = Range<u64>> {
        lock(&self.bitmap).runs(self.layout.data_size).into_iter()
    }

    /// Writes every dirty bitmap page and flushes the meta-data device.
    pub fn flush_bitmap(&self) -> Result<(), MetaError> {
        let pages = lock(&self.bitmap).dirty_pages();
        self.write_back(&pages)?;
        if let Err(e) = self.meta.flush() {
            self.failed.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(())
    }

    /// Waits up to `timeout` for every write between `write_begin` and `write_end` to end.
    /// Returns how many are still in flight.
    pub fn wait_for_writes(&self, timeout: std::time::Duration) -> u64 {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = lock(&self.al);
        loop {
            let in_flight = g.al.in_flight();
            let now = std::time::Instant::now();
            if in_flight == 0 || now >= deadline {
                return in_flight;
            }
            g = self
                .al_cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Clean shutdown: waits for the current transaction, refuses if writes are in flight,
    /// flushes the data, writes the bitmap, then sets AL_CLEAN (and clears PRIMARY_IND: an
    /// orderly shutdown is a demotion). The store stays usable; the next write into any
    /// extent starts a new log.
    pub fn mark_clean(&self) -> Result<(), MetaError> {
        let mut g = lock(&self.al);
        while g.busy || g.closing {
            g = self.al_cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(MetaError::Failed);
        }
        let in_flight = g.al.in_flight();
        if in_flight > 0 {
            return Err(MetaError::Busy { in_flight });
        }
        g.closing = true;
        drop(g);
        let result = (|| {
            if !Arc::ptr_eq(&self.meta, &self.data) {
                self.data.flush()?;
            }
            self.flush_bitmap()?;
            self.update_superblock(|sb| {
                sb.flags = (sb.flags | flags::AL_CLEAN) & !flags::PRIMARY_IND;
            })
        })();
        let mut g = lock(&self.al);
        if result.is_ok() {
            g.al.clear();
            g.clean_on_disk = true;
        } else {
            self.failed.store(true, Ordering::Relaxed);
        }
        g.closing = false;
        self.al_cond.notify_all();
        result
    }

    /// Applies `f` to a copy of the superblock, bumps the sequence and writes it (FUA).
    fn update_superblock(&self, f: impl FnOnce(&mut SuperblockRepr)) -> Result<(), MetaError> {
        let mut sb = lock(&self.sb);
        let mut next = sb.clone();
        f(&mut next);
        // Only a damaged-but-checksummed superblock gets here; wrapping would let the older
        // copy win at the next attach.
        next.seq = sb
            .seq
            .checked_add(1)
            .ok_or_else(|| MetaError::Corrupt("superblock write sequence is exhausted".into()))?;
        if let Err(e) = superblock::write(self.meta.as_ref(), &next) {
            self.failed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        self.counters
            .superblock_writes
            .fetch_add(1, Ordering::Relaxed);
        *sb = next;
        Ok(())
    }
}

/// Attaches fuzzed meta-data; the `ondisk` cargo-fuzz target calls this.
///
/// The input edits a real meta-data image (internal on a 512 KiB disk or external, created
/// once, with a used activity log and a set bitmap bit): byte 0 picks the image (bit 0) and
/// whether edited blocks get their crc32c recomputed (bit 1) — so the fuzzer also reaches the
/// checks behind the checksum, as a bug that writes garbage with a good checksum would; then
/// 3-byte edits (u16 byte offset into the meta-data area, value). [`inspect`], `dump-md`'s
/// formatting and [`MetaStore::attach`] must not panic on anything; a store that attached
/// must take a write, a clean shutdown and a second attach.
pub fn fuzz_attach(data: &[u8]) {
    use crate::block::crash::CrashDevice;
    use crate::wire::ondisk::{AlTransaction, BitmapPage, Superblock, AL_MAGIC, BM_MAGIC};
    use std::sync::OnceLock;

    /// (meta image, data device size, kind, meta-data area offset, area length).
    type Base = (Vec<u8>, u64, MetaKind, u64, u64);
    static BASES: OnceLock<[Base; 2]> = OnceLock::new();
    let bases = BASES.get_or_init(|| {
        let params = LayoutParams {
            al_extents: 7,
            al_extent_shift: 16,
        };
        let opts = CreateOptions {
            name: "fuzz".into(),
            params,
            force: false,
        };
        let build = |kind: MetaKind| -> Base {
            let data_len = 512 << 10;
            let (meta, data) = match kind {
                MetaKind::Internal => {
                    let dev = Arc::new(CrashDevice::new(data_len + (64 << 10)));
                    (dev.clone(), dev)
                }
                MetaKind::External => (
                    Arc::new(CrashDevice::new(64 << 10)),
                    Arc::new(CrashDevice::new(data_len)),
                ),
            };
            let layout = create(meta.as_ref(), data.size(), kind, &opts)
                .expect("create")
                .layout;
            let meta_dyn: Arc<dyn BlockDevice> = meta.clone();
            let data_dyn: Arc<dyn BlockDevice> = data.clone();
            let (store, _) = MetaStore::attach(meta_dyn, data_dyn, kind).expect("attach");
            // Nine extents through a seven-slot log: evictions, a wrapped context, a set bit.
            for e in 0..9u64 {
                let at = e * layout.extent_size() % layout.data_size;
                store.write_begin(at, 4096).expect("write_begin");
                if e == 1 {
                    store.mark_out_of_sync(at, 4096);
                }
                store.write_end(at, 4096);
            }
            meta.flush().expect("flush");
            (
                meta.image(),
                data.size(),
                kind,
                layout.md_offset,
                layout.md_size,
            )
        };
        [build(MetaKind::Internal), build(MetaKind::External)]
    });
    let Some((&mode, edits)) = data.split_first() else {
        return;
    };
    let (image, data_size, kind, md_offset, md_len) = &bases[(mode & 1) as usize];
    let mut image = image.clone();
    let mut touched = Vec::new();
    for e in edits.chunks_exact(3) {
        let at = *md_offset + u16::from_le_bytes([e[0], e[1]]) as u64 % *md_len;
        image[at as usize] = e[2];
        let block = at / BLOCK_LEN as u64 * BLOCK_LEN as u64;
        if !touched.contains(&block) {
            touched.push(block);
        }
    }
    if mode & 2 != 0 {
        for block in touched {
            let b = &mut image[block as usize..block as usize + BLOCK_LEN];
            let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if Superblock::new_unchecked(&b[..]).has_magic() {
                Superblock::new_unchecked(b).fill_checksum();
            } else if magic == AL_MAGIC {
                AlTransaction::new_unchecked(b).fill_checksum();
            } else if magic == BM_MAGIC {
                BitmapPage::new_unchecked(b).fill_checksum();
            }
        }
    }
    let meta = Arc::new(CrashDevice::from_image(image));
    let data: Arc<CrashDevice> = match kind {
        MetaKind::Internal => meta.clone(),
        MetaKind::External => Arc::new(CrashDevice::new(*data_size)),
    };
    if let Ok(insp) = inspect(meta.as_ref(), data.size(), *kind) {
        let _ = dump_fields(&insp, "n", *kind, std::path::Path::new("/x"));
    }
    let Ok((store, report)) = MetaStore::attach(meta.clone(), data.clone(), *kind) else {
        return;
    };
    assert_eq!(report.out_of_sync_bytes, store.out_of_sync_bytes());
    let len = store.data_size().min(4096);
    if len > 0 {
        store.write_begin(0, len).expect("write_begin after attach");
        store.write_end(0, len);
    }
    store.mark_clean().expect("mark_clean after attach");
    let (_, again) = MetaStore::attach(meta, data, *kind).expect("attach after a clean shutdown");
    assert!(again.was_clean && again.corrupt_bitmap_pages == 0);
    assert!(again.out_of_sync_bytes >= report.out_of_sync_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::{CrashDevice, CrashMode};
    use crate::wire::ondisk::BM_BITS_PER_PAGE;

    fn small() -> LayoutParams {
        LayoutParams {
            al_extents: 7,
            al_extent_shift: 16,
        }
    }

    fn opts() -> CreateOptions {
        CreateOptions {
            name: "r0".into(),
            params: small(),
            force: false,
        }
    }

    fn internal(size: u64) -> (Arc<CrashDevice>, MetaStore) {
        let dev = Arc::new(CrashDevice::new(size));
        create(dev.as_ref(), 0, MetaKind::Internal, &opts()).unwrap();
        let (store, report) =
            MetaStore::attach(dev.clone(), dev.clone(), MetaKind::Internal).unwrap();
        assert!(report.was_clean);
        assert_eq!(report.out_of_sync_bytes, 0);
        (dev, store)
    }

    #[test]
    fn agreed_size_persists_and_bounds_the_bitmap() {
        let (dev, store) = internal(4 << 20);
        let whole = store.data_size();
        assert_eq!(store.usable_size(), whole);
        store.mark_out_of_sync(whole - 8192, 8192);
        store.set_agreed_size(whole - 4096 - 100).unwrap();
        let agreed = whole - 8192;
        assert_eq!(store.usable_size(), agreed, "rounded down to 4 KiB");
        assert_eq!(
            store.out_of_sync_bytes(),
            0,
            "bits beyond the agreed size are gone"
        );
        store.set_agreed_size(whole).unwrap();
        assert_eq!(store.usable_size(), agreed, "only ever shrinks");
        store.set_all_out_of_sync().unwrap();
        assert_eq!(
            store.out_of_sync_bytes(),
            agreed,
            "a full sync covers the usable size"
        );
        store.mark_clean().unwrap();
        drop(store);
        let (again, _) = MetaStore::attach(dev.clone(), dev, MetaKind::Internal).unwrap();
        assert_eq!(again.usable_size(), agreed, "survives a restart");
        assert_eq!(again.superblock().agreed_size, agreed);
    }

    #[test]
    fn fuzz_attach_survives_samples() {
        fuzz_attach(&[]);
        fuzz_attach(&[0]);
        fuzz_attach(&[1]);
        // Garbage with a good checksum in every superblock copy: both internal and external.
        for mode in [2u8, 3] {
            let mut input = vec![mode];
            for at in (0u16..60_000).step_by(997) {
                input.extend_from_slice(&at.to_le_bytes());
                input.push(at as u8);
            }
            fuzz_attach(&input);
        }
    }

    #[test]
    fn hot_writes_cost_no_meta_io() {
        let (dev, store) = internal(4 << 20);
        let writes = dev.writes();
        store.write_begin(0, 4096).unwrap();
        store.write_end(0, 4096);
        // One reset transaction + clearing AL_CLEAN in the superblock.
        assert_eq!(dev.writes(), writes + 2);
        assert_eq!(store.superblock().flags & flags::AL_CLEAN, 0);
        let writes = dev.writes();
        for i in 0..100 {
            store.write_begin((i % 16) * 4096, 4096).unwrap();
            store.write_end((i % 16) * 4096, 4096);
        }
        assert_eq!(dev.writes(), writes, "hot extent wrote meta-data");
        assert_eq!(store.stats().hot_begins, 100);
        assert_eq!(store.stats().al_transactions, 1);
    }

    #[test]
    fn eviction_writes_bitmap_then_transaction() {
        let (dev, store) = internal(4 << 20);
        let ext = store.layout().extent_size();
        for e in 0..7 {
            store.write_begin(e * ext, 4096).unwrap();
            store.mark_out_of_sync(e * ext, 4096);
            store.write_end(e * ext, 4096);
        }
        assert_eq!(store.stats().evictions, 0);
        let page_writes = store.stats().bitmap_page_writes;
        let flushes = dev.flushes();
        store.write_begin(7 * ext, 4096).unwrap();
        store.write_end(7 * ext, 4096);
        assert_eq!(store.stats().evictions, 1);
        assert_eq!(store.stats().bitmap_page_writes, page_writes + 1);
        assert!(dev.flushes() > flushes);
        assert!(!store.hot_extents().contains(&0));
        // After a crash with nothing volatile lost, extent 0's bit is on disk.
        let after = Arc::new(dev.crash(CrashMode::DropAll));
        let (again, report) = MetaStore::attach(after.clone(), after, MetaKind::Internal).unwrap();
        assert!(!report.was_clean);
        assert!(again.is_out_of_sync(0));
        assert_eq!(report.al_extents_marked, 7);
    }

    #[test]
    fn crash_marks_every_al_extent_and_clean_shutdown_marks_none() {
        let (dev, store) = internal(4 << 20);
        let ext = store.layout().extent_size();
        store.write_begin(3 * ext + 100, 2 * ext).unwrap(); // extents 3, 4, 5
        store.write_end(3 * ext + 100, 2 * ext);
        let crashed = Arc::new(dev.crash(CrashMode::DropAll));
        let (after, report) =
            MetaStore::attach(crashed.clone(), crashed.clone(), MetaKind::Internal).unwrap();
        assert_eq!(report.al_extents_marked, 3);
        assert!(!report.al_incomplete);
        assert_eq!(after.out_of_sync_bytes(), 3 * ext);
        assert_eq!(
            after.iterate_dirty().collect::<Vec<_>>(),
            vec![3 * ext..6 * ext]
        );
        // Re-attaching again after another crash gives the same (the bitmap was written).
        let again = Arc::new(crashed.crash(CrashMode::DropAll));
        let (_, report) = MetaStore::attach(again.clone(), again, MetaKind::Internal).unwrap();
        assert_eq!(report.out_of_sync_bytes, 3 * ext);

        store.mark_clean().unwrap();
        let clean = Arc::new(dev.crash(CrashMode::DropAll));
        let (after, report) = MetaStore::attach(clean.clone(), clean, MetaKind::Internal).unwrap();
        assert!(report.was_clean);
        assert_eq!(after.out_of_sync_bytes(), 0);
    }

    #[test]
    fn mark_clean_refuses_in_flight_writes() {
        let (_dev, store) = internal(4 << 20);
        store.write_begin(0, 512).unwrap();
        assert!(matches!(
            store.mark_clean(),
            Err(MetaError::Busy { in_flight: 1 })
        ));
        store.write_end(0, 512);
        store.mark_clean().unwrap();
        assert!(store.superblock().flags & flags::AL_CLEAN != 0);
        // Usable again afterwards.
        store.write_begin(0, 512).unwrap();
        store.write_end(0, 512);
        assert_eq!(store.superblock().flags & flags::AL_CLEAN, 0);
    }

    #[test]
    fn out_of_range_and_too_large_requests_are_refused() {
        let (_dev, store) = internal(4 << 20);
        let size = store.data_size();
        assert!(matches!(
            store.write_begin(size - 512, 1024),
            Err(MetaError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.write_begin(0, 8 * store.layout().extent_size()),
            Err(MetaError::TooLarge { .. })
        ));
        store.write_begin(size, 0).unwrap();
    }

    #[test]
    fn full_log_waits_for_write_end() {
        let (_dev, store) = internal(4 << 20);
        let store = Arc::new(store);
        let ext = store.layout().extent_size();
        for e in 0..7 {
            store.write_begin(e * ext, 512).unwrap();
        }
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || store.write_begin(7 * ext, 512))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a full log admitted a cold extent");
        store.write_end(2 * ext, 512);
        waiter.join().unwrap().unwrap();
        assert!(!store.hot_extents().contains(&2));
    }

    #[test]
    fn primary_crash_sets_crashed_primary() {
        let (dev, store) = internal(4 << 20);
        store.set_flags(flags::PRIMARY_IND, 0).unwrap();
        let crashed = Arc::new(dev.crash(CrashMode::DropAll));
        let (after, report) =
            MetaStore::attach(crashed.clone(), crashed, MetaKind::Internal).unwrap();
        assert!(report.crashed_primary);
        assert!(after.superblock().flags & flags::CRASHED_PRIMARY != 0);
        let mut uuids = after.uuids();
        uuids.new_current(0x100);
        after.set_uuids(uuids).unwrap();
        assert_eq!(uuids.bitmap, super::super::generation::UUID_JUST_CREATED);
        assert_eq!(after.uuids(), uuids);
    }

    #[test]
    fn corrupt_bitmap_page_is_set_entirely() {
        let size = 8 * BM_BITS_PER_PAGE * 4096 / 4; // two bitmap pages
        let dev = Arc::new(CrashDevice::new(size));
        create(dev.as_ref(), 0, MetaKind::Internal, &opts()).unwrap();
        let layout = inspect(dev.as_ref(), 0, MetaKind::Internal).unwrap().layout;
        assert_eq!(layout.bm_pages, 2);
        dev.write_at(&[0xff; 16], layout.bm_page_offset(1) + 100, true)
            .unwrap();
        let (store, report) =
            MetaStore::attach(dev.clone(), dev.clone(), MetaKind::Internal).unwrap();
        assert_eq!(report.corrupt_bitmap_pages, 1);
        let expect = layout.bm_bits() - BM_BITS_PER_PAGE;
        assert_eq!(store.out_of_sync_bytes(), expect * 4096);
        // The page was rewritten: the next attach finds it valid.
        let (_, report) = MetaStore::attach(dev.clone(), dev, MetaKind::Internal).unwrap();
        assert_eq!(report.corrupt_bitmap_pages, 0);
    }

    #[test]
    fn create_refuses_signatures_and_existing_meta_data() {
        let dev = CrashDevice::new(4 << 20);
        let layout = Layout::internal(4 << 20, small()).unwrap();
        dev.write_at(&[0x53, 0xEF], layout.md_offset + 1080, false)
            .unwrap();
        match create(&dev, 0, MetaKind::Internal, &opts()) {
            Err(MetaError::Occupied(found)) => {
                assert_eq!(found[0].what, "ext2/3/4 filesystem");
                assert_eq!(found[0].offset, layout.md_offset + 1080);
            }
            other => panic!("{other:?}"),
        }
        let forced = create(
            &dev,
            0,
            MetaKind::Internal,
            &CreateOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(forced.overwritten.len(), 1);
        // Now there is meta-data: refused again, naming it.
        let err = create(&dev, 0, MetaKind::Internal, &opts()).unwrap_err();
        assert!(
            err.to_string()
                .contains("twinblade meta-data of resource \"r0\""),
            "{err}"
        );

        // An ext4 filesystem that spans the whole device would lose its end.
        let dev = CrashDevice::new(4 << 20);
        let mut sb = vec![0u8; 1024];
        sb[56..58].copy_from_slice(&[0x53, 0xEF]);
        sb[4..8].copy_from_slice(&1024u32.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes());
        dev.write_at(&sb, 1024, false).unwrap();
        let err = create(&dev, 0, MetaKind::Internal, &opts()).unwrap_err();
        assert!(err.to_string().contains("shrink it first"), "{err}");

        // External meta-data on a partitioned disk.
        let meta = CrashDevice::new(1 << 20);
        meta.write_at(b"EFI PART", 512, false).unwrap();
        let err = create(&meta, 4 << 20, MetaKind::External, &opts()).unwrap_err();
        assert!(err.to_string().contains("GPT partition table"), "{err}");
    }

    #[test]
    fn external_meta_data_flushes_the_data_device_on_eviction() {
        let meta = Arc::new(CrashDevice::new(1 << 20));
        let data = Arc::new(CrashDevice::new(2 << 20));
        create(meta.as_ref(), data.size(), MetaKind::External, &opts()).unwrap();
        let (store, _) = MetaStore::attach(meta.clone(), data.clone(), MetaKind::External).unwrap();
        assert_eq!(store.data_size(), 2 << 20);
        let ext = store.layout().extent_size();
        for e in 0..8 {
            store.write_begin(e * ext, 512).unwrap();
            data.write_at(&[1; 512], e * ext, false).unwrap();
            store.write_end(e * ext, 512);
        }
        assert_eq!(data.flushes(), 1);
        assert!(matches!(
            MetaStore::attach(
                meta.clone(),
                Arc::new(CrashDevice::new(1 << 20)),
                MetaKind::External
            ),
            Err(MetaError::Geometry(_))
        ));
        assert!(matches!(
            inspect(meta.as_ref(), 2 << 20, MetaKind::Internal),
            Err(MetaError::NoMetaData { .. })
        ));
    }
}
