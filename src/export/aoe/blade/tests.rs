//! Blade behaviour, frame in → frame out, one test per AoE command and error case.

use super::*;
use crate::block::{FaultConfig, FaultSpec, FaultyDevice, InjectedError, NullDevice};
use crate::export::aoe::ata::{cmd, error as ata_error, status};
use crate::wire::aoe::{ata_flags, ArgRepr, PacketRepr};

const CLIENT: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const OTHER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x65, 0x43, 0x21]);
const OURS: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x03]);
const PORT_1500: Port = Port {
    mac: OURS,
    mtu: 1500,
};
const PORT_9000: Port = Port {
    mac: OURS,
    mtu: 9000,
};

/// A 1 MiB in-memory-backed blade e0.3 (a file in a temp dir, so writes are real).
fn blade_with_device() -> (
    Blade,
    Arc<FaultyDevice<crate::block::FileDevice>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let file = crate::block::OpenOptions::new().open(&path).unwrap();
    let device = Arc::new(FaultyDevice::new(file));
    let blade = Blade::new(BladeConfig::new(0, 3), device.clone());
    (blade, device, dir)
}

fn header(shelf: u16, slot: u8, command: Command) -> HeaderRepr {
    HeaderRepr {
        dst: OURS,
        src: CLIENT,
        version: 1,
        response: false,
        error: None,
        shelf,
        slot,
        command,
        tag: 0x1234_5678,
    }
}

fn ata_frame(command: u8, aflags: u8, sectors: u8, lba: u64, data: &[u8]) -> Vec<u8> {
    let repr = PacketRepr {
        header: header(0, 3, Command::Ata),
        arg: ArgRepr::Ata(AtaRepr {
            aflags,
            err_feature: 0,
            sector_count: sectors,
            cmd_status: command,
            lba,
        }),
    };
    let mut buf = vec![0u8; repr.buffer_len() + data.len()];
    repr.emit(&mut Frame::new_unchecked(&mut buf[..]));
    buf[repr.buffer_len()..].copy_from_slice(data);
    buf
}

fn packet(repr: PacketRepr) -> Vec<u8> {
    let mut buf = vec![0u8; repr.buffer_len().max(60)];
    repr.emit(&mut Frame::new_unchecked(&mut buf[..]));
    buf
}

fn config_frame(shelf: u16, slot: u8, command: ConfigCommand, config: &[u8]) -> Vec<u8> {
    packet(PacketRepr {
        header: header(shelf, slot, Command::Config),
        arg: ArgRepr::Config(ConfigRepr {
            buffer_count: 0,
            firmware_version: 0,
            sector_count: 0,
            aoe_version: 1,
            command,
            config: config.to_vec(),
        }),
    })
}

