//! Fuzz target: see `ember::fuzzing::c_api`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::c_api(data));
