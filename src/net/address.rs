//! Floating IP primitives: putting an address on an interface, taking it off, asking whether
//! it is there (over rtnetlink), and announcing an IPv4 address's new home with gratuitous ARP.
//!
//! This module owns the kernel side of one address on one interface and nothing more: it does
//! not decide when an address moves (that is the HA layer's job), and it keeps no state between
//! calls. Every call opens its own netlink socket, so callers on plain threads need no runtime.
//!
//! The kernel decides what "the same address" means, and these calls follow it:
//!
//! * IPv4: an address is the pair (address, prefix length). `10.77.0.100/24` and
//!   `10.77.0.100/16` can sit on one interface side by side; [`holds`] and [`remove`] look
//!   for the exact pair.
//! * IPv6: the kernel keys on the address alone when adding, so [`add`] reports
//!   [`Added::AlreadyThere`] for the address with another prefix length; [`holds`] and
//!   [`remove`] still look for the exact pair. IPv6 addresses go through duplicate address
//!   detection as usual: a takeover while the old holder still has the address leaves ours
//!   marked `dadfailed` rather than two nodes answering for it.
//!
//! Removing an IPv4 address that is the interface's primary one in its subnet also removes the
//! secondaries unless `net.ipv4.conf.<if>.promote_secondaries` is set; a floating IP is
//! normally a secondary beside the node's fixed address, so this does not arise.

use crate::net::{Interface, PacketSocket};
use crate::wire::arp::{self, ArpRepr};
use crate::wire::MacAddr;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope, CacheInfo};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// An address with its prefix length, as it sits on an interface: `10.77.0.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FloatingIp {
    /// The address itself (host bits are the point: it is an address, not a network).
    pub address: IpAddr,
    /// The prefix length of the subnet it belongs to.
    pub prefix_len: u8,
}

impl FloatingIp {
    /// The longest prefix the address family allows: 32 for IPv4, 128 for IPv6.
    pub fn max_prefix_len(address: IpAddr) -> u8 {
        match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// The subnet's broadcast address, for an IPv4 address in a subnet that has one
    /// (/31 and /32 have none).
    fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.address {
            IpAddr::V4(v4) if self.prefix_len < 31 => {
                let host_bits = u32::MAX >> self.prefix_len;
                Some(Ipv4Addr::from(u32::from(v4) | host_bits))
            }
            _ => None,
        }
    }

    fn family(&self) -> AddressFamily {
        match self.address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        }
    }
}

impl fmt::Display for FloatingIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// Why a floating IP string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FloatingIpParseError {
    /// No `/prefix` after the address: the subnet is part of what gets configured.
    #[error(
        "floating IP {0:?} has no prefix length: write it as ADDRESS/PREFIX, e.g. 10.77.0.100/24"
    )]
    MissingPrefix(String),
    /// The part before the `/` is not an IPv4 or IPv6 address.
    #[error("floating IP {input:?}: {address:?} is not an IPv4 or IPv6 address")]
    BadAddress {
        /// The whole input.
        input: String,
        /// The address part.
        address: String,
    },
    /// The part after the `/` is not a number.
    #[error("floating IP {input:?}: prefix length {prefix:?} is not a number")]
    BadPrefix {
        /// The whole input.
        input: String,
        /// The prefix part.
        prefix: String,
    },
    /// The prefix length is longer than the address.
    #[error("floating IP {input:?}: prefix length {prefix_len} is longer than {max} bits")]
    PrefixTooLong {
        /// The whole input.
        input: String,
        /// The prefix length given.
        prefix_len: u32,
        /// The longest one the family allows.
        max: u8,
    },
}

impl FromStr for FloatingIp {
    type Err = FloatingIpParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (address_part, prefix_part) = input
            .split_once('/')
            .ok_or_else(|| FloatingIpParseError::MissingPrefix(input.to_string()))?;
        let address: IpAddr =
            address_part
                .parse()
                .map_err(|_| FloatingIpParseError::BadAddress {
                    input: input.to_string(),
                    address: address_part.to_string(),
                })?;
        // Digits only: u32's parser would also take "+24".
        let prefix_len: u32 =
            if !prefix_part.is_empty() && prefix_part.bytes().all(|b| b.is_ascii_digit()) {
                prefix_part.parse().unwrap_or(u32::MAX)
            } else {
                return Err(FloatingIpParseError::BadPrefix {
                    input: input.to_string(),
                    prefix: prefix_part.to_string(),
                });
            };
        let max = FloatingIp::max_prefix_len(address);
        if prefix_len > u32::from(max) {
            return Err(FloatingIpParseError::PrefixTooLong {
                input: input.to_string(),
                prefix_len,
                max,
            });
        }
        Ok(FloatingIp {
            address,
            prefix_len: prefix_len as u8,
        })
    }
}

