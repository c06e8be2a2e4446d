//! The configuration file: one TOML file, identical on both nodes.
//!
//! ```toml
//! [cluster]
//! shared-secret = "change-me"          # authenticates every peer connection and heartbeat
//!                                      # or: shared-secret-file = "/etc/twinblade/secret" (mode 0600)
//! heartbeat-port = 7790                # optional: UDP port of the heartbeat on every path
//! heartbeat-interval = 0.2             # optional: seconds between heartbeats (heartbeat's keepalive)
//! heartbeat-dead-time = 1.0            # optional: silence on every path that makes the peer dead
//! fence-peer = "/etc/twinblade/fence-peer" # optional: fence command (DRBD's fence-peer handler)
//! fence-timeout = 10.0                 # optional: seconds before the fence command is killed
//! name = "lab"                         # optional: the pair's name at the witness (default: node names sorted, "-")
//! witness = "10.0.0.9:7791"            # optional: the witness (`twinblade witness` on a third machine)
//! witness-timeout = 0.5                # optional: seconds per try (3 tries) before it is unreachable
//! [node.alpha]
//! address = "192.168.100.1"            # replication link
//! interface = "eth0"                   # client-facing: AoE (later also the floating IP)
//! heartbeat = ["192.168.100.1", "10.0.0.181"] # optional: one address per heartbeat path
//! metrics = "127.0.0.1:9942"          # optional: serve GET /metrics (Prometheus) here
//! [node.beta]
//! address = "192.168.100.2"
//! interface = "eth0"
//! heartbeat = ["192.168.100.2", "10.0.0.182"]
//! [resource.r0]
//! aoe = "e0.3"                         # shelf 0..65534, slot 0..254; unique
//! port = 7788                          # replication port; unique
//! protocol = "C"                       # C (default), B, A
//! durability = "node"                  # node (default) or power; see crate::meta
//! csums = "xxh3-128"                   # resync/verify block digest: xxh3-128 (default), blake3, crc32c
//! al-extents = 1237                    # optional: activity-log slots (7..65534)
//! al-extent-kib = 4096                 # optional: activity-log extent size (64 KiB..1 GiB)
//! resync-rate-max = "200M"             # optional: resync bytes/s (K/M/G, binary; default unlimited)
//! resync-rate-min = "10M"              # optional: floor while clients do I/O (default 10M)
//! resync-fill-target = "8M"            # optional: bytes in flight the controller aims at
//! resync-plan-ahead = 0.2              # optional: seconds a correction is spread over
//! fencing = "resource-only"            # optional: resource-only (default) or dont-care
//! [resource.r0.on.alpha]
//! disk = "/var/lib/twinblade/r0.img"
//! meta-disk = "internal"               # or the path of a separate device or file
//! [resource.r0.on.beta]
//! disk = "/dev/sdb"
//! meta-disk = "/dev/loop0"
//! ```
//!
//! [`Config::load`] parses and validates. Every error names the file, the key path and the
//! problem, e.g. `/etc/twinblade.toml: resource.r0.on.beta.disk: missing`. Unknown keys are
//! errors. Validation: exactly two nodes; every resource has an `on` section for each node and
//! none for anything else; AoE addresses parse as `eS.L` and are unique; ports are unique;
//! protocol is A, B or C; durability is node or power; csums is crc32c, xxh3-128 or blake3.
//!
//! [`Config::this_node`] picks the local node: `--node NAME`, else `$TWINBLADE_NODE`, else the
//! host name (full, then up to the first dot).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod check;
mod cluster;
mod placement;
mod quorum;
pub mod secret;

pub use cluster::{
    Cluster, DEFAULT_FENCE_TIMEOUT, DEFAULT_HEARTBEAT_DEAD_TIME, DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_PORT, DEFAULT_WITNESS_TIMEOUT, MAX_HEARTBEAT_PATHS, WITNESS_TRIES,
};

pub use secret::Secret;

use crate::meta::layout::{
    LayoutParams, DEFAULT_AL_EXTENTS, DEFAULT_AL_EXTENT_SHIFT, MIN_AL_EXTENTS,
};
use crate::net::address::FloatingIp;
use crate::wire::repl::{ChecksumAlg, Durability, ReplProtocol};
use crate::wire::MacAddr;

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/twinblade.toml";
/// The environment variable that names the local node.
pub const NODE_ENV: &str = "TWINBLADE_NODE";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A key is missing, unknown or has a bad value.
    #[error("{}: {key}: {problem}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Dotted key path (`resource.r0.on.beta.disk`).
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// `[node.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Node {
    /// Address on the replication link.
    pub address: IpAddr,
    /// Client-facing interface (AoE, floating IP).
    pub interface: String,
    /// The local addresses the heartbeat uses, one per path; path `i` of one node talks to
    /// path `i` of the other (default: `[address]`, the replication link alone).
    pub heartbeat: Option<Vec<IpAddr>>,
    /// Where `GET /metrics` (Prometheus text format) is served (default: not served).
    pub metrics: Option<std::net::SocketAddr>,
}

impl Node {
    /// The heartbeat addresses, one per path.
    pub fn heartbeat_addresses(&self) -> Vec<IpAddr> {
        self.heartbeat.clone().unwrap_or_else(|| vec![self.address])
    }
}

/// Where a resource's meta-data lives on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    /// At the end of the data disk.
    Internal,
    /// On a separate device or file.
    External(PathBuf),
}

impl<'de> Deserialize<'de> for MetaDisk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(if s == "internal" {
            MetaDisk::Internal
        } else {
            MetaDisk::External(PathBuf::from(s))
        })
    }
}

/// `[resource.NAME.on.NODE]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OnNode {
    /// Data device or file.
    pub disk: PathBuf,
    /// `internal` or a path.
    pub meta_disk: MetaDisk,
}

/// An AoE address `eSHELF.SLOT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AoeAddress {
    /// Shelf, 0..65534.
    pub shelf: u16,
    /// Slot, 0..254.
    pub slot: u8,
}

impl std::str::FromStr for AoeAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an AoE address like e0.3 (shelf 0..65534, slot 0..254)");
        let (shelf, slot) = s
            .strip_prefix('e')
            .and_then(|r| r.split_once('.'))
            .ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(shelf) || !digits(slot) {
            return Err(bad());
        }
        let shelf: u16 = shelf.parse().map_err(|_| bad())?;
        let slot: u8 = slot.parse().map_err(|_| bad())?;
        if shelf == u16::MAX || slot == u8::MAX {
            return Err(bad());
        }
        Ok(AoeAddress { shelf, slot })
    }
}

impl fmt::Display for AoeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}.{}", self.shelf, self.slot)
    }
}

