//! `twinblade run`: the daemon. The one place that starts the long-running parts of a node and
//! stops them again, in reverse order.
//!
//! Start: attach every resource's meta-data → engine + connector per resource (the engine
//! promotes, serves AoE and NBD, replicates, resyncs; see [`resource`]) → control socket.
//! Stop (SIGINT/SIGTERM): control socket → per resource: NBD → AoE → peer connection →
//! flush the data → meta-data marked clean (bitmap and activity log flushed).
//!
//! * [`resource`]: one resource's engine, connector, reader and resync copier.
//! * [`peer`]: the connection handshake (Hello, HMAC challenge-response, parameters).
//! * [`control`]: the control socket and the verbs `status`, `events`, `primary`, ….

pub mod control;
pub mod peer;
pub mod resource;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::block::fault::FaultyDevice;
use crate::block::file::OpenOptions;
use crate::block::BlockDevice;
use crate::config::{Config, MetaDisk};
use crate::meta::store::MetaStore;
use crate::wire::ondisk::MetaKind;
use crate::wire::repl::{Durability, ReplProtocol};

use resource::{Resource, ResourceSpec};

/// Set (to anything) to put a fault-injecting layer under every resource's data disk, steered
/// by the control verb `fault` — for tests of ko-count and on-io-error, never for production.
pub const TEST_FAULTS_ENV: &str = "TWINBLADE_TEST_FAULTS";

/// The fault-injecting layer a test can steer.
pub type TestFaults = Arc<FaultyDevice<crate::block::file::FileDevice>>;

/// The default control socket.
pub const DEFAULT_CONTROL: &str = "/run/twinblade/control.sock";
/// The environment variable that overrides it.
pub const CONTROL_ENV: &str = "TWINBLADE_CONTROL";

/// Arguments of `twinblade run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Configuration file.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// This node's name (default: $TWINBLADE_NODE, else the host name).
    #[arg(long)]
    pub node: Option<String>,
    /// Control socket (default: $TWINBLADE_CONTROL, else /run/twinblade/control.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

/// The control socket path from a flag, the environment or the default.
pub fn control_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(CONTROL_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL))
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A disk could not be opened or attached.
    #[error("resource {resource}: {what}")]
    Disk {
        /// Resource.
        resource: String,
        /// What went wrong.
        what: String,
    },
    /// A socket could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the daemon until `cancel` fires; returns after an orderly stop.
pub fn run(args: RunArgs, cancel: CancellationToken) -> Result<(), RunError> {
    let config = Config::load(&args.config)?;
    let node = config.this_node(args.node.as_deref())?.to_string();
    let peer = config
        .peer_of(&node)
        .expect("validated: two nodes")
        .to_string();
    let mut resources = Vec::new();
    let mut threads = Vec::new();
    for (name, res) in &config.resources {
        let (meta, data, faults) = attach(&config, name, &node)?;
        let local_node = &config.nodes[&node];
        let peer_node = &config.nodes[&peer];
        let aoe = res.aoe_address();
        let spec = ResourceSpec {
            name: name.clone(),
            aoe: (aoe.shelf, aoe.slot),
            interface: local_node.interface.clone(),
            listen: SocketAddr::new(local_node.address, res.port),
            peer_addr: SocketAddr::new(peer_node.address, res.port),
            dialer: node < peer,
            identity: peer::Identity {
                local: node.clone(),
                peer: peer.clone(),
                secret: config.cluster.shared_secret.as_bytes().to_vec(),
            },
            protocol: match res.protocol {
                crate::config::Protocol::A => ReplProtocol::A,
                crate::config::Protocol::B => ReplProtocol::B,
                crate::config::Protocol::C => ReplProtocol::C,
            },
            durability: match res.durability {
                crate::config::Durability::Node => Durability::Node,
                crate::config::Durability::Power => Durability::Power,
            },
            nbd: res.nbd,
            faults,
            rate: res.rate_config(),
        };
        let (r, t) = Resource::start(
            spec,
            res.machine_config(&node),
            meta,
            data,
            cancel.child_token(),
        )?;
        resources.push(r);
        threads.extend(t);
    }
    let control = control::ControlServer::start(
        &control_path(args.control),
        resources.clone(),
        cancel.clone(),
    )?;
    tracing::info!(node = %node, "running; {} resource(s)", resources.len());
    wait_cancelled(&cancel);
    tracing::info!("stopping");
    control.stop();
    for r in resources.iter().rev() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        r.send(resource::Input::Stop(tx));
        let _ = rx.recv();
    }
    drop(resources);
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("stopped");
    Ok(())
}

