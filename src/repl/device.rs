//! [`ReplicatedDevice`]: the `BlockDevice` the exports serve on a primary. A write completes
//! only when every replica that must have it has it; a lost peer turns writes into dirty bits,
//! not errors.
//!
//! # The write path
//!
//! ```text
//! meta.write_begin            extents hot (AL transaction durable if one was cold)
//! ┌ order lock ─────────────┐
//! │ send WriteData to peer  │  same order on both nodes for overlapping writes
//! │ local write             │
//! └─────────────────────────┘
//! wait for the peer          protocol C: written there at the durability level
//!                            protocol B: received there; protocol A: not at all
//! mark out of sync           if the peer did not confirm (lost, dropped by ko-count)
//! meta.write_end
//! ```
//!
//! Durability `node` acknowledges what is in the operating system of both nodes; `power` writes
//! with FUA on both nodes before the acknowledgement.
//!
//! # While this node is a resync target
//!
//! A primary may be a resync target (promoted while its data was still being brought up to
//! date). Its out-of-sync blocks are stale, so reads that touch one go to the peer; and resync
//! data that arrives for sectors a client wrote since the resync started is not written over
//! them: both nodes already have the client's newer data, and the resync copy may have been
//! read before it (DRBD's conflict detection between application and resync writes).
//!
//! # Faults
//!
//! A local I/O error detaches the local disk (`on-io-error detach`): the engine is told
//! ([`DeviceEvent::LocalIoError`]); reads and writes then go to the peer only, and fail only if
//! there is no peer either.
//!
//! A client FLUSH becomes a barrier to the peer under every protocol: the peer answers it once
//! every write sent before it is applied and its own flush returned. Until then the extents of
//! those writes are *unflushed*: the peer may hold them only in its cache. If the peer fails a
//! flush or a write (its disk is failing; it detaches, as DRBD's peer does on an I/O error), or
//! does not confirm at all, every unflushed extent is marked out of sync before the FLUSH is
//! answered: what the peer did not make stable is resynced, never assumed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::block::timed::IoLatency;
use crate::block::{
    check_range, BlockDevice, BlockError, Capabilities, PendingWrite, Result, WriteCompletion,
};
use crate::meta::store::MetaStore;
use crate::wire::repl::{
    AckKind, BarrierAckRepr, BarrierRepr, Durability, Message, ReplProtocol, ResyncRequestRepr,
};

use super::link::{PeerLink, Reply};

// Re-exported for the one caller that still names it here (daemon/resource.rs).
pub use crate::wire::repl::WRITE_FUA;

/// What the device tells its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The local disk failed; it is detached.
    LocalIoError,
    /// The peer reported an I/O error: bits were marked out of sync in memory, and the bitmap
    /// should be written (by a thread that may wait for the disk).
    PeerIoError,
}

/// I/O counters for `status`.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Bytes read by clients.
    pub read_bytes: AtomicU64,
    /// Bytes written by clients.
    pub written_bytes: AtomicU64,
    /// Bytes sent to the peer (replicated writes).
    pub sent_bytes: AtomicU64,
    /// Writes that completed without the peer and were marked out of sync.
    pub writes_marked: AtomicU64,
    /// How long client reads, writes and flushes took here (a write until the peer's
    /// acknowledgement when the protocol waits for it).
    pub latency: IoLatency,
}

/// The replicated block device of one resource.
pub struct ReplicatedDevice {
    local: Arc<dyn BlockDevice>,
    meta: Arc<MetaStore>,
    protocol: ReplProtocol,
    durability: Durability,
    link: RwLock<Option<Arc<PeerLink>>>,
    order: Mutex<()>,
    detached: AtomicBool,
    /// The usable size agreed with the peer (the smaller of the two; `u64::MAX` before).
    limit: AtomicU64,
    events: Box<dyn Fn(DeviceEvent) + Send + Sync>,
    /// `Some` while this node is a resync target: the sectors clients wrote since it started.
    sync_target: Mutex<Option<SectorSet>>,
    /// Extents sent to the peer since it last confirmed a flush.
    unflushed: Unflushed,
    /// Counters.
    pub counters: Arc<IoCounters>,
}

