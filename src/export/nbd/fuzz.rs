//! The NBD server driven by arbitrary client bytes: the entry point of the `nbd` fuzz target.
//!
//! The wire parsers alone are fuzzed by [`crate::wire::nbd::fuzz_parse`]; this runs the real
//! negotiation and transmission code (request parsing across reads, payload skipping, inline
//! and pool paths, reply queueing) over an in-memory stream, so that a panic or a stall there
//! is found without sockets.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::export::Export;
use super::handshake::negotiate;
use super::server::{transmit, Server, ServerConfig};
use crate::block::NullDevice;
use crate::wire::nbd::{client_flags, opt, InfoRequestRepr, OptionRequestRepr};

/// Name of the one export of a fuzzed session.
const EXPORT: &str = "fuzz";
/// Longest a session may take once the client has sent everything. Only a server that waits
/// for input it already has, or for a reply it never sends, comes near this.
const STALL: Duration = Duration::from_secs(10);

thread_local! {
    // A runtime per fuzzing thread: building one per input would dominate the run time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

/// What a fuzzed session looks like, taken from the first input byte.
#[derive(Debug, Clone, Copy)]
struct Mode(u8);

impl Mode {
    /// Bit 0: prefix a valid handshake (`NBD_OPT_GO` for the export), so that the rest of
    /// the input reaches the transmission phase without the fuzzer having to find it first.
    fn negotiated(self) -> bool {
        self.0 & 1 != 0
    }
    /// Bits 1-2: the inline limit, so that every execution path of a request is reachable.
    fn inline_max(self) -> u32 {
        [128 << 10, 4096, 0, 1 << 20][usize::from((self.0 >> 1) & 3)]
    }
    /// Bit 3: a read-only export.
    fn read_only(self) -> bool {
        self.0 & 8 != 0
    }
}

/// The bytes a well-behaved client sends to enter transmission on [`EXPORT`].
fn handshake_bytes() -> Vec<u8> {
    let mut out = (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let go = InfoRequestRepr {
        name: EXPORT.into(),
        requests: Vec::new(),
    };
    let header = OptionRequestRepr {
        option: opt::GO,
        length: go.buffer_len() as u32,
    };
    let at = out.len();
    out.resize(at + header.buffer_len() + go.buffer_len(), 0);
    header.emit(&mut out[at..]);
    go.emit(&mut out[at + header.buffer_len()..]);
    out
}

/// Runs one session: the client sends `input` (after a handshake if `mode` asks for one),
/// half-closes, and reads until the server closes. Returns everything the server sent.
///
/// Panics if the session has not ended [`STALL`] after the client sent its last byte.
fn run_session(mode: Mode, input: &[u8]) -> Vec<u8> {
    let mut bytes = if mode.negotiated() {
        handshake_bytes()
    } else {
        Vec::new()
    };
    bytes.extend_from_slice(input);
    let config = ServerConfig {
        inline_max: mode.inline_max(),
        inline_write_max: mode.inline_max(),
        ..ServerConfig::default()
    };
    let mut server = Server::new(config);
    let mut export = Export::new(EXPORT, Arc::new(NullDevice::new(1 << 20)));
    export.read_only = mode.read_only();
    server.add_export(export).expect("a valid export");

    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let (client, mut io) = tokio::io::duplex(64 << 10);
            let serve = async move {
                let Ok(negotiated) = negotiate(&mut io, &server.exports).await else {
                    return;
                };
                let (rd, wr) = tokio::io::split(io);
                let cancel = CancellationToken::new();
                let _ = transmit(
                    rd,
                    wr,
                    negotiated.export,
                    server.config,
                    server.stats,
                    cancel,
                )
                .await;
            };
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let send = async move {
                // The server may close early (a protocol violation): a failed write is fine.
                let _ = to_server.write_all(&bytes).await;
                let _ = to_server.shutdown().await;
            };
            let receive = async move {
                let mut got = Vec::new();
                let _ = from_server.read_to_end(&mut got).await;
                got
            };
            let session = async { tokio::join!(serve, send, receive).2 };
            tokio::time::timeout(STALL, session)
                .await
                .expect("NBD session stalled")
        })
    })
}

/// Runs the NBD server on `data` as a client's bytes; the cargo-fuzz entry point. Panics only
/// on a bug: the server panicking or never finishing a session whose client went quiet.
///
/// The first byte selects the set-up (a handshake prefix, the inline limit, read-only); the
/// rest is what the client sends.
pub fn fuzz_session(data: &[u8]) {
    if let Some((&mode, input)) = data.split_first() {
        run_session(Mode(mode), input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::nbd::{
        errno, Command, GreetingRepr, OptionReplyRepr, RequestRepr, SimpleReplyRepr,
    };

    fn request(command: Command, handle: u64, offset: u64, length: u32) -> Vec<u8> {
        let r = RequestRepr {
            flags: 0,
            command,
            handle,
            offset,
            length,
        };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b);
        b
    }

    /// Skips the greeting and the option replies of the canned handshake (replies to `GO`
    /// up to and including its ACK) and returns the transmission-phase bytes.
    fn transmission(out: &[u8]) -> &[u8] {
        let mut at = GreetingRepr::LEN;
        loop {
            let r = OptionReplyRepr::parse(&out[at..]).expect("option reply");
            at += r.buffer_len() + r.length as usize;
            if r.reply_type == crate::wire::nbd::rep::ACK {
                return &out[at..];
            }
        }
    }

    #[test]
    fn a_negotiated_session_answers_each_request() {
        for mode in [1u8, 3, 5, 7] {
            let mut input = request(Command::Read, 7, 4096, 512);
            // Out of range: an error reply, and the session goes on.
            input.extend(request(Command::Read, 8, 1 << 20, 512));
            let mut write = request(Command::Write, 9, 0, 3);
            write.extend_from_slice(b"abc");
            input.extend(write);
            input.extend(request(Command::Disconnect, 10, 0, 0));
            let out = run_session(Mode(mode), &input);
            let mut rest = transmission(&out);
            let mut replies = Vec::new();
            while !rest.is_empty() {
                let r = SimpleReplyRepr::parse(rest).expect("simple reply");
                let data = if r.handle == 7 { 512 } else { 0 };
                replies.push((r.handle, r.error));
                rest = &rest[SimpleReplyRepr::LEN + data..];
            }
            replies.sort_unstable();
            assert_eq!(
                replies,
                vec![(7, 0), (8, errno::EINVAL), (9, 0)],
                "mode {mode}"
            );
        }
    }

    #[test]
    fn read_only_and_garbage_sessions_end() {
        let mut write = request(Command::Write, 1, 0, 3);
        write.extend_from_slice(b"abc");
        let out = run_session(Mode(1 | 8), &write);
        let reply = SimpleReplyRepr::parse(transmission(&out)).unwrap();
        assert_eq!((reply.handle, reply.error), (1, errno::EPERM));
        // Garbage, with and without a handshake, ends the session (the greeting is sent).
        for mode in [0u8, 1] {
            let out = run_session(Mode(mode), &[0x55; 100]);
            assert!(GreetingRepr::parse(&out).is_ok());
        }
        fuzz_session(&[]);
    }
}
