//! One virtual blade (`eS.L`): its AoE state and the answer to every frame addressed to it.
//!
//! [`Blade::handle`] takes a received frame and the port it arrived on and either writes a
//! reply into the caller's buffer or says why there is none. It owns the per-blade state AoE
//! defines — config string, MAC mask list, reserve list — and follows vblade's rules for each
//! command, with the error cases of AoEr11:
//!
//! | input | answer |
//! |---|---|
//! | shorter than the AoE header, wrong ethertype, reserved flag bits, a response | dropped |
//! | for another shelf/slot, or from a MAC not on a non-empty mask list | dropped |
//! | argument shorter than its fixed part | dropped (vblade does the same) |
//! | version other than 1 | error 5 |
//! | unknown command | error 1 |
//! | ATA: bad aflags, sector count beyond the frame, short write payload | error 2 |
//! | ATA other than IDENTIFY from a MAC not on a non-empty reserve list | error 6 |
//! | config test / test-prefix that does not match | no reply |
//! | config set while a different string is set | error 4 (with the current string) |
//! | config with an unknown sub-command | error 2 |
//! | mask edit: full list / bad directive | merror 3 / 2 |
//! | reserve set while reserved by others | error 6 |

use super::ata::{self, AtaReply, AtaRequest, IdentifyData};
use super::stats::{BladeStats, DropReason};
use crate::block::BlockDevice;
use crate::ratelimit::LogLimiter;
use crate::warn_limited;
use crate::wire::aoe::{
    self, mask, reserve, AtaArg, AtaRepr, Command, ConfigArg, ConfigCommand, ConfigRepr, ErrorCode,
    Frame, HeaderRepr, MaskArg, MaskDirective, MaskRepr, ReserveArg, ReserveRepr,
};
use crate::wire::MacAddr;
use std::sync::Arc;

/// Most MACs the mask list holds (vblade's limit).
pub const MAX_MASKS: usize = 32;
/// Most MACs the reserve list holds (vblade's limit; a frame can carry 255).
pub const MAX_RESERVATIONS: usize = 255;
/// Buffer count advertised by default: the Linux driver keeps up to 64 frames outstanding.
pub const DEFAULT_BUFFER_COUNT: u16 = 64;
/// Firmware version in config replies (vblade reports 0x4000 + its version).
pub const FIRMWARE_VERSION: u16 = 0x4000 + 1;

/// How a blade is set up.
#[derive(Debug, Clone)]
pub struct BladeConfig {
    /// Shelf (major) address.
    pub shelf: u16,
    /// Slot (minor) address.
    pub slot: u8,
    /// Buffer count advertised in config replies.
    pub buffer_count: u16,
    /// Initial MAC mask list (vblade's `-m`); empty means every initiator.
    pub mask: Vec<MacAddr>,
    /// IDENTIFY serial number, e.g. "0.3:hostname".
    pub serial: String,
}

impl BladeConfig {
    /// A blade at `shelf.slot` with defaults and a serial naming this host.
    pub fn new(shelf: u16, slot: u8) -> BladeConfig {
        BladeConfig {
            shelf,
            slot,
            buffer_count: DEFAULT_BUFFER_COUNT,
            mask: Vec::new(),
            serial: format!("{shelf}.{slot}:{}", hostname()),
        }
    }

    /// The `eS.L` name.
    pub fn name(&self) -> String {
        format!("e{}.{}", self.shelf, self.slot)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The interface a frame arrived on, as the blade needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    /// The MAC the blade answers from: its service MAC if it has one, else the interface's.
    pub mac: MacAddr,
    /// The interface MTU, which bounds sectors per frame.
    pub mtu: u32,
}

impl Port {
    /// Sectors one frame carries at this MTU: 2 at 1500, 17 at 9000.
    pub fn max_sectors(&self) -> u8 {
        let usable = self
            .mtu
            .saturating_sub((aoe::HEADER_LEN - 14 + aoe::ATA_ARG_LEN) as u32);
        (usable / 512).min(255) as u8
    }