/// Extents written to the peer since it last confirmed a flush (a barrier). Extent-sized, so
/// the set stays small whatever the write pattern.
#[derive(Debug, Default)]
struct Unflushed {
    extents: Mutex<std::collections::BTreeSet<u64>>,
}

/// Bytes per unflushed extent (4 MiB): coarse on purpose, a failed peer flush is rare.
const UNFLUSHED_EXTENT_SHIFT: u32 = 22;

impl Unflushed {
    fn extents(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.extents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a write of `len` bytes at `offset` sent to the peer.
    fn record(&self, offset: u64, len: u64) {
        let first = offset >> UNFLUSHED_EXTENT_SHIFT;
        let last = (offset + len.max(1) - 1) >> UNFLUSHED_EXTENT_SHIFT;
        self.extents().extend(first..=last);
    }

    /// What a barrier sent now covers; recording starts afresh.
    fn take(&self) -> std::collections::BTreeSet<u64> {
        std::mem::take(&mut *self.extents())
    }

    /// The peer may have lost what it was sent: `taken` (a barrier's share) and everything
    /// recorded since are marked out of sync.
    fn mark_lost(&self, meta: &MetaStore, taken: std::collections::BTreeSet<u64>) {
        let mut all = taken;
        all.extend(self.take());
        let size = 1u64 << UNFLUSHED_EXTENT_SHIFT;
        for e in all {
            meta.mark_out_of_sync(e << UNFLUSHED_EXTENT_SHIFT, size);
        }
    }
}

/// A set of byte ranges, merged where they touch.
#[derive(Debug, Default)]
struct SectorSet {
    /// start -> end, disjoint and not adjacent.
    ranges: std::collections::BTreeMap<u64, u64>,
}

impl SectorSet {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// The parts of [start, end) not in the set, in order.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .ranges
            .range(..start)
            .next_back()
            .filter(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e));
        for (s, e) in first
            .into_iter()
            .chain(self.ranges.range(start..end).map(|(&s, &e)| (s, e)))
        {
            if s > at {
                out.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

impl std::fmt::Debug for ReplicatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDevice")
            .field("protocol", &self.protocol)
            .field("durability", &self.durability)
            .field("detached", &self.is_detached())
            .finish_non_exhaustive()
    }
}

impl ReplicatedDevice {
    /// A device over `local` (the data area, exactly `meta.data_size()` bytes) and its
    /// meta-data. `events` is called from I/O threads.
    pub fn new(
        local: Arc<dyn BlockDevice>,
        meta: Arc<MetaStore>,
        protocol: ReplProtocol,
        durability: Durability,
        events: Box<dyn Fn(DeviceEvent) + Send + Sync>,
    ) -> ReplicatedDevice {
        ReplicatedDevice {
            local,
            meta,
            protocol,
            durability,
            link: RwLock::new(None),
            order: Mutex::new(()),
            detached: AtomicBool::new(false),
            limit: AtomicU64::new(u64::MAX),
            events,
            sync_target: Mutex::new(None),
            unflushed: Unflushed::default(),
            counters: Arc::default(),
        }
    }

    /// This node becomes (`true`) or stops being (`false`) a resync target.
    pub fn set_sync_target(&self, target: bool) {
        let mut st = self.sync_target.lock().unwrap_or_else(|e| e.into_inner());
        match (target, st.is_some()) {
            (true, false) => *st = Some(SectorSet::default()),
            (false, true) => *st = None,
            _ => {}
        }
    }

