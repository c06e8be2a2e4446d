//! The NBD target: serves any [`BlockDevice`](crate::block::BlockDevice) to NBD clients
//! (qemu, nbd-client, libnbd's nbdcopy/nbdinfo, fio's `nbd` engine) over TCP.
//!
//! # What this module owns
//!
//! * [`export`]: an export and what the server derives from it, shared by both phases.
//! * [`server`]: the listener (one task per connection, capped by a semaphore, stopped by a
//!   `CancellationToken`) and the transmission phase of each connection.
//! * `handshake`: fixed-newstyle negotiation (`NBD_OPT_EXPORT_NAME`, `GO`, `INFO`, `LIST`,
//!   `ABORT`; everything else is refused with `NBD_REP_ERR_UNSUP`).
//! * [`acl`]: the optional allowlist of client addresses.
//! * [`fuzz_session`]: the server driven by arbitrary client bytes, for the `nbd` fuzz target.
//!
//! Bytes are parsed and emitted only by [`crate::wire::nbd`]; this module does the I/O.
//!
//! # Why not the `nbd` crate
//!
//! The `nbd` crate's server side is synchronous, answers `NBD_OPT_GO`/`NBD_OPT_INFO` with
//! `NBD_REP_ERR_UNSUP` (so no block-size negotiation) and runs one request at a time, which
//! caps throughput at one round trip per request. Both phases are therefore written here, on
//! top of the wire module; the crate's *client* is used in the tests as an independent peer.
//!
//! # Invariants
//!
//! * A reply is sent only after the device call it reports on has returned, so a successful
//!   write reply means the write is visible to every later read on any connection, and a
//!   flush reply covers every write replied to before the flush arrived
//!   ([`BlockDevice::flush`](crate::block::BlockDevice::flush) is device-wide). That is why
//!   `NBD_FLAG_CAN_MULTI_CONN` is advertised.
//! * Every request of an export is admitted through the export's
//!   [`Sequencer`](crate::block::Sequencer) in arrival order before it runs, so overlapping
//!   writes complete in submission order even though requests run in parallel and replies go
//!   out of order (matched by handle).
//! * Nothing a client sends can panic the server or stall another connection: bad input gets
//!   an NBD error or closes only that connection, and logs it can trigger are rate-limited.

pub mod acl;
pub mod export;
mod fuzz;
mod handshake;
mod op;
mod outq;
pub mod server;

pub use acl::Acl;
pub use export::{Export, ExportError};
pub use fuzz::fuzz_session;
pub use server::{Server, ServerConfig, ServerStats};
