//! The NBD handshake: the server greeting, option requests and replies, `NBD_OPT_INFO`/`GO`
//! and their `NBD_REP_INFO` payloads, and the `NBD_OPT_EXPORT_NAME` reply.

use super::*;

// ---------------------------------------------------------------------------------------------
// Greeting

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreetingRepr {
    /// Handshake flags ([`handshake_flags`]).
    pub flags: u16,
}

impl GreetingRepr {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// Parses a greeting (client side; used by tests and fuzzing).
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        need(Self::LEN, buf.len())?;
        if be64(buf, 0) != NBD_MAGIC {
            return Err(E::Malformed { field: "nbdmagic" });
        }
        if be64(buf, 8) != IHAVEOPT {
            return Err(E::Malformed { field: "ihaveopt" });
        }
        Ok(GreetingRepr {
            flags: be16(buf, 16),
        })
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Writes the greeting into the first [`LEN`](Self::LEN) bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        buf[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        buf[16..18].copy_from_slice(&self.flags.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Option request

mod opt_field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const OPTION: Range<usize> = 8..12;
    pub const LENGTH: Range<usize> = 12..16;
    pub const HEADER_LEN: usize = 16;
}

/// A view over an option request header: `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone)]
pub struct OptionRequest<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OptionRequest<T> {
    /// Header length; the option data follows.
    pub const HEADER_LEN: usize = opt_field::HEADER_LEN;

    /// Wraps a buffer without checks.
    pub fn new_unchecked(buffer: T) -> Self {
        OptionRequest { buffer }
    }

    /// Wraps a buffer, checking its length and magic.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        if v.magic() != IHAVEOPT {
            return Err(E::Malformed {
                field: "option magic",
            });
        }
        Ok(v)
    }

    /// Checks that the header fits.
    pub fn check_len(&self) -> Result<(), Error> {
        need(Self::HEADER_LEN, self.buffer.as_ref().len())
    }

    /// The magic field (must be `IHAVEOPT`).
    pub fn magic(&self) -> u64 {
        be64(self.buffer.as_ref(), opt_field::MAGIC.start)
    }

    /// The option code ([`opt`]).
    pub fn option(&self) -> u32 {
        be32(self.buffer.as_ref(), opt_field::OPTION.start)
    }

    /// Length of the option data that follows.
    pub fn length(&self) -> u32 {
        be32(self.buffer.as_ref(), opt_field::LENGTH.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> OptionRequest<T> {
    /// Sets magic, option and length.
    pub fn set_header(&mut self, option: u32, length: u32) {
        let b = self.buffer.as_mut();
        b[opt_field::MAGIC].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[opt_field::OPTION].copy_from_slice(&option.to_be_bytes());
        b[opt_field::LENGTH].copy_from_slice(&length.to_be_bytes());
    }
}

/// An option request header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionRequestRepr {
    /// The option code ([`opt`]).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionRequestRepr {
    /// Parses an untrusted header.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let v = OptionRequest::new_checked(buf)?;
        Ok(OptionRequestRepr {
            option: v.option(),
            length: v.length(),
        })
    }

    /// Header bytes.
    pub fn buffer_len(&self) -> usize {
        opt_field::HEADER_LEN
    }

    /// Writes the header.
    pub fn emit(&self, buf: &mut [u8]) {
        OptionRequest::new_unchecked(buf).set_header(self.option, self.length);
    }
}

// ---------------------------------------------------------------------------------------------
// Option reply

mod optrep_field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const OPTION: Range<usize> = 8..12;
    pub const TYPE: Range<usize> = 12..16;
    pub const LENGTH: Range<usize> = 16..20;
    pub const HEADER_LEN: usize = 20;
}

/// A view over an option reply header: magic, option, reply type, data length.
#[derive(Debug, Clone)]
pub struct OptionReply<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OptionReply<T> {
    /// Header length; the reply data follows.
    pub const HEADER_LEN: usize = optrep_field::HEADER_LEN;

    /// Wraps a buffer without checks.
    pub fn new_unchecked(buffer: T) -> Self {
        OptionReply { buffer }
    }

