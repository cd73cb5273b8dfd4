//! Batched steps (`Session::step_batch`): a session's logits in a batch are bitwise those it
//! gets stepped alone, whatever else is in the batch, on every architecture and weight type;
//! an error in one session's input is reported for it and steps nobody.

use std::sync::Arc;

use ember::{AttentionSelection, Error, KvType, Model, Session, SessionOptions};

mod common;
use common::{fixture as path, ARCH_FIXTURES};

/// Every GGUF weight type the fixtures hold (with [`ARCH_FIXTURES`], every architecture).
const GGUF_MODELS: &[&str] = &[
    "gguf/llama.Q4_0.gguf",
    "gguf/llama.Q4_1.gguf",
    "gguf/llama.Q8_0.gguf",
    "kquant/Q2_K.gguf",
    "kquant/Q3_K_M.gguf",
    "kquant/Q4_K_M.gguf",
    "kquant/Q5_K_M.gguf",
    "kquant/Q6_K.gguf",
    "kquant/Q5_0.gguf",
    "kquant/Q5_1.gguf",
    "kquant/IQ4_NL.gguf",
    "kquant/IQ4_XS.gguf",
];

fn session(model: &Arc<Model>, n_ctx: usize, threads: usize, ubatch: usize) -> Session {
    let options = SessionOptions {
        n_ctx,
        n_threads: threads,
        ubatch,
        kv_type: KvType::F32,
    };
    Session::new(model.clone(), &options).unwrap()
}

/// Token ids of the vocabulary, different for each `seed`.
fn tokens(model: &Model, seed: usize, n: usize) -> Vec<u32> {
    let vocab = model.n_vocab();
    (0..n)
        .map(|i| ((seed * 37 + i * 11 + 3) % vocab) as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Three sessions in a batch (a long prompt split across micro-batches, a short prompt, and
/// one token after an earlier prompt), then decoding steps together, against each stepped
/// alone.
fn check_batch_equals_alone(model: &Arc<Model>, threads: usize, ubatch: usize, name: &str) {
    // Different contexts (the largest hosts the pass) but no context of Phi-3's long-RoPE
    // switch (32) on either side of another: all above it.
    let contexts = [48, 64, 40];
    let prompts = [
        tokens(model, 1, 21),
        tokens(model, 2, 5),
        tokens(model, 3, 1),
    ];
    let mut alone: Vec<Session> = contexts.iter().map(|&n| session(model, n, 1, 64)).collect();
    let mut batched: Vec<Session> = contexts
        .iter()
        .map(|&n| session(model, n, threads, ubatch))
        .collect();
    // The third session holds an earlier prompt already.
    let earlier = tokens(model, 4, 7);
    alone[2].step(&earlier).unwrap();
    batched[2].step(&earlier).unwrap();

    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    for round in 0..4 {
        for (s, t) in alone.iter_mut().zip(&inputs) {
            s.step(t).unwrap();
        }
        {
            let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
            let lists: Vec<&[u32]> = inputs.iter().map(|t| t.as_slice()).collect();
            Session::step_batch(&mut refs, &lists).unwrap();
        }
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(
                a.position(),
                b.position(),
                "{name} round {round} session {i}"
            );
            assert_eq!(a.tokens(), b.tokens());
            assert!(
                bits(a.logits()) == bits(b.logits()),
                "{name}: session {i}'s logits differ in round {round} ({threads} threads, \
                 ubatch {ubatch})"
            );
        }
        // Next: one token each (the argmax), except that session 1 takes a prompt again.
        inputs = alone
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let best = (0..s.logits().len())
                    .max_by(|&x, &y| s.logits()[x].total_cmp(&s.logits()[y]))
                    .unwrap() as u32;
                if i == 1 && round == 1 {
                    tokens(model, 9, 6)
                } else {
                    vec![best]
                }
            })
            .collect();
    }
}

#[test]
fn a_batch_gives_each_session_its_logits_alone_bit_for_bit() {
    for name in ARCH_FIXTURES.iter().chain(GGUF_MODELS) {
        let model = Arc::new(Model::load(path(name)).unwrap());
        for (threads, ubatch) in [(1, 64), (2, 4), (3, 1)] {
            check_batch_equals_alone(&model, threads, ubatch, name);
        }
    }
}

