//! High availability: deciding whether the peer is alive from heartbeats on several
//! independent paths, exchanging per-resource state over them, and holding the lease that lets
//! a primary answer clients; and the witness, a third vote on another machine.
//!
//! The pure parts (no sockets; time passed in or read through [`clock`]):
//!
//! * [`replay`]: accept a heartbeat only once, per sender (boot nonce + sequence window).
//! * [`liveness`]: the peer is dead only when every path has been silent for the dead time.
//! * [`clock`]: the monotonic clock and the shared lease expiry.
//! * [`gate`]: what the exports consult before every reply.
//! * [`quorum`]: `on-no-quorum`, how long requests wait behind a shut gate.
//!
//! The I/O part: [`service`], the heartbeat thread and its sockets, built on the above;
//! [`witness`], the witness service and the node's client of it; [`ping`], the prober of the
//! ping targets (how many the node reaches, announced through the heartbeat).
//!
//! The datagram itself is [`crate::wire::heartbeat`].

pub mod clock;
pub mod gate;
pub mod liveness;
pub mod ping;
pub mod quorum;
pub mod replay;
pub mod service;
pub mod stopwatch;
pub mod witness;
