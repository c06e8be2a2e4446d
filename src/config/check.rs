//! `twinblade check-config`: what can be known about a configuration before it runs, and the
//! effective settings with every default filled in (as `drbdadm dump`, `keepalived -t`).
//!
//! [`Config::parse`](super::Config::parse) has already checked the file itself (both node
//! sections, addresses, shelf.slot, MAC and floating-IP collisions, heartbeat paths, timers).
//! [`check`] adds what it leaves out:
//!
//! * in the file: two resources using the same disk or meta-disk on a node, NBD exports that
//!   overlap each other or a replication port, an NBD export on a node's own address (the peer
//!   cannot serve it after a failover), a single heartbeat path;
//! * on this machine, for this node only ([`Host`]): the client interface exists; the
//!   replication and heartbeat addresses and a fixed NBD address can be bound; each disk and
//!   external meta-disk exists and is a regular file or block device, and its size holds the
//!   meta-data (the usable size is reported); a `shared-secret-file` is private and readable;
//!   a `fence-peer` command exists and is executable.
//!
//! It opens no disk: sizes come from `stat` and, for block devices, sysfs. Nothing is created
//! or written. [`dump`] renders the effective settings as TOML that loads again, the secret as
//! `<hidden>`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::{Config, MetaDisk};
use crate::meta::layout::Layout;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file is wrong: no machine can run it.
    FileError,
    /// This machine does not fit the file (interface, address, disk, secret file).
    HostError,
    /// Worth knowing; the configuration runs.
    Warning,
}

/// One problem, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// Dotted key path (`resource.r0.on.alpha.disk`).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

/// What a disk path is on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// Nothing there.
    Missing,
    /// `stat` failed otherwise.
    Unreadable(String),
    /// Neither a regular file nor a block device (a directory, a character device, …).
    Other(&'static str),
    /// A regular file of this many bytes.
    File(u64),
    /// A block device of this many bytes (`None`: sysfs did not say).
    Block(Option<u64>),
}

/// The questions [`check`] asks of the machine it runs on (a fake one in tests).
pub trait Host {
    /// Whether a network interface of this name exists.
    fn interface_exists(&self, name: &str) -> bool;
    /// Whether a socket can bind to `ip` (the address is this machine's).
    fn can_bind(&self, ip: IpAddr) -> Result<(), String>;
    /// What is at `path`, without opening it.
    fn disk(&self, path: &Path) -> Disk;
    /// Checks and reads a secret file (see [`super::secret::read_secret_file`]).
    fn secret_file(&self, path: &Path) -> Result<(), String>;
}

/// The machine this process runs on.
pub struct ThisMachine;

impl Host for ThisMachine {
    fn interface_exists(&self, name: &str) -> bool {
        // This network namespace's interfaces, as the AoE server looks them up.
        pnet::datalink::interfaces().iter().any(|i| i.name == name)
    }

    fn can_bind(&self, ip: IpAddr) -> Result<(), String> {
        std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn disk(&self, path: &Path) -> Disk {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Disk::Missing,
            Err(e) => return Disk::Unreadable(e.to_string()),
        };
        let t = m.file_type();
        if t.is_file() {
            Disk::File(m.len())
        } else if t.is_block_device() {
            let rdev = m.rdev();
            // glibc's gnu_dev_major / gnu_dev_minor.
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            let sectors = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            Disk::Block(sectors.map(|s| s * 512))
        } else if t.is_dir() {
            Disk::Other("directory")
        } else if t.is_char_device() {
            Disk::Other("character device")
        } else {
            Disk::Other("special file")
        }
    }

    fn secret_file(&self, path: &Path) -> Result<(), String> {
        super::secret::read_secret_file(path).map(drop)
    }
}

/// What [`check`] found: the problems, and facts about this machine the dump shows as
/// comments (key → text).
#[derive(Debug, Default)]
pub struct Checked {
    /// Every problem, in the file's order.
    pub findings: Vec<Finding>,
    /// Sizes and the like, by key.
    pub facts: BTreeMap<String, String>,
}

impl Checked {
    fn add(&mut self, severity: Severity, key: impl Into<String>, problem: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            key: key.into(),
            problem: problem.into(),
        });
    }

    /// Whether anything is an error.
    pub fn has_errors(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity != Severity::Warning)
    }
}

/// Checks `config` (already parsed and validated as a file) beyond the file itself; `node` is
/// the local node, and `host`, if given, the machine to check it against.
pub fn check(config: &Config, node: Option<&str>, host: Option<&dyn Host>) -> Checked {
    let mut out = Checked::default();
    check_file(config, &mut out);
    if let (Some(node), Some(host)) = (node, host) {
        check_host(config, node, host, &mut out);
    }
    out
}

