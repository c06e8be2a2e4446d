//! `tcp-bench`: raw TCP throughput and round trips between two hosts, for benchmarks.
//!
//! The lab has no iperf3, socat or nc; this is the yardstick for the replication link. It
//! shares no code with twinblade (only `aoe-init`'s size parser): plain `std::net` sockets with
//! `TCP_NODELAY` (as the replication link sets), one connection, one stream.
//!
//! ```text
//! tcp-bench serve BIND_ADDR:PORT                        # answers clients until killed
//! tcp-bench stream ADDR:PORT --msg 256K --bytes 1G      # one-way throughput
//! tcp-bench rr ADDR:PORT --msg 8704 --window 1 --count 5000   # messages each answered by an
//!                                                       # 8-byte ack, WINDOW in flight
//! ```
//!
//! `stream` writes `--bytes` in `--msg`-sized `write_all` calls, shuts its side down and waits
//! for the server's byte count, so the time covers delivery, not just buffering. `rr` models
//! protocol C: each message is acknowledged by the receiver after it has read it all; with
//! `--window N`, N messages are in flight (the AoE outstanding count). Results are one line of
//! `key=value` pairs.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc::channel;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use twinblade_initiator::parse_size;

const MODE_STREAM: u64 = 1;
const MODE_RR: u64 = 2;

fn usage() -> ExitCode {
    eprintln!(
        "usage: tcp-bench serve ADDR:PORT\n       tcp-bench stream ADDR:PORT [--msg SIZE] [--bytes SIZE]\n       tcp-bench rr ADDR:PORT [--msg SIZE] [--window N] [--count N]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return usage();
    }
    let mut msg = 256 << 10;
    let mut bytes = 1 << 30;
    let mut window = 1u64;
    let mut count = 5000u64;
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let Some(value) = rest.next() else {
            return usage();
        };
        let parsed = match parse_size(value) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("tcp-bench: {flag}: {e}");
                return ExitCode::from(2);
            }
        };
        match flag.as_str() {
            "--msg" => msg = parsed.max(1),
            "--bytes" => bytes = parsed,
            "--window" => window = parsed.max(1),
            "--count" => count = parsed.max(1),
            _ => return usage(),
        }
    }
    let result = match args[0].as_str() {
        "serve" => serve(&args[1]),
        "stream" => stream(&args[1], msg, bytes),
        "rr" => rr(&args[1], msg, window, count),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_u64(s: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn serve(addr: &str) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    eprintln!("tcp-bench: serving on {}", listener.local_addr()?);
    for conn in listener.incoming() {
        let conn = conn?;
        std::thread::spawn(move || {
            if let Err(e) = serve_one(conn) {
                eprintln!("tcp-bench: connection: {e}");
            }
        });
    }
    Ok(())
}

fn serve_one(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mode = read_u64(&mut s)?;
    let msg = read_u64(&mut s)? as usize;
    match mode {
        MODE_STREAM => {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_le_bytes())?;
        }
        MODE_RR => {
            let mut buf = vec![0u8; msg];
            let mut seq = 0u64;
            loop {
                match s.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
                seq += 1;
                s.write_all(&seq.to_le_bytes())?;
            }
        }
        _ => return Err(io::Error::other(format!("unknown mode {mode}"))),
    }
    Ok(())
}

fn connect(addr: &str, mode: u64, msg: u64) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&mode.to_le_bytes());
    hello[8..].copy_from_slice(&msg.to_le_bytes());
    s.write_all(&hello)?;
    Ok(s)
}

fn payload(msg: u64) -> Vec<u8> {
    // Not zeros, in case anything on the path compresses.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..msg)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn stream(addr: &str, msg: u64, bytes: u64) -> io::Result<()> {
    let mut s = connect(addr, MODE_STREAM, msg)?;
    let buf = payload(msg);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = msg.min(bytes - sent) as usize;
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let got = read_u64(&mut s)?;
    let secs = start.elapsed().as_secs_f64();
    if got != sent {
        return Err(io::Error::other(format!(
            "server counted {got} bytes, sent {sent}"
        )));
    }
    println!(
        "mode=stream msg={msg} bytes={sent} seconds={secs:.3} mb_s={:.1}",
        sent as f64 / secs.max(1e-9) / 1e6
    );
    Ok(())
}

fn rr(addr: &str, msg: u64, window: u64, count: u64) -> io::Result<()> {
    let mut s = connect(addr, MODE_RR, msg)?;
    let mut reader = s.try_clone()?;
    let buf = payload(msg);
    let inflight = Arc::new((Mutex::new(0u64), Condvar::new()));
    let (tx, rx) = channel::<Instant>();
    let acks = {
        let inflight = inflight.clone();
        std::thread::spawn(move || -> io::Result<Vec<Duration>> {
            let mut lat = Vec::with_capacity(count as usize);
            for _ in 0..count {
                read_u64(&mut reader)?;
                let sent_at = rx.recv().map_err(io::Error::other)?;
                lat.push(sent_at.elapsed());
                let (m, cv) = &*inflight;
                *m.lock().unwrap() -= 1;
                cv.notify_one();
            }
            Ok(lat)
        })
    };
    let start = Instant::now();
    for _ in 0..count {
        {
            let (m, cv) = &*inflight;
            let mut n = m.lock().unwrap();
            while *n >= window {
                n = cv.wait(n).unwrap();
            }
            *n += 1;
        }
        tx.send(Instant::now()).map_err(io::Error::other)?;
        s.write_all(&buf)?;
    }
    let mut lat = acks
        .join()
        .map_err(|_| io::Error::other("ack reader panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    s.shutdown(Shutdown::Write)?;
    lat.sort();
    let pct = |p: f64| lat[((p / 100.0) * (lat.len() - 1) as f64).round() as usize];
    println!(
        "mode=rr msg={msg} window={window} count={count} seconds={secs:.3} mb_s={:.1} p50_us={:.1} p99_us={:.1}",
        (msg * count) as f64 / secs.max(1e-9) / 1e6,
        pct(50.0).as_secs_f64() * 1e6,
        pct(99.0).as_secs_f64() * 1e6
    );
    Ok(())
}
