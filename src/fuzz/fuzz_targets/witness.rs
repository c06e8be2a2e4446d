//! Fuzzes the witness datagram parser, its tag check and the witness's book of grants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Parsing must refuse or round-trip any bytes; the book read as claims from two nodes must
    // never give one generation to two of them, and must read back what it wrote.
    twinblade::wire::witness::fuzz_parse(data);
    twinblade::ha::witness::fuzz_book(data);
});
