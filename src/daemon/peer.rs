//! Peer connections: TCP set-up, the Hello / authentication / parameters handshake, and the
//! reader that turns the byte stream into messages.
//!
//! ```text
//! both sides:  Hello(versions, nonce, name)  →  negotiate version, check the peer's name
//!              AuthChallenge(nonce)          →  AuthResponse(HMAC(secret, both names+nonces))
//!              AuthOk | AuthFail             →  a wrong secret ends here: nothing else is sent
//!              Parameters + Uuids            →  the engine decides (repl::uuid::decide)
//! ```
//!
//! The node whose name sorts first connects; the other accepts. One connection per resource.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::repl::auth::{fresh_nonce, Authenticator};
use crate::wire::repl::{
    negotiate, FrameDecoder, HelloRepr, Message, MessageRepr, Packet, ParametersRepr, UuidsRepr,
    VERSION_MAX, VERSION_MIN,
};

/// How long each handshake step may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The byte stream was not our protocol (or was corrupted).
    #[error("bad message from the peer: {0}")]
    Decode(String),
    /// The peer sent something out of order.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No common protocol version.
    #[error("no common protocol version (ours {VERSION_MIN}..{VERSION_MAX}, peer {0}..{1})")]
    Version(u16, u16),
    /// The peer is not who the configuration says.
    #[error("the peer calls itself {0:?}, expected {1:?}")]
    WrongPeer(String, String),
    /// The peer's answer to our challenge did not verify: wrong shared secret (or an impostor).
    #[error("authentication failed: the peer does not know the shared secret")]
    AuthRejected,
    /// The peer refused our answer.
    #[error("authentication failed: the peer refused our response (shared secrets differ?)")]
    AuthRefusedByPeer,
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
}

/// Who we are and whom we expect.
#[derive(Clone)]
pub struct Identity {
    /// Our node name.
    pub local: String,
    /// The peer's node name.
    pub peer: String,
    /// The cluster's shared secret.
    pub secret: Vec<u8>,
}

/// A message stream during the handshake (blocking, with timeouts).
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Incoming bytes not yet decoded.
    pub decoder: FrameDecoder,
    /// Next outgoing sequence number.
    pub seq_out: u64,
    /// Negotiated version (the newest ours until negotiated).
    pub version: u16,
}

impl Conn {
    /// Wraps a connected socket.
    pub fn new(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        Ok(Conn {
            stream,
            decoder: FrameDecoder::new().check_sequence(0),
            seq_out: 0,
            version: VERSION_MAX,
        })
    }

