//! [`PeerLink`]: the send half of an established, authenticated peer connection, and the table
//! of requests still waiting for the peer's answer.
//!
//! Whoever needs an answer (a replicated write, a flush, a resync block) registers an id and
//! sends under one lock, so messages leave in the order they were registered; the connection's
//! reader completes the id when the ack arrives. When the link dies, [`PeerLink::fail_all`]
//! answers every waiter with [`AckKind::Failed`]: a lost peer turns writes into dirty bits, never
//! into a hang.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::repl::csum::Digest;
use crate::wire::repl::{AckKind, Message, MessageRepr, WriteDataRepr};

/// What a waiter learns: an acknowledgement, or the data it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `WriteAck` / `BarrierAck` (or `Failed` when the link died).
    Ack(AckKind),
    /// `ResyncData` answering a read request.
    Data(Vec<u8>),
    /// `Checksums` answering a checksum request: the peer's digest per 4 KiB block.
    Checksums(Vec<Digest>),
    /// `Checksums` answering a checksum request that asked the requester to checksum its own
    /// copy when the answer is applied (in stream order): the peer's and ours.
    Compared {
        /// The peer's digest per block.
        peer: Vec<Digest>,
        /// Ours, taken at the same point of the replication stream.
        local: Vec<Digest>,
    },
}

/// Where a waiter learns it.
pub type Answer = Receiver<Reply>;

struct Pending {
    waiter: Waiter,
    sent_at: Instant,
}

/// Who learns the answer to a request.
enum Waiter {
    /// A thread waiting on the request's [`Answer`].
    Channel(SyncSender<Reply>),
    /// A function called on the thread that receives the answer (see
    /// [`PeerLink::when_answered`]).
    Callback(Box<dyn FnOnce(Reply) + Send>),
}

impl Waiter {
    fn answer(self, reply: Reply) {
        match self {
            Waiter::Channel(tx) => {
                let _ = tx.try_send(reply);
            }
            Waiter::Callback(done) => done(reply),
        }
    }
}

struct Sender {
    stream: TcpStream,
    seq: u64,
    buf: Vec<u8>,
}

/// The send half of a peer connection plus its pending-answer table.
pub struct PeerLink {
    /// Identifies this connection in events (a reconnect gets a new id).
    pub conn_id: u64,
    /// The peer's node name.
    pub peer_name: String,
    version: u16,
    /// A second handle on the socket, so a dying link can shut it down even while a sender
    /// is blocked in `write`.
    control: Option<TcpStream>,
    sender: Mutex<Sender>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    dead: AtomicBool,
    last_heard: Mutex<Instant>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("conn_id", &self.conn_id)
            .field("peer_name", &self.peer_name)
            .field("dead", &self.is_dead())
            .finish_non_exhaustive()
    }
}

impl PeerLink {
    /// Wraps the write side of `stream`; `first_seq` is the next sequence number to send.
    pub fn new(
        conn_id: u64,
        peer_name: String,
        stream: TcpStream,
        version: u16,
        first_seq: u64,
    ) -> PeerLink {
        PeerLink {
            conn_id,
            peer_name,
            version,
            control: stream.try_clone().ok(),
            sender: Mutex::new(Sender {
                stream,
                seq: first_seq,
                buf: Vec::new(),
            }),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            last_heard: Mutex::new(Instant::now()),
        }
    }

    /// Whether the link failed (or was closed).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Sends one message. An error kills the link.
    pub fn send(&self, message: Message) -> std::io::Result<()> {
        let mut s = lock(&self.sender);
        self.send_locked(&mut s, message)
    }

    /// Sends one message if no other send is under way; `Ok(false)` if one is (nothing sent).
    /// For keepalives, which must never wait behind a sender blocked on a full socket.
    pub fn try_send(&self, message: Message) -> std::io::Result<bool> {
        let mut s = match self.sender.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        self.send_locked(&mut s, message).map(|()| true)
    }

    fn send_locked(&self, s: &mut Sender, message: Message) -> std::io::Result<()> {
        self.send_all_locked(s, std::iter::once(message))
    }

    /// Sends several messages with one write (acknowledgements of a burst of writes).
    pub fn send_all(&self, messages: impl IntoIterator<Item = Message>) -> std::io::Result<()> {
        let mut s = lock(&self.sender);
        self.send_all_locked(&mut s, messages)
    }

