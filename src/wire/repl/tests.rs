//! Tests across message families: literal frames as on the wire, corruption, the default
//! payload limit, version negotiation, and the round trip of every message through
//! [`MessageRepr`] and the [`FrameDecoder`] (proptest), plus [`fuzz_parse`] on arbitrary bytes.

use super::*;
use proptest::prelude::*;
use std::fmt;

/// A Ping with cookie 0x0102030405060708, sequence 5, version 1, as on the wire.
const PING: [u8; 32] = [
    b'T', b'B', b'R', b'P', // magic
    0x00, 0x01, // version 1
    18,   // Ping
    0x00, // flags
    0x00, 0x00, 0x00, 0x08, // payload length
    0, 0, 0, 0, 0, 0, 0, 5, // sequence
    0x00, 0x00, 0x00, 0x00, // crc32c, filled in by `ping_bytes`
    1, 2, 3, 4, 5, 6, 7, 8, // cookie
];

pub(super) fn ping_bytes() -> Vec<u8> {
    let mut b = PING.to_vec();
    // crc32c over the header with a zero checksum field, then the payload.
    let crc = crc32c::crc32c(&b);
    b[20..24].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn parses_literal_ping() {
    let bytes = ping_bytes();
    let packet = Packet::new_checked(&bytes[..]).unwrap();
    assert_eq!(packet.msg_type(), MessageType::Ping);
    assert_eq!(packet.payload_len(), 8);
    assert_eq!(packet.seq(), 5);
    assert!(packet.verify_checksum());
    let repr = MessageRepr::parse(&packet).unwrap();
    assert_eq!(
        repr,
        MessageRepr {
            version: 1,
            seq: 5,
            message: Message::Ping(PingRepr {
                cookie: 0x0102_0304_0506_0708
            }),
        }
    );
    assert_eq!(repr.to_bytes(), bytes);
}

#[test]
fn emits_literal_write_data() {
    let repr = MessageRepr {
        version: 1,
        seq: 0x10,
        message: Message::WriteData(WriteDataRepr {
            id: 7,
            offset: 0x200,
            flags: WRITE_FUA,
            data: vec![0xab; 512],
        }),
    };
    let bytes = repr.to_bytes();
    assert_eq!(bytes.len(), 24 + 24 + 512);
    assert_eq!(&bytes[..12], b"TBRP\x00\x01\x09\x00\x00\x00\x02\x18");
    assert_eq!(&bytes[12..20], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
    assert_eq!(&bytes[24..32], &[0, 0, 0, 0, 0, 0, 0, 7]); // id
    assert_eq!(&bytes[32..40], &[0, 0, 0, 0, 0, 0, 2, 0]); // offset
    assert_eq!(&bytes[40..44], &[0, 0, 0, 1]); // FUA
    assert_eq!(&bytes[44..48], &[0, 0, 2, 0]); // 512 bytes
    assert!(bytes[48..].iter().all(|&b| b == 0xab));
}

#[test]
fn corrupt_message_is_refused() {
    let good = ping_bytes();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x10;
        let parsed = Packet::new_checked(&bad[..])
            .ok()
            .and_then(|p| MessageRepr::parse(&p).ok());
        assert!(parsed.is_none(), "flipping byte {i} was not detected");
        let mut d = FrameDecoder::new();
        d.feed(&bad);
        assert!(!matches!(d.next_message(), Ok(Some(_))), "byte {i}");
    }
}

#[test]
fn largest_write_fits_the_default_limit() {
    let repr = MessageRepr {
        version: 1,
        seq: 0,
        message: Message::WriteData(WriteDataRepr {
            id: 1,
            offset: 0,
            flags: 0,
            data: vec![1; MAX_DATA_LEN],
        }),
    };
    let mut d = FrameDecoder::new();
    d.feed(&repr.to_bytes());
    assert_eq!(d.next_message().unwrap(), Some(repr));
}

#[test]
fn negotiate_picks_highest_common_version() {
    assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
    assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
    assert_eq!(negotiate((2, 5), (1, 3)), Some(3));
    assert_eq!(negotiate((1, 2), (3, 4)), None);
    assert_eq!(negotiate((3, 1), (1, 3)), None);
    assert_eq!(negotiate((4, 4), (1, 9)), Some(4));
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{0,64}"
}

fn sectors(max: usize) -> impl Strategy<Value = Vec<u8>> {
    (0..=max).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n * 512))
}

fn pick<T: Copy + fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

