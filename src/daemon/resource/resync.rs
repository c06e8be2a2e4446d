//! The resync source's copier: copies out-of-sync blocks to the peer under the device's order
//! lock, so a concurrent client write cannot be overtaken by older data. A full sync first asks
//! the peer for the checksum of each 4 KiB block and sends only blocks that differ; all-zero
//! blocks travel as zero markers; a [`Pacer`] sets the pace. Also the bitmap exchange that
//! starts a bitmap resync.

use super::*;

impl Engine {
    pub(super) fn maybe_start_copier(&mut self) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let Some(job) = &mut self.job else { return };
        if job.direction != SyncDirection::Source
            || job.copier_started
            || !(job.full || job.peer_bitmap_done)
        {
            return;
        }
        job.copier_started = true;
        let full = job.full;
        let total = self.res.meta.out_of_sync_bytes();
        self.res.progress.total.store(total, Ordering::Relaxed);
        tracing::info!(
            resource = %self.res.spec.name,
            "resync started: {total} bytes to examine, {}",
            if full { "checksum-based" } else { "bitmap-based" }
        );
        let me = self.res.clone();
        let paused = self.paused.clone();
        let started = self
            .res
            .crew
            .spawn(format!("resync-{}", self.res.spec.name), move |_| {
                let ok = me.copy_out_of_sync(&link, &paused, full);
                if ok {
                    tracing::info!(
                        resource = %me.spec.name,
                        "resync copied: {} bytes sent, {} equal, {} zero",
                        me.progress.sent.load(Ordering::Relaxed),
                        me.progress.same.load(Ordering::Relaxed),
                        me.progress.zero.load(Ordering::Relaxed)
                    );
                }
                me.send(Input::CopierDone(link.conn_id, ok));
            });
        if let Err(e) = started {
            tracing::error!(resource = %self.res.spec.name, "cannot start the resync copier: {e}");
        }
    }
}

impl Resource {
    pub(super) fn apply_bitmap_chunk(&self, c: &BitmapChunkRepr) {
        let bits = match c.encoding {
            BitmapEncoding::Raw => c.bits.clone(),
            BitmapEncoding::Rle => return,
        };
        for i in 0..c.bit_count as u64 {
            if bits[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                let off = (c.first_bit + i) * 4096;
                let len = 4096.min(self.device.size().saturating_sub(off));
                if len > 0 {
                    self.meta.mark_out_of_sync(off, len);
                }
            }
        }
    }

    pub(super) fn send_bitmap(&self, link: &PeerLink) {
        let size = self.device.size();
        for range in self.meta.iterate_dirty().collect::<Vec<_>>() {
            let first = range.start / 4096;
            let end = range.end.min(size).div_ceil(4096);
            let mut bit = first;
            while bit < end {
                let count = (end - bit).min(MAX_DATA_LEN as u64 * 8 / 2) as u32;
                let mut bits = vec![0xffu8; count.div_ceil(8) as usize];
                if !count.is_multiple_of(8) {
                    *bits.last_mut().unwrap() = (1u8 << (count % 8)) - 1;
                }
                let _ = link.send(Message::BitmapChunk(BitmapChunkRepr {
                    first_bit: bit,
                    bit_count: count,
                    encoding: BitmapEncoding::Raw,
                    last: false,
                    bits,
                }));
                bit += count as u64;
            }
        }
        let _ = link.send(Message::BitmapChunk(BitmapChunkRepr {
            first_bit: 0,
            bit_count: 1,
            encoding: BitmapEncoding::Raw,
            last: true,
            bits: vec![0],
        }));
    }

