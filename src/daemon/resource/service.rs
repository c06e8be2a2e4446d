//! The service group: what a client reaches while this node serves the resource, started in
//! one order and stopped in exactly the reverse — floating IP → AoE (announced from the
//! service MAC) → NBD (on the floating IP) — so that nothing is offered on an address that is
//! not there yet, and the address goes last. A step that fails undoes the steps before it and
//! says which one failed and why; the engine then demotes.
//!
//! This module owns the group's parts while they run. When to start or stop the group is the
//! cluster machine's decision (`StartServing`/`StopServing`), and whether a started part may
//! answer is the serve gate's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::block::BlockDevice;
use crate::export::aoe::blade::BladeConfig;
use crate::export::aoe::server::{AoeServer, Export};
use crate::export::aoe::RivalAlarm;
use crate::ha::gate::ServeGate;
use crate::net::address::{self, Added, FloatingIp, Removed};
use crate::supervisor::Supervisor;
use crate::wire::MacAddr;

/// Gratuitous ARPs sent when the floating IP comes up (heartbeat's IPaddr2: 5 × 200 ms).
const GARP_COUNT: u32 = 5;
/// Time between them.
const GARP_INTERVAL: Duration = Duration::from_millis(200);
/// Then one this often while serving.
const GARP_REFRESH: Duration = Duration::from_secs(1);
/// How often a closed gate is looked at again.
const GATE_POLL: Duration = Duration::from_millis(20);
/// The floating IP's lifetime in the kernel, renewed every [`IP_RENEW`] while the serve gate is
/// open: a node that froze while serving (its kernel still holds the address and answers ARP
/// for it) loses the address by itself within about this long, before its peer takes over
/// (the peer waits the dead time and more). The kernel counts in whole seconds.
const IP_LIFETIME: Duration = Duration::from_secs(1);
/// How often the lifetime is renewed.
const IP_RENEW: Duration = Duration::from_millis(200);

/// What the group serves and where.
pub struct ServiceSpec {
    /// Resource name (export name of NBD, log field).
    pub name: String,
    /// AoE shelf and slot.
    pub aoe: (u16, u8),
    /// Client-facing interface: AoE and the floating IP.
    pub interface: String,
    /// The MAC the blade answers from; `None` for the interface's own.
    pub service_mac: Option<MacAddr>,
    /// The address that moves with the service.
    pub floating_ip: Option<FloatingIp>,
    /// NBD listen address.
    pub nbd: Option<std::net::SocketAddr>,
}

