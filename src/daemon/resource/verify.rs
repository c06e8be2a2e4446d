//! The online verifier: compares the checksum of every block with the peer's at one point of
//! the replication stream and records the ranges that differ.

use super::*;

impl Engine {
    pub(super) fn start_verify(&mut self) -> Result<String, String> {
        let s = self.machine.status();
        if s.conn != ConnState::Connected || s.repl != ReplState::Established {
            return Err(format!(
                "verify: refused: needs an established connection (connection:{} replication:{})",
                s.conn, s.repl
            ));
        }
        if s.disk != DiskState::UpToDate || s.peer_disk != DiskState::UpToDate {
            return Err(format!(
                "verify: refused: both disks must be UpToDate (disk:{} peer-disk:{})",
                s.disk, s.peer_disk
            ));
        }
        let Some(link) = self.link.clone() else {
            return Err("verify: refused: not connected".into());
        };
        if self.res.verify.running.swap(true, Ordering::AcqRel) {
            return Err("verify: already running".into());
        }
        let size = self.res.device.size();
        let v = &self.res.verify;
        v.total.store(size, Ordering::Relaxed);
        v.done.store(0, Ordering::Relaxed);
        v.blocks.store(0, Ordering::Relaxed);
        v.failed.store(false, Ordering::Relaxed);
        v.abort.store(false, Ordering::Relaxed);
        v.started_ms.store(self.res.now_ms(), Ordering::Relaxed);
        v.ended_ms.store(0, Ordering::Relaxed);
        lock(&v.ranges).clear();
        lock(&v.all_ranges).clear();
        // A Secondary under a Primary checksums its copy where the Primary's answer lands in its
        // replication stream; anyone else checksums under its order lock when asking.
        let local_at_reply = s.role != Role::Primary && s.peer_role == Role::Primary;
        let me = self.res.clone();
        let spawned = self
            .res
            .crew
            .spawn(format!("verify-{}", self.res.spec.name), move |_| {
                let ok = me.verify_all(&link, local_at_reply);
                me.send(Input::VerifyDone(link.conn_id, ok));
            });
        if let Err(e) = spawned {
            v.running.store(false, Ordering::Release);
            return Err(format!("verify: cannot start: {e}"));
        }
        tracing::info!(resource = %self.res.spec.name, "online verify started: {size} bytes");
        Ok(format!("verify started: {size} bytes"))
    }

    pub(super) fn verify_done(&mut self, conn_id: u64, ok: bool) {
        let res = self.res.clone();
        let v = &res.verify;
        v.ended_ms
            .store(self.res.now_ms().max(1), Ordering::Relaxed);
        v.failed.store(!ok, Ordering::Relaxed);
        v.runs.fetch_add(1, Ordering::Relaxed);
        v.running.store(false, Ordering::Release);
        let name = &res.spec.name;
        let blocks = v.blocks.load(Ordering::Relaxed);
        if !ok {
            tracing::warn!(resource = %name, "online verify stopped early (connection lost or resync started); {blocks} block(s) found out of sync so far");
        } else {
            tracing::info!(resource = %name, "online verify finished: {blocks} block(s) out of sync");
        }
        self.publish_progress(true);
        let ranges = std::mem::take(&mut *lock(&v.all_ranges));
        if !ok || ranges.is_empty() || self.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        for (off, len) in &ranges {
            self.res.meta.mark_out_of_sync(*off, *len);
        }
        let s = self.machine.status();
        // From the current primary; from here (the verify source) if neither is primary.
        let source = s.role == Role::Primary || s.peer_role != Role::Primary;
        tracing::info!(resource = %name, "resyncing the blocks verify found, {}", if source { "from here" } else { "from the peer" });
        self.step(Event::VerifyFoundDifferences { source });
    }
}

impl Resource {
    /// The verifier: compares the digest of every 4 KiB block with the peer's, recording the
    /// ranges that differ. False if the connection was lost first.
    fn verify_all(&self, link: &PeerLink, local_at_reply: bool) -> bool {
        let size = self.device.size();
        let mut queue = std::collections::VecDeque::new();
        let mut off = 0u64;
        while off < size || !queue.is_empty() {
            if link.is_dead()
                || self.crew.token().is_cancelled()
                || self.verify.abort.load(Ordering::Relaxed)
            {
                return false;
            }
            if off < size && queue.len() < VERIFY_WINDOW {
                let len = CSUM_CHUNK.min(size - off);
                let request = |id| {
                    Message::ChecksumRequest(ChecksumRequestRepr {
                        id,
                        offset: off,
                        len: len as u32,
                    })
                };
                if local_at_reply {
                    let Some(answer) = link.request(|id| request(id | LOCAL_BIT)) else {
                        return false;
                    };
                    queue.push_back((off, len, answer, None));
                } else {
                    let (ours, answer) = {
                        let _order = self.device.order_lock();
                        let local = self.device.local();
                        let Some(ours) = checksums_of(local.as_ref(), self.spec.csums, off, len)
                        else {
                            self.device.detach();
                            return false;
                        };
                        (ours, link.request(request))
                    };
                    let Some(answer) = answer else { return false };
                    queue.push_back((off, len, answer, Some(ours)));
                }
                off += len;
                continue;
            }
            let (o, l, answer, ours) = queue.pop_front().expect("not empty");
            let (peer, local) = match (answer.recv(), ours) {
                (Ok(Reply::Checksums(peer)), Some(local)) => (peer, local),
                (Ok(Reply::Compared { peer, local }), None) => (peer, local),
                _ => return false,
            };
            if peer.len() != local.len() {
                return false;
            }
            for (i, (p, q)) in peer.iter().zip(&local).enumerate() {
                if p != q {
                    let at = o + i as u64 * CHECKSUM_BLOCK as u64;
                    self.verify_mismatch(at, (CHECKSUM_BLOCK as u64).min(o + l - at));
                }
            }
            self.verify.done.fetch_add(l, Ordering::Relaxed);
        }
        true
    }

    fn verify_mismatch(&self, off: u64, len: u64) {
        tracing::warn!(resource = %self.spec.name, "verify: out-of-sync {len}@{off}");
        self.verify.blocks.fetch_add(1, Ordering::Relaxed);
        for (list, cap) in [
            (&self.verify.ranges, MAX_VERIFY_RANGES),
            (&self.verify.all_ranges, usize::MAX),
        ] {
            let mut list = lock(list);
            if let Some((_, l)) = list.last_mut().filter(|(o, l)| *o + *l == off) {
                *l += len;
            } else if list.len() < cap {
                list.push((off, len));
            }
        }
    }
}