/// Sends `frame`, expects a reply, and returns it parsed plus its raw bytes.
fn ask(blade: &mut Blade, frame: &[u8], port: &Port) -> (PacketRepr, Vec<u8>) {
    let mut out = vec![0u8; 10000];
    match blade.handle(frame, port, &mut out) {
        Outcome::Reply(len) => {
            let bytes = out[..len].to_vec();
            let repr = PacketRepr::parse(&Frame::new_checked(&bytes[..]).unwrap()).unwrap();
            assert!(repr.header.response);
            assert_eq!(repr.header.dst, CLIENT);
            assert_eq!(repr.header.src, port.mac);
            assert_eq!(
                (repr.header.shelf, repr.header.slot),
                (0, 3),
                "reply must carry the real address"
            );
            assert!(len >= 60, "replies are padded to the Ethernet minimum");
            (repr, bytes)
        }
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn silent(blade: &mut Blade, frame: &[u8], port: &Port) -> Outcome {
    let mut out = vec![0u8; 10000];
    let outcome = blade.handle(frame, port, &mut out);
    assert!(!matches!(outcome, Outcome::Reply(_)), "unexpected reply");
    outcome
}

fn ata_of(repr: &PacketRepr) -> AtaRepr {
    match &repr.arg {
        ArgRepr::Ata(a) => *a,
        other => panic!("not an ATA reply: {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_then_read_ext_round_trips_data() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let data = pattern(17 * 512, 7);
    let write = ata_frame(
        cmd::WRITE_EXT,
        ata_flags::EXTENDED | ata_flags::WRITE,
        17,
        100,
        &data,
    );
    let (reply, bytes) = ask(&mut blade, &write, &PORT_9000);
    let ata = ata_of(&reply);
    assert_eq!(ata.cmd_status, status::DRDY);
    assert_eq!(ata.sector_count, 0);
    assert_eq!(ata.lba, 117);
    assert_eq!(bytes.len(), 60, "a write reply carries no data");

    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 17, 100, &[]);
    let (reply, bytes) = ask(&mut blade, &read, &PORT_9000);
    assert_eq!(ata_of(&reply).cmd_status, status::DRDY);
    assert_eq!(&bytes[36..], &data[..]);
}

#[test]
fn lba28_read_and_write_work() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let data = pattern(1024, 9);
    // The driver puts 0xE0 in the top byte of a 28-bit LBA.
    let write = ata_frame(cmd::WRITE, ata_flags::WRITE, 2, 0xE000_0008, &data);
    assert_eq!(
        ata_of(&ask(&mut blade, &write, &PORT_1500).0).cmd_status,
        status::DRDY
    );
    let read = ata_frame(cmd::READ, 0, 2, 8, &[]);
    assert_eq!(&ask(&mut blade, &read, &PORT_1500).1[36..], &data[..]);
}

#[test]
fn probe_read_with_trailing_data_is_served() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let probe = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 2, 0, &[0u8; 1024]);
    let (reply, bytes) = ask(&mut blade, &probe, &PORT_1500);
    assert_eq!(ata_of(&reply).cmd_status, status::DRDY);
    assert_eq!(bytes.len(), 36 + 1024);
}

#[test]
fn sector_count_follows_the_mtu() {
    assert_eq!(PORT_1500.max_sectors(), 2);
    assert_eq!(PORT_9000.max_sectors(), 17);
    let (mut blade, _dev, _dir) = blade_with_device();
    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 3, 0, &[]);
    let (reply, _) = ask(&mut blade, &read, &PORT_1500);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
    let (reply, _) = ask(&mut blade, &read, &PORT_9000);
    assert_eq!(reply.header.error, None);
}

#[test]
fn short_write_payload_is_bad_argument_and_writes_nothing() {
    let (mut blade, dev, _dir) = blade_with_device();
    let write = ata_frame(cmd::WRITE_EXT, 0x41, 2, 0, &pattern(1000, 1));
    let (reply, _) = ask(&mut blade, &write, &PORT_1500);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
    assert!(dev.records().is_empty(), "nothing reached the device");
    assert_eq!(blade.stats().errors(ErrorCode::BadArgument), 1);
}

#[test]
fn out_of_range_lba_is_idnf() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let last = (1 << 20) / 512 - 1;
    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 2, last, &[]);
    let (reply, _) = ask(&mut blade, &read, &PORT_1500);
    let ata = ata_of(&reply);
    assert_eq!(ata.cmd_status, status::DRDY | status::ERR);
    assert_eq!(ata.err_feature, ata_error::IDNF);
}

#[test]
fn identify_reports_capacity_and_lba48() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let identify = ata_frame(cmd::IDENTIFY, 0, 1, 0xA0 << 24, &[]);
    let (reply, bytes) = ask(&mut blade, &identify, &PORT_1500);
    assert_eq!(ata_of(&reply).cmd_status, status::DRDY);
    let words = &bytes[36..36 + 512];
    assert_eq!(bytes.len(), 36 + 512);
    let word = |i: usize| u16::from_le_bytes([words[2 * i], words[2 * i + 1]]);
    assert_ne!(word(83) & 0x0400, 0);
    assert_eq!(
        u64::from_le_bytes(words[200..208].try_into().unwrap()),
        2048
    );
}

