//! Replication cores: the pure decisions a replicated device needs, with no I/O.
//!
//! * [`auth`]: HMAC-SHA256 challenge-response over the shared secret (who may connect).
//! * [`csum`]: the per-block digests that checksum-based resync and verify compare.
//! * [`uuid`]: generation UUIDs, the DRBD 8.4 handshake decision table (who syncs from whom, or
//!   split brain) and the UUID rotations around promotion and resync.
//!
//! The byte format of the peer messages is [`crate::wire::repl`]; the role, connection and disk
//! state machine that acts on these decisions is [`crate::cluster`]. The replicated
//! `BlockDevice`, the peer connection tasks and the daemon build on these modules; nothing here
//! opens a socket or a file.

pub mod auth;
pub mod csum;
pub mod device;
pub mod link;
pub mod plan;
pub mod rate;
pub mod uuid;
