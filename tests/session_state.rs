//! Saving and restoring sessions, forking them, their memory and their counters: a restored or
//! forked session continues with exactly (bitwise) the logits of the session it came from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::{Error, KvType, LoadOptions, Model, Session, SessionOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn session(model: &Arc<Model>, n_ctx: usize, n_threads: usize) -> Session {
    session_kv(model, n_ctx, n_threads, KvType::F32)
}

fn session_kv(model: &Arc<Model>, n_ctx: usize, n_threads: usize, kv_type: KvType) -> Session {
    Session::new(
        model.clone(),
        &SessionOptions {
            n_ctx,
            n_threads,
            ubatch: 4,
            kv_type,
        },
    )
    .unwrap()
}

/// Several model kinds: Llama (HF f32), a quantized GGUF, GPT-2, a sliding-window family.
const MODELS: [&str; 4] = [
    "llama",
    "gguf/llama.Q4_0.gguf",
    "gpt2",
    "arch/gemma3/model.gguf",
];

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Greedy continuation of `steps` tokens from the session's current logits, returning every
/// step's logits.
fn continue_greedy(s: &mut Session, steps: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut logits = s.logits().to_vec();
    for _ in 0..steps {
        let next = ember::sampler::argmax(&logits);
        logits = s.step(&[next]).unwrap().to_vec();
        out.push(logits.clone());
    }
    out
}

#[test]
fn a_loaded_state_continues_bitwise_as_the_saved_session() {
    for name in MODELS {
        let model = load(name);
        let vocab = model.n_vocab();
        let tokens = prompt(11, vocab);
        for kv in [KvType::F32, KvType::F16] {
            let mut original = session_kv(&model, 64, 2, kv);
            original.step(&tokens).unwrap();
            let state = original.save_state_to_vec().unwrap();
            assert_eq!(state.len(), original.state_size());
            let expected = continue_greedy(&mut original, 6);
            // Another thread count and context length.
            let mut restored = session_kv(&model, 32, 1, kv);
            restored.load_state(&state).unwrap();
            assert_eq!(restored.tokens(), &tokens[..], "{name}");
            assert_eq!(restored.position(), tokens.len());
            assert_eq!(continue_greedy(&mut restored, 6), expected, "{name} {kv:?}");
        }
    }
}

#[test]
fn an_f16_cache_halves_the_memory_and_stays_close_and_deterministic() {
    for name in MODELS {
        let model = load(name);
        let tokens = prompt(20, model.n_vocab());
        let run = |kv: KvType, threads: usize, prompt_at_once: bool| {
            let mut s = session_kv(&model, 64, threads, kv);
            let mut logits = Vec::new();
            if prompt_at_once {
                let mut all = vec![0.0; tokens.len() * model.n_vocab()];
                s.step_all(&tokens, &mut all).unwrap();
                logits = all;
            } else {
                for &t in &tokens {
                    logits.extend_from_slice(s.step(&[t]).unwrap());
                }
            }
            logits
        };
        let f16 = run(KvType::F16, 1, true);
        // Bitwise: any thread count, decode = prompt.
        assert_eq!(run(KvType::F16, 3, true), f16, "{name}: threads");
        assert_eq!(
            run(KvType::F16, 2, false),
            f16,
            "{name}: one token at a time"
        );
        // Close to the exact cache: keys and values rounded to 11 significant bits.
        let f32 = run(KvType::F32, 1, true);
        let scale = f32.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = f32
            .iter()
            .zip(&f16)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let mean_diff = f32
            .iter()
            .zip(&f16)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / f32.len() as f32;
        // Quantized weights take quantized activations, whose rounding amplifies the small
        // differences (measured: max 6.5e-4 of the largest logit for f32 weights, 2.3e-2 for
        // Q4_0).
        let bound = if name.contains("Q4_0") { 5e-2 } else { 1e-3 } * scale;
        assert!(
            max_diff > 0.0 && max_diff < bound && mean_diff < bound / 5.0,
            "{name}: max |f16 - f32| {max_diff}, mean {mean_diff} (largest logit {scale})"
        );
        let bytes = |kv_type| {
            session_kv(&model, 64, 1, kv_type).memory_bytes()
                - Session::memory_estimate(
                    &model,
                    &SessionOptions {
                        n_ctx: 64,
                        n_threads: 1,
                        ubatch: 4,
                        kv_type,
                    },
                )
                .unwrap()
        };
        assert_eq!((bytes(KvType::F32), bytes(KvType::F16)), (0, 0));
        let c = model.config();
        let cache = |kv: KvType| 2 * c.n_layers * 64 * c.kv_dim() * kv.bytes();
        assert_eq!(
            session_kv(&model, 64, 1, KvType::F32).memory_bytes()
                - session_kv(&model, 64, 1, KvType::F16).memory_bytes(),
            cache(KvType::F32) - cache(KvType::F16),
            "{name}"
        );
    }
}

