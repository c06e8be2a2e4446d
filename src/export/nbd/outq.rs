//! The replies leaving an NBD connection: the output queue that coalesces small replies and
//! keeps large ones as they are, the pool of reusable large buffers, and the vectored write
//! that drains them. The queue knows where each reply begins and ends, so that replies not yet
//! begun can be turned into errors (`on-no-quorum = io-error`: [`OutQueue::fail_unsent`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::wire::nbd::SimpleReplyRepr;

/// Size of a fresh input or output buffer (the connection's input buffer grows by it too).
pub(super) const BUF_CHUNK: usize = 256 << 10;

/// One buffer of queued reply bytes.
///
/// `buf` is always fully initialised (its length is its usable size) and only the first
/// `len` bytes are queued. Filling a reused buffer therefore costs no `memset`: a 1 MiB read
/// reply is written by the device straight into memory the queue already owns.
pub(super) struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

/// Replies waiting to be written: small ones coalesced into shared chunks, large ones as
/// they came from the blocking pool.
#[derive(Default)]
pub(super) struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    /// Bytes queued and not yet written.
    pub(super) bytes: usize,
    /// Emptied chunk buffers ([`BUF_CHUNK`] initialised bytes) kept for reuse (saves an
    /// mmap/munmap and the page faults per batch).
    spare: Vec<Vec<u8>>,
    /// Large buffers (read replies, write payloads) kept for reuse.
    pub(super) pool: BufPool,
    /// The replies queued and not wholly written, in order, at absolute offsets.
    replies: VecDeque<Reply>,
    /// Bytes ever queued (less those shrunk or cut off), and ever written.
    queued_total: u64,
    written_total: u64,
}

/// Where one queued reply lies in the stream of queued bytes.
struct Reply {
    start: u64,
    end: u64,
    handle: u64,
    /// A success reply (an error reply stays what it is).
    ok: bool,
}

impl OutQueue {
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Appends `n` bytes (contents unspecified) and returns them for filling in.
    pub(super) fn tail(&mut self, n: usize) -> &mut [u8] {
        let room = self.chunks.back().is_some_and(|c| c.buf.len() - c.len >= n);
        if !room {
            let buf = if n > BUF_CHUNK {
                // A large read reply: a reused buffer, handed back to the pool once sent.
                self.pool.take(n)
            } else {
                self.spare.pop().unwrap_or_else(|| vec![0; BUF_CHUNK])
            };
            self.chunks.push_back(Chunk { buf, len: 0 });
        }
        let back = self.chunks.back_mut().expect("just ensured");
        let start = back.len;
        back.len += n;
        self.bytes += n;
        self.queued_total += n as u64;
        &mut back.buf[start..start + n]
    }

    /// Removes the last `n` bytes appended by [`OutQueue::tail`].
    pub(super) fn shrink_tail(&mut self, n: usize) {
        let back = self.chunks.back_mut().expect("tail was called");
        back.len -= n;
        self.bytes -= n;
        self.queued_total -= n as u64;
    }

    /// Records that the last `len` bytes queued are one reply (its header first), all in the
    /// back chunk, as [`OutQueue::tail`] and [`OutQueue::push`] place them.
    pub(super) fn mark(&mut self, len: usize) {
        let end = self.queued_total;
        let start = end - len as u64;
        let back = self.chunks.back().expect("a reply was just queued");
        let at = back.len - len;
        let header = SimpleReplyRepr::parse(&back.buf[at..at + SimpleReplyRepr::LEN]);
        let (ok, handle) = match header {
            Ok(h) => (h.error == 0, h.handle),
            Err(_) => return,
        };
        self.replies.push_back(Reply {
            start,
            end,
            handle,
            ok,
        });
    }

