//! Embeddings against transformers' `output_hidden_states` (its last entry: every token's
//! state after the final norm) on the tiny fixture of every architecture:
//! `scripts/make_embedding_reference.py` wrote the states.

use std::sync::Arc;

use ember::{Error, Model, Pooling, Session, SessionOptions};
use safetensors::SafeTensors;

mod common;
use common::{fixture as folder, ARCH_FIXTURES as FOLDERS};

/// Largest difference accepted, relative to the larger of 1 and the reference value.
const TOLERANCE: f32 = 1e-5;

fn floats<T: Copy>(bytes: &[u8], width: usize, read: fn(&[u8]) -> T) -> Vec<T> {
    bytes.chunks_exact(width).map(read).collect()
}

/// The fixture's tokens and transformers' final hidden states `[T, hidden]`.
fn reference(name: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let bytes = std::fs::read(folder(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tokens = floats(st.tensor("tokens").unwrap().data(), 8, |b| {
        i64::from_le_bytes(b.try_into().unwrap()) as u32
    });
    let bytes = std::fs::read(folder(name).join("embedding.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("hidden").unwrap();
    let hidden = floats(t.data(), 4, |b| f32::from_le_bytes(b.try_into().unwrap()));
    let rows = hidden
        .chunks_exact(t.shape()[1])
        .map(<[f32]>::to_vec)
        .collect();
    (tokens, rows)
}

/// The mean of `rows`, summed in order as Ember does.
fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut m = vec![0f32; rows[0].len()];
    for row in rows {
        m.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    m.iter_mut().for_each(|a| *a /= rows.len() as f32);
    m
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// The largest difference of `ours` from `theirs`, relative to max(1, |theirs|); fails past
/// the tolerance.
fn check(ours: &[f32], theirs: &[f32], what: &str) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max);
    assert!(worst < TOLERANCE, "{what}: {worst} from transformers");
    worst
}

fn session(model: &Arc<Model>, n_threads: usize, ubatch: usize) -> Session {
    let options = SessionOptions {
        n_ctx: 64,
        n_threads,
        ubatch,
        ..SessionOptions::default()
    };
    Session::new(model.clone(), &options).unwrap()
}

#[test]
fn embeddings_match_transformers_hidden_states() {
    let mut worst = 0f32;
    for &name in FOLDERS {
        let (tokens, hidden) = reference(name);
        let model = Arc::new(Model::load(folder(name)).unwrap());
        let n_embd = model.n_embd();
        assert_eq!(n_embd, hidden[0].len(), "{name}");
        let t = tokens.len();
        // Micro-batches of 16: the text spans several.
        let mut s = session(&model, 2, 16);
        let mut out = vec![f32::NAN; n_embd + 3];
        for (pooling, normalize) in [
            (Pooling::Last, false),
            (Pooling::Mean, false),
            (Pooling::Mean, true),
        ] {
            s.reset();
            s.embed(&tokens, pooling, normalize, &mut out).unwrap();
            let want = match pooling {
                Pooling::Last => hidden[t - 1].clone(),
                Pooling::Mean => mean(&hidden),
            };
            let want = if normalize { unit(&want) } else { want };
            let what = format!("{name} {pooling:?} normalize {normalize}");
            worst = worst.max(check(&out[..n_embd], &want, &what));
            assert!(
                out[n_embd..].iter().all(|v| v.is_nan()),
                "{what}: wrote past n_embd"
            );
            assert_eq!(s.position(), t, "{what}");
            assert!(
                s.current_logits().is_none(),
                "{what}: no logits were computed"
            );
        }
        // After a prefix (a step), then a pending token: only the new tokens are pooled, each
        // conditioned on everything before it.
        s.reset();
        let (k, p) = (t / 3, t / 3 + 1);
        s.step(&tokens[..k]).unwrap();
        s.push_pending(tokens[k]).unwrap();
        s.embed(&tokens[p..], Pooling::Mean, false, &mut out)
            .unwrap();
        worst = worst.max(check(
            &out[..n_embd],
            &mean(&hidden[p..]),
            &format!("{name} suffix"),
        ));
        // The logits of the next step are the reference model's again.
        s.rewind(t - 1).unwrap();
        let logits = s.step(&tokens[t - 1..]).unwrap().to_vec();
        let mut fresh = session(&model, 1, 64);
        assert_eq!(
            logits,
            fresh.step(&tokens).unwrap(),
            "{name}: a step after embedding"
        );
    }
    eprintln!("largest relative difference from transformers: {worst:.2e}");
}

#[test]
fn embeddings_are_bitwise_identical_across_threads_and_micro_batches() {
    let (tokens, _) = reference("llama");
    let model = Arc::new(Model::load(folder("llama")).unwrap());
    let embed = |threads, ubatch, pooling| {
        let mut out = vec![0f32; model.n_embd()];
        session(&model, threads, ubatch)
            .embed(&tokens, pooling, true, &mut out)
            .unwrap();
        out
    };
    for pooling in [Pooling::Last, Pooling::Mean] {
        let one = embed(1, 64, pooling);
        assert_eq!(one, embed(2, 16, pooling), "{pooling:?}");
        assert_eq!(one, embed(3, 1, pooling), "{pooling:?}");
    }
}

#[test]
fn bad_embedding_calls_fail_and_change_nothing() {
    let model = Arc::new(Model::load(folder("llama")).unwrap());
    let mut s = session(&model, 1, 64);
    s.step(&[1, 2, 3]).unwrap();
    let logits = s.logits().to_vec();
    let mut small = vec![0f32; model.n_embd() - 1];
    assert!(matches!(
        s.embed(&[4], Pooling::Mean, true, &mut small),
        Err(Error::BufferTooSmall { needed }) if needed == model.n_embd()
    ));
    let mut out = vec![0f32; model.n_embd()];
    assert!(matches!(
        s.embed(&[], Pooling::Last, false, &mut out),
        Err(Error::InvalidArgument(_))
    ));
    let bad = model.n_vocab() as u32;
    assert!(matches!(
        s.embed(&[4, bad], Pooling::Last, false, &mut out),
        Err(Error::InvalidArgument(_))
    ));
    let full = vec![4u32; 62];
    assert!(matches!(
        s.embed(&full, Pooling::Last, false, &mut out),
        Err(Error::ContextFull { .. })
    ));
    assert_eq!(s.position(), 3);
    assert_eq!(s.current_logits(), Some(&logits[..]));
}
