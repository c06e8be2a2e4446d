//! The NBD listener and the transmission phase of each connection.
//!
//! # Structure
//!
//! [`Server::serve`] accepts connections until its `CancellationToken` fires, checks each
//! client against the [`Acl`], and runs every connection in its own task; a semaphore caps
//! how many run at once. Shutdown stops accepting, lets every connection finish the requests
//! it has already read, and returns when all connections are gone.
//!
//! # The transmission loop
//!
//! One task per connection owns both halves of the socket and loops:
//!
//! 1. read whatever the socket has (one `read` syscall can carry hundreds of requests) into
//!    an input buffer, and parse every complete request in it;
//! 2. admit each request through the export's [`Sequencer`](crate::block::Sequencer) in arrival order, then either
//!    run it **inline** on the connection's task, or hand it to tokio's **blocking pool**;
//! 3. collect finished pool requests from a channel;
//! 4. write every reply that is ready with one `writev`.
//!
//! Where a request runs, while the device is fast (a page cache):
//!
//! | request | runs |
//! |---------|------|
//! | read ≤ [`ServerConfig::inline_max`] | inline, read straight into the output buffer |
//! | write ≤ `inline_max` | inline, written straight from the input buffer |
//! | write ≤ [`ServerConfig::inline_write_max`] | payload read from the socket into a reused buffer of its own, then inline |
//! | larger reads and writes | the pool; those parsed from one input batch share one pool task |
//! | flush, FUA, trim, write-zeroes | the pool, one task each |
//! | anything whose ticket must wait for an earlier overlapping request | the pool, after waiting on the runtime (never on a pool thread) |
//!
//! A page-cache hit costs less than two thread hops, so the small-request path makes no copies
//! besides the kernel's, no allocations and no hops. When three plain reads or writes in a
//! row take longer than [`SLOW_OP`] (the device blocks: a disk, a cache miss, a remote
//! mirror), the connection sends everything to the pool, one task per request so they run in
//! parallel, for [`SLOW_BACKOFF`], then tries inline again. Large buffers are pooled per
//! connection, so big requests do not fault in fresh pages. Replies may leave out of order;
//! clients match them by handle.
//!
//! # The serve gate
//!
//! A reply leaves only while the export's [`ServeGate`](crate::ha::gate::ServeGate) allows
//! it: the gate is asked before every write to the socket. While it is closed the connection
//! holds its replies (and stops reading, as with a full output queue), looking again every
//! [`GATE_POLL`](super::export::GATE_POLL); if the server stops meanwhile, the connection is
//! closed with the replies unsent. The handshake holds the export's info the same way. Under
//! `on-no-quorum = io-error` ([`crate::ha::quorum`]), once the gate has been shut for
//! `on-no-quorum-timeout`, the replies held and not yet begun become `EIO` errors and new
//! requests get `EIO` without running.
//!
//! # Limits
//!
//! At most [`ServerConfig::max_in_flight`] requests and [`MAX_IN_FLIGHT_BYTES`] of payload
//! are offloaded per connection, and at most [`OUT_HIGH_WATER`] bytes of replies are queued;
//! beyond that the connection stops reading, which pushes back on the client through TCP.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::acl::Acl;
use super::export::{gate_opens_or_fails, Export, ExportError, ExportState};
use super::handshake::{negotiate, HandshakeError};
use super::op::{device_error, Op};
use super::outq::{write_some, OutQueue, BUF_CHUNK};
use crate::block::order::{Access, Ticket};
use crate::block::{check_range, BlockDevice};
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::nbd::{cmd_flags, errno, Command, RequestRepr, SimpleReplyRepr};

/// Largest payload accepted by default (32 MiB), advertised as the maximum block size.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Payload bytes a connection may have offloaded at once before it stops reading.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Queued reply bytes beyond which a connection writes before parsing more requests.
pub const OUT_HIGH_WATER: usize = 4 << 20;

/// A plain read or write slower than this (plus 1 ns per byte) counts as slow.
pub const SLOW_OP: Duration = Duration::from_micros(100);
/// Consecutive slow inline requests that mark the device slow. One slow request proves
/// little (the thread may have been preempted); a streak means the device blocks.
const SLOW_STREAK: u32 = 3;
/// How long a slow device is served from the pool only before inline is tried again.
pub const SLOW_BACKOFF: Duration = Duration::from_millis(20);
/// How long a connection may take to drain its replies once shutdown started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

