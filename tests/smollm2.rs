//! The real default model, SmolLM2-135M-Instruct (`models/SmolLM2-135M-Instruct.Q4_1.gguf`,
//! fetched by `scripts/fetch-model`):
//!
//! - the Q4_1 GGUF, run on its quantized weights, against llama.cpp's greedy continuations
//!   and perplexity (`scripts/make_llamacpp_reference.py`);
//! - the GGUF converted by Ember to an F32 Hugging Face folder, against transformers' greedy
//!   continuations of the same weights (`scripts/make_smollm2_reference.py`).
//!
//! Without the model file the tests say SKIPPED, unless `EMBER_REQUIRE_MODEL=1` (set by CI),
//! which makes a missing model a failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ember::sampler::argmax;
use ember::tensor::DType;
use ember::{KvType, Model, Session, SessionOptions};
use serde_json::Value;

mod common;
use common::ids;

fn model_file() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("EMBER_REQUIRE_MODEL").is_some_and(|v| v == "1") {
        panic!("{} is missing: run scripts/fetch-model", path.display());
    }
    eprintln!("SKIPPED: no {} (run scripts/fetch-model)", path.display());
    None
}

fn session(model: Model) -> Session {
    session_kv(Arc::new(model), KvType::F32)
}

fn session_kv(model: Arc<Model>, kv_type: KvType) -> Session {
    let options = SessionOptions {
        n_ctx: 1024,
        n_threads: 2,
        ubatch: 64,
        kv_type,
    };
    Session::new(model, &options).unwrap()
}

/// Feeds each case of `reference` its prompt and then its own greedy tokens (so both sides
/// always see the same context), and checks that Ember's best token is the reference's at
/// every step where the reference's two best logits are at least `near_tie` apart (closer
/// calls are ties, not errors). Returns how many steps were compared.
fn check_greedy(session: &mut Session, reference: &Value, near_tie: f64, peer: &str) -> usize {
    let mut compared = 0;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (prompt, expected) = (ids(&case["prompt"]), ids(&case["generated"]));
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        session.reset();
        let mut next = argmax(session.step(&prompt).unwrap());
        for (i, &want) in expected.iter().enumerate() {
            if margins[i] >= near_tie {
                assert_eq!(next, want, "{name}: step {i} differs from {peer}");
                compared += 1;
            }
            next = argmax(session.step(&[want]).unwrap());
        }
    }
    eprintln!("{compared} greedy tokens equal to {peer}'s");
    compared
}

fn llama_cpp_reference() -> Value {
    serde_json::from_str(include_str!("reference/smollm2_q4_1_llamacpp.json")).unwrap()
}

#[test]
fn q4_1_greedy_continuations_match_llama_cpp() {
    let Some(path) = model_file() else { return };
    let model = Model::load(&path).unwrap();
    assert_eq!(model.weight_dtype(), "Q4_1");
    let mut session = session(model);
    // Both quantize activations to 8 bits per block, and round differently (llama.cpp keeps
    // scales and its key/value cache in f16): measured on the perplexity text, both sets of
    // logits are 0.14-0.15 (mean absolute) from the exact product of the dequantized weights,
    // and up to about 1.2 from each other. Calls closer than that are ties.
    let compared = check_greedy(&mut session, &llama_cpp_reference(), 1.25, "llama.cpp");
    assert!(compared >= 100, "only {compared} tokens compared");
}

#[test]
fn q4_1_perplexity_is_within_one_percent_of_llama_cpp() {
    let Some(path) = model_file() else { return };
    let model = Model::load(&path).unwrap();
    let reference = llama_cpp_reference();
    let tokens = ids(&reference["perplexity"]["tokens"]);
    let text = include_str!("reference/perplexity.txt");
    let ours = model
        .tokenizer()
        .unwrap()
        .encode(text, false, false)
        .unwrap();
    assert_eq!(
        ours, tokens,
        "the text tokenizes differently from llama.cpp"
    );
    let ppl = perplexity(&mut session(model), &tokens).0;
    let peer = reference["perplexity"]["value"].as_f64().unwrap();
    eprintln!(
        "perplexity over {} tokens: Ember {ppl:.4}, llama.cpp {peer:.4} ({:+.3}%)",
        tokens.len(),
        (ppl / peer - 1.0) * 100.0
    );
    assert!(
        (ppl / peer - 1.0).abs() < 0.01,
        "Ember {ppl}, llama.cpp {peer}"
    );
}

