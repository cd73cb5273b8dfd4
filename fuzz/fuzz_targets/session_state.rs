//! Fuzz target: see `ember::fuzzing::session_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::session_state(data));