static ACCEPT_LOG: LogLimiter = LogLimiter::network();
static CLIENT_LOG: LogLimiter = LogLimiter::network();
static QUORUM_LOG: LogLimiter = LogLimiter::network();

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests offloaded at once per connection.
    pub max_in_flight: usize,
    /// Largest read or write payload accepted (bytes).
    pub max_payload: u32,
    /// Largest read run inline on the connection's task (bytes); 0 disables inline reads.
    /// Writes up to this size are also run straight from the input buffer.
    pub inline_max: u32,
    /// Largest write run inline on the connection's task (bytes). Writes larger than
    /// `inline_max` have their payload read into a buffer of their own first.
    pub inline_write_max: u32,
    /// Time a client has to finish negotiation.
    pub handshake_timeout: Duration,
    /// Which clients may connect.
    pub acl: Acl,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_in_flight: 128,
            max_payload: DEFAULT_MAX_PAYLOAD,
            inline_max: 128 << 10,
            inline_write_max: 1 << 20,
            handshake_timeout: Duration::from_secs(30),
            acl: Acl::default(),
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted (after the ACL).
    pub connections: AtomicU64,
    /// Connections refused by the ACL.
    pub denied: AtomicU64,
    /// Connections that entered transmission.
    pub sessions: AtomicU64,
    /// Requests received in transmission.
    pub requests: AtomicU64,
    /// Reads and writes run inline on the connection's task.
    pub inline: AtomicU64,
    /// Requests run on the blocking pool.
    pub offloaded: AtomicU64,
    /// Requests answered with an error.
    pub error_replies: AtomicU64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: AtomicU64,
    /// Times a connection found the serve gate closed with replies to send, and held them.
    pub gate_holds: AtomicU64,
    /// Connections closed by a shutdown while holding replies the gate did not allow.
    pub gate_closes: AtomicU64,
}

/// An NBD server: a set of exports and the configuration to serve them with.
pub struct Server {
    pub(super) exports: Vec<Arc<ExportState>>,
    pub(super) config: Arc<ServerConfig>,
    pub(super) stats: Arc<ServerStats>,
}

impl Server {
    /// A server with no exports yet.
    pub fn new(config: ServerConfig) -> Self {
        Server {
            exports: Vec::new(),
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    /// Adds an export. Transmission flags follow the device's capabilities.
    pub fn add_export(&mut self, export: Export) -> Result<(), ExportError> {
        if self.exports.iter().any(|e| e.export.name == export.name) {
            return Err(ExportError::Duplicate(export.name));
        }
        let state = ExportState::new(export, self.config.max_payload)?;
        self.exports.push(Arc::new(state));
        Ok(())
    }

    /// The server's counters; they stay valid after [`Server::serve`] consumed the server.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serves clients from `listener` until `shutdown` is cancelled, then waits for every
    /// connection to finish its in-flight requests (at most a few seconds) and returns.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let max = self.config.max_connections.max(1);
        let permits = Arc::new(Semaphore::new(max));
        let exports: Arc<[Arc<ExportState>]> = self.exports.into();
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let (socket, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn_limited!(ACCEPT_LOG, error = %err, "nbd: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            if !self.config.acl.allows(peer.ip()) {
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                warn_limited!(CLIENT_LOG, %peer, "nbd: client refused by the allowlist");
                continue;
            }
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let exports = Arc::clone(&exports);
            let config = Arc::clone(&self.config);
            let stats = Arc::clone(&self.stats);
            let cancel = shutdown.child_token();
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(socket, peer, &exports, config, stats, cancel).await;
            });
        }
        drop(listener);
        // Every connection holds a permit until it is done.
        let _all = permits.acquire_many(max as u32).await;
        Ok(())
    }
}

