//! The cluster state machine: role, connection, disk and replication state of one node, as a
//! pure `step(now, event) -> actions` core in the raft-rs style.
//!
//! This module owns the *decisions*: when a node may become primary, when it serves, when it
//! drops the peer, when a resync starts, when UUIDs rotate. It owns no sockets, files or timers:
//! the daemon feeds it [`Event`]s (operator commands, what the peer connection saw, disk errors,
//! timer ticks) with the current time, and performs the [`Action`]s it returns, in order.
//!
//! * [`events`]: what goes in and out of the machine — [`Config`], [`Startup`], [`Event`],
//!   [`Command`], [`Terms`], [`Action`], [`Notification`].
//! * [`machine`]: [`Machine`] and its rules.
//! * [`persist`]: the one executor of every action that changes what a node keeps across a
//!   restart (generation UUIDs, superblock flags, agreed size); the daemon and the simulator
//!   both run it.
//! * [`state`]: the state words [`Role`], [`DiskState`], [`ConnState`], [`ReplState`] and
//!   [`DisconnectReason`], with their wire codes.
//! * [`sim`]: a deterministic two-node simulation (two machines, a simulated link that can drop,
//!   cut and restore, explicit time, toy disks with bitmaps) used by the tests in
//!   `tests/cluster_*.rs`; it is also the reference for how a daemon executes the actions.
//!
//! The state words are DRBD's (`drbdadm status`): role Primary/Secondary, connection
//! StandAlone/Connecting/WFReportParams/Connected, disk Diskless/Inconsistent/Outdated/
//! Consistent/UpToDate/DUnknown, replication Off/Established/SyncSource/SyncTarget/
//! PausedSyncS/PausedSyncT. They are defined in [`state`], with their one-byte wire codes
//! (they travel in the replication protocol's `StateChange` and `Parameters`, see
//! [`crate::wire::repl`], which re-exports them), and re-exported here.
//!
//! # Invariants
//!
//! * Only a Primary serves (AoE/NBD exports, floating IP); a Secondary is silent.
//! * A node never promotes itself while it is still waiting for its peer at startup, nor with
//!   data that is not UpToDate; the operator can override with `primary --force`.
//! * While connected, at most one node is Primary: `primary` is refused if the peer is Primary,
//!   and two Primaries that meet are a split brain.
//! * A split brain or unrelated data leaves the node StandAlone, with no resync; only the
//!   operator (`connect --discard-my-data` on the loser) resolves it.

pub mod events;
pub mod machine;
pub mod persist;
pub mod sim;
pub mod state;

pub use crate::repl::uuid::{SyncDecision, SyncDirection};
pub use machine::{
    Action, Authority, Command, Config, Event, FenceOutcome, Fencing, Handover, Machine, NodeName,
    Notification, PeerRefusal, PeerSeen, Refusal, SharedSettings, Startup, Status,
    SwitchoverReason, Terms, WitnessVerdict, HANDOVER_TIMEOUT,
};
pub use state::{ConnState, DisconnectReason, DiskState, ReplState, Role};
