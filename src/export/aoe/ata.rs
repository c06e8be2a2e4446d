//! The ATA device an AoE blade emulates: which commands it accepts and what they do to the
//! `BlockDevice`.
//!
//! Execution is split from parsing: [`AtaRequest::from_repr`] turns a parsed ATA argument into
//! a request (or a reason to refuse it); [`execute`] runs it against the device and returns the
//! registers and data length of the reply. FLUSH CACHE (EXT) really flushes, unlike vblade.

use crate::block::{BlockDevice, BlockError, SECTOR_SIZE};
use crate::wire::aoe::{ata_flags, AtaRepr};

/// ATA command codes we implement.
pub mod cmd {
    /// READ SECTORS (28-bit LBA).
    pub const READ: u8 = 0x20;
    /// READ SECTORS EXT (48-bit LBA).
    pub const READ_EXT: u8 = 0x24;
    /// WRITE SECTORS (28-bit LBA).
    pub const WRITE: u8 = 0x30;
    /// WRITE SECTORS EXT (48-bit LBA).
    pub const WRITE_EXT: u8 = 0x34;
    /// CHECK POWER MODE.
    pub const CHECK_POWER_MODE: u8 = 0xE5;
    /// FLUSH CACHE.
    pub const FLUSH_CACHE: u8 = 0xE7;
    /// FLUSH CACHE EXT.
    pub const FLUSH_CACHE_EXT: u8 = 0xEA;
    /// IDENTIFY DEVICE.
    pub const IDENTIFY: u8 = 0xEC;
}

/// ATA status register bits.
pub mod status {
    /// Device ready.
    pub const DRDY: u8 = 0x40;
    /// Error: see the error register.
    pub const ERR: u8 = 0x01;
}

/// ATA error register bits.
pub mod error {
    /// ID not found: the LBA is beyond the device.
    pub const IDNF: u8 = 0x10;
    /// Command aborted.
    pub const ABRT: u8 = 0x04;
}

const MAX_LBA28: u64 = 0x0FFF_FFFF;
const MAX_LBA48: u64 = 0xFFFF_FFFF_FFFF;

/// What an ATA command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtaRequest {
    /// Read `sectors` sectors at `lba`.
    Read {
        /// First sector.
        lba: u64,
        /// Sector count.
        sectors: u8,
    },
    /// Write `sectors` sectors at `lba` from the frame's data.
    Write {
        /// First sector.
        lba: u64,
        /// Sector count.
        sectors: u8,
    },
    /// FLUSH CACHE or FLUSH CACHE EXT.
    Flush,
    /// IDENTIFY DEVICE.
    Identify,
    /// CHECK POWER MODE.
    CheckPowerMode,
    /// Any other command: answered with ABRT.
    Unsupported(u8),
}

/// Why an ATA request is refused with AoE error 2 (bad argument) before touching the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadAtaArgument {
    /// More sectors than one frame can carry at this MTU.
    #[error("sector count {sectors} exceeds the {max} sectors a frame carries")]
    TooManySectors {
        /// Requested.
        sectors: u8,
        /// Allowed at the receiving interface's MTU.
        max: u8,
    },
    /// A write whose frame carries less data than its sector count says.
    #[error("write of {sectors} sectors carries only {have} bytes")]
    ShortWritePayload {
        /// Requested sectors.
        sectors: u8,
        /// Data bytes present.
        have: usize,
    },
    /// The W flag disagrees with the command.
    #[error("W flag disagrees with ATA command {0:#04x}")]
    WriteFlagMismatch(u8),
    /// IDENTIFY with a sector count other than 1.
    #[error("IDENTIFY with sector count {0}")]
    IdentifyCount(u8),
}

impl AtaRequest {
    /// Decodes and validates a request. `max_sectors` is what a frame carries at the MTU of
    /// the interface it arrived on; `data_len` is the number of bytes after the argument.
    pub fn from_repr(
        ata: &AtaRepr,
        max_sectors: u8,
        data_len: usize,
    ) -> Result<AtaRequest, BadAtaArgument> {
        let command = ata.cmd_status;
        let sectors = ata.sector_count;
        let request = match command {
            cmd::READ | cmd::WRITE => (ata.lba & MAX_LBA28, command == cmd::WRITE),
            cmd::READ_EXT | cmd::WRITE_EXT => (ata.lba & MAX_LBA48, command == cmd::WRITE_EXT),
            cmd::FLUSH_CACHE | cmd::FLUSH_CACHE_EXT => return Ok(AtaRequest::Flush),
            cmd::CHECK_POWER_MODE => return Ok(AtaRequest::CheckPowerMode),
            cmd::IDENTIFY if sectors == 1 => return Ok(AtaRequest::Identify),
            cmd::IDENTIFY => return Err(BadAtaArgument::IdentifyCount(sectors)),
            other => return Ok(AtaRequest::Unsupported(other)),
        };
        let (lba, is_write) = request;
        if is_write != (ata.aflags & ata_flags::WRITE != 0) {
            return Err(BadAtaArgument::WriteFlagMismatch(command));
        }
        if sectors > max_sectors {
            return Err(BadAtaArgument::TooManySectors {
                sectors,
                max: max_sectors,
            });
        }
        if is_write {
            if data_len < usize::from(sectors) * SECTOR_SIZE as usize {
                return Err(BadAtaArgument::ShortWritePayload {
                    sectors,
                    have: data_len,
                });
            }
            Ok(AtaRequest::Write { lba, sectors })
        } else {
            Ok(AtaRequest::Read { lba, sectors })
        }
    }