fn check_file(config: &Config, out: &mut Checked) {
    use Severity::{FileError, Warning};
    for (name, n) in &config.nodes {
        if n.heartbeat_addresses().len() == 1 {
            out.add(
                Warning,
                format!("node.{name}.heartbeat"),
                "one heartbeat path: a cut replication link cannot be told from a dead peer; \
                 list the client-network address too",
            );
        }
    }
    // One disk, one resource.
    for node in config.nodes.keys() {
        let mut seen: BTreeMap<&Path, (&str, &str)> = BTreeMap::new();
        for (rname, res) in &config.resources {
            let on = &res.on[node];
            let mut paths = vec![("disk", on.disk.as_path())];
            if let MetaDisk::External(p) = &on.meta_disk {
                paths.push(("meta-disk", p.as_path()));
            }
            for (role, path) in paths {
                if let Some((other, other_role)) = seen.get(path) {
                    out.add(
                        FileError,
                        format!("resource.{rname}.on.{node}.{role}"),
                        format!(
                            "{} is also resource {other}'s {other_role} on {node}",
                            path.display()
                        ),
                    );
                } else {
                    seen.insert(path, (rname, role));
                }
            }
        }
    }
    // NBD exports: not on each other, not on a replication port, not on a node's address.
    let overlaps = |a: IpAddr, b: IpAddr| a == b || a.is_unspecified() || b.is_unspecified();
    let mut nbd_seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (rname, res) in &config.resources {
        let Some(nbd) = res.nbd else { continue };
        let key = format!("resource.{rname}.nbd");
        if let Some((other, addr)) = nbd_seen
            .iter()
            .find(|(_, a)| a.port() == nbd.port() && overlaps(a.ip(), nbd.ip()))
        {
            out.add(
                FileError,
                &key,
                format!("{nbd} overlaps resource {other}'s NBD export {addr}"),
            );
        }
        nbd_seen.push((rname, nbd));
        for (other, o) in &config.resources {
            let on_node = config.nodes.values().any(|n| overlaps(n.address, nbd.ip()));
            if o.port == nbd.port() && on_node {
                out.add(
                    FileError,
                    &key,
                    format!(
                        "{nbd}: port {} is resource {other}'s replication port",
                        o.port
                    ),
                );
            }
        }
        let own = config
            .nodes
            .iter()
            .find(|(_, n)| n.address == nbd.ip() || n.heartbeat_addresses().contains(&nbd.ip()));
        if let Some((owner, _)) = own {
            out.add(
                Warning,
                &key,
                format!(
                    "{} is node {owner}'s own address: after a failover the other node cannot \
                     serve it (use the floating IP)",
                    nbd.ip()
                ),
            );
        }
    }
}

fn check_host(config: &Config, node: &str, host: &dyn Host, out: &mut Checked) {
    use Severity::HostError;
    let n = &config.nodes[node];
    let key = |k: &str| format!("node.{node}.{k}");
    if !host.interface_exists(&n.interface) {
        out.add(
            HostError,
            key("interface"),
            format!("this machine has no interface {}", n.interface),
        );
    }
    if let Err(e) = host.can_bind(n.address) {
        out.add(
            HostError,
            key("address"),
            format!("{} is not an address of this machine ({e})", n.address),
        );
    }
    for addr in n.heartbeat_addresses() {
        if addr == n.address {
            continue; // checked above
        }
        if let Err(e) = host.can_bind(addr) {
            out.add(
                HostError,
                key("heartbeat"),
                format!("{addr} is not an address of this machine ({e})"),
            );
        }
    }
    if let Some(path) = &config.cluster.shared_secret_file {
        match host.secret_file(path) {
            Ok(()) => {
                out.facts.insert(
                    "cluster.shared-secret-file".into(),
                    "private, readable".into(),
                );
            }
            Err(e) => out.add(HostError, "cluster.shared-secret-file", e),
        }
    }
    if let Err((key, problem)) = config.cluster.check_fence_peer() {
        out.add(HostError, key, problem);
    }
    for (rname, res) in &config.resources {
        if let Some(nbd) = res.nbd {
            let floating = res.floating_ip().map(|f| f.address);
            if !nbd.ip().is_unspecified() && Some(nbd.ip()) != floating {
                if let Err(e) = host.can_bind(nbd.ip()) {
                    out.add(
                        HostError,
                        format!("resource.{rname}.nbd"),
                        format!(
                            "{} is neither the floating IP nor an address of this machine ({e})",
                            nbd.ip()
                        ),
                    );
                }
            }
        }
        check_disks(rname, res, node, host, out);
    }
}

