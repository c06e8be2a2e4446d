//! `twinblade run`: the daemon. The one place that starts the long-running parts of a node and
//! stops them again, in reverse order.
//!
//! Every thread and task is started through one [`Supervisor`] tree, rooted here, which also
//! owns the process's one tokio runtime.
//!
//! Start: attach every resource's meta-data → engine + connector per resource (the engine
//! promotes, serves AoE and NBD, replicates, resyncs; see [`resource`]) → control socket.
//! Stop (SIGINT/SIGTERM), in reverse: control socket → per resource, last started first: its
//! connector, then its engine's orderly stop: NBD → AoE → peer connection → drain in-flight
//! writes → flush the data → meta-data marked clean (bitmap and activity log flushed) → join
//! the threads it started.
//!
//! * [`resource`]: one resource's engine, connector, reader and resync copier.
//! * [`peer`]: the connection handshake (Hello, HMAC challenge-response, parameters).
//! * [`control`]: the control socket and the verbs `status`, `events`, `primary`, ….
//! * [`fence`]: the fence command (`[cluster] fence-peer`), run off the engine thread.
//! * [`notify`]: systemd's `READY=1`, `WATCHDOG=1` (only while every engine goes round its
//!   loop), `STOPPING=1` and `STATUS=`; nothing without `$NOTIFY_SOCKET`.
//! * [`metrics`]: `GET /metrics` (Prometheus text format) when the node sets `metrics`.
//! * [`witness`]: claims at the witness (`[cluster] witness`), off the engine thread.
//!
//! The heartbeat and the ping targets' prober ([`crate::ha::ping`]) start first, in their own
//! group, and stop last.

pub mod control;
pub mod fence;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod resource;
pub mod witness;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::block::fault::FaultyDevice;
use crate::block::file::OpenOptions;
use crate::block::volatile::{Prefix, VolatileCache};
use crate::block::BlockDevice;
use crate::config::{Config, MetaDisk};
use crate::meta::store::MetaStore;
use crate::supervisor::{Root, Supervisor};
use crate::wire::ondisk::MetaKind;

use resource::{Resource, ResourceSpec};

/// Set (to anything) to put a fault-injecting layer under every resource's data disk, steered
/// by the control verb `fault` — for tests of ko-count and on-io-error, never for production.
pub const TEST_FAULTS_ENV: &str = "TWINBLADE_TEST_FAULTS";

/// The fault-injecting layer a test can steer.
pub type TestFaults = Arc<FaultyDevice<Arc<dyn BlockDevice>>>;

/// Set (to anything) to put a volatile write cache ([`VolatileCache`]) in front of every
/// backing file of `twinblade run` (data and meta-data; one cache per file), so that `kill -9`
/// of the daemon is a power cut that loses every unflushed write, and to enable the control
/// verb `fault RES power-cut [keep-subset SEED]` — for crash tests, never for production.
pub const TEST_POWER_CUT_ENV: &str = "TWINBLADE_TEST_POWER_CUT";

/// How long `fault RES power-cut` waits before cutting, so its answer reaches the caller.
const POWER_CUT_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

type TestCache = Arc<VolatileCache<crate::block::file::FileDevice>>;

/// Every volatile cache of this process: a power cut hits them all.
static TEST_CACHES: std::sync::Mutex<Vec<(PathBuf, TestCache)>> = std::sync::Mutex::new(Vec::new());

