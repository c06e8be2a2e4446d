//! The one executor of every machine decision that changes what a node keeps across a restart:
//! its generation UUIDs ([`crate::meta::generation`]), its superblock flags, its agreed size and
//! the whole-device out-of-sync mark of a full sync.
//!
//! The daemon runs it over the meta-data store, the simulator ([`super::sim`]) over its toy
//! disk: the same code for every such action, so the simulator's tests check the rules that
//! production runs. Pure apart from the [`Keeper`] it is handed; a [`Keeper`] that fails to
//! write reports it, and the executor stops at the first failure.

use super::machine::Action;
use super::SyncDirection;
use crate::meta::generation::UuidSet;
use crate::wire::ondisk::flags;

/// What a node keeps across a restart, as the executor reads and writes it. Every write is
/// durable when it returns `Ok`.
pub trait Keeper {
    /// The generation UUIDs as stored.
    fn uuids(&self) -> UuidSet;
    /// Stores new generation UUIDs.
    fn store_uuids(&mut self, uuids: UuidSet) -> Result<(), String>;
    /// Sets and clears superblock flags.
    fn change_flags(&mut self, set: u32, clear: u32) -> Result<(), String>;
    /// Records the size agreed with a smaller peer.
    fn store_agreed_size(&mut self, size: u64) -> Result<(), String>;
    /// Marks the whole device out of sync (a full sync starts).
    fn mark_all_out_of_sync(&mut self) -> Result<(), String>;
}

/// What the caller must send the peer after a resync started here as the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStarted {
    /// Our UUIDs before the rotation (the target adopts them when the resync ends).
    pub at_start: UuidSet,
    /// The sync UUID the target takes as its current UUID.
    pub sync_uuid: u64,
}

/// Carries out the persistent part of one machine action. `fresh` gives new random UUIDs.
/// Returns what a resync source must send the peer, if the action started one.
pub fn execute(
    keeper: &mut impl Keeper,
    action: &Action,
    fresh: &mut impl FnMut() -> u64,
) -> Result<Option<SourceStarted>, String> {
    match *action {
        Action::NewCurrentUuid => {
            let mut uuids = keeper.uuids();
            uuids.new_current(fresh());
            keeper.store_uuids(uuids)?;
        }
        Action::PersistFlags { set, clear } => keeper.change_flags(set, clear)?,
        Action::Shrink { size } => keeper.store_agreed_size(size)?,
        Action::StartResync {
            direction, full, ..
        } => {
            if full {
                keeper.mark_all_out_of_sync()?;
            }
            return match direction {
                SyncDirection::Source => begin_resync_source(keeper, fresh()).map(Some),
                // Inconsistent until the resync ends; the sync UUID comes from the source.
                SyncDirection::Target => keeper.change_flags(0, flags::CONSISTENT).map(|()| None),
            };
        }
        _ => {}
    }
    Ok(None)
}

/// The source's rotation at the start of a resync ([`UuidSet::start_resync_source`]).
fn begin_resync_source(keeper: &mut impl Keeper, fresh: u64) -> Result<SourceStarted, String> {
    let mut uuids = keeper.uuids();
    let at_start = uuids;
    let sync_uuid = uuids.start_resync_source(fresh);
    keeper.store_uuids(uuids)?;
    Ok(SourceStarted {
        at_start,
        sync_uuid,
    })
}

/// The target received the source's sync UUID: it becomes our current UUID, and the data is
/// inconsistent until the resync ends.
pub fn adopt_sync_uuid(keeper: &mut impl Keeper, sync_uuid: u64) -> Result<(), String> {
    let mut uuids = keeper.uuids();
    uuids.start_resync_target(sync_uuid);
    keeper.store_uuids(uuids)?;
    keeper.change_flags(0, flags::CONSISTENT)
}

/// A resync ended here as the source: the bitmap generation goes into history, and the peer is
/// no longer outdated nor this node a crashed primary.
pub fn finish_resync_source(keeper: &mut impl Keeper) -> Result<(), String> {
    let mut uuids = keeper.uuids();
    uuids.finish_resync_source();
    keeper.store_uuids(uuids)?;
    keeper.change_flags(0, flags::CRASHED_PRIMARY | flags::PEER_OUTDATED)
}

/// A resync ended here as the target: adopt the source's generations (`source_at_start`: its
/// set before it rotated), and the data is consistent again.
pub fn finish_resync_target(
    keeper: &mut impl Keeper,
    source_at_start: Option<&UuidSet>,
) -> Result<(), String> {
    let mut uuids = keeper.uuids();
    if let Some(source) = source_at_start {
        uuids.finish_resync_target(source);
    }
    keeper.store_uuids(uuids)?;
    keeper.change_flags(flags::CONSISTENT, flags::CRASHED_PRIMARY)
}