#[test]
fn flush_cache_reaches_the_device() {
    let (mut blade, dev, _dir) = blade_with_device();
    for command in [cmd::FLUSH_CACHE, cmd::FLUSH_CACHE_EXT] {
        let flush = ata_frame(command, 0, 0, 0, &[]);
        assert_eq!(
            ata_of(&ask(&mut blade, &flush, &PORT_1500).0).cmd_status,
            status::DRDY
        );
    }
    assert_eq!(dev.flushes(), 2);
}

#[test]
fn failed_flush_is_reported_as_abort() {
    let (mut blade, dev, _dir) = blade_with_device();
    dev.set_faults(FaultConfig {
        flush_error: Some(FaultSpec::always(InjectedError::Eio)),
        ..Default::default()
    });
    let flush = ata_frame(cmd::FLUSH_CACHE_EXT, 0, 0, 0, &[]);
    let ata = ata_of(&ask(&mut blade, &flush, &PORT_1500).0);
    assert_eq!(
        (ata.cmd_status, ata.err_feature),
        (status::DRDY | status::ERR, ata_error::ABRT)
    );
}

#[test]
fn io_error_is_reported_as_abort() {
    let (mut blade, dev, _dir) = blade_with_device();
    dev.set_faults(FaultConfig {
        write_error: Some(FaultSpec::always(InjectedError::Eio)),
        ..Default::default()
    });
    let write = ata_frame(cmd::WRITE_EXT, 0x41, 1, 0, &[1u8; 512]);
    let ata = ata_of(&ask(&mut blade, &write, &PORT_1500).0);
    assert_eq!(
        (ata.cmd_status, ata.err_feature),
        (status::DRDY | status::ERR, ata_error::ABRT)
    );
}

#[test]
fn check_power_mode_and_unsupported_commands() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let power = ata_frame(cmd::CHECK_POWER_MODE, 0, 0, 0, &[]);
    let ata = ata_of(&ask(&mut blade, &power, &PORT_1500).0);
    assert_eq!((ata.cmd_status, ata.sector_count), (status::DRDY, 0xFF));
    for other in [0xB0u8, 0xEF, 0x25, 0xC8] {
        let frame = ata_frame(other, 0, 0, 0, &[]);
        let ata = ata_of(&ask(&mut blade, &frame, &PORT_1500).0);
        assert_eq!(
            (ata.cmd_status, ata.err_feature),
            (status::DRDY | status::ERR, ata_error::ABRT)
        );
    }
}

#[test]
fn truncated_frames_are_dropped() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    assert_eq!(
        silent(&mut blade, &read[..20], &PORT_1500),
        Outcome::Dropped(DropReason::Truncated)
    );
    assert_eq!(
        silent(&mut blade, &read[..30], &PORT_1500),
        Outcome::Dropped(DropReason::Truncated)
    );
    let config = config_frame(0, 3, ConfigCommand::Read, b"");
    assert_eq!(
        silent(&mut blade, &config[..28], &PORT_1500),
        Outcome::Dropped(DropReason::Truncated)
    );
}

#[test]
fn unsupported_version_is_error_5() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    read[14] = 0x20;
    let (reply, _) = ask(&mut blade, &read, &PORT_1500);
    assert_eq!(
        reply.header.error,
        Some(ErrorCode::UnsupportedVersion as u8)
    );
}

#[test]
fn unknown_command_is_error_1() {
    let (mut blade, _dev, _dir) = blade_with_device();
    for code in [4u8, 0x7F, 0xF0] {
        let frame = packet(PacketRepr {
            header: header(0, 3, Command::Unknown(code)),
            arg: ArgRepr::Unknown,
        });
        let (reply, _) = ask(&mut blade, &frame, &PORT_1500);
        assert_eq!(
            reply.header.error,
            Some(ErrorCode::UnrecognizedCommand as u8)
        );
        assert_eq!(reply.header.command, Command::Unknown(code));
    }
}

#[test]
fn bad_aflags_are_bad_argument() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    read[24] |= 0x80;
    assert_eq!(
        ask(&mut blade, &read, &PORT_1500).0.header.error,
        Some(ErrorCode::BadArgument as u8)
    );
}