/// The test verb `fault RES power-cut [keep-subset SEED]`: shortly after answering, writes a
/// seeded random subset of every cached sector of every backing file of this process (none
/// without `keep-subset`), forgets the rest and aborts the process — a power cut.
pub fn power_cut(args: &[&str], group: &Supervisor) -> Result<String, String> {
    let keep = match args {
        [] => None,
        ["keep-subset", seed] => Some(
            seed.parse::<u64>()
                .map_err(|e| format!("power-cut: bad seed {seed:?}: {e}"))?,
        ),
        _ => {
            return Err(format!(
                "power-cut: unexpected {args:?} (power-cut [keep-subset SEED])"
            ))
        }
    };
    let caches = TEST_CACHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if caches.is_empty() {
        return Err(format!(
            "power-cut needs a daemon started with {TEST_POWER_CUT_ENV}=1"
        ));
    }
    let cached: u64 = caches.iter().map(|(_, c)| c.cached_bytes()).sum();
    let cut = move |_| {
        std::thread::sleep(POWER_CUT_DELAY);
        // Every cache held at once: no I/O gets through from the first cut to the abort.
        let mut held: Vec<_> = caches.iter().map(|(_, c)| c.hold_for_cut()).collect();
        for ((path, _), h) in caches.iter().zip(held.iter_mut()) {
            let r = h.cut(keep);
            tracing::warn!(
                "power cut: {}: {} cached sectors reached the disk, {} lost",
                path.display(),
                r.kept,
                r.lost
            );
        }
        std::process::abort();
    };
    group
        .spawn("power-cut", cut)
        .map_err(|e| format!("power-cut: {e}"))?;
    Ok(format!(
        "power cut in {} ms ({} bytes cached, {})",
        POWER_CUT_DELAY.as_millis(),
        cached,
        match keep {
            Some(seed) => format!("keeping a subset, seed {seed}"),
            None => "losing all of them".to_string(),
        }
    ))
}

