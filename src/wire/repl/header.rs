//! The common 24-byte header: [`MessageType`] (header byte 6) and [`Packet`], the checked view
//! of one framed message (header fields, payload, crc32c).

use super::*;

/// Message type codes (header byte 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 1: [`HelloRepr`].
    Hello,
    /// 2: [`AuthChallengeRepr`].
    AuthChallenge,
    /// 3: [`AuthResponseRepr`].
    AuthResponse,
    /// 4: authentication accepted.
    AuthOk,
    /// 5: authentication refused.
    AuthFail,
    /// 6: [`ParametersRepr`].
    Parameters,
    /// 7: [`UuidsRepr`].
    Uuids,
    /// 8: the sync UUID a resync source chose.
    SyncUuid,
    /// 9: [`WriteDataRepr`].
    WriteData,
    /// 10: [`WriteAckRepr`].
    WriteAck,
    /// 11: [`BarrierRepr`].
    Barrier,
    /// 12: [`BarrierAckRepr`].
    BarrierAck,
    /// 13: [`BitmapChunkRepr`].
    BitmapChunk,
    /// 14: [`ResyncRequestRepr`].
    ResyncRequest,
    /// 15: [`ResyncDataRepr`].
    ResyncData,
    /// 16: [`ResyncSkipRepr`].
    ResyncSkip,
    /// 17: [`StateChangeRepr`].
    StateChange,
    /// 18: keepalive.
    Ping,
    /// 19: keepalive answer.
    PingAck,
    /// 20: [`DisconnectRepr`].
    Disconnect,
    /// 21: [`SyncStartRepr`].
    SyncStart,
    /// 22: the resync source copied every out-of-sync block.
    SyncDone,
    /// 23: [`ChecksumRequestRepr`].
    ChecksumRequest,
    /// 24: [`ChecksumsRepr`].
    Checksums,
    /// 25: [`ResyncZeroRepr`].
    ResyncZero,
    /// 30: the operator paused (1) or resumed (0) the resync on the sender's side.
    SyncPause,
    /// Any other code: refused by [`MessageRepr::parse`].
    Unknown(u8),
}

impl From<u8> for MessageType {
    fn from(v: u8) -> Self {
        use MessageType::*;
        match v {
            1 => Hello,
            2 => AuthChallenge,
            3 => AuthResponse,
            4 => AuthOk,
            5 => AuthFail,
            6 => Parameters,
            7 => Uuids,
            8 => SyncUuid,
            9 => WriteData,
            10 => WriteAck,
            11 => Barrier,
            12 => BarrierAck,
            13 => BitmapChunk,
            14 => ResyncRequest,
            15 => ResyncData,
            16 => ResyncSkip,
            17 => StateChange,
            18 => Ping,
            19 => PingAck,
            20 => Disconnect,
            21 => SyncStart,
            22 => SyncDone,
            23 => ChecksumRequest,
            24 => Checksums,
            25 => ResyncZero,
            30 => SyncPause,
            other => Unknown(other),
        }
    }
}

impl From<MessageType> for u8 {
    fn from(t: MessageType) -> u8 {
        use MessageType::*;
        match t {
            Hello => 1,
            AuthChallenge => 2,
            AuthResponse => 3,
            AuthOk => 4,
            AuthFail => 5,
            Parameters => 6,
            Uuids => 7,
            SyncUuid => 8,
            WriteData => 9,
            WriteAck => 10,
            Barrier => 11,
            BarrierAck => 12,
            BitmapChunk => 13,
            ResyncRequest => 14,
            ResyncData => 15,
            ResyncSkip => 16,
            StateChange => 17,
            Ping => 18,
            PingAck => 19,
            Disconnect => 20,
            SyncStart => 21,
            SyncDone => 22,
            ChecksumRequest => 23,
            Checksums => 24,
            ResyncZero => 25,
            SyncPause => 30,
            Unknown(v) => v,
        }
    }
}

/// Byte ranges of the common header.
pub(super) mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const TYPE: usize = 6;
    pub const FLAGS: usize = 7;
    pub const LENGTH: usize = 8;
    pub const SEQ: usize = 12;
    pub const CRC: Range<usize> = 20..24;
    pub const PAYLOAD: usize = 24;
}

/// A view of one framed message: header and payload.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that it holds the header and the whole payload the header
    /// announces. Extra bytes after the payload are allowed (the next message of a stream).
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the header and the announced payload fit in the buffer.
    pub fn check_len(&self) -> Result<(), Error> {
        let have = self.buffer.as_ref().len();
        need(HEADER_LEN, have)?;
        need(self.total_len(), have)
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.buffer.as_ref()[field::MAGIC]
            .try_into()
            .expect("4 bytes")
    }
    /// Protocol version the sender speaks on this connection.
    pub fn version(&self) -> u16 {
        rd16(self.buffer.as_ref(), field::VERSION)
    }
    /// Message type.
    pub fn msg_type(&self) -> MessageType {
        MessageType::from(self.buffer.as_ref()[field::TYPE])
    }
    /// Header flags (none defined: must be 0).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    /// Payload length in bytes.
    pub fn payload_len(&self) -> u32 {
        rd32(self.buffer.as_ref(), field::LENGTH)
    }
    /// Per-connection sequence number.
    pub fn seq(&self) -> u64 {
        rd64(self.buffer.as_ref(), field::SEQ)
    }
    /// The checksum field.
    pub fn checksum(&self) -> u32 {
        rd32(self.buffer.as_ref(), field::CRC.start)
    }
    /// Header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len() as usize
    }
    /// The payload (panics unless [`Packet::check_len`] passed).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..self.total_len()]
    }
    /// The crc32c of header (checksum field as zero) and payload.
    pub fn compute_checksum(&self) -> u32 {
        let b = &self.buffer.as_ref()[..self.total_len()];
        let crc = crc32c::crc32c(&b[..field::CRC.start]);
        let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
        crc32c::crc32c_append(crc, &b[field::PAYLOAD..])
    }
    /// Whether the checksum field matches the contents.
    pub fn verify_checksum(&self) -> bool {
        self.compute_checksum() == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes magic, version, type, flags, payload length and sequence number.
    pub fn set_header(&mut self, version: u16, msg_type: MessageType, payload_len: u32, seq: u64) {
        let b = self.buffer.as_mut();
        b[field::MAGIC].copy_from_slice(&MAGIC);
        wr16(b, field::VERSION, version);
        b[field::TYPE] = msg_type.into();
        b[field::FLAGS] = 0;
        wr32(b, field::LENGTH, payload_len);
        wr64(b, field::SEQ, seq);
    }
    /// Mutable payload bytes (as long as the header's payload length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        &mut self.buffer.as_mut()[field::PAYLOAD..end]
    }
    /// Computes and stores the checksum; call after header and payload are final.
    pub fn fill_checksum(&mut self) {
        let crc = self.compute_checksum();
        wr32(self.buffer.as_mut(), field::CRC.start, crc);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_checksum_value() {
        // crc32c("123456789") = 0xe3069283: pins the algorithm (Castagnoli, not IEEE).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
