//! High availability groundwork: deciding whether the peer is alive from heartbeats on several
//! independent paths. Pure: no sockets, no clock reads. Not wired into the daemon yet.
//!
//! * [`replay`]: accept a heartbeat only once, per sender (boot nonce + sequence window).
//! * [`liveness`]: the peer is dead only when every path has been silent for the dead time.
//!
//! The datagram itself is [`crate::wire::heartbeat`].

pub mod clock;
pub mod gate;
pub mod liveness;
pub mod replay;
