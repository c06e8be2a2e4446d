//! The reader of an established connection and its applier: applies the peer's writes,
//! barriers and resync blocks to the local disk in arrival order and answers them; completes
//! our own requests; forwards everything else to the engine.
//!
//! Completion callbacks run on the reader (deferred AoE replies, waiting writes) and never
//! block: a slow disk stalls the applier, never the reader, so keepalives keep flowing.

use super::*;

impl Resource {
    pub(super) fn reader(
        self: Arc<Self>,
        link: Arc<PeerLink>,
        mut stream: std::net::TcpStream,
        mut decoder: FrameDecoder,
    ) {
        // Data is applied on a thread of its own, in arrival order, so that a slow disk does
        // not silence the keepalive: the peer can tell "alive but not completing writes"
        // (ko-count) from "dead" (dead-time).
        let (work_tx, work_rx) = channel::<Message>();
        {
            let me = self.clone();
            let link = link.clone();
            let started = self
                .crew
                .spawn(format!("apply-{}", self.spec.name), move |_| {
                    // Acknowledgements of a burst of writes leave together, after the last of
                    // them is written: one send (and one wake-up of the peer) per burst.
                    let mut acks = Vec::new();
                    let mut next = work_rx.recv().ok();
                    while let Some(message) = next {
                        let mut answered = Ok(());
                        if !matches!(message, Message::WriteData(_)) || acks.len() >= 64 {
                            answered = send_acks(&link, &mut acks);
                        }
                        answered = answered.and_then(|()| me.apply(&link, message, &mut acks));
                        next = work_rx.try_recv().ok();
                        if next.is_none() {
                            answered = answered.and_then(|()| send_acks(&link, &mut acks));
                            next = work_rx.recv().ok();
                        }
                        if let Err(e) = answered {
                            tracing::warn!(resource = %me.spec.name, "peer link failed while answering: {e}");
                            link.fail_all();
                            return;
                        }
                    }
                    let _ = send_acks(&link, &mut acks);
                });
            if let Err(e) = started {
                // The reader's first hand-off fails and ends the connection.
                tracing::error!(resource = %self.spec.name, "cannot start the applier: {e}");
            }
        }
        let why = loop {
            let message = match peer::read_message(&mut stream, &mut decoder) {
                Ok(m) => m,
                Err(e) => break e.to_string(),
            };
            link.heard();
            let answered = match &message {
                // Not behind a busy sender: this thread must keep reading (see tick).
                Message::Ping(p) => link
                    .try_send(Message::PingAck(*p))
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Message::PingAck(p) => {
                    self.renew_lease_by_ping(p.cookie);
                    Ok(())
                }
                Message::WriteAck(a) => {
                    if a.kind == AckKind::Failed {
                        self.device.peer_failed_io();
                    }
                    link.complete(a.id & ID_MASK, Reply::Ack(a.kind));
                    Ok(())
                }
                Message::BarrierAck(a) => {
                    if !a.stable {
                        self.device.peer_failed_io();
                    }
                    link.complete(a.barrier, barrier_reply(a));
                    Ok(())
                }
                Message::ResyncData(d) if d.id & PUSH_BIT == 0 => {
                    link.complete(d.id, Reply::Data(d.data.clone()));
                    Ok(())
                }
                Message::Disconnect(_) => {
                    // Straight to the engine: the peer's verdict must not wait behind data
                    // queued for a slow disk.
                    self.send(Input::PeerMessage(link.conn_id, message));
                    Ok(())
                }
                Message::WriteData(w) if w.id != 0 && self.spec.protocol == ReplProtocol::B => {
                    // Protocol B: received is enough; the write itself is queued.
                    send_ack(link.as_ref(), w.id, AckKind::Received)
                        .and_then(|()| work_tx.send(message).map_err(|e| e.to_string()))
                }
                _ => work_tx.send(message).map_err(|e| e.to_string()),
            };
            if let Err(e) = answered {
                break e;
            }
        };
        drop(work_tx);
        link.fail_all();
        self.send(Input::PeerDown(link.conn_id, why));
    }