    /// Sends one message.
    pub fn send(&mut self, message: Message) -> Result<(), PeerError> {
        use std::io::Write;
        let repr = MessageRepr {
            version: self.version,
            seq: self.seq_out,
            message,
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
        self.stream.write_all(&buf)?;
        self.seq_out += 1;
        Ok(())
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Message, PeerError> {
        read_message(&mut self.stream, &mut self.decoder)
    }
}

/// Reads until one whole message is decoded.
pub fn read_message(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
) -> Result<Message, PeerError> {
    loop {
        match decoder.next_message() {
            Ok(Some(m)) => return Ok(m.message),
            Ok(None) => {}
            Err(e) => return Err(PeerError::Decode(e.to_string())),
        }
        // Straight into the decoder's buffer: no copy between socket and decoder.
        match stream.read(decoder.spare(64 * 1024)) {
            Ok(0) => return Err(PeerError::Closed),
            Ok(n) => decoder.commit(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What the handshake learned.
pub struct Handshaken {
    /// The connection, ready for the reader and the link.
    pub conn: Conn,
    /// The peer's parameters.
    pub params: ParametersRepr,
    /// The peer's generation UUIDs.
    pub uuids: UuidsRepr,
    /// The generation UUIDs we told the peer (the engine checks they still hold).
    pub sent_uuids: UuidsRepr,
    /// We hold "resolve conflicts" (our Hello nonce is the larger).
    pub resolve_conflicts: bool,
}

/// Runs the handshake on a fresh connection. `ours` is called after authentication and gives
/// what we tell the peer about ourselves (so it is current).
pub fn handshake(
    stream: TcpStream,
    id: &Identity,
    ours: impl FnOnce() -> (ParametersRepr, UuidsRepr),
) -> Result<Handshaken, PeerError> {
    let mut conn = Conn::new(stream)?;
    let nonce = fresh_nonce(&mut rand::rng());
    conn.send(Message::Hello(HelloRepr {
        min_version: VERSION_MIN,
        max_version: VERSION_MAX,
        nonce,
        name: id.local.clone(),
    }))?;
    let hello = expect(&mut conn, "Hello", |m| match m {
        Message::Hello(x) => Some(x),
        _ => None,
    })?;
    let version = negotiate(
        (VERSION_MIN, VERSION_MAX),
        (hello.min_version, hello.max_version),
    )
    .ok_or(PeerError::Version(hello.min_version, hello.max_version))?;
    conn.version = version;
    if hello.name != id.peer {
        return Err(PeerError::WrongPeer(hello.name, id.peer.clone()));
    }
    let resolve_conflicts = nonce > hello.nonce;

    let mut auth = Authenticator::new(&id.secret, &id.local, fresh_nonce(&mut rand::rng()))
        .map_err(|e| PeerError::Protocol(e.to_string()))?;
    conn.send(Message::AuthChallenge(auth.challenge()))?;
    let challenge = expect(&mut conn, "AuthChallenge", |m| match m {
        Message::AuthChallenge(x) => Some(x),
        _ => None,
    })?;
    let response = auth
        .respond(&hello.name, &challenge)
        .map_err(|e| PeerError::Protocol(e.to_string()))?;
    conn.send(Message::AuthResponse(response))?;
    let theirs = expect(&mut conn, "AuthResponse", |m| match m {
        Message::AuthResponse(x) => Some(x),
        _ => None,
    })?;
    let verified = auth.verify(&theirs).is_ok();
    conn.send(if verified {
        Message::AuthOk
    } else {
        Message::AuthFail
    })?;
    if !verified {
        return Err(PeerError::AuthRejected);
    }
    match conn.recv()? {
        Message::AuthOk => {}
        Message::AuthFail => return Err(PeerError::AuthRefusedByPeer),
        other => {
            return Err(PeerError::Protocol(format!(
                "expected AuthOk, got {:?}",
                other.msg_type()
            )))
        }
    }

    let (params, uuids) = ours();
    let sent_uuids = uuids;
    conn.send(Message::Parameters(params))?;
    conn.send(Message::Uuids(uuids))?;
    let params = expect(&mut conn, "Parameters", |m| match m {
        Message::Parameters(x) => Some(x),
        _ => None,
    })?;
    let uuids = expect(&mut conn, "Uuids", |m| match m {
        Message::Uuids(x) => Some(x),
        _ => None,
    })?;
    conn.stream.set_read_timeout(None)?;
    conn.stream.set_write_timeout(None)?;
    Ok(Handshaken {
        conn,
        params,
        uuids,
        sent_uuids,
        resolve_conflicts,
    })
}

/// Receives the next message and takes it apart with `pick`; anything else is a protocol
/// violation naming what was `wanted`.
fn expect<T>(
    conn: &mut Conn,
    wanted: &str,
    pick: impl FnOnce(Message) -> Option<T>,
) -> Result<T, PeerError> {
    let message = conn.recv()?;
    let got = message.msg_type();
    pick(message).ok_or_else(|| PeerError::Protocol(format!("expected {wanted}, got {got:?}")))
}

/// Tries once to reach the peer (we are the connecting side).
pub fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1))
}

/// Waits up to `wait` for the peer to connect to our listener (non-blocking listener).
pub fn accept(
    listener: &TcpListener,
    expected: std::net::IpAddr,
    wait: Duration,
    limiter: &crate::ratelimit::LogLimiter,
) -> Option<TcpStream> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                if from.ip() == expected {
                    let _ = stream.set_nonblocking(false);
                    return Some(stream);
                }
                crate::warn_limited!(
                    limiter,
                    "refused a replication connection from {from}: not the peer"
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => crate::warn_limited!(limiter, "accept on the replication port failed: {e}"),
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::{ChecksumAlg, DiskState, Durability, ReplProtocol, Role};

    fn ours(size: u64) -> (ParametersRepr, UuidsRepr) {
        (
            ParametersRepr {
                size,
                protocol: ReplProtocol::C,
                durability: Durability::Node,
                role: Role::Secondary,
                disk: DiskState::Consistent,
                max_write: 1 << 20,
                checksum_alg: ChecksumAlg::Xxh3_128,
            },
            UuidsRepr {
                current: size,
                bitmap: 0,
                history: [0, 0],
                dirty_bits: 0,
                flags: 0,
            },
        )
    }

    fn id(local: &str, peer: &str, secret: &str) -> Identity {
        Identity {
            local: local.into(),
            peer: peer.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    /// Runs both sides of a handshake over loopback.
    fn both(
        a: Identity,
        b: Identity,
    ) -> (Result<Handshaken, PeerError>, Result<Handshaken, PeerError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            handshake(s, &b, || ours(2000))
        });
        let dialed = handshake(dial(addr).unwrap(), &a, || ours(1000));
        (dialed, accepting.join().unwrap())
    }

    #[test]
    fn the_right_secret_exchanges_parameters() {
        let (a, b) = both(id("alpha", "beta", "s3cret"), id("beta", "alpha", "s3cret"));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.params.size, 2000, "alpha learned beta's parameters");
        assert_eq!(b.uuids.current, 1000, "beta learned alpha's UUIDs");
        assert_ne!(
            a.resolve_conflicts, b.resolve_conflicts,
            "exactly one side resolves conflicts"
        );
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (a, b) = both(id("alpha", "beta", "right"), id("beta", "alpha", "wrong"));
        for r in [a, b] {
            assert!(
                matches!(
                    r,
                    Err(PeerError::AuthRejected | PeerError::AuthRefusedByPeer)
                ),
                "got {:?}",
                r.err()
            );
        }
    }

    #[test]
    fn an_unexpected_peer_name_is_refused() {
        let (a, _) = both(id("alpha", "beta", "s"), id("gamma", "alpha", "s"));
        assert!(matches!(a, Err(PeerError::WrongPeer(ref n, _)) if n == "gamma"));
    }

    #[test]
    fn a_peer_speaking_only_version_1_is_refused_by_name() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let old_peer = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut conn = Conn::new(s).unwrap();
            conn.version = 1;
            conn.send(Message::Hello(HelloRepr {
                min_version: 1,
                max_version: 1,
                nonce: [7; 32],
                name: "beta".into(),
            }))
            .unwrap();
            // Keep the socket open until the other side has decided.
            let _ = conn.recv();
        });
        let result = handshake(dial(addr).unwrap(), &id("alpha", "beta", "s"), || ours(1));
        assert!(
            matches!(result, Err(PeerError::Version(1, 1))),
            "got {:?}",
            result.err()
        );
        drop(result);
        old_peer.join().unwrap();
    }
}