fn check_disks(rname: &str, res: &super::Resource, node: &str, host: &dyn Host, out: &mut Checked) {
    use Severity::HostError;
    let on = &res.on[node];
    let key = |k: &str| format!("resource.{rname}.on.{node}.{k}");
    // The size of one disk, or the finding that says why there is none.
    let mut size_of = |k: &str, path: &Path| -> Option<u64> {
        let shown = path.display();
        let (size, kind) = match host.disk(path) {
            Disk::Missing => {
                let hint = if k == "disk" {
                    format!(" (create it, then: twinblade create-md {rname})")
                } else {
                    String::new()
                };
                out.add(HostError, key(k), format!("{shown} does not exist{hint}"));
                return None;
            }
            Disk::Unreadable(e) => {
                out.add(HostError, key(k), format!("{shown}: {e}"));
                return None;
            }
            Disk::Other(what) => {
                out.add(
                    HostError,
                    key(k),
                    format!("{shown} is a {what}, not a regular file or block device"),
                );
                return None;
            }
            Disk::Block(None) => {
                out.facts
                    .insert(key(k), "block device of unknown size".into());
                return None;
            }
            Disk::File(s) => (s, "regular file"),
            Disk::Block(Some(s)) => (s, "block device"),
        };
        if size == 0 {
            out.add(HostError, key(k), format!("{shown} is empty (0 bytes)"));
            return None;
        }
        out.facts
            .insert(key(k), format!("{kind}, {}", bytes_text(size)));
        Some(size)
    };
    let data = size_of("disk", &on.disk);
    let layout = match &on.meta_disk {
        MetaDisk::Internal => data.map(|d| Layout::internal(d, res.layout_params())),
        MetaDisk::External(path) => {
            let meta = size_of("meta-disk", path);
            data.zip(meta)
                .map(|(d, m)| Layout::external(d, m, res.layout_params()))
        }
    };
    match layout {
        Some(Ok(l)) => {
            let where_ = match on.meta_disk {
                MetaDisk::Internal => "at the end of the disk",
                MetaDisk::External(_) => "on the meta-disk",
            };
            let text = format!(
                "meta-data {} {where_}; usable {}",
                bytes_text(l.md_size),
                bytes_text(l.data_size)
            );
            let fact = out.facts.entry(key("meta-disk")).or_default();
            if !fact.is_empty() {
                fact.push_str("; ");
            }
            fact.push_str(&text);
        }
        Some(Err(e)) => out.add(HostError, key("meta-disk"), e.to_string()),
        None => {}
    }
}

/// `1073741824 bytes (1.00 GiB)`.
fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({v:.2} {})", UNITS[unit])
}

/// A byte count as the file writes it: `"10M"` when a whole number of a binary unit, else
/// the integer.
fn bytes_value(n: u64) -> String {
    for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("\"{}{suffix}\"", n >> shift);
        }
    }
    n.to_string()
}

/// Seconds as a TOML float (`0.2`, `60.0`); `None` (forever) is `0.0`.
fn secs(d: Option<Duration>) -> String {
    let s = d.map_or(0.0, |d| d.as_secs_f64());
    if s.fract() == 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s}")
    }
}

fn quoted(s: impl std::fmt::Display) -> String {
    let s = s.to_string();
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Names every field of every section, so that a key added to the file fails to compile
/// until [`dump`] writes it too (then list it here).
fn keys_are_all_dumped(config: &Config) {
    let super::Cluster {
        shared_secret: _,
        shared_secret_file: _,
        file_secret: _,
        heartbeat_port: _,
        heartbeat_interval: _,
        heartbeat_dead_time: _,
        fence_peer: _,
        fence_timeout: _,
        name: _,
        witness: _,
        witness_timeout: _,
        ping: _,
        ping_interval: _,
        ping_dead_time: _,
        ping_switch_delay: _,
    } = &config.cluster;
    for n in config.nodes.values() {
        let super::Node {
            address: _,
            interface: _,
            heartbeat: _,
            metrics: _,
        } = n;
    }
    for r in config.resources.values() {
        let super::Resource {
            aoe: _,
            port: _,
            protocol: _,
            durability: _,
            csums: _,
            al_extents: _,
            al_extent_kib: _,
            wfc_timeout: _,
            degr_wfc_timeout: _,
            dead_time: _,
            timeout: _,
            ko_count: _,
            auto_promote: _,
            preferred_primary: _,
            auto_failback: _,
            failback_delay: _,
            nbd: _,
            mac: _,
            floating_ip: _,
            fencing: _,
            on_no_quorum: _,
            on_no_quorum_timeout: _,
            resync_rate_max: _,
            resync_rate_min: _,
            resync_fill_target: _,
            resync_plan_ahead: _,
            on,
        } = r;
        for o in on.values() {
            let super::OnNode {
                disk: _,
                meta_disk: _,
            } = o;
        }
    }
}

/// The dump being written: lines `key = value`, each followed by its note or fact.
struct Dump<'a> {
    out: String,
    facts: &'a BTreeMap<String, String>,
    table: String,
}