/// `[resource.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Resource {
    /// AoE address, `eS.L` (checked by [`Config::load`]; see [`Resource::aoe_address`]).
    pub aoe: String,
    /// Replication TCP port.
    pub port: u16,
    /// Replication protocol: `"A"`, `"B"` or `"C"` (default).
    #[serde(default = "default_protocol", deserialize_with = "protocol_word")]
    pub protocol: ReplProtocol,
    /// Durability level: `"node"` (default) or `"power"`; see [`crate::meta`], "Durability
    /// levels".
    #[serde(default = "default_durability", deserialize_with = "durability_word")]
    pub durability: Durability,
    /// Block digest of checksum-based resync and verify: `"xxh3-128"` (default), `"blake3"`
    /// or `"crc32c"` (DRBD's `csums-alg` and `verify-alg`). Must be the same on both nodes.
    #[serde(default = "default_csums", deserialize_with = "csums_word")]
    pub csums: ChecksumAlg,
    /// Activity-log slots (default 1237).
    pub al_extents: Option<u32>,
    /// Activity-log extent size in KiB (default 4096).
    pub al_extent_kib: Option<u32>,
    /// Seconds a starting node waits for its peer before deciding alone (0: forever, as
    /// DRBD's `wfc-timeout`; default 0).
    pub wfc_timeout: Option<f64>,
    /// The same for a node that was a degraded primary when it went down (default 60).
    pub degr_wfc_timeout: Option<f64>,
    /// Seconds of silence after which a connected peer is declared dead (heartbeat's
    /// `deadtime`; default 10.5).
    pub dead_time: Option<f64>,
    /// The request timeout ko-count is counted in, seconds (DRBD's `timeout`; default 6).
    pub timeout: Option<f64>,
    /// Timeouts a replicated write may take before the peer is dropped (default 7; 0: never).
    pub ko_count: Option<u32>,
    /// Promote automatically at startup and on failover (default true).
    pub auto_promote: Option<bool>,
    /// The node that becomes primary when both are healthy (default: none; the first to have
    /// UpToDate data while the other does not). `preferred` is the same key.
    #[serde(alias = "preferred")]
    pub preferred_primary: Option<String>,
    /// The preferred node takes the resource back by a planned switchover once it is
    /// connected and UpToDate again after a failover (heartbeat's `auto_failback`; default
    /// false: it stays where the failover put it, CARP's preempt off).
    pub auto_failback: Option<bool>,
    /// Seconds the returning preferred node must be connected and UpToDate before it takes
    /// the resource back (keepalived's `preempt_delay`; default 30).
    pub failback_delay: Option<f64>,
    /// Also export the device over NBD on this `ADDRESS:PORT` while primary (with a floating
    /// IP, normally that address: NBD starts after it is up and stops before it goes).
    pub nbd: Option<std::net::SocketAddr>,
    /// The MAC the blade answers from: `"auto"` (default: a locally administered address
    /// derived from the two node names and the shelf.slot, the same on both nodes, so the
    /// initiators' frames follow the service), `"own"` (the interface's own MAC, as vblade),
    /// or an address (`"02:00:5e:10:00:03"`). See [`Resource::service_mac`].
    pub mac: Option<String>,
    /// An address that moves with the primary, `ADDRESS/PREFIX` (`"10.77.0.100/24"`), put on
    /// the client-facing interface while this node serves (heartbeat's `IPaddr`).
    pub floating_ip: Option<String>,
    /// `"resource-only"` (default) or `"dont-care"` (DRBD's `fencing`; see
    /// [`crate::cluster::machine`]).
    #[serde(default = "default_fencing", deserialize_with = "fencing_word")]
    pub fencing: crate::cluster::Fencing,
    /// What a serving node does with client requests while its serve gate is shut (it lost
    /// its peer and has no vouch): `"io-error"` (default: hold them `on-no-quorum-timeout`
    /// seconds, then NBD requests fail with EIO) or `"suspend-io"` (hold them until the gate
    /// opens). DRBD's `on-no-quorum`; see [`crate::ha::quorum`] and
    /// [`Resource::on_no_quorum`].
    pub on_no_quorum: Option<String>,
    /// Seconds requests are held before `io-error` fails them (default 30).
    pub on_no_quorum_timeout: Option<f64>,
    /// Resync upper bound in bytes/s, `K`/`M`/`G` suffixes (binary), or `"unlimited"`
    /// (default).
    pub resync_rate_max: Option<ByteValue>,
    /// Resync floor in bytes/s while clients do I/O (default 10M).
    pub resync_rate_min: Option<ByteValue>,
    /// Resync bytes the rate controller keeps in flight (default 8M).
    pub resync_fill_target: Option<ByteValue>,
    /// Seconds over which the rate controller spreads a correction (default 0.2).
    pub resync_plan_ahead: Option<f64>,
    /// Per-node disks.
    pub on: BTreeMap<String, OnNode>,
}

fn default_protocol() -> ReplProtocol {
    ReplProtocol::C
}

fn default_durability() -> Durability {
    Durability::Node
}

fn default_csums() -> ChecksumAlg {
    ChecksumAlg::Xxh3_128
}

fn default_fencing() -> crate::cluster::Fencing {
    crate::cluster::Fencing::ResourceOnly
}

fn fencing_word<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<crate::cluster::Fencing, D::Error> {
    use crate::cluster::Fencing;
    one_of_words(
        d,
        &[Fencing::ResourceOnly, Fencing::DontCare],
        |f| match f {
            Fencing::ResourceOnly => "resource-only",
            Fencing::DontCare => "dont-care",
        },
    )
}

fn protocol_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ReplProtocol, D::Error> {
    one_of_words(d, ReplProtocol::ALL, ReplProtocol::as_str)
}

fn durability_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Durability, D::Error> {
    one_of_words(d, Durability::ALL, Durability::as_str)
}

fn csums_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ChecksumAlg, D::Error> {
    one_of_words(d, ChecksumAlg::ALL, ChecksumAlg::as_str)
}

/// The value in `all` whose word is the string read. The protocol types live in `wire` and do
/// not derive `Deserialize`, so the file's words are matched here, and an unknown one gets
/// the message serde gives an unknown enum variant.
fn one_of_words<'de, D, T>(d: D, all: &[T], word: fn(T) -> &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Copy,
{
    let s = String::deserialize(d)?;
    all.iter().copied().find(|v| word(*v) == s).ok_or_else(|| {
        let words: Vec<String> = all.iter().map(|v| format!("`{}`", word(*v))).collect();
        let expected = match words.as_slice() {
            [one] => one.clone(),
            [first, second] => format!("{first} or {second}"),
            _ => format!("one of {}", words.join(", ")),
        };
        serde::de::Error::custom(format!("unknown variant `{s}`, expected {expected}"))
    })
}

