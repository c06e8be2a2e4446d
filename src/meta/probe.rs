//! What is already on a disk: signatures create-md must not overwrite without `--force`.
//!
//! [`probe_area`] looks for filesystem, volume-manager, RAID and partition-table signatures at
//! the offsets where they would sit if that structure started at the beginning of the
//! meta-data area. [`filesystem_size`] reads the size of an ext2/3/4 or XFS filesystem at the
//! start of a device, so create-md can refuse internal meta-data that would cut into it.

use crate::block::BlockDevice;
use crate::wire::ondisk::{Superblock, BLOCK_LEN};

use super::MetaError;

/// One thing found on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What it is ("ext2/3/4 filesystem", "GPT partition table", ...).
    pub what: String,
    /// Byte offset of the signature on the device.
    pub offset: u64,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (signature at byte {})", self.what, self.offset)
    }
}

/// (offset from the start of the structure, magic bytes, name).
const SIGNATURES: &[(u64, &[u8], &str)] = &[
    (1080, &[0x53, 0xEF], "ext2/3/4 filesystem"),
    (0, b"XFSB", "XFS filesystem"),
    (65600, b"_BHRfS_M", "btrfs filesystem"),
    (4086, b"SWAPSPACE2", "Linux swap space"),
    (4086, b"SWAP-SPACE", "Linux swap space"),
    (0, b"LUKS\xba\xbe", "LUKS encrypted volume"),
    (512, b"LABELONE", "LVM2 physical volume"),
    (0, b"LABELONE", "LVM2 physical volume"),
    (
        4096,
        &[0xfc, 0x4e, 0x2b, 0xa9],
        "Linux MD RAID member (1.2)",
    ),
    (0, &[0xfc, 0x4e, 0x2b, 0xa9], "Linux MD RAID member (1.1)"),
    (512, b"EFI PART", "GPT partition table"),
    (32769, b"CD001", "ISO 9660 filesystem"),
    (3, b"NTFS    ", "NTFS filesystem"),
    (82, b"FAT32   ", "FAT32 filesystem"),
    (54, b"FAT1", "FAT filesystem"),
];

fn read_opt(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Option<Vec<u8>>, MetaError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= dev.size() => {
            let mut buf = vec![0u8; len];
            dev.read_at(&mut buf, offset)?;
            Ok(Some(buf))
        }
        _ => Ok(None),
    }
}

/// Signatures of known structures starting at `area_offset` and lying within `area_len` bytes.
pub fn probe_area(
    dev: &dyn BlockDevice,
    area_offset: u64,
    area_len: u64,
) -> Result<Vec<Finding>, MetaError> {
    let mut found = Vec::new();
    for &(rel, magic, what) in SIGNATURES {
        if rel + magic.len() as u64 > area_len {
            continue;
        }
        let at = area_offset + rel;
        if read_opt(dev, at, magic.len())?.is_some_and(|b| b == magic) {
            found.push(Finding {
                what: what.to_string(),
                offset: at,
            });
        }
    }
    // A DOS partition table: the boot signature plus at least one partition entry in use.
    if area_len >= 512 {
        if let Some(mbr) = read_opt(dev, area_offset, 512)? {
            let in_use = (0..4).any(|i| mbr[446 + 16 * i + 4] != 0);
            if mbr[510] == 0x55 && mbr[511] == 0xAA && in_use {
                found.push(Finding {
                    what: "DOS (MBR) partition table".into(),
                    offset: area_offset + 510,
                });
            }
        }
    }
    Ok(found)
}

/// Twinblade superblocks (valid or not: the magic is enough) in the two copies at `sb_offset`.
pub fn probe_meta_data(dev: &dyn BlockDevice, sb_offset: u64) -> Result<Vec<Finding>, MetaError> {
    let mut found = Vec::new();
    for copy in 0..2u64 {
        let at = sb_offset + copy * BLOCK_LEN as u64;
        if let Some(block) = read_opt(dev, at, BLOCK_LEN)? {
            let sb = Superblock::new_unchecked(&block[..]);
            if sb.has_magic() {
                let detail = match crate::wire::ondisk::SuperblockRepr::parse(&sb) {
                    Ok(repr) => format!(
                        "twinblade meta-data of resource {:?} (md-uuid {:016X})",
                        repr.name, repr.md_uuid
                    ),
                    Err(e) => format!("damaged twinblade meta-data ({e})"),
                };
                found.push(Finding {
                    what: detail,
                    offset: at,
                });
            }
        }
    }
    Ok(found)
}