async fn serve_connection(
    mut socket: TcpStream,
    peer: SocketAddr,
    exports: &[Arc<ExportState>],
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
) {
    let _ = socket.set_nodelay(true);
    let negotiated = tokio::select! {
        r = tokio::time::timeout(config.handshake_timeout, negotiate(&mut socket, exports)) => r,
        _ = cancel.cancelled() => return,
    };
    let export = match negotiated {
        Ok(Ok(n)) => n.export,
        Ok(Err(HandshakeError::Protocol(what))) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn_limited!(CLIENT_LOG, %peer, what, "nbd: bad handshake, closing");
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "nbd: negotiation ended");
            return;
        }
        Err(_) => {
            warn_limited!(CLIENT_LOG, %peer, "nbd: handshake timed out");
            return;
        }
    };
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, export = %export.export.name, "nbd: transmission started");
    let (rd, wr) = socket.into_split();
    match transmit(rd, wr, export, config, Arc::clone(&stats), cancel).await {
        Ok(()) => tracing::debug!(%peer, "nbd: connection closed"),
        Err(ConnError::Protocol(what)) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn_limited!(CLIENT_LOG, %peer, what, "nbd: protocol violation, closing");
        }
        Err(ConnError::Io(err)) => tracing::debug!(%peer, %err, "nbd: connection lost"),
    }
}

/// Runs the transmission phase on a negotiated connection until the client disconnects, the
/// connection fails, or `cancel` fires and the requests already read are answered.
///
/// Generic over the byte stream so that the fuzz target can drive it without sockets; the
/// server always passes the two halves of a `TcpStream`.
pub(super) async fn transmit<R, W>(
    rd: R,
    wr: W,
    export: Arc<ExportState>,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut conn = Connection {
        export,
        config,
        stats,
        rd,
        wr,
        inbuf: BytesMut::with_capacity(BUF_CHUNK),
        out: OutQueue::default(),
        done_tx,
        done_rx,
        batch: Vec::new(),
        batch_bytes: 0,
        offloaded: 0,
        offloaded_bytes: 0,
        skip: 0,
        skip_reply: None,
        pending: None,
        expect_large_write: false,
        reading: true,
        slow_until: None,
        slow_streak: 0,
        cancel,
    };
    conn.run().await
}

