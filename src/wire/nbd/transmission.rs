//! The NBD transmission phase: the request header and the simple reply header.

use super::*;

// ---------------------------------------------------------------------------------------------
// Transmission: request

mod req_field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const FLAGS: Range<usize> = 4..6;
    pub const TYPE: Range<usize> = 6..8;
    pub const HANDLE: Range<usize> = 8..16;
    pub const OFFSET: Range<usize> = 16..24;
    pub const LENGTH: Range<usize> = 24..28;
    pub const LEN: usize = 28;
}

/// A view over a 28-byte transmission request header.
#[derive(Debug, Clone)]
pub struct Request<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Request<T> {
    /// Header length; a write's payload follows.
    pub const LEN: usize = req_field::LEN;

    /// Wraps a buffer without checks.
    pub fn new_unchecked(buffer: T) -> Self {
        Request { buffer }
    }

    /// Wraps a buffer, checking its length and magic.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        if v.magic() != REQUEST_MAGIC {
            return Err(E::Malformed {
                field: "request magic",
            });
        }
        Ok(v)
    }

    /// Checks that the header fits.
    pub fn check_len(&self) -> Result<(), Error> {
        need(Self::LEN, self.buffer.as_ref().len())
    }

    /// The magic field.
    pub fn magic(&self) -> u32 {
        be32(self.buffer.as_ref(), req_field::MAGIC.start)
    }
    /// Command flags ([`cmd_flags`]).
    pub fn flags(&self) -> u16 {
        be16(self.buffer.as_ref(), req_field::FLAGS.start)
    }
    /// Command code.
    pub fn command(&self) -> u16 {
        be16(self.buffer.as_ref(), req_field::TYPE.start)
    }
    /// Opaque handle (cookie) echoed in the reply.
    pub fn handle(&self) -> u64 {
        be64(self.buffer.as_ref(), req_field::HANDLE.start)
    }
    /// Byte offset.
    pub fn offset(&self) -> u64 {
        be64(self.buffer.as_ref(), req_field::OFFSET.start)
    }
    /// Byte length.
    pub fn length(&self) -> u32 {
        be32(self.buffer.as_ref(), req_field::LENGTH.start)
    }
}

/// A transmission request header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRepr {
    /// Command flags ([`cmd_flags`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for a write, the payload length).
    pub length: u32,
}

impl RequestRepr {
    /// Bytes on the wire.
    pub const LEN: usize = req_field::LEN;

    /// Parses an untrusted header.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let v = Request::new_checked(buf)?;
        Ok(RequestRepr {
            flags: v.flags(),
            command: Command::from_code(v.command()),
            handle: v.handle(),
            offset: v.offset(),
            length: v.length(),
        })
    }

    /// Header bytes.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Writes the header.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[req_field::MAGIC].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf[req_field::FLAGS].copy_from_slice(&self.flags.to_be_bytes());
        buf[req_field::TYPE].copy_from_slice(&self.command.code().to_be_bytes());
        buf[req_field::HANDLE].copy_from_slice(&self.handle.to_be_bytes());
        buf[req_field::OFFSET].copy_from_slice(&self.offset.to_be_bytes());
        buf[req_field::LENGTH].copy_from_slice(&self.length.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: simple reply

mod reply_field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const ERROR: Range<usize> = 4..8;
    pub const HANDLE: Range<usize> = 8..16;
    pub const LEN: usize = 16;
}

/// A view over a 16-byte simple reply header.
#[derive(Debug, Clone)]
pub struct SimpleReply<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SimpleReply<T> {
    /// Header length; a successful read's data follows.
    pub const LEN: usize = reply_field::LEN;

    /// Wraps a buffer without checks.
    pub fn new_unchecked(buffer: T) -> Self {
        SimpleReply { buffer }
    }

    /// Wraps a buffer, checking its length and magic.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        if v.magic() != SIMPLE_REPLY_MAGIC {
            return Err(E::Malformed {
                field: "reply magic",
            });
        }
        Ok(v)
    }

    /// Checks that the header fits.
    pub fn check_len(&self) -> Result<(), Error> {
        need(Self::LEN, self.buffer.as_ref().len())
    }

    /// The magic field.
    pub fn magic(&self) -> u32 {
        be32(self.buffer.as_ref(), reply_field::MAGIC.start)
    }
    /// NBD error value ([`errno`]); 0 on success.
    pub fn error(&self) -> u32 {
        be32(self.buffer.as_ref(), reply_field::ERROR.start)
    }
    /// Handle of the request this answers.
    pub fn handle(&self) -> u64 {
        be64(self.buffer.as_ref(), reply_field::HANDLE.start)
    }
}

/// A simple reply header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyRepr {
    /// NBD error value; 0 on success.
    pub error: u32,
    /// Handle of the request this answers.
    pub handle: u64,
}

impl SimpleReplyRepr {
    /// Bytes on the wire.
    pub const LEN: usize = reply_field::LEN;

    /// Parses an untrusted header (client side).
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let v = SimpleReply::new_checked(buf)?;
        Ok(SimpleReplyRepr {
            error: v.error(),
            handle: v.handle(),
        })
    }

    /// Header bytes.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Writes the header.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[reply_field::MAGIC].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[reply_field::ERROR].copy_from_slice(&self.error.to_be_bytes());
        buf[reply_field::HANDLE].copy_from_slice(&self.handle.to_be_bytes());
    }

    /// The header as an array, for appending to an output buffer.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        self.emit(&mut b);
        b
    }
}
