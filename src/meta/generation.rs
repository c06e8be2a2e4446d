//! Generation UUIDs: which history of the data a node holds (DRBD's C/B/H1/H2), and the one
//! model of how they rotate. The daemon (through [`crate::cluster::persist`]), the meta-data
//! store and the simulator all run these functions; the handshake that compares two sets is
//! [`crate::repl::uuid::decide`].
//!
//! Each node keeps four UUIDs ([`UuidSet`]): **C** (current: names the data generation),
//! **B** (bitmap: the generation the out-of-sync bitmap counts from; 0 when the peer is in
//! sync), **H1**, **H2** (history, newest first). Bit 0 of a UUID is the role bit in DRBD and is
//! ignored when comparing; new UUIDs are generated with it clear. [`UUID_JUST_CREATED`] marks
//! meta-data that has never been synced: the first connection makes a full sync.
//!
//! # Rotations
//!
//! * [`UuidSet::new_current`]: a primary loses its peer, or a node is promoted while
//!   disconnected: `B := C` (only if B = 0, see below), `C := random`. Persist before the first
//!   write of the new generation.
//! * [`UuidSet::start_resync_source`] / [`UuidSet::start_resync_target`]: the source picks the
//!   sync UUID (`B + OFF`, or random if B is 0 or JC), pushes its old B into history and sends it
//!   (`SyncUuid`); the target sets `C := sync UUID, B := 0`.
//! * [`UuidSet::finish_resync_source`] / [`UuidSet::finish_resync_target`]: B moves into
//!   history and is zeroed; the target adopts the source's UUIDs. Both end with the same set.
//!
//! DRBD 8.4 (`drbd_uuid_new_current`, called from `drbd_set_role` and `_drbd_set_state`) starts
//! a new generation when B = 0; a forced promotion with B already set overwrites B and warns.
//! Here `new_current` keeps an existing B instead: the bitmap still counts every change since
//! that older generation, which is what the peer holds, so the next handshake finds the peer's
//! C in our B (rule 50/70) and resyncs exactly the bitmap.

use crate::wire::repl::{
    UuidsRepr, UUID_FLAG_CRASHED_PRIMARY, UUID_FLAG_DISCARD_MY_DATA, UUID_FLAG_INCONSISTENT,
};
use std::fmt;

/// The "just created" UUID `create-md` writes as current.
pub const UUID_JUST_CREATED: u64 = 4;
/// What a resync source adds to its bitmap UUID to make the sync UUID.
pub const UUID_NEW_BM_OFFSET: u64 = 0x0001_0000_0000_0000;

/// Flags that travel with the UUIDs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct UuidFlags {
    /// The operator connected with `--discard-my-data`.
    pub discard_my_data: bool,
    /// This node crashed while primary (its activity-log extents may differ from the peer).
    pub crashed_primary: bool,
    /// This node's disk is Inconsistent.
    pub inconsistent: bool,
}

impl UuidFlags {
    /// The wire representation (`UUID_FLAG_*` bits).
    pub fn bits(self) -> u64 {
        let mut b = 0;
        if self.discard_my_data {
            b |= UUID_FLAG_DISCARD_MY_DATA;
        }
        if self.crashed_primary {
            b |= UUID_FLAG_CRASHED_PRIMARY;
        }
        if self.inconsistent {
            b |= UUID_FLAG_INCONSISTENT;
        }
        b
    }

    /// From wire bits (unknown bits are ignored; the wire parser already refuses them).
    pub fn from_bits(b: u64) -> Self {
        UuidFlags {
            discard_my_data: b & UUID_FLAG_DISCARD_MY_DATA != 0,
            crashed_primary: b & UUID_FLAG_CRASHED_PRIMARY != 0,
            inconsistent: b & UUID_FLAG_INCONSISTENT != 0,
        }
    }
}

/// One node's generation UUIDs plus what travels with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct UuidSet {
    /// Current UUID (C).
    pub current: u64,
    /// Bitmap UUID (B), 0 if none.
    pub bitmap: u64,
    /// History UUIDs (H1, H2), newest first.
    pub history: [u64; 2],
    /// Set bits in the bitmap (logged; DRBD's discard-least-changes would use it).
    pub dirty_bits: u64,
    /// Flags.
    pub flags: UuidFlags,
}

impl From<UuidsRepr> for UuidSet {
    fn from(r: UuidsRepr) -> Self {
        UuidSet {
            current: r.current,
            bitmap: r.bitmap,
            history: r.history,
            dirty_bits: r.dirty_bits,
            flags: UuidFlags::from_bits(r.flags),
        }
    }
}

