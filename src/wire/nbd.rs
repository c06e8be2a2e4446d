//! The NBD (Network Block Device) wire format: handshake and transmission messages.
//!
//! Pure parsing and emitting, no I/O. Follows the NBD protocol document
//! (`NetworkBlockDevice/nbd: doc/proto.md`), fixed-newstyle negotiation, simple replies only.
//!
//! | message                     | view                | repr                       |
//! |-----------------------------|---------------------|----------------------------|
//! | server greeting (18 bytes)  | —                   | [`GreetingRepr`]           |
//! | option request header (16)  | [`OptionRequest`]   | [`OptionRequestRepr`]      |
//! | option reply header (20)    | [`OptionReply`]     | [`OptionReplyRepr`]        |
//! | `NBD_OPT_INFO`/`GO` data    | —                   | [`InfoRequestRepr`]        |
//! | `NBD_REP_INFO` payload      | —                   | [`InfoRepr`]               |
//! | `NBD_OPT_EXPORT_NAME` reply | —                   | [`ExportNameReplyRepr`]    |
//! | request header (28 bytes)   | [`Request`]         | [`RequestRepr`]            |
//! | simple reply header (16)    | [`SimpleReply`]     | [`SimpleReplyRepr`]        |
//!
//! Untrusted bytes go through `new_checked` (or a `Repr::parse`, which calls it). Payloads
//! (option data, write data, read data) follow their headers and are not part of the views.