    /// Largest frame (Ethernet header included) this port sends or receives.
    pub fn max_frame_len(&self) -> usize {
        self.mtu as usize + 14
    }
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reply of this many bytes is in the output buffer.
    Reply(usize),
    /// No reply, for this reason.
    Dropped(DropReason),
    /// No reply: the frame is for another blade (not counted).
    NotOurs,
}

/// A read or write that passed every check [`Blade::handle`] makes and lies inside the device:
/// what is left is the transfer itself, which the frame path may execute together with the
/// transfers of neighbouring frames (one `read_at`/`write_at` for a run of adjacent sectors)
/// before [`Blade::finish_transfer`] writes the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedTransfer {
    reply: HeaderRepr,
    ata: AtaRepr,
    request: AtaRequest,
}

impl PreparedTransfer {
    /// Whether it writes (else it reads).
    pub fn is_write(&self) -> bool {
        matches!(self.request, AtaRequest::Write { .. })
    }

    /// First sector.
    pub fn lba(&self) -> u64 {
        match self.request {
            AtaRequest::Read { lba, .. } | AtaRequest::Write { lba, .. } => lba,
            _ => unreachable!("a prepared transfer is a read or a write"),
        }
    }

    /// Bytes transferred.
    pub fn data_len(&self) -> usize {
        match self.request {
            AtaRequest::Read { sectors, .. } | AtaRequest::Write { sectors, .. } => {
                usize::from(sectors) * 512
            }
            _ => unreachable!("a prepared transfer is a read or a write"),
        }
    }

    /// Where the data lies in the request frame (writes) and in the reply (reads).
    pub const DATA_OFFSET: usize = aoe::HEADER_LEN + aoe::ATA_ARG_LEN;
}

/// Answers a blade's prepared transfers (see [`Blade::answerer`]).
#[derive(Debug, Clone)]
pub struct TransferAnswerer {
    stats: Arc<BladeStats>,
    name: Arc<str>,
    io_error_log: Arc<LogLimiter>,
}

impl TransferAnswerer {
    /// [`Blade::finish_transfer`], from any thread.
    pub fn finish(
        &self,
        transfer: &PreparedTransfer,
        result: Result<(), crate::block::BlockError>,
        out: &mut [u8],
    ) -> usize {
        self.stats.count_request();
        let reply = ata::transfer_reply(&transfer.request, result);
        self.stats.count_ata(&transfer.request, &reply);
        if !reply.is_ok() && reply.error == ata::error::ABRT {
            warn_limited!(self.io_error_log, blade = %self.name, request = ?transfer.request, "I/O error answered with ATA ABRT");
        }
        let len = emit_ata_reply(transfer.reply, &transfer.ata, &reply, out);
        self.stats.count_reply();
        len
    }
}

fn emit_ata_reply(
    header: HeaderRepr,
    request: &AtaRepr,
    result: &AtaReply,
    out: &mut [u8],
) -> usize {
    let reply = AtaRepr {
        aflags: request.aflags,
        err_feature: result.error,
        sector_count: result.sector_count,
        cmd_status: result.status,
        lba: result.lba,
    };
    let mut frame = Frame::new_unchecked(&mut *out);
    header.emit(&mut frame);
    reply.emit(frame.payload_mut());
    let len = aoe::HEADER_LEN + aoe::ATA_ARG_LEN + result.data_len;
    pad_to_minimum(out, len)
}

/// One virtual blade.
pub struct Blade {
    config: BladeConfig,
    device: Arc<dyn BlockDevice>,
    identify: IdentifyData,
    config_string: Vec<u8>,
    masks: Vec<MacAddr>,
    reservations: Vec<MacAddr>,
    stats: Arc<BladeStats>,
    bad_frame_log: LogLimiter,
    io_error_log: Arc<LogLimiter>,
    /// `eS.L`, kept so that answering a deferred write allocates nothing.
    name: Arc<str>,
}

