//! ATA over Ethernet (AoEr11) frames: the Ethernet + AoE header and the four command arguments.
//!
//! Layout (byte offsets within the Ethernet frame):
//!
//! ```text
//!  0..6   destination MAC        6..12  source MAC         12..14 ethertype 0x88A2
//! 14      version (high nibble) | flags (R 0x08, E 0x04)   15     error
//! 16..18  shelf (big-endian)    18     slot                19     command
//! 20..24  tag                   24..   argument (per command)
//! ```
//!
//! Arguments: ATA (cmd 0, [`AtaArg`]), query config (cmd 1, [`ConfigArg`]), MAC mask list
//! (cmd 2, [`MaskArg`]) and reserve/release (cmd 3, [`ReserveArg`]). [`PacketRepr`] parses a
//! whole frame into header + argument. ATA data (sectors) is not copied into the `Repr`: it
//! stays in the buffer, reached through [`AtaArg::data`].

use super::{need, Error, MacAddr};
use byteorder_free::{read_u16, read_u32, write_u16, write_u32};

/// Ethertype of AoE frames.
pub const ETHERTYPE: u16 = 0x88A2;
/// The protocol version this module speaks (AoEr11 is version 1).
pub const VERSION: u8 = 1;
/// Length of the Ethernet + AoE common header.
pub const HEADER_LEN: usize = 24;
/// Length of the ATA argument without data.
pub const ATA_ARG_LEN: usize = 12;
/// Length of the config argument without the config string.
pub const CONFIG_ARG_LEN: usize = 8;
/// Length of the MAC mask argument without directives.
pub const MASK_ARG_LEN: usize = 4;
/// Length of one MAC mask directive.
pub const MASK_DIRECTIVE_LEN: usize = 8;
/// Length of the reserve/release argument without MACs.
pub const RESERVE_ARG_LEN: usize = 2;
/// Longest config string AoEr11 allows.
pub const MAX_CONFIG_LEN: usize = 1024;
/// Shelf number that addresses every shelf.
pub const BROADCAST_SHELF: u16 = 0xFFFF;
/// Slot number that addresses every slot.
pub const BROADCAST_SLOT: u8 = 0xFF;
/// Shortest frame an Ethernet sender puts on the wire (without FCS); replies are padded to it.
pub const MIN_FRAME_LEN: usize = 60;