/// The step of the group that failed to start.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The floating IP could not be added.
    #[error("floating IP {ip} on {interface}: {source}")]
    FloatingIp {
        /// The address.
        ip: FloatingIp,
        /// The interface.
        interface: String,
        /// Why.
        source: address::AddressError,
    },
    /// The AoE blade could not be served.
    #[error("AoE e{shelf}.{slot}: {source}")]
    Aoe {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
        /// Why.
        source: crate::export::aoe::StartError,
    },
    /// The NBD export could not listen.
    #[error("NBD on {addr}: {source}")]
    Nbd {
        /// Listen address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The running group. Dropping it without [`ServiceGroup::stop`] leaves the floating IP on
/// the interface: stop it.
pub struct ServiceGroup {
    ip: Option<(String, FloatingIp)>,
    /// The thread that announces the floating IP.
    announcer: Option<Supervisor>,
    aoe: Option<AoeServer>,
    nbd: Option<crate::daemon::NbdHandle>,
}

/// A started group and what each step took, for the failover timeline.
pub struct Started {
    /// The group.
    pub group: ServiceGroup,
    /// The floating IP went up (if there is one).
    pub ip_up: Option<std::time::Instant>,
}

impl ServiceGroup {
    /// Starts the group in order; on failure stops what it started, in reverse, and says which
    /// step failed.
    pub fn start(
        spec: &ServiceSpec,
        device: Arc<dyn BlockDevice>,
        gate: Arc<ServeGate>,
        guard: RivalAlarm,
        crew: &Supervisor,
    ) -> Result<Started, GroupError> {
        let mut group = ServiceGroup {
            ip: None,
            announcer: None,
            aoe: None,
            nbd: None,
        };
        let mut ip_up = None;
        if let Some(ip) = spec.floating_ip {
            if let Err(e) = group.raise_ip(spec, ip, gate.clone(), crew) {
                group.stop(&spec.name);
                return Err(e);
            }
            ip_up = Some(std::time::Instant::now());
        }
        let (shelf, slot) = spec.aoe;
        let export = Export {
            config: BladeConfig::new(shelf, slot),
            device: device.clone(),
            interfaces: vec![spec.interface.clone()],
            gate: gate.clone(),
            guard: Some(guard),
            service_mac: spec.service_mac,
        };
        match AoeServer::start(vec![export], crew.group("aoe")) {
            Ok(server) => {
                let at = match spec.service_mac {
                    Some(mac) => format!("service MAC {mac}"),
                    None => "the interface's own MAC".to_string(),
                };
                tracing::info!(resource = %spec.name, "serving e{shelf}.{slot} on {} at {at}", spec.interface);
                group.aoe = Some(server);
            }
            Err(source) => {
                group.stop(&spec.name);
                return Err(GroupError::Aoe {
                    shelf,
                    slot,
                    source,
                });
            }
        }
        if let Some(addr) = spec.nbd {
            match crate::daemon::NbdHandle::start(addr, &spec.name, device, gate, crew.group("nbd"))
            {
                Ok(server) => group.nbd = Some(server),
                Err(source) => {
                    group.stop(&spec.name);
                    return Err(GroupError::Nbd { addr, source });
                }
            }
        }
        Ok(Started { group, ip_up })
    }

    /// Adds the floating IP (a stale copy left by a killed daemon counts as added) and starts
    /// announcing it (see [`announce_while_serving`]).
    fn raise_ip(
        &mut self,
        spec: &ServiceSpec,
        ip: FloatingIp,
        gate: Arc<ServeGate>,
        crew: &Supervisor,
    ) -> Result<(), GroupError> {
        let failed = |source| GroupError::FloatingIp {
            ip,
            interface: spec.interface.clone(),
            source,
        };
        match address::add(&spec.interface, &ip).map_err(failed)? {
            Added::Added => {}
            Added::AlreadyThere => {
                tracing::info!(resource = %spec.name, "floating IP {ip} was already on {}", spec.interface)
            }
        }
        // Until the announcer renews it (once the gate opens), it lives one lifetime.
        if let Err(e) = address::renew(&spec.interface, &ip, IP_LIFETIME) {
            let _ = address::remove(&spec.interface, &ip);
            return Err(failed(e));
        }
        self.ip = Some((spec.interface.clone(), ip));
        tracing::info!(resource = %spec.name, "floating IP {ip} up on {}", spec.interface);
        let announcer = crew.group("floating-ip");
        let interface = spec.interface.clone();
        let name = spec.name.clone();
        let waits = announcer.clone();
        let started = announcer.spawn("floating-ip", move |token| {
            announce_while_serving(&name, &interface, ip, &gate, &waits, &token)
        });
        if let Err(e) = started {
            let _ = address::remove(&spec.interface, &ip);
            return Err(failed(address::AddressError::Kernel {
                operation: "announce",
                interface: spec.interface.clone(),
                address: ip.address,
                source: std::io::Error::other(e.to_string()),
            }));
        }
        self.announcer = Some(announcer);
        Ok(())
    }

    /// The AoE server, while it runs.
    pub fn aoe(&self) -> Option<&AoeServer> {
        self.aoe.as_ref()
    }

    /// The counters of its exports (shared, not copied: they keep counting).
    pub fn counters(&self) -> super::ExportCounters {
        super::ExportCounters {
            aoe: self
                .aoe
                .iter()
                .flat_map(|a| a.stats().iter().map(|(_, s)| s.clone()))
                .collect(),
            nbd: self.nbd.as_ref().map(|n| n.stats.clone()),
        }
    }

    /// Stops in reverse start order: NBD, AoE, floating IP.
    pub fn stop(mut self, name: &str) {
        if let Some(nbd) = self.nbd.take() {
            nbd.stop();
        }
        if let Some(aoe) = self.aoe.take() {
            aoe.stop();
            tracing::info!(resource = %name, "stopped serving over AoE");
        }
        if let Some(announcer) = self.announcer.take() {
            announcer.stop();
        }
        if let Some((interface, ip)) = self.ip.take() {
            drop_floating_ip(name, &interface, &ip);
        }
    }
}

/// Keeps the floating IP while this node serves: renews its kernel lifetime every [`IP_RENEW`]
/// and sends gratuitous ARPs — [`GARP_COUNT`] of them [`GARP_INTERVAL`] apart, then one every
/// [`GARP_REFRESH`] (keepalived's `garp_master_refresh`) — but only while the serve gate lets
/// the node answer. A node whose lease ran out (frozen, cut off) claims nothing, and its
/// address expires within [`IP_LIFETIME`].
///
/// ARPs leave from the interface's own MAC: the kernel's IP stack answers only there (the
/// virtual MAC is joined by the AoE socket alone).
fn announce_while_serving(
    name: &str,
    interface: &str,
    ip: FloatingIp,
    gate: &ServeGate,
    waits: &Supervisor,
    token: &tokio_util::sync::CancellationToken,
) {
    let mac = match crate::net::Interface::by_name(interface) {
        Ok(port) => port.mac,
        Err(e) => {
            tracing::warn!(resource = %name, "announcing {ip}: {e}");
            return;
        }
    };
    static FAILURES: crate::ratelimit::LogLimiter =
        crate::ratelimit::LogLimiter::new(Duration::from_secs(60), 2);
    let mut sent = 0u32;
    let mut next_garp = std::time::Instant::now();
    loop {
        // The group starts before the engine opens the gate: look again soon until it does.
        let pause = if !gate.may_answer() {
            GATE_POLL
        } else {
            if let Err(e) = address::renew(interface, &ip, IP_LIFETIME) {
                crate::warn_limited!(FAILURES, resource = %name, "floating IP {ip}: {e}");
            }
            let now = std::time::Instant::now();
            if let (IpAddr::V4(v4), true) = (ip.address, now >= next_garp) {
                if let Err(e) = address::announce(interface, v4, mac, 1, Duration::ZERO) {
                    crate::warn_limited!(FAILURES, resource = %name, "gratuitous ARP for {v4}: {e}");
                }
                sent += 1;
                next_garp = now
                    + if sent < GARP_COUNT {
                        GARP_INTERVAL
                    } else {
                        GARP_REFRESH
                    };
            }
            IP_RENEW
        };
        if !waits.sleep_on(token, pause) {
            return;
        }
    }
}

/// Takes `ip` off `interface` if it is there (at start-up: a copy a killed daemon left), and
/// logs what it did.
pub fn drop_floating_ip(name: &str, interface: &str, ip: &FloatingIp) {
    match address::remove(interface, ip) {
        Ok(Removed::Removed) => {
            tracing::info!(resource = %name, "floating IP {ip} removed from {interface}")
        }
        Ok(Removed::WasNotThere) => {}
        Err(e) => {
            tracing::error!(resource = %name, "cannot remove floating IP {ip} from {interface}: {e}")
        }
    }
}
