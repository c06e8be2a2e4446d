//! Replication meta-data that survives any crash: superblock, activity log, bitmap.
//!
//! After any crash, the activity log (AL) and the bitmap together must name every block that
//! might differ between the two nodes, or a resync silently skips data. This module owns the
//! on-disk meta-data of one resource and the rules that make that true. The byte formats are
//! in [`crate::wire::ondisk`]; the crash simulator that tests the rules is
//! [`crate::block::crash`].
//!
//! # What is stored
//!
//! * **Superblock** (two 4 KiB copies, written alternately; the valid one with the higher
//!   sequence wins): format version, geometry, generation uuids (current, bitmap, two history;
//!   see [`generation`]) and flags — consistent, primary indicator, crashed primary, peer
//!   outdated, AL clean.
//! * **Activity log**: a ring of crc32c-checked 4 KiB transactions naming the *hot* extents
//!   (4 MiB each by default; `al-extents` = 1237 slots by default, as DRBD). See
//!   [`activity_log`].
//! * **Bitmap**: one bit per 4 KiB of data, set when the block may differ from the peer, in
//!   crc32c-checked 4 KiB pages. See [`bitmap`].
//!
//! # Layout
//!
//! Internal meta-data sits at the end of the data device, which shrinks by its size (rounded
//! to 4 KiB; `create-md` reports the usable size):
//!
//! ```text
//! 0                                data_size                                   device end
//! |  data (exported)                   | bitmap pages | AL ring | sb 0 | sb 1 |
//!                                      ^ md_offset = bm_offset    ^ end - 8 KiB
//! ```
//!
//! External meta-data has a device (or file, or loop device) of its own; the data device is
//! used whole:
//!
//! ```text
//! meta-data device:  0      4K     8K                8K + ring
//!                    | sb 0 | sb 1 | AL ring (8 x 4K) | bitmap pages ... |
//! data device:       | data (exported, whole device rounded down to 4 KiB) |
//! ```
//!
//! Sizes: the ring is 8 transactions (32 KiB) unless `al-extents` needs more (more than 6412
//! slots); the bitmap needs 4 KiB per 127 MiB of data (32 MiB per TiB).
//!
//! # The four rules
//!
//! 1. **An AL transaction is durable before the first write into a cold extent.**
//!    [`MetaStore::write_begin`] returns only after the transaction that makes every extent of
//!    the range hot was written with FUA. Writes into hot extents cost nothing.
//! 2. **The bitmap is written before an extent leaves the AL.** Evicting an extent first writes
//!    the dirty bitmap pages covering it and flushes the meta-data device — and the data
//!    device, so no write into that extent is still only in a volatile cache.
//! 3. **A clean shutdown marks the AL clean.** [`MetaStore::mark_clean`] flushes data and
//!    bitmap, then sets AL_CLEAN in the superblock. The first cold write afterwards writes a
//!    reset transaction and then clears the flag, both before the write proceeds.
//! 4. **On attach after a crash, every AL extent counts as out of sync.**
//!    [`MetaStore::attach`] rebuilds the log from the ring; if AL_CLEAN is not set it ORs every
//!    extent into the bitmap (or sets the whole bitmap if the log cannot be rebuilt) and writes
//!    the bitmap back before anything else.
//!
//! Together: a block whose latest write may be missing on either node is either in a hot
//! extent (the log names it — rule 1) or was in an extent that left the log after its data was
//! flushed and its bits written (rule 2). A torn or corrupt structure fails its crc32c and is
//! never trusted: a damaged transaction ends the replay, a damaged bitmap page counts as all
//! ones, a damaged superblock copy yields to the other.
//!
//! # Durability levels
//!
//! Chosen per resource (`durability` in the configuration); every benchmark states which one
//! it ran.
//!
//! * **`node`** (default): an acknowledged write is in the operating system of every replica
//!   that must have it (page cache or disk cache). It survives the death of any one node —
//!   crash, power loss or kill — because the other still has it; it may be lost if both lose
//!   power at once.
//! * **`power`**: an acknowledged write has been flushed to stable storage on every replica
//!   that must have it. It survives a simultaneous power cut of both nodes. Costs a flush (or
//!   FUA) per acknowledged write on each node.
//!
//! At both levels the meta-data rules above hold, so after any crash — even a simultaneous
//! power cut at `node` level — the replicas can be brought back in agreement by a resync of
//! the out-of-sync blocks; the level only decides whether acknowledged writes may be lost.
//!
//! # Using it
//!
//! [`create`] writes fresh meta-data (`twinblade create-md`), [`inspect`] reads it without
//! changing anything (`twinblade dump-md`), [`MetaStore::attach`] opens it for the replication
//! engine. [`dump`] describes an inspection the way `dump-md` prints it.

pub mod activity_log;
pub mod bitmap;
pub mod dump;
pub mod generation;
pub mod layout;
pub mod probe;
pub mod store;
pub mod superblock;

pub use dump::Inspection;
pub use generation::UuidSet;
pub use layout::{Layout, LayoutParams};
pub use probe::Finding;
pub use store::{create, inspect, AttachReport, CreateOptions, CreateReport, MetaStats, MetaStore};

use crate::block::BlockError;

/// Why a meta-data operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The device failed.
    #[error("meta-data I/O failed: {0}")]
    Io(#[from] BlockError),
    /// No superblock where one should be.
    #[error("no twinblade meta-data at byte {offset} (run create-md first)")]
    NoMetaData {
        /// Where the first superblock copy was looked for.
        offset: u64,
    },
    /// The meta-data is there but cannot be trusted.
    #[error("meta-data is damaged: {0}")]
    Corrupt(String),
    /// The sizes do not work out.
    #[error("{0}")]
    Geometry(String),
    /// create-md found something it will not overwrite without `--force`.
    #[error("refusing to overwrite without --force: found {}", list(.0))]
    Occupied(Vec<Finding>),
    /// A request outside the data.
    #[error("request at {offset} of {len} bytes exceeds the {size} bytes of data")]
    OutOfRange {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Usable data size.
        size: u64,
    },
    /// A request needs more extents than the log has slots.
    #[error("request spans {extents} extents but the activity log has {slots} slots")]
    TooLarge {
        /// Extents needed.
        extents: usize,
        /// Slots available.
        slots: u32,
    },
    /// Writes are in flight (mark_clean).
    #[error("{in_flight} writes are in flight")]
    Busy {
        /// Writes between write_begin and write_end.
        in_flight: u64,
    },
    /// An earlier meta-data write failed; the store accepts no more writes.
    #[error("meta-data store failed after an earlier I/O error; detach and re-attach")]
    Failed,
}

fn list(found: &[Finding]) -> String {
    found
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