/// A byte count or rate as written in the file: an integer, or a string with an optional
/// binary suffix (`"512K"`, `"100M"`, `"1G"`); see [`parse_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ByteValue {
    /// A plain integer.
    Int(u64),
    /// A string with a suffix.
    Text(String),
}

/// Parses `123`, `64K`, `100M`, `1G`, `2T` (binary multiples; a trailing `B`, `iB` or `/s` is
/// allowed: `100MiB/s`). `unlimited` is `None`.
pub fn parse_bytes(v: &ByteValue) -> Result<Option<u64>, String> {
    let text = match v {
        ByteValue::Int(n) => return Ok(Some(*n)),
        ByteValue::Text(t) => t.trim(),
    };
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let bad =
        || format!("{text:?} is not a byte count like 100M (suffixes K, M, G, T) or \"unlimited\"");
    let t = text.strip_suffix("/s").unwrap_or(text);
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).map(Some).ok_or_else(bad)
}

impl Resource {
    /// The resync rate controller's settings (validated at load).
    pub fn rate_config(&self) -> crate::repl::rate::RateConfig {
        use crate::repl::rate::RateConfig;
        let d = RateConfig::default();
        let bytes = |v: &Option<ByteValue>| {
            v.as_ref()
                .map(|v| parse_bytes(v).expect("validated at load"))
        };
        RateConfig {
            max_rate: bytes(&self.resync_rate_max).unwrap_or(d.max_rate),
            min_rate: bytes(&self.resync_rate_min).map_or(d.min_rate, |v| v.unwrap_or(u64::MAX)),
            fill_target: bytes(&self.resync_fill_target)
                .map_or(d.fill_target, |v| v.unwrap_or(u64::MAX / 4)),
            plan_ahead: self
                .resync_plan_ahead
                .map_or(d.plan_ahead, std::time::Duration::from_secs_f64),
            step: d.step,
        }
    }

    /// The MAC the blade answers from while served, `None` for the interface's own (checked
    /// by [`Config::load`]). `nodes` are the cluster's two node names.
    pub fn service_mac(&self, nodes: (&str, &str)) -> Option<MacAddr> {
        match self.mac.as_deref() {
            None | Some("auto") => {
                let aoe = self.aoe_address();
                Some(crate::export::aoe::service_mac_for(
                    nodes, aoe.shelf, aoe.slot,
                ))
            }
            Some("own") => None,
            Some(text) => text.parse().ok(),
        }
    }

    /// The floating IP, if any (checked by [`Config::load`]).
    pub fn floating_ip(&self) -> Option<FloatingIp> {
        self.floating_ip.as_deref().and_then(|t| t.parse().ok())
    }

    /// The parsed AoE address (validated at load).
    pub fn aoe_address(&self) -> AoeAddress {
        self.aoe.parse().expect("validated at load")
    }

    /// The cluster state machine's timers and policy for node `node`, in `cluster`.
    pub fn machine_config(&self, node: &str, cluster: &Cluster) -> crate::cluster::Config {
        use std::time::Duration;
        let defaults = crate::cluster::Config::default();
        let secs = |v: Option<f64>, d: Option<Duration>| match v {
            Some(0.0) => None,
            Some(s) => Some(Duration::from_secs_f64(s)),
            None => d,
        };
        crate::cluster::Config {
            auto_promote: self.auto_promote.unwrap_or(defaults.auto_promote),
            preferred_primary: self.preferred_primary.as_deref() == Some(node),
            wfc_timeout: secs(self.wfc_timeout, defaults.wfc_timeout),
            degr_wfc_timeout: secs(self.degr_wfc_timeout, defaults.degr_wfc_timeout),
            dead_time: self
                .dead_time
                .map_or(defaults.dead_time, Duration::from_secs_f64),
            timeout: self
                .timeout
                .map_or(defaults.timeout, Duration::from_secs_f64),
            ko_count: self.ko_count.unwrap_or(defaults.ko_count),
            fencing: self.fencing,
            heartbeat_dead_time: cluster.heartbeat_dead_time(),
            wire_recheck: defaults.wire_recheck,
            takeover_delay: cluster.takeover_delay(),
            fence_peer: cluster.fence_peer.is_some(),
            fence_retry: cluster.fence_retry(),
            witness: cluster.witness.is_some(),
            witness_retry: cluster.witness_retry(),
            ping_targets: cluster.ping_targets().len() as u8,
            ping_switch_delay: cluster.ping_switch_delay(),
            auto_failback: self.auto_failback.unwrap_or(defaults.auto_failback),
            failback_delay: self
                .failback_delay
                .map_or(defaults.failback_delay, Duration::from_secs_f64),
        }
    }

