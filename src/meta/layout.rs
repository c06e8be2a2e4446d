//! Where each meta-data structure lives, and how much of the disk is left for data.
//!
//! Internal meta-data takes the end of the data device (`[data][bitmap][AL][sb0 sb1]`), so the
//! usable size is the device size minus the meta-data, rounded down to 4 KiB. External
//! meta-data starts at byte 0 of its own device (`[sb0 sb1][AL][bitmap]`) and the whole data
//! device (rounded down to 4 KiB) is usable. The superblock is found without any other
//! knowledge: the last 8 KiB of a 4 KiB-aligned internal device, or the first 8 KiB of an
//! external one. See [`crate::meta`] for the diagrams.

use crate::wire::ondisk::{
    al_capacity, bm_pages_for, MetaKind, SuperblockRepr, AL_CONTEXT_PER_TR, AL_MAX_SLOTS,
    BLOCK_LEN, BM_BITS_PER_PAGE, BM_BLOCK_SHIFT, MAX_EXTENT_SHIFT, MIN_EXTENT_SHIFT,
};

use super::MetaError;

/// DRBD's default number of activity-log slots.
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// DRBD's smallest number of activity-log slots.
pub const MIN_AL_EXTENTS: u32 = 7;
/// Default activity-log extent: 4 MiB, as DRBD.
pub const DEFAULT_AL_EXTENT_SHIFT: u8 = 22;
/// Default ring length: 8 transactions (32 KiB), as DRBD.
pub const DEFAULT_AL_TRANSACTIONS: u32 = 8;
/// Bytes of data one bitmap bit covers.
pub const BM_BLOCK_SIZE: u64 = 1 << BM_BLOCK_SHIFT;

const BLOCK: u64 = BLOCK_LEN as u64;

/// The tunables create-md takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutParams {
    /// Activity-log slots (hot extents).
    pub al_extents: u32,
    /// log2 of the activity-log extent size.
    pub al_extent_shift: u8,
}

impl Default for LayoutParams {
    fn default() -> Self {
        LayoutParams {
            al_extents: DEFAULT_AL_EXTENTS,
            al_extent_shift: DEFAULT_AL_EXTENT_SHIFT,
        }
    }
}

/// The geometry of one resource's meta-data (all offsets absolute on the meta-data device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Internal or external.
    pub kind: MetaKind,
    /// Usable data bytes (a multiple of 4 KiB).
    pub data_size: u64,
    /// First byte of the meta-data area.
    pub md_offset: u64,
    /// Bytes of the meta-data area.
    pub md_size: u64,
    /// First superblock copy (the second is 4 KiB after it).
    pub sb_offset: u64,
    /// Activity-log ring.
    pub al_offset: u64,
    /// Ring length in 4 KiB transactions.
    pub al_transactions: u32,
    /// Activity-log slots.
    pub al_extents: u32,
    /// log2 of the activity-log extent size.
    pub al_extent_shift: u8,
    /// First bitmap page.
    pub bm_offset: u64,
    /// Bitmap pages.
    pub bm_pages: u32,
}

/// Ring length for `al_extents` slots: DRBD's 32 KiB, or more so that every slot survives a torn
/// newest transaction.
pub fn ring_len(al_extents: u32) -> u32 {
    let needed = (al_extents as usize).div_ceil(AL_CONTEXT_PER_TR) as u32 + 1;
    needed.max(DEFAULT_AL_TRANSACTIONS)
}

/// Where the first superblock copy of internal meta-data sits on a device of `device_size`.
pub fn internal_sb_offset(device_size: u64) -> Option<u64> {
    (device_size - device_size % BLOCK).checked_sub(2 * BLOCK)
}

/// Where the first superblock copy of external meta-data sits.
pub const EXTERNAL_SB_OFFSET: u64 = 0;

fn check_params(params: &LayoutParams) -> Result<(), MetaError> {
    if !(MIN_EXTENT_SHIFT..=MAX_EXTENT_SHIFT).contains(&params.al_extent_shift) {
        return Err(MetaError::Geometry(format!(
            "activity-log extent of 2^{} bytes is outside 64 KiB..1 GiB",
            params.al_extent_shift
        )));
    }
    if params.al_extents < MIN_AL_EXTENTS || params.al_extents >= AL_MAX_SLOTS {
        return Err(MetaError::Geometry(format!(
            "al-extents {} is outside {}..{}",
            params.al_extents,
            MIN_AL_EXTENTS,
            AL_MAX_SLOTS - 1
        )));
    }
    Ok(())
}