    fn send_all_locked(
        &self,
        s: &mut Sender,
        messages: impl IntoIterator<Item = Message>,
    ) -> std::io::Result<()> {
        if self.is_dead() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "peer link is down",
            ));
        }
        let Sender { stream, buf, seq } = s;
        buf.clear();
        let mut next_seq = *seq;
        for message in messages {
            let repr = MessageRepr {
                version: self.version,
                seq: next_seq,
                message,
            };
            let at = buf.len();
            buf.resize(at + repr.buffer_len(), 0);
            repr.emit(&mut crate::wire::repl::Packet::new_unchecked(
                &mut buf[at..],
            ));
            next_seq += 1;
        }
        match stream.write_all(buf) {
            Ok(()) => {
                *seq = next_seq;
                Ok(())
            }
            Err(e) => {
                self.fail_all();
                Err(e)
            }
        }
    }

    /// Registers a new request id and sends the message `build(id)` makes, atomically with
    /// respect to other sends. `None` if the link is down (nothing was sent).
    pub fn request(&self, build: impl FnOnce(u64) -> Message) -> Option<Answer> {
        let mut s = lock(&self.sender);
        let (id, answer) = self.register()?;
        // On an error fail_all has already answered the waiter.
        let _ = self.send_locked(&mut s, build(id));
        Some(answer)
    }

    /// [`request`](Self::request) for a `WriteData` of `data` at `offset`, sent from where the
    /// data lies rather than copied into a message first.
    /// Returns the request's id with its answer.
    pub fn request_write(&self, offset: u64, flags: u32, data: &[u8]) -> Option<(u64, Answer)> {
        let mut s = lock(&self.sender);
        let (id, answer) = self.register()?;
        let _ = self.send_write_locked(&mut s, id, offset, flags, data);
        Some((id, answer))
    }

    /// A `WriteData` that asks for no acknowledgement (id 0: protocol A).
    pub fn send_write(&self, offset: u64, flags: u32, data: &[u8]) -> std::io::Result<()> {
        let mut s = lock(&self.sender);
        self.send_write_locked(&mut s, 0, offset, flags, data)
    }

    /// A new request id with its waiter; `None` if the link is down. Call with the sender
    /// locked, so ids leave in the order they were registered.
    fn register(&self) -> Option<(u64, Answer)> {
        if self.is_dead() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        lock(&self.pending).insert(
            id,
            Pending {
                waiter: Waiter::Channel(tx),
                sent_at: Instant::now(),
            },
        );
        Some((id, rx))
    }

    fn send_write_locked(
        &self,
        s: &mut Sender,
        id: u64,
        offset: u64,
        flags: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        if self.is_dead() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "peer link is down",
            ));
        }
        let head = WriteDataRepr::emit_head(self.version, s.seq, id, offset, flags, data);
        match write_all_vectored(&mut s.stream, &head, data) {
            Ok(()) => {
                s.seq += 1;
                Ok(())
            }
            Err(e) => {
                self.fail_all();
                Err(e)
            }
        }
    }

    /// The peer answered request `id`.
    pub fn complete(&self, id: u64, reply: Reply) -> bool {
        let pending = lock(&self.pending).remove(&id);
        match pending {
            Some(p) => {
                p.waiter.answer(reply);
                true
            }
            None => false,
        }
    }

    /// Calls `done` with the answer to request `id` (registered with `answer`) on the thread
    /// that receives it, instead of a thread waiting for it; at once if it has come. Saves a
    /// thread hand-off per request.
    pub fn when_answered(&self, id: u64, answer: Answer, done: Box<dyn FnOnce(Reply) + Send>) {
        let mut pending = lock(&self.pending);
        if let Some(p) = pending.get_mut(&id) {
            p.waiter = Waiter::Callback(done);
            return;
        }
        drop(pending);
        // Answered already, or being answered this instant: the reply is (about to be) in
        // the channel; every answered waiter gets exactly one reply.
        done(answer.recv().unwrap_or(Reply::Ack(AckKind::Failed)));
    }

    /// When the oldest request still waiting was sent.
    pub fn oldest_pending(&self) -> Option<Instant> {
        lock(&self.pending).values().map(|p| p.sent_at).min()
    }

    /// Requests waiting for an answer.
    pub fn pending_count(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Something arrived from the peer.
    pub fn heard(&self) {
        *lock(&self.last_heard) = Instant::now();
    }

    /// When something last arrived from the peer.
    pub fn last_heard(&self) -> Instant {
        *lock(&self.last_heard)
    }

    /// Marks the link dead, shuts the socket down (which ends the reader) and answers every
    /// waiter with `Failed`. Returns how many were waiting.
    pub fn fail_all(&self) -> usize {
        self.dead.store(true, Ordering::Release);
        if let Some(c) = &self.control {
            let _ = c.shutdown(Shutdown::Both);
        }
        let drained: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        let count = drained.len();
        for p in drained {
            p.waiter.answer(Reply::Ack(AckKind::Failed));
        }
        count
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `head` then `data` with as few syscalls as the socket allows.
fn write_all_vectored(stream: &mut TcpStream, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    let mut slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(data)];
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match stream.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::repl::{FrameDecoder, PingRepr};
    use std::io::Read;
    use std::net::TcpListener;

    fn pair() -> (PeerLink, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (PeerLink::new(1, "peer".into(), a, 1, 0), b)
    }

    #[test]
    fn requests_are_framed_in_order_and_completed_by_id() {
        let (link, mut other) = pair();
        let a1 = link
            .request(|id| Message::Ping(PingRepr { cookie: id }))
            .unwrap();
        let a2 = link
            .request(|id| Message::Ping(PingRepr { cookie: id }))
            .unwrap();
        assert_eq!(link.pending_count(), 2);
        let mut dec = FrameDecoder::new().check_sequence(0);
        let mut cookies = Vec::new();
        let mut buf = [0u8; 256];
        while cookies.len() < 2 {
            let n = other.read(&mut buf).unwrap();
            dec.feed(&buf[..n]);
            while let Some(m) = dec.next_message().unwrap() {
                if let Message::Ping(p) = m.message {
                    cookies.push(p.cookie);
                }
            }
        }
        assert!(cookies[0] < cookies[1]);
        assert!(link.complete(cookies[1], Reply::Ack(AckKind::Completed)));
        assert!(
            !link.complete(cookies[1], Reply::Ack(AckKind::Completed)),
            "answered once"
        );
        assert_eq!(a2.recv().unwrap(), Reply::Ack(AckKind::Completed));
        assert!(a1.try_recv().is_err(), "the first is still pending");
        assert_eq!(link.fail_all(), 1);
        assert_eq!(a1.recv().unwrap(), Reply::Ack(AckKind::Failed));
        assert!(
            link.request(|_| Message::AuthOk).is_none(),
            "dead links send nothing"
        );
    }

    #[test]
    fn a_keepalive_never_waits_behind_a_sender_stuck_on_a_full_socket() {
        let (link, other) = pair();
        let link = std::sync::Arc::new(link);
        // Nobody reads `other`: a large write fills both socket buffers and blocks, holding
        // the sender.
        let writer = {
            let link = link.clone();
            std::thread::spawn(move || {
                let data = vec![7u8; 512 * 1024];
                for i in 0..64u64 {
                    if link.request_write(i * 512 * 1024, 0, &data).is_none() {
                        break;
                    }
                    if link.is_dead() {
                        break;
                    }
                }
            })
        };
        let started = Instant::now();
        while link.sender.try_lock().is_ok()
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let at = Instant::now();
        assert!(!link
            .try_send(Message::Ping(PingRepr { cookie: 0 }))
            .unwrap());
        assert!(at.elapsed() < std::time::Duration::from_secs(1));
        // Failing the link frees the stuck sender.
        link.fail_all();
        writer.join().unwrap();
        drop(other);
    }

    #[test]
    fn a_write_sent_from_its_buffer_arrives_as_one_write_data_message() {
        let (link, mut other) = pair();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let (_, answer) = link.request_write(4096, 0, &data).unwrap();
        let mut dec = FrameDecoder::new().check_sequence(0);
        let mut buf = [0u8; 4096];
        let got = loop {
            let n = other.read(&mut buf).unwrap();
            dec.feed(&buf[..n]);
            if let Some(m) = dec.next_message().unwrap() {
                break m.message;
            }
        };
        let Message::WriteData(w) = got else {
            panic!("not a WriteData: {got:?}")
        };
        assert_eq!((w.offset, w.data), (4096, data));
        assert!(link.complete(w.id, Reply::Ack(AckKind::Completed)));
        assert_eq!(answer.recv().unwrap(), Reply::Ack(AckKind::Completed));
    }
}