    /// Whether a read or write of at least one sector lies wholly inside a device of
    /// `size_sectors` sectors (false for every other request).
    pub fn in_range(&self, size_sectors: u64) -> bool {
        match *self {
            AtaRequest::Read { lba, sectors } | AtaRequest::Write { lba, sectors } => {
                sectors > 0 && lba + u64::from(sectors) <= size_sectors
            }
            _ => false,
        }
    }

    /// Byte range `(offset, len)` this request touches, for ordering overlapping requests.
    pub fn byte_range(&self) -> Option<(u64, u64)> {
        match *self {
            AtaRequest::Read { lba, sectors } | AtaRequest::Write { lba, sectors } => {
                Some((lba * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE))
            }
            _ => None,
        }
    }
}

/// The registers and data length of an ATA reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaReply {
    /// Status register.
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// Sector count register (sectors not transferred; 0xFF for CHECK POWER MODE).
    pub sector_count: u8,
    /// LBA register (advanced past the transferred sectors).
    pub lba: u64,
    /// Bytes of data the reply carries after the argument.
    pub data_len: usize,
}

impl AtaReply {
    fn ok(sector_count: u8, lba: u64, data_len: usize) -> AtaReply {
        AtaReply {
            status: status::DRDY,
            error: 0,
            sector_count,
            lba,
            data_len,
        }
    }

    fn failed(error: u8, sector_count: u8, lba: u64) -> AtaReply {
        AtaReply {
            status: status::DRDY | status::ERR,
            error,
            sector_count,
            lba,
            data_len: 0,
        }
    }

    /// Whether the command succeeded.
    pub fn is_ok(&self) -> bool {
        self.status & status::ERR == 0
    }
}

/// Executes `request` against `device`. `data_in` is the frame's data (write payload);
/// `data_out` receives read data or IDENTIFY words and must hold at least
/// `sectors × 512` bytes (512 for IDENTIFY). Device errors become ATA errors, never panics.
pub fn execute(
    request: &AtaRequest,
    device: &dyn BlockDevice,
    identify: &IdentifyData,
    data_in: &[u8],
    data_out: &mut [u8],
) -> AtaReply {
    let size_sectors = device.size() / SECTOR_SIZE;
    match *request {
        AtaRequest::Read { lba, sectors } | AtaRequest::Write { lba, sectors } => {
            let is_write = matches!(request, AtaRequest::Write { .. });
            if lba + u64::from(sectors) > size_sectors {
                return AtaReply::failed(error::IDNF, sectors, lba);
            }
            let len = usize::from(sectors) * SECTOR_SIZE as usize;
            let offset = lba * SECTOR_SIZE;
            let result = if sectors == 0 {
                Ok(())
            } else if is_write {
                device.write_at(&data_in[..len], offset, false)
            } else {
                device.read_at(&mut data_out[..len], offset)
            };
            transfer_reply(request, result)
        }
        AtaRequest::Flush => match device.flush() {
            Ok(()) => AtaReply::ok(0, 0, 0),
            Err(_) => AtaReply::failed(error::ABRT, 0, 0),
        },
        AtaRequest::Identify => {
            data_out[..512].copy_from_slice(&identify.words_for(size_sectors));
            AtaReply::ok(0, 0, 512)
        }
        AtaRequest::CheckPowerMode => AtaReply::ok(0xFF, 0, 0),
        AtaRequest::Unsupported(_) => AtaReply::failed(error::ABRT, 0, 0),
    }
}