    fn is_sync_target(&self) -> bool {
        self.sync_target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Writes resync data that arrived from the sync source, except over sectors a client
    /// wrote since the resync started (both nodes have those already, newer).
    pub fn apply_resync(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        let _order = self.order_lock();
        for (s, e) in self.not_written_by_clients(offset, data.len() as u64) {
            let at = (s - offset) as usize..(e - offset) as usize;
            self.local.write_at(&data[at], s, fua)?;
        }
        Ok(())
    }

    /// Makes a range read as zeros for a resync zero marker, except the sectors a client wrote
    /// since the resync started (as [`apply_resync`](Self::apply_resync)).
    pub fn apply_resync_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let _order = self.order_lock();
        for (s, e) in self.not_written_by_clients(offset, len) {
            self.local.write_zeroes(s, e - s, fua)?;
        }
        Ok(())
    }

    /// The parts of a range that no client wrote since the resync started (all of it when
    /// this node is not a resync target). Call under the order lock.
    fn not_written_by_clients(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        match &*self.sync_target.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(written) => written.gaps(offset, offset + len),
            None => vec![(offset, offset + len)],
        }
    }

    /// A read while resync target touches an out-of-sync (stale) block.
    fn reads_stale(&self, offset: u64, len: u64) -> bool {
        if !self.is_sync_target() {
            return false;
        }
        let block = crate::meta::layout::BM_BLOCK_SIZE;
        let mut at = offset / block * block;
        while at < offset + len {
            if self.meta.is_out_of_sync(at) {
                return true;
            }
            at += block;
        }
        false
    }

    /// Starts (Some) or stops (None) replicating to a peer. Stopping fails every write still
    /// waiting for it, which then marks its blocks out of sync.
    pub fn set_link(&self, link: Option<Arc<PeerLink>>) {
        let old = {
            let mut l = self.link.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *l, link)
        };
        drop(old);
    }

    /// Limits the device to `size` bytes (the peer's disk is smaller). Only ever shrinks.
    pub fn limit_size(&self, size: u64) {
        self.limit.fetch_min(size, Ordering::AcqRel);
    }

    /// The link writes go to, if any.
    pub fn link(&self) -> Option<Arc<PeerLink>> {
        self.link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|l| !l.is_dead())
    }

    /// The local disk is detached.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// Takes the local disk out of the I/O path.
    pub fn detach(&self) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            (self.events)(DeviceEvent::LocalIoError);
        }
    }

    /// The order lock: whoever sends blocks to the peer (writes, resync) holds it so that
    /// overlapping data reaches both disks in the same order.
    pub fn order_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer reported an I/O error (a failed write or flush): its disk is failing, so what
    /// it acknowledged from its cache since its last confirmed flush may be lost there. Marks
    /// those extents out of sync. Call before completing the request the report answers.
    /// Never waits: the marks are in memory; the owner is told ([`DeviceEvent::PeerIoError`])
    /// to write the bitmap.
    pub fn peer_failed_io(&self) {
        self.unflushed.mark_lost(&self.meta, Default::default());
        (self.events)(DeviceEvent::PeerIoError);
    }

    /// The local data device.
    pub fn local(&self) -> &Arc<dyn BlockDevice> {
        &self.local
    }

    fn local_write(&self, data: &[u8], offset: u64, fua: bool) -> bool {
        if self.is_detached() {
            return false;
        }
        let fua = fua || self.durability == Durability::Power;
        match self.local.write_at(data, offset, fua) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(offset, len = data.len(), error = %e, "local write failed; detaching the disk");
                self.detach();
                false
            }
        }
    }
}

/// What the peer said (or will say) about a replicated write.
enum PeerOutcome {
    Known(bool),
    Waiting {
        link: Arc<PeerLink>,
        id: u64,
        rx: super::link::Answer,
    },
}

/// A replicated write sent to the peer and written locally, waiting for the peer's answer.
struct ReplicatedWrite {
    done: WrittenLocally,
    peer: PeerOutcome,
}

/// What is left to do once the peer has answered.
struct WrittenLocally {
    meta: Arc<MetaStore>,
    counters: Arc<IoCounters>,
    offset: u64,
    len: u64,
    local_ok: bool,
    /// When the client's write reached the device (for the latency histogram).
    started: Instant,
}

impl WrittenLocally {
    fn settle(self, peer_ok: bool) -> Result<()> {
        let result = self.settle_untimed(peer_ok);
        self.counters.latency.write.observe(self.started.elapsed());
        result
    }