fn wait_cancelled(cancel: &CancellationToken) {
    while !cancel.is_cancelled() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A resource's attached meta-data, its data area, and the test fault layer if enabled.
type Attached = (Arc<MetaStore>, Arc<dyn BlockDevice>, Option<TestFaults>);

/// Opens a resource's disks and attaches its meta-data. Returns the store and the data area.
fn attach(config: &Config, name: &str, node: &str) -> Result<Attached, RunError> {
    let on = &config.resources[name].on[node];
    let err = |what: String| RunError::Disk {
        resource: name.to_string(),
        what,
    };
    let open = |path: &PathBuf, length: Option<u64>| {
        OpenOptions::new()
            .preallocate(false)
            .length_sectors(length)
            .open(path)
            .map_err(|e| err(format!("{}: {e}", path.display())))
    };
    let (meta_dev, kind, data_size_hint): (Arc<dyn BlockDevice>, MetaKind, u64) =
        match &on.meta_disk {
            MetaDisk::Internal => {
                let whole = open(&on.disk, None)?;
                let size = whole.size();
                (Arc::new(whole), MetaKind::Internal, size)
            }
            MetaDisk::External(path) => {
                let data = open(&on.disk, None)?;
                let size = data.size();
                (Arc::new(open(path, None)?), MetaKind::External, size)
            }
        };
    let insp = crate::meta::store::inspect(meta_dev.as_ref(), data_size_hint, kind)
        .map_err(|e| err(format!("{e} (run `twinblade create-md {name}` first?)")))?;
    let data_size = insp.layout.data_size;
    let file = open(&on.disk, Some(data_size / 512))?;
    let (data, faults): (Arc<dyn BlockDevice>, Option<TestFaults>) =
        if std::env::var_os(TEST_FAULTS_ENV).is_some() {
            tracing::warn!(
                resource = name,
                "{TEST_FAULTS_ENV} is set: the data disk can be made to fail (tests only)"
            );
            let f = Arc::new(FaultyDevice::new(file));
            (f.clone(), Some(f))
        } else {
            (Arc::new(file), None)
        };
    let (store, report) =
        MetaStore::attach(meta_dev, data.clone(), kind).map_err(|e| err(e.to_string()))?;
    if !report.was_clean {
        tracing::warn!(
            resource = name,
            "meta-data was not cleanly closed: {} activity-log extents marked out of sync{}",
            report.al_extents_marked,
            if report.crashed_primary {
                "; crashed primary"
            } else {
                ""
            }
        );
    }
    Ok((Arc::new(store), data, faults))
}

/// An NBD export of one device on a thread of its own (the NBD server is async).
pub struct NbdHandle {
    cancel: CancellationToken,
    thread: JoinHandle<()>,
}

impl NbdHandle {
    /// Binds `addr` and serves `device` as export `name` until stopped.
    pub fn start(
        addr: SocketAddr,
        name: &str,
        device: Arc<dyn BlockDevice>,
        cancel: CancellationToken,
    ) -> std::io::Result<NbdHandle> {
        use crate::export::nbd::server::{Export, Server, ServerConfig};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let mut server = Server::new(ServerConfig::default());
        server
            .add_export(Export::new(name, device))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        tracing::info!("serving {name} over NBD on {addr}");
        let token = cancel.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-{name}"))
            .spawn(move || {
                if let Err(e) = runtime.block_on(server.serve(listener, token)) {
                    tracing::error!("NBD server failed: {e}");
                }
            })?;
        Ok(NbdHandle { cancel, thread })
    }

    /// Stops serving and waits.
    pub fn stop(self) {
        self.cancel.cancel();
        let _ = self.thread.join();
    }
}
