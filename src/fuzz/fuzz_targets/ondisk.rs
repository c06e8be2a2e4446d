//! Fuzzes the on-disk meta-data parsers: superblock, activity-log transaction, bitmap page.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    twinblade::wire::ondisk::fuzz_parse(data);
});