    fn settle_untimed(&self, peer_ok: bool) -> Result<()> {
        let (offset, len) = (self.offset, self.len);
        if !peer_ok && !self.local_ok {
            self.meta.write_end(offset, len);
            return Err(no_disk());
        }
        if !peer_ok || !self.local_ok {
            // Only one replica has it: the block differs until a resync (a detached local
            // disk records what it missed, as far as its meta-data can still be written).
            self.meta.mark_out_of_sync(offset, len);
            self.counters.writes_marked.fetch_add(1, Ordering::Relaxed);
        }

        self.meta.write_end(offset, len);
        Ok(())
    }
}

impl PendingWrite for ReplicatedWrite {
    fn poll(&mut self) -> bool {
        let PeerOutcome::Waiting { rx, .. } = &self.peer else {
            return true;
        };
        match rx.try_recv() {
            Ok(reply) => {
                self.peer = PeerOutcome::Known(peer_has_it(&reply));
                true
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.peer = PeerOutcome::Known(false);
                true
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let peer_ok = match &self.peer {
            PeerOutcome::Known(ok) => *ok,
            PeerOutcome::Waiting { rx, .. } => rx.recv().is_ok_and(|reply| peer_has_it(&reply)),
        };
        self.done.settle(peer_ok)
    }

    fn then(self: Box<Self>, on_done: Box<dyn FnOnce(Result<()>) + Send>) {
        let ReplicatedWrite { done, peer } = *self;
        match peer {
            PeerOutcome::Known(ok) => on_done(done.settle(ok)),
            // Completed by the link's reader when the acknowledgement arrives.
            PeerOutcome::Waiting { link, id, rx } => link.when_answered(
                id,
                rx,
                Box::new(move |reply| on_done(done.settle(peer_has_it(&reply)))),
            ),
        }
    }
}

fn peer_has_it(reply: &Reply) -> bool {
    matches!(reply, Reply::Ack(AckKind::Completed | AckKind::Received))
}

impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> u64 {
        self.local.size().min(self.limit.load(Ordering::Acquire))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            discard: false,
            write_zeroes: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let started = Instant::now();
        let result = self.read_untimed(buf, offset);
        self.counters.latency.read.observe(started.elapsed());
        result
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.start_write(data, offset, fua)?.wait()
    }

    fn start_write(&self, data: &[u8], offset: u64, fua: bool) -> Result<WriteCompletion> {
        let started = Instant::now();
        let result = self.start_write_untimed(data, offset, fua, started);
        if result.is_err() {
            // Refused before it was written anywhere; nothing left to settle it.
            self.counters.latency.write.observe(started.elapsed());
        }
        result
    }

    fn flush(&self) -> Result<()> {
        let started = Instant::now();
        let result = self.flush_untimed();
        self.counters.latency.flush.observe(started.elapsed());
        result
    }
}

/// The client requests, untimed (the [`BlockDevice`] methods time them).
impl ReplicatedDevice {
    fn read_untimed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        self.counters
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if !self.is_detached() && !self.reads_stale(offset, buf.len() as u64) {
            match self.local.read_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::error!(offset, len = buf.len(), error = %e, "local read failed; detaching the disk");
                    self.detach();
                }
            }
        }
        // Detached, or stale here: read through the peer.
        let link = self.link().ok_or_else(no_disk)?;
        let answer = link
            .request(|id| {
                Message::ResyncRequest(ResyncRequestRepr {
                    id,
                    offset,
                    len: buf.len() as u32,
                    checksum: None,
                })
            })
            .ok_or_else(no_disk)?;
        match answer.recv() {
            Ok(Reply::Data(data)) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            _ => Err(no_disk()),
        }
    }

    fn start_write_untimed(
        &self,
        data: &[u8],
        offset: u64,
        fua: bool,
        started: Instant,
    ) -> Result<WriteCompletion> {
        let len = data.len() as u64;
        check_range(self.size(), offset, len)?;
        self.meta
            .write_begin(offset, len)
            .map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))?;
        self.counters
            .written_bytes
            .fetch_add(len, Ordering::Relaxed);
        let (answer, local_ok) = {
            let _order = self.order_lock();
            if let Some(written) = &mut *self.sync_target.lock().unwrap_or_else(|e| e.into_inner())
            {
                written.insert(offset, offset + len);
            }
            let answer = self.link().and_then(|link| {
                let flags = if fua { WRITE_FUA } else { 0 };
                self.counters.sent_bytes.fetch_add(len, Ordering::Relaxed);
                self.unflushed.record(offset, len);
                if self.protocol == ReplProtocol::A {
                    // Fire and forget: id 0 asks for no acknowledgement.
                    link.send_write(offset, flags, data).ok().map(|()| None)
                } else {
                    link.request_write(offset, flags, data)
                        .map(|(id, rx)| Some((link.clone(), id, rx)))
                }
            });
            (answer, self.local_write(data, offset, fua))
        };
        let peer = match answer {
            Some(None) => PeerOutcome::Known(true),
            Some(Some((link, id, rx))) => PeerOutcome::Waiting { link, id, rx },
            None => PeerOutcome::Known(false),
        };
        Ok(WriteCompletion::pending(Box::new(ReplicatedWrite {
            done: WrittenLocally {
                meta: self.meta.clone(),
                counters: self.counters.clone(),
                offset,
                len,
                local_ok,
                started,
            },
            peer,
        })))
    }

    fn flush_untimed(&self) -> Result<()> {
        let local_ok = !self.is_detached()
            && match self.local.flush() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "local flush failed; detaching the disk");
                    self.detach();
                    false
                }
            };
        // Every protocol carries the FLUSH to the peer: the barrier is answered once every
        // write sent before it is applied there and the peer's flush returned.
        let peer_ok = match self.link() {
            Some(link) => {
                let (covered, answer) = {
                    let _order = self.order_lock();
                    let covered = self.unflushed.take();
                    let answer = link.request(|id| Message::Barrier(BarrierRepr { barrier: id }));
                    (covered, answer)
                };
                let ok = answer.is_some_and(|rx| {
                    rx.recv()
                        .is_ok_and(|reply| matches!(reply, Reply::Ack(AckKind::Completed)))
                });
                if !ok {
                    tracing::warn!(
                        "the peer did not confirm a flush: what it was sent since its last one is marked out of sync"
                    );
                    self.unflushed.mark_lost(&self.meta, covered);
                    // Durable before the FLUSH is answered: a crash of this node next must
                    // not forget what the peer lacks.
                    if let Err(e) = self.meta.flush_bitmap() {
                        tracing::error!(error = %e, "cannot write the bitmap");
                    }
                }
                ok
            }
            None => false,
        };
        if local_ok || peer_ok {
            Ok(())
        } else {
            Err(no_disk())
        }
    }
}