#[test]
fn other_addresses_and_responses_are_ignored() {
    let (mut blade, _dev, _dir) = blade_with_device();
    assert_eq!(
        silent(
            &mut blade,
            &config_frame(0, 4, ConfigCommand::Read, b""),
            &PORT_1500
        ),
        Outcome::NotOurs
    );
    assert_eq!(
        silent(
            &mut blade,
            &config_frame(1, 3, ConfigCommand::Read, b""),
            &PORT_1500
        ),
        Outcome::NotOurs
    );
    let mut response = config_frame(0, 3, ConfigCommand::Read, b"");
    response[14] |= 0x08;
    assert_eq!(silent(&mut blade, &response, &PORT_1500), Outcome::NotOurs);
}

#[test]
fn broadcast_config_query_gets_real_address_and_geometry() {
    let (mut blade, _dev, _dir) = blade_with_device();
    for (shelf, slot) in [(0xFFFF, 0xFF), (0, 0xFF), (0xFFFF, 3)] {
        let (reply, _) = ask(
            &mut blade,
            &config_frame(shelf, slot, ConfigCommand::Read, b""),
            &PORT_9000,
        );
        let ArgRepr::Config(cfg) = reply.arg else {
            panic!()
        };
        assert_eq!(cfg.buffer_count, 64);
        assert_eq!(cfg.sector_count, 17);
        assert_eq!(cfg.aoe_version, 1);
        assert_eq!(cfg.firmware_version, FIRMWARE_VERSION);
        assert_eq!(reply.header.tag, 0x1234_5678);
    }
}

fn config_string_of(repr: &PacketRepr) -> Vec<u8> {
    match &repr.arg {
        ArgRepr::Config(cfg) => cfg.config.clone(),
        other => panic!("not a config reply: {other:?}"),
    }
}

#[test]
fn config_set_test_prefix_and_force_set() {
    let (mut blade, _dev, _dir) = blade_with_device();
    // set on an empty string succeeds
    let (reply, _) = ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::Set, b"host=alpha"),
        &PORT_1500,
    );
    assert_eq!(reply.header.error, None);
    assert_eq!(config_string_of(&reply), b"host=alpha");
    // set of the same string again is fine; a different one is error 4 with the current string
    let (reply, _) = ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::Set, b"host=alpha"),
        &PORT_1500,
    );
    assert_eq!(reply.header.error, None);
    let (reply, _) = ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::Set, b"host=beta"),
        &PORT_1500,
    );
    assert_eq!(
        reply.header.error,
        Some(ErrorCode::ConfigStringPresent as u8)
    );
    assert_eq!(config_string_of(&reply), b"host=alpha");
    // test: exact match only; prefix: prefix only; no reply otherwise
    ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::Test, b"host=alpha"),
        &PORT_1500,
    );
    assert_eq!(
        silent(
            &mut blade,
            &config_frame(0, 3, ConfigCommand::Test, b"host=alp"),
            &PORT_1500
        ),
        Outcome::Dropped(DropReason::ConfigMismatch)
    );
    ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::TestPrefix, b"host=alp"),
        &PORT_1500,
    );
    ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::TestPrefix, b""),
        &PORT_1500,
    );
    assert_eq!(
        silent(
            &mut blade,
            &config_frame(0, 3, ConfigCommand::TestPrefix, b"host=b"),
            &PORT_1500
        ),
        Outcome::Dropped(DropReason::ConfigMismatch)
    );
    // force set replaces
    let (reply, _) = ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::ForceSet, b"x"),
        &PORT_1500,
    );
    assert_eq!(config_string_of(&reply), b"x");
    // unknown sub-command: error 2, string unchanged
    let (reply, _) = ask(
        &mut blade,
        &config_frame(0, 3, ConfigCommand::Unknown(9), b""),
        &PORT_1500,
    );
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
    assert_eq!(config_string_of(&reply), b"x");
}

#[test]
fn config_set_with_length_beyond_frame_is_dropped_but_read_is_answered() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut frame = config_frame(0, 3, ConfigCommand::ForceSet, b"");
    frame[30..32].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(
        silent(&mut blade, &frame, &PORT_1500),
        Outcome::Dropped(DropReason::Malformed)
    );
    let mut frame = config_frame(0, 3, ConfigCommand::Read, b"");
    frame[30..32].copy_from_slice(&500u16.to_be_bytes());
    ask(&mut blade, &frame, &PORT_1500);
}