    /// Applies one message from the peer, in arrival order (the applier thread).
    ///
    /// A `WriteData` answered under protocol C leaves its acknowledgement in `acks`, for the
    /// caller to send (with the others of its burst) before anything else.
    fn apply(
        &self,
        link: &PeerLink,
        message: Message,
        acks: &mut Vec<Message>,
    ) -> Result<(), String> {
        let local = self.device.local();
        let power = self.spec.durability == Durability::Power;
        match message {
            Message::WriteData(w) => {
                let fua = power || w.flags & crate::repl::device::WRITE_FUA != 0;
                let len = w.data.len() as u64;
                // The activity log covers what this node acknowledges, as on the primary: if
                // it loses power with the write only in its cache, the extent is resynced.
                let logged = self.meta.write_begin(w.offset, len).is_ok();
                let ok = logged
                    && !self.device.is_detached()
                    && local.write_at(&w.data, w.offset, fua).is_ok();
                if logged {
                    self.meta.write_end(w.offset, len);
                }
                if !ok {
                    self.device.detach();
                } else if self.peer_diskless.load(Ordering::Acquire) {
                    self.meta.mark_out_of_sync(w.offset, w.data.len() as u64);
                }
                if w.id != 0 && self.spec.protocol == ReplProtocol::C {
                    let kind = if ok {
                        AckKind::Completed
                    } else {
                        AckKind::Failed
                    };
                    acks.push(Message::WriteAck(WriteAckRepr { id: w.id, kind }));
                }
            }
            Message::Barrier(b) => {
                // A failed flush is a failing disk: detach (the peer learns we are Diskless)
                // and say so, so the Primary does not count on what sat in our cache.
                let stable = !self.device.is_detached()
                    && match local.flush() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!(resource = %self.spec.name, error = %e, "flush failed; detaching the disk");
                            self.device.detach();
                            false
                        }
                    };
                link.send(Message::BarrierAck(BarrierAckRepr {
                    barrier: b.barrier,
                    stable,
                }))
                .map_err(|e| e.to_string())?;
            }
            Message::WriteAck(a) => {
                link.complete(a.id & ID_MASK, Reply::Ack(a.kind));
            }
            Message::BarrierAck(a) => {
                link.complete(a.barrier, barrier_reply(&a));
            }
            Message::ResyncData(d) if d.id & PUSH_BIT != 0 => {
                let len = d.data.len() as u64;
                let ok = self.resync_write(&d.data, d.offset, power);
                self.resync_applied(link, d.id, d.offset, len, ok, &self.progress.sent)?;
            }
            Message::ResyncZero(z) if z.id & PUSH_BIT != 0 => {
                let len = u64::from(z.len);
                let ok = crate::block::check_range(self.device.size(), z.offset, len).is_ok()
                    && !self.device.is_detached()
                    && (local.known_zero(z.offset, len)
                        || self
                            .device
                            .apply_resync_zeroes(z.offset, len, power)
                            .is_ok());
                if !ok && !self.device.is_detached() {
                    self.device.detach();
                }
                let len = u64::from(z.len);
                self.resync_applied(link, z.id, z.offset, len, ok, &self.progress.zero)?;
            }
            Message::ResyncSkip(k) if k.id & PUSH_BIT != 0 => {
                // Equal already: nothing to write, only the bits to clear.
                let ok = crate::block::check_range(self.device.size(), k.offset, u64::from(k.len))
                    .is_ok();
                let len = u64::from(k.len);
                self.resync_applied(link, k.id, k.offset, len, ok, &self.progress.same)?;
            }
            Message::ChecksumRequest(r) => {
                // Under the order lock: if we are the Primary, the answer lands in our stream
                // after every write already sent, before every later one.
                let _order = self.device.order_lock();
                let alg = self.spec.csums;
                let digests =
                    if crate::block::check_range(self.device.size(), r.offset, u64::from(r.len))
                        .is_ok()
                        && !self.device.is_detached()
                    {
                        checksums_of(local.as_ref(), alg, r.offset, u64::from(r.len))
                    } else {
                        None
                    };
                if let Some(digests) = digests {
                    link.send(Message::Checksums(ChecksumsRepr {
                        id: r.id,
                        offset: r.offset,
                        len: r.len,
                        alg,
                        digests,
                    }))
                    .map_err(|e| e.to_string())?;
                } else {
                    send_ack(link, r.id, AckKind::Failed)?;
                }
            }
            Message::Checksums(c) if c.alg != self.spec.csums => {
                return Err(format!(
                    "the peer sent {} checksums, but {} was agreed",
                    c.alg, self.spec.csums
                ));
            }
            Message::Checksums(c) if c.id & LOCAL_BIT != 0 => {
                // Our copy at this point of the stream: every write the peer sent before its
                // answer is applied, none after.
                let ours =
                    crate::block::check_range(self.device.size(), c.offset, u64::from(c.len))
                        .ok()
                        .and_then(|()| {
                            checksums_of(local.as_ref(), c.alg, c.offset, u64::from(c.len))
                        });
                let reply = match ours {
                    Some(local) => Reply::Compared {
                        peer: c.digests,
                        local,
                    },
                    None => Reply::Ack(AckKind::Failed),
                };
                link.complete(c.id & ID_MASK, reply);
            }
            Message::Checksums(c) => {
                link.complete(c.id & ID_MASK, Reply::Checksums(c.digests));
            }
            Message::ResyncData(d) => {
                link.complete(d.id, Reply::Data(d.data));
            }
            Message::ResyncRequest(r) => {
                // A detached peer reads through us.
                let mut buf = vec![0u8; r.len as usize];
                if crate::block::check_range(self.device.size(), r.offset, r.len as u64).is_ok()
                    && !self.device.is_detached()
                    && local.read_at(&mut buf, r.offset).is_ok()
                {
                    link.send(Message::ResyncData(ResyncDataRepr {
                        id: r.id,
                        offset: r.offset,
                        data: buf,
                    }))
                    .map_err(|e| e.to_string())?;
                } else {
                    send_ack(link, r.id, AckKind::Failed)?;
                }
            }
            Message::Ping(p) => {
                link.send(Message::PingAck(p)).map_err(|e| e.to_string())?;
            }
            Message::PingAck(p) => self.renew_lease_by_ping(p.cookie),
            Message::BitmapChunk(c) => {
                // Here, not on the engine thread: the peer's resync data that follows must
                // clear these bits, not be overtaken by them (stale out-of-sync bits).
                self.apply_bitmap_chunk(&c);
                if c.last {
                    self.send(Input::PeerMessage(link.conn_id, Message::BitmapChunk(c)));
                }
            }
            other => self.send(Input::PeerMessage(link.conn_id, other)),
        }
        Ok(())
    }

    /// A resync write on the target (never over what a client wrote meanwhile, see
    /// [`ReplicatedDevice::apply_resync`]); a failure detaches the disk.
    /// A ping answer proves the peer heard us when we sent it: its cookie is our send time
    /// (process-epoch nanoseconds on the monotonic clock), so the lease runs from there.
    fn renew_lease_by_ping(&self, sent_nanos: u64) {
        let now = crate::ha::clock::now_nanos();
        // A cookie from the future, or older than a lease, renews nothing.
        let lease = self.spec.lease_time.as_nanos() as u64;
        if sent_nanos == 0 || sent_nanos > now || now - sent_nanos >= lease {
            return;
        }
        let sent = crate::ha::clock::instant_at(sent_nanos);
        self.gate.lease().renew_until(sent + self.spec.lease_time);
    }

    fn resync_write(&self, data: &[u8], offset: u64, power: bool) -> bool {
        let ok = crate::block::check_range(self.device.size(), offset, data.len() as u64).is_ok()
            && !self.device.is_detached()
            && self.device.apply_resync(data, offset, power).is_ok();
        if !ok && !self.device.is_detached() {
            self.device.detach();
        }
        ok
    }

    /// The target applied (or failed) one resync message: bits, counters, acknowledgement.
    fn resync_applied(
        &self,
        link: &PeerLink,
        id: u64,
        offset: u64,
        len: u64,
        ok: bool,
        counter: &AtomicU64,
    ) -> Result<(), String> {
        if ok {
            self.meta.clear_in_sync(offset, len);
            counter.fetch_add(len, Ordering::Relaxed);
            self.progress.done.fetch_add(len, Ordering::Relaxed);
        }
        send_ack(
            link,
            id,
            if ok {
                AckKind::Completed
            } else {
                AckKind::Failed
            },
        )
    }
}

/// The digest under `alg` of each 4 KiB block of `len` bytes at `offset`; a range the device
/// knows reads as zeros (a hole, an unwritten extent) is neither read nor hashed. `None` on a
/// read error.
pub(super) fn checksums_of(
    dev: &dyn BlockDevice,
    alg: ChecksumAlg,
    offset: u64,
    len: u64,
) -> Option<Vec<Digest>> {
    if dev.known_zero(offset, len) {
        return Some(csum::zero_digests(alg, len));
    }
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, offset).ok()?;
    Some(csum::block_digests(alg, &buf))
}

/// Sends the acknowledgements collected so far, in one write.
fn send_acks(link: &PeerLink, acks: &mut Vec<Message>) -> Result<(), String> {
    if acks.is_empty() {
        return Ok(());
    }
    link.send_all(acks.drain(..)).map_err(|e| e.to_string())
}

fn send_ack(link: &PeerLink, id: u64, kind: AckKind) -> Result<(), String> {
    link.send(Message::WriteAck(WriteAckRepr { id, kind }))
        .map_err(|e| e.to_string())
}
