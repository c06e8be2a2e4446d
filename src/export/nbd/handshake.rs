//! Fixed-newstyle negotiation: from the greeting to the start of transmission.
//!
//! Supported options: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO` (with
//! `NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`),
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT`. Everything else (TLS, structured replies, metadata
//! contexts, extended headers) gets `NBD_REP_ERR_UNSUP`, so clients fall back to simple
//! replies. Malformed input closes the connection; a bounded number of options and a bounded
//! option length keep a hostile client from holding the connection or memory forever.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{gate_opens_or_fails, ExportState};
use crate::wire::nbd::{
    client_flags, handshake_flags, info, opt, rep, ExportNameReplyRepr, GreetingRepr, InfoRepr,
    InfoRequestRepr, OptionReplyRepr, OptionRequest, OptionRequestRepr, ServerRepr,
};

/// Longest option data accepted (export names are at most 4096 bytes).
const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Options accepted on one connection before it is closed.
const MAX_OPTIONS: usize = 256;

/// Why negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or the client went away.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The client asked to abort, or chose an unknown export with `NBD_OPT_EXPORT_NAME`.
    #[error("client ended negotiation: {0}")]
    Ended(&'static str),
}

/// A successful negotiation.
pub(crate) struct Negotiated {
    /// The export the client chose.
    pub export: Arc<ExportState>,
}

async fn reply<S: AsyncWrite + Unpin>(
    io: &mut S,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let header = OptionReplyRepr {
        option,
        reply_type,
        length: data.len() as u32,
    };
    let mut buf = vec![0u8; header.buffer_len() + data.len()];
    header.emit(&mut buf);
    buf[header.buffer_len()..].copy_from_slice(data);
    io.write_all(&buf).await
}

fn find<'a>(exports: &'a [Arc<ExportState>], name: &str) -> Option<&'a Arc<ExportState>> {
    exports
        .iter()
        .find(|e| e.export.name == name)
        // The empty name selects the default export: the first one.
        .or_else(|| {
            if name.is_empty() {
                exports.first()
            } else {
                None
            }
        })
}

/// Runs the handshake on `io` until the client enters transmission, aborts, or fails.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    exports: &[Arc<ExportState>],
) -> Result<Negotiated, HandshakeError> {
    let greeting = GreetingRepr {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    };
    let mut buf = [0u8; GreetingRepr::LEN];
    greeting.emit(&mut buf);
    io.write_all(&buf).await?;

    let client = io.read_u32().await?;
    if client & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol("unknown client flags"));
    }
    let no_zeroes = client & client_flags::NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; OptionRequest::<&[u8]>::HEADER_LEN];
        io.read_exact(&mut header).await?;
        let OptionRequestRepr { option, length } = OptionRequestRepr::parse(&header)
            .map_err(|_| HandshakeError::Protocol("bad option magic"))?;
        if length > MAX_OPTION_DATA {
            return Err(HandshakeError::Protocol("option data too long"));
        }
        let mut data = vec![0u8; length as usize];
        io.read_exact(&mut data).await?;

        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| HandshakeError::Protocol("export name is not UTF-8"))?;
                // No error reply exists for this option: an unknown name closes the connection.
                let export = find(exports, name).ok_or(HandshakeError::Ended("unknown export"))?;
                // The export's info is an answer too: held while this node may not serve (until
                // on-no-quorum = io-error fails requests: then they get EIO in transmission).
                gate_opens_or_fails(&export.export.gate).await;
                let r = ExportNameReplyRepr {
                    size: export.size,
                    flags: export.flags,
                    zeroes: !no_zeroes,
                };
                let mut buf = vec![0u8; r.buffer_len()];
                r.emit(&mut buf);
                io.write_all(&buf).await?;
                return Ok(Negotiated {
                    export: Arc::clone(export),
                });
            }
            opt::ABORT => {
                // Best effort: the client may already have closed.
                let _ = reply(io, option, rep::ACK, &[]).await;
                return Err(HandshakeError::Ended("NBD_OPT_ABORT"));
            }
            opt::LIST => {
                if length != 0 {
                    reply(io, option, rep::ERR_INVALID, &[]).await?;
                    continue;
                }
                for e in exports {
                    let s = ServerRepr {
                        name: e.export.name.clone(),
                    };
                    let mut buf = vec![0u8; s.buffer_len()];
                    s.emit(&mut buf);
                    reply(io, option, rep::SERVER, &buf).await?;
                }
                reply(io, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let Ok(request) = InfoRequestRepr::parse(&data) else {
                    reply(io, option, rep::ERR_INVALID, &[]).await?;
                    continue;
                };
                let Some(export) = find(exports, &request.name) else {
                    reply(io, option, rep::ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                // The export's info is an answer too: held while this node may not serve (until
                // on-no-quorum = io-error fails requests: then they get EIO in transmission).
                gate_opens_or_fails(&export.export.gate).await;
                let mut infos = vec![InfoRepr::Export {
                    size: export.size,
                    flags: export.flags,
                }];
                if request.requests.contains(&info::NAME) {
                    infos.push(InfoRepr::Name(export.export.name.clone()));
                }
                if request.requests.contains(&info::DESCRIPTION)
                    && !export.export.description.is_empty()
                {
                    infos.push(InfoRepr::Description(export.export.description.clone()));
                }
                infos.push(InfoRepr::BlockSize {
                    minimum: export.export.min_block_size,
                    preferred: export.preferred_block_size(),
                    maximum: export.max_payload,
                });
                for i in infos {
                    let mut buf = vec![0u8; i.buffer_len()];
                    i.emit(&mut buf);
                    reply(io, option, rep::INFO, &buf).await?;
                }
                reply(io, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(Negotiated {
                        export: Arc::clone(export),
                    });
                }
            }
            _ => reply(io, option, rep::ERR_UNSUP, &[]).await?,
        }
    }
    Err(HandshakeError::Protocol("too many options"))
}