/// The reply to a read or write of an in-range `request` (see [`AtaRequest::in_range`]) whose
/// transfer ended with `result`: how [`execute`] answers, and how a transfer that was executed
/// together with its neighbours is answered. Any other request is answered with ABRT.
pub fn transfer_reply(request: &AtaRequest, result: Result<(), BlockError>) -> AtaReply {
    let (lba, sectors, data_len) = match *request {
        AtaRequest::Read { lba, sectors } => (lba, sectors, usize::from(sectors) * 512),
        AtaRequest::Write { lba, sectors } => (lba, sectors, 0),
        _ => return AtaReply::failed(error::ABRT, 0, 0),
    };
    match result {
        Ok(()) => AtaReply::ok(0, lba + u64::from(sectors), data_len),
        Err(BlockError::OutOfRange { .. }) => AtaReply::failed(error::IDNF, sectors, lba),
        Err(_) => AtaReply::failed(error::ABRT, sectors, lba),
    }
}

/// The fixed part of the IDENTIFY DEVICE reply; capacity is filled in per call.
#[derive(Debug, Clone)]
pub struct IdentifyData {
    words: [u8; 512],
}

impl IdentifyData {
    /// Builds the identity of a blade: `serial` (e.g. "0.3:hostname"), `firmware` and `model`
    /// are truncated to their ATA field widths (20, 8, 40 characters).
    pub fn new(serial: &str, firmware: &str, model: &str) -> IdentifyData {
        let mut words = [0u8; 512];
        let mut set_word = |index: usize, value: u16| {
            words[2 * index..2 * index + 2].copy_from_slice(&value.to_le_bytes());
        };
        set_word(47, 0x8000);
        set_word(49, 0x0200); // LBA supported
        set_word(50, 0x4000);
        set_word(80, 0x00F0); // ATA/ATAPI-4..7
        set_word(82, 0x4020); // write cache supported
        set_word(83, 0x7400); // 48-bit LBA, FLUSH CACHE and FLUSH CACHE EXT supported
        set_word(84, 0x4000);
        set_word(85, 0x4020); // write cache enabled
        set_word(86, 0x3400); // 48-bit LBA, FLUSH CACHE and FLUSH CACHE EXT enabled
        set_word(87, 0x4000);
        set_word(93, 0x400B);
        set_ata_string(&mut words, 10, 20, serial);
        set_ata_string(&mut words, 23, 8, firmware);
        set_ata_string(&mut words, 27, 40, model);
        IdentifyData { words }
    }

    /// The 512-byte IDENTIFY reply for a device of `size_sectors` sectors.
    pub fn words_for(&self, size_sectors: u64) -> [u8; 512] {
        let mut words = self.words;
        let lba28 = size_sectors.min(MAX_LBA28) as u32;
        words[120..124].copy_from_slice(&lba28.to_le_bytes());
        words[200..208].copy_from_slice(&size_sectors.to_le_bytes());
        words
    }
}