/// Small big-endian helpers; kept local so this module needs no extra crate.
mod byteorder_free {
    pub fn read_u16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }
    pub fn read_u32(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub fn write_u16(b: &mut [u8], v: u16) {
        b[..2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn write_u32(b: &mut [u8], v: u32) {
        b[..4].copy_from_slice(&v.to_be_bytes());
    }
}

/// AoE command codes (header byte 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0: issue an ATA command.
    Ata,
    /// 1: query or set the config string.
    Config,
    /// 2: read or edit the MAC mask list.
    MacMask,
    /// 3: reserve / release.
    Reserve,
    /// Anything else (answered with [`ErrorCode::UnrecognizedCommand`]).
    Unknown(u8),
}

impl From<u8> for Command {
    fn from(v: u8) -> Self {
        match v {
            0 => Command::Ata,
            1 => Command::Config,
            2 => Command::MacMask,
            3 => Command::Reserve,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u8 {
    fn from(c: Command) -> u8 {
        match c {
            Command::Ata => 0,
            Command::Config => 1,
            Command::MacMask => 2,
            Command::Reserve => 3,
            Command::Unknown(v) => v,
        }
    }
}

/// AoE error codes (header byte 15, meaningful when the E flag is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// 1: unrecognized command code.
    UnrecognizedCommand = 1,
    /// 2: bad argument parameter.
    BadArgument = 2,
    /// 3: device unavailable.
    DeviceUnavailable = 3,
    /// 4: config string present (a non-forced set on a device that already has one).
    ConfigStringPresent = 4,
    /// 5: unsupported version.
    UnsupportedVersion = 5,
    /// 6: target is reserved for other initiators.
    TargetReserved = 6,
}

/// Byte ranges of the common header.
mod field {
    use std::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const VER_FLAGS: usize = 14;
    pub const ERROR: usize = 15;
    pub const SHELF: Range<usize> = 16..18;
    pub const SLOT: usize = 18;
    pub const COMMAND: usize = 19;
    pub const TAG: Range<usize> = 20..24;
    pub const ARG: usize = 24;
}

/// Header flag: this frame is a response.
pub const FLAG_RESPONSE: u8 = 0x08;
/// Header flag: the error field is valid.
pub const FLAG_ERROR: u8 = 0x04;

/// A view of an AoE frame (Ethernet header included).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wraps a buffer after checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Frame<T>, Error> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks that the buffer holds the common header.
    pub fn check_len(&self) -> Result<(), Error> {
        need(HEADER_LEN, self.buffer.as_ref().len())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::DST])
    }
    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::SRC])
    }
    /// Ethertype.
    pub fn ethertype(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::ETHERTYPE])
    }
    /// Protocol version (high nibble of byte 14).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] >> 4
    }
    /// Flags (low nibble of byte 14).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] & 0x0F
    }
    /// Whether the R (response) flag is set.
    pub fn is_response(&self) -> bool {
        self.flags() & FLAG_RESPONSE != 0
    }
    /// Whether the E (error) flag is set.
    pub fn is_error(&self) -> bool {
        self.flags() & FLAG_ERROR != 0
    }
    /// Error code (meaningful when [`Frame::is_error`]).
    pub fn error(&self) -> u8 {
        self.buffer.as_ref()[field::ERROR]
    }
    /// Shelf (major) address.
    pub fn shelf(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[field::SHELF])
    }
    /// Slot (minor) address.
    pub fn slot(&self) -> u8 {
        self.buffer.as_ref()[field::SLOT]
    }
    /// Command code.
    pub fn command(&self) -> Command {
        Command::from(self.buffer.as_ref()[field::COMMAND])
    }
    /// Tag chosen by the initiator, echoed in the response.
    pub fn tag(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::TAG])
    }
    /// Bytes after the header: the command argument and any data.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::ARG..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac.0);
    }
    /// Sets the source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac.0);
    }
    /// Sets the ethertype.
    pub fn set_ethertype(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::ETHERTYPE], value);
    }
    /// Sets version and flags.
    pub fn set_version_flags(&mut self, version: u8, flags: u8) {
        self.buffer.as_mut()[field::VER_FLAGS] = (version << 4) | (flags & 0x0F);
    }
    /// Sets the error code.
    pub fn set_error(&mut self, value: u8) {
        self.buffer.as_mut()[field::ERROR] = value;
    }
    /// Sets the shelf.
    pub fn set_shelf(&mut self, value: u16) {
        write_u16(&mut self.buffer.as_mut()[field::SHELF], value);
    }
    /// Sets the slot.
    pub fn set_slot(&mut self, value: u8) {
        self.buffer.as_mut()[field::SLOT] = value;
    }
    /// Sets the command code.
    pub fn set_command(&mut self, value: Command) {
        self.buffer.as_mut()[field::COMMAND] = value.into();
    }
    /// Sets the tag.
    pub fn set_tag(&mut self, value: u32) {
        write_u32(&mut self.buffer.as_mut()[field::TAG], value);
    }
    /// Mutable bytes after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::ARG..]
    }
}

/// The parsed common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// Protocol version.
    pub version: u8,
    /// R flag.
    pub response: bool,
    /// Error code if the E flag is set.
    pub error: Option<u8>,
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// Command.
    pub command: Command,
    /// Tag.
    pub tag: u32,
}

impl HeaderRepr {
    /// Parses the header of a checked frame. Refuses frames of another ethertype and frames
    /// with the reserved flag bits set.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<HeaderRepr, Error> {
        frame.check_len()?;
        if frame.ethertype() != ETHERTYPE {
            return Err(Error::Malformed { field: "ethertype" });
        }
        if frame.flags() & 0x03 != 0 {
            return Err(Error::Malformed { field: "flags" });
        }
        Ok(HeaderRepr {
            dst: frame.dst(),
            src: frame.src(),
            version: frame.version(),
            response: frame.is_response(),
            error: frame.is_error().then(|| frame.error()),
            shelf: frame.shelf(),
            slot: frame.slot(),
            command: frame.command(),
            tag: frame.tag(),
        })
    }

    /// Bytes the header occupies.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `frame`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        frame.set_dst(self.dst);
        frame.set_src(self.src);
        frame.set_ethertype(ETHERTYPE);
        let mut flags = 0;
        if self.response {
            flags |= FLAG_RESPONSE;
        }
        if self.error.is_some() {
            flags |= FLAG_ERROR;
        }
        frame.set_version_flags(self.version, flags);
        frame.set_error(self.error.unwrap_or(0));
        frame.set_shelf(self.shelf);
        frame.set_slot(self.slot);
        frame.set_command(self.command);
        frame.set_tag(self.tag);
    }

    /// The header of the reply to this request, sent from `our_mac` with our real address.
    ///
    /// The Linux driver drops config responses that carry the broadcast shelf or slot, so a
    /// reply always names the blade that sends it.
    pub fn reply(&self, our_mac: MacAddr, shelf: u16, slot: u8) -> HeaderRepr {
        HeaderRepr {
            dst: self.src,
            src: our_mac,
            version: VERSION,
            response: true,
            error: None,
            shelf,
            slot,
            command: self.command,
            tag: self.tag,
        }
    }
}

