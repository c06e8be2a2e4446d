//! ARP over Ethernet for IPv4 (RFC 826), Ethernet header included: what a floating IP's
//! gratuitous announcements are made of, and what a test listener reads back.
//!
//! Layout (byte offsets within the Ethernet frame):
//!
//! ```text
//!  0..6   destination MAC        6..12  source MAC         12..14 ethertype 0x0806
//! 14..16  hardware type (1)     16..18 protocol type (0x0800)
//! 18      hardware len (6)      19     protocol len (4)    20..22 operation (1 request, 2 reply)
//! 22..28  sender MAC            28..32 sender IPv4
//! 32..38  target MAC            38..42 target IPv4
//! 42..60  padding up to the Ethernet minimum (emitted as zeros, ignored when parsing)
//! ```
//!
//! Only Ethernet/IPv4 ARP is parsed: other hardware or protocol types are refused, as are
//! operations other than request and reply.

use super::{need, Error, MacAddr};
use std::net::Ipv4Addr;

/// Ethertype of ARP frames.
pub const ETHERTYPE: u16 = 0x0806;
/// Hardware type of Ethernet.
pub const HARDWARE_ETHERNET: u16 = 1;
/// Protocol type of IPv4.
pub const PROTOCOL_IPV4: u16 = 0x0800;
/// Length of the Ethernet header plus an Ethernet/IPv4 ARP body.
pub const FRAME_LEN: usize = 42;
/// Shortest frame an Ethernet sender puts on the wire (without FCS); emitted frames are padded
/// to it, because not every driver pads short frames a raw socket hands it.
pub const MIN_FRAME_LEN: usize = 60;

/// Byte ranges of the frame.
mod field {
    use std::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const HARDWARE_TYPE: Range<usize> = 14..16;
    pub const PROTOCOL_TYPE: Range<usize> = 16..18;
    pub const HARDWARE_LEN: usize = 18;
    pub const PROTOCOL_LEN: usize = 19;
    pub const OPERATION: Range<usize> = 20..22;
    pub const SENDER_MAC: Range<usize> = 22..28;
    pub const SENDER_IP: Range<usize> = 28..32;
    pub const TARGET_MAC: Range<usize> = 32..38;
    pub const TARGET_IP: Range<usize> = 38..42;
}

fn read_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn read_ipv4(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

/// The ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// 1: who has the target IP?
    Request,
    /// 2: the sender IP is at the sender MAC.
    Reply,
}

impl Operation {
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Operation::Request => 1,
            Operation::Reply => 2,
        }
    }

    /// The operation of a wire code; `Malformed` for anything else.
    pub fn from_code(code: u16) -> Result<Operation, Error> {
        match code {
            1 => Ok(Operation::Request),
            2 => Ok(Operation::Reply),
            _ => Err(Error::Malformed { field: "operation" }),
        }
    }
}

/// A view of an Ethernet frame carrying ARP.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length. Accessors panic if it is too short: only
    /// for buffers we built ourselves.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that it holds an Ethernet/IPv4 ARP frame's bytes.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that the buffer holds the Ethernet header and an Ethernet/IPv4 ARP body
    /// (anything after it is padding).
    pub fn check_len(&self) -> Result<(), Error> {
        need(FRAME_LEN, self.buffer.as_ref().len())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Ethernet destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr::from_bytes(&self.bytes()[field::DST])
    }
    /// Ethernet source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr::from_bytes(&self.bytes()[field::SRC])
    }
    /// Ethertype.
    pub fn ethertype(&self) -> u16 {
        read_u16(&self.bytes()[field::ETHERTYPE])
    }
    /// ARP hardware type.
    pub fn hardware_type(&self) -> u16 {
        read_u16(&self.bytes()[field::HARDWARE_TYPE])
    }
    /// ARP protocol type.
    pub fn protocol_type(&self) -> u16 {
        read_u16(&self.bytes()[field::PROTOCOL_TYPE])
    }
    /// Hardware address length.
    pub fn hardware_len(&self) -> u8 {
        self.bytes()[field::HARDWARE_LEN]
    }
    /// Protocol address length.
    pub fn protocol_len(&self) -> u8 {
        self.bytes()[field::PROTOCOL_LEN]
    }
    /// Raw operation code.
    pub fn operation(&self) -> u16 {
        read_u16(&self.bytes()[field::OPERATION])
    }
    /// Sender hardware address.
    pub fn sender_mac(&self) -> MacAddr {
        MacAddr::from_bytes(&self.bytes()[field::SENDER_MAC])
    }
    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        read_ipv4(&self.bytes()[field::SENDER_IP])
    }
    /// Target hardware address.
    pub fn target_mac(&self) -> MacAddr {
        MacAddr::from_bytes(&self.bytes()[field::TARGET_MAC])
    }
    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        read_ipv4(&self.bytes()[field::TARGET_IP])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    fn set_u16(&mut self, range: std::ops::Range<usize>, value: u16) {
        self.bytes_mut()[range].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the Ethernet destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.bytes_mut()[field::DST].copy_from_slice(&mac.0);
    }
    /// Sets the Ethernet source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.bytes_mut()[field::SRC].copy_from_slice(&mac.0);
    }
    /// Sets the ethertype.
    pub fn set_ethertype(&mut self, value: u16) {
        self.set_u16(field::ETHERTYPE, value);
    }
    /// Sets the ARP hardware type.
    pub fn set_hardware_type(&mut self, value: u16) {
        self.set_u16(field::HARDWARE_TYPE, value);
    }
    /// Sets the ARP protocol type.
    pub fn set_protocol_type(&mut self, value: u16) {
        self.set_u16(field::PROTOCOL_TYPE, value);
    }
    /// Sets the hardware address length.
    pub fn set_hardware_len(&mut self, value: u8) {
        self.bytes_mut()[field::HARDWARE_LEN] = value;
    }
    /// Sets the protocol address length.
    pub fn set_protocol_len(&mut self, value: u8) {
        self.bytes_mut()[field::PROTOCOL_LEN] = value;
    }
    /// Sets the operation code.
    pub fn set_operation(&mut self, value: u16) {
        self.set_u16(field::OPERATION, value);
    }
    /// Sets the sender hardware address.
    pub fn set_sender_mac(&mut self, mac: MacAddr) {
        self.bytes_mut()[field::SENDER_MAC].copy_from_slice(&mac.0);
    }
    /// Sets the sender protocol address.
    pub fn set_sender_ip(&mut self, ip: Ipv4Addr) {
        self.bytes_mut()[field::SENDER_IP].copy_from_slice(&ip.octets());
    }
    /// Sets the target hardware address.
    pub fn set_target_mac(&mut self, mac: MacAddr) {
        self.bytes_mut()[field::TARGET_MAC].copy_from_slice(&mac.0);
    }
    /// Sets the target protocol address.
    pub fn set_target_ip(&mut self, ip: Ipv4Addr) {
        self.bytes_mut()[field::TARGET_IP].copy_from_slice(&ip.octets());
    }
}

