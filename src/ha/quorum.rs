//! `on-no-quorum` (DRBD's): what a serving node does with its clients' requests while its serve
//! gate is shut — it lost its peer and cannot get a vouch (the witness's grant, the fence
//! command's exit), or its lease ran out.
//!
//! While the gate is shut nothing is acknowledged, whatever the policy: the exports hold their
//! replies ([`crate::ha::gate`]). The policy only decides how long a client waits for them:
//!
//! * [`OnNoQuorum::SuspendIo`]: for as long as it takes (the gate opens again when the peer or
//!   the vouch comes back; or the node demotes, and the connections close unanswered).
//! * [`OnNoQuorum::IoError`]: for `on-no-quorum-timeout` seconds; after that, NBD requests held
//!   or arriving while the gate stays shut get an `EIO` reply, without touching the device.
//!   An NBD connection is TCP to this node, so its error cannot collide with an answer from
//!   another server. AoE requests stay unanswered: an AoE reply — an error too — from this
//!   node's MAC for the shelf.slot could be a second answer while the peer serves it; the Linux
//!   aoe driver fails the I/O itself after `aoe_deadsecs`.
//!
//! The decision is [`OnNoQuorum::fails`], on how long the gate has been shut;
//! [`crate::ha::gate::ServeGate::failing`] measures that.

use std::time::Duration;

/// See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNoQuorum {
    /// Hold every request until the gate opens (DRBD's `suspend-io`).
    SuspendIo,
    /// Hold them for `after`, then fail them (NBD: `EIO`) while the gate stays shut.
    IoError {
        /// `on-no-quorum-timeout`.
        after: Duration,
    },
}

impl OnNoQuorum {
    /// `on-no-quorum-timeout` when not given.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default policy: bounded, then I/O errors.
    pub const DEFAULT: OnNoQuorum = OnNoQuorum::IoError {
        after: Self::DEFAULT_TIMEOUT,
    };
    /// The words of `on-no-quorum`.
    pub const WORDS: [&'static str; 2] = ["io-error", "suspend-io"];

    /// The configuration's word.
    pub fn word(self) -> &'static str {
        match self {
            OnNoQuorum::SuspendIo => "suspend-io",
            OnNoQuorum::IoError { .. } => "io-error",
        }
    }

    /// The bound, if any.
    pub fn timeout(self) -> Option<Duration> {
        match self {
            OnNoQuorum::SuspendIo => None,
            OnNoQuorum::IoError { after } => Some(after),
        }
    }

    /// Once the gate has been shut for `shut_for`, do requests fail rather than wait?
    pub fn fails(self, shut_for: Duration) -> bool {
        match self {
            OnNoQuorum::SuspendIo => false,
            OnNoQuorum::IoError { after } => shut_for >= after,
        }
    }
}

impl std::fmt::Display for OnNoQuorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnNoQuorum::SuspendIo => f.write_str("suspend-io"),
            OnNoQuorum::IoError { after } => {
                write!(f, "io-error after {}s", after.as_secs_f64())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_fails_only_from_the_bound_on_and_suspend_never() {
        let p = OnNoQuorum::IoError {
            after: Duration::from_secs(3),
        };
        assert!(!p.fails(Duration::ZERO));
        assert!(!p.fails(Duration::from_millis(2999)));
        assert!(p.fails(Duration::from_secs(3)));
        assert!(p.fails(Duration::from_secs(3600)));
        assert!(!OnNoQuorum::SuspendIo.fails(Duration::from_secs(86_400 * 365)));
        assert_eq!(OnNoQuorum::DEFAULT.word(), "io-error");
        assert_eq!(OnNoQuorum::SuspendIo.timeout(), None);
    }
}