impl Blade {
    /// A blade serving `device`.
    pub fn new(config: BladeConfig, device: Arc<dyn BlockDevice>) -> Blade {
        let identify = IdentifyData::new(
            &config.serial,
            concat!("V", env!("CARGO_PKG_VERSION")),
            "twinblade",
        );
        let masks = config.mask.iter().take(MAX_MASKS).copied().collect();
        let name = config.name().into();
        Blade {
            config,
            device,
            identify,
            config_string: Vec::new(),
            masks,
            reservations: Vec::new(),
            stats: Arc::new(BladeStats::default()),
            bad_frame_log: LogLimiter::network(),
            io_error_log: Arc::new(LogLimiter::network()),
            name,
        }
    }

    /// Shelf and slot.
    pub fn address(&self) -> (u16, u8) {
        (self.config.shelf, self.config.slot)
    }

    /// The blade's configuration.
    pub fn config(&self) -> &BladeConfig {
        &self.config
    }

    /// Counters, shared with whoever reports them.
    pub fn stats(&self) -> Arc<BladeStats> {
        Arc::clone(&self.stats)
    }

    /// The current MAC mask list.
    pub fn masks(&self) -> &[MacAddr] {
        &self.masks
    }

    /// Whether a frame with this shelf/slot is addressed to this blade (directly or by broadcast).
    pub fn is_addressed(&self, shelf: u16, slot: u8) -> bool {
        (shelf == self.config.shelf || shelf == aoe::BROADCAST_SHELF)
            && (slot == self.config.slot || slot == aoe::BROADCAST_SLOT)
    }

    /// Writes the unsolicited config response that announces the blade, addressed to `dst`
    /// (broadcast, or each masked MAC). Returns its length.
    pub fn announce(&self, port: &Port, dst: MacAddr, out: &mut [u8]) -> usize {
        let header = HeaderRepr {
            dst,
            src: port.mac,
            version: aoe::VERSION,
            response: true,
            error: None,
            shelf: self.config.shelf,
            slot: self.config.slot,
            command: Command::Config,
            tag: 0,
        };
        self.emit_config_reply(header, ConfigCommand::Read, port, out)
    }

    /// Where announcements go: broadcast, or each MAC on a non-empty mask list (as vblade).
    pub fn announce_destinations(&self) -> Vec<MacAddr> {
        if self.masks.is_empty() {
            vec![MacAddr::BROADCAST]
        } else {
            self.masks.clone()
        }
    }

    /// The device the blade serves.
    pub fn device(&self) -> &dyn BlockDevice {
        &*self.device
    }

    /// If `bytes` is a read or write addressed to this blade alone that [`Blade::handle`] would
    /// execute (valid, permitted, inside the device), returns it without executing it and
    /// without counting it; `None` for anything else, which is then answered by
    /// [`Blade::handle`]. A write's data is `bytes[PreparedTransfer::DATA_OFFSET..][..data_len]`.
    pub fn prepare_transfer(&self, bytes: &[u8], port: &Port) -> Option<PreparedTransfer> {
        let frame = Frame::new_checked(bytes).ok()?;
        let header = HeaderRepr::parse(&frame).ok()?;
        if header.response
            || header.version != aoe::VERSION
            || header.command != Command::Ata
            || (header.shelf, header.slot) != (self.config.shelf, self.config.slot)
            || (!self.masks.is_empty() && !self.masks.contains(&header.src))
            || (!self.reservations.is_empty() && !self.reservations.contains(&header.src))
        {
            return None;
        }
        let arg = AtaArg::new_checked(frame.payload()).ok()?;
        let ata = AtaRepr::parse(&arg).ok()?;
        let request = AtaRequest::from_repr(&ata, port.max_sectors(), arg.data().len()).ok()?;
        if !request.in_range(self.device.size() / crate::block::SECTOR_SIZE) {
            return None;
        }
        Some(PreparedTransfer {
            reply: header.reply(port.mac, self.config.shelf, self.config.slot),
            ata,
            request,
        })
    }