/// ATA argument flags (byte 0 of the ATA argument).
pub mod ata_flags {
    /// LBA48 extended command.
    pub const EXTENDED: u8 = 0x40;
    /// Device/head register flag.
    pub const DEVICE: u8 = 0x10;
    /// Asynchronous write (no response wanted before completion is not honoured by targets).
    pub const ASYNC: u8 = 0x02;
    /// Write: data follows the argument.
    pub const WRITE: u8 = 0x01;
    /// Every flag bit AoEr11 defines.
    pub const ALL: u8 = EXTENDED | DEVICE | ASYNC | WRITE;
}

/// A view of the ATA argument (the bytes after the common header).
#[derive(Debug, Clone)]
pub struct AtaArg<T: AsRef<[u8]>> {
    buffer: T,
}

mod ata_field {
    use std::ops::Range;
    pub const AFLAGS: usize = 0;
    pub const ERR_FEATURE: usize = 1;
    pub const SECTOR_COUNT: usize = 2;
    pub const CMD_STATUS: usize = 3;
    pub const LBA: Range<usize> = 4..10;
    pub const DATA: usize = 12;
}

impl<T: AsRef<[u8]>> AtaArg<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> AtaArg<T> {
        AtaArg { buffer }
    }
    /// Wraps a buffer after checking it holds the 12-byte argument.
    pub fn new_checked(buffer: T) -> Result<AtaArg<T>, Error> {
        let arg = Self::new_unchecked(buffer);
        need(ATA_ARG_LEN, arg.buffer.as_ref().len())?;
        Ok(arg)
    }
    /// aflags byte.
    pub fn aflags(&self) -> u8 {
        self.buffer.as_ref()[ata_field::AFLAGS]
    }
    /// Error (response) or feature (request) register.
    pub fn err_feature(&self) -> u8 {
        self.buffer.as_ref()[ata_field::ERR_FEATURE]
    }
    /// Sector count register.
    pub fn sector_count(&self) -> u8 {
        self.buffer.as_ref()[ata_field::SECTOR_COUNT]
    }
    /// Command (request) or status (response) register.
    pub fn cmd_status(&self) -> u8 {
        self.buffer.as_ref()[ata_field::CMD_STATUS]
    }
    /// The six LBA bytes, least significant first, as a number.
    pub fn lba(&self) -> u64 {
        self.buffer.as_ref()[ata_field::LBA]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }
    /// Data after the argument (write payload, read result, or padding).
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[ata_field::DATA..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AtaArg<T> {
    /// Mutable data after the argument.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[ata_field::DATA..]
    }
}

/// The parsed ATA argument (without data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaRepr {
    /// aflags (see [`ata_flags`]).
    pub aflags: u8,
    /// Error (response) / feature (request) register.
    pub err_feature: u8,
    /// Sector count.
    pub sector_count: u8,
    /// Command (request) / status (response) register.
    pub cmd_status: u8,
    /// 48-bit LBA as carried (for 28-bit commands the top nibble of byte 3 holds device bits).
    pub lba: u64,
}

impl AtaRepr {
    /// Parses a checked ATA argument; refuses undefined aflags bits.
    pub fn parse<T: AsRef<[u8]>>(arg: &AtaArg<T>) -> Result<AtaRepr, Error> {
        need(ATA_ARG_LEN, arg.buffer.as_ref().len())?;
        if arg.aflags() & !ata_flags::ALL != 0 {
            return Err(Error::Malformed { field: "aflags" });
        }
        Ok(AtaRepr {
            aflags: arg.aflags(),
            err_feature: arg.err_feature(),
            sector_count: arg.sector_count(),
            cmd_status: arg.cmd_status(),
            lba: arg.lba(),
        })
    }

    /// Bytes the argument occupies (without data).
    pub const fn buffer_len(&self) -> usize {
        ATA_ARG_LEN
    }

    /// Writes the argument into the first [`ATA_ARG_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[ata_field::AFLAGS] = self.aflags;
        buf[ata_field::ERR_FEATURE] = self.err_feature;
        buf[ata_field::SECTOR_COUNT] = self.sector_count;
        buf[ata_field::CMD_STATUS] = self.cmd_status;
        for (i, byte) in buf[ata_field::LBA].iter_mut().enumerate() {
            *byte = (self.lba >> (8 * i)) as u8;
        }
        buf[10] = 0;
        buf[11] = 0;
    }

    /// Whether the W flag is set.
    pub fn is_write(&self) -> bool {
        self.aflags & ata_flags::WRITE != 0
    }
}

