//! Fuzz target: see `ember::fuzzing::tokenizer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::tokenizer(data));
