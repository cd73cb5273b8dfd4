//! Fuzz target: see `ember::fuzzing::chat_template`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember::fuzzing::chat_template(data));
