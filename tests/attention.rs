//! Attention capture against transformers' `output_attentions=True` (eager attention), on the
//! tiny fixture of every architecture: `scripts/make_attention_reference.py` wrote the weights.

use std::sync::Arc;

use ember::{AttentionSelection, Error, KvType, Model, Session, SessionOptions};
use safetensors::SafeTensors;

mod common;
use common::{fixture as folder, ARCH_FIXTURES as FOLDERS};

/// Largest absolute difference accepted against transformers' weights (F32 on both sides).
const TOLERANCE: f32 = 1e-5;

/// Context of the sessions: more than the 40 tokens of the largest fixtures, and more than
/// Phi-3's original context of 32, so its long RoPE factors apply as in transformers.
const N_CTX: usize = 64;

/// The fixture's tokens and transformers' weights `[layers, heads, T, T]`.
struct Reference {
    tokens: Vec<u32>,
    weights: Vec<f32>,
    layers: usize,
    heads: usize,
}

impl Reference {
    fn load(name: &str) -> Reference {
        let bytes = std::fs::read(folder(name).join("reference.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tokens = st.tensor("tokens").unwrap().data().chunks_exact(8);
        let tokens = tokens
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let bytes = std::fs::read(folder(name).join("attention.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("attentions").unwrap();
        let shape = t.shape().to_vec();
        let weights = t.data().chunks_exact(4);
        Reference {
            tokens,
            weights: weights
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            layers: shape[0],
            heads: shape[1],
        }
    }

    /// The weights query `q` of (layer, head) gives keys `0..n`.
    fn row(&self, layer: usize, head: usize, q: usize, n: usize) -> &[f32] {
        let t = self.tokens.len();
        let start = ((layer * self.heads + head) * t + q) * t;
        &self.weights[start..start + n]
    }
}

fn session(model: &Arc<Model>, n_threads: usize, ubatch: usize, kv_type: KvType) -> Session {
    let options = SessionOptions {
        n_ctx: N_CTX,
        n_threads,
        ubatch,
        kv_type,
    };
    Session::new(model.clone(), &options).unwrap()
}

fn every_head(max_queries: usize) -> AttentionSelection {
    AttentionSelection {
        layers: vec![],
        heads: vec![],
        max_queries,
    }
}

/// Checks the captured rows of every (layer, head) against the reference rows of queries
/// `q0..q0 + n_queries` over `n_positions` keys; returns the largest difference.
fn compare(s: &Session, r: &Reference, name: &str, q0: usize, tolerance: f32) -> f32 {
    let mut worst = 0f32;
    for layer in 0..r.layers {
        for head in 0..r.heads {
            let rows = s.attention(layer, head).unwrap();
            assert_eq!(rows.n_positions - rows.n_queries, q0, "{name}");
            for i in 0..rows.n_queries {
                let (ours, theirs) = (rows.row(i), r.row(layer, head, q0 + i, rows.n_positions));
                let sum: f64 = ours.iter().map(|&w| w as f64).sum();
                assert!(
                    (sum - 1.0).abs() < 1e-5,
                    "{name} {layer}/{head}: sums to {sum}"
                );
                for (k, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                    // Masked keys (later, or outside a sliding window) are exactly 0.
                    if k > q0 + i || b == 0.0 {
                        assert_eq!(a, 0.0, "{name} {layer}/{head} query {} key {k}", q0 + i);
                    }
                    worst = worst.max((a - b).abs());
                }
            }
        }
    }
    assert!(worst < tolerance, "{name}: {worst} from transformers");
    worst
}

#[test]
fn weights_match_transformers_for_a_prefill_and_the_steps_after_it() {
    for &name in FOLDERS {
        let r = Reference::load(name);
        let model = Arc::new(Model::load(folder(name)).unwrap());
        assert_eq!(model.config().n_heads, r.heads, "{name}");
        // Micro-batches of 16: the prefill spans several, as a long prompt does.
        let mut s = session(&model, 2, 16, KvType::F32);
        s.capture_attention(Some(&every_head(N_CTX))).unwrap();
        let n_prefill = r.tokens.len() * 3 / 4;
        s.step(&r.tokens[..n_prefill]).unwrap();
        let prefill = compare(&s, &r, name, 0, TOLERANCE);
        let mut steps = 0f32;
        for q in n_prefill..r.tokens.len() {
            s.step(&r.tokens[q..q + 1]).unwrap();
            steps = steps.max(compare(&s, &r, name, q, TOLERANCE));
        }
        eprintln!("{name}: prefill {prefill:.1e}, single steps {steps:.1e} from transformers");
    }
}

#[test]
fn an_f16_cache_gives_weights_close_to_transformers() {
    for &name in &["llama", "arch/gemma2"] {
        let r = Reference::load(name);
        let model = Arc::new(Model::load(folder(name)).unwrap());
        let mut s = session(&model, 2, 16, KvType::F16);
        s.capture_attention(Some(&every_head(N_CTX))).unwrap();
        s.step(&r.tokens).unwrap();
        let err = compare(&s, &r, name, 0, 2e-3);
        eprintln!("{name}: f16 cache {err:.1e} from transformers");
    }
}

#[test]
fn a_capture_keeps_the_chosen_heads_and_last_queries_and_changes_no_logit() {
    let r = Reference::load("arch/gemma3");
    let model = Arc::new(Model::load(folder("arch/gemma3")).unwrap());
    let mut plain = session(&model, 2, 7, KvType::F32);
    let expected = plain.step(&r.tokens).unwrap().to_vec();
    let before = plain.memory_bytes();

    let mut s = session(&model, 2, 7, KvType::F32);
    let selection = AttentionSelection {
        layers: vec![5, 1, 5],
        heads: vec![2],
        max_queries: 3,
    };
    let bytes = s.capture_attention(Some(&selection)).unwrap();
    assert_eq!(
        bytes,
        2 * 3 * N_CTX * 4,
        "2 layers, 1 head, 3 rows of n_ctx"
    );
    assert_eq!(s.memory_bytes(), before + bytes);
    assert_eq!(
        Session::attention_capture_bytes(&model, N_CTX, &selection).unwrap(),
        bytes
    );
    assert_eq!(s.attention_selection().unwrap().layers, vec![1, 5]);
    let logits = s.step(&r.tokens).unwrap().to_vec();
    assert!(logits == expected, "capturing changed the logits");

    let t = r.tokens.len();
    for layer in [1, 5] {
        let rows = s.attention(layer, 2).unwrap();
        assert_eq!((rows.n_queries, rows.n_positions), (3, t));
        for i in 0..3 {
            let theirs = r.row(layer, 2, t - 3 + i, t);
            let err = rows
                .row(i)
                .iter()
                .zip(theirs)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < TOLERANCE, "layer {layer} row {i}: {err}");
        }
        let mut out = vec![f32::NAN; 3 * t];
        rows.copy_to(&mut out);
        assert_eq!(&out[2 * t..], rows.row(2));
    }
    // Pairs outside the selection are errors, as are layers the model does not have.
    for (layer, head) in [(0, 2), (1, 0), (9, 2)] {
        assert!(matches!(
            s.attention(layer, head),
            Err(Error::InvalidArgument(_))
        ));
    }
    let bad = AttentionSelection {
        layers: vec![6],
        ..every_head(1)
    };
    assert!(matches!(
        s.capture_attention(Some(&bad)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.capture_attention(Some(&every_head(0))),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn rows_describe_the_last_successful_step_only() {
    let r = Reference::load("llama");
    let model = Arc::new(Model::load(folder("llama")).unwrap());
    let mut s = session(&model, 1, 4, KvType::F32);
    assert!(s.attention(0, 0).is_err(), "capture is off by default");
    s.capture_attention(Some(&every_head(4))).unwrap();
    assert!(s.attention(0, 0).is_err(), "no step yet");
    s.step(&r.tokens[..10]).unwrap();
    let rows = s.attention(1, 3).unwrap();
    assert_eq!((rows.n_queries, rows.n_positions), (4, 10));
    // A failed step leaves no half-written rows readable.
    assert!(s.step(&[u32::MAX]).is_err());
    assert!(s.attention(1, 3).is_ok(), "a refused step computes nothing");
    s.rewind(5).unwrap();
    assert!(s.attention(1, 3).is_err(), "rewound before the rows");
    s.step(&r.tokens[5..12]).unwrap();
    let rows = s.attention(1, 3).unwrap();
    assert_eq!((rows.n_queries, rows.n_positions), (4, 12));
    // Pending tokens are computed by the next step, and are among its queries.
    s.push_pending(r.tokens[12]).unwrap();
    s.step(&r.tokens[13..14]).unwrap();
    let rows = s.attention(0, 0).unwrap();
    assert_eq!((rows.n_queries, rows.n_positions), (2, 14));
    for q in 0..2 {
        let err = rows
            .row(q)
            .iter()
            .zip(r.row(0, 0, 12 + q, 14))
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < TOLERANCE, "pending query {q}: {err}");
    }
    s.reset();
    assert!(s.attention(0, 0).is_err(), "reset");
    assert_eq!(s.capture_attention(None).unwrap(), 0);
    s.step(&r.tokens[..3]).unwrap();
    assert!(s.attention(0, 0).is_err(), "capture turned off");
}

#[test]
fn captured_weights_are_bitwise_identical_for_any_thread_count_and_micro_batch() {
    let r = Reference::load("arch/gemma2");
    let model = Arc::new(Model::load(folder("arch/gemma2")).unwrap());
    let capture = |threads: usize, ubatch: usize| {
        let mut s = session(&model, threads, ubatch, KvType::F32);
        s.capture_attention(Some(&every_head(N_CTX))).unwrap();
        s.step(&r.tokens).unwrap();
        let mut all = Vec::new();
        for layer in 0..r.layers {
            for head in 0..r.heads {
                let rows = s.attention(layer, head).unwrap();
                (0..rows.n_queries).for_each(|i| all.extend_from_slice(rows.row(i)));
            }
        }
        all
    };
    let reference = capture(2, 16);
    for (threads, ubatch) in [(1, 16), (3, 16), (2, 1), (2, 64)] {
        assert!(
            capture(threads, ubatch) == reference,
            "{threads} threads, micro-batch {ubatch}"
        );
    }
}