/// Config sub-commands (low nibble of byte 5 of the config argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigCommand {
    /// 0: read the config string.
    Read,
    /// 1: reply only if the string matches exactly.
    Test,
    /// 2: reply only if the string starts with the given prefix.
    TestPrefix,
    /// 3: set the string if none is set yet.
    Set,
    /// 4: set the string unconditionally.
    ForceSet,
    /// Anything else (answered with [`ErrorCode::BadArgument`]).
    Unknown(u8),
}

impl From<u8> for ConfigCommand {
    fn from(v: u8) -> Self {
        match v {
            0 => ConfigCommand::Read,
            1 => ConfigCommand::Test,
            2 => ConfigCommand::TestPrefix,
            3 => ConfigCommand::Set,
            4 => ConfigCommand::ForceSet,
            other => ConfigCommand::Unknown(other),
        }
    }
}

impl From<ConfigCommand> for u8 {
    fn from(c: ConfigCommand) -> u8 {
        match c {
            ConfigCommand::Read => 0,
            ConfigCommand::Test => 1,
            ConfigCommand::TestPrefix => 2,
            ConfigCommand::Set => 3,
            ConfigCommand::ForceSet => 4,
            ConfigCommand::Unknown(v) => v & 0x0F,
        }
    }
}

/// A view of the config argument.
#[derive(Debug, Clone)]
pub struct ConfigArg<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ConfigArg<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> ConfigArg<T> {
        ConfigArg { buffer }
    }
    /// Wraps a buffer after checking it holds the fixed part of the argument.
    pub fn new_checked(buffer: T) -> Result<ConfigArg<T>, Error> {
        let arg = Self::new_unchecked(buffer);
        need(CONFIG_ARG_LEN, arg.buffer.as_ref().len())?;
        Ok(arg)
    }
    /// Buffer count: how many outstanding frames the target queues.
    pub fn buffer_count(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[0..2])
    }
    /// Firmware version.
    pub fn firmware_version(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[2..4])
    }
    /// Maximum sectors per ATA command (0 means 2).
    pub fn sector_count(&self) -> u8 {
        self.buffer.as_ref()[4]
    }
    /// AoE version in the config argument (high nibble of byte 5).
    pub fn aoe_version(&self) -> u8 {
        self.buffer.as_ref()[5] >> 4
    }
    /// Config sub-command.
    pub fn command(&self) -> ConfigCommand {
        ConfigCommand::from(self.buffer.as_ref()[5] & 0x0F)
    }
    /// Declared config string length.
    pub fn string_len(&self) -> u16 {
        read_u16(&self.buffer.as_ref()[6..8])
    }
    /// Bytes after the fixed part (the string plus any padding).
    pub fn trailing(&self) -> &[u8] {
        &self.buffer.as_ref()[CONFIG_ARG_LEN..]
    }
}

/// The parsed config argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRepr {
    /// Buffer count.
    pub buffer_count: u16,
    /// Firmware version.
    pub firmware_version: u16,
    /// Maximum sectors per ATA command.
    pub sector_count: u8,
    /// AoE version carried in the argument.
    pub aoe_version: u8,
    /// Sub-command.
    pub command: ConfigCommand,
    /// Config string.
    pub config: Vec<u8>,
}

impl ConfigRepr {
    /// Parses a checked config argument. A declared string longer than the frame or than
    /// [`MAX_CONFIG_LEN`] is malformed.
    pub fn parse<T: AsRef<[u8]>>(arg: &ConfigArg<T>) -> Result<ConfigRepr, Error> {
        need(CONFIG_ARG_LEN, arg.buffer.as_ref().len())?;
        let len = usize::from(arg.string_len());
        if len > MAX_CONFIG_LEN || len > arg.trailing().len() {
            return Err(Error::Malformed {
                field: "config string length",
            });
        }
        Ok(ConfigRepr {
            buffer_count: arg.buffer_count(),
            firmware_version: arg.firmware_version(),
            sector_count: arg.sector_count(),
            aoe_version: arg.aoe_version(),
            command: arg.command(),
            config: arg.trailing()[..len].to_vec(),
        })
    }

    /// Bytes the argument occupies.
    pub fn buffer_len(&self) -> usize {
        CONFIG_ARG_LEN + self.config.len()
    }