/// Why a connection ended other than by a clean disconnect.
#[derive(Debug)]
pub(super) enum ConnError {
    Io(io::Error),
    Protocol(&'static str),
}

impl From<io::Error> for ConnError {
    fn from(err: io::Error) -> Self {
        ConnError::Io(err)
    }
}

/// A finished offloaded request: its reply bytes and the payload bytes it held.
struct Done {
    reply: Vec<u8>,
    bytes: usize,
    payload: Option<Vec<u8>>,
    /// For plain reads and writes: whether the device took long enough to suggest it blocks
    /// (see [`SLOW_OP`]). Flushes, FUA and the like are slow by nature and say nothing.
    slow: Option<bool>,
}

/// A request admitted and ready to run on the blocking pool.
struct Job {
    op: Op,
    handle: u64,
    ticket: Ticket,
    bytes: usize,
}

/// Payload bytes collected into one batch before it is handed to the pool.
const BATCH_BYTES: usize = 4 << 20;

/// Runs `jobs` in order on the current (pool) thread and sends their replies in one message.
fn run_jobs(
    jobs: Vec<Job>,
    device: &dyn BlockDevice,
    stats: &ServerStats,
    tx: &mpsc::UnboundedSender<Vec<Done>>,
) {
    let mut done = Vec::with_capacity(jobs.len());
    for job in jobs {
        let timed = matches!(job.op, Op::Read { .. } | Op::Write { fua: false, .. });
        let started = Instant::now();
        let (reply, payload) = job.op.run(device, job.handle);
        drop(job.ticket);
        let slow =
            timed.then(|| started.elapsed() > SLOW_OP + Duration::from_nanos(job.bytes as u64));
        if SimpleReplyRepr::parse(&reply[..SimpleReplyRepr::LEN]).is_ok_and(|r| r.error != 0) {
            stats.error_replies.fetch_add(1, Ordering::Relaxed);
        }
        done.push(Done {
            reply,
            bytes: job.bytes,
            payload,
            slow,
        });
    }
    // The connection may be gone; the requests still ran, in order.
    let _ = tx.send(done);
}

/// A large write whose payload is being read straight into its own buffer.
struct PendingWrite {
    req: RequestRepr,
    buf: Vec<u8>,
    filled: usize,
}

struct Connection<R, W> {
    export: Arc<ExportState>,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
    rd: R,
    wr: W,
    inbuf: BytesMut,
    out: OutQueue,
    done_tx: mpsc::UnboundedSender<Vec<Done>>,
    done_rx: mpsc::UnboundedReceiver<Vec<Done>>,
    /// Ready large reads and writes parsed from the current input, run as one pool task.
    batch: Vec<Job>,
    batch_bytes: usize,
    /// Requests handed to the blocking pool and not yet collected.
    offloaded: usize,
    offloaded_bytes: usize,
    /// Bytes of a refused write's payload still to discard.
    skip: u64,
    /// Reply to send once the discarded payload has been consumed.
    skip_reply: Option<SimpleReplyRepr>,
    /// A large write waiting for the rest of its payload.
    pending: Option<PendingWrite>,
    /// The last request was a large write: read the next header in a small read, so that
    /// the next payload is not read into the input buffer only to be copied out again.
    expect_large_write: bool,
    /// False after EOF, `NBD_CMD_DISC` or shutdown: no more requests are parsed.
    reading: bool,
    /// While set and in the future, nothing runs inline.
    slow_until: Option<Instant>,
    /// Consecutive slow inline requests.
    slow_streak: u32,
    cancel: CancellationToken,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            self.process_input()?;
            while let Ok(done) = self.done_rx.try_recv() {
                self.collect(done);
            }
            if !self.out.is_empty() {
                self.write_out().await?;
                // Writing may have taken a while: pick up what finished meanwhile.
                continue;
            }
            if !self.reading && self.offloaded == 0 {
                let _ = self.wr.shutdown().await;
                return Ok(());
            }
            let can_read = self.reading
                && self.offloaded < self.config.max_in_flight
                && self.offloaded_bytes < MAX_IN_FLIGHT_BYTES;
            if can_read && self.inbuf.capacity() - self.inbuf.len() < 64 << 10 {
                self.inbuf.reserve(BUF_CHUNK);
            }
            let Connection {
                rd,
                inbuf,
                pending,
                expect_large_write,
                done_rx,
                cancel,
                reading,
                offloaded,
                ..
            } = self;
            let small_read = *expect_large_write && inbuf.is_empty();
            let read = async {
                match pending {
                    Some(p) => rd.read(&mut p.buf[p.filled..]).await,
                    None if small_read => rd.read_buf(&mut (&mut *inbuf).limit(4096)).await,
                    None => rd.read_buf(inbuf).await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if *reading => {
                    self.stop_reading();
                }
                done = done_rx.recv(), if *offloaded > 0 => {
                    if let Some(done) = done {
                        self.collect(done);
                    }
                }
                n = read, if can_read => {
                    match n {
                        Ok(0) | Err(_) => {
                            // The client is gone (or half-closed): finish what was read.
                            if self.skip > 0 || !self.inbuf.is_empty() || self.pending.is_some() {
                                tracing::debug!("nbd: client vanished mid-request");
                            }
                            self.stop_reading();
                        }
                        Ok(n) => {
                            if let Some(p) = &mut self.pending {
                                p.filled += n;
                                if p.filled == p.buf.len() {
                                    let p = self.pending.take().expect("checked");
                                    self.offload_write(p.req, p.buf);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn stop_reading(&mut self) {
        self.reading = false;
        self.inbuf.clear();
        self.skip = 0;
        self.skip_reply = None;
        self.pending = None;
    }

    fn collect(&mut self, done: Vec<Done>) {
        for d in done {
            self.offloaded -= 1;
            self.offloaded_bytes -= d.bytes;
            if let Some(buf) = d.payload {
                self.out.pool.give(buf);
            }
            self.out.push(d.reply);
            if let Some(slow) = d.slow {
                self.note_slow(slow);
            }
        }
    }

    /// Writes every queued reply, each write only while the serve gate allows it; during
    /// shutdown, gives up after a grace period (or at once while the gate is closed).
    async fn write_out(&mut self) -> io::Result<()> {
        let mut grace_ends: Option<Instant> = None;
        while !self.out.is_empty() {
            let gate = &self.export.export.gate;
            if !gate.may_answer() && gate.failing() {
                // on-no-quorum = io-error, past its bound: what is held fails (errors only go).
                let n = self.out.fail_unsent(errno::EIO);
                self.stats
                    .error_replies
                    .fetch_add(n as u64, Ordering::Relaxed);
                warn_limited!(QUORUM_LOG, failed = n, "nbd: on-no-quorum: the serve gate has been shut past on-no-quorum-timeout; held and new requests fail with EIO");
            } else if !gate.may_answer() {
                self.stats.gate_holds.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    biased;
                    _ = gate_opens_or_fails(gate) => {}
                    _ = self.cancel.cancelled() => {
                        self.stats.gate_closes.fetch_add(1, Ordering::Relaxed);
                        return Err(io::Error::other(
                            "stopping while the serve gate is closed: replies withheld",
                        ));
                    }
                }
                // Asked again right before the write.
                continue;
            }
            let write = write_some(&mut self.out, &mut self.wr);
            if grace_ends.is_none() && !self.cancel.is_cancelled() {
                tokio::select! {
                    biased;
                    r = write => r?,
                    // A write not finished wrote nothing: it is simply tried again.
                    _ = self.cancel.cancelled() => {}
                }
                continue;
            }
            let ends = *grace_ends.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
            match tokio::time::timeout_at(ends.into(), write).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client does not read replies",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Parses and dispatches every complete request in the input buffer, within the limits,
    /// then hands the batch of ready large requests to the pool.
    fn process_input(&mut self) -> Result<(), ConnError> {
        let result = self.parse_requests();
        self.flush_batch();
        result
    }

    fn parse_requests(&mut self) -> Result<(), ConnError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.inbuf.len() as u64);
                self.inbuf.advance(n as usize);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(());
                }
                if let Some(reply) = self.skip_reply.take() {
                    self.out.push_small(&reply.to_bytes());
                }
            }
            if !self.reading {
                self.inbuf.clear();
                return Ok(());
            }
            if self.pending.is_some()
                || self.offloaded >= self.config.max_in_flight
                || self.offloaded_bytes >= MAX_IN_FLIGHT_BYTES
                || self.out.bytes >= OUT_HIGH_WATER
                || self.inbuf.len() < RequestRepr::LEN
            {
                return Ok(());
            }
            let req = RequestRepr::parse(&self.inbuf[..RequestRepr::LEN])
                .map_err(|_| ConnError::Protocol("bad request magic"))?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.expect_large_write = false;
            if req.command == Command::Write {
                if let Some(error) = self.check(&req) {
                    // Consume and drop the payload, then answer.
                    self.inbuf.advance(RequestRepr::LEN);
                    self.skip = u64::from(req.length);
                    self.skip_reply = Some(SimpleReplyRepr {
                        error,
                        handle: req.handle,
                    });
                    self.stats.error_replies.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let len = req.length as usize;
                self.expect_large_write = len > self.config.inline_max as usize;
                if self.expect_large_write {
                    // Large: the payload goes straight into a reusable buffer of its own,
                    // read from the socket without passing through the input buffer.
                    self.inbuf.advance(RequestRepr::LEN);
                    let mut buf = self.out.pool.take(len);
                    let have = len.min(self.inbuf.len());
                    buf[..have].copy_from_slice(&self.inbuf[..have]);
                    self.inbuf.advance(have);
                    if have == len {
                        self.offload_write(req, buf);
                    } else {
                        self.pending = Some(PendingWrite {
                            req,
                            buf,
                            filled: have,
                        });
                    }
                    continue;
                }
                let total = RequestRepr::LEN + len;
                if self.inbuf.len() < total {
                    self.inbuf.reserve(total - self.inbuf.len());
                    return Ok(());
                }
            }
            self.dispatch(req);
        }
    }

    /// The NBD error for a request that must be refused, if any.
    fn check(&self, req: &RequestRepr) -> Option<u32> {
        if req.command != Command::Disconnect && self.export.export.gate.failing() {
            return Some(errno::EIO); // on-no-quorum = io-error: not run, not held
        }
        const KNOWN: u16 = cmd_flags::FUA
            | cmd_flags::NO_HOLE
            | cmd_flags::DF
            | cmd_flags::REQ_ONE
            | cmd_flags::FAST_ZERO;
        // DF and REQ_ONE need structured replies, FAST_ZERO is not advertised.
        if req.flags & !KNOWN != 0
            || req.flags & (cmd_flags::DF | cmd_flags::REQ_ONE | cmd_flags::FAST_ZERO) != 0
        {
            return Some(errno::EINVAL);
        }
        let e = &self.export;
        let in_range = check_range(e.size, req.offset, u64::from(req.length)).is_ok();
        match req.command {
            Command::Read => {
                if req.length > e.max_payload || !in_range {
                    return Some(errno::EINVAL);
                }
            }
            Command::Write | Command::WriteZeroes => {
                if req.command == Command::Write && req.length > e.max_payload {
                    return Some(errno::EINVAL);
                }
                if e.read_only {
                    return Some(errno::EPERM);
                }
                if !in_range {
                    return Some(errno::ENOSPC);
                }
            }
            Command::Trim => {
                if e.read_only {
                    return Some(errno::EPERM);
                }
                if !e.caps.discard || !in_range {
                    return Some(errno::EINVAL);
                }
            }
            Command::Flush | Command::Disconnect => {}
            Command::Cache | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                return Some(errno::EINVAL)
            }
        }
        None
    }

    fn inline_allowed(&mut self, len: usize) -> bool {
        if len > self.config.inline_max as usize {
            return false;
        }
        match self.slow_until {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                self.slow_until = None;
                true
            }
            None => true,
        }
    }

    fn note_inline_time(&mut self, started: Instant, len: usize) {
        self.stats.inline.fetch_add(1, Ordering::Relaxed);
        self.note_slow(started.elapsed() > SLOW_OP + Duration::from_nanos(len as u64));
    }

    fn is_slow(&self) -> bool {
        self.slow_until.is_some_and(|until| Instant::now() < until)
    }

    fn note_slow(&mut self, slow: bool) {
        if !slow {
            self.slow_streak = 0;
            return;
        }
        self.slow_streak += 1;
        if self.slow_streak >= SLOW_STREAK {
            self.slow_streak = 0;
            self.slow_until = Some(Instant::now() + SLOW_BACKOFF);
        }
    }

    fn error_reply(&mut self, handle: u64, error: u32) {
        self.stats.error_replies.fetch_add(1, Ordering::Relaxed);
        self.out
            .push_small(&SimpleReplyRepr { error, handle }.to_bytes());
    }

    /// Runs or offloads one complete request at the front of the input buffer.
    fn dispatch(&mut self, req: RequestRepr) {
        let handle = req.handle;
        if let Some(error) = self.check(&req) {
            self.inbuf.advance(RequestRepr::LEN);
            self.error_reply(handle, error);
            return;
        }
        let fua = req.flags & cmd_flags::FUA != 0;
        let len = req.length as usize;
        let device = Arc::clone(&self.export.export.device);
        match req.command {
            Command::Disconnect => {
                self.inbuf.advance(RequestRepr::LEN);
                self.reading = false;
            }
            Command::Read => {
                self.inbuf.advance(RequestRepr::LEN);
                let ticket = self.export.seq.admit(req.offset, len as u64, Access::Read);
                if self.inline_allowed(len) && ticket.is_ready() {
                    let started = Instant::now();
                    let buf = self.out.tail(SimpleReplyRepr::LEN + len);
                    let error = match device.read_at(&mut buf[SimpleReplyRepr::LEN..], req.offset) {
                        Ok(()) => 0,
                        Err(err) => device_error(&err),
                    };
                    drop(ticket);
                    SimpleReplyRepr { error, handle }.emit(&mut buf[..SimpleReplyRepr::LEN]);
                    if error != 0 {
                        self.out.shrink_tail(len);
                        self.stats.error_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    self.out
                        .mark(SimpleReplyRepr::LEN + if error == 0 { len } else { 0 });
                    self.note_inline_time(started, len);
                } else {
                    let buf = self.out.pool.take(SimpleReplyRepr::LEN + len);
                    self.offload(
                        Op::Read {
                            offset: req.offset,
                            buf,
                        },
                        handle,
                        ticket,
                        len,
                    );
                }
            }
            Command::Write => {
                let ticket = self.export.seq.admit(req.offset, len as u64, Access::Write);
                if !fua && self.inline_allowed(len) && ticket.is_ready() {
                    let started = Instant::now();
                    let data = &self.inbuf[RequestRepr::LEN..RequestRepr::LEN + len];
                    let error = match device.write_at(data, req.offset, false) {
                        Ok(()) => 0,
                        Err(err) => device_error(&err),
                    };
                    drop(ticket);
                    self.inbuf.advance(RequestRepr::LEN + len);
                    if error != 0 {
                        self.error_reply(handle, error);
                    } else {
                        self.out
                            .push_small(&SimpleReplyRepr { error, handle }.to_bytes());
                    }
                    self.note_inline_time(started, len);
                } else {
                    let mut data = self.out.pool.take(len);
                    data.copy_from_slice(&self.inbuf[RequestRepr::LEN..RequestRepr::LEN + len]);
                    self.inbuf.advance(RequestRepr::LEN + len);
                    self.offload(
                        Op::Write {
                            data,
                            offset: req.offset,
                            fua,
                        },
                        handle,
                        ticket,
                        len,
                    );
                }
            }
            Command::Flush => {
                self.inbuf.advance(RequestRepr::LEN);
                let ticket = self.export.seq.admit(0, 0, Access::Barrier);
                self.offload(Op::Flush, handle, ticket, 0);
            }
            Command::Trim => {
                self.inbuf.advance(RequestRepr::LEN);
                let ticket = self.export.seq.admit(req.offset, len as u64, Access::Write);
                self.offload(
                    Op::Trim {
                        offset: req.offset,
                        len: len as u64,
                    },
                    handle,
                    ticket,
                    0,
                );
            }
            Command::WriteZeroes => {
                self.inbuf.advance(RequestRepr::LEN);
                let ticket = self.export.seq.admit(req.offset, len as u64, Access::Write);
                let op = Op::Zeroes {
                    offset: req.offset,
                    len: len as u64,
                    fua,
                };
                self.offload(op, handle, ticket, 0);
            }
            // Refused by `check`.
            Command::Cache | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                unreachable!("checked above")
            }
        }
    }

    /// Offloads a large write whose payload is complete in `data`.
    fn offload_write(&mut self, req: RequestRepr, data: Vec<u8>) {
        let len = data.len();
        let ticket = self.export.seq.admit(req.offset, len as u64, Access::Write);
        let fua = req.flags & cmd_flags::FUA != 0;
        if !fua
            && len <= self.config.inline_write_max as usize
            && !self.is_slow()
            && ticket.is_ready()
        {
            // Cheaper than two thread hops while the device is a page cache.
            let started = Instant::now();
            let device = Arc::clone(&self.export.export.device);
            let error = match device.write_at(&data, req.offset, false) {
                Ok(()) => 0,
                Err(err) => device_error(&err),
            };
            drop(ticket);
            self.out.pool.give(data);
            if error != 0 {
                self.error_reply(req.handle, error);
            } else {
                let reply = SimpleReplyRepr {
                    error,
                    handle: req.handle,
                };
                self.out.push_small(&reply.to_bytes());
            }
            self.note_inline_time(started, len);
            return;
        }
        self.offload(
            Op::Write {
                data,
                offset: req.offset,
                fua,
            },
            req.handle,
            ticket,
            len,
        );
    }

    fn offload(&mut self, op: Op, handle: u64, ticket: Ticket, bytes: usize) {
        self.stats.offloaded.fetch_add(1, Ordering::Relaxed);
        self.offloaded += 1;
        self.offloaded_bytes += bytes;
        // Large plain reads and writes that can run now share one pool task per input batch
        // while the device is fast: one thread hop for many requests. Everything else (and
        // everything while the device is slow) gets a task of its own, so they run in parallel.
        let batchable = matches!(op, Op::Read { .. } | Op::Write { fua: false, .. })
            && !self.is_slow()
            && ticket.is_ready();
        let job = Job {
            op,
            handle,
            ticket,
            bytes,
        };
        if batchable {
            self.batch.push(job);
            self.batch_bytes += bytes;
            if self.batch_bytes >= BATCH_BYTES {
                self.flush_batch();
            }
            return;
        }
        let device = Arc::clone(&self.export.export.device);
        let stats = Arc::clone(&self.stats);
        let tx = self.done_tx.clone();
        let run = move |job: Job| run_jobs(vec![job], &*device, &stats, &tx);
        if job.ticket.is_ready() {
            tokio::task::spawn_blocking(move || run(job));
        } else {
            // Wait on the runtime, not on a pool thread: pool threads only ever run requests
            // that can proceed, so a full pool cannot deadlock on ordering.
            tokio::spawn(async move {
                job.ticket.wait_async().await;
                tokio::task::spawn_blocking(move || run(job));
            });
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let jobs = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let device = Arc::clone(&self.export.export.device);
        let stats = Arc::clone(&self.stats);
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || run_jobs(jobs, &*device, &stats, &tx));
    }
}