    /// Wraps a buffer, checking its length and magic.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        if v.magic() != OPTION_REPLY_MAGIC {
            return Err(E::Malformed {
                field: "option reply magic",
            });
        }
        Ok(v)
    }

    /// Checks that the header fits.
    pub fn check_len(&self) -> Result<(), Error> {
        need(Self::HEADER_LEN, self.buffer.as_ref().len())
    }

    /// The magic field.
    pub fn magic(&self) -> u64 {
        be64(self.buffer.as_ref(), optrep_field::MAGIC.start)
    }

    /// The option this replies to.
    pub fn option(&self) -> u32 {
        be32(self.buffer.as_ref(), optrep_field::OPTION.start)
    }

    /// The reply type ([`rep`]).
    pub fn reply_type(&self) -> u32 {
        be32(self.buffer.as_ref(), optrep_field::TYPE.start)
    }

    /// Length of the reply data that follows.
    pub fn length(&self) -> u32 {
        be32(self.buffer.as_ref(), optrep_field::LENGTH.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> OptionReply<T> {
    /// Sets every header field.
    pub fn set_header(&mut self, option: u32, reply_type: u32, length: u32) {
        let b = self.buffer.as_mut();
        b[optrep_field::MAGIC].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[optrep_field::OPTION].copy_from_slice(&option.to_be_bytes());
        b[optrep_field::TYPE].copy_from_slice(&reply_type.to_be_bytes());
        b[optrep_field::LENGTH].copy_from_slice(&length.to_be_bytes());
    }
}

/// An option reply header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyRepr {
    /// The option this replies to.
    pub option: u32,
    /// The reply type ([`rep`]).
    pub reply_type: u32,
    /// Length of the reply data that follows.
    pub length: u32,
}

impl OptionReplyRepr {
    /// Parses an untrusted header.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let v = OptionReply::new_checked(buf)?;
        Ok(OptionReplyRepr {
            option: v.option(),
            reply_type: v.reply_type(),
            length: v.length(),
        })
    }

    /// Header bytes.
    pub fn buffer_len(&self) -> usize {
        optrep_field::HEADER_LEN
    }

    /// Writes the header.
    pub fn emit(&self, buf: &mut [u8]) {
        OptionReply::new_unchecked(buf).set_header(self.option, self.reply_type, self.length);
    }
}

// ---------------------------------------------------------------------------------------------
// NBD_OPT_INFO / NBD_OPT_GO data, NBD_REP_SERVER data

/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO`: export name and requested info types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequestRepr {
    /// Export name (UTF-8, at most [`MAX_STRING`] bytes).
    pub name: String,
    /// Information types the client asks for ([`info`]).
    pub requests: Vec<u16>,
}

impl InfoRequestRepr {
    /// Parses untrusted option data; it must be exactly the right length.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        need(4, buf.len())?;
        let name_len = be32(buf, 0) as usize;
        if name_len > MAX_STRING {
            return Err(E::Malformed {
                field: "export name length",
            });
        }
        need(4 + name_len + 2, buf.len())?;
        let name = std::str::from_utf8(&buf[4..4 + name_len])
            .map_err(|_| E::Malformed {
                field: "export name",
            })?
            .to_string();
        let count = be16(buf, 4 + name_len) as usize;
        let rest = &buf[4 + name_len + 2..];
        if rest.len() != count * 2 {
            return Err(E::Malformed {
                field: "information request count",
            });
        }
        let requests = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(InfoRequestRepr { name, requests })
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        4 + self.name.len() + 2 + 2 * self.requests.len()
    }

    /// Writes the option data.
    pub fn emit(&self, buf: &mut [u8]) {
        let n = self.name.len();
        buf[0..4].copy_from_slice(&(n as u32).to_be_bytes());
        buf[4..4 + n].copy_from_slice(self.name.as_bytes());
        buf[4 + n..6 + n].copy_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for (i, r) in self.requests.iter().enumerate() {
            buf[6 + n + 2 * i..8 + n + 2 * i].copy_from_slice(&r.to_be_bytes());
        }
    }
}

/// The data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`: one export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRepr {
    /// Export name.
    pub name: String,
}

