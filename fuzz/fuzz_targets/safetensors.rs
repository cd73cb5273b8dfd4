//! Fuzz target: see `ember::fuzzing::safetensors`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::safetensors(data));