fn mask_frame(command: u8, directives: &[(u8, MacAddr)]) -> Vec<u8> {
    packet(PacketRepr {
        header: header(0, 3, Command::MacMask),
        arg: ArgRepr::MacMask(MaskRepr {
            command,
            mask_error: 0,
            directives: directives
                .iter()
                .map(|(command, mac)| MaskDirective {
                    command: *command,
                    mac: *mac,
                })
                .collect(),
        }),
    })
}

fn mask_of(repr: &PacketRepr) -> MaskRepr {
    match &repr.arg {
        ArgRepr::MacMask(m) => m.clone(),
        other => panic!("not a mask reply: {other:?}"),
    }
}

#[test]
fn mask_list_edit_read_and_enforcement() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let (reply, _) = ask(
        &mut blade,
        &mask_frame(
            mask::EDIT,
            &[(mask::DIR_ADD, CLIENT), (mask::DIR_ADD, CLIENT)],
        ),
        &PORT_1500,
    );
    let list = mask_of(&reply);
    assert_eq!(list.mask_error, 0);
    assert_eq!(list.directives.len(), 1, "adding twice keeps one entry");
    assert_eq!(list.directives[0].mac, CLIENT);
    // A MAC not on the list is now ignored entirely.
    let mut from_other = config_frame(0, 3, ConfigCommand::Read, b"");
    from_other[6..12].copy_from_slice(&OTHER.0);
    assert_eq!(
        silent(&mut blade, &from_other, &PORT_1500),
        Outcome::Dropped(DropReason::Masked)
    );
    // Bad directive: merror 2 and the count of directives applied before it.
    let mut out = vec![0u8; 10000];
    let frame = mask_frame(mask::EDIT, &[(mask::DIR_ADD, OTHER), (7, OTHER)]);
    let Outcome::Reply(len) = blade.handle(&frame, &PORT_1500, &mut out) else {
        panic!("no reply")
    };
    let arg = MaskArg::new_checked(&out[24..len]).unwrap();
    assert_eq!(
        (arg.mask_error(), arg.directive_count()),
        (mask::ERR_BAD_DIRECTIVE, 1)
    );
    // Delete and read back.
    let (reply, _) = ask(
        &mut blade,
        &mask_frame(mask::EDIT, &[(mask::DIR_DELETE, OTHER)]),
        &PORT_1500,
    );
    assert_eq!(mask_of(&reply).directives.len(), 1);
    let (reply, _) = ask(&mut blade, &mask_frame(mask::READ, &[]), &PORT_1500);
    assert_eq!(mask_of(&reply).directives[0].mac, CLIENT);
    // Unknown mcmd: AoE error 2.
    let (reply, _) = ask(&mut blade, &mask_frame(9, &[]), &PORT_1500);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
}

#[test]
fn mask_list_full_is_merror_3() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut directives: Vec<(u8, MacAddr)> = vec![(mask::DIR_ADD, CLIENT)];
    directives.extend((0..MAX_MASKS as u8).map(|i| (mask::DIR_ADD, MacAddr([2, 0, 0, 0, 1, i]))));
    let mut out = vec![0u8; 10000];
    let Outcome::Reply(len) =
        blade.handle(&mask_frame(mask::EDIT, &directives), &PORT_1500, &mut out)
    else {
        panic!("no reply")
    };
    // As vblade: merror, and the directive count says how many were applied; no list follows.
    let arg = MaskArg::new_checked(&out[24..len]).unwrap();
    assert_eq!(arg.mask_error(), mask::ERR_FULL);
    assert_eq!(usize::from(arg.directive_count()), MAX_MASKS);
    assert_eq!(blade.masks().len(), MAX_MASKS);
}

#[test]
fn mask_directives_beyond_frame_are_bad_argument() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut frame = mask_frame(mask::EDIT, &[]);
    frame[27] = 20;
    let (reply, _) = ask(&mut blade, &frame, &PORT_1500);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
}