/// How long `READY=1` waits for the control socket's answer to `status`.
const CONTROL_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
    config.check_local_files()?;
    let node = config.this_node(args.node.as_deref())?.to_string();
    let peer = config
        .peer_of(&node)
        .expect("validated: two nodes")
        .to_string();
    let notifier = notify::Notifier::from_env().map(Arc::new);
    let tell = |state: &str| {
        if let Some(n) = &notifier {
            n.tell(state);
        }
    };
    tell(&format!(
        "STATUS=node {node}: attaching {} resource(s)",
        config.resources.len()
    ));
    let metrics_listener = config.nodes[&node]
        .metrics
        .map(metrics::MetricsServer::bind)
        .transpose()?;
    // Its own token, not the signal's: the stop below goes group by group, in reverse order.
    let root = Root::new("twinblade", CancellationToken::new(), 2)?;
    // First up, last down: the peer hears this node for as long as any resource runs.
    let heartbeat_group = root.group("heartbeat");
    let heartbeat = start_heartbeat(&config, &node, &peer, &heartbeat_group)?;
    // The ping targets' prober beside it: it publishes our reach through the heartbeat.
    if let Some(ping) = crate::ha::ping::PingSettings::from_config(&config.cluster) {
        crate::ha::ping::start(ping, heartbeat.clone(), &heartbeat_group)?;
    }
    let mut resources = Vec::new();
    let mut groups = Vec::new();
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
                secret: config.cluster.secret().to_vec(),
            },
            protocol: res.protocol,
            durability: res.durability,
            csums: res.csums,
            nbd: res.nbd,
            service_mac: res.service_mac((&node, &peer)),
            floating_ip: res.floating_ip(),
            faults,
            rate: res.rate_config(),
            lease_time: config.cluster.heartbeat_dead_time() * 2 / 3,
            wire_guard_wait: config.cluster.wire_guard_wait(),
            ping_interval: config
                .cluster
                .heartbeat_interval()
                .min(resource::PING_INTERVAL),
            fence: config.cluster.fence_peer.as_ref().map(|command| {
                let mut peer_addresses = vec![peer_node.address];
                for a in peer_node.heartbeat_addresses() {
                    if !peer_addresses.contains(&a) {
                        peer_addresses.push(a);
                    }
                }
                Arc::new(fence::FenceSpec {
                    command: command.clone(),
                    timeout: config.cluster.fence_timeout(),
                    resource: name.clone(),
                    node: node.clone(),
                    peer: peer.clone(),
                    peer_addresses,
                })
            }),
            witness: config.cluster.witness_addr().map(|addr| {
                Arc::new(witness::WitnessSpec {
                    addr,
                    pair: config.pair_name(),
                    node: node.clone(),
                    secret: config.cluster.secret().to_vec(),
                    per_try: config.cluster.witness_timeout(),
                    tries: crate::config::WITNESS_TRIES,
                })
            }),
            on_no_quorum: res.on_no_quorum(),
        };
        let group = root.group(format!("resource-{name}"));
        resources.push(Resource::start(
            spec,
            res.machine_config(&node, &config.cluster),
            meta,
            data,
            heartbeat.clone(),
            group.clone(),
        )?);
        groups.push(group);
    }
    let control_at = control_path(args.control);
    let control =
        control::ControlServer::start(&control_at, resources.clone(), root.group("control"))?;
    let metrics = match metrics_listener {
        Some(listener) => Some(metrics::MetricsServer::start(
            listener,
            resources.clone(),
            root.group("metrics"),
        )?),
        None => None,
    };
    let watchdog_group = root.group("watchdog");
    // A daemon that cannot say it is ready stops in order (meta-data marked clean) and fails.
    let mut failed = None;
    if let Some(n) = &notifier {
        // Ready means answering: the control socket served a `status` request.
        let ready = control::probe(&control_at, CONTROL_PROBE_TIMEOUT)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("control socket does not answer: {e}"))
            })
            .and_then(|()| {
                let watchdog = notify::watchdog_interval();
                notify::start_watchdog(n.clone(), watchdog, resources.clone(), &watchdog_group)?;
                n.tell(&format!(
                    "READY=1\nSTATUS=running; {}",
                    notify::status_line(&resources)
                ));
                if let Some(w) = watchdog {
                    tracing::info!(
                        "systemd watchdog: {w:?}; pinging every {:?} while every resource engine runs",
                        w / 2
                    );
                }
                Ok(())
            });
        failed = ready.err();
    }
    match &failed {
        None => {
            tracing::info!(node = %node, "running; {} resource(s)", resources.len());
            root.runtime().block_on(cancel.cancelled());
        }
        Some(e) => tracing::error!("cannot start: {e}"),
    }
    tracing::info!("stopping");
    tell("STOPPING=1\nSTATUS=stopping: NBD, AoE, peer connection, flush, meta-data clean");
    // Reverse start order: the watchdog, metrics, the control socket, then each resource (its
    // connector, then its engine's orderly stop: NBD, AoE, peer connection, data flushed,
    // meta-data marked clean).
    watchdog_group.stop();
    if let Some(m) = metrics {
        m.stop();
    }
    control.stop();
    for group in groups.iter().rev() {
        group.stop();
    }
    heartbeat_group.stop();
    drop(resources);
    root.stop();
    tracing::info!("stopped");
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Starts the heartbeat on every path of this node's `heartbeat` list and says plainly what a
/// single path cannot tell apart.
fn start_heartbeat(
    config: &Config,
    node: &str,
    peer: &str,
    group: &Supervisor,
) -> Result<crate::ha::service::Heartbeat, RunError> {
    use crate::ha::service::{Heartbeat, HeartbeatPath, HeartbeatSettings};
    let paths: Vec<HeartbeatPath> = config
        .heartbeat_paths(node)
        .into_iter()
        .enumerate()
        .map(|(id, (local, peer))| HeartbeatPath {
            id: id as u8,
            local,
            peer,
        })
        .collect();
    let described: Vec<String> = paths
        .iter()
        .map(|p| format!("{} -> {}", p.local, p.peer))
        .collect();
    let settings = HeartbeatSettings {
        port: config.cluster.heartbeat_port(),
        interval: config.cluster.heartbeat_interval(),
        dead_time: config.cluster.heartbeat_dead_time(),
        ..HeartbeatSettings::new(node, peer, config.cluster.secret(), paths)
    };
    let heartbeat = Heartbeat::start(settings.clone(), group)
        .map_err(|e| std::io::Error::other(format!("heartbeat: {e}")))?;
    tracing::info!(
        "heartbeat to {peer} every {:?} on {} path(s): {}; the peer is gone after {:?} of silence on all",
        settings.interval,
        described.len(),
        described.join(", "),
        settings.dead_time
    );
    if heartbeat.single_path() {
        tracing::warn!(
            "only one heartbeat path: a cut replication link cannot be told from a dead peer \
             (only a witness or a fence command could); list the node's client-network address \
             too: heartbeat = [\"<replication address>\", \"<client address>\"]"
        );
    }
    Ok(heartbeat)
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
    let power_cut = std::env::var_os(TEST_POWER_CUT_ENV).is_some();
    // A whole backing file, behind the volatile cache when power cuts are tested.
    let whole = |path: &PathBuf| -> Result<Arc<dyn BlockDevice>, RunError> {
        let file = open(path, None)?;
        if !power_cut {
            return Ok(Arc::new(file));
        }
        tracing::warn!(
            resource = name,
            "{TEST_POWER_CUT_ENV} is set: {} is behind a volatile write cache (tests only)",
            path.display()
        );
        let cache = Arc::new(VolatileCache::new(
            file,
            crate::block::volatile::DEFAULT_CAP,
        ));
        TEST_CACHES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.clone(), cache.clone()));
        Ok(cache)
    };
    let disk = whole(&on.disk)?;
    let data_size_hint = disk.size();
    let (meta_dev, kind) = match &on.meta_disk {
        MetaDisk::Internal => (disk.clone(), MetaKind::Internal),
        MetaDisk::External(path) => (whole(path)?, MetaKind::External),
    };
    let insp = crate::meta::store::inspect(meta_dev.as_ref(), data_size_hint, kind)
        .map_err(|e| err(format!("{e} (run `twinblade create-md {name}` first?)")))?;
    let data_size = insp.layout.data_size;
    // With the cache, the data area is a window onto the same cache as the meta-data, so one
    // flush covers both, as on a real disk.
    let file: Arc<dyn BlockDevice> = if power_cut {
        Arc::new(Prefix::new(disk, data_size))
    } else {
        drop(disk);
        Arc::new(open(&on.disk, Some(data_size / 512))?)
    };
    let (data, faults): (Arc<dyn BlockDevice>, Option<TestFaults>) =
        if std::env::var_os(TEST_FAULTS_ENV).is_some() {
            tracing::warn!(
                resource = name,
                "{TEST_FAULTS_ENV} is set: the data disk can be made to fail (tests only)"
            );
            let f = Arc::new(FaultyDevice::new(file));
            (f.clone(), Some(f))
        } else {
            (file, None)
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

/// An NBD export of one device: a task on the process's runtime, in a group of its own (the
/// server tracks its connections itself and waits for them when it stops).
pub struct NbdHandle {
    group: Supervisor,
    /// The server's counters (for the metrics).
    pub stats: Arc<crate::export::nbd::ServerStats>,
}

impl NbdHandle {
    /// Binds `addr` and serves `device` as export `name` until stopped, answering only while
    /// `gate` allows.
    pub fn start(
        addr: SocketAddr,
        name: &str,
        device: Arc<dyn BlockDevice>,
        gate: Arc<crate::ha::gate::ServeGate>,
        group: Supervisor,
    ) -> std::io::Result<NbdHandle> {
        use crate::export::nbd::{Export, Server, ServerConfig};
        let listener = group
            .runtime()
            .block_on(tokio::net::TcpListener::bind(addr))?;
        let mut server = Server::new(ServerConfig::default());
        server
            .add_export(Export {
                gate,
                ..Export::new(name, device)
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let stats = server.stats();
        tracing::info!("serving {name} over NBD on {addr}");
        group.spawn_task(format!("nbd-{name}"), move |token| async move {
            if let Err(e) = server.serve(listener, token).await {
                tracing::error!("NBD server failed: {e}");
            }
        });
        Ok(NbdHandle { group, stats })
    }

    /// Stops serving and waits.
    pub fn stop(self) {
        self.group.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_cut_refuses_bad_words_and_a_daemon_without_the_cache() {
        let root = Root::threads_only("test", CancellationToken::new());
        let err = power_cut(&["keep-some"], &root).unwrap_err();
        assert!(err.contains("power-cut [keep-subset SEED]"), "{err}");
        let err = power_cut(&["keep-subset", "x"], &root).unwrap_err();
        assert!(err.contains("bad seed \"x\""), "{err}");
        let err = power_cut(&["keep-subset"], &root).unwrap_err();
        assert!(err.contains("unexpected"), "{err}");
        // No cache was set up in this process (the environment variable is not set), so this
        // refuses instead of aborting the test binary.
        assert!(std::env::var_os(TEST_POWER_CUT_ENV).is_none());
        let err = power_cut(&["keep-subset", "7"], &root).unwrap_err();
        assert!(err.contains(TEST_POWER_CUT_ENV), "{err}");
    }
}