    /// Writes the argument into the first [`ConfigRepr::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        write_u16(&mut buf[0..2], self.buffer_count);
        write_u16(&mut buf[2..4], self.firmware_version);
        buf[4] = self.sector_count;
        buf[5] = (self.aoe_version << 4) | u8::from(self.command);
        write_u16(&mut buf[6..8], self.config.len() as u16);
        buf[CONFIG_ARG_LEN..self.buffer_len()].copy_from_slice(&self.config);
    }
}

/// MAC mask sub-commands.
pub mod mask {
    /// Read the list.
    pub const READ: u8 = 0;
    /// Edit the list with directives.
    pub const EDIT: u8 = 1;
    /// Directive: no operation.
    pub const DIR_NONE: u8 = 0;
    /// Directive: add a MAC.
    pub const DIR_ADD: u8 = 1;
    /// Directive: delete a MAC.
    pub const DIR_DELETE: u8 = 2;
    /// merror: unspecified error.
    pub const ERR_UNSPECIFIED: u8 = 1;
    /// merror: bad directive command.
    pub const ERR_BAD_DIRECTIVE: u8 = 2;
    /// merror: list full.
    pub const ERR_FULL: u8 = 3;
}

/// One directive of a MAC mask edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskDirective {
    /// Directive command ([`mask::DIR_NONE`], [`mask::DIR_ADD`], [`mask::DIR_DELETE`]).
    pub command: u8,
    /// The MAC it applies to.
    pub mac: MacAddr,
}

/// A view of the MAC mask argument.
#[derive(Debug, Clone)]
pub struct MaskArg<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> MaskArg<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> MaskArg<T> {
        MaskArg { buffer }
    }
    /// Wraps a buffer after checking it holds the fixed part of the argument.
    pub fn new_checked(buffer: T) -> Result<MaskArg<T>, Error> {
        let arg = Self::new_unchecked(buffer);
        need(MASK_ARG_LEN, arg.buffer.as_ref().len())?;
        Ok(arg)
    }
    /// Sub-command.
    pub fn command(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    /// Mask error.
    pub fn mask_error(&self) -> u8 {
        self.buffer.as_ref()[2]
    }
    /// Number of directives.
    pub fn directive_count(&self) -> u8 {
        self.buffer.as_ref()[3]
    }
    /// Directive `i` (caller checks `i < directive_count` and the length).
    pub fn directive(&self, i: usize) -> MaskDirective {
        let at = MASK_ARG_LEN + i * MASK_DIRECTIVE_LEN;
        let d = &self.buffer.as_ref()[at..at + MASK_DIRECTIVE_LEN];
        MaskDirective {
            command: d[1],
            mac: MacAddr::from_bytes(&d[2..8]),
        }
    }
}

/// The parsed MAC mask argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskRepr {
    /// Sub-command.
    pub command: u8,
    /// Mask error (responses).
    pub mask_error: u8,
    /// Directives (requests) or the list (responses).
    pub directives: Vec<MaskDirective>,
}

impl MaskRepr {
    /// Parses a checked mask argument; every declared directive must be present.
    pub fn parse<T: AsRef<[u8]>>(arg: &MaskArg<T>) -> Result<MaskRepr, Error> {
        let have = arg.buffer.as_ref().len();
        need(MASK_ARG_LEN, have)?;
        let count = usize::from(arg.directive_count());
        need(MASK_ARG_LEN + count * MASK_DIRECTIVE_LEN, have)?;
        Ok(MaskRepr {
            command: arg.command(),
            mask_error: arg.mask_error(),
            directives: (0..count).map(|i| arg.directive(i)).collect(),
        })
    }

    /// Bytes the argument occupies.
    pub fn buffer_len(&self) -> usize {
        MASK_ARG_LEN + self.directives.len() * MASK_DIRECTIVE_LEN
    }

    /// Writes the argument into the first [`MaskRepr::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = 0;
        buf[1] = self.command;
        buf[2] = self.mask_error;
        buf[3] = self.directives.len() as u8;
        for (i, d) in self.directives.iter().enumerate() {
            let at = MASK_ARG_LEN + i * MASK_DIRECTIVE_LEN;
            buf[at] = 0;
            buf[at + 1] = d.command;
            buf[at + 2..at + 8].copy_from_slice(&d.mac.0);
        }
    }
}

/// Reserve/release sub-commands.
pub mod reserve {
    /// Read the reserve list.
    pub const READ: u8 = 0;
    /// Set the list if it is empty or the sender is on it.
    pub const SET: u8 = 1;
    /// Set the list unconditionally.
    pub const FORCE_SET: u8 = 2;
}