    /// The reply header at absolute offset `at` (queued, not yet written; only for the rare
    /// [`OutQueue::fail_unsent`]: it walks the chunks).
    fn header_at(&self, at: u64) -> Option<SimpleReplyRepr> {
        let mut skip = (at - self.written_total) as usize;
        let mut header = [0u8; SimpleReplyRepr::LEN];
        let mut got = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            let from = if i == 0 { self.front_written } else { 0 };
            let mut bytes = &c.buf[from..c.len];
            if skip >= bytes.len() {
                skip -= bytes.len();
                continue;
            }
            bytes = &bytes[skip..];
            skip = 0;
            let n = bytes.len().min(header.len() - got);
            header[got..got + n].copy_from_slice(&bytes[..n]);
            got += n;
            if got == header.len() {
                return SimpleReplyRepr::parse(&header).ok();
            }
        }
        None
    }

    /// Turns every success reply not yet begun into an `error` reply (a reply partly written
    /// is finished as it is; error replies stay as they are); returns how many.
    pub(super) fn fail_unsent(&mut self, error: u32) -> usize {
        let written = self.written_total;
        let Some(first) = self.replies.iter().position(|r| r.start >= written && r.ok) else {
            return 0;
        };
        let replaced: Vec<SimpleReplyRepr> = self
            .replies
            .range(first..)
            .map(|r| {
                match r.ok {
                    true => None,
                    false => self.header_at(r.start),
                }
                .unwrap_or(SimpleReplyRepr {
                    error,
                    handle: r.handle,
                })
            })
            .collect();
        let n = self.replies.range(first..).filter(|r| r.ok).count();
        let cut = self.replies[first].start;
        self.replies.truncate(first);
        self.cut_to(cut);
        for header in replaced {
            self.push_small(&header.to_bytes());
        }
        n
    }

    /// Drops the queued bytes from absolute offset `cut` (not yet written) on.
    fn cut_to(&mut self, cut: u64) {
        let mut drop = (self.queued_total - cut) as usize;
        self.bytes -= drop;
        self.queued_total = cut;
        while drop > 0 {
            let only = self.chunks.len() == 1;
            let back = self.chunks.back_mut().expect("bytes were queued");
            let floor = if only { self.front_written } else { 0 };
            let n = drop.min(back.len - floor);
            back.len -= n;
            drop -= n;
            if back.len == floor {
                let chunk = self.chunks.pop_back().expect("checked");
                if only {
                    self.front_written = 0;
                }
                self.recycle(chunk.buf);
            }
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if buf.len() == BUF_CHUNK {
            if self.spare.len() < 4 {
                self.spare.push(buf);
            }
        } else {
            self.pool.give(buf);
        }
    }

    pub(super) fn push_small(&mut self, bytes: &[u8]) {
        self.tail(bytes.len()).copy_from_slice(bytes);
        self.mark(bytes.len());
    }

    pub(super) fn push(&mut self, reply: Vec<u8>) {
        if reply.len() <= 4096 {
            self.push_small(&reply);
        } else {
            self.bytes += reply.len();
            self.queued_total += reply.len() as u64;
            let len = reply.len();
            self.chunks.push_back(Chunk { len, buf: reply });
            self.mark(len);
        }
    }

    /// The queued bytes, front first, as at most `max` slices for one `writev`.
    pub(super) fn slices(&self, max: usize) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::with_capacity(self.chunks.len().min(max));
        for (i, c) in self.chunks.iter().take(max).enumerate() {
            let from = if i == 0 { self.front_written } else { 0 };
            if c.len > from {
                slices.push(IoSlice::new(&c.buf[from..c.len]));
            }
        }
        slices
    }

    /// Marks `n` bytes written.
    pub(super) fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        self.written_total += n as u64;
        while self
            .replies
            .front()
            .is_some_and(|r| r.end <= self.written_total)
        {
            self.replies.pop_front();
        }
        while n > 0 {
            let front_len = self.chunks.front().expect("bytes were queued").len;
            let left = front_len - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            let chunk = self.chunks.pop_front().expect("checked");
            self.front_written = 0;
            if chunk.buf.len() == BUF_CHUNK {
                if self.spare.len() < 4 {
                    self.spare.push(chunk.buf);
                }
            } else {
                self.pool.give(chunk.buf);
            }
        }
        if self.bytes == 0 {
            // Chunks emptied by shrink_tail (an error reply) hold no bytes: recycle them too.
            while let Some(chunk) = self.chunks.pop_front() {
                if chunk.buf.len() == BUF_CHUNK && self.spare.len() < 4 {
                    self.spare.push(chunk.buf);
                } else {
                    self.pool.give(chunk.buf);
                }
            }
            self.front_written = 0;
        }
    }
}

/// Large buffers kept for reuse, so that big reads and writes do not fault in fresh pages
/// (a new 1 MiB allocation is a fresh `mmap`: 256 page faults and the kernel zeroing them).
#[derive(Default)]
pub(super) struct BufPool {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// Buffers smaller than this are not worth keeping.
    const MIN: usize = 64 << 10;
    /// Most bytes kept per connection.
    const MAX_BYTES: usize = 32 << 20;

