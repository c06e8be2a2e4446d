//! Generation uuids: which history of the data each node holds (DRBD's C/B/H1/H2).
//!
//! * **current** (C) names the data generation this node has now;
//! * **bitmap** (B) is the generation the bitmap is relative to (0: the bitmap is not tracking
//!   changes against an older generation);
//! * **history** (H1, H2) are older generations, newest first.
//!
//! Bit 0 of a uuid is the role bit in DRBD and is ignored when comparing; new uuids are
//! generated with it clear. [`JUST_CREATED`] marks meta-data that has never been synced: the
//! first connection makes a full sync. The rotation helpers here mirror DRBD 8.4's
//! `drbd_uuid_new_current`, `drbd_uuid_set` and `drbd_uuid_set_bm`; the handshake that compares
//! two sets belongs to the replication engine.

/// The uuid create-md gives: "never synced" (DRBD's UUID_JUST_CREATED).
pub const JUST_CREATED: u64 = 4;

/// One node's generation uuids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Uuids {
    /// Current generation.
    pub current: u64,
    /// Generation the bitmap tracks changes against (0: none).
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

/// A fresh random uuid with the role bit clear (never 0 and never [`JUST_CREATED`]).
pub fn random_uuid() -> u64 {
    loop {
        let v = rand::random::<u64>() & !1;
        if v != 0 && v != JUST_CREATED {
            return v;
        }
    }
}

impl Uuids {
    /// The set create-md writes.
    pub fn just_created() -> Self {
        Uuids {
            current: JUST_CREATED,
            ..Default::default()
        }
    }

    /// From the superblock's order: current, bitmap, history 1, history 2.
    pub fn from_array(a: [u64; 4]) -> Self {
        Uuids {
            current: a[0],
            bitmap: a[1],
            history: [a[2], a[3]],
        }
    }

    /// In the superblock's order.
    pub fn to_array(self) -> [u64; 4] {
        [self.current, self.bitmap, self.history[0], self.history[1]]
    }

    fn push_history(&mut self, v: u64) {
        self.history[1] = self.history[0];
        self.history[0] = v;
    }

    /// Starts a new generation (promotion while disconnected, or losing the peer while
    /// primary): B := C, then C := `new`. Returns the old bitmap uuid if it was already set
    /// (DRBD warns about that; the old value moves to history so it is not lost).
    pub fn new_current(&mut self, new: u64) -> Option<u64> {
        let old_bitmap = (self.bitmap != 0).then_some(self.bitmap);
        if let Some(b) = old_bitmap {
            self.push_history(b);
        }
        self.bitmap = self.current;
        self.current = new;
        old_bitmap
    }

    /// Replaces the current uuid, moving the old one into history (`drbd_uuid_set(UI_CURRENT)`).
    pub fn set_current(&mut self, new: u64) {
        if self.current != 0 {
            self.push_history(self.current);
        }
        self.current = new;
    }

    /// Sets the bitmap uuid; setting 0 moves the old value into history
    /// (`drbd_uuid_set_bm`): what a finished resync does.
    pub fn set_bitmap(&mut self, new: u64) {
        if new == 0 {
            if self.bitmap != 0 {
                self.push_history(self.bitmap);
            }
            self.bitmap = 0;
        } else {
            self.bitmap = new;
        }
    }

    /// Whether these uuids are the create-md state.
    pub fn is_just_created(&self) -> bool {
        self.current & !1 == JUST_CREATED
    }
}

/// `u64` with the role bit masked, for comparisons.
pub fn without_role(v: u64) -> u64 {
    v & !1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_current_moves_current_to_bitmap() {
        let mut u = Uuids::just_created();
        assert!(u.is_just_created());
        assert_eq!(u.new_current(0x100), None);
        assert_eq!(
            u,
            Uuids {
                current: 0x100,
                bitmap: JUST_CREATED,
                history: [0, 0]
            }
        );
        // A second new generation while the bitmap is still set keeps the old bitmap uuid.
        assert_eq!(u.new_current(0x200), Some(JUST_CREATED));
        assert_eq!(
            u,
            Uuids {
                current: 0x200,
                bitmap: 0x100,
                history: [JUST_CREATED, 0]
            }
        );
    }

    #[test]
    fn clearing_bitmap_rotates_history() {
        let mut u = Uuids {
            current: 8,
            bitmap: 6,
            history: [4, 2],
        };
        u.set_bitmap(0);
        assert_eq!(
            u,
            Uuids {
                current: 8,
                bitmap: 0,
                history: [6, 4]
            }
        );
        u.set_bitmap(0);
        assert_eq!(
            u.history,
            [6, 4],
            "clearing an empty bitmap uuid changes nothing"
        );
        u.set_bitmap(10);
        assert_eq!(u.bitmap, 10);
        u.set_current(12);
        assert_eq!(
            u,
            Uuids {
                current: 12,
                bitmap: 10,
                history: [8, 6]
            }
        );
    }

    #[test]
    fn random_uuids_are_distinct_and_role_free() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        assert_eq!(a & 1, 0);
        assert_eq!(without_role(a | 1), a);
        let u = Uuids::from_array([1, 2, 3, 4]);
        assert_eq!(u.to_array(), [1, 2, 3, 4]);
    }
}
