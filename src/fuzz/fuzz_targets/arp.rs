//! Fuzzes the ARP frame parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Parsing must refuse or round-trip any bytes, re-emitting the ARP body byte for byte.
    twinblade::wire::arp::fuzz_parse(data);
});
