//! The streaming decoder: [`FrameDecoder`] turns received bytes into [`MessageRepr`]s without
//! doing I/O, checking magic, length limit, crc32c and (optionally) sequence numbers;
//! [`DecodeError`] says why a stream ended.

use super::{Error, MessageRepr, Packet, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN};

/// Why a byte stream could not be decoded. Every variant means the stream can no longer be
/// trusted: the caller closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream does not start with the protocol magic: not a twinblade peer, or desynced.
    #[error("bad magic {0:02x?}: not a twinblade replication stream")]
    BadMagic([u8; 4]),
    /// The header announces a payload larger than the decoder accepts.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Announced payload length.
        len: u32,
        /// The decoder's limit.
        max: usize,
    },
    /// The crc32c does not match: the message was corrupted in transit.
    #[error("checksum mismatch: header says {expected:#010x}, contents give {actual:#010x}")]
    Checksum {
        /// The checksum field.
        expected: u32,
        /// The checksum of the received bytes.
        actual: u32,
    },
    /// The sequence number is not the one expected (a lost, replayed or reordered message).
    #[error("sequence number {got}, expected {expected}")]
    Sequence {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
    /// The checksum matched but a field is not valid.
    #[error("malformed message: {0}")]
    Malformed(#[from] Error),
    /// An earlier error already made the stream untrustworthy.
    #[error("stream already failed")]
    Failed,
}

/// Turns a byte stream into [`MessageRepr`]s. Pure: the caller reads from the socket and
/// [`feed`](FrameDecoder::feed)s the bytes, then calls [`next_message`](FrameDecoder::next_message)
/// until it returns `Ok(None)` ("need more bytes").
///
/// A bad magic or an oversized length is reported as soon as the header arrives, so a hostile
/// peer cannot make the decoder buffer more than `max_payload + HEADER_LEN` bytes of one message.
/// After any error the decoder stays failed.
#[derive(Debug)]
pub struct FrameDecoder {
    /// `buf[start..end]` is received and not yet decoded; `buf[end..]` is room to receive into.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: usize,
    next_seq: Option<u64>,
    failed: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to [`MAX_PAYLOAD_LEN`].
    pub fn new() -> FrameDecoder {
        Self::with_max_payload(MAX_PAYLOAD_LEN)
    }

    /// A decoder with another payload limit.
    pub fn with_max_payload(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_payload,
            next_seq: None,
            failed: false,
        }
    }

    /// Requires sequence numbers `first, first + 1, ...`; anything else is
    /// [`DecodeError::Sequence`].
    pub fn check_sequence(mut self, first: u64) -> FrameDecoder {
        self.next_seq = Some(first);
        self
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Room for at least `min` more bytes, to receive into directly (which saves the copy
    /// [`feed`](Self::feed) makes); then [`commit`](Self::commit) says how many arrived.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.buf.len() - self.end < min {
            // Drop what was decoded first, so a stream that never ends on a message boundary
            // does not grow the buffer without bound (what is left is less than one message).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < min {
                self.buf.resize(self.end + min, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were received into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether an error has made the stream unusable.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or the error that ends
    /// the stream.
    pub fn next_message(&mut self) -> Result<Option<MessageRepr>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode_one(&mut self) -> Result<Option<MessageRepr>, DecodeError> {
        let avail = &self.buf[self.start..self.end];
        // Check the magic on as many bytes as we have: garbage is refused at once.
        let m = avail.len().min(4);
        if avail[..m] != MAGIC[..m] {
            let mut got = [0u8; 4];
            got[..m].copy_from_slice(&avail[..m]);
            return Err(DecodeError::BadMagic(got));
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let packet = Packet::new_unchecked(avail);
        let len = packet.payload_len();
        if len as usize > self.max_payload {
            return Err(DecodeError::PayloadTooLarge {
                len,
                max: self.max_payload,
            });
        }
        if avail.len() < packet.total_len() {
            return Ok(None);
        }
        let (expected, actual) = (packet.checksum(), packet.compute_checksum());
        if expected != actual {
            return Err(DecodeError::Checksum { expected, actual });
        }
        if let Some(want) = self.next_seq {
            if packet.seq() != want {
                return Err(DecodeError::Sequence {
                    expected: want,
                    got: packet.seq(),
                });
            }
        }
        packet.check_len()?;
        let repr = MessageRepr::parse_verified(&packet)?;
        self.start += packet.total_len();
        if let Some(seq) = self.next_seq.as_mut() {
            *seq = seq.wrapping_add(1);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(repr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::tests::ping_bytes;
    use crate::wire::repl::{AckKind, Message, PingRepr, WriteAckRepr};

    #[test]
    fn decoder_buffer_stays_bounded_when_reads_never_end_on_a_boundary() {
        let one = ping_bytes();
        let stream: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 10_000)
            .collect();
        let mut d = FrameDecoder::new();
        let mut decoded = 0;
        // Reads of a size that splits messages, as TCP may deliver them.
        let read_size = one.len() * 3 / 2 + 1;
        for chunk in stream.chunks(read_size) {
            d.feed(chunk);
            while let Ok(Some(_)) = d.next_message() {
                decoded += 1;
            }
            // Room for one read beside the undecoded part of one message, never more.
            assert!(
                d.buf.len() <= read_size + one.len(),
                "buffer grew to {}",
                d.buf.len()
            );
        }
        assert_eq!(decoded, 10_000);
    }

    #[test]
    fn decoder_reports_checksum_and_stays_failed() {
        let mut bad = ping_bytes();
        bad[31] ^= 1;
        let mut d = FrameDecoder::new();
        d.feed(&bad);
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::Checksum { .. })
        ));
        d.feed(&ping_bytes());
        assert_eq!(d.next_message(), Err(DecodeError::Failed));
    }

    #[test]
    fn decoder_handles_byte_at_a_time_and_batches() {
        let msgs: Vec<MessageRepr> = (0..5)
            .map(|seq| MessageRepr {
                version: 1,
                seq,
                message: Message::WriteAck(WriteAckRepr {
                    id: seq * 3,
                    kind: AckKind::Completed,
                }),
            })
            .collect();
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.to_bytes()).collect();
        let mut d = FrameDecoder::new().check_sequence(0);
        let mut got = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);

        let mut d = FrameDecoder::new();
        d.feed(&stream);
        for m in &msgs {
            assert_eq!(d.next_message().unwrap().as_ref(), Some(m));
        }
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn decoder_refuses_gaps_and_replays() {
        let m = |seq| {
            MessageRepr {
                version: 1,
                seq,
                message: Message::Ping(PingRepr { cookie: 0 }),
            }
            .to_bytes()
        };
        let mut d = FrameDecoder::new().check_sequence(0);
        d.feed(&m(0));
        d.feed(&m(0));
        assert!(d.next_message().unwrap().is_some());
        assert_eq!(
            d.next_message(),
            Err(DecodeError::Sequence {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn decoder_refuses_garbage_and_huge_lengths_early() {
        let mut d = FrameDecoder::new();
        d.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_message(), Err(DecodeError::BadMagic(_))));

        let mut d = FrameDecoder::new();
        d.feed(b"TB");
        assert_eq!(d.next_message(), Ok(None));
        d.feed(b"X");
        assert!(matches!(d.next_message(), Err(DecodeError::BadMagic(_))));

        // A header announcing 16 MiB is refused before any payload arrives.
        let mut hdr = ping_bytes()[..HEADER_LEN].to_vec();
        hdr[8..12].copy_from_slice(&(16u32 << 20).to_be_bytes());
        let mut d = FrameDecoder::new();
        d.feed(&hdr);
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::PayloadTooLarge { .. })
        ));
    }
}
