//! Mirrored writes: [`WriteDataRepr`] (with the `WRITE_*` flags and the zero-copy
//! [`WriteDataRepr::emit_head`]), its [`WriteAckRepr`] and [`AckKind`], and the write-epoch
//! [`BarrierRepr`]/[`BarrierAckRepr`].

use super::header::field;
use super::{
    check_block_range, ensure, exact, need, rd32, rd64, wr32, wr64, Error, MessageType, Packet,
    HEADER_LEN, MAX_DATA_LEN, WRITE_DATA_HEAD_LEN,
};
use crate::cluster::state::wire_enum;

wire_enum! {
    /// The kind of a [`WriteAckRepr`].
    AckKind {
        /// The peer received the write (protocol B).
        Received = 1, "received";
        /// The peer completed the write with the agreed durability (protocol C).
        Completed = 2, "completed";
        /// The peer's disk failed the write; the block is out of sync.
        Failed = 3, "failed";
    } "ack kind"
}

/// WriteData flag: the write must be on stable storage before it is acknowledged.
pub const WRITE_FUA: u32 = 1;
/// WriteData flag: flush the peer's cache before this write (and before acking it).
pub const WRITE_FLUSH: u32 = 2;
const WRITE_FLAGS_ALL: u32 = WRITE_FUA | WRITE_FLUSH;

/// WriteData: one mirrored write from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteDataRepr {
    /// Request id, echoed in the [`WriteAckRepr`].
    pub id: u64,
    /// Byte offset on the device (a multiple of 512).
    pub offset: u64,
    /// `WRITE_FUA` / `WRITE_FLUSH`.
    pub flags: u32,
    /// The data (a multiple of 512 bytes, at most [`MAX_DATA_LEN`]; empty for a pure flush).
    pub data: Vec<u8>,
}

impl WriteDataRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(24, p.len())?;
        let len = rd32(p, 20) as usize;
        ensure(len <= MAX_DATA_LEN, "length")?;
        exact(p, 24 + len)?;
        let flags = rd32(p, 16);
        ensure(flags & !WRITE_FLAGS_ALL == 0, "write flags")?;
        let offset = rd64(p, 8);
        check_block_range(offset, len as u64)?;
        Ok(WriteDataRepr {
            id: rd64(p, 0),
            offset,
            flags,
            data: p[24..].to_vec(),
        })
    }
    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        24 + self.data.len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        wr64(p, 8, self.offset);
        wr32(p, 16, self.flags);
        wr32(p, 20, self.data.len() as u32);
        p[24..24 + self.data.len()].copy_from_slice(&self.data);
    }
    /// A whole WriteData message as two pieces, head and `data`, so the data can be sent from
    /// where it lies: the head is the message header and the fixed fields, with the checksum
    /// over both pieces. `head ++ data` is what [`MessageRepr::emit`](super::MessageRepr::emit) makes of the owned form.
    pub fn emit_head(
        version: u16,
        seq: u64,
        id: u64,
        offset: u64,
        flags: u32,
        data: &[u8],
    ) -> [u8; WRITE_DATA_HEAD_LEN] {
        let mut head = [0u8; WRITE_DATA_HEAD_LEN];
        Packet::new_unchecked(&mut head[..]).set_header(
            version,
            MessageType::WriteData,
            (24 + data.len()) as u32,
            seq,
        );
        let p = &mut head[HEADER_LEN..];
        wr64(p, 0, id);
        wr64(p, 8, offset);
        wr32(p, 16, flags);
        wr32(p, 20, data.len() as u32);
        let crc = crc32c::crc32c(&head[..field::CRC.start]);
        let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
        let crc = crc32c::crc32c_append(crc, &head[field::PAYLOAD..]);
        let crc = crc32c::crc32c_append(crc, data);
        wr32(&mut head, field::CRC.start, crc);
        head
    }
    /// Whether the FUA flag is set.
    pub fn fua(&self) -> bool {
        self.flags & WRITE_FUA != 0
    }
    /// Whether the FLUSH flag is set.
    pub fn flush(&self) -> bool {
        self.flags & WRITE_FLUSH != 0
    }
}

/// WriteAck: the peer's answer to one [`WriteDataRepr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAckRepr {
    /// The write's request id.
    pub id: u64,
    /// Received (protocol B), completed (protocol C) or failed.
    pub kind: AckKind,
}

impl WriteAckRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 9)?;
        Ok(WriteAckRepr {
            id: rd64(p, 0),
            kind: AckKind::from_code(p[8])?,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        9
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.id);
        p[8] = self.kind.code();
    }
}

/// Barrier: closes a write epoch; the peer answers once every write of the epoch is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierRepr {
    /// Barrier (epoch) number.
    pub barrier: u64,
}

impl BarrierRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 8)?;
        Ok(BarrierRepr {
            barrier: rd64(p, 0),
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        8
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.barrier);
    }
}

/// BarrierAck: the peer applied every write sent before the barrier and flushed its disk —
/// `stable` — or its flush failed (its disk is failing: it detaches), so what it acknowledged
/// from its cache may be lost there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierAckRepr {
    /// Barrier (epoch) number.
    pub barrier: u64,
    /// The flush succeeded.
    pub stable: bool,
}

/// BarrierAck status byte: the flush succeeded.
const BARRIER_STABLE: u8 = 0;
/// BarrierAck status byte: the flush failed.
const BARRIER_FAILED: u8 = 1;

impl BarrierAckRepr {
    /// Parses the payload: barrier, a status byte, three reserved zero bytes.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 12)?;
        let stable = match p[8] {
            BARRIER_STABLE => true,
            BARRIER_FAILED => false,
            _ => {
                return Err(Error::Malformed {
                    field: "barrier status",
                })
            }
        };
        if p[9..12] != [0; 3] {
            return Err(Error::Malformed {
                field: "barrier reserved",
            });
        }
        Ok(BarrierAckRepr {
            barrier: rd64(p, 0),
            stable,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        12
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.barrier);
        p[8..12].fill(0);
        p[8] = if self.stable {
            BARRIER_STABLE
        } else {
            BARRIER_FAILED
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::{Message, MessageRepr, ResyncRequestRepr};

    #[test]
    fn a_write_data_head_and_its_data_are_the_whole_message() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let owned = MessageRepr {
            version: 1,
            seq: 77,
            message: Message::WriteData(WriteDataRepr {
                id: 5,
                offset: 8192,
                flags: WRITE_FUA,
                data: data.clone(),
            }),
        }
        .to_bytes();
        let head = WriteDataRepr::emit_head(1, 77, 5, 8192, WRITE_FUA, &data);
        assert_eq!([&head[..], &data[..]].concat(), owned);
    }

    #[test]
    fn misaligned_and_oversized_block_ranges_are_malformed() {
        let mut w = WriteDataRepr {
            id: 1,
            offset: 100,
            flags: 0,
            data: vec![0; 512],
        };
        let mut buf = vec![0; w.buffer_len()];
        w.emit(&mut buf);
        assert!(WriteDataRepr::parse(&buf).is_err());
        w.offset = 512;
        w.data = vec![0; 100];
        let mut buf = vec![0; w.buffer_len()];
        w.emit(&mut buf);
        assert!(WriteDataRepr::parse(&buf).is_err());
        let r = ResyncRequestRepr {
            id: 0,
            offset: 0,
            len: (MAX_DATA_LEN + 512) as u32,
            checksum: None,
        };
        let mut buf = vec![0; r.buffer_len()];
        r.emit(&mut buf);
        assert!(ResyncRequestRepr::parse(&buf).is_err());
    }
}