/// What [`add`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The address was not on the interface; now it is.
    Added,
    /// The address was already on the interface; nothing changed.
    AlreadyThere,
}

/// What [`remove`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The address was on the interface; now it is not.
    Removed,
    /// The address was not on the interface; nothing changed.
    WasNotThere,
}

/// Why a floating IP operation failed. Every variant names the interface, and the address
/// where one was involved.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The interface does not exist in this network namespace.
    #[error("cannot {operation} {address} on {interface:?}: no such interface")]
    NoSuchInterface {
        /// What was attempted ("add", "remove", "look up", "announce").
        operation: &'static str,
        /// The interface name given.
        interface: String,
        /// The address involved.
        address: IpAddr,
    },
    /// The kernel refused for lack of privilege (CAP_NET_ADMIN for addresses, CAP_NET_RAW
    /// for announcements).
    #[error("cannot {operation} {address} on {interface:?}: permission denied (needs CAP_NET_ADMIN and CAP_NET_RAW)")]
    PermissionDenied {
        /// What was attempted.
        operation: &'static str,
        /// The interface name.
        interface: String,
        /// The address involved.
        address: IpAddr,
    },
    /// Any other failure talking to the kernel.
    #[error("cannot {operation} {address} on {interface:?}: {source}")]
    Kernel {
        /// What was attempted.
        operation: &'static str,
        /// The interface name.
        interface: String,
        /// The address involved.
        address: IpAddr,
        /// What the kernel (or the socket) said.
        source: io::Error,
    },
    /// An announcement stopped part way: `sent` frames went out before the failure.
    #[error("announcing {address} on {interface:?} stopped after {sent} frames: {source}")]
    AnnounceInterrupted {
        /// The interface name.
        interface: String,
        /// The address announced.
        address: Ipv4Addr,
        /// Frames that went out.
        sent: u32,
        /// Why the next one did not.
        source: io::Error,
    },
}

/// Which call an error belongs to, so the error can say so.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    operation: &'static str,
    interface: &'a str,
    address: IpAddr,
}

impl Attempt<'_> {
    fn error(&self, source: io::Error) -> AddressError {
        let interface = self.interface.to_string();
        let (operation, address) = (self.operation, self.address);
        match source.raw_os_error() {
            Some(libc::ENODEV) => AddressError::NoSuchInterface {
                operation,
                interface,
                address,
            },
            Some(libc::EPERM) | Some(libc::EACCES) => AddressError::PermissionDenied {
                operation,
                interface,
                address,
            },
            _ => match source.kind() {
                io::ErrorKind::NotFound => AddressError::NoSuchInterface {
                    operation,
                    interface,
                    address,
                },
                _ => AddressError::Kernel {
                    operation,
                    interface,
                    address,
                    source,
                },
            },
        }
    }
}

/// Adds `ip` to `interface`. Idempotent: an address already there is
/// [`Added::AlreadyThere`], not an error.
pub fn add(interface: &str, ip: &FloatingIp) -> Result<Added, AddressError> {
    let attempt = Attempt {
        operation: "add",
        interface,
        address: ip.address,
    };
    let index = interface_index(interface).map_err(|e| attempt.error(e))?;
    let message = new_address_message(index, ip);
    // EXCL makes "already there" an answer (EEXIST) instead of a silent replace that could
    // change flags or lifetimes of an address someone else configured.
    let request = RouteNetlinkMessage::NewAddress(message);
    match transact(request, NLM_F_CREATE | NLM_F_EXCL) {
        Ok(_) => Ok(Added::Added),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Added::AlreadyThere),
        Err(e) => Err(attempt.error(e)),
    }
}

