//! Fuzzes the heartbeat datagram parser, its tag check and the replay window.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Parsing must refuse or round-trip any bytes (the resource entries too, re-emitted byte
    // for byte); verifying and the replay window must never panic, and the window must never
    // accept a (boot nonce, sequence) twice.
    twinblade::wire::heartbeat::fuzz_parse(data);
});