#[test]
fn pending_tokens_and_f16_caches_join_a_batch() {
    let model = Arc::new(Model::load(path("llama")).unwrap());
    let f16 = SessionOptions {
        n_ctx: 32,
        n_threads: 1,
        ubatch: 64,
        kv_type: KvType::F16,
    };
    let (mut a, mut b) = (
        Session::new(model.clone(), &f16).unwrap(),
        Session::new(model.clone(), &f16).unwrap(),
    );
    let (mut c, mut d) = (session(&model, 32, 1, 64), session(&model, 32, 2, 64));
    a.step(&tokens(&model, 1, 4)).unwrap();
    b.step(&tokens(&model, 1, 4)).unwrap();
    // A pending token and none given: computed by the batch.
    a.push_pending(9).unwrap();
    b.push_pending(9).unwrap();
    a.step(&[]).unwrap();
    c.step(&[5, 6]).unwrap();
    Session::step_batch(&mut [&mut b, &mut d], &[&[], &[5, 6]]).unwrap();
    assert_eq!(bits(a.logits()), bits(b.logits()));
    assert_eq!(bits(c.logits()), bits(d.logits()));
    assert_eq!(b.n_pending(), 0);
    assert_eq!(b.current_logits().map(bits), Some(bits(a.logits())));
}

#[test]
fn attention_captured_in_a_batch_is_the_same() {
    let model = Arc::new(Model::load(path("arch/gemma2")).unwrap());
    let selection = AttentionSelection {
        layers: vec![],
        heads: vec![],
        max_queries: 3,
    };
    let mut alone = session(&model, 40, 1, 64);
    let mut batched = session(&model, 40, 2, 4);
    let mut other = session(&model, 40, 2, 4);
    alone.capture_attention(Some(&selection)).unwrap();
    batched.capture_attention(Some(&selection)).unwrap();
    let prompt = tokens(&model, 5, 19);
    alone.step(&prompt).unwrap();
    Session::step_batch(&mut [&mut other, &mut batched], &[&[1, 2, 3], &prompt]).unwrap();
    for layer in 0..model.config().n_layers {
        for head in 0..model.config().n_heads {
            let (a, b) = (
                alone.attention(layer, head).unwrap(),
                batched.attention(layer, head).unwrap(),
            );
            assert_eq!((a.n_queries, a.n_positions), (b.n_queries, b.n_positions));
            for q in 0..a.n_queries {
                assert_eq!(bits(a.row(q)), bits(b.row(q)), "layer {layer} head {head}");
            }
        }
    }
}

#[test]
fn an_error_names_its_session_and_steps_nobody() {
    let model = Arc::new(Model::load(path("llama")).unwrap());
    let other_model = Arc::new(Model::load(path("llama")).unwrap());
    let mut a = session(&model, 16, 1, 64);
    let mut b = session(&model, 8, 1, 64);
    a.step(&[1, 2, 3]).unwrap();
    let logits = bits(a.logits());
    let (pa, pb) = (a.position(), b.position());

    let full = Session::step_batch(&mut [&mut a, &mut b], &[&[4], &[1; 9]]).unwrap_err();
    assert!(
        matches!(&full, Error::InBatch { index: 1, source } if matches!(**source, Error::ContextFull { .. })),
        "{full}"
    );
    assert!(full
        .to_string()
        .starts_with("session 1 of the batch: context full"));
    let bad = Session::step_batch(&mut [&mut a, &mut b], &[&[4], &[100_000]]).unwrap_err();
    assert!(matches!(bad, Error::InBatch { index: 1, .. }), "{bad}");
    let empty = Session::step_batch(&mut [&mut a, &mut b], &[&[], &[4]]).unwrap_err();
    assert!(matches!(empty, Error::InBatch { index: 0, .. }), "{empty}");
    let mut stranger = session(&other_model, 16, 1, 64);
    let mixed = Session::step_batch(&mut [&mut a, &mut stranger], &[&[4], &[4]]).unwrap_err();
    assert!(matches!(mixed, Error::InBatch { index: 1, .. }), "{mixed}");
    assert!(Session::step_batch(&mut [&mut a, &mut b], &[&[4]]).is_err());
    assert!(Session::step_batch(&mut [], &[]).is_err());

    // Nothing moved, and both still step.
    assert_eq!((a.position(), b.position()), (pa, pb));
    assert_eq!(bits(a.logits()), logits);
    Session::step_batch(&mut [&mut a, &mut b], &[&[4], &[4]]).unwrap();
    assert_eq!((a.position(), b.position()), (pa + 1, pb + 1));
}
