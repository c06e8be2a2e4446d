//! One message's meaning and its frame: the [`Message`] enum over every payload type (parse,
//! length and emit by type code) and [`MessageRepr`], a whole framed message (version,
//! sequence number, message) to and from a [`Packet`].

use super::*;

/// One message's meaning, without the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`HelloRepr`].
    Hello(HelloRepr),
    /// See [`AuthChallengeRepr`].
    AuthChallenge(AuthChallengeRepr),
    /// See [`AuthResponseRepr`].
    AuthResponse(AuthResponseRepr),
    /// The peer's response verified.
    AuthOk,
    /// The peer's response did not verify; the connection closes.
    AuthFail,
    /// See [`ParametersRepr`].
    Parameters(ParametersRepr),
    /// See [`UuidsRepr`].
    Uuids(UuidsRepr),
    /// The resync source's new bitmap UUID; the target sets current := this, bitmap := 0.
    SyncUuid(u64),
    /// See [`WriteDataRepr`].
    WriteData(WriteDataRepr),
    /// See [`WriteAckRepr`].
    WriteAck(WriteAckRepr),
    /// See [`BarrierRepr`].
    Barrier(BarrierRepr),
    /// See [`BarrierAckRepr`].
    BarrierAck(BarrierAckRepr),
    /// See [`BitmapChunkRepr`].
    BitmapChunk(BitmapChunkRepr),
    /// See [`ResyncRequestRepr`].
    ResyncRequest(ResyncRequestRepr),
    /// See [`ResyncDataRepr`].
    ResyncData(ResyncDataRepr),
    /// See [`ResyncSkipRepr`].
    ResyncSkip(ResyncSkipRepr),
    /// See [`StateChangeRepr`].
    StateChange(StateChangeRepr),
    /// Keepalive.
    Ping(PingRepr),
    /// Keepalive answer.
    PingAck(PingRepr),
    /// See [`DisconnectRepr`].
    Disconnect(DisconnectRepr),
    /// See [`SyncStartRepr`].
    SyncStart(SyncStartRepr),
    /// The resync source has copied every block; the target may finish its side.
    SyncDone,
    /// See [`ChecksumRequestRepr`].
    ChecksumRequest(ChecksumRequestRepr),
    /// See [`ChecksumsRepr`].
    Checksums(ChecksumsRepr),
    /// See [`ResyncZeroRepr`].
    ResyncZero(ResyncZeroRepr),
    /// `pause-sync` (true) or `resume-sync` (false) on the sender's side: a resync is paused
    /// on both nodes when either says so.
    SyncPause(bool),
}