    /// Writes the reply to a prepared transfer that ended with `result` into `out` (a read's
    /// data must already be at `out[PreparedTransfer::DATA_OFFSET..]`), counts it as
    /// [`Blade::handle`] would, and returns the reply's length.
    pub fn finish_transfer(
        &self,
        transfer: &PreparedTransfer,
        result: Result<(), crate::block::BlockError>,
        out: &mut [u8],
    ) -> usize {
        self.answerer().finish(transfer, result, out)
    }

    /// What answers this blade's prepared transfers without the blade itself: a write that
    /// completes on another thread is answered there, without taking the blade's lock.
    pub fn answerer(&self) -> TransferAnswerer {
        TransferAnswerer {
            stats: self.stats.clone(),
            name: self.name.clone(),
            io_error_log: self.io_error_log.clone(),
        }
    }

    /// Answers one received frame. `out` must hold at least `port.max_frame_len()` bytes and
    /// at least 1100 (the longest config reply).
    pub fn handle(&mut self, frame: &[u8], port: &Port, out: &mut [u8]) -> Outcome {
        let outcome = self.classify_and_answer(frame, port, out);
        match outcome {
            Outcome::Reply(_) => self.stats.count_reply(),
            Outcome::Dropped(reason) => self.stats.count_drop(reason),
            Outcome::NotOurs => {}
        }
        outcome
    }

    fn classify_and_answer(&mut self, bytes: &[u8], port: &Port, out: &mut [u8]) -> Outcome {
        let Ok(frame) = Frame::new_checked(bytes) else {
            return Outcome::Dropped(DropReason::Truncated);
        };
        let header = match HeaderRepr::parse(&frame) {
            Ok(header) => header,
            Err(_) => return Outcome::Dropped(DropReason::Malformed),
        };
        if header.response {
            return Outcome::NotOurs;
        }
        if !self.is_addressed(header.shelf, header.slot) {
            return Outcome::NotOurs;
        }
        self.stats.count_request();
        if !self.masks.is_empty() && !self.masks.contains(&header.src) {
            return Outcome::Dropped(DropReason::Masked);
        }
        let reply = header.reply(port.mac, self.config.shelf, self.config.slot);
        if header.version != aoe::VERSION {
            warn_limited!(self.bad_frame_log, src = %header.src, version = header.version, "AoE frame with unsupported version");
            return self.error_reply(reply, ErrorCode::UnsupportedVersion, out);
        }
        let payload = frame.payload();
        match header.command {
            Command::Ata => self.answer_ata(reply, payload, port, out),
            Command::Config => self.answer_config(reply, payload, port, out),
            Command::MacMask => self.answer_mask(reply, payload, out),
            Command::Reserve => self.answer_reserve(reply, payload, out),
            Command::Unknown(code) => {
                warn_limited!(self.bad_frame_log, src = %header.src, command = code, "unknown AoE command");
                self.error_reply(reply, ErrorCode::UnrecognizedCommand, out)
            }
        }
    }

    /// A reply carrying only the header with the E flag, padded to the Ethernet minimum.
    fn error_reply(&self, mut reply: HeaderRepr, code: ErrorCode, out: &mut [u8]) -> Outcome {
        reply.error = Some(code as u8);
        self.stats.count_error(code);
        let len = aoe::MIN_FRAME_LEN;
        out[..len].fill(0);
        reply.emit(&mut Frame::new_unchecked(&mut out[..len]));
        Outcome::Reply(len)
    }

