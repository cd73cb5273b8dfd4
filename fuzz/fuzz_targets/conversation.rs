//! Fuzz target: see `ember::fuzzing::conversation`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::conversation(data));