impl ServerRepr {
    /// Parses untrusted reply data (trailing details are ignored).
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        need(4, buf.len())?;
        let n = be32(buf, 0) as usize;
        if n > MAX_STRING {
            return Err(E::Malformed {
                field: "export name length",
            });
        }
        need(4 + n, buf.len())?;
        let name = std::str::from_utf8(&buf[4..4 + n])
            .map_err(|_| E::Malformed {
                field: "export name",
            })?
            .to_string();
        Ok(ServerRepr { name })
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        4 + self.name.len()
    }

    /// Writes the reply data.
    pub fn emit(&self, buf: &mut [u8]) {
        let n = self.name.len();
        buf[0..4].copy_from_slice(&(n as u32).to_be_bytes());
        buf[4..4 + n].copy_from_slice(self.name.as_bytes());
    }
}

/// The payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoRepr {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags ([`transmission_flags`]).
        flags: u16,
    },
    /// `NBD_INFO_NAME`: canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
    BlockSize {
        /// Smallest request alignment and size the server accepts.
        minimum: u32,
        /// Size the server prefers for efficiency.
        preferred: u32,
        /// Largest payload the server accepts.
        maximum: u32,
    },
}

impl InfoRepr {
    /// Parses untrusted `NBD_REP_INFO` data.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        need(2, buf.len())?;
        let string = |buf: &[u8]| -> Result<String, Error> {
            if buf.len() > MAX_STRING {
                return Err(E::Malformed {
                    field: "info string length",
                });
            }
            std::str::from_utf8(buf)
                .map(str::to_string)
                .map_err(|_| E::Malformed {
                    field: "info string",
                })
        };
        match be16(buf, 0) {
            info::EXPORT => {
                if buf.len() != 12 {
                    return Err(E::Malformed {
                        field: "NBD_INFO_EXPORT length",
                    });
                }
                Ok(InfoRepr::Export {
                    size: be64(buf, 2),
                    flags: be16(buf, 10),
                })
            }
            info::NAME => Ok(InfoRepr::Name(string(&buf[2..])?)),
            info::DESCRIPTION => Ok(InfoRepr::Description(string(&buf[2..])?)),
            info::BLOCK_SIZE => {
                if buf.len() != 14 {
                    return Err(E::Malformed {
                        field: "NBD_INFO_BLOCK_SIZE length",
                    });
                }
                Ok(InfoRepr::BlockSize {
                    minimum: be32(buf, 2),
                    preferred: be32(buf, 6),
                    maximum: be32(buf, 10),
                })
            }
            _ => Err(E::Malformed {
                field: "information type",
            }),
        }
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            InfoRepr::Export { .. } => 12,
            InfoRepr::Name(s) | InfoRepr::Description(s) => 2 + s.len(),
            InfoRepr::BlockSize { .. } => 14,
        }
    }

    /// Writes the payload.
    pub fn emit(&self, buf: &mut [u8]) {
        match self {
            InfoRepr::Export { size, flags } => {
                buf[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
                buf[2..10].copy_from_slice(&size.to_be_bytes());
                buf[10..12].copy_from_slice(&flags.to_be_bytes());
            }
            InfoRepr::Name(s) | InfoRepr::Description(s) => {
                let t = if matches!(self, InfoRepr::Name(_)) {
                    info::NAME
                } else {
                    info::DESCRIPTION
                };
                buf[0..2].copy_from_slice(&t.to_be_bytes());
                buf[2..2 + s.len()].copy_from_slice(s.as_bytes());
            }
            InfoRepr::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                buf[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                buf[2..6].copy_from_slice(&minimum.to_be_bytes());
                buf[6..10].copy_from_slice(&preferred.to_be_bytes());
                buf[10..14].copy_from_slice(&maximum.to_be_bytes());
            }
        }
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless the client
/// negotiated `NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReplyRepr {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Whether the 124 zero bytes are sent.
    pub zeroes: bool,
}

impl ExportNameReplyRepr {
    /// Parses the reply (client side).
    pub fn parse(buf: &[u8], zeroes: bool) -> Result<Self, Error> {
        need(if zeroes { 134 } else { 10 }, buf.len())?;
        Ok(ExportNameReplyRepr {
            size: be64(buf, 0),
            flags: be16(buf, 8),
            zeroes,
        })
    }

    /// Bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        if self.zeroes {
            134
        } else {
            10
        }
    }

    /// Writes the reply.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0..8].copy_from_slice(&self.size.to_be_bytes());
        buf[8..10].copy_from_slice(&self.flags.to_be_bytes());
        if self.zeroes {
            buf[10..134].fill(0);
        }
    }
}
