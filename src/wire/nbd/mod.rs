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

mod handshake;
mod transmission;

pub use handshake::*;
pub use transmission::*;

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
