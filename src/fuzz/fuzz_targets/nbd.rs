//! Fuzzes the NBD wire parsers and the NBD server that answers a client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every parser must refuse or round-trip any bytes.
    twinblade::wire::nbd::fuzz_parse(data);
    // The server must answer, refuse or close on anything a client sends, and finish once the
    // client goes quiet: never panic, never stall.
    twinblade::export::nbd::fuzz_session(data);
});
