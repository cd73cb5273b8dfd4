//! The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to F32 by
//! transformers), against transformers' greedy continuations.
//!
//! The folder is made by `scripts/make_smollm2_reference.py`; the test runs wherever it
//! exists (`models/SmolLM2-135M-Instruct-f32`, or the folder named by `EMBER_SMOLLM2_F32`).

use std::path::PathBuf;
use std::sync::Arc;

use ember::sampler::argmax;
use ember::{Model, Session, SessionOptions};

/// Below this top-2 logit margin in the reference, a different choice is a near-tie, not an
/// error: comparison stops there.
const NEAR_TIE: f64 = 1e-3;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("EMBER_SMOLLM2_F32")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct-f32")
        });
    dir.join("model.safetensors").is_file().then_some(dir)
}

#[test]
fn greedy_continuations_match_transformers() {
    let Some(dir) = model_dir() else {
        eprintln!("SKIPPED: no SmolLM2 F32 folder (run scripts/make_smollm2_reference.py)");
        return;
    };
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("reference/smollm2_greedy.json")).unwrap();
    let model = Arc::new(Model::load(&dir).unwrap());
    let mut session = Session::new(
        model,
        &SessionOptions {
            n_ctx: 512,
            n_threads: 2,
            ubatch: 64,
        },
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
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
            if margins[i] < NEAR_TIE {
                eprintln!("{name}: near-tie at step {i}, compared {i} tokens");
                break;
            }
            assert_eq!(next, want, "{name}: step {i} differs from transformers");
            next = argmax(session.step(&[want]).unwrap());
        }
    }
}
