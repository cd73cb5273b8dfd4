//! Streaming generation on the tiny fixture models (which carry a small byte-level BPE).

use std::path::Path;
use std::sync::Arc;

use ember::{
    chat, generate, ChatMessage, GenerateOptions, Model, Sampler, SamplerOptions, Session,
    SessionOptions, StopReason,
};

fn model(name: &str) -> Arc<Model> {
    Arc::new(
        Model::load(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap(),
    )
}

fn session(model: &Arc<Model>, n_ctx: usize) -> Session {
    Session::new(
        model.clone(),
        &SessionOptions {
            n_ctx,
            n_threads: 2,
            ubatch: 16,
        },
    )
    .unwrap()
}

fn greedy() -> Sampler {
    Sampler::new(SamplerOptions::default()).unwrap()
}

/// Greedy generation by hand: step, argmax, stop at an end token.
fn by_hand(model: &Arc<Model>, prompt: &[u32], max: usize) -> Vec<u32> {
    let mut s = session(model, 64);
    let mut out = Vec::new();
    let mut logits = s.step(prompt).unwrap().to_vec();
    for _ in 0..max {
        let t = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .unwrap()
            .0 as u32;
        if model.tokenizer().unwrap().stop_tokens().contains(&t) {
            break;
        }
        out.push(t);
        logits = s.step(&[t]).unwrap().to_vec();
    }
    out
}

fn run(s: &mut Session, prompt: &[u32], options: &GenerateOptions) -> (String, ember::Generation) {
    let mut text = String::new();
    let result = generate(s, &mut greedy(), prompt, options, &mut |piece| {
        text.push_str(piece);
        true
    })
    .unwrap();
    (text, result)
}

#[test]
fn generation_streams_what_greedy_decoding_produces() {
    for name in ["llama", "qwen2", "gpt2"] {
        let m = model(name);
        let tok = m.tokenizer().unwrap();
        let prompt = tok.encode("Once upon a time", false, false).unwrap();
        let expected = by_hand(&m, &prompt, 24);
        let mut s = session(&m, 64);
        let (text, result) = run(
            &mut s,
            &prompt,
            &GenerateOptions {
                max_tokens: 24,
                ..Default::default()
            },
        );
        assert_eq!(result.n_tokens, expected.len(), "{name}");
        assert_eq!(text, tok.decode(&expected).unwrap(), "{name}");
        let reason = if expected.len() == 24 {
            StopReason::MaxTokens
        } else {
            StopReason::EndToken
        };
        assert_eq!(result.reason, reason, "{name}");
        // The session holds the prompt and all generated tokens but the last.
        assert_eq!(
            s.position(),
            prompt.len() + expected.len().saturating_sub(1),
            "{name}"
        );
    }
}

#[test]
fn stop_strings_cut_the_text_and_callbacks_can_stop() {
    let m = model("llama");
    let tok = m.tokenizer().unwrap();
    let prompt = tok.encode("The quick brown", false, false).unwrap();
    let mut s = session(&m, 64);
    let (full, _) = run(
        &mut s,
        &prompt,
        &GenerateOptions {
            max_tokens: 30,
            ignore_end_tokens: true,
            ..Default::default()
        },
    );
    assert!(full.chars().count() > 6, "{full:?}");
    // Stop at a piece of the middle of the text.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let at = full.find(&stop).unwrap();
    s.reset();
    let options = GenerateOptions {
        max_tokens: 30,
        ignore_end_tokens: true,
        stop_strings: vec![stop.clone()],
    };
    let (text, result) = run(&mut s, &prompt, &options);
    assert_eq!(result.reason, StopReason::StopString);
    assert_eq!(text, full[..at], "stop {stop:?}");

    s.reset();
    let mut pieces = 0;
    let result = generate(
        &mut s,
        &mut greedy(),
        &prompt,
        &GenerateOptions {
            max_tokens: 30,
            ignore_end_tokens: true,
            ..Default::default()
        },
        &mut |_| {
            pieces += 1;
            pieces < 3
        },
    )
    .unwrap();
    assert_eq!((result.reason, pieces), (StopReason::Callback, 3));
}

#[test]
fn a_full_context_ends_generation_cleanly() {
    let m = model("qwen2");
    let mut s = session(&m, 12);
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("hello", false, false)
        .unwrap();
    let options = GenerateOptions {
        ignore_end_tokens: true,
        ..Default::default()
    };
    let (_, result) = run(&mut s, &prompt, &options);
    assert_eq!(result.reason, StopReason::ContextFull);
    assert_eq!(s.position(), 12);
    // A prompt that does not fit is an error and changes nothing.
    s.rewind(2).unwrap();
    let long: Vec<u32> = (3..40).collect();
    assert!(generate(&mut s, &mut greedy(), &long, &options, &mut |_| true).is_err());
    assert_eq!(s.position(), 2);
}

#[test]
fn chat_reuses_the_tokens_of_earlier_turns() {
    let m = model("llama");
    let mut s = session(&m, 128);
    let mut messages = vec![ChatMessage::new("user", "Hello there")];
    let mut reply = String::new();
    let options = GenerateOptions {
        max_tokens: 8,
        ignore_end_tokens: true,
        ..Default::default()
    };
    chat(&mut s, &mut greedy(), &messages, &options, &mut |p| {
        reply.push_str(p);
        true
    })
    .unwrap();
    let first_turn = s.tokens().to_vec();
    messages.push(ChatMessage::new("assistant", reply));
    messages.push(ChatMessage::new("user", "And then?"));
    chat(&mut s, &mut greedy(), &messages, &options, &mut |_| true).unwrap();
    // The prompt of the second turn starts with the first turn's prompt: those positions
    // were kept, not recomputed, and the second turn's tokens follow them.
    let tok = m.tokenizer().unwrap();
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    let ids = tok.encode(&rendered, false, true).unwrap();
    assert_eq!(&s.tokens()[..ids.len()], &ids[..]);
    assert!(
        first_turn
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            > 5
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let m = model("gpt2");
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("robot", false, false)
        .unwrap();
    let sample = |seed: u64| {
        let mut s = session(&m, 64);
        let mut sampler = Sampler::new(SamplerOptions {
            temperature: 1.0,
            top_p: 0.9,
            seed,
            ..Default::default()
        })
        .unwrap();
        let mut text = String::new();
        generate(
            &mut s,
            &mut sampler,
            &prompt,
            &GenerateOptions {
                max_tokens: 20,
                ignore_end_tokens: true,
                ..Default::default()
            },
            &mut |p| {
                text.push_str(p);
                true
            },
        )
        .unwrap();
        text
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
}
