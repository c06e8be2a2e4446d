//! Reading and writing the superblock: two copies, alternately written, the newer valid one
//! wins.
//!
//! Each write bumps the sequence number and goes (FUA) to copy `seq % 2`, so a write torn by a
//! power cut can only damage the copy being replaced; the other copy still holds the previous
//! state. At attach, the valid copy with the higher sequence is used. Both copies invalid means
//! the meta-data is lost: nothing else on the disk is trusted then.

use crate::block::BlockDevice;
use crate::wire::ondisk::{Superblock, SuperblockRepr, BLOCK_LEN};
use crate::wire::Error as WireError;

use super::MetaError;

/// What one superblock copy holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyState {
    /// No twinblade magic.
    Missing,
    /// The magic is there but the copy does not parse.
    Invalid(WireError),
    /// A valid superblock.
    Valid(SuperblockRepr),
}

/// Both copies, and which one is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockPair {
    /// Copy 0 and copy 1.
    pub copies: [CopyState; 2],
}

impl SuperblockPair {
    /// Reads both copies starting at `sb_offset`.
    pub fn read(dev: &dyn BlockDevice, sb_offset: u64) -> Result<Self, MetaError> {
        let mut copies = [CopyState::Missing, CopyState::Missing];
        let mut block = vec![0u8; BLOCK_LEN];
        for (i, copy) in copies.iter_mut().enumerate() {
            let at = sb_offset + (i * BLOCK_LEN) as u64;
            if at + BLOCK_LEN as u64 > dev.size() {
                continue;
            }
            dev.read_at(&mut block, at)?;
            let sb = Superblock::new_unchecked(&block[..]);
            *copy = if !sb.has_magic() {
                CopyState::Missing
            } else {
                match SuperblockRepr::parse(&sb) {
                    // A copy must say where it lives; one copied from elsewhere is not ours.
                    Ok(repr) if repr.sb_offset == sb_offset => CopyState::Valid(repr),
                    Ok(_) => CopyState::Invalid(WireError::Malformed { field: "sb_offset" }),
                    Err(e) => CopyState::Invalid(e),
                }
            };
        }
        Ok(SuperblockPair { copies })
    }

    /// Index and contents of the copy in force: the valid one with the higher sequence.
    pub fn current(&self) -> Option<(usize, &SuperblockRepr)> {
        let valid = |i: usize| match &self.copies[i] {
            CopyState::Valid(r) => Some((i, r)),
            _ => None,
        };
        match (valid(0), valid(1)) {
            (Some(a), Some(b)) => Some(if b.1.seq > a.1.seq { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Whether either copy carries the magic (some twinblade meta-data is there).
    pub fn any_magic(&self) -> bool {
        self.copies.iter().any(|c| *c != CopyState::Missing)
    }
}

/// Writes `sb` (whose `seq` the caller has already bumped) to copy `seq % 2`, FUA.
pub fn write(dev: &dyn BlockDevice, sb: &SuperblockRepr) -> Result<(), MetaError> {
    let at = sb.sb_offset + (sb.seq % 2) * BLOCK_LEN as u64;
    dev.write_at(&sb.to_block(), at, true)?;
    Ok(())
}

/// Writes both copies (create-md): copy 0 with `seq`, copy 1 with `seq + 1`; `sb.seq` ends at
/// `seq + 1`.
pub fn write_both(dev: &dyn BlockDevice, sb: &mut SuperblockRepr) -> Result<(), MetaError> {
    for _ in 0..2 {
        write(dev, sb)?;
        sb.seq += 1;
    }
    sb.seq -= 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::{CrashDevice, CrashMode};
    use crate::meta::layout::{Layout, LayoutParams};
    use crate::wire::ondisk::MetaKind;

    fn sample(dev_size: u64) -> SuperblockRepr {
        let layout = Layout::internal(dev_size, LayoutParams::default()).unwrap();
        let mut sb = SuperblockRepr {
            flags: 0,
            seq: 0,
            md_uuid: 77,
            uuids: [4, 0, 0, 0],
            data_size: 0,
            md_size: 0,
            sb_offset: 0,
            al_offset: 0,
            bm_offset: 0,
            al_transactions: 0,
            al_extents: 0,
            al_extent_shift: 0,
            bm_block_shift: 0,
            kind: MetaKind::Internal,
            bm_pages: 0,
            name: "r0".into(),
            agreed_size: 0,
        };
        layout.fill_superblock(&mut sb);
        sb
    }

    #[test]
    fn the_newer_valid_copy_wins_and_a_torn_write_falls_back() {
        let dev = CrashDevice::new(8 << 20);
        let mut sb = sample(8 << 20);
        let pair = SuperblockPair::read(&dev, sb.sb_offset).unwrap();
        assert!(!pair.any_magic());
        assert!(pair.current().is_none());

        write_both(&dev, &mut sb).unwrap();
        assert_eq!(sb.seq, 1);
        let pair = SuperblockPair::read(&dev, sb.sb_offset).unwrap();
        assert_eq!(pair.current().unwrap().0, 1);

        // The next write goes to copy 0; tear it in the crash.
        dev.record_history();
        sb.seq += 1;
        sb.flags = crate::wire::ondisk::flags::AL_CLEAN;
        write(&dev, &sb).unwrap();
        let mut fell_back = false;
        for seed in 0..16 {
            let after = dev.crash_at(0, CrashMode::TearSector(seed));
            let pair = SuperblockPair::read(&after, sb.sb_offset).unwrap();
            let (_, cur) = pair.current().expect("one copy must survive");
            assert!(cur.seq == 1 || cur.seq == 2);
            fell_back |= cur.seq == 1;
        }
        assert!(fell_back);
        let pair = SuperblockPair::read(&dev, sb.sb_offset).unwrap();
        assert_eq!(pair.current().unwrap().1, &sb);
    }

    #[test]
    fn a_copy_at_the_wrong_place_is_not_trusted() {
        let dev = CrashDevice::new(8 << 20);
        let sb = sample(8 << 20);
        dev.write_at(&sb.to_block(), 0, false).unwrap();
        let pair = SuperblockPair::read(&dev, 0).unwrap();
        assert!(pair.any_magic());
        assert!(matches!(pair.copies[0], CopyState::Invalid(_)));
        assert!(pair.current().is_none());
    }
}