fn reserve_frame(src: MacAddr, command: u8, macs: &[MacAddr]) -> Vec<u8> {
    let mut h = header(0, 3, Command::Reserve);
    h.src = src;
    packet(PacketRepr {
        header: h,
        arg: ArgRepr::Reserve(ReserveRepr {
            command,
            macs: macs.to_vec(),
        }),
    })
}

#[test]
fn reserve_release_rules() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut out = vec![0u8; 10000];
    let reply_of = |blade: &mut Blade, frame: &[u8], out: &mut Vec<u8>| -> PacketRepr {
        let Outcome::Reply(len) = blade.handle(frame, &PORT_1500, out) else {
            panic!("no reply")
        };
        PacketRepr::parse(&Frame::new_checked(&out[..len]).unwrap()).unwrap()
    };
    // CLIENT reserves for itself.
    let reply = reply_of(
        &mut blade,
        &reserve_frame(CLIENT, reserve::SET, &[CLIENT]),
        &mut out,
    );
    assert_eq!(reply.header.error, None);
    // OTHER may not set, gets error 6; may read.
    let reply = reply_of(
        &mut blade,
        &reserve_frame(OTHER, reserve::SET, &[OTHER]),
        &mut out,
    );
    assert_eq!(reply.header.error, Some(ErrorCode::TargetReserved as u8));
    let reply = reply_of(
        &mut blade,
        &reserve_frame(OTHER, reserve::READ, &[]),
        &mut out,
    );
    let ArgRepr::Reserve(list) = reply.arg else {
        panic!()
    };
    assert_eq!(list.macs, vec![CLIENT]);
    // OTHER's ATA I/O is refused with error 6, but IDENTIFY is answered.
    let mut read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    read[6..12].copy_from_slice(&OTHER.0);
    let reply = reply_of(&mut blade, &read, &mut out);
    assert_eq!(reply.header.error, Some(ErrorCode::TargetReserved as u8));
    let mut identify = ata_frame(cmd::IDENTIFY, 0, 1, 0, &[]);
    identify[6..12].copy_from_slice(&OTHER.0);
    assert_eq!(reply_of(&mut blade, &identify, &mut out).header.error, None);
    // CLIENT's I/O works.
    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    assert_eq!(reply_of(&mut blade, &read, &mut out).header.error, None);
    // Force set by OTHER releases (empty list), then everyone may do I/O.
    let reply = reply_of(
        &mut blade,
        &reserve_frame(OTHER, reserve::FORCE_SET, &[]),
        &mut out,
    );
    assert_eq!(reply.header.error, None);
    let mut read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    read[6..12].copy_from_slice(&OTHER.0);
    assert_eq!(reply_of(&mut blade, &read, &mut out).header.error, None);
    // Unknown rcmd and truncated MAC list: error 2.
    let reply = reply_of(&mut blade, &reserve_frame(CLIENT, 7, &[]), &mut out);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
    let mut frame = reserve_frame(CLIENT, reserve::SET, &[]);
    frame[25] = 50;
    let reply = reply_of(&mut blade, &frame, &mut out);
    assert_eq!(reply.header.error, Some(ErrorCode::BadArgument as u8));
}

#[test]
fn announce_is_an_unsolicited_config_response() {
    let (blade, _dev, _dir) = blade_with_device();
    let mut out = vec![0u8; 2000];
    assert_eq!(blade.announce_destinations(), vec![MacAddr::BROADCAST]);
    let len = blade.announce(&PORT_9000, MacAddr::BROADCAST, &mut out);
    let repr = PacketRepr::parse(&Frame::new_checked(&out[..len]).unwrap()).unwrap();
    assert!(repr.header.response);
    assert_eq!(repr.header.tag, 0);
    assert_eq!(repr.header.dst, MacAddr::BROADCAST);
    assert_eq!((repr.header.shelf, repr.header.slot), (0, 3));
    let ArgRepr::Config(cfg) = repr.arg else {
        panic!()
    };
    assert_eq!((cfg.buffer_count, cfg.sector_count), (64, 17));
}