/// The size in bytes of an ext2/3/4 or XFS filesystem starting at byte 0, with its name.
pub fn filesystem_size(dev: &dyn BlockDevice) -> Result<Option<(&'static str, u64)>, MetaError> {
    if let Some(sb) = read_opt(dev, 1024, 1024)? {
        if sb[56..58] == [0x53, 0xEF] {
            let lo = u32::from_le_bytes(sb[4..8].try_into().unwrap()) as u64;
            let log = u32::from_le_bytes(sb[24..28].try_into().unwrap());
            let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().unwrap());
            let hi = if incompat & 0x80 != 0 {
                u32::from_le_bytes(sb[0x150..0x154].try_into().unwrap()) as u64
            } else {
                0
            };
            if log <= 6 {
                return Ok(Some(("ext2/3/4", ((hi << 32) | lo) << (10 + log))));
            }
        }
    }
    if let Some(sb) = read_opt(dev, 0, 16)? {
        if &sb[0..4] == b"XFSB" {
            let block = u32::from_be_bytes(sb[4..8].try_into().unwrap()) as u64;
            let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap());
            return Ok(Some(("XFS", blocks.saturating_mul(block))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::CrashDevice;

    #[test]
    fn finds_ext4_gpt_mbr_and_swap() {
        let dev = CrashDevice::new(1 << 20);
        let base = 128 * 1024;
        assert!(probe_area(&dev, base, 256 * 1024).unwrap().is_empty());
        dev.write_at(&[0x53, 0xEF], base + 1080, false).unwrap();
        dev.write_at(b"EFI PART", base + 512, false).unwrap();
        dev.write_at(b"SWAPSPACE2", base + 4086, false).unwrap();
        let found = probe_area(&dev, base, 256 * 1024).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            names,
            [
                "ext2/3/4 filesystem",
                "Linux swap space",
                "GPT partition table"
            ]
        );
        assert_eq!(found[0].offset, base + 1080);
        // A signature beyond the area is not reported.
        assert_eq!(probe_area(&dev, base, 500).unwrap().len(), 0);

        let dev = CrashDevice::new(1 << 20);
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        dev.write_at(&mbr, 0, false).unwrap();
        assert!(
            probe_area(&dev, 0, 4096).unwrap().is_empty(),
            "boot signature alone"
        );
        mbr[446 + 4] = 0x83;
        dev.write_at(&mbr, 0, false).unwrap();
        assert_eq!(
            probe_area(&dev, 0, 4096).unwrap()[0].what,
            "DOS (MBR) partition table"
        );
    }

    #[test]
    fn reads_ext4_and_xfs_sizes() {
        let dev = CrashDevice::new(1 << 20);
        assert_eq!(filesystem_size(&dev).unwrap(), None);
        let mut sb = vec![0u8; 1024];
        sb[56..58].copy_from_slice(&[0x53, 0xEF]);
        sb[4..8].copy_from_slice(&1000u32.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        dev.write_at(&sb, 1024, false).unwrap();
        assert_eq!(
            filesystem_size(&dev).unwrap(),
            Some(("ext2/3/4", 4096 * 1000))
        );
        let dev = CrashDevice::new(1 << 20);
        let mut sb = vec![0u8; 512];
        sb[0..4].copy_from_slice(b"XFSB");
        sb[4..8].copy_from_slice(&4096u32.to_be_bytes());
        sb[8..16].copy_from_slice(&64u64.to_be_bytes());
        dev.write_at(&sb, 0, false).unwrap();
        assert_eq!(filesystem_size(&dev).unwrap(), Some(("XFS", 64 * 4096)));
    }
}
