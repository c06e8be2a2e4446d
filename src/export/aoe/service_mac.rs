//! The service MAC of a blade: the address a blade lives at instead of its interface's own,
//! so that when the blade moves to the other node the initiators' frames follow it without
//! the initiator noticing (the Linux driver keeps retransmitting to the MAC it knows and only
//! gives up on it after ~10 s; a MAC that moves costs it nothing).
//!
//! This module owns deriving that MAC ([`service_mac_for`]) and what makes a MAC usable as one
//! ([`check_service_mac`]). Joining it on a socket is [`crate::net::PacketSocket::join_unicast`];
//! answering from it is the server's business.

use crate::wire::MacAddr;

/// Bit 0 of the first octet: a group (multicast) address.
const GROUP_BIT: u8 = 0x01;
/// Bit 1 of the first octet: a locally administered address (no vendor owns it).
const LOCAL_BIT: u8 = 0x02;

/// Keeps these hashes apart from every other xxh3 use in the crate.
const DOMAIN: &[u8] = b"twinblade service MAC v1";

/// Why a MAC cannot be a blade's service MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServiceMacError {
    /// A group address: the kernel would not join it as a unicast address, and initiators
    /// would not send unicast requests to it.
    #[error("{0} is a multicast or broadcast address, not a unicast one")]
    Group(MacAddr),
    /// All zeros: not an address any frame can carry.
    #[error("00:00:00:00:00:00 cannot be a service MAC")]
    Zero,
}

/// The service MAC of blade `eshelf.slot` of the pair of nodes named `nodes`: stable (both
/// nodes compute the same one in either order, across restarts and versions), locally
/// administered and unicast, and different for every slot and every pair (46 bits of xxh3;
/// two pairs or two slots collide with odds of about 2⁻⁴⁶).
pub fn service_mac_for(nodes: (&str, &str), shelf: u16, slot: u8) -> MacAddr {
    let (first, second) = if nodes.0 <= nodes.1 {
        (nodes.0, nodes.1)
    } else {
        (nodes.1, nodes.0)
    };
    let mut input = Vec::with_capacity(DOMAIN.len() + first.len() + second.len() + 19);
    input.extend_from_slice(DOMAIN);
    // Length prefixes: ("ab", "c") and ("a", "bc") must not hash alike.
    for name in [first, second] {
        input.extend_from_slice(&(name.len() as u64).to_le_bytes());
        input.extend_from_slice(name.as_bytes());
    }
    input.extend_from_slice(&shelf.to_be_bytes());
    input.push(slot);
    let hash = xxhash_rust::xxh3::xxh3_64(&input).to_le_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&hash[..6]);
    mac[0] = (mac[0] & !GROUP_BIT) | LOCAL_BIT;
    MacAddr(mac)
}

/// Whether `mac` can be a service MAC: a unicast address other than zero.
pub fn check_service_mac(mac: MacAddr) -> Result<(), ServiceMacError> {
    if mac.0[0] & GROUP_BIT != 0 {
        Err(ServiceMacError::Group(mac))
    } else if mac.0 == [0; 6] {
        Err(ServiceMacError::Zero)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn both_nodes_derive_the_same_mac_every_time() {
        let one = service_mac_for(("alpha", "beta"), 0, 3);
        assert_eq!(service_mac_for(("beta", "alpha"), 0, 3), one);
        assert_eq!(service_mac_for(("alpha", "beta"), 0, 3), one);
    }

    #[test]
    fn the_mac_is_stable_across_versions() {
        // Both nodes of a pair may run different builds during an upgrade: the derivation is
        // part of the wire contract, so a change here must be deliberate.
        assert_eq!(
            service_mac_for(("alpha", "beta"), 0, 3).to_string(),
            "4e:3e:18:33:af:c1"
        );
        assert_eq!(
            service_mac_for(("node-b", "node-a"), 1, 2).to_string(),
            "26:0b:89:3e:e3:b9"
        );
    }

    #[test]
    fn every_derived_mac_is_locally_administered_unicast() {
        let mut checked = 0;
        for pair in [("a", "b"), ("node1", "node2"), ("", "x"), ("same", "same")] {
            for shelf in [0u16, 1, 7, 0xFFFE] {
                for slot in 0..=254u8 {
                    let mac = service_mac_for(pair, shelf, slot);
                    assert_eq!(mac.0[0] & LOCAL_BIT, LOCAL_BIT, "{mac} not local");
                    assert_eq!(mac.0[0] & GROUP_BIT, 0, "{mac} not unicast");
                    assert_eq!(check_service_mac(mac), Ok(()));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4 * 4 * 255);
    }

    #[test]
    fn every_slot_and_every_pair_gets_its_own_mac() {
        let mut seen = HashSet::new();
        let pairs = [("a", "b"), ("a", "c"), ("ab", "c"), ("a", "bc"), ("x", "y")];
        for pair in pairs {
            for shelf in 0..4u16 {
                for slot in 0..=254u8 {
                    assert!(
                        seen.insert(service_mac_for(pair, shelf, slot)),
                        "{pair:?} e{shelf}.{slot} collides"
                    );
                }
            }
        }
        assert_eq!(seen.len(), pairs.len() * 4 * 255);
        // Shelf and slot are not interchangeable.
        assert_ne!(
            service_mac_for(("a", "b"), 1, 0),
            service_mac_for(("a", "b"), 0, 1)
        );
    }

    #[test]
    fn group_and_zero_addresses_are_refused() {
        assert_eq!(
            check_service_mac(MacAddr::BROADCAST),
            Err(ServiceMacError::Group(MacAddr::BROADCAST))
        );
        let multicast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);
        assert_eq!(
            check_service_mac(multicast),
            Err(ServiceMacError::Group(multicast))
        );
        assert_eq!(
            check_service_mac(MacAddr([0; 6])),
            Err(ServiceMacError::Zero)
        );
        assert_eq!(check_service_mac(MacAddr([2, 0, 0, 0, 0, 1])), Ok(()));
    }
}