    /// A buffer of exactly `len` bytes (contents unspecified: leftovers of earlier use).
    pub(super) fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buf = match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let b = self.bufs.swap_remove(i);
                self.bytes -= b.capacity();
                b
            }
            None => Vec::with_capacity(len),
        };
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    pub(super) fn give(&mut self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap >= Self::MIN && self.bytes + cap <= Self::MAX_BYTES {
            self.bytes += cap;
            self.bufs.push(buf);
        }
    }
}

/// Writes some of the queued bytes with one vectored write (the caller loops, asking the
/// serve gate before each).
pub(super) async fn write_some<W: AsyncWrite + Unpin>(
    out: &mut OutQueue,
    wr: &mut W,
) -> io::Result<()> {
    let n = wr.write_vectored(&out.slices(64)).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    out.consume(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_queue_coalesces_and_consumes() {
        let mut q = OutQueue::default();
        q.push_small(&[1; 16]);
        q.tail(8).copy_from_slice(&[2; 8]);
        q.shrink_tail(4);
        q.push(vec![3; 10_000]);
        q.push_small(&[4; 16]);
        assert_eq!(q.bytes, 16 + 4 + 10_000 + 16);
        assert_eq!(q.chunks.len(), 3);
        q.consume(10);
        assert_eq!(q.front_written, 10);
        q.consume(10);
        assert_eq!(q.chunks.len(), 2);
        q.consume(10_000);
        assert_eq!(q.chunks.len(), 1);
        q.consume(16);
        assert!(q.is_empty());
        assert!(q.chunks.is_empty());
        assert_eq!(q.spare.len(), 2);
    }

    fn reply(error: u32, handle: u64) -> [u8; SimpleReplyRepr::LEN] {
        SimpleReplyRepr { error, handle }.to_bytes()
    }

    /// Every reply left in the queue, as (error, handle, payload bytes).
    fn replies_in(q: &OutQueue) -> Vec<(u32, u64, usize)> {
        let bytes: Vec<u8> = q
            .slices(usize::MAX)
            .iter()
            .flat_map(|s| s.to_vec())
            .collect();
        q.replies
            .iter()
            .map(|r| {
                let payload = (r.end - r.start) as usize - SimpleReplyRepr::LEN;
                if r.start < q.written_total {
                    return (u32::from(!r.ok), r.handle, payload); // begun: not parsed again
                }
                let at = (r.start - q.written_total) as usize;
                let h = SimpleReplyRepr::parse(&bytes[at..at + SimpleReplyRepr::LEN]).unwrap();
                (h.error, h.handle, payload)
            })
            .collect()
    }

    #[test]
    fn unsent_success_replies_become_errors_and_a_reply_begun_is_finished() {
        let mut q = OutQueue::default();
        q.push_small(&reply(0, 1)); // a write's reply
        let t = q.tail(SimpleReplyRepr::LEN + 100); // an inline read's
        t[..SimpleReplyRepr::LEN].copy_from_slice(&reply(0, 2));
        q.mark(SimpleReplyRepr::LEN + 100);
        q.push_small(&reply(22, 3)); // EINVAL stays EINVAL
        let mut big = vec![7u8; SimpleReplyRepr::LEN + 10_000];
        big[..SimpleReplyRepr::LEN].copy_from_slice(&reply(0, 4));
        q.push(big); // a pooled read's
        q.push_small(&reply(0, 5));
        // Reply 1 wholly written, reply 2 begun.
        q.consume(SimpleReplyRepr::LEN + 4);
        assert_eq!(q.fail_unsent(5), 2);
        // 2 is finished as it was; 3 keeps its error; 4 and 5 fail with EIO, without payload.
        let left = q.bytes;
        assert_eq!(
            left,
            SimpleReplyRepr::LEN + 100 - 4 + 3 * SimpleReplyRepr::LEN
        );
        let got = replies_in(&q);
        assert_eq!(got, vec![(0, 2, 100), (22, 3, 0), (5, 4, 0), (5, 5, 0)]);
        // Nothing more to fail; then everything drains.
        assert_eq!(q.fail_unsent(5), 0);
        q.consume(left);
        assert!(q.is_empty() && q.replies.is_empty());
        // An empty queue, and one whose replies were all written, fail nothing.
        assert_eq!(q.fail_unsent(5), 0);
    }
}
