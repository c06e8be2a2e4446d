//! The ATA-over-Ethernet target: vblade's protocol, several blades per process.
//!
//! * [`ata`]: the emulated ATA device — which commands exist and what they do to the device.
//! * [`blade`]: one `eS.L` — config string, mask and reserve lists, and the answer to every
//!   frame (pure: a frame in, a reply out, the `BlockDevice` the only side effect).
//! * [`stats`]: per-blade counters behind the rate-limited logs.
//! * [`server`]: sockets and threads — receive per interface, one ordered worker per blade;
//!   the serve gate before every reply and the multiple-mount protection.
//! * [`probe`]: asking the wire who answers for an address (the promotion guard).
//! * [`service_mac`]: the MAC a blade lives at when it is not its interface's (a MAC that
//!   moves with the blade from node to node).

pub mod ata;
pub mod blade;
pub mod probe;
pub mod server;
pub mod service_mac;
pub mod stats;

pub use blade::{Blade, BladeConfig, Outcome, Port, PreparedTransfer};
pub use probe::{responders, RivalAlarm};
pub use server::{AoeServer, Export, StartError};
pub use service_mac::{check_service_mac, service_mac_for, ServiceMacError};
pub use stats::{BladeStats, DropReason};