impl Message {
    /// The header type code of this message.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::AuthChallenge(_) => MessageType::AuthChallenge,
            Message::AuthResponse(_) => MessageType::AuthResponse,
            Message::AuthOk => MessageType::AuthOk,
            Message::AuthFail => MessageType::AuthFail,
            Message::Parameters(_) => MessageType::Parameters,
            Message::Uuids(_) => MessageType::Uuids,
            Message::SyncUuid(_) => MessageType::SyncUuid,
            Message::WriteData(_) => MessageType::WriteData,
            Message::WriteAck(_) => MessageType::WriteAck,
            Message::Barrier(_) => MessageType::Barrier,
            Message::BarrierAck(_) => MessageType::BarrierAck,
            Message::BitmapChunk(_) => MessageType::BitmapChunk,
            Message::ResyncRequest(_) => MessageType::ResyncRequest,
            Message::ResyncData(_) => MessageType::ResyncData,
            Message::ResyncSkip(_) => MessageType::ResyncSkip,
            Message::StateChange(_) => MessageType::StateChange,
            Message::Ping(_) => MessageType::Ping,
            Message::PingAck(_) => MessageType::PingAck,
            Message::Disconnect(_) => MessageType::Disconnect,
            Message::SyncStart(_) => MessageType::SyncStart,
            Message::SyncDone => MessageType::SyncDone,
            Message::ChecksumRequest(_) => MessageType::ChecksumRequest,
            Message::Checksums(_) => MessageType::Checksums,
            Message::ResyncZero(_) => MessageType::ResyncZero,
            Message::SyncPause(_) => MessageType::SyncPause,
        }
    }

    /// Parses a payload of the given type.
    pub fn parse(msg_type: MessageType, p: &[u8]) -> Result<Message, Error> {
        use MessageType as T;
        Ok(match msg_type {
            T::Hello => Message::Hello(HelloRepr::parse(p)?),
            T::AuthChallenge => Message::AuthChallenge(AuthChallengeRepr::parse(p)?),
            T::AuthResponse => Message::AuthResponse(AuthResponseRepr::parse(p)?),
            T::AuthOk => {
                exact(p, 0)?;
                Message::AuthOk
            }
            T::AuthFail => {
                exact(p, 0)?;
                Message::AuthFail
            }
            T::Parameters => Message::Parameters(ParametersRepr::parse(p)?),
            T::Uuids => Message::Uuids(UuidsRepr::parse(p)?),
            T::SyncUuid => {
                exact(p, 8)?;
                Message::SyncUuid(rd64(p, 0))
            }
            T::WriteData => Message::WriteData(WriteDataRepr::parse(p)?),
            T::WriteAck => Message::WriteAck(WriteAckRepr::parse(p)?),
            T::Barrier => Message::Barrier(BarrierRepr::parse(p)?),
            T::BarrierAck => Message::BarrierAck(BarrierAckRepr::parse(p)?),
            T::BitmapChunk => Message::BitmapChunk(BitmapChunkRepr::parse(p)?),
            T::ResyncRequest => Message::ResyncRequest(ResyncRequestRepr::parse(p)?),
            T::ResyncData => Message::ResyncData(ResyncDataRepr::parse(p)?),
            T::ResyncSkip => Message::ResyncSkip(ResyncSkipRepr::parse(p)?),
            T::StateChange => Message::StateChange(StateChangeRepr::parse(p)?),
            T::Ping => Message::Ping(PingRepr::parse(p)?),
            T::PingAck => Message::PingAck(PingRepr::parse(p)?),
            T::Disconnect => Message::Disconnect(DisconnectRepr::parse(p)?),
            T::SyncStart => Message::SyncStart(SyncStartRepr::parse(p)?),
            T::SyncDone => {
                exact(p, 0)?;
                Message::SyncDone
            }
            T::ChecksumRequest => Message::ChecksumRequest(ChecksumRequestRepr::parse(p)?),
            T::Checksums => Message::Checksums(ChecksumsRepr::parse(p)?),
            T::ResyncZero => Message::ResyncZero(ResyncZeroRepr::parse(p)?),
            T::SyncPause => {
                exact(p, 1)?;
                match p[0] {
                    0 => Message::SyncPause(false),
                    1 => Message::SyncPause(true),
                    _ => {
                        return Err(Error::Malformed {
                            field: "sync pause",
                        })
                    }
                }
            }
            T::Unknown(_) => {
                return Err(Error::Malformed {
                    field: "message type",
                })
            }
        })
    }

    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        match self {
            Message::Hello(m) => m.buffer_len(),
            Message::AuthChallenge(m) => m.buffer_len(),
            Message::AuthResponse(m) => m.buffer_len(),
            Message::AuthOk | Message::AuthFail => 0,
            Message::Parameters(m) => m.buffer_len(),
            Message::Uuids(m) => m.buffer_len(),
            Message::SyncUuid(_) => 8,
            Message::WriteData(m) => m.buffer_len(),
            Message::WriteAck(m) => m.buffer_len(),
            Message::Barrier(m) => m.buffer_len(),
            Message::BarrierAck(m) => m.buffer_len(),
            Message::BitmapChunk(m) => m.buffer_len(),
            Message::ResyncRequest(m) => m.buffer_len(),
            Message::ResyncData(m) => m.buffer_len(),
            Message::ResyncSkip(m) => m.buffer_len(),
            Message::StateChange(m) => m.buffer_len(),
            Message::Ping(m) | Message::PingAck(m) => m.buffer_len(),
            Message::Disconnect(m) => m.buffer_len(),
            Message::SyncStart(m) => m.buffer_len(),
            Message::SyncDone => 0,
            Message::ChecksumRequest(m) => m.buffer_len(),
            Message::Checksums(m) => m.buffer_len(),
            Message::ResyncZero(m) => m.buffer_len(),
            Message::SyncPause(_) => 1,
        }
    }

    /// Writes the payload into the first [`Message::buffer_len`] bytes of `p`.
    pub fn emit(&self, p: &mut [u8]) {
        match self {
            Message::Hello(m) => m.emit(p),
            Message::AuthChallenge(m) => m.emit(p),
            Message::AuthResponse(m) => m.emit(p),
            Message::AuthOk | Message::AuthFail => {}
            Message::Parameters(m) => m.emit(p),
            Message::Uuids(m) => m.emit(p),
            Message::SyncUuid(u) => wr64(p, 0, *u),
            Message::WriteData(m) => m.emit(p),
            Message::WriteAck(m) => m.emit(p),
            Message::Barrier(m) => m.emit(p),
            Message::BarrierAck(m) => m.emit(p),
            Message::BitmapChunk(m) => m.emit(p),
            Message::ResyncRequest(m) => m.emit(p),
            Message::ResyncData(m) => m.emit(p),
            Message::ResyncSkip(m) => m.emit(p),
            Message::StateChange(m) => m.emit(p),
            Message::Ping(m) | Message::PingAck(m) => m.emit(p),
            Message::Disconnect(m) => m.emit(p),
            Message::SyncStart(m) => m.emit(p),
            Message::SyncDone => {}
            Message::ChecksumRequest(m) => m.emit(p),
            Message::Checksums(m) => m.emit(p),
            Message::ResyncZero(m) => m.emit(p),
            Message::SyncPause(paused) => p[0] = u8::from(*paused),
        }
    }
}

/// A whole framed message: header fields and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRepr {
    /// Protocol version in the header (the negotiated one; before negotiation, the sender's
    /// newest).
    pub version: u16,
    /// Per-connection, per-direction sequence number.
    pub seq: u64,
    /// The message.
    pub message: Message,
}

impl MessageRepr {
    /// Parses a checked packet: magic, reserved flags and checksum are verified first, so a
    /// corrupt message never reaches the payload parsers.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<MessageRepr, Error> {
        packet.check_len()?;
        ensure(packet.verify_checksum(), "checksum")?;
        Self::parse_verified(packet)
    }

    /// [`parse`](Self::parse) for a packet whose length and checksum were already verified
    /// (the stream decoder does that to name a corrupt message precisely).
    pub(super) fn parse_verified<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<MessageRepr, Error> {
        ensure(packet.magic() == MAGIC, "magic")?;
        ensure(packet.flags() == 0, "header flags")?;
        Ok(MessageRepr {
            version: packet.version(),
            seq: packet.seq(),
            message: Message::parse(packet.msg_type(), packet.payload())?,
        })
    }

    /// Header plus payload length.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.message.buffer_len()
    }

    /// Writes header, payload and checksum into the first [`MessageRepr::buffer_len`] bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let len = self.message.buffer_len();
        packet.set_header(self.version, self.message.msg_type(), len as u32, self.seq);
        self.message.emit(packet.payload_mut());
        packet.fill_checksum();
    }

    /// The message as a new byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut out[..]));
        out
    }
}