#[test]
fn masked_blade_announces_to_each_mask() {
    let dev = Arc::new(NullDevice::new(1 << 20));
    let mut config = BladeConfig::new(0, 3);
    config.mask = vec![CLIENT, OTHER];
    let blade = Blade::new(config, dev);
    assert_eq!(blade.announce_destinations(), vec![CLIENT, OTHER]);
}

#[test]
fn read_only_device_aborts_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
    let dev = crate::block::OpenOptions::new()
        .read_only(true)
        .open(&path)
        .unwrap();
    let mut blade = Blade::new(BladeConfig::new(0, 3), Arc::new(dev));
    let write = ata_frame(cmd::WRITE_EXT, 0x41, 1, 0, &[1u8; 512]);
    let ata = ata_of(&ask(&mut blade, &write, &PORT_1500).0);
    assert_eq!(ata.cmd_status, status::DRDY | status::ERR);
    assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 1 << 16]);
}

#[test]
fn random_frames_never_panic_and_never_write_outside_requests() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        ..Config::default()
    });
    let dev = Arc::new(NullDevice::new(1 << 20));
    runner
        .run(
            &proptest::collection::vec(any::<u8>(), 0..1100),
            |mut bytes| {
                // Aim most cases at us so they get past the address filter.
                if bytes.len() >= 24 && bytes[0] % 2 == 0 {
                    bytes[12] = 0x88;
                    bytes[13] = 0xa2;
                    bytes[14] = 0x10;
                    bytes[16..19].copy_from_slice(&[0, 0, 3]);
                    bytes[19] %= 5;
                }
                let mut blade = Blade::new(BladeConfig::new(0, 3), dev.clone());
                let mut out = vec![0u8; 10000];
                if let Outcome::Reply(len) = blade.handle(&bytes, &PORT_1500, &mut out) {
                    prop_assert!(len >= 60 && len <= PORT_1500.max_frame_len() + 600);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Answers `frame` through the prepared-transfer path as the ring frame path does (one
/// transfer, executed alone) and returns the reply bytes.
fn ask_prepared(blade: &mut Blade, frame: &[u8], port: &Port) -> Vec<u8> {
    let transfer = blade
        .prepare_transfer(frame, port)
        .expect("a plain transfer");
    let mut out = vec![0u8; 10000];
    let at = PreparedTransfer::DATA_OFFSET;
    let len = transfer.data_len();
    let offset = transfer.lba() * 512;
    let result = if transfer.is_write() {
        blade.device().write_at(&frame[at..at + len], offset, false)
    } else {
        blade.device().read_at(&mut out[at..at + len], offset)
    };
    let reply_len = blade.finish_transfer(&transfer, result, &mut out);
    out.truncate(reply_len);
    out
}

#[test]
fn prepared_transfers_answer_exactly_as_handle_does() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let (mut twin, _twin_dev, _twin_dir) = blade_with_device();
    let data = pattern(17 * 512, 3);
    let frames = [
        ata_frame(
            cmd::WRITE_EXT,
            ata_flags::EXTENDED | ata_flags::WRITE,
            17,
            40,
            &data,
        ),
        ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 17, 40, &[]),
        ata_frame(cmd::WRITE, ata_flags::WRITE, 2, 0xE000_0002, &data[..1024]),
        ata_frame(cmd::READ, 0, 2, 2, &[]),
        // The driver's probe: a read carrying trailing data.
        ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 2, 0, &[0u8; 1024]),
    ];
    for frame in &frames {
        let (_, expected) = ask(&mut twin, frame, &PORT_9000);
        assert_eq!(ask_prepared(&mut blade, frame, &PORT_9000), expected);
    }
    let (a, b) = (blade.stats(), twin.stats());
    assert_eq!(a.summary(), b.summary(), "counted as handle counts");
    assert_eq!(a.writes.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn failed_prepared_transfer_is_answered_with_abort() {
    let (mut blade, dev, _dir) = blade_with_device();
    dev.set_faults(FaultConfig {
        write_error: Some(FaultSpec::always(InjectedError::Eio)),
        ..Default::default()
    });
    let write = ata_frame(cmd::WRITE_EXT, 0x41, 1, 0, &[1u8; 512]);
    let reply = ask_prepared(&mut blade, &write, &PORT_1500);
    let repr = PacketRepr::parse(&Frame::new_checked(&reply[..]).unwrap()).unwrap();
    let ata = ata_of(&repr);
    assert_eq!(
        (ata.cmd_status, ata.err_feature),
        (status::DRDY | status::ERR, ata_error::ABRT)
    );
    assert_eq!(
        blade
            .stats()
            .ata_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn only_plain_permitted_in_range_transfers_are_prepared() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let read = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 2, 0, &[]);
    assert!(blade.prepare_transfer(&read, &PORT_1500).is_some());
    let last = (1 << 20) / 512 - 1;
    let mut refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "beyond the device",
            ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 2, last, &[]),
        ),
        (
            "more sectors than the frame carries",
            ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 3, 0, &[]),
        ),
        (
            "short write payload",
            ata_frame(cmd::WRITE_EXT, 0x41, 2, 0, &[0u8; 600]),
        ),
        (
            "no sectors",
            ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 0, 0, &[]),
        ),
        ("flush", ata_frame(cmd::FLUSH_CACHE_EXT, 0, 0, 0, &[])),
        ("identify", ata_frame(cmd::IDENTIFY, 0, 1, 0, &[])),
        ("config", config_frame(0, 3, ConfigCommand::Read, b"")),
        ("truncated", read[..30].to_vec()),
    ];
    let mut broadcast = read.clone();
    broadcast[16..19].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    refused.push(("broadcast", broadcast));
    let mut other_slot = read.clone();
    other_slot[18] = 4;
    refused.push(("another slot", other_slot));
    let mut version = read.clone();
    version[14] = 0x20;
    refused.push(("version 2", version));
    for (why, frame) in &refused {
        assert!(
            blade.prepare_transfer(frame, &PORT_1500).is_none(),
            "{why} was prepared"
        );
    }
    // Reserved by someone else: the reply is error 6, so not a plain transfer.
    ask(
        &mut blade,
        &reserve_frame(CLIENT, reserve::SET, &[OTHER]),
        &PORT_1500,
    );
    assert!(blade.prepare_transfer(&read, &PORT_1500).is_none());
    ask(
        &mut blade,
        &reserve_frame(CLIENT, reserve::FORCE_SET, &[CLIENT]),
        &PORT_1500,
    );
    assert!(blade.prepare_transfer(&read, &PORT_1500).is_some());
    // Masked out: dropped, so not a plain transfer either.
    ask(
        &mut blade,
        &mask_frame(mask::EDIT, &[(mask::DIR_ADD, OTHER)]),
        &PORT_1500,
    );
    assert!(blade.prepare_transfer(&read, &PORT_1500).is_none());
}

#[test]
fn network_triggered_logs_are_rate_limited_and_every_frame_counted() {
    let (mut blade, _dev, _dir) = blade_with_device();
    let mut bad_version = ata_frame(cmd::READ_EXT, ata_flags::EXTENDED, 1, 0, &[]);
    bad_version[14] = 0x20;
    let unknown = packet(PacketRepr {
        header: header(0, 3, Command::Unknown(9)),
        arg: ArgRepr::Unknown,
    });
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        ask(&mut blade, &bad_version, &PORT_1500);
        ask(&mut blade, &unknown, &PORT_1500);
    }
    // Every frame is counted exactly...
    let stats = blade.stats();
    assert_eq!(stats.errors(ErrorCode::UnsupportedVersion), 1000);
    assert_eq!(stats.errors(ErrorCode::UnrecognizedCommand), 1000);
    assert_eq!(
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        2000
    );
    // ...but at most 10 log lines per 5 s window get through (network() limiter).
    let windows = started.elapsed().as_secs() / 5 + 1;
    let logged = 2000 - blade.bad_frame_log.suppressed_total();
    assert!(
        logged <= 10 * windows,
        "{logged} log lines for 2000 bad frames in {windows} window(s)"
    );
}