/// Puts `ip` on `interface` for `lifetime` from now (rounded up to whole seconds, the
/// kernel's unit): the kernel removes it by itself unless it is renewed in time — an address
/// that lives only as long as its holder keeps saying so, even if the holder freezes.
/// Replaces the lifetime of an address already there (one added by [`add`] becomes
/// temporary), and adds it again if it had expired.
pub fn renew(interface: &str, ip: &FloatingIp, lifetime: Duration) -> Result<(), AddressError> {
    let attempt = Attempt {
        operation: "renew",
        interface,
        address: ip.address,
    };
    let index = interface_index(interface).map_err(|e| attempt.error(e))?;
    let mut message = new_address_message(index, ip);
    let seconds = u32::try_from(lifetime.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX - 1)
        .max(1);
    let mut cache = CacheInfo::default();
    cache.ifa_preferred = seconds;
    cache.ifa_valid = seconds;
    message.attributes.push(AddressAttribute::CacheInfo(cache));
    transact(
        RouteNetlinkMessage::NewAddress(message),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(|_| ())
    .map_err(|e| attempt.error(e))
}

/// Removes `ip` (address and prefix length) from `interface`. Idempotent: an address that is
/// not there is [`Removed::WasNotThere`], not an error.
pub fn remove(interface: &str, ip: &FloatingIp) -> Result<Removed, AddressError> {
    let attempt = Attempt {
        operation: "remove",
        interface,
        address: ip.address,
    };
    let index = interface_index(interface).map_err(|e| attempt.error(e))?;
    let request = RouteNetlinkMessage::DelAddress(address_message(index, ip));
    match transact(request, 0) {
        Ok(_) => Ok(Removed::Removed),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(Removed::WasNotThere),
        Err(e) => Err(attempt.error(e)),
    }
}

/// Whether `interface` carries `ip` with exactly its prefix length.
pub fn holds(interface: &str, ip: &FloatingIp) -> Result<bool, AddressError> {
    let attempt = Attempt {
        operation: "look up",
        interface,
        address: ip.address,
    };
    let index = interface_index(interface).map_err(|e| attempt.error(e))?;
    let mut query = AddressMessage::default();
    query.header.family = ip.family();
    let replies = transact(RouteNetlinkMessage::GetAddress(query), NLM_F_DUMP)
        .map_err(|e| attempt.error(e))?;
    Ok(replies.iter().any(|reply| match reply {
        RouteNetlinkMessage::NewAddress(found) => {
            found.header.index == index
                && found.header.prefix_len == ip.prefix_len
                && local_address(found) == Some(ip.address)
        }
        _ => false,
    }))
}

/// Sends `count` gratuitous ARP requests for `ip` at `mac` out of `interface`, `interval`
/// apart (no wait after the last), and returns how many went out.
///
/// `mac` is both the Ethernet source and the ARP sender: neighbours that already know `ip`
/// point it at `mac`, and switches learn that `mac` now lives behind this port. It need not be
/// the interface's own MAC (a resource's virtual MAC moves with the service).
pub fn announce(
    interface: &str,
    ip: Ipv4Addr,
    mac: MacAddr,
    count: u32,
    interval: Duration,
) -> Result<u32, AddressError> {
    let attempt = Attempt {
        operation: "announce",
        interface,
        address: IpAddr::V4(ip),
    };
    let port = Interface::by_name(interface).map_err(|e| attempt.error(e))?;
    let socket = PacketSocket::open(&port, arp::ETHERTYPE).map_err(|e| attempt.error(e))?;
    let frame = ArpRepr::gratuitous(ip, mac).to_vec();
    for sent in 0..count {
        if sent > 0 {
            std::thread::sleep(interval);
        }
        if let Err(source) = socket.send(&frame) {
            return Err(match attempt.error(source) {
                AddressError::Kernel { source, .. } if sent > 0 => {
                    AddressError::AnnounceInterrupted {
                        interface: interface.to_string(),
                        address: ip,
                        sent,
                        source,
                    }
                }
                other => other,
            });
        }
    }
    Ok(count)
}

/// The request body naming `ip` on interface `index`, as `ip addr` builds it: IFA_LOCAL and
/// IFA_ADDRESS both the address (they differ only on point-to-point links).
fn address_message(index: u32, ip: &FloatingIp) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = ip.family();
    message.header.prefix_len = ip.prefix_len;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    message.attributes = vec![
        AddressAttribute::Local(ip.address),
        AddressAttribute::Address(ip.address),
    ];
    message
}

/// The request body that puts `ip` on interface `index`: [`address_message`] with the subnet's
/// broadcast address, where it has one.
fn new_address_message(index: u32, ip: &FloatingIp) -> AddressMessage {
    let mut message = address_message(index, ip);
    if let Some(broadcast) = ip.broadcast() {
        message
            .attributes
            .push(AddressAttribute::Broadcast(broadcast));
    }
    message
}

/// The interface's own address in an address message: IFA_LOCAL where present (IPv4),
/// else IFA_ADDRESS (IPv6 without a peer).
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(address) => Some(*address),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(address) => Some(*address),
            _ => None,
        })
    })
}

/// The kernel index of `name`, asked over netlink (ENODEV if there is no such interface).
fn interface_index(name: &str) -> io::Result<u32> {
    let mut query = LinkMessage::default();
    query
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    let replies = transact(RouteNetlinkMessage::GetLink(query), 0)?;
    replies
        .into_iter()
        .find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
            _ => None,
        })
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
}

/// Sequence numbers for requests, so a reply can be matched to its request.
static NEXT_SEQUENCE: AtomicU32 = AtomicU32::new(1);