    /// The source's copier: every out-of-sync block to the peer, until none is left. With
    /// `checksums` (a full sync) the peer first sends the digest of each 4 KiB block of a
    /// chunk and only blocks that differ travel; in both modes all-zero blocks travel as zero
    /// markers. The local read and the send happen under the device's order lock.
    fn copy_out_of_sync(&self, link: &PeerLink, paused: &AtomicBool, checksums: bool) -> bool {
        let size = self.device.size();
        let chunk = if checksums { CSUM_CHUNK } else { RESYNC_CHUNK };
        let mut c = Copier {
            link,
            pacer: Pacer::new(self.spec.rate, Instant::now()),
            queue: std::collections::VecDeque::new(),
            csums: std::collections::VecDeque::new(),
            in_flight: 0,
        };
        loop {
            // Bits beyond a size shrunk to the peer's never need copying.
            let ranges: Vec<_> = self
                .meta
                .iterate_dirty()
                .filter(|r| r.start < size)
                .collect();
            if ranges.is_empty() {
                return true;
            }
            for range in ranges {
                let mut off = range.start;
                let end = range.end.min(size);
                while off < end {
                    if !self.copier_gate(&mut c, paused) {
                        return false;
                    }
                    // Chunks aligned to the chunk size, so checksum requests line up.
                    let len = (chunk - off % chunk).min(end - off);
                    if checksums {
                        let Some(answer) = link.request(|id| {
                            Message::ChecksumRequest(ChecksumRequestRepr {
                                id,
                                offset: off,
                                len: len as u32,
                            })
                        }) else {
                            return false;
                        };
                        // Reserve the chunk's worth: what may travel once the checksums are in.
                        c.pacer.charge(len);
                        c.in_flight += len;
                        c.csums.push_back(InFlight::Csum { off, len, answer });
                    } else {
                        let Some(data) = self.push_chunk(&mut c, off, len, None) else {
                            return false;
                        };
                        c.pacer.charge(data);
                    }
                    off += len;
                }
            }
            while c.pending() > 0 {
                if !self.reap(&mut c, true) {
                    return false;
                }
            }
        }
    }

    /// Before the copier issues more: pause, link, window and rate. False: give up.
    fn copier_gate(&self, c: &mut Copier<'_>, paused: &AtomicBool) -> bool {
        loop {
            if c.link.is_dead() || self.crew.token().is_cancelled() {
                return false;
            }
            // Settle whatever the peer has answered (acks feed the rate controller).
            while c.pending() > 0 {
                match self.reap_ready(c) {
                    Some(true) => {}
                    Some(false) => return false,
                    None => break,
                }
            }
            if paused.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if c.pending() >= RESYNC_WINDOW {
                if !self.reap(c, true) {
                    return false;
                }
                continue;
            }
            let app = self.device.counters.read_bytes.load(Ordering::Relaxed)
                + self.device.counters.written_bytes.load(Ordering::Relaxed);
            match c.pacer.poll(Instant::now(), c.in_flight, app) {
                None => return true,
                Some(wait) => {
                    if c.pending() > 0 && !self.reap(c, true) {
                        return false;
                    }
                    if c.pending() == 0 {
                        std::thread::sleep(wait.min(Duration::from_millis(20)));
                    }
                }
            }
        }
    }