/// What a `BarrierAck` tells the flush waiting for it.
pub fn barrier_reply(a: &BarrierAckRepr) -> Reply {
    Reply::Ack(if a.stable {
        AckKind::Completed
    } else {
        AckKind::Failed
    })
}

fn no_disk() -> BlockError {
    BlockError::Io(std::io::Error::other(
        "no usable disk: the local disk is detached and the peer is not reachable",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::CrashDevice;
    use crate::meta::store::{create, CreateOptions};
    use crate::meta::LayoutParams;
    use crate::wire::ondisk::MetaKind;
    use crate::wire::repl::{FrameDecoder, MessageRepr, Packet, ResyncDataRepr, WriteAckRepr};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    const SIZE: u64 = 8 << 20;
    /// What the fake peer's disk holds everywhere.
    const PEER_BYTE: u8 = 0xAB;

    /// A replicated device over in-memory disks, linked to a fake peer that applies nothing
    /// and acknowledges every write `delay` after it arrived (a slow secondary disk).
    fn device_with_slow_peer(
        protocol: ReplProtocol,
        delay: Duration,
    ) -> (ReplicatedDevice, Arc<MetaStore>) {
        let peer = FakePeer {
            delay,
            ..FakePeer::default()
        };
        device_with_peer(protocol, Durability::Node, peer)
    }

    /// How the fake peer behaves: write delay, whether its flushes succeed, and how many
    /// barriers it saw.
    #[derive(Default, Clone)]
    struct FakePeer {
        delay: Duration,
        flush_fails: bool,
        barriers: Arc<AtomicU64>,
    }

    fn device_with_peer(
        protocol: ReplProtocol,
        durability: Durability,
        peer: FakePeer,
    ) -> (ReplicatedDevice, Arc<MetaStore>) {
        let FakePeer {
            delay,
            flush_fails,
            barriers,
        } = peer;
        let meta_dev: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(1 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(CrashDevice::new(SIZE));
        let opts = CreateOptions {
            name: "t".into(),
            params: LayoutParams::default(),
            force: true,
        };
        create(meta_dev.as_ref(), SIZE, MetaKind::External, &opts).unwrap();
        let (meta, _) = MetaStore::attach(meta_dev, data.clone(), MetaKind::External).unwrap();
        let meta = Arc::new(meta);
        let dev = ReplicatedDevice::new(data, meta.clone(), protocol, durability, Box::new(|_| {}));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        let mut reply = theirs.try_clone().unwrap();
        let link = Arc::new(PeerLink::new(
            1,
            "peer".into(),
            ours.try_clone().unwrap(),
            1,
            0,
        ));
        // Acks from the fake peer come back on `ours`.
        let reader_link = link.clone();
        let mut ours_rd = ours;
        std::thread::spawn(move || {
            let mut dec = FrameDecoder::new().check_sequence(0);
            let mut buf = [0u8; 4096];
            while let Ok(n) = ours_rd.read(&mut buf) {
                if n == 0 {
                    break;
                }
                dec.feed(&buf[..n]);
                while let Ok(Some(m)) = dec.next_message() {
                    match m.message {
                        Message::WriteAck(a) => {
                            reader_link.complete(a.id, Reply::Ack(a.kind));
                        }
                        Message::ResyncData(d) => {
                            reader_link.complete(d.id, Reply::Data(d.data));
                        }
                        Message::BarrierAck(a) => {
                            reader_link.complete(a.barrier, barrier_reply(&a));
                        }
                        _ => {}
                    }
                }
            }
        });
        std::thread::spawn(move || {
            let mut dec = FrameDecoder::new().check_sequence(0);
            let mut buf = vec![0u8; 1 << 16];
            let mut seq = 0;
            while let Ok(n) = theirs.read(&mut buf) {
                if n == 0 {
                    break;
                }
                dec.feed(&buf[..n]);
                while let Ok(Some(m)) = dec.next_message() {
                    let message = match m.message {
                        Message::WriteData(w) if w.id != 0 => {
                            std::thread::sleep(delay);
                            Message::WriteAck(WriteAckRepr {
                                id: w.id,
                                kind: AckKind::Completed,
                            })
                        }
                        Message::Barrier(b) => {
                            barriers.fetch_add(1, Ordering::Relaxed);
                            Message::BarrierAck(BarrierAckRepr {
                                barrier: b.barrier,
                                stable: !flush_fails,
                            })
                        }
                        // The peer's copy of every block is PEER_BYTE.
                        Message::ResyncRequest(r) => Message::ResyncData(ResyncDataRepr {
                            id: r.id,
                            offset: r.offset,
                            data: vec![PEER_BYTE; r.len as usize],
                        }),
                        _ => continue,
                    };
                    {
                        let ack = MessageRepr {
                            version: 1,
                            seq,
                            message,
                        };
                        seq += 1;
                        let mut out = vec![0u8; ack.buffer_len()];
                        ack.emit(&mut Packet::new_unchecked(&mut out[..]));
                        if reply.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        dev.set_link(Some(link));
        (dev, meta)
    }

    #[test]
    fn every_protocol_carries_a_flush_to_the_peer() {
        for protocol in [ReplProtocol::A, ReplProtocol::B, ReplProtocol::C] {
            let peer = FakePeer::default();
            let (dev, meta) = device_with_peer(protocol, Durability::Node, peer.clone());
            dev.write_at(&[3u8; 8192], 0, false).unwrap();
            dev.flush().unwrap();
            assert_eq!(
                peer.barriers.load(Ordering::Relaxed),
                1,
                "protocol {protocol:?}: the FLUSH did not reach the peer"
            );
            assert_eq!(meta.out_of_sync_bytes(), 0, "protocol {protocol:?}");
        }
    }

    #[test]
    fn a_flush_the_peer_fails_marks_what_it_was_sent_out_of_sync() {
        for durability in [Durability::Node, Durability::Power] {
            let peer = FakePeer {
                flush_fails: true,
                ..FakePeer::default()
            };
            let (dev, meta) = device_with_peer(ReplProtocol::C, durability, peer);
            dev.write_at(&[3u8; 8192], 0, false).unwrap();
            dev.write_at(&[4u8; 4096], 5 << 20, false).unwrap();
            assert_eq!(meta.out_of_sync_bytes(), 0, "acknowledged by the peer");
            // The local flush succeeds, so the FLUSH does; but not on the strength of the peer.
            dev.flush().unwrap();
            for offset in [0, 5 << 20] {
                assert!(
                    meta.is_out_of_sync(offset),
                    "{durability:?}: {offset} is not marked although the peer's flush failed"
                );
            }
            // What the next flush covers starts afresh.
            let marked = meta.out_of_sync_bytes();
            dev.flush().unwrap();
            assert_eq!(meta.out_of_sync_bytes(), marked);
        }
    }

    #[test]
    fn a_peer_io_error_marks_what_the_peer_held_only_in_its_cache() {
        let (dev, meta) = device_with_peer(ReplProtocol::C, Durability::Node, FakePeer::default());
        dev.write_at(&[5u8; 4096], 0, false).unwrap();
        // Confirmed stable on the peer: no longer at risk.
        dev.flush().unwrap();
        dev.write_at(&[6u8; 4096], 5 << 20, true).unwrap();
        assert_eq!(meta.out_of_sync_bytes(), 0);
        // The peer reports a failed write (or flush): its cache may be lost.
        dev.peer_failed_io();
        assert!(meta.is_out_of_sync(5 << 20), "unconfirmed write not marked");
        assert!(
            !meta.is_out_of_sync(0),
            "a write the peer flushed was marked"
        );
    }

    fn timed_write(dev: &ReplicatedDevice) -> Duration {
        let t = Instant::now();
        dev.write_at(&[7u8; 4096], 4096, false).unwrap();
        t.elapsed()
    }

    #[test]
    fn protocol_c_waits_for_a_slow_secondary() {
        let (dev, meta) = device_with_slow_peer(ReplProtocol::C, Duration::from_millis(200));
        let took = timed_write(&dev);
        assert!(
            took >= Duration::from_millis(200),
            "protocol C acked after {took:?}"
        );
        assert_eq!(
            meta.out_of_sync_bytes(),
            0,
            "the peer has it: nothing is dirty"
        );
        // The latency histogram timed it until the peer's acknowledgement.
        let w = dev.counters.latency.write.snapshot();
        assert_eq!(w.count(), 1);
        assert!(w.sum_ns >= 200_000_000, "{w:?}");
        let le_100ms = crate::block::timed::bucket_of(100_000_000);
        assert_eq!(w.buckets[..=le_100ms].iter().sum::<u64>(), 0, "{w:?}");
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 4096).unwrap();
        let l = dev.counters.latency.snapshot();
        assert_eq!((l.read.count(), l.write.count()), (1, 1));
    }

    #[test]
    fn protocol_a_does_not_wait() {
        let (dev, meta) = device_with_slow_peer(ReplProtocol::A, Duration::from_millis(200));
        let took = timed_write(&dev);
        assert!(
            took < Duration::from_millis(150),
            "protocol A acked after {took:?}"
        );
        assert_eq!(meta.out_of_sync_bytes(), 0);
    }

    #[test]
    fn a_lost_peer_turns_writes_into_dirty_bits() {
        let (dev, meta) = device_with_slow_peer(ReplProtocol::C, Duration::from_secs(3600));
        let link = dev.link().unwrap();
        let waiter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            link.fail_all();
        });
        dev.write_at(&[9u8; 8192], 0, false)
            .expect("the write completes locally");
        waiter.join().unwrap();
        assert_eq!(meta.out_of_sync_bytes(), 8192);
        let mut back = [0u8; 8192];
        dev.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [9u8; 8192]);
        // With no peer at all, writes are marked at once.
        dev.write_at(&[1u8; 4096], 1 << 20, false).unwrap();
        assert_eq!(meta.out_of_sync_bytes(), 8192 + 4096);
    }

    #[test]
    fn a_resync_target_reads_stale_blocks_from_the_peer() {
        let (dev, meta) = device_with_slow_peer(ReplProtocol::C, Duration::ZERO);
        meta.mark_out_of_sync(8192, 4096);
        let mut back = vec![0u8; 12288];
        dev.read_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "not a target: the local disk serves"
        );
        dev.set_sync_target(true);
        dev.read_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == PEER_BYTE),
            "a read touching a stale block comes from the peer"
        );
        let mut clean = vec![1u8; 4096];
        dev.read_at(&mut clean, 1 << 20).unwrap();
        assert!(
            clean.iter().all(|&b| b == 0),
            "in-sync blocks are read locally"
        );
        dev.set_sync_target(false);
        dev.read_at(&mut back, 8192).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn resync_data_never_overwrites_what_a_client_wrote_during_the_resync() {
        let (dev, meta) = device_with_slow_peer(ReplProtocol::C, Duration::ZERO);
        meta.mark_out_of_sync(0, 16384);
        dev.set_sync_target(true);
        // A client writes sectors 1 and 5..7 while the resync runs; then resync data read by
        // the source before those writes arrives for the whole range.
        dev.write_at(&[7u8; 512], 512, false).unwrap();
        dev.write_at(&[8u8; 1536], 2560, false).unwrap();
        dev.apply_resync(&[0xCC; 16384], 0, false).unwrap();
        let mut back = vec![0u8; 16384];
        dev.local().read_at(&mut back, 0).unwrap();
        for (sector, chunk) in back.chunks(512).enumerate() {
            let want = match sector {
                1 => 7,
                5..=7 => 8,
                _ => 0xCC,
            };
            assert!(chunk.iter().all(|&b| b == want), "sector {sector}");
        }
        // Zero markers keep the client's sectors too.
        dev.apply_resync_zeroes(0, 4096, false).unwrap();
        dev.local().read_at(&mut back[..4096], 0).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0) && back[512..1024].iter().all(|&b| b == 7));
        assert!(
            back[1024..2560].iter().all(|&b| b == 0) && back[2560..4096].iter().all(|&b| b == 8)
        );
        // Once the resync is over, resync data is written as it comes.
        dev.set_sync_target(false);
        dev.apply_resync(&[0xDD; 4096], 0, false).unwrap();
        dev.local().read_at(&mut back[..4096], 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xDD));
    }

    #[test]
    fn sector_set_merges_and_finds_gaps() {
        let mut set = SectorSet::default();
        set.insert(100, 200);
        set.insert(300, 400);
        set.insert(200, 250); // touches the first
        assert_eq!(set.ranges.len(), 2);
        assert_eq!(set.gaps(0, 500), vec![(0, 100), (250, 300), (400, 500)]);
        assert_eq!(set.gaps(150, 320), vec![(250, 300)]);
        assert_eq!(set.gaps(120, 240), vec![]);
        set.insert(50, 350);
        assert_eq!(set.ranges.len(), 1);
        assert_eq!(set.gaps(0, 500), vec![(0, 50), (400, 500)]);
    }
}
