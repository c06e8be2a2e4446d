//! twinblade: a highly available SAN appliance in one binary.
//!
//! # Layout
//!
//! * [`wire`]: every byte format (AoE frames, ...) as typed views with checked parsing. Pure: no I/O.
//! * [`block`]: the `BlockDevice` contract and its backends (file, null, fault-injecting).
//! * [`export`]: the targets that serve a `BlockDevice` to clients (AoE, NBD).
//! * [`net`]: raw packet sockets and interface queries used by the AoE target.
//! * [`ratelimit`]: rate-limited, counted logging for anything the network can trigger.
//! * [`ha`]: high availability: replay window, multi-path peer liveness, the lease clock and
//!   serve gate, and the heartbeat service that runs them over UDP (not wired in yet).
//! * [`cluster`], [`repl`], [`meta`]: the replication decisions, the replicated device, the
//!   meta-data.
//! * [`daemon`]: `twinblade run` — engines, peer connections, the control socket.
//! * [`supervisor`]: the one place threads and tasks are started, named, cancelled and joined.
//! * [`config`]: the cluster configuration file.
//! * [`cli`]: the command line: every subcommand's front end. Nothing else imports it.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod block;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod export;
pub mod ha;
pub mod meta;
pub mod net;
pub mod ratelimit;
pub mod repl;
pub mod supervisor;
pub mod wire;
