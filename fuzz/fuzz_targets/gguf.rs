//! Fuzz target: see `ember::fuzzing::gguf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::gguf(data));