/// The parsed meaning of an Ethernet/IPv4 ARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    /// Ethernet destination MAC.
    pub dst: MacAddr,
    /// Ethernet source MAC (for a floating IP: the resource's virtual MAC, which need not be
    /// the interface's own).
    pub src: MacAddr,
    /// Request or reply.
    pub operation: Operation,
    /// Sender hardware address: where the sender IP lives.
    pub sender_mac: MacAddr,
    /// Sender IPv4 address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target IPv4 address.
    pub target_ip: Ipv4Addr,
}

impl ArpRepr {
    /// A gratuitous ARP request announcing that `ip` lives at `mac`, broadcast from `mac`.
    ///
    /// Sender and target IP are both `ip`; the target MAC is zero, as RFC 5227 §3 asks for
    /// announcements (receivers ignore it in a request).
    pub fn gratuitous(ip: Ipv4Addr, mac: MacAddr) -> ArpRepr {
        ArpRepr {
            dst: MacAddr::BROADCAST,
            src: mac,
            operation: Operation::Request,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: MacAddr::default(),
            target_ip: ip,
        }
    }

    /// Whether this frame announces its sender's own address (sender IP == target IP), which
    /// is what makes neighbours update an existing entry without having asked.
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }

    /// Parses a checked frame. Refuses other ethertypes, hardware or protocol types, address
    /// lengths other than 6 and 4, and operations other than request and reply.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<ArpRepr, Error> {
        packet.check_len()?;
        if packet.ethertype() != ETHERTYPE {
            return Err(Error::Malformed { field: "ethertype" });
        }
        if packet.hardware_type() != HARDWARE_ETHERNET {
            return Err(Error::Malformed {
                field: "hardware type",
            });
        }
        if packet.protocol_type() != PROTOCOL_IPV4 {
            return Err(Error::Malformed {
                field: "protocol type",
            });
        }
        if packet.hardware_len() != 6 {
            return Err(Error::Malformed {
                field: "hardware length",
            });
        }
        if packet.protocol_len() != 4 {
            return Err(Error::Malformed {
                field: "protocol length",
            });
        }
        Ok(ArpRepr {
            dst: packet.dst(),
            src: packet.src(),
            operation: Operation::from_code(packet.operation())?,
            sender_mac: packet.sender_mac(),
            sender_ip: packet.sender_ip(),
            target_mac: packet.target_mac(),
            target_ip: packet.target_ip(),
        })
    }

    /// Bytes the emitted frame occupies: padded to the Ethernet minimum.
    pub const fn buffer_len(&self) -> usize {
        MIN_FRAME_LEN
    }

    /// Writes the frame into `packet`, zeroing everything after the ARP body.
    ///
    /// Panics if the buffer is shorter than [`FRAME_LEN`]; padding is written only as far as
    /// the buffer reaches.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_dst(self.dst);
        packet.set_src(self.src);
        packet.set_ethertype(ETHERTYPE);
        packet.set_hardware_type(HARDWARE_ETHERNET);
        packet.set_protocol_type(PROTOCOL_IPV4);
        packet.set_hardware_len(6);
        packet.set_protocol_len(4);
        packet.set_operation(self.operation.code());
        packet.set_sender_mac(self.sender_mac);
        packet.set_sender_ip(self.sender_ip);
        packet.set_target_mac(self.target_mac);
        packet.set_target_ip(self.target_ip);
        packet.bytes_mut()[FRAME_LEN..].fill(0);
    }

    /// The frame as a fresh [`buffer_len`](Self::buffer_len)-byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }
}

