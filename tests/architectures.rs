//! Every architecture family against transformers and llama.cpp: the tiny random models of
//! `scripts/make_arch_fixtures.py`, as Hugging Face folders and as GGUF files made by
//! llama.cpp's converter, with inputs longer than their sliding windows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::{ChatMessage, Model, Session, SessionOptions, Tokenizer};
use safetensors::SafeTensors;

mod common;
use common::max_abs_diff;

/// Largest absolute logit difference accepted against transformers (F32 on both sides).
const TOLERANCE: f32 = 1e-4;

/// Fixture folder and the architecture Ember must report for it.
const FAMILIES: &[(&str, &str)] = &[
    ("qwen3", "qwen3"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3"),
    ("phi3", "phi3"),
    ("smollm3", "smollm3"),
    ("granite", "granite"),
    ("mistral", "llama"),
    ("llama32", "llama"),
];

/// Context of the sessions: longer than the 40 reference tokens, and than Phi-3's original
/// context of 32 (so its long LongRoPE factors apply, as they do in transformers for 40
/// tokens).
const N_CTX: usize = 64;

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/arch")
        .join(name)
}

/// The fixture's reference tensors.
struct Reference {
    tokens: Vec<u32>,
    /// `[tokens, vocab]` from transformers.
    logits: Vec<f32>,
    /// `[tokens, vocab]` from llama.cpp on the GGUF file.
    llamacpp: Vec<f32>,
    /// Phi-3: transformers' logits of the first tokens alone (short LongRoPE factors).
    short_logits: Option<Vec<f32>>,
    vocab: usize,
}

fn f32s(st: &SafeTensors, name: &str) -> Option<Vec<f32>> {
    let t = st.tensor(name).ok()?;
    Some(
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(folder(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tokens = st
        .tensor("tokens")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    Reference {
        tokens,
        vocab: st.tensor("logits").unwrap().shape()[1],
        logits: f32s(&st, "logits").unwrap(),
        llamacpp: f32s(&st, "llamacpp").unwrap(),
        short_logits: f32s(&st, "short_logits"),
    }
}

fn session(model: &Arc<Model>, n_ctx: usize, n_threads: usize) -> Session {
    let options = SessionOptions {
        n_ctx,
        n_threads,
        ..Default::default()
    };
    Session::new(model.clone(), &options).unwrap()
}

/// Every position's logits of one prompt.
fn all_logits(model: &Arc<Model>, tokens: &[u32], n_ctx: usize, n_threads: usize) -> Vec<f32> {
    let mut out = vec![0.0; tokens.len() * model.n_vocab()];
    session(model, n_ctx, n_threads)
        .step_all(tokens, &mut out)
        .unwrap();
    out
}

/// The logits of one token at a time (decode), for every position.
fn incremental_logits(model: &Arc<Model>, tokens: &[u32]) -> Vec<f32> {
    let mut s = session(model, N_CTX, 2);
    tokens
        .iter()
        .flat_map(|&t| s.step(&[t]).unwrap().to_vec())
        .collect()
}

#[test]
fn hugging_face_folders_match_transformers_in_prefill_and_decode() {
    for &(name, arch) in FAMILIES {
        let r = reference(name);
        let model = Arc::new(Model::load(folder(name)).unwrap());
        assert_eq!(model.config().architecture.name(), arch, "{name}");
        let prefill = all_logits(&model, &r.tokens, N_CTX, 2);
        let err_prefill = max_abs_diff(&prefill, &r.logits);
        let decode = incremental_logits(&model, &r.tokens);
        let err_decode = max_abs_diff(&decode, &r.logits);
        eprintln!("{name}: prefill {err_prefill:.2e}, decode {err_decode:.2e} from transformers");
        assert!(err_prefill < TOLERANCE, "{name} prefill: {err_prefill}");
        assert!(err_decode < TOLERANCE, "{name} decode: {err_decode}");
        for threads in [1, 3] {
            let other = all_logits(&model, &r.tokens, N_CTX, threads);
            assert!(
                other == prefill,
                "{name}: {threads} threads differ from 2 in some bit"
            );
        }
        if let Some(short) = &r.short_logits {
            // A session no longer than the original context uses the short factors.
            let n = short.len() / r.vocab;
            let logits = all_logits(&model, &r.tokens[..n], n, 2);
            let err = max_abs_diff(&logits, short);
            eprintln!("{name}: {n}-token context (short factors) {err:.2e} from transformers");
            assert!(err < TOLERANCE, "{name} short context: {err}");
        }
    }
}

#[test]
fn gguf_files_agree_with_llama_cpp_and_transformers() {
    for &(name, arch) in FAMILIES {
        let r = reference(name);
        let model = Arc::new(Model::load(folder(name).join("model.gguf")).unwrap());
        assert_eq!(model.config().architecture.name(), arch, "{name}");
        let logits = all_logits(&model, &r.tokens, N_CTX, 2);
        let vs_transformers = max_abs_diff(&logits, &r.logits);
        let vs_llamacpp = max_abs_diff(&logits, &r.llamacpp);
        let llamacpp_vs_transformers = max_abs_diff(&r.llamacpp, &r.logits);
        eprintln!(
            "{name}: Ember-GGUF vs transformers {vs_transformers:.2e}, vs llama.cpp \
             {vs_llamacpp:.2e}; llama.cpp vs transformers {llamacpp_vs_transformers:.2e}"
        );
        assert!(
            vs_transformers <= llamacpp_vs_transformers + TOLERANCE,
            "{name}: Ember on the GGUF file is further from transformers ({vs_transformers}) \
             than llama.cpp ({llamacpp_vs_transformers})"
        );
        if name == "mistral" {
            // llama.cpp's converter writes no sliding window for Mistral, so the file asks for
            // full attention: what llama.cpp computes.
            assert!(
                vs_llamacpp < TOLERANCE,
                "{name}: {vs_llamacpp} from llama.cpp"
            );
        } else {
            assert!(vs_transformers < TOLERANCE, "{name}: {vs_transformers}");
        }
    }
}

#[test]
fn gguf_tokenizers_and_chat_templates_match_the_hugging_face_ones() {
    for &(name, _) in FAMILIES {
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(folder(name).join("tokens.json")).unwrap(),
        )
        .unwrap();
        let encode = reference["encode"].as_object().unwrap();
        assert!(encode.len() >= 300, "{name}: {} texts", encode.len());
        let chat = &reference["chat"];
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let gguf = Model::load(folder(name).join("model.gguf")).unwrap();
        let hf = Tokenizer::from_hf_folder(&folder(name)).unwrap().unwrap();
        for (which, tok) in [("GGUF", gguf.tokenizer().unwrap()), ("HF", &hf)] {
            for (text, ids) in encode {
                assert_eq!(
                    tok.encode(text, true, true).unwrap(),
                    common::ids(ids),
                    "{name} {which} tokenizer, {text:?}"
                );
            }
            assert_eq!(
                tok.apply_chat_template(&messages, true).unwrap(),
                chat["text"].as_str().unwrap(),
                "{name} {which} chat template"
            );
            assert_eq!(
                tok.encode_chat(&messages, true, false).unwrap(),
                common::ids(&chat["ids"]),
                "{name} {which} chat ids"
            );
        }
    }
}

#[test]
fn a_sliding_window_is_not_the_context_length() {
    let model = Model::load(folder("mistral")).unwrap();
    let c = model.config();
    assert_eq!(c.max_position_embeddings, 128);
    assert!(c.layers.iter().all(|l| l.sliding_window == Some(8)));
}
