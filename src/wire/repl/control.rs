//! Connection control: [`StateChangeRepr`] (the sender's role, disk and connection state),
//! [`PingRepr`] (keepalive and its answer) and [`DisconnectRepr`] (why the sender closes).

use super::{
    ensure, exact, need, rd16, rd64, wr16, wr64, ConnState, DisconnectReason, DiskState, Error,
    Role, MAX_REASON_LEN,
};

/// StateChange: the sender's role, disk or connection state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChangeRepr {
    /// The sender's role.
    pub role: Role,
    /// The sender's disk state.
    pub disk: DiskState,
    /// The sender's connection state.
    pub conn: ConnState,
}

impl StateChangeRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 3)?;
        Ok(StateChangeRepr {
            role: Role::from_code(p[0])?,
            disk: DiskState::from_code(p[1])?,
            conn: ConnState::from_code(p[2])?,
        })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        3
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        p[0] = self.role.code();
        p[1] = self.disk.code();
        p[2] = self.conn.code();
    }
}

/// Ping and PingAck: a cookie the answer echoes (a send timestamp gives the round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingRepr {
    /// Opaque cookie.
    pub cookie: u64,
}

impl PingRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        exact(p, 8)?;
        Ok(PingRepr { cookie: rd64(p, 0) })
    }
    /// Payload length.
    pub const fn buffer_len(&self) -> usize {
        8
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        wr64(p, 0, self.cookie);
    }
}

/// Disconnect: the sender is about to close the connection, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectRepr {
    /// Machine-readable reason.
    pub reason: DisconnectReason,
    /// Human-readable detail (UTF-8, at most [`MAX_REASON_LEN`] bytes; cut when emitted).
    pub message: String,
}

impl DisconnectRepr {
    /// Parses the payload.
    pub fn parse(p: &[u8]) -> Result<Self, Error> {
        need(3, p.len())?;
        let reason = DisconnectReason::from_code(p[0])?;
        let len = rd16(p, 1) as usize;
        ensure(len <= MAX_REASON_LEN, "message length")?;
        exact(p, 3 + len)?;
        let message =
            std::str::from_utf8(&p[3..]).map_err(|_| Error::Malformed { field: "message" })?;
        Ok(DisconnectRepr {
            reason,
            message: message.to_string(),
        })
    }
    fn message_bytes(&self) -> &[u8] {
        let mut end = self.message.len().min(MAX_REASON_LEN);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        &self.message.as_bytes()[..end]
    }
    /// Payload length.
    pub fn buffer_len(&self) -> usize {
        3 + self.message_bytes().len()
    }
    /// Writes the payload.
    pub fn emit(&self, p: &mut [u8]) {
        let m = self.message_bytes();
        p[0] = self.reason.code();
        wr16(p, 1, m.len() as u16);
        p[3..3 + m.len()].copy_from_slice(m);
    }
}
