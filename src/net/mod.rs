//! Raw Ethernet I/O for the AoE target and the user-space initiator.
//!
//! Owns the only `unsafe` socket code in the crate: an `AF_PACKET` socket bound to one
//! interface and one ethertype ([`PacketSocket`]), and interface queries (index, MAC, MTU).
//! Everything above this module sees byte slices.
//!
//! Also owns the floating IP's kernel side ([`address`]): adding and removing an address over
//! rtnetlink and announcing it with gratuitous ARP.

pub mod address;
mod packet;
mod ring;

pub use packet::{Interface, PacketSocket};
pub use ring::{PacketRing, RxRing, TxRing, SLOT_SIZE, TX_CAPACITY};
