//! `twinblade nbd`: serve one file or block device over NBD, like `qemu-nbd`.
//!
//! ```text
//! twinblade nbd [--bind ADDR] [--port P] [--name NAME] [--read-only] [--direct]
//!               [--allow ADDR[/PREFIX]]... FILE
//! ```
//!
//! Prints one line to stderr once it accepts connections
//! (`twinblade nbd: serving NAME (N bytes) on ADDR:PORT`) and serves until SIGINT or SIGTERM.
//! The server itself is [`crate::export::nbd`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::exit::ExitCode;
use crate::block::{BlockDevice, OpenOptions};
use crate::export::nbd::acl::{Acl, Cidr};
use crate::export::nbd::{Export, Server, ServerConfig};

/// Arguments of `twinblade nbd`.
#[derive(Debug, clap::Args)]
pub struct NbdArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,
    /// TCP port to listen on (0 picks a free one; the ready line shows which).
    #[arg(long, short = 'p', default_value_t = 10809)]
    pub port: u16,
    /// Export name clients select (the empty name also selects it).
    #[arg(long, short = 'x', default_value = "")]
    pub name: String,
    /// Export read-only.
    #[arg(long, short = 'r')]
    pub read_only: bool,
    /// Allow only clients from this address or network (repeatable); default: everyone.
    #[arg(long = "allow", value_name = "ADDR[/PREFIX]")]
    pub allow: Vec<Cidr>,
    /// Open FILE with O_DIRECT (bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// Most clients served at once.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Largest read or write (bytes) run on the connection's own thread instead of the I/O
    /// pool; 0 sends everything to the pool.
    #[arg(long, default_value_t = ServerConfig::default().inline_max)]
    pub inline_max: u32,
    /// Largest write (bytes) run on the connection's own thread.
    #[arg(long, default_value_t = ServerConfig::default().inline_write_max)]
    pub inline_write_max: u32,
    /// Network threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// File or block device to export.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Runs `twinblade nbd`; returns the exit status.
pub fn run(args: NbdArgs) -> i32 {
    let device = match OpenOptions::new()
        .read_only(args.read_only)
        .direct(args.direct)
        .open(&args.file)
    {
        Ok(d) => d,
        Err(err) => {
            eprintln!("twinblade nbd: {}: {err}", args.file.display());
            return ExitCode::Failure as i32;
        }
    };
    let device: Arc<dyn BlockDevice> = Arc::new(device);
    let size = device.size();
    let config = ServerConfig {
        max_connections: args.max_connections,
        inline_max: args.inline_max,
        inline_write_max: args.inline_write_max,
        acl: Acl::new(args.allow.clone()),
        ..ServerConfig::default()
    };
    let mut server = Server::new(config);
    let mut export = Export::new(args.name.clone(), device);
    export.read_only = args.read_only;
    export.description = args.file.display().to_string();
    if let Err(err) = server.add_export(export) {
        eprintln!("twinblade nbd: {err}");
        return ExitCode::Usage as i32;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("twinblade nbd: cannot start runtime: {err}");
            return ExitCode::Failure as i32;
        }
    };
    runtime.block_on(async move {
        let listener = match bind(&args.bind, args.port).await {
            Ok(l) => l,
            Err(err) => {
                eprintln!(
                    "twinblade nbd: cannot listen on {}:{}: {err}",
                    args.bind, args.port
                );
                return ExitCode::Failure as i32;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let shutdown = CancellationToken::new();
        let stats = server.stats();
        let serving = tokio::spawn(server.serve(listener, shutdown.clone()));
        eprintln!(
            "twinblade nbd: serving {:?} ({size} bytes) on {local}",
            args.name
        );
        wait_for_signal().await;
        eprintln!("twinblade nbd: shutting down");
        shutdown.cancel();
        let result = serving.await;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "twinblade nbd: {} sessions, {} requests ({} inline, {} on the I/O pool, {} errors)",
            n(&stats.sessions),
            n(&stats.requests),
            n(&stats.inline),
            n(&stats.offloaded),
            n(&stats.error_replies)
        );
        match result {
            Ok(Ok(())) => ExitCode::Ok as i32,
            Ok(Err(err)) => {
                eprintln!("twinblade nbd: {err}");
                ExitCode::Failure as i32
            }
            Err(err) => {
                eprintln!("twinblade nbd: server task failed: {err}");
                ExitCode::Failure as i32
            }
        }
    })
}

async fn bind(addr: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    // Accept "::" and "[::1]" as well as IPv4 and host names.
    let host = addr.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await,
        Err(_) => tokio::net::TcpListener::bind((host, port)).await,
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