fn message() -> impl Strategy<Value = Message> {
    let offset = (0u64..(1 << 40)).prop_map(|s| s * 512);
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<[u8; 32]>(), name()).prop_map(|(a, b, nonce, name)| {
            Message::Hello(HelloRepr {
                min_version: a.min(b),
                max_version: a.max(b),
                nonce,
                name,
            })
        }),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge(AuthChallengeRepr {
            algorithm: AUTH_HMAC_SHA256,
            nonce
        })),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse(AuthResponseRepr { mac })),
        Just(Message::AuthOk),
        Just(Message::AuthFail),
        Just(Message::SyncDone),
        any::<bool>().prop_map(Message::SyncPause),
        (any::<bool>(), any::<bool>()).prop_map(|(sender_is_source, full)| {
            Message::SyncStart(SyncStartRepr {
                sender_is_source,
                full,
            })
        }),
        (
            any::<u64>(),
            pick(ReplProtocol::ALL),
            pick(Durability::ALL),
            pick(Role::ALL),
            pick(DiskState::ALL),
            any::<u32>(),
            pick(ChecksumAlg::ALL)
        )
            .prop_map(
                |(size, protocol, durability, role, disk, max_write, checksum_alg)| {
                    Message::Parameters(ParametersRepr {
                        size,
                        protocol,
                        durability,
                        role,
                        disk,
                        max_write,
                        checksum_alg,
                    })
                }
            ),
        (any::<[u64; 5]>(), 0u64..8).prop_map(|(v, flags)| Message::Uuids(UuidsRepr {
            current: v[0],
            bitmap: v[1],
            history: [v[2], v[3]],
            dirty_bits: v[4],
            flags,
        })),
        any::<u64>().prop_map(Message::SyncUuid),
        (any::<u64>(), offset.clone(), 0u32..4, sectors(8)).prop_map(
            |(id, offset, flags, data)| Message::WriteData(WriteDataRepr {
                id,
                offset,
                flags,
                data
            })
        ),
        (any::<u64>(), pick(AckKind::ALL))
            .prop_map(|(id, kind)| Message::WriteAck(WriteAckRepr { id, kind })),
        any::<u64>().prop_map(|barrier| Message::Barrier(BarrierRepr { barrier })),
        (any::<u64>(), any::<bool>())
            .prop_map(|(barrier, stable)| Message::BarrierAck(BarrierAckRepr { barrier, stable })),
        (
            0u64..(1 << 50),
            proptest::collection::vec(any::<u8>(), 0..300),
            0u32..8,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(first_bit, bits, trim, last, raw)| {
                let count = (bits.len() as u32 * 8).saturating_sub(trim);
                let mut c = BitmapChunkRepr::new(first_bit, count, bits, last);
                c.encoding = if raw {
                    BitmapEncoding::Raw
                } else {
                    BitmapEncoding::Rle
                };
                Message::BitmapChunk(c)
            }),
        (
            any::<u64>(),
            offset.clone(),
            0u32..=2048,
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(id, offset, sectors, checksum)| Message::ResyncRequest(
                ResyncRequestRepr {
                    id,
                    offset,
                    len: sectors * 512,
                    checksum
                }
            )),
        (any::<u64>(), offset.clone(), sectors(8)).prop_map(|(id, offset, data)| {
            Message::ResyncData(ResyncDataRepr { id, offset, data })
        }),
        (any::<u64>(), offset.clone(), 0u32..=2048).prop_map(|(id, offset, sectors)| {
            Message::ChecksumRequest(ChecksumRequestRepr {
                id,
                offset,
                len: sectors * 512,
            })
        }),
        (
            any::<u64>(),
            offset.clone(),
            0u32..=2048,
            pick(ChecksumAlg::ALL),
            any::<u128>()
        )
            .prop_map(|(id, offset, sectors, alg, seed)| {
                let len = sectors * 512;
                let width_mask = u128::MAX >> (128 - 8 * alg.digest_len());
                let digests = (0..checksum_count(len) as u128)
                    .map(|i| seed.wrapping_mul(i + 1) & width_mask)
                    .collect();
                Message::Checksums(ChecksumsRepr {
                    id,
                    offset,
                    len,
                    alg,
                    digests,
                })
            }),
        (any::<u64>(), offset.clone(), 0u32..=2048).prop_map(|(id, offset, sectors)| {
            Message::ResyncZero(ResyncZeroRepr {
                id,
                offset,
                len: sectors * 512,
            })
        }),
        (any::<u64>(), offset, 0u32..=2048).prop_map(|(id, offset, sectors)| {
            Message::ResyncSkip(ResyncSkipRepr {
                id,
                offset,
                len: sectors * 512,
            })
        }),
        (pick(Role::ALL), pick(DiskState::ALL), pick(ConnState::ALL)).prop_map(
            |(role, disk, conn)| Message::StateChange(StateChangeRepr { role, disk, conn })
        ),
        any::<u64>().prop_map(|cookie| Message::Ping(PingRepr { cookie })),
        any::<u64>().prop_map(|cookie| Message::PingAck(PingRepr { cookie })),
        (pick(DisconnectReason::ALL), "\\PC{0,80}").prop_map(|(reason, message)| {
            Message::Disconnect(DisconnectRepr { reason, message })
        }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(version in any::<u16>(), seq in any::<u64>(), message in message()) {
        let repr = MessageRepr { version, seq, message };
        let bytes = repr.to_bytes();
        prop_assert_eq!(bytes.len(), repr.buffer_len());
        let parsed = MessageRepr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap();
        prop_assert_eq!(&parsed, &repr);
        // The streaming decoder agrees, however the bytes are split.
        let mut d = FrameDecoder::new();
        let cut = bytes.len() / 2;
        d.feed(&bytes[..cut]);
        if cut < HEADER_LEN + repr.message.buffer_len() {
            prop_assert_eq!(d.next_message().unwrap(), None);
        }
        d.feed(&bytes[cut..]);
        prop_assert_eq!(d.next_message().unwrap(), Some(repr));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzz_parse(&bytes);
    }

    #[test]
    fn framed_garbage_payloads_never_panic(t in 0u8..28, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = vec![0u8; HEADER_LEN + payload.len()];
        bytes[HEADER_LEN..].copy_from_slice(&payload);
        let mut p = Packet::new_unchecked(&mut bytes[..]);
        p.set_header(1, MessageType::from(t), payload.len() as u32, 0);
        p.fill_checksum();
        fuzz_parse(&bytes);
    }
}