    fn answer_ata(
        &mut self,
        header: HeaderRepr,
        payload: &[u8],
        port: &Port,
        out: &mut [u8],
    ) -> Outcome {
        let Ok(arg) = AtaArg::new_checked(payload) else {
            return Outcome::Dropped(DropReason::Truncated);
        };
        let Ok(ata) = AtaRepr::parse(&arg) else {
            warn_limited!(self.bad_frame_log, src = %header.dst, "ATA request with undefined aflags");
            return self.error_reply(header, ErrorCode::BadArgument, out);
        };
        // The reservation does not hide the device's identity, only its data (as vblade).
        if ata.cmd_status != ata::cmd::IDENTIFY
            && !self.reservations.is_empty()
            && !self.reservations.contains(&header.dst)
        {
            return self.error_reply(header, ErrorCode::TargetReserved, out);
        }
        let request = match AtaRequest::from_repr(&ata, port.max_sectors(), arg.data().len()) {
            Ok(request) => request,
            Err(why) => {
                warn_limited!(self.bad_frame_log, src = %header.dst, %why, "bad ATA argument");
                return self.error_reply(header, ErrorCode::BadArgument, out);
            }
        };
        let data_at = aoe::HEADER_LEN + aoe::ATA_ARG_LEN;
        let result = ata::execute(
            &request,
            &*self.device,
            &self.identify,
            arg.data(),
            &mut out[data_at..],
        );
        self.stats.count_ata(&request, &result);
        if !result.is_ok() && result.error == ata::error::ABRT && request.byte_range().is_some() {
            warn_limited!(self.io_error_log, blade = %self.config.name(), ?request, "I/O error answered with ATA ABRT");
        }
        Outcome::Reply(emit_ata_reply(header, &ata, &result, out))
    }

    fn answer_config(
        &mut self,
        header: HeaderRepr,
        payload: &[u8],
        port: &Port,
        out: &mut [u8],
    ) -> Outcome {
        let Ok(arg) = ConfigArg::new_checked(payload) else {
            return Outcome::Dropped(DropReason::Truncated);
        };
        let command = arg.command();
        let request = match ConfigRepr::parse(&arg) {
            Ok(request) => request,
            // A read does not look at the string, so its length does not matter.
            Err(_) if command == ConfigCommand::Read => ConfigRepr {
                buffer_count: 0,
                firmware_version: 0,
                sector_count: 0,
                aoe_version: aoe::VERSION,
                command,
                config: Vec::new(),
            },
            // "If you can't play nice": vblade drops these silently.
            Err(_) => return Outcome::Dropped(DropReason::Malformed),
        };
        let mut header = header;
        match command {
            ConfigCommand::Read => {}
            ConfigCommand::Test => {
                if request.config != self.config_string {
                    return Outcome::Dropped(DropReason::ConfigMismatch);
                }
            }
            ConfigCommand::TestPrefix => {
                if !self.config_string.starts_with(&request.config) {
                    return Outcome::Dropped(DropReason::ConfigMismatch);
                }
            }
            ConfigCommand::Set => {
                if !self.config_string.is_empty() && self.config_string != request.config {
                    header.error = Some(ErrorCode::ConfigStringPresent as u8);
                    self.stats.count_error(ErrorCode::ConfigStringPresent);
                } else {
                    self.config_string = request.config;
                }
            }
            ConfigCommand::ForceSet => self.config_string = request.config,
            ConfigCommand::Unknown(_) => {
                header.error = Some(ErrorCode::BadArgument as u8);
                self.stats.count_error(ErrorCode::BadArgument);
            }
        }
        Outcome::Reply(self.emit_config_reply(header, command, port, out))
    }

    fn emit_config_reply(
        &self,
        header: HeaderRepr,
        command: ConfigCommand,
        port: &Port,
        out: &mut [u8],
    ) -> usize {
        let reply = ConfigRepr {
            buffer_count: self.config.buffer_count,
            firmware_version: FIRMWARE_VERSION,
            sector_count: port.max_sectors(),
            aoe_version: aoe::VERSION,
            command,
            config: self.config_string.clone(),
        };
        let mut frame = Frame::new_unchecked(&mut *out);
        header.emit(&mut frame);
        reply.emit(frame.payload_mut());
        pad_to_minimum(out, aoe::HEADER_LEN + reply.buffer_len())
    }