impl Layout {
    /// Internal meta-data at the end of a device of `device_size` bytes.
    pub fn internal(device_size: u64, params: LayoutParams) -> Result<Layout, MetaError> {
        check_params(&params)?;
        let end = device_size - device_size % BLOCK;
        let al_transactions = ring_len(params.al_extents);
        // Sized for the whole device: a few bits too many, never too few.
        let bm_pages = bm_pages_for(end);
        let md_size = (2 + al_transactions as u64 + bm_pages) * BLOCK;
        if end < md_size + BLOCK {
            return Err(MetaError::Geometry(format!(
                "device of {device_size} bytes is too small for {md_size} bytes of internal meta-data"
            )));
        }
        let data_size = end - md_size;
        let bm_offset = data_size;
        let al_offset = bm_offset + bm_pages * BLOCK;
        let sb_offset = al_offset + al_transactions as u64 * BLOCK;
        let layout = Layout {
            kind: MetaKind::Internal,
            data_size,
            md_offset: bm_offset,
            md_size,
            sb_offset,
            al_offset,
            al_transactions,
            al_extents: params.al_extents,
            al_extent_shift: params.al_extent_shift,
            bm_offset,
            bm_pages: bm_pages as u32,
        };
        debug_assert_eq!(Some(sb_offset), internal_sb_offset(device_size));
        Ok(layout)
    }

    /// External meta-data for a data device of `data_device_size` bytes, on a meta-data device
    /// of `meta_device_size` bytes.
    pub fn external(
        data_device_size: u64,
        meta_device_size: u64,
        params: LayoutParams,
    ) -> Result<Layout, MetaError> {
        check_params(&params)?;
        let data_size = data_device_size - data_device_size % BLOCK;
        if data_size == 0 {
            return Err(MetaError::Geometry(format!(
                "data device of {data_device_size} bytes holds no 4 KiB block"
            )));
        }
        let al_transactions = ring_len(params.al_extents);
        let bm_pages = bm_pages_for(data_size);
        let md_size = (2 + al_transactions as u64 + bm_pages) * BLOCK;
        if meta_device_size < md_size {
            return Err(MetaError::Geometry(format!(
                "meta-data device of {meta_device_size} bytes is too small: {data_size} bytes of data need {md_size} bytes of meta-data"
            )));
        }
        Ok(Layout {
            kind: MetaKind::External,
            data_size,
            md_offset: 0,
            md_size,
            sb_offset: EXTERNAL_SB_OFFSET,
            al_offset: 2 * BLOCK,
            al_transactions,
            al_extents: params.al_extents,
            al_extent_shift: params.al_extent_shift,
            bm_offset: (2 + al_transactions as u64) * BLOCK,
            bm_pages: bm_pages as u32,
        })
    }

    /// The layout a parsed superblock describes.
    pub fn from_superblock(sb: &SuperblockRepr) -> Layout {
        let md_offset = match sb.kind {
            MetaKind::Internal => sb.bm_offset,
            MetaKind::External => sb.sb_offset,
        };
        Layout {
            kind: sb.kind,
            data_size: sb.data_size,
            md_offset,
            md_size: sb.md_size,
            sb_offset: sb.sb_offset,
            al_offset: sb.al_offset,
            al_transactions: sb.al_transactions,
            al_extents: sb.al_extents,
            al_extent_shift: sb.al_extent_shift,
            bm_offset: sb.bm_offset,
            bm_pages: sb.bm_pages,
        }
    }

    /// Copies the geometry into a superblock.
    pub fn fill_superblock(&self, sb: &mut SuperblockRepr) {
        sb.kind = self.kind;
        sb.data_size = self.data_size;
        sb.md_size = self.md_size;
        sb.sb_offset = self.sb_offset;
        sb.al_offset = self.al_offset;
        sb.bm_offset = self.bm_offset;
        sb.al_transactions = self.al_transactions;
        sb.al_extents = self.al_extents;
        sb.al_extent_shift = self.al_extent_shift;
        sb.bm_block_shift = BM_BLOCK_SHIFT;
        sb.bm_pages = self.bm_pages;
    }

    /// Checks that the layout fits devices of these sizes (`data_device_size` is ignored for
    /// internal meta-data, where the data is on the meta-data device).
    pub fn check_fits(
        &self,
        meta_device_size: u64,
        data_device_size: u64,
    ) -> Result<(), MetaError> {
        let md_end = self.md_offset + self.md_size;
        if md_end > meta_device_size {
            return Err(MetaError::Geometry(format!(
                "meta-data ends at byte {md_end} but the device has {meta_device_size}"
            )));
        }
        let regions_end = [
            self.sb_offset + 2 * BLOCK,
            self.al_offset + self.al_transactions as u64 * BLOCK,
            self.bm_offset + self.bm_pages as u64 * BLOCK,
        ];
        if regions_end.iter().any(|&e| e > md_end)
            || self.sb_offset < self.md_offset
            || self.al_offset < self.md_offset
            || self.bm_offset < self.md_offset
        {
            return Err(MetaError::Geometry(
                "a structure lies outside the meta-data area".into(),
            ));
        }
        match self.kind {
            MetaKind::Internal if self.data_size > self.md_offset => Err(MetaError::Geometry(
                format!("data size {} overlaps the meta-data at {}", self.data_size, self.md_offset),
            )),
            MetaKind::External if self.data_size > data_device_size => {
                Err(MetaError::Geometry(format!(
                    "the meta-data describes {} bytes of data but the data device has {data_device_size}",
                    self.data_size
                )))
            }
            _ => Ok(()),
        }
    }