/// Sends one request on a fresh rtnetlink socket and collects the replies until the kernel's
/// acknowledgement or the end of a dump. A kernel error comes back as its errno.
fn transact(
    request: RouteNetlinkMessage,
    extra_flags: u16,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let sequence = NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let is_dump = extra_flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut replies = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = reply.header.length as usize;
            if length == 0 || length > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink reply with an impossible length",
                ));
            }
            rest = &rest[length..];
            if reply.header.sequence_number != sequence {
                continue;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                // An ACK (code None) ends a plain request; a dump ends with Done.
                NetlinkPayload::Error(error) => match error.code {
                    None if !is_dump => return Ok(replies),
                    None => {}
                    Some(_) => return Err(error.to_io()),
                },
                NetlinkPayload::Done(_) => return Ok(replies),
                // Noop and overrun notices carry nothing we asked for.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6() {
        assert_eq!(
            "10.77.0.100/24".parse::<FloatingIp>().unwrap(),
            FloatingIp {
                address: "10.77.0.100".parse().unwrap(),
                prefix_len: 24
            }
        );
        let v6: FloatingIp = "fd00:77::100/64".parse().unwrap();
        assert_eq!(v6.address, "fd00:77::100".parse::<IpAddr>().unwrap());
        assert_eq!(v6.prefix_len, 64);
        assert_eq!(v6.to_string(), "fd00:77::100/64");
        for edge in ["0.0.0.0/0", "10.0.0.1/32", "::1/128"] {
            assert_eq!(edge.parse::<FloatingIp>().unwrap().to_string(), edge);
        }
    }

    #[test]
    fn host_bits_are_kept() {
        // It is an address in a subnet, not a network: the host part is the point.
        let ip: FloatingIp = "192.168.7.33/16".parse().unwrap();
        assert_eq!(ip.address, IpAddr::V4(Ipv4Addr::new(192, 168, 7, 33)));
        assert_eq!(ip.broadcast(), Some(Ipv4Addr::new(192, 168, 255, 255)));
    }

    #[test]
    fn refuses_bad_input_saying_why() {
        let error = |s: &str| s.parse::<FloatingIp>().unwrap_err();
        assert_eq!(
            error("10.77.0.100"),
            FloatingIpParseError::MissingPrefix("10.77.0.100".into())
        );
        assert!(matches!(
            error("10.77.0.100/33"),
            FloatingIpParseError::PrefixTooLong {
                prefix_len: 33,
                max: 32,
                ..
            }
        ));
        assert!(matches!(
            error("fd00::1/129"),
            FloatingIpParseError::PrefixTooLong { max: 128, .. }
        ));
        assert!(matches!(
            error("10.77.0.100/99999999999999"),
            FloatingIpParseError::PrefixTooLong { .. }
        ));
        for bad_prefix in ["10.0.0.1/", "10.0.0.1/+24", "10.0.0.1/-1", "10.0.0.1/24/8"] {
            assert!(
                matches!(error(bad_prefix), FloatingIpParseError::BadPrefix { .. }),
                "{bad_prefix}"
            );
        }
        for bad_address in ["garbage/24", "/24", "10.0.0/24", "10.0.0.256/24", "eth0/8"] {
            assert!(
                matches!(error(bad_address), FloatingIpParseError::BadAddress { .. }),
                "{bad_address}"
            );
        }
        let message = error("nonsense/24").to_string();
        assert!(message.contains("nonsense"), "{message}");
    }

    #[test]
    fn broadcast_only_where_the_subnet_has_one() {
        let broadcast = |s: &str| s.parse::<FloatingIp>().unwrap().broadcast();
        assert_eq!(
            broadcast("10.77.0.100/24"),
            Some(Ipv4Addr::new(10, 77, 0, 255))
        );
        assert_eq!(
            broadcast("10.77.0.100/0"),
            Some(Ipv4Addr::new(255, 255, 255, 255))
        );
        assert_eq!(broadcast("10.77.0.100/31"), None);
        assert_eq!(broadcast("10.77.0.100/32"), None);
        assert_eq!(broadcast("fd00::1/64"), None);
    }

    #[test]
    fn errors_name_the_interface_and_address() {
        let attempt = Attempt {
            operation: "add",
            interface: "eth9",
            address: "10.77.0.100".parse().unwrap(),
        };
        for (errno, want) in [
            (libc::ENODEV, "no such interface"),
            (libc::EPERM, "permission denied"),
            (libc::EBUSY, "busy"),
        ] {
            let message = attempt
                .error(io::Error::from_raw_os_error(errno))
                .to_string();
            assert!(message.contains("\"eth9\""), "{message}");
            assert!(message.contains("10.77.0.100"), "{message}");
            assert!(message.to_lowercase().contains(want), "{message}");
        }
    }
}