    /// Settles the oldest checksum request or, failing that, the oldest push, if its answer is
    /// there: `None` if neither is answered yet.
    fn reap_ready(&self, c: &mut Copier<'_>) -> Option<bool> {
        for csums in [true, false] {
            let q = if csums { &mut c.csums } else { &mut c.queue };
            let Some(InFlight::Csum { answer, .. } | InFlight::Push { answer, .. }) = q.front()
            else {
                continue;
            };
            match answer.try_recv() {
                Ok(reply) => {
                    let entry = q.pop_front().expect("not empty");
                    return Some(self.settle(c, entry, reply));
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Some(false),
            }
        }
        None
    }

    /// Settles one message, waiting for its answer if `blocking`: the oldest checksum request
    /// if there is one (its answer leads to more data), else the oldest push.
    fn reap(&self, c: &mut Copier<'_>, blocking: bool) -> bool {
        if !blocking {
            return self.reap_ready(c).unwrap_or(true);
        }
        let entry = match c.csums.pop_front() {
            Some(e) => e,
            None => match c.queue.pop_front() {
                Some(e) => e,
                None => return true,
            },
        };
        let reply = match &entry {
            InFlight::Csum { answer, .. } | InFlight::Push { answer, .. } => answer.recv(),
        };
        match reply {
            Ok(reply) => self.settle(c, entry, reply),
            Err(_) => false,
        }
    }

    fn settle(&self, c: &mut Copier<'_>, entry: InFlight, reply: Reply) -> bool {
        match (entry, reply) {
            (InFlight::Csum { off, len, .. }, Reply::Checksums(peer))
                if peer.len() == len.div_ceil(CHECKSUM_BLOCK as u64) as usize =>
            {
                // The reservation ends; what does not travel as data goes back to the budget
                // (the data itself was paid for by the reservation).
                c.in_flight = c.in_flight.saturating_sub(len);
                let Some(data) = self.push_chunk(c, off, len, Some(&peer)) else {
                    return false;
                };
                c.pacer.charge(data);
                c.pacer.charge_back(len);
                true
            }
            (
                InFlight::Push {
                    off,
                    len,
                    kind,
                    wire,
                    ..
                },
                Reply::Ack(AckKind::Completed),
            ) => {
                c.in_flight = c.in_flight.saturating_sub(wire);
                c.pacer.acked(wire);
                self.meta.clear_in_sync(off, len);
                self.progress.done.fetch_add(len, Ordering::Relaxed);
                let counter = match kind {
                    BlockKind::Data => &self.progress.sent,
                    BlockKind::Zero => &self.progress.zero,
                    BlockKind::Same => &self.progress.same,
                };
                counter.fetch_add(len, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Reads `len` bytes at `off` and sends them as runs of data, zero markers and (given the
    /// peer's checksums) skips, all under the order lock, so a client write to the same blocks
    /// is either already in the read or sent after it. Returns the wire bytes sent (data plus
    /// message overhead), or `None` if the link or the disk failed.
    fn push_chunk(
        &self,
        c: &mut Copier<'_>,
        off: u64,
        len: u64,
        peer: Option<&[Digest]>,
    ) -> Option<u64> {
        let _order = self.device.order_lock();
        let local = self.device.local();
        let mut buf = Vec::new();
        let runs = if local.known_zero(off, len) {
            classify_zero(self.spec.csums, len, peer)
        } else {
            buf = vec![0u8; len as usize];
            if local.read_at(&mut buf, off).is_err() {
                self.device.detach();
                return None;
            }
            classify_blocks(self.spec.csums, &buf, peer)
        };
        let mut sent = 0;
        let whole = runs.len() == 1;
        for (a, b, kind) in runs {
            let offset = off + a as u64;
            let run = (b - a) as u64;
            let (wire, answer) = match kind {
                BlockKind::Data => (
                    run,
                    c.link.request(|id| {
                        Message::ResyncData(ResyncDataRepr {
                            id: id | PUSH_BIT,
                            offset,
                            // One run of data: the buffer itself, no copy.
                            data: if whole {
                                std::mem::take(&mut buf)
                            } else {
                                buf[a..b].to_vec()
                            },
                        })
                    }),
                ),
                BlockKind::Zero => (
                    20,
                    c.link.request(|id| {
                        Message::ResyncZero(ResyncZeroRepr {
                            id: id | PUSH_BIT,
                            offset,
                            len: run as u32,
                        })
                    }),
                ),
                BlockKind::Same => (
                    20,
                    c.link.request(|id| {
                        Message::ResyncSkip(ResyncSkipRepr {
                            id: id | PUSH_BIT,
                            offset,
                            len: run as u32,
                        })
                    }),
                ),
            };
            let answer = answer?;
            sent += wire;
            c.in_flight += wire;
            c.queue.push_back(InFlight::Push {
                off: offset,
                len: run,
                kind,
                wire,
                answer,
            });
        }
        Some(sent)
    }
}

/// One resync message waiting for the peer.
enum InFlight {
    /// A checksum request (checksum-based resync): the data follows once it is answered.
    Csum {
        off: u64,
        len: u64,
        answer: crate::repl::link::Answer,
    },
    /// Data, a zero marker or a skip, waiting for its acknowledgement.
    Push {
        off: u64,
        len: u64,
        kind: BlockKind,
        wire: u64,
        answer: crate::repl::link::Answer,
    },
}

/// The source's copier state for one pass.
struct Copier<'a> {
    link: &'a PeerLink,
    pacer: Pacer,
    /// Data, zero markers and skips, in the order sent.
    queue: std::collections::VecDeque<InFlight>,
    /// Checksum requests, in the order sent: settled ahead of older pushes, so the data they
    /// lead to keeps the peer busy while those acknowledgements are on their way.
    csums: std::collections::VecDeque<InFlight>,
    /// Wire bytes sent and not yet acknowledged.
    in_flight: u64,
}

impl Copier<'_> {
    /// Messages waiting for the peer.
    fn pending(&self) -> usize {
        self.queue.len() + self.csums.len()
    }
}
