//! The engine against Hugging Face transformers: tiny random models and their reference
//! logits, made by `scripts/make_fixtures.py`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::{Error, Model, Session, SessionOptions};

mod common;
use common::max_abs_diff;
use safetensors::SafeTensors;

/// Largest absolute logit difference accepted against transformers (f32 arithmetic on the
/// same weights, whatever their storage dtype).
const TOLERANCE: f32 = 1e-4;

/// Hugging Face folders, and GGUF files of the same weights in llama.cpp's layout (made by
/// `scripts/make_gguf_fixtures.py`), which share their folder's reference.
const FIXTURES: [&str; 10] = [
    "llama",
    "llama-f16",
    "llama-bf16",
    "qwen2",
    "qwen2-bf16",
    "gpt2",
    "gpt2-f16",
    "gguf/llama.F32.gguf",
    "gguf/qwen2.F32.gguf",
    "gguf/gpt2.F32.gguf",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    tokens: Vec<u32>,
    logits: Vec<f32>, // [tokens, vocab]
    vocab: usize,
}

fn reference(name: &str) -> Reference {
    // "gguf/llama.F32.gguf" holds the weights of "llama".
    let folder = match name.strip_prefix("gguf/") {
        Some(file) => file.split('.').next().unwrap(),
        None => name,
    };
    let bytes = std::fs::read(fixture(folder).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tokens = st.tensor("tokens").unwrap();
    let tokens: Vec<u32> = tokens
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    let vocab = logits.shape()[1];
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Reference {
        tokens,
        logits,
        vocab,
    }
}

fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn session(model: &Arc<Model>, n_threads: usize, ubatch: usize) -> Session {
    Session::new(
        model.clone(),
        &SessionOptions {
            n_ctx: 0,
            n_threads,
            ubatch,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn all_position_logits_match_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        assert_eq!(model.n_vocab(), r.vocab);
        for ubatch in [64, 3] {
            let mut s = session(&model, 2, ubatch);
            let mut out = vec![0.0; r.tokens.len() * r.vocab];
            s.step_all(&r.tokens, &mut out).unwrap();
            let err = max_abs_diff(&out, &r.logits);
            eprintln!("{name} (ubatch {ubatch}): max abs error {err:.2e}");
            assert!(
                err < TOLERANCE,
                "{name} (ubatch {ubatch}): max abs error {err}"
            );
            // The last row is also what `step` reports.
            assert_eq!(s.logits(), &out[(r.tokens.len() - 1) * r.vocab..]);
        }
    }
}

#[test]
fn incremental_decoding_matches_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        let mut s = session(&model, 2, 64);
        let prompt = 8;
        let mut worst = 0.0f32;
        let logits = s.step(&r.tokens[..prompt]).unwrap().to_vec();
        worst = worst.max(max_abs_diff(
            &logits,
            &r.logits[(prompt - 1) * r.vocab..prompt * r.vocab],
        ));
        for i in prompt..r.tokens.len() {
            let logits = s.step(&r.tokens[i..i + 1]).unwrap();
            worst = worst.max(max_abs_diff(
                logits,
                &r.logits[i * r.vocab..(i + 1) * r.vocab],
            ));
        }
        assert!(worst < TOLERANCE, "{name}: max abs error {worst}");
        assert_eq!(s.position(), r.tokens.len());
    }
}

#[test]
fn results_are_bitwise_identical_for_any_thread_count() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        let run = |threads: usize| {
            let mut s = session(&model, threads, 5);
            let mut all = vec![0.0; 12 * r.vocab];
            s.step_all(&r.tokens[..12], &mut all).unwrap();
            for &t in &r.tokens[12..] {
                all.extend_from_slice(s.step(&[t]).unwrap());
            }
            all
        };
        let one = run(1);
        for threads in [2, 3, 4] {
            let other = run(threads);
            assert!(
                one.iter()
                    .zip(&other)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: {threads} threads differ from 1"
            );
        }
    }
}

#[test]
fn rewind_then_step_equals_a_fresh_session() {
    let r = reference("llama");
    let model = load("llama");
    let mut s = session(&model, 2, 64);
    s.step(&r.tokens[..15]).unwrap();
    s.rewind(6).unwrap();
    assert_eq!(s.position(), 6);
    // Different tokens after the rewind point overwrite the stale cache entries.
    let after_rewind = s.step(&r.tokens[10..14]).unwrap().to_vec();
    let mut fresh = session(&model, 2, 64);
    fresh.step(&r.tokens[..6]).unwrap();
    let expected = fresh.step(&r.tokens[10..14]).unwrap();
    assert_eq!(after_rewind, expected);
    assert!(matches!(s.rewind(11), Err(Error::InvalidArgument(_))));
    s.reset();
    assert_eq!(s.position(), 0);
}

