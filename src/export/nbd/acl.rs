//! Optional allowlist of client addresses for the NBD target.
//!
//! An empty [`Acl`] allows everyone. Otherwise a client is admitted only if its address falls
//! in one of the listed networks. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are compared
//! as IPv4.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One allowed network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why an allowlist entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address or network {0:?}: expected ADDR or ADDR/PREFIX")]
pub struct CidrParseError(pub String);

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `addr` lies in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrParseError(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical(addr.parse::<IpAddr>().map_err(|_| err())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The allowlist: empty means everyone is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    allow: Vec<Cidr>,
}

impl Acl {
    /// An allowlist of `allow`; empty allows everyone.
    pub fn new(allow: Vec<Cidr>) -> Self {
        Acl { allow }
    }

    /// Whether a client at `addr` may connect.
    pub fn allows(&self, addr: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_allows_all() {
        assert!(Acl::default().allows(ip("192.0.2.1")));
    }

    #[test]
    fn networks_and_hosts() {
        let acl = Acl::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ]);
        assert!(acl.allows(ip("10.1.2.3")));
        assert!(acl.allows(ip("127.0.0.1")));
        assert!(acl.allows(ip("::ffff:10.9.9.9")));
        assert!(!acl.allows(ip("127.0.0.2")));
        assert!(!acl.allows(ip("11.0.0.1")));
        assert!(!acl.allows(ip("::1")));
    }

    #[test]
    fn ipv6_and_zero_prefix() {
        let acl = Acl::new(vec!["fd00::/8".parse().unwrap()]);
        assert!(acl.allows(ip("fd12::1")));
        assert!(!acl.allows(ip("fe80::1")));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains(ip("203.0.113.7")));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10.0.0.0/33", "::/129", "host", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }
}
