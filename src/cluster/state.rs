//! The cluster's state words: [`Role`], [`DiskState`], [`ConnState`], [`ReplState`] and
//! [`DisconnectReason`], in DRBD's words (`drbdadm status`), with their one-byte wire codes.
//!
//! They travel in the replication protocol's `StateChange`, `Parameters` and `Disconnect`
//! messages ([`crate::wire::repl`], which re-exports them), so each carries its code: `code`,
//! `from_code` (`Malformed` for an unknown code) and `as_str`/`Display`. Plain conversions, no
//! I/O, nothing async.
//!
//! The `wire_enum!` macro declares such a word list; the protocol's own enums
//! (`ReplProtocol`, `Durability`, `AckKind`) use it too.

/// Declares a `u8`-coded enum: `ALL`, `code`, `from_code`, `as_str` and `Display`.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:expr, $word:expr;)* } $field:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }
        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// The wire code.
            pub fn code(self) -> u8 {
                match self { $($name::$variant => $code,)* }
            }
            /// The value of a wire code; `Malformed` for an unknown code.
            pub fn from_code(code: u8) -> Result<$name, $crate::wire::Error> {
                match code {
                    $($code => Ok($name::$variant),)*
                    _ => Err($crate::wire::Error::Malformed { field: $field }),
                }
            }
            /// The word `drbdadm status` would print.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word,)* }
            }
        }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// A node's role for the resource.
    Role {
        /// Role not known (the peer is not connected).
        Unknown = 0, "Unknown";
        /// Serves the exports and originates writes.
        Primary = 1, "Primary";
        /// Receives writes from the primary; exports nothing.
        Secondary = 2, "Secondary";
    } "role"
}

wire_enum! {
    /// The state of a node's local data, in DRBD's words.
    DiskState {
        /// No local disk attached (detached after an I/O error, or never attached).
        Diskless = 0, "Diskless";
        /// The data is not usable: a sync target mid-resync, or never synced.
        Inconsistent = 1, "Inconsistent";
        /// Consistent but known to be older than the peer's.
        Outdated = 2, "Outdated";
        /// Consistent; whether it is the newest is not known (no peer seen yet).
        Consistent = 3, "Consistent";
        /// Consistent and known to be the newest data.
        UpToDate = 4, "UpToDate";
        /// The peer's disk, while the peer is not connected.
        DUnknown = 5, "DUnknown";
    } "disk state"
}

wire_enum! {
    /// The state of the connection to the peer.
    ConnState {
        /// Not connected and not trying (operator `disconnect`, split brain, unrelated data).
        StandAlone = 0, "StandAlone";
        /// Trying to reach the peer (DRBD 8.4: WFConnection).
        Connecting = 1, "Connecting";
        /// Transport up and authenticated, exchanging parameters and UUIDs.
        Handshaking = 2, "WFReportParams";
        /// Handshake done; see the replication state.
        Connected = 3, "Connected";
    } "connection state"
}

wire_enum! {
    /// What the connection is doing with the data.
    ReplState {
        /// Not connected.
        Off = 0, "Off";
        /// Writes are mirrored; nothing to resync.
        Established = 1, "Established";
        /// Sending resync data to the peer.
        SyncSource = 2, "SyncSource";
        /// Receiving resync data from the peer.
        SyncTarget = 3, "SyncTarget";
        /// Resync as source, paused by the operator.
        PausedSyncS = 4, "PausedSyncS";
        /// Resync as target, paused by the operator.
        PausedSyncT = 5, "PausedSyncT";
    } "replication state"
}

wire_enum! {
    /// Why a node closes the connection ([`DisconnectRepr`](crate::wire::repl::DisconnectRepr)).
    DisconnectReason {
        /// Orderly shutdown or operator `disconnect`.
        Shutdown = 0, "shutdown";
        /// No common protocol version.
        VersionMismatch = 1, "version-mismatch";
        /// Authentication failed.
        AuthFailed = 2, "auth-failed";
        /// The peer's data is unrelated to ours (no common generation).
        UnrelatedData = 3, "unrelated-data";
        /// Split brain detected; both stay StandAlone until the operator resolves it.
        SplitBrain = 4, "split-brain";
        /// The usable sizes differ.
        SizeMismatch = 5, "size-mismatch";
        /// The peer sent something that violates the protocol.
        ProtocolError = 6, "protocol-error";
        /// The peer stopped completing writes (ko-count).
        KoCount = 7, "ko-count";
        /// The peer stopped answering pings.
        Timeout = 8, "timeout";
        /// Both nodes are primary.
        BothPrimary = 9, "both-primary";
        /// The peer refused the connection because a node with this name is already connected.
        Duplicate = 10, "duplicate";
    } "disconnect reason"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words_match_drbd() {
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!(ConnState::Handshaking.to_string(), "WFReportParams");
        assert_eq!(ReplState::PausedSyncT.to_string(), "PausedSyncT");
        for d in DiskState::ALL {
            assert_eq!(DiskState::from_code(d.code()), Ok(*d));
        }
        assert!(Role::from_code(9).is_err());
    }
}