pub use super::Error;
use super::{need, Error as E};

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second eight bytes of the greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server omits the 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply when asked.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no 124 zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (per export, 16 bits).
pub mod transmission_flags {
    /// Always set: the other flags are meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one consistent device; a flush on one covers all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Select an export and enter transmission (old-style reply, no error possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success, end of the reply to this option.
    pub const ACK: u32 = 1;
    /// One export in a `LIST` reply.
    pub const SERVER: u32 = 2;
    /// One information item in an `INFO`/`GO` reply.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const FLAG_ERROR: u32 = 1 << 31;
    /// The option is not known or not supported.
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    /// The option or its data is syntactically invalid.
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    /// The client must negotiate block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    /// The request or reply is too big.
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: the write is durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must allocate (not punch a hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail fast if it would be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// NBD error values (the reply's error field). Fixed by the protocol, not host errno.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (bad range, unknown command or flag).
    pub const EINVAL: u32 = 22;
    /// No space left (write beyond the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// Maps a host errno (as from `BlockError::errno`) to the NBD value, defaulting to EIO.
    pub fn from_host(err: i32) -> u32 {
        match err {
            libc::EPERM | libc::EROFS => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::EOPNOTSUPP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// A transmission command (`NBD_CMD_*`). Unknown codes are kept so they can be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Read `length` bytes.
    Read,
    /// Write `length` bytes of payload.
    Write,
    /// Disconnect; no reply.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim,
    /// Prefetch (xnbd extension).
    Cache,
    /// Zero a range.
    WriteZeroes,
    /// Block status (needs structured replies).
    BlockStatus,
    /// Resize (experimental).
    Resize,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// The command's wire code.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Resize => 8,
            Command::Unknown(c) => c,
        }
    }

    /// The command for a wire code.
    pub fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            c => Command::Unknown(c),
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

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

/// Runs every parser over `data`; the cargo-fuzz entry point. Panics only on a bug: a parser
/// panicking, or a parsed repr that does not survive `emit` and `parse` unchanged.
///
/// Each parser sees the whole input, and emitted reprs are re-parsed and compared.
pub fn fuzz_parse(data: &[u8]) {
    macro_rules! roundtrip {
        ($repr:expr, $parse:expr) => {{
            let r = $repr;
            let mut buf = vec![0u8; r.buffer_len()];
            r.emit(&mut buf);
            assert_eq!($parse(&buf).as_ref(), Ok(&r), "round trip");
        }};
    }
    if let Ok(r) = GreetingRepr::parse(data) {
        roundtrip!(r, GreetingRepr::parse);
    }
    if let Ok(r) = OptionRequestRepr::parse(data) {
        roundtrip!(r, OptionRequestRepr::parse);
    }
    if let Ok(r) = OptionReplyRepr::parse(data) {
        roundtrip!(r, OptionReplyRepr::parse);
    }
    if let Ok(r) = InfoRequestRepr::parse(data) {
        roundtrip!(r, InfoRequestRepr::parse);
    }
    if let Ok(r) = ServerRepr::parse(data) {
        roundtrip!(r, ServerRepr::parse);
    }
    if let Ok(r) = InfoRepr::parse(data) {
        roundtrip!(r, InfoRepr::parse);
    }
    for zeroes in [false, true] {
        if let Ok(r) = ExportNameReplyRepr::parse(data, zeroes) {
            roundtrip!(r, |b| ExportNameReplyRepr::parse(b, zeroes));
        }
    }
    if let Ok(r) = RequestRepr::parse(data) {
        roundtrip!(r, RequestRepr::parse);
    }
    if let Ok(r) = SimpleReplyRepr::parse(data) {
        roundtrip!(r, SimpleReplyRepr::parse);
    }
    // Views must not panic on any accessor once new_checked succeeded.
    if let Ok(v) = Request::new_checked(data) {
        let _ = (v.flags(), v.command(), v.handle(), v.offset(), v.length());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_from_literal_bytes() {
        // A 4 KiB read at 1 MiB, handle 0x0102030405060708, FUA flag set.
        let bytes = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06,
            0x07, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00,
        ];
        let r = RequestRepr::parse(&bytes).unwrap();
        assert_eq!(
            r,
            RequestRepr {
                flags: cmd_flags::FUA,
                command: Command::Read,
                handle: 0x0102_0304_0506_0708,
                offset: 1 << 20,
                length: 4096
            }
        );
        let mut out = [0u8; 28];
        r.emit(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn request_rejects_bad_magic_and_short_buffers() {
        let mut bytes = [0u8; 28];
        RequestRepr {
            flags: 0,
            command: Command::Flush,
            handle: 1,
            offset: 0,
            length: 0,
        }
        .emit(&mut bytes);
        assert!(RequestRepr::parse(&bytes[..27]).is_err());
        bytes[0] ^= 1;
        assert_eq!(
            RequestRepr::parse(&bytes),
            Err(E::Malformed {
                field: "request magic"
            })
        );
    }

    #[test]
    fn unknown_command_is_kept() {
        assert_eq!(Command::from_code(99), Command::Unknown(99));
        assert_eq!(Command::Unknown(99).code(), 99);
    }

    #[test]
    fn simple_reply_literal() {
        let r = SimpleReplyRepr {
            error: errno::EINVAL,
            handle: 7,
        };
        assert_eq!(
            r.to_bytes(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn greeting_literal() {
        let mut b = [0u8; 18];
        GreetingRepr { flags: 3 }.emit(&mut b);
        assert_eq!(&b[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        assert_eq!(GreetingRepr::parse(&b), Ok(GreetingRepr { flags: 3 }));
    }

    #[test]
    fn option_request_literal() {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 6]);
        assert_eq!(
            OptionRequestRepr::parse(&b),
            Ok(OptionRequestRepr {
                option: opt::GO,
                length: 6
            })
        );
        b[0] = b'X';
        assert!(OptionRequestRepr::parse(&b).is_err());
    }

    #[test]
    fn option_reply_literal() {
        let mut b = [0u8; 20];
        OptionReplyRepr {
            option: opt::LIST,
            reply_type: rep::ACK,
            length: 0,
        }
        .emit(&mut b);
        assert_eq!(
            b,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn info_request_literal() {
        // name "ab", two requests: NAME, BLOCK_SIZE
        let b = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3];
        let r = InfoRequestRepr::parse(&b).unwrap();
        assert_eq!(
            r,
            InfoRequestRepr {
                name: "ab".into(),
                requests: vec![1, 3]
            }
        );
        assert!(InfoRequestRepr::parse(&b[..11]).is_err());
        let mut long = b.to_vec();
        long.push(0);
        assert!(InfoRequestRepr::parse(&long).is_err());
        // name length pointing past the end
        assert!(InfoRequestRepr::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn info_export_literal() {
        let r = InfoRepr::Export {
            size: 0x1000,
            flags: 0x0105,
        };
        let mut b = [0u8; 12];
        r.emit(&mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x01, 0x05]);
        assert_eq!(InfoRepr::parse(&b), Ok(r));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno::from_host(libc::EIO), errno::EIO);
        assert_eq!(errno::from_host(libc::EOPNOTSUPP), errno::ENOTSUP);
        assert_eq!(errno::from_host(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(errno::from_host(12345), errno::EIO);
    }

    fn string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9/_ -]{0,40}"
    }

    fn info_repr() -> impl Strategy<Value = InfoRepr> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoRepr::Export { size, flags }),
            string().prop_map(InfoRepr::Name),
            string().prop_map(InfoRepr::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| InfoRepr::BlockSize {
                minimum: a,
                preferred: b,
                maximum: c
            }),
        ]
    }

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, code: u16, handle: u64, offset: u64, length: u32) {
            let r = RequestRepr { flags, command: Command::from_code(code), handle, offset, length };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(RequestRepr::parse(&b), Ok(r));
        }

        #[test]
        fn simple_reply_roundtrip(error: u32, handle: u64) {
            let r = SimpleReplyRepr { error, handle };
            prop_assert_eq!(SimpleReplyRepr::parse(&r.to_bytes()), Ok(r));
        }

        #[test]
        fn option_roundtrip(option: u32, length: u32, reply_type: u32) {
            let r = OptionRequestRepr { option, length };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(OptionRequestRepr::parse(&b), Ok(r));
            let r = OptionReplyRepr { option, reply_type, length };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(OptionReplyRepr::parse(&b), Ok(r));
        }

        #[test]
        fn info_request_roundtrip(name in string(), requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequestRepr { name, requests };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(InfoRequestRepr::parse(&b), Ok(r));
        }

        #[test]
        fn info_roundtrip(r in info_repr()) {
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(InfoRepr::parse(&b), Ok(r));
        }

        #[test]
        fn server_and_export_name_roundtrip(name in string(), size: u64, flags: u16, zeroes: bool) {
            let r = ServerRepr { name };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(ServerRepr::parse(&b), Ok(r));
            let r = ExportNameReplyRepr { size, flags, zeroes };
            let mut b = vec![0u8; r.buffer_len()];
            r.emit(&mut b);
            prop_assert_eq!(ExportNameReplyRepr::parse(&b, zeroes), Ok(r));
        }

        #[test]
        fn fuzz_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_parse(&data);
        }
    }
}
