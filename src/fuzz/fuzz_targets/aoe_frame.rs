//! Fuzzes the AoE frame parsers and the blade that answers frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use twinblade::block::NullDevice;
use twinblade::export::aoe::{Blade, BladeConfig, Port};
use twinblade::wire::MacAddr;

fuzz_target!(|data: &[u8]| {
    twinblade::wire::aoe::fuzz_parse(data);
    // The blade must answer (or drop) anything without panicking, at both MTUs.
    let device = Arc::new(NullDevice::new(1 << 20));
    let mut blade = Blade::new(BladeConfig::new(0, 3), device);
    let mut out = vec![0u8; 10000];
    for mtu in [1500, 9000] {
        let port = Port { mac: MacAddr([2, 0, 0, 0, 0, 3]), mtu };
        let _ = blade.handle(data, &port, &mut out);
    }
});