impl Dump<'_> {
    fn table(&mut self, name: String, note: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[{name}]{note}");
        self.table = name;
    }

    fn kv(&mut self, k: &str, v: impl std::fmt::Display, note: Option<String>) {
        let text = format!("{k} = {v}");
        let note = note.or_else(|| self.facts.get(&format!("{}.{k}", self.table)).cloned());
        let _ = match note {
            Some(n) => writeln!(self.out, "{text:<40} # {n}"),
            None => writeln!(self.out, "{text}"),
        };
    }

    /// A key without a value: a comment, so the text still loads.
    fn none(&mut self, k: &str, what: &str) {
        let _ = writeln!(self.out, "# {k}: {what}");
    }
}

/// The effective settings of `config` as TOML, every default filled in, the secret hidden;
/// `node` is marked as this node, and `facts` (from [`check`]) follow their keys as comments.
/// The text loads again as a configuration (with the secret `"<hidden>"`).
pub fn dump(config: &Config, node: Option<&str>, facts: &BTreeMap<String, String>) -> String {
    use super::secret::HIDDEN;
    let mut d = Dump {
        out: format!(
            "# {}: effective settings, defaults filled in\n",
            config.path.display()
        ),
        facts,
        table: String::new(),
    };
    keys_are_all_dumped(config);
    let c = &config.cluster;
    d.table("cluster".into(), "");
    match &c.shared_secret_file {
        Some(path) => {
            let fact = facts
                .get("cluster.shared-secret-file")
                .map_or(String::new(), |f| format!(" ({f})"));
            d.kv(
                "shared-secret-file",
                quoted(path.display()),
                Some(format!("the secret: {HIDDEN}{fact}")),
            )
        }
        None => d.kv("shared-secret", quoted(HIDDEN), None),
    }
    d.kv("heartbeat-port", c.heartbeat_port(), None);
    d.kv(
        "heartbeat-interval",
        secs(Some(c.heartbeat_interval())),
        None,
    );
    d.kv(
        "heartbeat-dead-time",
        secs(Some(c.heartbeat_dead_time())),
        Some(format!(
            "lease {} ms, wire-guard wait {} ms, takeover delay {} ms",
            (c.heartbeat_dead_time() * 2 / 3).as_millis(),
            c.wire_guard_wait().as_millis(),
            c.takeover_delay().as_millis()
        )),
    );
    if let Some(path) = &c.fence_peer {
        d.kv(
            "fence-peer",
            quoted(path.display()),
            Some("exit 4 (peer outdated) or 7 (peer fenced) lets a node serve alone".into()),
        );
        d.kv("fence-timeout", secs(Some(c.fence_timeout())), None);
    }
    d.kv(
        "name",
        quoted(config.pair_name()),
        Some("the pair's name at the witness".into()),
    );
    if let Some(addr) = c.witness_addr() {
        d.kv(
            "witness",
            quoted(addr),
            Some("its grant of our generation lets a node serve alone".into()),
        );
        d.kv(
            "witness-timeout",
            secs(Some(c.witness_timeout())),
            Some(format!("{} tries", super::WITNESS_TRIES)),
        );
    }
    let targets = c.ping_targets();
    if targets.is_empty() {
        d.none("ping", "no ping targets");
    } else {
        let list: Vec<String> = targets.iter().map(quoted).collect();
        d.kv(
            "ping",
            format!("[{}]", list.join(", ")),
            Some("never fail over to the node that reaches fewer of them".into()),
        );
        d.kv("ping-interval", secs(Some(c.ping_interval())), None);
        d.kv("ping-dead-time", secs(Some(c.ping_dead_time())), None);
        d.kv(
            "ping-switch-delay",
            secs(Some(c.ping_switch_delay())),
            Some("a primary reaching fewer than its secondary this long hands over".into()),
        );
    }
    for (name, n) in &config.nodes {
        let role = match node {
            Some(me) if me == name => "  # this node",
            Some(_) => "  # the peer",
            None => "",
        };
        d.table(format!("node.{name}"), role);
        d.kv("address", quoted(n.address), None);
        d.kv("interface", quoted(&n.interface), None);
        let hb: Vec<String> = n.heartbeat_addresses().iter().map(quoted).collect();
        d.kv("heartbeat", format!("[{}]", hb.join(", ")), None);
        match n.metrics {
            Some(a) => d.kv("metrics", quoted(a), None),
            None => d.none("metrics", "not served"),
        }
    }
    let names = config.node_names();
    for (rname, r) in &config.resources {
        d.table(format!("resource.{rname}"), "");
        d.kv("aoe", quoted(r.aoe_address()), None);
        d.kv("port", r.port, None);
        d.kv("protocol", quoted(r.protocol.as_str()), None);
        d.kv("durability", quoted(r.durability.as_str()), None);
        d.kv("csums", quoted(r.csums.as_str()), None);
        let layout = r.layout_params();
        d.kv("al-extents", layout.al_extents, None);
        d.kv("al-extent-kib", 1u64 << (layout.al_extent_shift - 10), None);
        // Timers and policy as the state machine gets them (any node: only
        // preferred-primary differs, and it is written by name below).
        let m = r.machine_config(names.0, c);
        d.kv(
            "wfc-timeout",
            secs(m.wfc_timeout),
            m.wfc_timeout.is_none().then(|| "forever".into()),
        );
        d.kv(
            "degr-wfc-timeout",
            secs(m.degr_wfc_timeout),
            m.degr_wfc_timeout.is_none().then(|| "forever".into()),
        );
        d.kv("dead-time", secs(Some(m.dead_time)), None);
        d.kv("timeout", secs(Some(m.timeout)), None);
        d.kv(
            "ko-count",
            m.ko_count,
            (m.ko_count == 0).then(|| "never drop a slow peer".into()),
        );
        d.kv("auto-promote", m.auto_promote, None);
        match &r.preferred_primary {
            Some(p) => d.kv("preferred-primary", quoted(p), None),
            None => d.none("preferred-primary", "none"),
        }
        d.kv(
            "auto-failback",
            m.auto_failback,
            (!m.auto_failback).then(|| "stays where a failover put it".into()),
        );
        d.kv("failback-delay", secs(Some(m.failback_delay)), None);
        let fencing = match r.fencing {
            crate::cluster::Fencing::ResourceOnly => "resource-only",
            crate::cluster::Fencing::DontCare => "dont-care",
        };
        d.kv("fencing", quoted(fencing), None);
        let quorum = r.on_no_quorum();
        d.kv("on-no-quorum", quoted(quorum.word()), None);
        match quorum.timeout() {
            Some(t) => d.kv("on-no-quorum-timeout", secs(Some(t)), None),
            None => d.none(
                "on-no-quorum-timeout",
                "none (suspend-io holds requests until the gate opens)",
            ),
        }
        let mac_word = match r.mac.as_deref() {
            None | Some("auto") => "auto",
            Some("own") => "own",
            Some(m) => m,
        };
        let mac_note = match r.service_mac(names) {
            Some(mac) if mac_word == "auto" => Some(format!("{mac}")),
            None => Some("the interface's own".into()),
            Some(_) => None,
        };
        d.kv("mac", quoted(mac_word), mac_note);
        match r.floating_ip() {
            Some(ip) => d.kv("floating-ip", quoted(ip), None),
            None => d.none("floating-ip", "none"),
        }
        match r.nbd {
            Some(a) => d.kv("nbd", quoted(a), None),
            None => d.none("nbd", "none (AoE only)"),
        }
        let rate = r.rate_config();
        let rate_value = |v: Option<u64>| match v {
            None | Some(u64::MAX) => quoted("unlimited"),
            Some(n) => bytes_value(n),
        };
        d.kv("resync-rate-max", rate_value(rate.max_rate), None);
        d.kv("resync-rate-min", rate_value(Some(rate.min_rate)), None);
        d.kv("resync-fill-target", bytes_value(rate.fill_target), None);
        d.kv("resync-plan-ahead", secs(Some(rate.plan_ahead)), None);
        for (n, on) in &r.on {
            d.table(format!("resource.{rname}.on.{n}"), "");
            d.kv("disk", quoted(on.disk.display()), None);
            let meta = match &on.meta_disk {
                MetaDisk::Internal => "internal".to_string(),
                MetaDisk::External(p) => p.display().to_string(),
            };
            d.kv("meta-disk", quoted(meta), None);
        }
    }
    d.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;

    const FILE: &str = r#"
[cluster]
shared-secret = "the-real-secret-42"
[node.alpha]
address = "192.168.100.1"
interface = "eth0"
heartbeat = ["192.168.100.1", "10.0.0.181"]
[node.beta]
address = "192.168.100.2"
interface = "eth0"
heartbeat = ["192.168.100.2", "10.0.0.182"]
[resource.r0]
aoe = "e0.3"
port = 7788
floating-ip = "10.0.0.100/24"
nbd = "10.0.0.100:10809"
[resource.r0.on.alpha]
disk = "/srv/r0.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "/dev/sdb"
meta-disk = "/dev/loop0"
"#;

    /// A machine made of sets.
    struct Fake {
        interfaces: HashSet<&'static str>,
        addresses: HashSet<IpAddr>,
        disks: HashMap<PathBuf, Disk>,
        secret: Result<(), String>,
    }

    impl Fake {
        /// alpha's machine, fitting FILE.
        fn alpha() -> Fake {
            Fake {
                interfaces: ["lo", "eth0"].into(),
                addresses: ["192.168.100.1", "10.0.0.181"]
                    .iter()
                    .map(|a| a.parse().unwrap())
                    .collect(),
                disks: [(PathBuf::from("/srv/r0.img"), Disk::File(1 << 30))].into(),
                secret: Ok(()),
            }
        }
    }

    impl Host for Fake {
        fn interface_exists(&self, name: &str) -> bool {
            self.interfaces.contains(name)
        }
        fn can_bind(&self, ip: IpAddr) -> Result<(), String> {
            if self.addresses.contains(&ip) {
                Ok(())
            } else {
                Err("Cannot assign requested address".into())
            }
        }
        fn disk(&self, path: &Path) -> Disk {
            self.disks.get(path).cloned().unwrap_or(Disk::Missing)
        }
        fn secret_file(&self, _: &Path) -> Result<(), String> {
            self.secret.clone()
        }
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, "/etc/twinblade.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn errors(text: &str, host: &Fake) -> Vec<String> {
        check(&parse(text), Some("alpha"), Some(host))
            .findings
            .iter()
            .filter(|f| f.severity != Severity::Warning)
            .map(|f| format!("{}: {}", f.key, f.problem))
            .collect()
    }

    #[test]
    fn a_fitting_machine_passes_and_the_dump_shows_its_sizes() {
        let c = parse(FILE);
        let checked = check(&c, Some("alpha"), Some(&Fake::alpha()));
        assert!(checked.findings.is_empty(), "{:?}", checked.findings);
        let text = dump(&c, Some("alpha"), &checked.facts);
        for line in [
            "[node.alpha]  # this node",
            "[node.beta]  # the peer",
            "protocol = \"C\"",
            "csums = \"xxh3-128\"",
            "al-extents = 1237",
            "wfc-timeout = 0.0",
            "ko-count = 7",
            "resync-rate-max = \"unlimited\"",
            "resync-rate-min = \"10M\"",
            "regular file, 1073741824 bytes (1.00 GiB)",
            "usable 10",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
    }

    #[test]
    fn the_dump_hides_the_secret_and_loads_again() {
        let c = parse(FILE);
        let text = dump(&c, None, &BTreeMap::new());
        assert!(!text.contains("the-real-secret-42"), "{text}");
        assert!(text.contains("shared-secret = \"<hidden>\""), "{text}");
        assert!(!format!("{c:?}").contains("the-real-secret-42"));
        assert!(format!("{c:?}").contains("<hidden>"));
        // Every default written out: loading the dump gives the same settings.
        let again = Config::parse(&text, "/etc/twinblade.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dump(&again, None, &BTreeMap::new()), text);
        let (r, s) = (&c.resources["r0"], &again.resources["r0"]);
        assert_eq!(
            r.machine_config("alpha", &c.cluster),
            s.machine_config("alpha", &again.cluster)
        );
        assert_eq!(r.rate_config(), s.rate_config());
        assert_eq!(r.layout_params(), s.layout_params());
        assert_eq!(
            r.service_mac(("alpha", "beta")),
            s.service_mac(("alpha", "beta"))
        );
        // The metrics address: written when set, a comment when not; loads again.
        assert!(text.contains("# metrics: not served"), "{text}");
        let with = text.replacen("# metrics: not served", "metrics = \"127.0.0.1:9942\"", 1);
        let again = Config::parse(&with, "/etc/twinblade.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dump(&again, None, &BTreeMap::new()), with);
        assert_eq!(
            again
                .nodes
                .values()
                .filter_map(|n| n.metrics)
                .collect::<Vec<_>>(),
            vec!["127.0.0.1:9942".parse().unwrap()]
        );
        let file = FILE.replace(
            "shared-secret = \"the-real-secret-42\"",
            "shared-secret-file = \"/etc/twinblade/secret\"",
        );
        let text = dump(&parse(&file), None, &BTreeMap::new());
        assert!(
            text.contains("shared-secret-file = \"/etc/twinblade/secret\"")
                && text.contains("<hidden>"),
            "{text}"
        );
    }

    #[test]
    fn each_machine_problem_names_its_key() {
        let mut host = Fake::alpha();
        host.interfaces.remove("eth0");
        assert_eq!(
            errors(FILE, &host),
            ["node.alpha.interface: this machine has no interface eth0"]
        );
        let mut host = Fake::alpha();
        host.addresses.remove(&"10.0.0.181".parse().unwrap());
        let e = errors(FILE, &host);
        assert!(
            e.len() == 1 && e[0].starts_with("node.alpha.heartbeat: 10.0.0.181 is not an address"),
            "{e:?}"
        );
        let mut host = Fake::alpha();
        host.addresses.remove(&"192.168.100.1".parse().unwrap());
        let e = errors(FILE, &host);
        assert!(
            e.len() == 1 && e[0].starts_with("node.alpha.address: 192.168.100.1 is not"),
            "{e:?}"
        );
        let mut host = Fake::alpha();
        host.disks.clear();
        assert_eq!(
            errors(FILE, &host),
            ["resource.r0.on.alpha.disk: /srv/r0.img does not exist (create it, then: twinblade create-md r0)"]
        );
        let mut host = Fake::alpha();
        host.disks
            .insert("/srv/r0.img".into(), Disk::File(16 << 10));
        let e = errors(FILE, &host);
        assert!(
            e.len() == 1
                && e[0].starts_with(
                    "resource.r0.on.alpha.meta-disk: device of 16384 bytes is too small"
                ),
            "{e:?}"
        );
        let mut host = Fake::alpha();
        host.disks
            .insert("/srv/r0.img".into(), Disk::Other("directory"));
        assert_eq!(
            errors(FILE, &host),
            ["resource.r0.on.alpha.disk: /srv/r0.img is a directory, not a regular file or block device"]
        );
        // Beta's disks are not this machine's business; its own are.
        let external = FILE.replace(
            "disk = \"/srv/r0.img\"\nmeta-disk = \"internal\"",
            "disk = \"/srv/r0.img\"\nmeta-disk = \"/srv/r0.md\"",
        );
        let e = errors(&external, &Fake::alpha());
        assert_eq!(
            e,
            ["resource.r0.on.alpha.meta-disk: /srv/r0.md does not exist"]
        );
        let mut host = Fake::alpha();
        host.disks.insert("/srv/r0.md".into(), Disk::File(4096));
        let e = errors(&external, &host);
        assert!(
            e.len() == 1
                && e[0].starts_with(
                    "resource.r0.on.alpha.meta-disk: meta-data device of 4096 bytes is too small"
                ),
            "{e:?}"
        );
        host.disks
            .insert("/srv/r0.md".into(), Disk::Block(Some(128 << 20)));
        let checked = check(&parse(&external), Some("alpha"), Some(&host));
        assert!(checked.findings.is_empty(), "{:?}", checked.findings);
        assert!(checked.facts["resource.r0.on.alpha.meta-disk"]
            .starts_with("block device, 134217728 bytes"));
        // A fixed NBD address must be this machine's; the floating IP need not be (yet).
        let fixed = FILE.replace("nbd = \"10.0.0.100:10809\"", "nbd = \"10.0.0.50:10809\"");
        let e = errors(&fixed, &Fake::alpha());
        assert!(
            e.len() == 1
                && e[0].starts_with("resource.r0.nbd: 10.0.0.50 is neither the floating IP"),
            "{e:?}"
        );
        let secret = FILE.replace(
            "shared-secret = \"the-real-secret-42\"",
            "shared-secret-file = \"/etc/twinblade/secret\"",
        );
        let mut host = Fake::alpha();
        host.secret = Err("/etc/twinblade/secret has mode 0644: …".into());
        assert_eq!(
            errors(&secret, &host),
            ["cluster.shared-secret-file: /etc/twinblade/secret has mode 0644: …"]
        );
        // A fence command that is not there.
        let fence = FILE.replace(
            "shared-secret = \"the-real-secret-42\"",
            "shared-secret = \"the-real-secret-42\"\nfence-peer = \"/nonexistent/fence-peer\"",
        );
        let e = errors(&fence, &Fake::alpha());
        assert!(
            e.len() == 1 && e[0].starts_with("cluster.fence-peer: /nonexistent/fence-peer: "),
            "{e:?}"
        );
        let text = dump(&parse(&fence), Some("alpha"), &BTreeMap::new());
        assert!(
            text.contains("fence-peer = \"/nonexistent/fence-peer\"")
                && text.contains("fence-timeout = 10"),
            "{text}"
        );
        // Several problems: every one reported.
        let mut host = Fake::alpha();
        host.interfaces.clear();
        host.disks.clear();
        assert_eq!(errors(FILE, &host).len(), 2);
        // No node, or no machine: the file alone.
        assert!(check(&parse(FILE), None, Some(&host)).findings.is_empty());
        assert!(check(&parse(FILE), Some("alpha"), None).findings.is_empty());
    }

    #[test]
    fn collisions_the_file_check_adds() {
        let r1 = |keys: &str, alpha_disk: &str, alpha_meta: &str| {
            format!(
                "{FILE}[resource.r1]\naoe = \"e0.4\"\nport = 7789\n{keys}\n[resource.r1.on.alpha]\ndisk = \"{alpha_disk}\"\nmeta-disk = \"{alpha_meta}\"\n[resource.r1.on.beta]\ndisk = \"/dev/sdc\"\nmeta-disk = \"internal\"\n"
            )
        };
        let file_errors = |text: &str| -> Vec<String> {
            check(&parse(text), None, None)
                .findings
                .iter()
                .filter(|f| f.severity == Severity::FileError)
                .map(|f| format!("{}: {}", f.key, f.problem))
                .collect()
        };
        assert!(file_errors(&r1("", "/srv/r1.img", "internal")).is_empty());
        assert_eq!(
            file_errors(&r1("", "/srv/r0.img", "internal")),
            ["resource.r1.on.alpha.disk: /srv/r0.img is also resource r0's disk on alpha"]
        );
        let text = r1("", "/srv/r1.img", "/srv/r0.img");
        assert_eq!(
            file_errors(&text),
            ["resource.r1.on.alpha.meta-disk: /srv/r0.img is also resource r0's disk on alpha"]
        );
        let text = r1("", "/srv/r1.img", "internal")
            .replace("disk = \"/dev/sdc\"", "disk = \"/dev/loop0\"");
        assert_eq!(
            file_errors(&text),
            ["resource.r1.on.beta.disk: /dev/loop0 is also resource r0's meta-disk on beta"]
        );
        assert_eq!(
            file_errors(&r1(
                "floating-ip = \"10.0.0.101/24\"\nnbd = \"0.0.0.0:10809\"",
                "/srv/r1.img",
                "internal"
            )),
            ["resource.r1.nbd: 0.0.0.0:10809 overlaps resource r0's NBD export 10.0.0.100:10809"]
        );
        assert_eq!(
            file_errors(&r1("nbd = \"0.0.0.0:7788\"", "/srv/r1.img", "internal")),
            ["resource.r1.nbd: 0.0.0.0:7788: port 7788 is resource r0's replication port"]
        );
        let own = FILE.replace("nbd = \"10.0.0.100:10809\"", "nbd = \"10.0.0.181:10809\"");
        let f = check(&parse(&own), None, None).findings;
        assert!(
            f.len() == 1
                && f[0].severity == Severity::Warning
                && f[0].key == "resource.r0.nbd"
                && f[0]
                    .problem
                    .starts_with("10.0.0.181 is node alpha's own address"),
            "{f:?}"
        );
        let one_path = FILE
            .replace("heartbeat = [\"192.168.100.1\", \"10.0.0.181\"]\n", "")
            .replace("heartbeat = [\"192.168.100.2\", \"10.0.0.182\"]\n", "");
        let f = check(&parse(&one_path), None, None).findings;
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f
            .iter()
            .all(|f| f.severity == Severity::Warning && f.key.ends_with(".heartbeat")));
    }

    #[test]
    fn the_secret_keys_exclude_each_other() {
        let err = |text: &str| Config::parse(text, "f").unwrap_err().to_string();
        let both = FILE.replace(
            "shared-secret = \"the-real-secret-42\"",
            "shared-secret = \"the-real-secret-42\"\nshared-secret-file = \"/etc/twinblade/secret\"",
        );
        assert!(
            err(&both).starts_with("f: cluster.shared-secret-file: give the secret either inline"),
            "{}",
            err(&both)
        );
        let neither = FILE.replace("shared-secret = \"the-real-secret-42\"\n", "");
        assert!(
            err(&neither).starts_with("f: cluster.shared-secret: missing"),
            "{}",
            err(&neither)
        );
        let empty = FILE.replace("\"the-real-secret-42\"", "\"\"");
        assert_eq!(err(&empty), "f: cluster.shared-secret: must not be empty");
        assert!(!err(&both).contains("the-real-secret-42"));
    }

    #[test]
    fn load_reads_a_private_secret_file_and_refuses_a_shared_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "from-the-file\n").unwrap();
        let conf = dir.path().join("twinblade.toml");
        std::fs::write(
            &conf,
            FILE.replace(
                "shared-secret = \"the-real-secret-42\"",
                &format!("shared-secret-file = {:?}", secret.display().to_string()),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(&conf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.cluster.secret(), b"from-the-file");
        assert!(!format!("{c:?}").contains("from-the-file"));
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Config::load(&conf).unwrap_err().to_string();
        assert!(
            e.contains(": cluster.shared-secret-file: ") && e.contains("has mode 0640"),
            "{e}"
        );
        assert!(!e.contains("from-the-file"));
    }
}