#[test]
fn caches_of_different_types_do_not_mix() {
    let model = load("llama");
    let tokens = prompt(7, model.n_vocab());
    let mut f32 = session_kv(&model, 32, 1, KvType::F32);
    let mut f16 = session_kv(&model, 32, 1, KvType::F16);
    f32.step(&tokens).unwrap();
    f16.step(&tokens[..3]).unwrap();
    let f16_logits = f16.logits().to_vec();
    let state = f32.save_state_to_vec().unwrap();
    let err = f16.load_state(&state).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("f32") && m.contains("f16")),
        "{err}"
    );
    let err = f16.copy_prefix(&f32, 5).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = f32
        .fork(&SessionOptions {
            kv_type: KvType::F16,
            ..f32.options()
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // Nothing changed.
    assert_eq!(f16.tokens(), &tokens[..3]);
    assert_eq!(f16.logits(), &f16_logits[..]);
    let fork = f16.fork(&f16.options()).unwrap();
    assert_eq!((fork.kv_type(), fork.tokens()), (KvType::F16, &tokens[..3]));
}

#[test]
fn pending_and_rewound_sessions_save_what_they_hold() {
    let model = load("gguf/llama.Q4_0.gguf");
    let tokens = prompt(9, model.n_vocab());
    // A pending token (as a generation leaves its last one).
    let mut a = session(&model, 64, 2);
    a.step(&tokens[..8]).unwrap();
    a.push_pending(tokens[8]).unwrap();
    let state = a.save_state_to_vec().unwrap();
    let mut b = session(&model, 64, 2);
    b.load_state(&state).unwrap();
    assert_eq!(b.tokens(), &tokens[..]);
    assert_eq!(b.n_pending(), 1);
    assert_eq!(
        b.step(&[5]).unwrap(),
        a.step(&[5]).unwrap(),
        "pending token computed on the next step"
    );
    // Rewound: the last token's logits are gone, so it is saved as pending and recomputed.
    let mut c = session(&model, 64, 2);
    c.step(&tokens).unwrap();
    c.rewind(6).unwrap();
    let state = c.save_state_to_vec().unwrap();
    let mut d = session(&model, 64, 1);
    d.load_state(&state).unwrap();
    assert_eq!((d.position(), d.n_pending()), (6, 1));
    let mut fresh = session(&model, 64, 1);
    let expected = fresh.step(&tokens[..7]).unwrap().to_vec();
    assert_eq!(d.step(&tokens[6..7]).unwrap(), &expected[..]);
    // Empty sessions round-trip too.
    let empty = session(&model, 64, 1).save_state_to_vec().unwrap();
    d.load_state(&empty).unwrap();
    assert_eq!(d.position(), 0);
}

#[test]
fn the_state_holds_only_the_tokens_it_has() {
    let model = load("llama");
    let c = model.config();
    let per_token = 4 + 2 * c.n_layers * c.kv_dim() * 4;
    let mut s = session(&model, 0, 1);
    s.step(&prompt(10, model.n_vocab())).unwrap();
    let ten = s.state_size();
    s.step(&prompt(5, model.n_vocab())).unwrap();
    assert_eq!(s.state_size() - ten, 5 * per_token);
    assert!(ten < 10 * per_token + 4 * model.n_vocab() + 128, "{ten}");
}

#[test]
fn bad_states_are_errors_that_leave_the_session_as_it_was() {
    let model = load("gguf/llama.Q4_0.gguf");
    let other = load("qwen2");
    let tokens = prompt(12, model.n_vocab());
    let mut source = session(&model, 64, 1);
    source.step(&tokens).unwrap();
    let state = source.save_state_to_vec().unwrap();

    let mut target = session(&model, 64, 1);
    target.step(&tokens[..3]).unwrap();
    let before = target.tokens().to_vec();
    let check_unchanged = |target: &mut Session, what: &str| {
        assert_eq!(target.tokens(), &before[..], "{what}");
        let mut fresh = session(&model, 64, 1);
        let expected = fresh.step(&[&before[..], &[7]].concat()).unwrap().to_vec();
        assert_eq!(target.step(&[7]).unwrap(), &expected[..], "{what}");
        target.rewind(before.len()).unwrap();
    };
    // Truncations at every length of the header, and throughout the body.
    for len in (0..state.len()).step_by(97).chain(0..80) {
        let err = target.load_state(&state[..len]).unwrap_err();
        assert!(matches!(err, Error::BadFormat(_)), "{len}: {err}");
        check_unchanged(&mut target, "truncated");
    }
    // A flipped bit anywhere.
    for at in (0..state.len()).step_by(state.len() / 50) {
        let mut bad = state.clone();
        bad[at] ^= 0x10;
        let err = target.load_state(&bad).unwrap_err();
        assert!(
            matches!(err, Error::BadFormat(_) | Error::Unsupported(_)),
            "{at}: {err}"
        );
        check_unchanged(&mut target, "corrupted");
    }
    // Another model's state.
    let mut q = session(&other, 64, 1);
    q.step(&[1, 2, 3]).unwrap();
    let err = target
        .load_state(&q.save_state_to_vec().unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("another model"), "{err}");
    check_unchanged(&mut target, "other model");
    // A context too small for the tokens.
    let mut small = session(&model, 8, 1);
    small.step(&[1]).unwrap();
    let err = small.load_state(&state).unwrap_err();
    assert!(matches!(err, Error::ContextFull { .. }), "{err}");
    assert_eq!(small.tokens(), &[1]);
    // The same weights loaded with other options make other caches: refused.
    let requantized = Arc::new(
        Model::load_with(
            fixture("llama"),
            &LoadOptions {
                quantize_q8_0: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert_ne!(requantized.fingerprint(), load("llama").fingerprint());
    assert_eq!(
        load("gguf/llama.Q4_0.gguf").fingerprint(),
        model.fingerprint()
    );
}

#[test]
fn forks_and_copied_prefixes_continue_as_recomputed_sessions() {
    for name in MODELS {
        let model = load(name);
        let vocab = model.n_vocab();
        let system = prompt(13, vocab);
        let mut base = session(&model, 64, 2);
        base.step(&system).unwrap();
        for (i, own) in [[3u32, 4], [5, 6], [7, 8]].iter().enumerate() {
            let options = SessionOptions {
                n_ctx: 48,
                n_threads: 1 + i % 2,
                ubatch: 4,
                ..Default::default()
            };
            let mut npc = base.fork(&options).unwrap();
            assert_eq!(npc.tokens(), &system[..]);
            assert_eq!(npc.logits(), base.logits(), "{name}: fork keeps the logits");
            assert_eq!(npc.current_logits(), base.current_logits());
            assert!(npc.current_logits().is_some());
            let mut fresh = Session::new(model.clone(), &options).unwrap();
            let expected = fresh.step(&[&system[..], &own[..]].concat()).unwrap();
            assert_eq!(npc.step(own).unwrap(), expected, "{name}");
        }
        // A prefix shorter than the source: its last token is recomputed.
        let mut part = session(&model, 64, 1);
        part.step(&[9, 9, 9]).unwrap();
        part.copy_prefix(&base, 7).unwrap();
        assert_eq!((part.tokens(), part.n_pending()), (&system[..7], 1));
        assert!(part.current_logits().is_none());
        let mut fresh = session(&model, 64, 1);
        let expected = fresh.step(&system[..8]).unwrap().to_vec();
        assert_eq!(part.step(&system[7..8]).unwrap(), &expected[..], "{name}");
        // Errors leave the destination as it was.
        let before = part.tokens().to_vec();
        assert!(part.copy_prefix(&base, 14).is_err());
        let mut tiny = session(&model, 4, 1);
        assert!(matches!(
            tiny.copy_prefix(&base, 13),
            Err(Error::ContextFull { .. })
        ));
        assert_eq!(part.tokens(), &before[..]);
        assert!(base
            .fork(&SessionOptions {
                n_ctx: 8,
                ..Default::default()
            })
            .is_err());
    }
    let llama = load("llama");
    let mut a = session(&llama, 16, 1);
    a.step(&[1, 2]).unwrap();
    let mut b = session(&load("qwen2"), 16, 1);
    assert!(b.copy_prefix(&a, 2).is_err(), "different models");
}

#[test]
fn the_memory_estimate_is_what_a_session_allocates() {
    for name in MODELS.iter().chain(&["qwen2", "arch/phi3/model.gguf"]) {
        let model = load(name);
        for (n_ctx, n_threads, ubatch, kv_type) in [
            (0, 1, 64, KvType::F32),
            (37, 2, 5, KvType::F16),
            (60, 3, 128, KvType::F32),
        ] {
            let options = SessionOptions {
                n_ctx,
                n_threads,
                ubatch,
                kv_type,
            };
            let estimate = Session::memory_estimate(&model, &options).unwrap();
            let s = Session::new(model.clone(), &options).unwrap();
            assert_eq!(
                estimate,
                s.memory_bytes(),
                "{name} {n_ctx} {n_threads} {ubatch}"
            );
        }
        let too_long = SessionOptions {
            n_ctx: 1 << 30,
            ..Default::default()
        };
        assert!(Session::memory_estimate(&model, &too_long).is_err());
    }
}

#[test]
fn perf_counts_prompt_and_generated_tokens() {
    let model = load("llama");
    let mut s = session(&model, 64, 1);
    s.step(&[1, 2, 3, 4, 5]).unwrap();
    let p = s.perf();
    assert_eq!((p.last.prompt_tokens, p.last.generated_tokens), (5, 0));
    assert!(p.last.prompt_seconds > 0.0);
    s.step(&[6]).unwrap();
    let p = s.perf();
    assert_eq!((p.last.prompt_tokens, p.last.generated_tokens), (0, 1));
    assert_eq!((p.total.prompt_tokens, p.total.generated_tokens), (5, 1));
    let mut sampler = ember::Sampler::new(Default::default()).unwrap();
    let options = ember::GenerateOptions {
        max_tokens: 4,
        ignore_end_tokens: true,
        ..Default::default()
    };
    let g = ember::generate(&mut s, &mut sampler, &[7, 8, 9], &options, &mut |_| true).unwrap();
    let p = s.perf();
    assert_eq!(
        (p.last.prompt_tokens, p.last.generated_tokens),
        (3, g.n_tokens as u64)
    );
    assert_eq!(p.total.prompt_tokens, 8);
    // The failed step records nothing.
    assert!(s.step(&[u32::MAX]).is_err());
    assert_eq!(s.perf(), p);
}

#[test]
fn gguf_bytes_load_in_place_and_from_inside_a_larger_file() {
    let path = fixture("gguf/llama.Q4_0.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let tokens = [1u32, 5, 9, 2];
    let expected = session(&load("gguf/llama.Q4_0.gguf"), 16, 1)
        .step(&tokens)
        .unwrap()
        .to_vec();
    // SAFETY: `bytes` outlives the model and its session (both dropped in this block).
    let model = unsafe { Model::load_gguf_unowned(&bytes, "test", &LoadOptions::default()) };
    let model = Arc::new(model.unwrap());
    assert_eq!(session(&model, 16, 1).step(&tokens).unwrap(), &expected[..]);
    drop(model);

    // The file inside another one, at an offset that is not a page multiple.
    let dir = std::env::temp_dir().join(format!("ember-embedded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let packed = dir.join("assets.bin");
    let head = vec![0xabu8; 4096 + 32];
    std::fs::write(&packed, [&head[..], &bytes[..], b"trailing data"].concat()).unwrap();
    let file = std::fs::File::open(&packed).unwrap();
    let offset = head.len() as u64;
    let options = LoadOptions::default();
    let model = Model::load_gguf_in_file(&file, offset, bytes.len() as u64, &options).unwrap();
    drop(file);
    let model = Arc::new(model);
    assert_eq!(session(&model, 16, 1).step(&tokens).unwrap(), &expected[..]);
    let file = std::fs::File::open(&packed).unwrap();
    let total = std::fs::metadata(&packed).unwrap().len();
    for (offset, len) in [(total, 0), (offset, total), (total + 1, 1), (u64::MAX, 2)] {
        let err = Model::load_gguf_in_file(&file, offset, len, &options).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{offset} {len}: {err}"
        );
    }
    // Trailing bytes after the GGUF data are tolerated only inside the given length.
    assert!(Model::load_gguf_in_file(&file, offset, 100, &options).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn caches_of_longrope_sessions_move_only_between_contexts_with_the_same_rotation() {
    // Phi-3's LongRoPE rotates keys by its long factors once the context passes the original
    // length (32 here), by its short factors below: those caches are not interchangeable.
    let dir = std::env::temp_dir().join(format!("ember-longrope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("arch/phi3");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({
        "type": "longrope", "short_factor": [1.0, 1.0, 1.0], "long_factor": [2.0, 3.0, 4.0]
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let model = Arc::new(Model::load(&dir).unwrap());
    let tokens = prompt(10, model.n_vocab());
    let mut long = session(&model, 64, 1);
    long.step(&tokens).unwrap();
    let state = long.save_state_to_vec().unwrap();
    let expected = long.step(&[3]).unwrap().to_vec();
    let mut also_long = session(&model, 48, 2);
    also_long.load_state(&state).unwrap();
    assert_eq!(also_long.step(&[3]).unwrap(), &expected[..]);
    let mut short = session(&model, 16, 1);
    let err = short.load_state(&state).unwrap_err();
    assert!(err.to_string().contains("rotated"), "{err}");
    assert!(short.copy_prefix(&long, 5).is_err());
    assert_eq!(short.position(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