/// A view of the reserve/release argument.
#[derive(Debug, Clone)]
pub struct ReserveArg<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ReserveArg<T> {
    /// Wraps a buffer without checking its length.
    pub fn new_unchecked(buffer: T) -> ReserveArg<T> {
        ReserveArg { buffer }
    }
    /// Wraps a buffer after checking it holds the fixed part of the argument.
    pub fn new_checked(buffer: T) -> Result<ReserveArg<T>, Error> {
        let arg = Self::new_unchecked(buffer);
        need(RESERVE_ARG_LEN, arg.buffer.as_ref().len())?;
        Ok(arg)
    }
    /// Sub-command.
    pub fn command(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    /// Number of MACs.
    pub fn mac_count(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
}

/// The parsed reserve/release argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRepr {
    /// Sub-command.
    pub command: u8,
    /// MACs.
    pub macs: Vec<MacAddr>,
}

impl ReserveRepr {
    /// Parses a checked reserve argument; every declared MAC must be present.
    pub fn parse<T: AsRef<[u8]>>(arg: &ReserveArg<T>) -> Result<ReserveRepr, Error> {
        let bytes = arg.buffer.as_ref();
        need(RESERVE_ARG_LEN, bytes.len())?;
        let count = usize::from(arg.mac_count());
        need(RESERVE_ARG_LEN + count * 6, bytes.len())?;
        Ok(ReserveRepr {
            command: arg.command(),
            macs: (0..count)
                .map(|i| MacAddr::from_bytes(&bytes[RESERVE_ARG_LEN + i * 6..]))
                .collect(),
        })
    }

    /// Bytes the argument occupies.
    pub fn buffer_len(&self) -> usize {
        RESERVE_ARG_LEN + self.macs.len() * 6
    }

    /// Writes the argument into the first [`ReserveRepr::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = self.command;
        buf[1] = self.macs.len() as u8;
        for (i, mac) in self.macs.iter().enumerate() {
            let at = RESERVE_ARG_LEN + i * 6;
            buf[at..at + 6].copy_from_slice(&mac.0);
        }
    }
}

/// The parsed argument of any command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgRepr {
    /// Cmd 0; the data stays in the frame.
    Ata(AtaRepr),
    /// Cmd 1.
    Config(ConfigRepr),
    /// Cmd 2.
    MacMask(MaskRepr),
    /// Cmd 3.
    Reserve(ReserveRepr),
    /// Any other command: no argument is interpreted.
    Unknown,
}

/// A whole AoE frame: header and argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketRepr {
    /// Common header.
    pub header: HeaderRepr,
    /// Command argument.
    pub arg: ArgRepr,
}

impl PacketRepr {
    /// A "read config" query with `header`'s addresses and tag: what an initiator broadcasts
    /// to find blades (and a wire guard, to learn who answers one).
    pub fn config_query(header: HeaderRepr) -> PacketRepr {
        PacketRepr {
            header,
            arg: ArgRepr::Config(ConfigRepr {
                buffer_count: 0,
                firmware_version: 0,
                sector_count: 0,
                aoe_version: VERSION,
                command: ConfigCommand::Read,
                config: Vec::new(),
            }),
        }
    }

    /// Emitted into a new frame, padded to the Ethernet minimum (no payload beyond the
    /// argument: for queries and replies without data).
    pub fn to_frame(&self) -> Vec<u8> {
        let mut frame = vec![0u8; self.buffer_len().max(MIN_FRAME_LEN)];
        self.emit(&mut Frame::new_unchecked(&mut frame[..]));
        frame
    }

    /// Parses a frame. Errors say which part was truncated or malformed; the caller decides
    /// whether that means "drop" or "reply with an AoE error".
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<PacketRepr, Error> {
        let header = HeaderRepr::parse(frame)?;
        let payload = frame.payload();
        let arg = match header.command {
            Command::Ata => ArgRepr::Ata(AtaRepr::parse(&AtaArg::new_checked(payload)?)?),
            Command::Config => {
                ArgRepr::Config(ConfigRepr::parse(&ConfigArg::new_checked(payload)?)?)
            }
            Command::MacMask => ArgRepr::MacMask(MaskRepr::parse(&MaskArg::new_checked(payload)?)?),
            Command::Reserve => {
                ArgRepr::Reserve(ReserveRepr::parse(&ReserveArg::new_checked(payload)?)?)
            }
            Command::Unknown(_) => ArgRepr::Unknown,
        };
        Ok(PacketRepr { header, arg })
    }