impl From<UuidSet> for UuidsRepr {
    fn from(s: UuidSet) -> Self {
        UuidsRepr {
            current: s.current,
            bitmap: s.bitmap,
            history: s.history,
            dirty_bits: s.dirty_bits,
            flags: s.flags.bits(),
        }
    }
}

impl fmt::Display for UuidSet {
    /// `C:B:H1:H2` in hex, like `drbdadm show-gi`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}:{:016X}:{:016X}:{:016X}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

impl UuidSet {
    /// From the superblock's order: current, bitmap, history 1, history 2 (no flags).
    pub fn from_array(a: [u64; 4]) -> Self {
        UuidSet {
            current: a[0],
            bitmap: a[1],
            history: [a[2], a[3]],
            ..Default::default()
        }
    }

    /// The generations in the superblock's order (flags and dirty bits are not stored).
    pub fn to_array(self) -> [u64; 4] {
        [self.current, self.bitmap, self.history[0], self.history[1]]
    }

    /// Whether the current UUID is the create-md one (never synced).
    pub fn is_just_created(&self) -> bool {
        self.current & !1 == UUID_JUST_CREATED
    }

    /// The UUIDs `create-md` writes: C = JC, nothing else.
    pub fn just_created() -> Self {
        UuidSet {
            current: UUID_JUST_CREATED,
            ..Default::default()
        }
    }

    fn push_history(&mut self, uuid: u64) {
        if uuid != 0 {
            self.history = [uuid, self.history[0]];
        }
    }

    /// Starts a new data generation: `B := C` unless a bitmap generation is already open, then
    /// `C := fresh`. Call when a primary loses its peer (or the peer's disk) and when a node is
    /// promoted while disconnected; persist before the first write of the new generation.
    pub fn new_current(&mut self, fresh: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        }
        self.current = fresh;
    }

    /// The resync source's side of starting a resync: picks the sync UUID (B + OFF, or
    /// `fresh` if B is 0 or JC), moves the old B into history, sets B := sync UUID, and returns
    /// the sync UUID to send to the target (`SyncUuid`).
    pub fn start_resync_source(&mut self, fresh: u64) -> u64 {
        let old = self.bitmap;
        let sync = if old != 0 && old != UUID_JUST_CREATED {
            old.wrapping_add(UUID_NEW_BM_OFFSET)
        } else {
            fresh
        };
        self.push_history(old);
        self.bitmap = sync;
        sync
    }

    /// The target's side of starting a resync: `C := sync UUID, B := 0`.
    pub fn start_resync_target(&mut self, sync_uuid: u64) {
        self.current = sync_uuid;
        self.bitmap = 0;
    }

    /// The source's side of a finished resync: B moves into history and is zeroed.
    pub fn finish_resync_source(&mut self) {
        let b = self.bitmap;
        self.push_history(b);
        self.bitmap = 0;
        self.flags.crashed_primary = false;
    }

    /// The target's side of a finished resync: adopts the source's UUIDs as the source has them
    /// after [`UuidSet::finish_resync_source`]. `source_at_start` is the source's set as
    /// received in the handshake, *before* it started the resync; our current UUID is the sync
    /// UUID the source sent.
    pub fn finish_resync_target(&mut self, source_at_start: &UuidSet) {
        let sync_uuid = self.current;
        let mut s = *source_at_start;
        s.push_history(s.bitmap);
        s.bitmap = sync_uuid;
        s.finish_resync_source();
        self.current = s.current;
        self.bitmap = 0;
        self.history = s.history;
        self.flags.crashed_primary = false;
        self.flags.inconsistent = false;
    }
}

/// Generates a fresh random UUID (never 0 or JC).
pub fn random_uuid<R: rand::Rng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() & !1;
        if v != 0 && v != UUID_JUST_CREATED {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_opens_the_bitmap_once() {
        let mut u = UuidSet::just_created();
        assert!(u.is_just_created());
        u.new_current(0x100);
        assert_eq!(u.to_array(), [0x100, UUID_JUST_CREATED, 0, 0]);
        // While the bitmap generation is open, it keeps counting from the older generation:
        // that is what the peer holds.
        u.new_current(0x200);
        assert_eq!(u.to_array(), [0x200, UUID_JUST_CREATED, 0, 0]);
    }

    #[test]
    fn superblock_order_round_trips_and_random_uuids_are_role_free() {
        let u = UuidSet::from_array([8, 6, 4, 2]);
        assert_eq!(u.to_array(), [8, 6, 4, 2]);
        let mut rng = rand::rng();
        let (a, b) = (random_uuid(&mut rng), random_uuid(&mut rng));
        assert_ne!(a, b);
        assert_eq!(a & 1, 0);
        assert!(a != 0 && a != UUID_JUST_CREATED);
    }
}
