//! The replies leaving an NBD connection: the output queue that coalesces small replies and
//! keeps large ones as they are, the pool of reusable large buffers, and the vectored write
//! that drains them.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

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
        &mut back.buf[start..start + n]
    }

    /// Removes the last `n` bytes appended by [`OutQueue::tail`].
    pub(super) fn shrink_tail(&mut self, n: usize) {
        let back = self.chunks.back_mut().expect("tail was called");
        back.len -= n;
        self.bytes -= n;
    }

    pub(super) fn push_small(&mut self, bytes: &[u8]) {
        self.tail(bytes.len()).copy_from_slice(bytes);
    }

    pub(super) fn push(&mut self, reply: Vec<u8>) {
        if reply.len() <= 4096 {
            self.push_small(&reply);
        } else {
            self.bytes += reply.len();
            self.chunks.push_back(Chunk {
                len: reply.len(),
                buf: reply,
            });
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
}