#[test]
fn a_full_context_is_an_error_that_leaves_the_session_usable() {
    let r = reference("qwen2");
    let model = load("qwen2");
    let mut s = Session::new(
        model,
        &SessionOptions {
            n_ctx: 10,
            n_threads: 2,
            ubatch: 4,
            ..Default::default()
        },
    )
    .unwrap();
    s.step(&r.tokens[..8]).unwrap();
    let err = s.step(&r.tokens[8..11]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextFull {
                needed: 11,
                capacity: 10
            }
        ),
        "{err}"
    );
    assert_eq!(s.position(), 8);
    let logits = s.step(&r.tokens[8..10]).unwrap();
    let err = max_abs_diff(logits, &r.logits[9 * r.vocab..10 * r.vocab]);
    assert!(err < TOLERANCE, "after overflow: {err}");
    assert!(matches!(
        s.step(&r.tokens[10..11]),
        Err(Error::ContextFull { .. })
    ));
}

#[test]
fn bad_tokens_and_arguments_are_errors() {
    let model = load("gpt2");
    let mut s = session(&model, 1, 64);
    assert!(matches!(s.step(&[]), Err(Error::InvalidArgument(_))));
    assert!(matches!(s.step(&[3, 320]), Err(Error::InvalidArgument(_))));
    assert_eq!(s.position(), 0);
    let mut small = vec![0.0; 319];
    assert!(matches!(
        s.step_all(&[3], &mut small),
        Err(Error::BufferTooSmall { needed: 320 })
    ));
    assert!(Session::new(
        model.clone(),
        &SessionOptions {
            n_ctx: 65,
            n_threads: 1,
            ubatch: 8,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Session::new(
        model.clone(),
        &SessionOptions {
            n_ctx: 8,
            n_threads: 0,
            ubatch: 8,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Session::new(
        model,
        &SessionOptions {
            n_ctx: 8,
            n_threads: 1,
            ubatch: 0,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn a_cancel_with_no_step_running_reaches_no_later_step() {
    // The regression: a cancel that arrived after a step had ended cancelled the next one.
    let r = reference("llama");
    let model = load("llama");
    let mut s = session(&model, 2, 4);
    s.step(&r.tokens[..5]).unwrap();
    s.cancel_handle().cancel();
    let logits = s.step(&r.tokens[5..15]).unwrap();
    let err = max_abs_diff(logits, &r.logits[14 * r.vocab..15 * r.vocab]);
    assert!(err < TOLERANCE, "after an idle cancel: {err}");
    assert_eq!(s.position(), 15);
}

#[test]
fn cancelling_from_another_thread_stops_a_long_step() {
    let model = load("llama");
    let mut s = Session::new(
        model,
        &SessionOptions {
            n_ctx: 128,
            n_threads: 1,
            ubatch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let handle = s.cancel_handle();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let canceller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                handle.cancel();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    // A loaded machine may not run the canceller while a step is under way (a cancel between
    // steps reaches no step), so step until one lands, up to a bound.
    let tokens: Vec<u32> = (0..128).map(|i| i % 200).collect();
    let mut cancelled = false;
    for _ in 0..200 {
        s.reset();
        if matches!(s.step(&tokens), Err(Error::Cancelled)) {
            cancelled = true;
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    canceller.join().unwrap();
    assert!(cancelled, "no step was cancelled");
    assert_eq!(s.position(), 0);
    // Cancelled or not, the session computes the same logits afterwards.
    let r = reference("llama");
    let logits = s.step(&r.tokens).unwrap().to_vec();
    let n = r.tokens.len();
    let err = max_abs_diff(&logits, &r.logits[(n - 1) * r.vocab..n * r.vocab]);
    assert!(err < TOLERANCE, "after a cancelled step: {err}");
}

#[test]
fn the_position_advances_during_a_long_step_and_is_readable_from_another_thread() {
    let model = load("llama");
    let mut s = Session::new(
        model,
        &SessionOptions {
            n_ctx: 128,
            n_threads: 1,
            ubatch: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let watcher = s.cancel_handle();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                seen.insert(watcher.position());
                std::thread::yield_now();
            }
            seen
        })
    };
    let tokens: Vec<u32> = (0..128).map(|i| i % 200).collect();
    for _ in 0..20 {
        s.reset();
        s.step(&tokens).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let seen = seen.join().unwrap();
    // Positions strictly between 0 and 128, at micro-batch boundaries, were observed.
    let inner: Vec<usize> = seen.iter().copied().filter(|&p| p > 0 && p < 128).collect();
    assert!(!inner.is_empty(), "only saw {seen:?}");
    assert!(inner.iter().all(|p| p % 4 == 0), "{inner:?}");
}

#[test]
fn models_and_sessions_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send::<Session>();
}

// ---- Loading: every malformed input is a typed error, never a panic. ----

/// A scratch copy of a fixture folder that a test may damage.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn copy_of(name: &str, tag: &str) -> ScratchDir {
        let dir =
            std::env::temp_dir().join(format!("ember-test-{}-{name}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture(name).join(file), dir.join(file)).unwrap();
        }
        ScratchDir(dir)
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(path, json.to_string()).unwrap();
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(dir: &Path) -> Error {
    Model::load(dir).expect_err("loading should fail")
}

#[test]
fn missing_files_are_io_errors() {
    assert!(matches!(
        load_err(Path::new("/nonexistent/model")),
        Error::Io { .. }
    ));
    let d = ScratchDir::copy_of("llama", "missing");
    std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
    assert!(matches!(load_err(&d.0), Error::Io { .. }));
}

#[test]
fn truncated_and_corrupt_weights_are_format_errors() {
    let d = ScratchDir::copy_of("llama", "truncated");
    let path = d.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(
            matches!(load_err(&d.0), Error::BadFormat(_)),
            "cut at {cut}"
        );
    }
    let mut garbage = bytes.clone();
    garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &garbage).unwrap();
    assert!(matches!(load_err(&d.0), Error::BadFormat(_)));
    garbage[..8].copy_from_slice(&16u64.to_le_bytes());
    std::fs::write(&path, &garbage).unwrap();
    assert!(matches!(load_err(&d.0), Error::BadFormat(_)));
}

#[test]
fn shapes_that_disagree_with_the_config_are_named() {
    let d = ScratchDir::copy_of("llama", "shape");
    d.edit_config(|c| c["intermediate_size"] = 100.into());
    match load_err(&d.0) {
        Error::BadFormat(msg) => assert!(msg.contains("mlp.gate_proj.weight"), "{msg}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn bad_configs_are_rejected() {
    let d = ScratchDir::copy_of("llama", "config");
    std::fs::write(d.0.join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(&d.0), Error::BadFormat(_)));
    let d = ScratchDir::copy_of("llama", "arch");
    d.edit_config(|c| {
        c["architectures"] = serde_json::json!(["MambaForCausalLM"]);
        c["model_type"] = "mamba".into();
    });
    assert!(matches!(load_err(&d.0), Error::Unsupported(_)));
    let d = ScratchDir::copy_of("llama", "heads");
    d.edit_config(|c| c["num_key_value_heads"] = 3.into());
    assert!(matches!(load_err(&d.0), Error::BadFormat(_)));
    let d = ScratchDir::copy_of("gpt2", "gpt2-heads");
    d.edit_config(|c| c["n_head"] = 5.into()); // 36 is not a multiple of 5
    assert!(matches!(load_err(&d.0), Error::BadFormat(_)));
    let d = ScratchDir::copy_of("llama", "layers");
    d.edit_config(|c| c["num_hidden_layers"] = 3.into());
    match load_err(&d.0) {
        Error::BadFormat(msg) => assert!(msg.contains("model.layers.2"), "{msg}"),
        other => panic!("unexpected {other}"),
    }
    let d = ScratchDir::copy_of("llama", "unexpected");
    d.edit_config(|c| c["num_hidden_layers"] = 1.into());
    match load_err(&d.0) {
        Error::BadFormat(msg) => assert!(msg.contains("unexpected tensor model.layers.1"), "{msg}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn sharded_checkpoints_load() {
    // Split the llama fixture into two shards plus an index, as transformers does for big models.
    let d = ScratchDir::copy_of("llama", "sharded");
    let bytes = std::fs::read(d.0.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, &d.0.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(d.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let r = reference("llama");
    let model = Arc::new(Model::load(&d.0).unwrap());
    let logits = session(&model, 1, 64).step(&r.tokens).unwrap().to_vec();
    let err = max_abs_diff(&logits, &r.logits[(r.tokens.len() - 1) * r.vocab..]);
    assert!(err < TOLERANCE, "sharded: {err}");
}