/// Parses arbitrary bytes and checks that whatever parses survives a round trip. For the
/// fuzz target and the property tests; panics only on a bug.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(packet) = Packet::new_checked(data) else {
        return;
    };
    if let Ok(repr) = ArpRepr::parse(&packet) {
        let bytes = repr.to_vec();
        let again = ArpRepr::parse(&Packet::new_checked(&bytes[..]).expect("emitted frame"))
            .expect("an emitted frame must parse");
        assert_eq!(again, repr, "round trip changed the frame");
        assert_eq!(
            &bytes[..FRAME_LEN],
            &data[..FRAME_LEN],
            "a parsed frame must re-emit byte for byte"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VMAC: MacAddr = MacAddr([0x02, 0x54, 0x42, 0x00, 0x00, 0x07]);

    /// A gratuitous request for 10.77.0.100 at 02:54:42:00:00:07, written out from the
    /// layout table.
    const GRATUITOUS: [u8; FRAME_LEN] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
        0x02, 0x54, 0x42, 0x00, 0x00, 0x07, // src
        0x08, 0x06, // ethertype
        0x00, 0x01, // hardware type: Ethernet
        0x08, 0x00, // protocol type: IPv4
        6, 4, // address lengths
        0x00, 0x01, // operation: request
        0x02, 0x54, 0x42, 0x00, 0x00, 0x07, // sender MAC
        10, 77, 0, 100, // sender IP
        0, 0, 0, 0, 0, 0, // target MAC
        10, 77, 0, 100, // target IP
    ];

    #[test]
    fn emits_the_documented_layout() {
        let bytes = ArpRepr::gratuitous(Ipv4Addr::new(10, 77, 0, 100), VMAC).to_vec();
        assert_eq!(bytes.len(), MIN_FRAME_LEN);
        assert_eq!(&bytes[..FRAME_LEN], &GRATUITOUS);
        assert!(bytes[FRAME_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn parses_literal_bytes_with_or_without_padding() {
        let want = ArpRepr::gratuitous(Ipv4Addr::new(10, 77, 0, 100), VMAC);
        let mut padded = GRATUITOUS.to_vec();
        padded.extend_from_slice(&[0xaa; 18]);
        for bytes in [&GRATUITOUS[..], &padded[..]] {
            let packet = Packet::new_checked(bytes).unwrap();
            let repr = ArpRepr::parse(&packet).unwrap();
            assert_eq!(repr, want);
            assert!(repr.is_gratuitous());
        }
    }

    #[test]
    fn refuses_malformed_frames() {
        let refused = |at: usize, value: u8, field: &'static str| {
            let mut bytes = GRATUITOUS;
            bytes[at] = value;
            assert_eq!(
                ArpRepr::parse(&Packet::new_unchecked(&bytes[..])),
                Err(Error::Malformed { field }),
                "{field}"
            );
        };
        refused(13, 0x35, "ethertype");
        refused(15, 6, "hardware type");
        refused(17, 0xdd, "protocol type");
        refused(18, 8, "hardware length");
        refused(19, 16, "protocol length");
        refused(21, 3, "operation");
        for len in 0..FRAME_LEN {
            assert_eq!(
                Packet::new_checked(&GRATUITOUS[..len]).err(),
                Some(Error::Truncated {
                    needed: FRAME_LEN,
                    have: len
                })
            );
        }
    }

    fn any_mac() -> impl Strategy<Value = MacAddr> {
        any::<[u8; 6]>().prop_map(MacAddr)
    }

    fn any_repr() -> impl Strategy<Value = ArpRepr> {
        (
            any_mac(),
            any_mac(),
            prop_oneof![Just(Operation::Request), Just(Operation::Reply)],
            any_mac(),
            any::<[u8; 4]>(),
            any_mac(),
            any::<[u8; 4]>(),
        )
            .prop_map(
                |(dst, src, operation, sender_mac, sender_ip, target_mac, target_ip)| ArpRepr {
                    dst,
                    src,
                    operation,
                    sender_mac,
                    sender_ip: sender_ip.into(),
                    target_mac,
                    target_ip: target_ip.into(),
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(repr in any_repr()) {
            let bytes = repr.to_vec();
            prop_assert_eq!(bytes.len(), repr.buffer_len());
            let parsed = ArpRepr::parse(&Packet::new_checked(&bytes[..]).unwrap());
            prop_assert_eq!(parsed, Ok(repr));
        }

        #[test]
        fn fuzz_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            fuzz_parse(&data);
        }

        #[test]
        fn fuzz_parse_survives_altered_frames(
            repr in any_repr(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            // Near-valid bytes get past the type checks far more often than random ones.
            let mut bytes = repr.to_vec();
            for (at, value) in edits {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            fuzz_parse(&bytes);
        }
    }
}
