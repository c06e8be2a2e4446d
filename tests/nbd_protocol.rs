//! The NBD export spoken to with raw bytes: handshake, every command, bad input, and
//! concurrency. Each test starts a server on 127.0.0.1:0 over a test device.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use twinblade::block::{
    check_range, BlockDevice, BlockError, Capabilities, FaultyDevice, IoKind, NullDevice,
};
use twinblade::export::nbd::{Acl, Export, Server, ServerConfig, ServerStats};
use twinblade::ha::clock::LeaseClock;
use twinblade::ha::gate::{Authority, ServeGate};
use twinblade::wire::nbd::{
    client_flags, cmd_flags, errno, info, opt, rep, transmission_flags as tf, Command,
    GreetingRepr, InfoRepr, InfoRequestRepr, OptionReplyRepr, OptionRequestRepr, RequestRepr,
    ServerRepr, SimpleReplyRepr,
};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

/// An in-memory device; reads of `[slow.0, slow.1)` sleep `slow.2` first.
struct MemDevice {
    data: Mutex<Vec<u8>>,
    slow: Mutex<Option<(u64, u64, Duration)>>,
}

impl MemDevice {
    fn new(size: u64) -> Self {
        MemDevice {
            data: Mutex::new(vec![0; size as usize]),
            slow: Mutex::new(None),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            discard: true,
            write_zeroes: true,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let slow = *self.slow.lock().unwrap();
        if let Some((a, b, d)) = slow {
            if offset < b && a < offset + buf.len() as u64 {
                std::thread::sleep(d);
            }
        }
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, src: &[u8], offset: u64, _fua: bool) -> Result<(), BlockError> {
        check_range(self.size(), offset, src.len() as u64)?;
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BlockError> {
        check_range(self.size(), offset, len)?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

struct TestServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    stats: Arc<ServerStats>,
}

impl TestServer {
    async fn start(exports: Vec<Export>, config: ServerConfig) -> Self {
        let mut server = Server::new(config);
        for e in exports {
            server.add_export(e).unwrap();
        }
        let stats = server.stats();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.serve(listener, stop.clone()));
        TestServer {
            addr,
            stop,
            task,
            stats,
        }
    }

    async fn one(device: Arc<dyn BlockDevice>) -> Self {
        Self::start(vec![Export::new("disk", device)], ServerConfig::default()).await
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A raw-bytes client.
struct Client {
    s: TcpStream,
    size: u64,
    flags: u16,
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let h = OptionRequestRepr {
        option,
        length: data.len() as u32,
    };
    let mut b = vec![0u8; h.buffer_len()];
    h.emit(&mut b);
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

async fn read_option_reply(s: &mut TcpStream) -> (OptionReplyRepr, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    let r = OptionReplyRepr::parse(&h).unwrap();
    let mut data = vec![0u8; r.length as usize];
    s.read_exact(&mut data).await.unwrap();
    (r, data)
}

async fn greet(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    GreetingRepr::parse(&g).unwrap();
    s.write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    s
}

/// Sends INFO or GO for `name`; returns the infos, or the error reply type.
async fn info_or_go(s: &mut TcpStream, option: u32, name: &str) -> Result<Vec<InfoRepr>, u32> {
    let req = InfoRequestRepr {
        name: name.into(),
        requests: vec![info::NAME, info::BLOCK_SIZE],
    };
    let mut data = vec![0u8; req.buffer_len()];
    req.emit(&mut data);
    send_option(s, option, &data).await;
    let mut infos = Vec::new();
    loop {
        let (r, data) = read_option_reply(s).await;
        assert_eq!(r.option, option);
        match r.reply_type {
            rep::INFO => infos.push(InfoRepr::parse(&data).unwrap()),
            rep::ACK => return Ok(infos),
            other => return Err(other),
        }
    }
}

impl Client {
    async fn connect(addr: SocketAddr, name: &str) -> Client {
        let mut s = greet(addr).await;
        let infos = info_or_go(&mut s, opt::GO, name)
            .await
            .expect("GO accepted");
        let (size, flags) = infos
            .iter()
            .find_map(|i| match i {
                InfoRepr::Export { size, flags } => Some((*size, *flags)),
                _ => None,
            })
            .expect("NBD_INFO_EXPORT");
        Client { s, size, flags }
    }

    async fn send(&mut self, command: Command, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = RequestRepr {
            flags,
            command,
            handle,
            offset,
            length,
        };
        let mut b = [0u8; 28];
        r.emit(&mut b);
        self.s.write_all(&b).await.unwrap();
    }

    async fn send_write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        let r = RequestRepr {
            flags,
            command: Command::Write,
            handle,
            offset,
            length: data.len() as u32,
        };
        let mut b = vec![0u8; 28];
        r.emit(&mut b);
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    async fn reply(&mut self) -> SimpleReplyRepr {
        let mut b = [0u8; 16];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        SimpleReplyRepr::parse(&b).unwrap()
    }

    async fn data(&mut self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        b
    }

    /// One request, waiting for its reply; returns the error.
    async fn call(&mut self, command: Command, flags: u16, offset: u64, length: u32) -> u32 {
        self.send(command, flags, 1, offset, length).await;
        let r = self.reply().await;
        assert_eq!(r.handle, 1);
        r.error
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(Command::Read, 0, 2, offset, len).await;
        let r = self.reply().await;
        assert_eq!(r.handle, 2);
        if r.error != 0 {
            return Err(r.error);
        }
        Ok(self.data(len as usize).await)
    }

    async fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.send_write(flags, 3, offset, data).await;
        let r = self.reply().await;
        assert_eq!(r.handle, 3);
        r.error
    }

    /// Sends NBD_CMD_DISC and expects the server to close.
    async fn disconnect(mut self) {
        self.send(Command::Disconnect, 0, 9, 0, 0).await;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(TIMEOUT, self.s.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "server must close after NBD_CMD_DISC");
    }
}

async fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(TIMEOUT, s.read(&mut b))
            .await
            .expect("server closes")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_reports_size_flags_and_block_sizes() {
    let srv = TestServer::one(Arc::new(NullDevice::new(64 * MIB))).await;
    let mut s = greet(srv.addr).await;
    let infos = info_or_go(&mut s, opt::INFO, "disk").await.unwrap();
    assert!(infos.contains(&InfoRepr::Name("disk".into())));
    assert!(infos.contains(&InfoRepr::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20
    }));
    let flags = infos
        .iter()
        .find_map(|i| match i {
            InfoRepr::Export { size, flags } => {
                assert_eq!(*size, 64 * MIB);
                Some(*flags)
            }
            _ => None,
        })
        .unwrap();
    for f in [
        tf::HAS_FLAGS,
        tf::SEND_FLUSH,
        tf::SEND_FUA,
        tf::SEND_TRIM,
        tf::SEND_WRITE_ZEROES,
        tf::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & tf::READ_ONLY, 0);
    // Unknown export: an error, and the option haggling goes on.
    assert_eq!(
        info_or_go(&mut s, opt::GO, "nope").await,
        Err(rep::ERR_UNKNOWN)
    );
    // Structured replies are refused, so clients use simple replies.
    send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, rep::ERR_UNSUP);
    // LIST names the export.
    send_option(&mut s, opt::LIST, &[]).await;
    let (r, data) = read_option_reply(&mut s).await;
    assert_eq!(r.reply_type, rep::SERVER);
    assert_eq!(ServerRepr::parse(&data).unwrap().name, "disk");
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, rep::ACK);
    // The empty name selects the default export.
    assert!(info_or_go(&mut s, opt::GO, "").await.is_ok());
    let mut c = Client {
        s,
        size: 64 * MIB,
        flags,
    };
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    c.disconnect().await;
    // ABORT ends negotiation politely.
    let mut s = greet(srv.addr).await;
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, rep::ACK);
    assert_closed(&mut s).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_fua_reach_the_device() {
    let dev = Arc::new(FaultyDevice::new(NullDevice::new(16 * MIB)));
    let srv = TestServer::one(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    assert_eq!(c.write(0, 0, &[1; 4096]).await, 0);
    assert_eq!(dev.fua_writes(), 0);
    assert_eq!(c.write(cmd_flags::FUA, 8192, &[2; 4096]).await, 0);
    assert_eq!(dev.fua_writes(), 1);
    assert_eq!(dev.flushes(), 0);
    assert_eq!(c.call(Command::Flush, 0, 0, 0).await, 0);
    assert_eq!(dev.flushes(), 1);
    // Write-zeroes with FUA, and trim, reach the device too.
    assert_eq!(
        c.call(Command::WriteZeroes, cmd_flags::FUA, 0, 8192).await,
        0
    );
    assert_eq!(c.call(Command::Trim, 0, MIB, MIB as u32).await, 0);
    let records = dev.records();
    let kinds: Vec<(IoKind, bool)> = records.iter().map(|r| (r.kind, r.fua)).collect();
    assert_eq!(
        kinds,
        vec![
            (IoKind::Write, false),
            (IoKind::Write, true),
            (IoKind::Flush, false),
            (IoKind::WriteZeroes, true),
            (IoKind::Discard, false)
        ]
    );
    assert_eq!((records[1].offset, records[1].len), (8192, 4096));
    c.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_round_trips_and_writes_are_ordered() {
    let dev = Arc::new(MemDevice::new(8 * MIB));
    let srv = TestServer::one(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    assert_eq!(c.size, 8 * MIB);
    assert_eq!(c.flags & tf::READ_ONLY, 0);
    let a = pattern(100_000, 7);
    assert_eq!(c.write(0, 12345, &a).await, 0);
    assert_eq!(c.read(12345, a.len() as u32).await.unwrap(), a);
    // Pipelined overlapping writes of mixed sizes and paths land in order: 1 MiB writes
    // (payload read into a buffer of its own), half of them FUA (run on the pool), and 4 KiB
    // writes (inline once the overlapping earlier write is done, else on the pool).
    for i in 0..40u64 {
        let (len, flags) = match i % 6 {
            1 => (1 << 20, cmd_flags::FUA),
            4 => (1 << 20, 0),
            _ => (4096, 0),
        };
        c.send_write(flags, 100 + i, 0, &pattern(len, i as u8))
            .await;
    }
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let r = c.reply().await;
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.handle));
    }
    let got = c.read(0, 4096).await.unwrap();
    assert!(got == pattern(4096, 39), "overlapping writes reordered");
    // Beyond 4 KiB, the last 1 MiB write (i = 37, FUA) wins; i = 38 and 39 were 4 KiB.
    let tail = c.read(4096, 4096).await.unwrap();
    assert!(
        tail == pattern(1 << 20, 37)[4096..8192],
        "overlapping writes reordered"
    );
    // Write-zeroes and trim read back as zeros.
    assert_eq!(
        c.call(Command::WriteZeroes, cmd_flags::NO_HOLE, 12345, 1000)
            .await,
        0
    );
    assert_eq!(c.read(12345, 1000).await.unwrap(), vec![0; 1000]);
    c.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_oversized_and_unknown_requests_get_errors() {
    let srv = TestServer::one(Arc::new(NullDevice::new(MIB))).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    // Out of range.
    assert_eq!(c.read(MIB - 512, 1024).await, Err(errno::EINVAL));
    assert_eq!(c.read(u64::MAX - 10, 512).await, Err(errno::EINVAL));
    assert_eq!(c.write(0, MIB, &[0; 512]).await, errno::ENOSPC);
    assert_eq!(c.call(Command::WriteZeroes, 0, MIB, 1).await, errno::ENOSPC);
    assert_eq!(c.call(Command::Trim, 0, MIB - 1, 2).await, errno::EINVAL);
    // Oversized: a read larger than the maximum, and a write whose payload is consumed.
    assert_eq!(c.read(0, 64 << 20).await, Err(errno::EINVAL));
    assert_eq!(
        c.write(0, 0, &vec![0xee; (32 << 20) + 1]).await,
        errno::EINVAL
    );
    // Unknown commands and flags, and commands that need unnegotiated features.
    assert_eq!(c.call(Command::Unknown(99), 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.call(Command::Cache, 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.call(Command::BlockStatus, 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.call(Command::Read, 0x8000, 0, 512).await, errno::EINVAL);
    assert_eq!(
        c.call(Command::Read, cmd_flags::DF, 0, 512).await,
        errno::EINVAL
    );
    assert_eq!(
        c.call(Command::WriteZeroes, cmd_flags::FAST_ZERO, 0, 512)
            .await,
        errno::EINVAL
    );
    // The connection still works.
    assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);
    c.disconnect().await;
    assert!(srv.stats.error_replies.load(Ordering::Relaxed) >= 13);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let dev = Arc::new(FaultyDevice::new(NullDevice::new(MIB)));
    let mut export = Export::new("ro", dev.clone());
    export.read_only = true;
    let srv = TestServer::start(vec![export], ServerConfig::default()).await;
    let mut c = Client::connect(srv.addr, "ro").await;
    assert_ne!(c.flags & tf::READ_ONLY, 0);
    assert_eq!(c.flags & (tf::SEND_TRIM | tf::SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, 0, &[1; 4096]).await, errno::EPERM);
    assert_eq!(c.call(Command::WriteZeroes, 0, 0, 4096).await, errno::EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 4096).await, errno::EPERM);
    assert!(c.read(0, 4096).await.is_ok());
    assert!(dev.records().iter().all(|r| r.kind == IoKind::Read));
    c.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let srv = TestServer::one(Arc::new(NullDevice::new(MIB))).await;
    let mut good = Client::connect(srv.addr, "disk").await;

    // Garbage instead of client flags.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(&[0xff; 64]).await.unwrap();
    assert_closed(&mut s).await;
    // Garbage instead of an option.
    let mut s = greet(srv.addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_closed(&mut s).await;
    // A huge option length.
    let mut s = greet(srv.addr).await;
    let h = OptionRequestRepr {
        option: opt::GO,
        length: u32::MAX,
    };
    let mut b = [0u8; 16];
    h.emit(&mut b);
    s.write_all(&b).await.unwrap();
    assert_closed(&mut s).await;
    // Malformed GO data gets an error reply, then the client can still choose.
    let mut s = greet(srv.addr).await;
    send_option(&mut s, opt::GO, &[0, 0, 0, 200, 1]).await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        rep::ERR_INVALID
    );
    assert!(info_or_go(&mut s, opt::GO, "disk").await.is_ok());
    // Garbage in transmission.
    s.write_all(&[0x42; 28]).await.unwrap();
    assert_closed(&mut s).await;

    assert_eq!(good.read(0, 4096).await.unwrap(), vec![0; 4096]);
    assert!(srv.stats.protocol_errors.load(Ordering::Relaxed) >= 3);
    good.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanishing_clients_do_not_stall_others() {
    let dev = Arc::new(MemDevice::new(8 * MIB));
    let srv = TestServer::one(dev.clone()).await;
    let mut good = Client::connect(srv.addr, "disk").await;
    for round in 0..5u8 {
        // Half a write payload, then gone.
        let mut c = Client::connect(srv.addr, "disk").await;
        let r = RequestRepr {
            flags: 0,
            command: Command::Write,
            handle: 1,
            offset: 0,
            length: 1 << 20,
        };
        let mut b = vec![0u8; 28];
        r.emit(&mut b);
        b.extend_from_slice(&[round; 1000]);
        c.s.write_all(&b).await.unwrap();
        drop(c);
        // Half a request header, then gone.
        let mut c = Client::connect(srv.addr, "disk").await;
        c.s.write_all(&b[..13]).await.unwrap();
        drop(c);
        // Many requests, replies never read.
        let mut c = Client::connect(srv.addr, "disk").await;
        for h in 0..64 {
            c.send(Command::Read, 0, h, 0, 128 << 10).await;
        }
        drop(c);
        // Gone during the handshake.
        let mut s = greet(srv.addr).await;
        s.write_all(&b[..5]).await.unwrap();
        drop(s);
        let data = pattern(8192, round);
        assert_eq!(good.write(0, 4096, &data).await, 0);
        assert_eq!(good.read(4096, 8192).await.unwrap(), data);
    }
    // The half-sent write never reached the device.
    assert_eq!(good.read(0, 1000).await.unwrap(), vec![0; 1000]);
    good.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_with_out_of_order_replies() {
    let dev = Arc::new(MemDevice::new(16 * MIB));
    dev.write_at(&pattern(16 << 20, 3), 0, false).unwrap();
    *dev.slow.lock().unwrap() = Some((0, MIB, Duration::from_secs(1)));
    let srv = TestServer::one(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    // A slow large read first, then 200 small reads elsewhere: the small ones finish first.
    c.send(Command::Read, 0, 0, 0, MIB as u32).await;
    let mut want = HashMap::new();
    want.insert(0u64, (0u64, MIB as usize));
    for h in 1..=200u64 {
        let offset = MIB + h * 40_000;
        c.send(Command::Read, 0, h, offset, 4096).await;
        want.insert(h, (offset, 4096));
    }
    let full = pattern(16 << 20, 3);
    let mut order = Vec::new();
    while !want.is_empty() {
        let r = c.reply().await;
        assert_eq!(r.error, 0);
        let (offset, len) = want.remove(&r.handle).expect("one reply per handle");
        let data = c.data(len).await;
        assert_eq!(
            data,
            full[offset as usize..offset as usize + len],
            "handle {}",
            r.handle
        );
        order.push(r.handle);
    }
    assert_ne!(order[0], 0, "the slow read should not hold up the others");
    assert_eq!(*order.last().unwrap(), 0);
    c.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_at_once() {
    let dev = Arc::new(MemDevice::new(16 * MIB));
    let srv = TestServer::one(dev.clone()).await;
    let mut tasks = Vec::new();
    for k in 0..8u64 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, "disk").await;
            let base = k * 2 * MIB;
            for i in 0..16u64 {
                let data = pattern(64 << 10, (k * 16 + i) as u8);
                c.send_write(0, i, base + i * (64 << 10), &data).await;
            }
            for _ in 0..16 {
                assert_eq!(c.reply().await.error, 0);
            }
            for i in 0..16u64 {
                let got = c.read(base + i * (64 << 10), 64 << 10).await.unwrap();
                assert_eq!(got, pattern(64 << 10, (k * 16 + i) as u8));
            }
            c.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(srv.stats.sessions.load(Ordering::Relaxed), 8);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_refuses_other_addresses() {
    let config = ServerConfig {
        acl: Acl::new(vec!["10.0.0.0/8".parse().unwrap()]),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(
        vec![Export::new("", Arc::new(NullDevice::new(MIB)))],
        config,
    )
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    assert_closed(&mut s).await;
    assert_eq!(srv.stats.denied.load(Ordering::Relaxed), 1);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_admits_listed_networks() {
    let config = ServerConfig {
        acl: Acl::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ]),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(
        vec![Export::new("disk", Arc::new(NullDevice::new(MIB)))],
        config,
    )
    .await;
    let mut c = Client::connect(srv.addr, "disk").await;
    assert_eq!(c.read(0, 512).await.unwrap(), vec![0; 512]);
    c.disconnect().await;
    assert_eq!(srv.stats.denied.load(Ordering::Relaxed), 0);
    assert_eq!(srv.stats.sessions.load(Ordering::Relaxed), 1);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let dev = Arc::new(FaultyDevice::new(NullDevice::new(MIB)));
    dev.set_flush_delay(Duration::from_millis(200));
    let srv = TestServer::one(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    c.send(Command::Flush, 0, 5, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.stop.cancel();
    let r = c.reply().await;
    assert_eq!((r.handle, r.error), (5, 0));
    assert_closed(&mut c.s).await;
    tokio::time::timeout(TIMEOUT, srv.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A small deterministic PRNG (xorshift64*), so the model test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The `nbd` crate's synchronous client (old-style `NBD_OPT_EXPORT_NAME` negotiation with the
/// 124 zero bytes) against an in-memory model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_crate_client_matches_a_model() {
    const SIZE: usize = 4 << 20;
    let dev = Arc::new(MemDevice::new(SIZE as u64));
    let srv = TestServer::one(dev.clone()).await;
    let addr = srv.addr;
    let model = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let export = nbd::client::handshake(&mut tcp, b"disk").unwrap();
        assert_eq!(export.size, SIZE as u64);
        assert!(export.send_flush && export.send_trim && !export.readonly);
        let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
        let mut model = vec![0u8; SIZE];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let len = 1 + rng.below(200_000);
            let offset = rng.below(SIZE - len);
            if rng.next().is_multiple_of(2) {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                client.seek(SeekFrom::Start(offset as u64)).unwrap();
                client.write_all(&data).unwrap();
                model[offset..offset + len].copy_from_slice(&data);
            } else {
                let mut got = vec![0u8; len];
                client.seek(SeekFrom::Start(offset as u64)).unwrap();
                client.read_exact(&mut got).unwrap();
                assert!(
                    got == model[offset..offset + len],
                    "read at {offset} len {len}"
                );
            }
        }
        client.flush().unwrap();
        model
    })
    .await
    .unwrap();
    let mut all = vec![0u8; SIZE];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "device differs from the model");
    srv.shutdown().await;
}

/// An export behind a serve gate that starts open (so the handshake goes through).
async fn gated_server(dev: Arc<dyn BlockDevice>) -> (TestServer, Arc<ServeGate>) {
    let gate = ServeGate::new(LeaseClock::new());
    gate.set(Authority::Open);
    let export = Export {
        gate: gate.clone(),
        ..Export::new("disk", dev)
    };
    (
        TestServer::start(vec![export], ServerConfig::default()).await,
        gate,
    )
}

/// Waits until the server has held replies `count` times (the connection is then waiting
/// on the gate with its replies queued and unsent).
async fn wait_for_gate_holds(stats: &ServerStats, count: u64) {
    tokio::time::timeout(TIMEOUT, async {
        while stats.gate_holds.load(Ordering::Relaxed) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the connection never held its replies");
}

fn nothing_to_read(s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_holds_replies_until_it_opens() {
    let dev = Arc::new(MemDevice::new(MIB));
    let (srv, gate) = gated_server(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;

    gate.set(Authority::Closed);
    c.send_write(0, 7, 4096, &pattern(4096, 3)).await;
    c.send(Command::Read, 0, 8, 4096, 4096).await;
    wait_for_gate_holds(&srv.stats, 1).await;
    assert!(nothing_to_read(&c.s), "a reply left through a closed gate");

    gate.set(Authority::Open);
    let first = c.reply().await;
    assert_eq!(
        (first.handle, first.error),
        (7, 0),
        "the write's reply, released"
    );
    let second = c.reply().await;
    assert_eq!((second.handle, second.error), (8, 0));
    assert_eq!(c.data(4096).await, pattern(4096, 3));
    assert_eq!(srv.stats.gate_closes.load(Ordering::Relaxed), 0);
    c.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_holds_the_export_info_of_the_handshake() {
    let dev = Arc::new(MemDevice::new(MIB));
    let (srv, gate) = gated_server(dev).await;
    gate.set(Authority::Closed);
    let mut s = greet(srv.addr).await;
    let req = InfoRequestRepr {
        name: "disk".into(),
        requests: vec![],
    };
    let mut data = vec![0u8; req.buffer_len()];
    req.emit(&mut data);
    send_option(&mut s, opt::GO, &data).await;
    // Not a bound on anything: a correct server sends nothing here however long we wait.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        nothing_to_read(&s),
        "export info left through a closed gate"
    );
    gate.set(Authority::Open);
    let (r, _) = read_option_reply(&mut s).await;
    assert_eq!(r.reply_type, rep::INFO);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_with_a_closed_gate_closes_without_replying() {
    let dev = Arc::new(MemDevice::new(MIB));
    let (srv, gate) = gated_server(dev).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    gate.set(Authority::Closed);
    c.send(Command::Read, 0, 5, 0, 512).await;
    wait_for_gate_holds(&srv.stats, 1).await;
    srv.stop.cancel();
    let mut b = Vec::new();
    tokio::time::timeout(TIMEOUT, c.s.read_to_end(&mut b))
        .await
        .expect("server closes")
        .ok();
    assert!(b.is_empty(), "{} bytes left through a closed gate", b.len());
    assert_eq!(srv.stats.gate_closes.load(Ordering::Relaxed), 1);
    tokio::time::timeout(TIMEOUT, srv.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_error_fails_held_replies_and_new_requests_while_the_gate_stays_shut() {
    use twinblade::ha::quorum::OnNoQuorum;
    let dev = Arc::new(MemDevice::new(MIB));
    let (srv, gate) = gated_server(dev.clone()).await;
    let mut c = Client::connect(srv.addr, "disk").await;
    // Bounded, but not yet past the bound: held as under suspend-io.
    gate.set_on_no_quorum(OnNoQuorum::IoError {
        after: Duration::from_secs(3600),
    });
    gate.set(Authority::Closed);
    c.send_write(0, 7, 4096, &pattern(4096, 3)).await;
    c.send(Command::Read, 0, 8, 4096, 4096).await;
    wait_for_gate_holds(&srv.stats, 1).await;
    assert!(nothing_to_read(&c.s), "a reply left through a closed gate");
    // Past the bound (a bound of zero: the gate has been shut that long already).
    gate.set_on_no_quorum(OnNoQuorum::IoError {
        after: Duration::ZERO,
    });
    for handle in [7, 8] {
        let r = c.reply().await;
        assert_eq!((r.handle, r.error), (handle, errno::EIO), "no data follows");
    }
    // New requests fail at once, without reaching the device.
    c.send_write(0, 9, 8192, &pattern(4096, 5)).await;
    let r = c.reply().await;
    assert_eq!((r.handle, r.error), (9, errno::EIO));
    assert_eq!(c.read(8192, 4096).await, Err(errno::EIO));
    // Open again: answered as ever; the failed write never ran.
    gate.set(Authority::Open);
    assert_eq!(c.read(8192, 4096).await, Ok(vec![0; 4096]));
    assert_eq!(c.write(0, 8192, &pattern(4096, 6)).await, 0);
    assert_eq!(c.read(8192, 4096).await, Ok(pattern(4096, 6)));
    c.disconnect().await;
    srv.shutdown().await;
}