    /// Activity-log extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        1 << self.al_extent_shift
    }

    /// Number of extents the data is divided into.
    pub fn extents(&self) -> u64 {
        self.data_size.div_ceil(self.extent_size())
    }

    /// Number of bitmap bits that describe data.
    pub fn bm_bits(&self) -> u64 {
        self.data_size.div_ceil(BM_BLOCK_SIZE)
    }

    /// Offset of AL ring slot `i`.
    pub fn al_slot_offset(&self, i: u32) -> u64 {
        self.al_offset + i as u64 * BLOCK
    }

    /// Offset of bitmap page `i`.
    pub fn bm_page_offset(&self, i: u32) -> u64 {
        self.bm_offset + i as u64 * BLOCK
    }

    /// Offset of superblock copy `i` (0 or 1).
    pub fn sb_copy_offset(&self, i: usize) -> u64 {
        self.sb_offset + i as u64 * BLOCK
    }

    /// Whether the ring can rebuild every slot after a torn newest transaction.
    pub fn al_recoverable(&self) -> bool {
        self.al_extents as u64 <= al_capacity(self.al_transactions)
    }

    /// Data bits one bitmap page covers.
    pub fn bits_per_page(&self) -> u64 {
        BM_BITS_PER_PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_layout_packs_at_the_end() {
        let size = (1u64 << 30) + 1000;
        let l = Layout::internal(size, LayoutParams::default()).unwrap();
        assert_eq!(l.al_transactions, 8);
        assert_eq!(l.bm_pages, 9); // 262144 bits / 32512 per page
        assert_eq!(l.sb_offset, (1 << 30) - 8192);
        assert_eq!(l.al_offset, l.sb_offset - 8 * 4096);
        assert_eq!(l.bm_offset, l.al_offset - 9 * 4096);
        assert_eq!(l.data_size, l.bm_offset);
        assert_eq!(l.md_offset + l.md_size, 1 << 30);
        assert_eq!(l.data_size, (1 << 30) - (2 + 8 + 9) * 4096);
        assert_eq!(internal_sb_offset(size), Some(l.sb_offset));
        l.check_fits(size, 0).unwrap();
        assert!(l.al_recoverable());
    }

    #[test]
    fn external_layout_starts_at_zero() {
        let l = Layout::external(1 << 30, 1 << 20, LayoutParams::default()).unwrap();
        assert_eq!((l.sb_offset, l.al_offset, l.bm_offset), (0, 8192, 40960));
        assert_eq!(l.data_size, 1 << 30);
        assert_eq!(l.md_size, 19 * 4096);
        l.check_fits(1 << 20, 1 << 30).unwrap();
        assert!(l.check_fits(1 << 20, (1 << 30) - 4096).is_err());
        assert!(Layout::external(1 << 30, 19 * 4096 - 1, LayoutParams::default()).is_err());
    }

    #[test]
    fn ring_grows_with_al_extents() {
        assert_eq!(ring_len(1237), 8);
        assert_eq!(ring_len(6412), 8);
        assert_eq!(ring_len(6413), 9);
        assert_eq!(ring_len(65534), 73);
        for al in [7, 1237, 6413, 20000, 65534] {
            assert!(al as u64 <= al_capacity(ring_len(al)), "{al}");
        }
    }

    #[test]
    fn rejects_bad_parameters_and_tiny_devices() {
        let p = |al_extents, al_extent_shift| LayoutParams {
            al_extents,
            al_extent_shift,
        };
        assert!(Layout::internal(1 << 30, p(6, 22)).is_err());
        assert!(Layout::internal(1 << 30, p(65535, 22)).is_err());
        assert!(Layout::internal(1 << 30, p(1237, 12)).is_err());
        assert!(Layout::internal(32 * 1024, LayoutParams::default()).is_err());
        assert!(Layout::internal(64 * 1024, LayoutParams::default()).is_ok());
        assert!(Layout::external(1000, 1 << 20, LayoutParams::default()).is_err());
    }

    #[test]
    fn superblock_round_trip_keeps_the_layout() {
        let l = Layout::internal(3 << 30, p()).unwrap();
        fn p() -> LayoutParams {
            LayoutParams {
                al_extents: 3000,
                al_extent_shift: 20,
            }
        }
        let mut sb = SuperblockRepr {
            flags: 0,
            seq: 0,
            md_uuid: 1,
            uuids: [0; 4],
            data_size: 0,
            md_size: 0,
            sb_offset: 0,
            al_offset: 0,
            bm_offset: 0,
            al_transactions: 0,
            al_extents: 0,
            al_extent_shift: 0,
            bm_block_shift: 0,
            kind: MetaKind::External,
            bm_pages: 0,
            name: String::new(),
            agreed_size: 0,
        };
        l.fill_superblock(&mut sb);
        sb.check_geometry().unwrap();
        assert_eq!(Layout::from_superblock(&sb), l);
    }
}
