//! Fuzzes the on-disk meta-data: each parser (superblock, activity-log transaction, bitmap
//! page) on raw blocks, then a whole meta-data image with the input's edits attached.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    twinblade::wire::ondisk::fuzz_parse(data);
    twinblade::meta::store::fuzz_attach(data);
});