    /// Activity-log geometry for create-md.
    pub fn layout_params(&self) -> LayoutParams {
        LayoutParams {
            al_extents: self.al_extents.unwrap_or(DEFAULT_AL_EXTENTS),
            al_extent_shift: self
                .al_extent_kib
                .map_or(DEFAULT_AL_EXTENT_SHIFT, |k| (k.trailing_zeros() + 10) as u8),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    cluster: Cluster,
    node: BTreeMap<String, Node>,
    #[serde(default)]
    resource: BTreeMap<String, Resource>,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// `[cluster]`.
    pub cluster: Cluster,
    /// `[node.*]`, exactly two.
    pub nodes: BTreeMap<String, Node>,
    /// `[resource.*]`.
    pub resources: BTreeMap<String, Resource>,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.read_secret_file()?;
        Ok(config)
    }

    /// Parses and validates `text`; `path` is only used in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let file: File = toml::from_str(text).map_err(|e| {
            let (key, problem) = describe_toml_error(text, &e);
            ConfigError::Invalid {
                file: path.to_path_buf(),
                key,
                problem,
            }
        })?;
        let config = Config {
            path: path.to_path_buf(),
            cluster: file.cluster,
            nodes: file.node,
            resources: file.resource,
        };
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                file: path.to_path_buf(),
                key,
                problem,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.cluster.validate()?;
        let pair = self.pair_name();
        if !crate::ha::witness::book::is_book_name(&pair) {
            let key = if self.cluster.name.is_some() {
                "cluster.name"
            } else {
                "node"
            };
            return Err((
                key.into(),
                format!("the pair's name {pair:?} must be 1..64 bytes without spaces or control characters"),
            ));
        }
        if self.nodes.len() != 2 {
            let names: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
            return Err((
                "node".into(),
                format!(
                    "exactly two nodes are needed, found {} ({})",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
        for (name, node) in &self.nodes {
            if node.interface.is_empty() {
                return Err((format!("node.{name}.interface"), "must not be empty".into()));
            }
        }
        let (a, b) = {
            let mut it = self.nodes.values();
            (it.next().unwrap(), it.next().unwrap())
        };
        if a.address == b.address {
            return Err((
                "node".into(),
                format!("both nodes have address {}", a.address),
            ));
        }
        self.validate_heartbeat_paths()?;
        let mut aoe_seen: HashMap<AoeAddress, &str> = HashMap::new();
        let mut port_seen: HashMap<u16, &str> = HashMap::new();
        let mut mac_seen: HashMap<MacAddr, &str> = HashMap::new();
        let mut ip_seen: HashMap<std::net::IpAddr, &str> = HashMap::new();
        for (rname, res) in &self.resources {
            let key = |k: &str| format!("resource.{rname}.{k}");
            let aoe: AoeAddress = res.aoe.parse().map_err(|e| (key("aoe"), e))?;
            if let Some(other) = aoe_seen.insert(aoe, rname) {
                return Err((
                    key("aoe"),
                    format!("{aoe} is already used by resource {other}"),
                ));
            }
            if res.port == 0 {
                return Err((key("port"), "must not be 0".into()));
            }
            if let Some(other) = port_seen.insert(res.port, rname) {
                return Err((
                    key("port"),
                    format!("{} is already used by resource {other}", res.port),
                ));
            }
            self.validate_service(rname, res, &mut mac_seen, &mut ip_seen)?;
            if let Some(al) = res.al_extents {
                if !(MIN_AL_EXTENTS..=65534).contains(&al) {
                    return Err((
                        key("al-extents"),
                        format!("{al} is outside {MIN_AL_EXTENTS}..65534"),
                    ));
                }
            }
            if let Some(kib) = res.al_extent_kib {
                if !kib.is_power_of_two() || !(64..=1 << 20).contains(&kib) {
                    return Err((
                        key("al-extent-kib"),
                        format!("{kib} is not a power of two between 64 and 1048576"),
                    ));
                }
            }
            for (k, v) in [
                ("wfc-timeout", res.wfc_timeout),
                ("degr-wfc-timeout", res.degr_wfc_timeout),
                ("dead-time", res.dead_time),
                ("timeout", res.timeout),
            ] {
                if let Some(v) = v {
                    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
                        return Err((
                            key(k),
                            format!("{v} is not a number of seconds in 0..86400"),
                        ));
                    }
                }
            }
            for (k, v) in [("dead-time", res.dead_time), ("timeout", res.timeout)] {
                if v == Some(0.0) {
                    return Err((key(k), "must be more than 0 seconds".into()));
                }
            }
            for (k, v) in [
                ("resync-rate-max", &res.resync_rate_max),
                ("resync-rate-min", &res.resync_rate_min),
                ("resync-fill-target", &res.resync_fill_target),
            ] {
                if let Some(v) = v {
                    match parse_bytes(v).map_err(|e| (key(k), e))? {
                        Some(0) => return Err((key(k), "must be more than 0".into())),
                        None if k == "resync-fill-target" => {
                            return Err((key(k), "must be a byte count, not unlimited".into()))
                        }
                        _ => {}
                    }
                }
            }
            if let Some(v) = res.resync_plan_ahead {
                if !v.is_finite() || !(0.1..=60.0).contains(&v) {
                    return Err((
                        key("resync-plan-ahead"),
                        format!("{v} is not a number of seconds in 0.1..60"),
                    ));
                }
            }
            quorum::validate_on_no_quorum(res).map_err(|(k, e)| (key(k), e))?;
            placement::validate_placement(res, |n| self.nodes.contains_key(n))
                .map_err(|(k, e)| (key(k), e))?;
            for node in self.nodes.keys() {
                let Some(on) = res.on.get(node) else {
                    return Err((key(&format!("on.{node}")), "missing".into()));
                };
                if on.disk.as_os_str().is_empty() {
                    return Err((key(&format!("on.{node}.disk")), "must not be empty".into()));
                }
                if on.meta_disk == MetaDisk::External(PathBuf::new()) {
                    return Err((
                        key(&format!("on.{node}.meta-disk")),
                        "must not be empty".into(),
                    ));
                }
                if on.meta_disk == MetaDisk::External(on.disk.clone()) {
                    return Err((
                        key(&format!("on.{node}.meta-disk")),
                        "is the data disk itself; use \"internal\"".into(),
                    ));
                }
            }
            for node in res.on.keys() {
                if !self.nodes.contains_key(node) {
                    return Err((
                        key(&format!("on.{node}")),
                        format!("{node} is not a [node.*]"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The service keys of one resource: its MAC and floating IP parse, are usable, and are
    /// not another resource's.
    fn validate_service<'a>(
        &self,
        rname: &'a str,
        res: &Resource,
        mac_seen: &mut HashMap<MacAddr, &'a str>,
        ip_seen: &mut HashMap<std::net::IpAddr, &'a str>,
    ) -> Result<(), (String, String)> {
        let key = |k: &str| format!("resource.{rname}.{k}");
        if let Some(text) = res.mac.as_deref() {
            if !matches!(text, "auto" | "own") {
                let mac: MacAddr = text.parse().map_err(|e| {
                    (
                        key("mac"),
                        format!("{text:?} is not \"auto\", \"own\" or a MAC address: {e}"),
                    )
                })?;
                crate::export::aoe::check_service_mac(mac)
                    .map_err(|e| (key("mac"), e.to_string()))?;
            }
        }
        let names = self.node_names();
        if let Some(mac) = res.service_mac((names.0, names.1)) {
            if let Some(other) = mac_seen.insert(mac, rname) {
                return Err((
                    key("mac"),
                    format!("{mac} is already used by resource {other}"),
                ));
            }
        }
        if let Some(text) = res.floating_ip.as_deref() {
            let ip: FloatingIp =
                text.parse()
                    .map_err(|e: crate::net::address::FloatingIpParseError| {
                        (key("floating-ip"), e.to_string())
                    })?;
            if let Some(other) = ip_seen.insert(ip.address, rname) {
                return Err((
                    key("floating-ip"),
                    format!("{} is already used by resource {other}", ip.address),
                ));
            }
            if let Some((node, _)) = self.nodes.iter().find(|(_, n)| {
                n.address == ip.address || n.heartbeat_addresses().contains(&ip.address)
            }) {
                return Err((
                    key("floating-ip"),
                    format!(
                        "{} is node {node}'s own address; a floating IP must be one no node holds",
                        ip.address
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The two node names, in the file's order (checked: exactly two).
    /// The pair's name at the witness: `[cluster] name`, else the node names sorted and joined
    /// by "-".
    pub fn pair_name(&self) -> String {
        self.cluster.name.clone().unwrap_or_else(|| {
            let (a, b) = self.node_names();
            format!("{a}-{b}")
        })
    }

    fn node_names(&self) -> (&str, &str) {
        let mut it = self.nodes.keys();
        (
            it.next().map_or("", String::as_str),
            it.next().map_or("", String::as_str),
        )
    }

    fn validate_heartbeat_paths(&self) -> Result<(), (String, String)> {
        let mut counts = Vec::new();
        for (name, node) in &self.nodes {
            let key = format!("node.{name}.heartbeat");
            let paths = node.heartbeat_addresses();
            if paths.is_empty() || paths.len() > MAX_HEARTBEAT_PATHS {
                return Err((
                    key,
                    format!("list 1 to {MAX_HEARTBEAT_PATHS} addresses, one per path"),
                ));
            }
            for (i, addr) in paths.iter().enumerate() {
                if paths[..i].contains(addr) {
                    return Err((key, format!("{addr} is listed twice")));
                }
            }
            counts.push((name, paths));
        }
        let (a, b) = (&counts[0], &counts[1]);
        if a.1.len() != b.1.len() {
            return Err((
                format!("node.{}.heartbeat", b.0),
                format!(
                    "{} lists {} heartbeat path(s) and {} lists {}: path i of one node talks to path i of the other",
                    a.0,
                    a.1.len(),
                    b.0,
                    b.1.len()
                ),
            ));
        }
        for (x, y) in a.1.iter().zip(&b.1) {
            if x == y {
                return Err((
                    format!("node.{}.heartbeat", b.0),
                    format!("both nodes use {x} for the same heartbeat path"),
                ));
            }
        }
        Ok(())
    }

    /// Node `node`'s heartbeat paths: (our address, the peer's address) for each.
    pub fn heartbeat_paths(&self, node: &str) -> Vec<(IpAddr, IpAddr)> {
        let (Some(ours), Some(theirs)) = (
            self.nodes.get(node),
            self.peer_of(node).and_then(|p| self.nodes.get(p)),
        ) else {
            return Vec::new();
        };
        ours.heartbeat_addresses()
            .into_iter()
            .zip(theirs.heartbeat_addresses())
            .collect()
    }

    /// Checks what only the local node can (at the daemon's start): the fence command exists
    /// and is executable.
    pub fn check_local_files(&self) -> Result<(), ConfigError> {
        self.cluster
            .check_fence_peer()
            .map_err(|(key, problem)| ConfigError::Invalid {
                file: self.path.clone(),
                key,
                problem,
            })
    }

    /// The resource called `name`.
    pub fn resource(&self, name: &str) -> Result<&Resource, ConfigError> {
        self.resources
            .get(name)
            .ok_or_else(|| ConfigError::Invalid {
                file: self.path.clone(),
                key: format!("resource.{name}"),
                problem: format!(
                    "not defined (defined: {})",
                    self.resources
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The node this process runs as: `explicit` (from `--node`), else `$TWINBLADE_NODE`,
    /// else the host name (or its part before the first dot).
    pub fn this_node(&self, explicit: Option<&str>) -> Result<&str, ConfigError> {
        let env = std::env::var(NODE_ENV).ok().filter(|s| !s.is_empty());
        let (candidates, source): (Vec<String>, String) = if let Some(name) = explicit {
            (vec![name.to_string()], "--node".into())
        } else if let Some(name) = env {
            (vec![name], format!("${NODE_ENV}"))
        } else {
            let host = hostname();
            let short = host.split('.').next().unwrap_or("").to_string();
            (vec![host, short], "the host name".into())
        };
        for c in &candidates {
            if let Some((name, _)) = self.nodes.get_key_value(c.as_str()) {
                return Ok(name.as_str());
            }
        }
        Err(ConfigError::Invalid {
            file: self.path.clone(),
            key: "node".into(),
            problem: format!(
                "{source} gives {:?}, which is none of the configured nodes ({}); pass --node or set ${NODE_ENV}",
                candidates[0],
                self.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// The name of the other node.
    pub fn peer_of(&self, node: &str) -> Option<&str> {
        self.nodes.keys().map(String::as_str).find(|n| *n != node)
    }
}

/// The kernel's host name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Turns a toml/serde error into (key path, problem), using the error's span to find the table
/// header and key it points at.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> (String, String) {
    let msg = err.message().trim().to_string();
    let Some(span) = err.span() else {
        return ("(document)".into(), msg);
    };
    let before = &text[..span.start.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    let line = text[line_start..line_end].trim();
    let line_no = before.matches('\n').count() + 1;
    let header_of = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
            .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
        Some(
            inner
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join("."),
        )
    };
    let key_of = |l: &str| -> Option<String> {
        let (k, _) = l.split_once('=')?;
        let k = k.trim().trim_matches('"');
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_string())
    };
    // The table the error is in: the span's own line if it is a header, else the last header
    // above it.
    let (table, key_here) = if let Some(h) = header_of(line) {
        (h, None)
    } else {
        let table = before[..line_start]
            .lines()
            .rev()
            .find_map(header_of)
            .unwrap_or_default();
        (table, key_of(line))
    };
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}.{b}")
        }
    };
    let quoted = |m: &str, prefix: &str| -> Option<String> {
        let rest = m.strip_prefix(prefix)?;
        let rest = rest.strip_prefix('`')?;
        Some(rest[..rest.find('`')?].to_string())
    };
    if let Some(field) = quoted(&msg, "missing field ") {
        let base = match &key_here {
            Some(k) => join(&table, k),
            None => table,
        };
        return (join(&base, &field), "missing".into());
    }
    if let Some(field) = quoted(&msg, "unknown field ") {
        let expected = msg
            .split_once(", expected ")
            .map(|(_, e)| e.replace('`', ""));
        let problem = match expected {
            Some(e) => format!("unknown key (expected {e})"),
            None => "unknown key".into(),
        };
        return (join(&table, &field), problem);
    }
    match key_here {
        Some(k) => (join(&table, &k), msg),
        None if !table.is_empty() => (table, msg),
        None => (format!("line {line_no}"), msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
shared-secret = "s3cret"
[node.alpha]
address = "192.168.100.1"
interface = "eth0"
[node.beta]
address = "192.168.100.2"
interface = "eth0"
[resource.r0]
aoe = "e0.3"
port = 7788
[resource.r0.on.alpha]
disk = "/var/lib/twinblade/r0.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "/dev/sdb"
meta-disk = "/dev/loop0"
"#;

    fn err(text: &str) -> String {
        Config::parse(text, "/etc/twinblade.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn metrics_is_off_by_default_and_a_bad_address_names_the_key() {
        let c = Config::parse(GOOD, "/etc/twinblade.toml").unwrap();
        assert_eq!(c.nodes["alpha"].metrics, None);
        let on = GOOD.replace(
            "interface = \"eth0\"\n[node.beta]",
            "interface = \"eth0\"\nmetrics = \"127.0.0.1:9942\"\n[node.beta]",
        );
        let c = Config::parse(&on, "/etc/twinblade.toml").unwrap();
        assert_eq!(
            c.nodes["alpha"].metrics,
            Some("127.0.0.1:9942".parse().unwrap())
        );
        assert_eq!(c.nodes["beta"].metrics, None);
        let bad = on.replace("127.0.0.1:9942", "localhost");
        let e = err(&bad);
        assert!(
            e.starts_with("/etc/twinblade.toml: node.alpha.metrics: "),
            "{e}"
        );
    }

    #[test]
    fn resync_rate_keys() {
        let c = Config::parse(GOOD, "/etc/twinblade.toml").unwrap();
        let d = crate::repl::rate::RateConfig::default();
        assert_eq!(c.resource("r0").unwrap().rate_config(), d);
        let text = GOOD.replace(
            "port = 7788",
            "port = 7788\nresync-rate-max = \"100M\"\nresync-rate-min = 1048576\nresync-fill-target = \"4MiB\"\nresync-plan-ahead = 1.5",
        );
        let c = Config::parse(&text, "/etc/twinblade.toml").unwrap();
        let r = c.resource("r0").unwrap().rate_config();
        assert_eq!(r.max_rate, Some(100 << 20));
        assert_eq!(r.min_rate, 1 << 20);
        assert_eq!(r.fill_target, 4 << 20);
        assert_eq!(r.plan_ahead, std::time::Duration::from_millis(1500));
        let unlimited = GOOD.replace(
            "port = 7788",
            "port = 7788\nresync-rate-max = \"unlimited\"",
        );
        let c = Config::parse(&unlimited, "/etc/twinblade.toml").unwrap();
        assert_eq!(c.resource("r0").unwrap().rate_config().max_rate, None);
        for (line, problem) in [
            (
                "resync-rate-max = \"fast\"",
                "resync-rate-max: \"fast\" is not a byte count",
            ),
            (
                "resync-rate-min = 0",
                "resync-rate-min: must be more than 0",
            ),
            ("resync-rate-max = \"12X\"", "resync-rate-max: \"12X\""),
            (
                "resync-fill-target = \"unlimited\"",
                "resync-fill-target: must be a byte count",
            ),
            (
                "resync-plan-ahead = 0",
                "resync-plan-ahead: 0 is not a number of seconds",
            ),
        ] {
            let e = err(&GOOD.replace("port = 7788", &format!("port = 7788\n{line}")));
            assert!(
                e.starts_with("/etc/twinblade.toml: resource.r0.") && e.contains(problem),
                "{line}: {e}"
            );
        }
        assert_eq!(
            parse_bytes(&ByteValue::Text("1G".into())),
            Ok(Some(1 << 30))
        );
        assert_eq!(
            parse_bytes(&ByteValue::Text("250KiB/s".into())),
            Ok(Some(250 << 10))
        );
        assert!(parse_bytes(&ByteValue::Text("99999999999999G".into())).is_err());
    }

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(GOOD, "/etc/twinblade.toml").unwrap();
        let r = c.resource("r0").unwrap();
        assert_eq!(r.protocol, ReplProtocol::C);
        assert_eq!(r.durability, Durability::Node);
        assert_eq!(r.csums, ChecksumAlg::Xxh3_128);
        assert_eq!(r.aoe_address(), AoeAddress { shelf: 0, slot: 3 });
        assert_eq!(r.layout_params(), LayoutParams::default());
        assert_eq!(r.on["alpha"].meta_disk, MetaDisk::Internal);
        assert_eq!(
            r.on["beta"].meta_disk,
            MetaDisk::External("/dev/loop0".into())
        );
        assert_eq!(c.peer_of("alpha"), Some("beta"));
        assert_eq!(c.this_node(Some("beta")).unwrap(), "beta");
        assert!(c
            .this_node(Some("gamma"))
            .unwrap_err()
            .to_string()
            .contains("alpha, beta"));
        assert!(c
            .resource("r9")
            .unwrap_err()
            .to_string()
            .contains("resource.r9: not defined"));
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let missing_disk = GOOD.replace("disk = \"/dev/sdb\"\n", "");
        assert_eq!(
            err(&missing_disk),
            "/etc/twinblade.toml: resource.r0.on.beta.disk: missing"
        );
        let unknown = GOOD.replace("port = 7788", "port = 7788\nfoo = 1");
        assert!(
            err(&unknown).starts_with("/etc/twinblade.toml: resource.r0.foo: unknown key"),
            "{}",
            err(&unknown)
        );
        let bad_type = GOOD.replace("port = 7788", "port = \"x\"");
        assert!(
            err(&bad_type).starts_with("/etc/twinblade.toml: resource.r0.port: invalid type"),
            "{}",
            err(&bad_type)
        );
        let bad_ip = GOOD.replace("192.168.100.2", "not-an-ip");
        assert!(
            err(&bad_ip).starts_with("/etc/twinblade.toml: node.beta.address: "),
            "{}",
            err(&bad_ip)
        );
        let bad_protocol = GOOD.replace("port = 7788", "port = 7788\nprotocol = \"D\"");
        assert!(
            err(&bad_protocol).contains("resource.r0.protocol: unknown variant `D`"),
            "{}",
            err(&bad_protocol)
        );
        let bad_durability = GOOD.replace("port = 7788", "port = 7788\ndurability = \"disk\"");
        assert!(
            err(&bad_durability).contains("resource.r0.durability: unknown variant"),
            "{}",
            err(&bad_durability)
        );
        let bad_csums = GOOD.replace("port = 7788", "port = 7788\ncsums = \"md5\"");
        assert!(
            err(&bad_csums).contains(
                "resource.r0.csums: unknown variant `md5`, expected one of `crc32c`, `xxh3-128`, `blake3`"
            ),
            "{}",
            err(&bad_csums)
        );
        for &alg in ChecksumAlg::ALL {
            let chosen = GOOD.replace("port = 7788", &format!("port = 7788\ncsums = \"{alg}\""));
            let c = Config::parse(&chosen, "/etc/twinblade.toml").unwrap();
            assert_eq!(c.resource("r0").unwrap().csums, alg);
        }
        let no_on = GOOD.replace(
            "[resource.r0.on.beta]\ndisk = \"/dev/sdb\"\nmeta-disk = \"/dev/loop0\"\n",
            "",
        );
        assert_eq!(
            err(&no_on),
            "/etc/twinblade.toml: resource.r0.on.beta: missing"
        );
        let missing_cluster = GOOD.replace("[cluster]\nshared-secret = \"s3cret\"\n", "");
        assert_eq!(
            err(&missing_cluster),
            "/etc/twinblade.toml: cluster: missing"
        );
    }

    #[test]
    fn heartbeat_keys() {
        let c = Config::parse(GOOD, "f").unwrap();
        assert_eq!(
            c.heartbeat_paths("alpha"),
            vec![(
                "192.168.100.1".parse().unwrap(),
                "192.168.100.2".parse().unwrap()
            )],
            "one path by default: the replication addresses"
        );
        assert_eq!(c.cluster.heartbeat_port(), DEFAULT_HEARTBEAT_PORT);
        let two = GOOD
            .replace(
                "[node.alpha]\n",
                "[node.alpha]\nheartbeat = [\"192.168.100.1\", \"10.0.0.1\"]\n",
            )
            .replace(
                "[node.beta]\n",
                "[node.beta]\nheartbeat = [\"192.168.100.2\", \"10.0.0.2\"]\n",
            );
        let c = Config::parse(&two, "f").unwrap();
        assert_eq!(c.heartbeat_paths("beta").len(), 2);
        assert_eq!(
            c.heartbeat_paths("beta")[1],
            ("10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap())
        );
        let uneven = two.replace(", \"10.0.0.2\"]", "]");
        assert!(err(&uneven)
            .contains("node.beta.heartbeat: alpha lists 2 heartbeat path(s) and beta lists 1"));
        let same = two.replace("\"10.0.0.2\"", "\"10.0.0.1\"");
        assert!(err(&same).contains("both nodes use 10.0.0.1 for the same heartbeat path"));
        let twice = two.replace("\"10.0.0.2\"", "\"192.168.100.2\"");
        assert!(err(&twice).contains("node.beta.heartbeat: 192.168.100.2 is listed twice"));
        let timers = GOOD.replace(
            "shared-secret = \"s3cret\"",
            "shared-secret = \"s3cret\"\nheartbeat-interval = 0.5\nheartbeat-dead-time = 1.0",
        );
        assert!(err(&timers).contains(
            "cluster.heartbeat-dead-time: 1 s must be at least three heartbeat intervals"
        ));
        let fencing = GOOD.replace("port = 7788", "port = 7788\nfencing = \"dont-care\"");
        let c = Config::parse(&fencing, "f").unwrap();
        assert_eq!(
            c.resources["r0"]
                .machine_config("alpha", &c.cluster)
                .fencing,
            crate::cluster::Fencing::DontCare
        );
        let bad = GOOD.replace("port = 7788", "port = 7788\nfencing = \"stonith\"");
        assert!(err(&bad).contains("resource.r0.fencing"), "{}", err(&bad));
    }

    #[test]
    fn witness_keys() {
        let with = |lines: &str| {
            GOOD.replace(
                "shared-secret = \"s3cret\"",
                &format!("shared-secret = \"s3cret\"\n{lines}"),
            )
        };
        let c = Config::parse(GOOD, "f").unwrap();
        assert_eq!(c.pair_name(), "alpha-beta");
        assert_eq!(c.cluster.witness_addr(), None);
        let m = c.resources["r0"].machine_config("alpha", &c.cluster);
        assert!(!m.witness);
        let c = Config::parse(
            &with("name = \"lab\"\nwitness = \"10.0.0.9:7791\"\nwitness-timeout = 0.25"),
            "f",
        )
        .unwrap();
        assert_eq!(c.pair_name(), "lab");
        assert_eq!(
            c.cluster.witness_addr(),
            Some("10.0.0.9:7791".parse().unwrap())
        );
        assert_eq!(
            c.cluster.witness_timeout(),
            std::time::Duration::from_millis(250)
        );
        let m = c.resources["r0"].machine_config("beta", &c.cluster);
        assert!(m.witness);
        assert_eq!(m.witness_retry, std::time::Duration::from_secs(1));
        // An address alone gets the default port.
        let c = Config::parse(&with("witness = \"10.0.0.9\""), "f").unwrap();
        assert_eq!(
            c.cluster.witness_addr(),
            Some("10.0.0.9:7791".parse().unwrap())
        );
        for bad in [
            "witness = \"witness.lan:7791\"",
            "witness = \"10.0.0.9:port\"",
            "witness = \"\"",
        ] {
            let e = err(&with(bad));
            assert!(
                e.starts_with("/etc/twinblade.toml: cluster.witness: "),
                "{e}"
            );
        }
        for bad in ["0", "-1", "100", "nan"] {
            let e = err(&with(&format!("witness-timeout = {bad}")));
            assert!(e.contains("cluster.witness-timeout"), "{e}");
        }
        for bad in ["", "a b", "tab\\there"] {
            let e = err(&with(&format!("name = \"{bad}\"")));
            assert!(e.starts_with("/etc/twinblade.toml: cluster.name: "), "{e}");
        }
        let e = err(&with(&format!("name = \"{}\"", "x".repeat(65))));
        assert!(e.contains("cluster.name"), "{e}");
    }

    #[test]
    fn fence_keys() {
        use std::os::unix::fs::PermissionsExt;
        let c = Config::parse(GOOD, "f").unwrap();
        assert_eq!(c.cluster.fence_peer, None);
        assert_eq!(
            c.cluster.fence_timeout(),
            std::time::Duration::from_secs(10)
        );
        assert!(
            !c.resources["r0"]
                .machine_config("alpha", &c.cluster)
                .fence_peer
        );
        assert!(
            c.check_local_files().is_ok(),
            "nothing to check without the key"
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fence");
        std::fs::write(&script, "#!/bin/sh\nexit 7\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let with = |lines: &str| {
            GOOD.replace(
                "shared-secret = \"s3cret\"",
                &format!("shared-secret = \"s3cret\"\n{lines}"),
            )
        };
        let text = with(&format!(
            "fence-peer = \"{}\"\nfence-timeout = 2.5",
            script.display()
        ));
        let c = Config::parse(&text, "f").unwrap();
        assert_eq!(
            c.cluster.fence_timeout(),
            std::time::Duration::from_millis(2500)
        );
        let m = c.resources["r0"].machine_config("alpha", &c.cluster);
        assert!(m.fence_peer);
        assert_eq!(m.fence_retry, std::time::Duration::from_millis(2500));
        c.check_local_files().unwrap();
        // Errors name the key: a relative path and a bad timeout at parse time, ...
        let e = err(&with("fence-peer = \"fence.sh\""));
        assert_eq!(
            e,
            "/etc/twinblade.toml: cluster.fence-peer: fence.sh is not an absolute path"
        );
        for t in ["0", "-1", "0.0", "nan", "inf", "4000"] {
            let e = err(&with(&format!("fence-timeout = {t}")));
            assert!(
                e.starts_with("/etc/twinblade.toml: cluster.fence-timeout: "),
                "{t}: {e}"
            );
        }
        let e = err(&with("fence-timeout = \"10s\""));
        assert!(e.contains("cluster.fence-timeout: invalid type"), "{e}");
        // ... a missing or not executable file at the daemon's start.
        let missing = dir.path().join("nope");
        let c = Config::parse(
            &with(&format!("fence-peer = \"{}\"", missing.display())),
            "f",
        )
        .unwrap();
        let e = c.check_local_files().unwrap_err().to_string();
        assert!(
            e.starts_with("f: cluster.fence-peer: ") && e.contains("nope"),
            "{e}"
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Config::parse(&text, "f").unwrap();
        let e = c.check_local_files().unwrap_err().to_string();
        assert!(
            e.ends_with("is not executable") && e.contains("cluster.fence-peer"),
            "{e}"
        );
        let c = Config::parse(
            &with(&format!("fence-peer = \"{}\"", dir.path().display())),
            "f",
        )
        .unwrap();
        let e = c.check_local_files().unwrap_err().to_string();
        assert!(e.ends_with("is not a file"), "{e}");
    }

    #[test]
    fn validates_semantics() {
        let three = format!("{GOOD}[node.gamma]\naddress = \"10.0.0.3\"\ninterface = \"eth0\"\n");
        assert!(err(&three).contains("node: exactly two nodes are needed, found 3"));
        for (aoe, ok) in [
            ("e0.3", true),
            ("e65534.254", true),
            ("e65535.0", false),
            ("e0.255", false),
            ("0.3", false),
            ("e0", false),
            ("e+1.2", false),
        ] {
            let text = GOOD.replace("\"e0.3\"", &format!("{aoe:?}"));
            assert_eq!(Config::parse(&text, "f").is_ok(), ok, "{aoe}");
            if !ok {
                assert!(err(&text).contains("resource.r0.aoe: "), "{aoe}");
            }
        }
        let second = r#"
[resource.r1]
aoe = "e0.3"
port = 7789
[resource.r1.on.alpha]
disk = "/a"
meta-disk = "internal"
[resource.r1.on.beta]
disk = "/b"
meta-disk = "internal"
"#;
        assert!(err(&format!("{GOOD}{second}"))
            .contains("resource.r1.aoe: e0.3 is already used by resource r0"));
        let same_port = second.replace("e0.3", "e0.4").replace("7789", "7788");
        assert!(err(&format!("{GOOD}{same_port}"))
            .contains("resource.r1.port: 7788 is already used by resource r0"));
        let ok = second.replace("e0.3", "e0.4");
        assert_eq!(
            Config::parse(&format!("{GOOD}{ok}"), "f")
                .unwrap()
                .resources
                .len(),
            2
        );
        let stranger =
            format!("{GOOD}[resource.r0.on.gamma]\ndisk = \"/x\"\nmeta-disk = \"internal\"\n");
        assert!(err(&stranger).contains("resource.r0.on.gamma: gamma is not a [node.*]"));
        let al = GOOD.replace("port = 7788", "port = 7788\nal-extents = 3");
        assert!(err(&al).contains("resource.r0.al-extents: 3 is outside 7..65534"));
        let kib = GOOD.replace("port = 7788", "port = 7788\nal-extent-kib = 100");
        assert!(err(&kib).contains("resource.r0.al-extent-kib"));
        let kib = GOOD.replace(
            "port = 7788",
            "port = 7788\nal-extent-kib = 1024\nal-extents = 6433",
        );
        let params = Config::parse(&kib, "f").unwrap().resources["r0"].layout_params();
        assert_eq!(
            params,
            LayoutParams {
                al_extents: 6433,
                al_extent_shift: 20
            }
        );
    }

    #[test]
    fn service_mac_and_floating_ip() {
        let c = Config::parse(GOOD, "/etc/twinblade.toml").unwrap();
        let r0 = c.resource("r0").unwrap();
        // Default: the derived MAC, the same whichever node asks.
        let derived = crate::export::aoe::service_mac_for(("alpha", "beta"), 0, 3);
        assert_eq!(r0.service_mac(("alpha", "beta")), Some(derived));
        assert_eq!(r0.service_mac(("beta", "alpha")), Some(derived));
        assert_eq!(r0.floating_ip(), None);
        let with = |keys: &str| GOOD.replace("port = 7788\n", &format!("port = 7788\n{keys}\n"));
        let c = Config::parse(
            &with("mac = \"own\"\nfloating-ip = \"10.77.0.100/24\""),
            "/etc/twinblade.toml",
        )
        .unwrap();
        let r0 = c.resource("r0").unwrap();
        assert_eq!(r0.service_mac(("alpha", "beta")), None);
        assert_eq!(r0.floating_ip().unwrap().to_string(), "10.77.0.100/24");
        let c = Config::parse(&with("mac = \"02:00:5e:10:00:03\""), "/etc/twinblade.toml").unwrap();
        assert_eq!(
            c.resource("r0")
                .unwrap()
                .service_mac(("alpha", "beta"))
                .unwrap()
                .to_string(),
            "02:00:5e:10:00:03"
        );
        for (keys, expect) in [
            (
                "mac = \"nope\"",
                "resource.r0.mac: \"nope\" is not \"auto\", \"own\" or a MAC address",
            ),
            (
                "mac = \"01:00:5e:00:00:01\"",
                "resource.r0.mac: 01:00:5e:00:00:01 is a multicast",
            ),
            (
                "floating-ip = \"10.77.0.100\"",
                "resource.r0.floating-ip: floating IP \"10.77.0.100\" has no prefix length",
            ),
            (
                "floating-ip = \"10.77.0.300/24\"",
                "resource.r0.floating-ip: floating IP \"10.77.0.300/24\": \"10.77.0.300\" is not",
            ),
            (
                "floating-ip = \"192.168.100.1/24\"",
                "is node alpha's own address",
            ),
        ] {
            let e = err(&with(keys));
            assert!(e.contains(expect), "{keys}: {e}");
        }
        // Two resources may not share a MAC or a floating IP.
        let shared = |keys: &str| {
            format!(
                "{GOOD}[resource.r1]\naoe = \"e0.4\"\nport = 7789\n{keys}\n[resource.r1.on.alpha]\ndisk = \"/a\"\nmeta-disk = \"internal\"\n[resource.r1.on.beta]\ndisk = \"/b\"\nmeta-disk = \"internal\"\n"
            )
            .replace("port = 7788\n", &format!("port = 7788\n{keys}\n"))
        };
        let e = err(&shared("mac = \"02:00:5e:10:00:03\""));
        assert!(
            e.contains("resource.r1.mac: 02:00:5e:10:00:03 is already used by resource r0"),
            "{e}"
        );
        let e = err(&shared("floating-ip = \"10.77.0.100/24\""));
        assert!(
            e.contains("resource.r1.floating-ip: 10.77.0.100 is already used by resource r0"),
            "{e}"
        );
    }

    #[test]
    fn shipped_examples_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/examples");
        for name in ["twinblade.toml", "lab.toml"] {
            let c = Config::load(dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.nodes.len(), 2, "{name}");
            assert!(c.resources.contains_key("r0"), "{name}");
        }
        let err = Config::load("/nonexistent/twinblade.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/twinblade.toml: "), "{err}");
    }
}