/// ATA strings hold two characters per word, first character in the high byte, space-padded.
fn set_ata_string(words: &mut [u8; 512], first_word: usize, width: usize, text: &str) {
    let mut padded: Vec<u8> = text
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .collect();
    padded.resize(width, b' ');
    for (i, pair) in padded[..width].chunks(2).enumerate() {
        let at = 2 * (first_word + i);
        words[at] = pair[1];
        words[at + 1] = pair[0];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::NullDevice;

    fn repr(command: u8, aflags: u8, sectors: u8, lba: u64) -> AtaRepr {
        AtaRepr {
            aflags,
            err_feature: 0,
            sector_count: sectors,
            cmd_status: command,
            lba,
        }
    }

    #[test]
    fn lba28_commands_mask_device_bits() {
        let req = AtaRequest::from_repr(&repr(cmd::READ, 0, 2, 0xE0_00_00_10), 2, 0).unwrap();
        assert_eq!(
            req,
            AtaRequest::Read {
                lba: 0x10,
                sectors: 2
            }
        );
    }

    #[test]
    fn refuses_more_sectors_than_the_frame_carries() {
        let err = AtaRequest::from_repr(&repr(cmd::READ_EXT, ata_flags::EXTENDED, 3, 0), 2, 0);
        assert_eq!(
            err,
            Err(BadAtaArgument::TooManySectors { sectors: 3, max: 2 })
        );
    }

    #[test]
    fn refuses_short_write_payload() {
        let err = AtaRequest::from_repr(&repr(cmd::WRITE_EXT, 0x41, 2, 0), 2, 1000);
        assert_eq!(
            err,
            Err(BadAtaArgument::ShortWritePayload {
                sectors: 2,
                have: 1000
            })
        );
    }

    #[test]
    fn refuses_write_flag_mismatch() {
        let err = AtaRequest::from_repr(&repr(cmd::WRITE_EXT, 0x40, 1, 0), 2, 512);
        assert_eq!(err, Err(BadAtaArgument::WriteFlagMismatch(cmd::WRITE_EXT)));
    }

    #[test]
    fn read_with_trailing_data_is_a_read() {
        // The Linux driver's probe: READ at LBA 0 carrying as many zero bytes as it asks for.
        let req = AtaRequest::from_repr(&repr(cmd::READ_EXT, 0x40, 2, 0), 2, 1024).unwrap();
        assert_eq!(req, AtaRequest::Read { lba: 0, sectors: 2 });
    }

    #[test]
    fn out_of_range_is_idnf() {
        let dev = NullDevice::new(8 * 512);
        let id = IdentifyData::new("0.3:test", "V1", "twinblade");
        let mut out = vec![0u8; 1024];
        let reply = execute(
            &AtaRequest::Read { lba: 7, sectors: 2 },
            &dev,
            &id,
            &[],
            &mut out,
        );
        assert_eq!(reply.status, status::DRDY | status::ERR);
        assert_eq!(reply.error, error::IDNF);
        let reply = execute(
            &AtaRequest::Read { lba: 6, sectors: 2 },
            &dev,
            &id,
            &[],
            &mut out,
        );
        assert!(reply.is_ok());
        assert_eq!(reply.data_len, 1024);
        assert_eq!(reply.lba, 8);
    }

    #[test]
    fn unsupported_command_aborts() {
        let dev = NullDevice::new(512);
        let id = IdentifyData::new("s", "f", "m");
        let reply = execute(&AtaRequest::Unsupported(0xB0), &dev, &id, &[], &mut []);
        assert_eq!(
            (reply.status, reply.error),
            (status::DRDY | status::ERR, error::ABRT)
        );
        let reply = execute(&AtaRequest::CheckPowerMode, &dev, &id, &[], &mut []);
        assert_eq!((reply.status, reply.sector_count), (status::DRDY, 0xFF));
    }

    #[test]
    fn identify_carries_what_the_linux_driver_parses() {
        let id = IdentifyData::new("0.3:alpha", "V0.1", "twinblade");
        let words = id.words_for(0x1_2345_6789);
        let word = |i: usize| u16::from_le_bytes([words[2 * i], words[2 * i + 1]]);
        assert_ne!(word(83) & (1 << 10), 0, "LBA48 supported");
        assert_ne!(word(86) & (1 << 10), 0, "LBA48 enabled");
        let lba48 = u64::from_le_bytes(words[200..208].try_into().unwrap());
        assert_eq!(lba48, 0x1_2345_6789);
        let lba28 = u32::from_le_bytes(words[120..124].try_into().unwrap());
        assert_eq!(lba28, 0x0FFF_FFFF);
        // Model "twinblade" byte-swapped per word: "wt" "ni" ...
        assert_eq!(&words[54..58], b"wtni");
        assert_eq!(&words[20..24], b".0:3");
    }

    #[test]
    fn identify_fields_fill_their_words_and_small_devices_report_lba28_capacity() {
        let id = IdentifyData::new("0.3:alpha", "V0.1", "twinblade");
        let words = id.words_for(2048);
        let text = |first: usize, count: usize| -> String {
            words[2 * first..2 * (first + count)]
                .chunks(2)
                .flat_map(|pair| [pair[1] as char, pair[0] as char])
                .collect()
        };
        // Serial words 10-19, firmware 23-26, model 27-46: space-padded ASCII.
        assert_eq!(text(10, 10), format!("{:<20}", "0.3:alpha"));
        assert_eq!(text(23, 4), format!("{:<8}", "V0.1"));
        assert_eq!(text(27, 20), format!("{:<40}", "twinblade"));
        // Below 2^28 sectors, words 60-61 carry the capacity itself, as do words 100-103.
        assert_eq!(
            u32::from_le_bytes(words[120..124].try_into().unwrap()),
            2048
        );
        assert_eq!(
            u64::from_le_bytes(words[200..208].try_into().unwrap()),
            2048
        );
        // vblade's fixed words (aoe.md): 47, 49 (LBA), 50, 84, 87, 93.
        let word = |i: usize| u16::from_le_bytes([words[2 * i], words[2 * i + 1]]);
        assert_eq!(
            [word(47), word(49), word(50), word(84), word(87), word(93)],
            [0x8000, 0x0200, 0x4000, 0x4000, 0x4000, 0x400B]
        );
        // Long strings are cut to their field, never spilling into the next one.
        let long = IdentifyData::new(&"s".repeat(40), &"f".repeat(40), &"m".repeat(80));
        let words = long.words_for(1);
        assert_eq!(&words[46..54], b"ffffffff");
        assert_eq!(&words[54..56], b"mm");
        assert_eq!(words[94], 0, "word 47 low byte untouched");
    }
}
