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
            ..Default::default()
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
        // The session holds the prompt and every generated token (the last one pending).
        assert_eq!(s.position(), prompt.len() + expected.len(), "{name}");
        assert_eq!(s.tokens(), [&prompt[..], &expected[..]].concat(), "{name}");
        assert_eq!(s.n_pending(), usize::from(!expected.is_empty()), "{name}");
    }
}

#[test]
fn a_generation_continued_after_max_tokens_loses_no_token() {
    // The regression: the session used to hold the prompt and the generated tokens except
    // the last, which the next call silently lost.
    for name in ["llama", "gpt2"] {
        let m = model(name);
        let tok = m.tokenizer().unwrap();
        let prompt = tok.encode("The king", false, false).unwrap();
        let more = tok.encode(" Then", false, false).unwrap();
        let options = GenerateOptions {
            max_tokens: 6,
            ignore_end_tokens: true,
            ..Default::default()
        };
        let mut s = session(&m, 64);
        let (first, r1) = run(&mut s, &prompt, &options);
        assert_eq!(r1.reason, StopReason::MaxTokens);
        let (second, _) = run(&mut s, &more, &options);
        // The same text stepped into a fresh session continues the same way.
        let held = s.tokens().to_vec();
        let mut fresh = session(&m, 64);
        let upto = prompt.len() + 6 + more.len();
        let (again, _) = run(&mut fresh, &held[..upto], &options);
        assert_eq!(second, again, "{name}: after {first:?}");
        assert_eq!(
            tok.decode(&held[prompt.len()..prompt.len() + 6]).unwrap(),
            first,
            "{name}"
        );
        // An empty prompt continues after the pending token.
        let mut s = session(&m, 64);
        run(&mut s, &prompt, &options);
        let (continued, r) = run(&mut s, &[], &options);
        assert_eq!(r.n_tokens, 6);
        let mut fresh = session(&m, 64);
        let (whole, _) = run(
            &mut fresh,
            &prompt,
            &GenerateOptions {
                max_tokens: 12,
                ..options.clone()
            },
        );
        assert_eq!(format!("{first}{continued}"), whole, "{name}");
    }
}

#[test]
fn a_cancel_stops_the_running_generation_and_never_a_later_one() {
    let m = model("llama");
    let tok = m.tokenizer().unwrap();
    let prompt = tok.encode("Once upon a time", false, false).unwrap();
    let options = GenerateOptions {
        max_tokens: 20,
        ignore_end_tokens: true,
        ..Default::default()
    };
    let mut s = session(&m, 128);
    // A cancel from the callback (the Stop button pressed while text streams) stops the
    // generation that is running; the tokens delivered stay in the session.
    let handle = s.cancel_handle();
    let mut pieces = 0;
    let result = generate(&mut s, &mut greedy(), &prompt, &options, &mut |_| {
        pieces += 1;
        if pieces == 3 {
            handle.cancel();
        }
        true
    })
    .unwrap();
    assert_eq!(result.reason, StopReason::Cancelled);
    assert!(result.n_tokens >= 3 && result.n_tokens < 20, "{result:?}");
    assert_eq!(s.position(), prompt.len() + result.n_tokens);
    // A cancel with nothing running (just after a generation ended) reaches no later call.
    for _ in 0..20 {
        s.reset();
        handle.cancel();
        let (_, r) = run(&mut s, &prompt, &options);
        assert_eq!(r.reason, StopReason::MaxTokens);
    }
    // The Stop-button race: cancels arrive at random moments, before, during and after the
    // calls; a call is either cancelled while it runs or completes, and once the canceller
    // is gone, every call completes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let canceller = {
        let (handle, stop) = (handle.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                handle.cancel();
                n += 1;
                std::thread::sleep(std::time::Duration::from_micros(50 + n % 300));
            }
        })
    };
    let (mut cancelled, mut completed) = (0, 0);
    for _ in 0..100 {
        s.reset();
        let (_, r) = run(&mut s, &prompt, &options);
        match r.reason {
            StopReason::Cancelled => cancelled += 1,
            StopReason::MaxTokens => completed += 1,
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.position(),
            if r.n_tokens == 0 {
                0
            } else {
                prompt.len() + r.n_tokens
            }
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    canceller.join().unwrap();
    assert!(
        cancelled > 0,
        "{cancelled} cancelled, {completed} completed"
    );
    for _ in 0..5 {
        s.reset();
        assert_eq!(
            run(&mut s, &prompt, &options).1.reason,
            StopReason::MaxTokens
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
        ..Default::default()
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

#[test]
fn a_pulled_generation_gives_the_callbacks_text_token_by_token() {
    let m = model("llama");
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("Once upon a time", false, false)
        .unwrap();
    let options = GenerateOptions {
        max_tokens: 20,
        stop_strings: vec!["e t".into()],
        logprobs: true,
        top_logprobs: 3,
        ..Default::default()
    };
    let mut a = session(&m, 64);
    let (expected_text, expected) = run(&mut a, &prompt, &options);
    let mut b = session(&m, 64);
    let mut sampler = greedy();
    let mut g = ember::Generator::new(&mut b, &mut sampler, &prompt, &options).unwrap();
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(piece) = g.next_piece().unwrap() {
        text.push_str(&piece.text);
        if let Some(t) = piece.token {
            tokens.push(t);
            // Greedy: the token is the most likely one, and its log-probability the best.
            assert_eq!(piece.top_logprobs[0].0, t);
            assert_eq!(piece.top_logprobs[0].1, piece.logprob);
            assert!(piece.logprob <= 0.0 && piece.top_logprobs[1].1 <= piece.logprob);
        }
    }
    let result = g.finish();
    assert_eq!((text, result), (expected_text, expected));
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!(&b.tokens()[prompt.len()..], &tokens[..]);

    // Stopping after three pieces: the session holds those three tokens, pending the last.
    let mut c = session(&m, 64);
    let mut sampler = greedy();
    let mut g = ember::Generator::new(&mut c, &mut sampler, &prompt, &options).unwrap();
    for _ in 0..3 {
        assert!(g.next_piece().unwrap().unwrap().logprob.is_finite());
    }
    let result = g.finish();
    assert_eq!((result.n_tokens, result.reason), (3, StopReason::Callback));
    assert_eq!(c.tokens(), &b.tokens()[..prompt.len() + 3]);
    assert_eq!(c.n_pending(), 1);
}
