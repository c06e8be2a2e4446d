//! Fuzzes the replication protocol parsers and the streaming frame decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every parser must refuse or round-trip any bytes, whole or split across reads.
    twinblade::wire::repl::fuzz_parse(data);
});