    fn answer_mask(&mut self, header: HeaderRepr, payload: &[u8], out: &mut [u8]) -> Outcome {
        let Ok(arg) = MaskArg::new_checked(payload) else {
            return Outcome::Dropped(DropReason::Truncated);
        };
        let Ok(request) = MaskRepr::parse(&arg) else {
            return self.error_reply(header, ErrorCode::BadArgument, out);
        };
        let mut reply = MaskRepr {
            command: request.command,
            mask_error: 0,
            directives: Vec::new(),
        };
        match request.command {
            mask::READ => {}
            mask::EDIT => {
                for (index, directive) in request.directives.iter().enumerate() {
                    if let Err(mask_error) = self.apply_mask_directive(directive) {
                        // vblade reports how many directives were applied before the failure.
                        reply.mask_error = mask_error;
                        let mut arg_bytes = [0u8; aoe::MASK_ARG_LEN];
                        reply.emit(&mut arg_bytes);
                        arg_bytes[3] = index as u8;
                        let mut frame = Frame::new_unchecked(&mut *out);
                        header.emit(&mut frame);
                        frame.payload_mut()[..aoe::MASK_ARG_LEN].copy_from_slice(&arg_bytes);
                        return Outcome::Reply(pad_to_minimum(
                            out,
                            aoe::HEADER_LEN + aoe::MASK_ARG_LEN,
                        ));
                    }
                }
            }
            _ => return self.error_reply(header, ErrorCode::BadArgument, out),
        }
        reply.directives = self
            .masks
            .iter()
            .map(|mac| MaskDirective {
                command: mask::DIR_NONE,
                mac: *mac,
            })
            .collect();
        let mut frame = Frame::new_unchecked(&mut *out);
        header.emit(&mut frame);
        reply.emit(frame.payload_mut());
        Outcome::Reply(pad_to_minimum(out, aoe::HEADER_LEN + reply.buffer_len()))
    }

    fn apply_mask_directive(&mut self, directive: &MaskDirective) -> Result<(), u8> {
        match directive.command {
            mask::DIR_NONE => Ok(()),
            mask::DIR_ADD => {
                if self.masks.contains(&directive.mac) {
                    Ok(())
                } else if self.masks.len() >= MAX_MASKS {
                    Err(mask::ERR_FULL)
                } else {
                    self.masks.push(directive.mac);
                    Ok(())
                }
            }
            mask::DIR_DELETE => {
                self.masks.retain(|mac| *mac != directive.mac);
                Ok(())
            }
            _ => Err(mask::ERR_BAD_DIRECTIVE),
        }
    }

    fn answer_reserve(&mut self, header: HeaderRepr, payload: &[u8], out: &mut [u8]) -> Outcome {
        let Ok(arg) = ReserveArg::new_checked(payload) else {
            return Outcome::Dropped(DropReason::Truncated);
        };
        let Ok(request) = ReserveRepr::parse(&arg) else {
            return self.error_reply(header, ErrorCode::BadArgument, out);
        };
        let sender = header.dst;
        match request.command {
            reserve::READ => {}
            reserve::SET
                if !self.reservations.is_empty() && !self.reservations.contains(&sender) =>
            {
                return self.error_reply(header, ErrorCode::TargetReserved, out);
            }
            reserve::SET | reserve::FORCE_SET => {
                self.reservations = request.macs.into_iter().take(MAX_RESERVATIONS).collect();
            }
            _ => return self.error_reply(header, ErrorCode::BadArgument, out),
        }
        let reply = ReserveRepr {
            command: request.command,
            macs: self.reservations.clone(),
        };
        let mut frame = Frame::new_unchecked(&mut *out);
        header.emit(&mut frame);
        reply.emit(frame.payload_mut());
        Outcome::Reply(pad_to_minimum(out, aoe::HEADER_LEN + reply.buffer_len()))
    }
}

/// Zero-pads a reply of `len` bytes to the Ethernet minimum and returns the length to send.
fn pad_to_minimum(out: &mut [u8], len: usize) -> usize {
    if len < aoe::MIN_FRAME_LEN {
        out[len..aoe::MIN_FRAME_LEN].fill(0);
        aoe::MIN_FRAME_LEN
    } else {
        len
    }
}

#[cfg(test)]
mod tests;