/// Perplexity of `tokens` from one pass over them, and every position's logits.
fn perplexity(session: &mut Session, tokens: &[u32]) -> (f64, Vec<f32>) {
    let vocab = session.model().n_vocab();
    let mut logits = vec![0.0; tokens.len() * vocab];
    session.step_all(tokens, &mut logits).unwrap();
    let mut nll = 0.0f64;
    for i in 1..tokens.len() {
        let row = &logits[(i - 1) * vocab..i * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        nll += max + sum.ln() - row[tokens[i] as usize] as f64;
    }
    ((nll / (tokens.len() - 1) as f64).exp(), logits)
}

/// Perplexity and logits of `tokens` with an f16 cache and with an f32 one: (f16 perplexity,
/// f32 perplexity, mean |difference| of the logits, max |difference|).
fn f16_against_f32(model: Arc<Model>, tokens: &[u32]) -> (f64, f64, f32, f32) {
    let (ppl16, logits16) = perplexity(&mut session_kv(model.clone(), KvType::F16), tokens);
    let (ppl32, logits32) = perplexity(&mut session_kv(model, KvType::F32), tokens);
    let diffs = logits16.iter().zip(&logits32).map(|(a, b)| (a - b).abs());
    let mean = diffs.clone().sum::<f32>() / logits16.len() as f32;
    let max = diffs.fold(0.0f32, f32::max);
    (ppl16, ppl32, mean, max)
}

#[test]
fn an_f16_kv_cache_keeps_greedy_parity_and_perplexity() {
    let Some(path) = model_file() else { return };
    let tokens = ids(&llama_cpp_reference()["perplexity"]["tokens"]);
    // Exact f32 weights: what rounding the cache to f16 alone changes.
    let exact = Arc::new(Model::load(converted_f32(&path)).unwrap());
    let (ppl16, ppl32, mean, max) = f16_against_f32(exact, &tokens);
    eprintln!(
        "F32 weights, f16 cache: perplexity {ppl16:.4} (f32 cache {ppl32:.4}), logits differ \
         by {mean:.5} mean, {max:.4} max"
    );
    assert!((ppl16 / ppl32 - 1.0).abs() < 1e-3, "{ppl16} vs {ppl32}");
    assert!(mean < 0.005 && max < 0.05, "mean {mean}, max {max}");
    // The Q4_1 file: its activations are quantized to 8 bits, whose rounding turns the small
    // changes into differences as large as the quantization's own (0.14-0.15 mean from exact).
    let model = Arc::new(Model::load(&path).unwrap());
    let (ppl16, ppl32, mean, max) = f16_against_f32(model.clone(), &tokens);
    eprintln!(
        "Q4_1 weights, f16 cache: perplexity {ppl16:.4} (f32 cache {ppl32:.4}), logits differ \
         by {mean:.5} mean, {max:.4} max"
    );
    assert!((ppl16 / ppl32 - 1.0).abs() < 5e-3, "{ppl16} vs {ppl32}");
    assert!(mean < 0.3, "mean {mean}, max {max}");
    // llama.cpp's own cache is f16: the same near-tie margin as for the f32 cache.
    let compared = check_greedy(
        &mut session_kv(model, KvType::F16),
        &llama_cpp_reference(),
        1.25,
        "llama.cpp",
    );
    assert!(compared >= 100, "only {compared} tokens compared");
}

/// The GGUF converted to an F32 folder by Ember, made once per test run.
fn converted_f32(gguf: &Path) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("SmolLM2-135M-Instruct-f32");
        ember::convert::gguf_to_hf_folder(gguf, &dir, DType::F32).unwrap();
        dir
    })
}

#[test]
fn converted_f32_folder_matches_transformers() {
    let Some(path) = model_file() else { return };
    let model = Model::load(converted_f32(&path)).unwrap();
    assert_eq!(model.weight_dtype(), "F32");
    let reference: Value =
        serde_json::from_str(include_str!("reference/smollm2_greedy.json")).unwrap();
    let mut session = session(model);
    // The same weights in f32 on both sides: only summation order differs.
    let compared = check_greedy(&mut session, &reference, 1e-3, "transformers");
    assert!(compared >= 180, "only {compared} tokens compared");
}