    /// Bytes header plus argument occupy (without ATA data or padding).
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
            + match &self.arg {
                ArgRepr::Ata(a) => a.buffer_len(),
                ArgRepr::Config(c) => c.buffer_len(),
                ArgRepr::MacMask(m) => m.buffer_len(),
                ArgRepr::Reserve(r) => r.buffer_len(),
                ArgRepr::Unknown => 0,
            }
    }

    /// Writes header and argument into the start of `frame`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        self.header.emit(frame);
        let payload = frame.payload_mut();
        match &self.arg {
            ArgRepr::Ata(a) => a.emit(payload),
            ArgRepr::Config(c) => c.emit(payload),
            ArgRepr::MacMask(m) => m.emit(payload),
            ArgRepr::Reserve(r) => r.emit(payload),
            ArgRepr::Unknown => {}
        }
    }
}

/// Parses `data` with every parser in this module; the cargo-fuzz target calls this.
///
/// Whatever the bytes, this must not panic, and whatever parses must re-emit to bytes that
/// parse to the same value.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(frame) = Frame::new_checked(data) else {
        return;
    };
    if let Ok(repr) = PacketRepr::parse(&frame) {
        let mut out = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Frame::new_unchecked(&mut out[..]));
        let again = PacketRepr::parse(&Frame::new_unchecked(&out[..]))
            .expect("an emitted frame must parse");
        assert_eq!(again, repr, "round trip changed the frame");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A READ SECTORS EXT of 2 sectors at LBA 0x0102_0304_0506 from the Linux driver, as
    /// captured: tag 0x0000_2a01, e0.3, aflags E.
    const ATA_READ: [u8; 36] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, // dst
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
        0x88, 0xa2, // ethertype
        0x10, 0x00, // ver 1, no flags, no error
        0x00, 0x00, 0x03, 0x00, // shelf 0, slot 3, cmd 0
        0x00, 0x00, 0x2a, 0x01, // tag
        0x40, 0x00, 0x02, 0x24, // aflags E, feature, scnt 2, READ EXT
        0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // lba, LSB first
        0x00, 0x00,
    ];

    /// A broadcast config query (ccmd read) padded to the Ethernet minimum.
    fn config_query() -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f[12..14].copy_from_slice(&[0x88, 0xa2]);
        f[14] = 0x10;
        f[16..18].copy_from_slice(&[0xff, 0xff]);
        f[18] = 0xff;
        f[19] = 1;
        f[20..24].copy_from_slice(&[0x80, 0, 0, 7]);
        f
    }

    #[test]
    fn parses_captured_ata_read() {
        let frame = Frame::new_checked(&ATA_READ[..]).unwrap();
        let repr = PacketRepr::parse(&frame).unwrap();
        assert_eq!(repr.header.shelf, 0);
        assert_eq!(repr.header.slot, 3);
        assert_eq!(repr.header.tag, 0x2a01);
        assert_eq!(repr.header.version, 1);
        assert!(!repr.header.response);
        let ArgRepr::Ata(ata) = repr.arg else {
            panic!("not ATA")
        };
        assert_eq!(ata.cmd_status, 0x24);
        assert_eq!(ata.sector_count, 2);
        assert_eq!(ata.aflags, ata_flags::EXTENDED);
        assert_eq!(ata.lba, 0x0102_0304_0506);
        let mut out = [0u8; 36];
        repr.emit(&mut Frame::new_unchecked(&mut out[..]));
        assert_eq!(out, ATA_READ);
    }

    #[test]
    fn parses_padded_config_query() {
        let bytes = config_query();
        let repr = PacketRepr::parse(&Frame::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(repr.header.shelf, BROADCAST_SHELF);
        assert_eq!(repr.header.slot, BROADCAST_SLOT);
        let ArgRepr::Config(cfg) = repr.arg else {
            panic!("not config")
        };
        assert_eq!(cfg.command, ConfigCommand::Read);
        assert!(cfg.config.is_empty());
    }

    #[test]
    fn truncated_frames_are_refused() {
        assert!(Frame::new_checked(&ATA_READ[..23]).is_err());
        let frame = Frame::new_checked(&ATA_READ[..30]).unwrap();
        assert!(matches!(
            PacketRepr::parse(&frame),
            Err(Error::Truncated {
                needed: 12,
                have: 6
            })
        ));
    }

    #[test]
    fn config_string_longer_than_frame_is_malformed() {
        let mut bytes = config_query();
        bytes[30..32].copy_from_slice(&100u16.to_be_bytes());
        let frame = Frame::new_checked(&bytes[..]).unwrap();
        assert!(PacketRepr::parse(&frame).is_err());
    }

    #[test]
    fn mask_directives_beyond_frame_are_refused() {
        let mut bytes = config_query();
        bytes[19] = 2;
        bytes[27] = 10; // ten directives, but only 32 bytes follow
        let frame = Frame::new_checked(&bytes[..]).unwrap();
        assert!(PacketRepr::parse(&frame).is_err());
    }

    #[test]
    fn wrong_ethertype_and_reserved_flags_are_malformed() {
        let mut bytes = ATA_READ;
        bytes[12] = 0x08;
        assert!(HeaderRepr::parse(&Frame::new_unchecked(&bytes[..])).is_err());
        let mut bytes = ATA_READ;
        bytes[14] = 0x11;
        assert!(HeaderRepr::parse(&Frame::new_unchecked(&bytes[..])).is_err());
    }

    #[test]
    fn reply_header_names_the_real_blade() {
        let bytes = config_query();
        let req = HeaderRepr::parse(&Frame::new_checked(&bytes[..]).unwrap()).unwrap();
        let ours = MacAddr([2, 0, 0, 0, 0, 1]);
        let reply = req.reply(ours, 0, 3);
        assert_eq!(reply.dst, req.src);
        assert_eq!(reply.src, ours);
        assert_eq!((reply.shelf, reply.slot), (0, 3));
        assert!(reply.response);
        assert_eq!(reply.tag, req.tag);
    }

    fn mac() -> impl Strategy<Value = MacAddr> {
        any::<[u8; 6]>().prop_map(MacAddr)
    }

    fn header() -> impl Strategy<Value = HeaderRepr> {
        (
            mac(),
            mac(),
            0u8..16,
            any::<bool>(),
            proptest::option::of(any::<u8>()),
            any::<u16>(),
            any::<u8>(),
            any::<u32>(),
        )
            .prop_map(|(dst, src, version, response, error, shelf, slot, tag)| {
                HeaderRepr {
                    dst,
                    src,
                    version,
                    response,
                    error,
                    shelf,
                    slot,
                    command: Command::Ata,
                    tag,
                }
            })
    }

    fn arg() -> impl Strategy<Value = ArgRepr> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
                any::<u8>(),
                0u64..(1 << 48)
            )
                .prop_map(|(f, e, s, c, lba)| ArgRepr::Ata(AtaRepr {
                    aflags: f & ata_flags::ALL,
                    err_feature: e,
                    sector_count: s,
                    cmd_status: c,
                    lba,
                })),
            (
                any::<u16>(),
                any::<u16>(),
                any::<u8>(),
                0u8..16,
                0u8..16,
                proptest::collection::vec(any::<u8>(), 0..=MAX_CONFIG_LEN)
            )
                .prop_map(|(b, fw, s, v, c, config)| ArgRepr::Config(ConfigRepr {
                    buffer_count: b,
                    firmware_version: fw,
                    sector_count: s,
                    aoe_version: v,
                    command: ConfigCommand::from(c),
                    config,
                })),
            (
                any::<u8>(),
                any::<u8>(),
                proptest::collection::vec((any::<u8>(), mac()), 0..=255)
            )
                .prop_map(|(command, mask_error, ds)| ArgRepr::MacMask(MaskRepr {
                    command,
                    mask_error,
                    directives: ds
                        .into_iter()
                        .map(|(command, mac)| MaskDirective { command, mac })
                        .collect(),
                })),
            (any::<u8>(), proptest::collection::vec(mac(), 0..=255))
                .prop_map(|(command, macs)| ArgRepr::Reserve(ReserveRepr { command, macs })),
            any::<u8>().prop_map(|_| ArgRepr::Unknown),
        ]
    }

    fn command_of(arg: &ArgRepr, unknown: u8) -> Command {
        match arg {
            ArgRepr::Ata(_) => Command::Ata,
            ArgRepr::Config(_) => Command::Config,
            ArgRepr::MacMask(_) => Command::MacMask,
            ArgRepr::Reserve(_) => Command::Reserve,
            ArgRepr::Unknown => Command::Unknown(unknown.max(4)),
        }
    }

    proptest! {
        #[test]
        fn packet_round_trips(mut header in header(), arg in arg(), unknown in any::<u8>()) {
            header.command = command_of(&arg, unknown);
            let repr = PacketRepr { header, arg };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut Frame::new_unchecked(&mut buf[..]));
            let parsed = PacketRepr::parse(&Frame::new_checked(&buf[..]).unwrap()).unwrap();
            prop_assert_eq!(parsed, repr);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_parse(&bytes);
        }
    }
}
