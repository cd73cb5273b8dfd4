//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ember::Tokenizer;
use serde_json::Value;

/// The fixture folder of every architecture under tests/fixtures (safetensors with
/// transformers' references beside them).
pub const ARCH_FIXTURES: &[&str] = &[
    "llama",
    "qwen2",
    "gpt2",
    "arch/gemma2",
    "arch/gemma3",
    "arch/granite",
    "arch/llama32",
    "arch/mistral",
    "arch/phi3",
    "arch/qwen3",
    "arch/smollm3",
];

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `tests/fixtures/tokenizers`: the corpus, Hugging Face's reference ids and tokenizers.
pub fn tokenizer_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

/// A JSON file of `tests/fixtures/tokenizers`.
pub fn json(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(tokenizer_fixtures().join(file)).unwrap())
        .unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compares a tokenizer with a reference of reference.json on every corpus string: encoding
/// (special tokens parsed, special tokens literal, BOS/EOS added) and decoding. Returns the
/// number of strings that matched in every way.
pub fn compare_with_reference(tok: &Tokenizer, name: &str) -> usize {
    let corpus: Vec<String> = serde_json::from_value(json("corpus.json")).unwrap();
    assert!(corpus.len() >= 300, "corpus has {} strings", corpus.len());
    let reference = json("reference.json");
    let cases = reference[name].as_array().unwrap();
    assert_eq!(cases.len(), corpus.len());
    let mut failures = Vec::new();
    let mut matched = 0;
    for (text, case) in corpus.iter().zip(cases) {
        let (plain, literal, special) = (ids(&case[0]), ids(&case[1]), ids(&case[2]));
        let checks = [
            ("encode", tok.encode(text, false, true).unwrap() == plain),
            (
                "encode literal",
                tok.encode(text, false, false).unwrap() == literal,
            ),
            (
                "encode add_special",
                tok.encode(text, true, true).unwrap() == special,
            ),
            (
                "decode",
                tok.decode(&plain).unwrap() == case[3].as_str().unwrap(),
            ),
        ];
        let before = failures.len();
        for (what, ok) in checks {
            if !ok {
                failures.push(format!("{what} {text:?}"));
            }
        }
        if failures.len() == before {
            matched += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    matched
}
