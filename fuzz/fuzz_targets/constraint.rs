//! Fuzz target: see `ember::fuzzing::constraint`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::constraint(data));
