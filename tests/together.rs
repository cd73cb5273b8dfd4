//! Generations running at once on one shared thread pool step together (`session/together.rs`):
//! fewer forward passes than generation steps, and each generation's pieces are bitwise what
//! it generates alone, whatever runs beside it (another model, a cancelled generation).

use std::path::Path;
use std::sync::{Arc, Barrier};

use ember::{
    GenerateOptions, Generator, Model, Piece, Sampler, SamplerOptions, Session, SessionOptions,
    StopReason, ThreadPool,
};

fn model(name: &str) -> Arc<Model> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Arc::new(Model::load(path).unwrap())
}

fn options() -> SessionOptions {
    SessionOptions {
        n_ctx: 64,
        n_threads: 2,
        ubatch: 16,
        ..Default::default()
    }
}

/// Generation `i`'s sampler: greedy for 0, seeded sampling at temperature 1 for the others.
fn sampler(i: usize) -> Sampler {
    Sampler::new(SamplerOptions {
        temperature: if i == 0 { 0.0 } else { 1.0 },
        top_p: 0.95,
        seed: 11 + i as u64,
        ..Default::default()
    })
    .unwrap()
}

/// Generation `i`'s prompt and options: different lengths, limits and stop strings.
fn job(model: &Model, i: usize) -> (Vec<u32>, GenerateOptions) {
    let texts = ["the robot", "a", "once upon a time there", "hello", "we"];
    let prompt = model
        .tokenizer()
        .unwrap()
        .encode(texts[i % texts.len()], false, false)
        .unwrap();
    let options = GenerateOptions {
        max_tokens: [30, 36, 25, 32, 28][i % 5],
        ignore_end_tokens: true,
        stop_strings: if i == 3 {
            vec!["zq".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    (prompt, options)
}

type Pieces = (Vec<(Option<u32>, String)>, StopReason);

/// Runs generation `i` on `session` to its end; with `started`, waits there once its prompt
/// is computed (so that generations overlap however the threads are scheduled).
fn generate(
    session: &mut Session,
    model: &Model,
    i: usize,
    cancel_after: Option<usize>,
    started: Option<&Barrier>,
) -> Pieces {
    let (prompt, options) = job(model, i);
    let mut sampler = sampler(i);
    let cancel = session.cancel_handle();
    let mut g = Generator::new(session, &mut sampler, &prompt, &options).unwrap();
    if let Some(started) = started {
        started.wait();
    }
    let mut pieces = Vec::new();
    while let Some(Piece { token, text, .. }) = g.next_piece().unwrap() {
        pieces.push((token, text));
        if Some(pieces.len()) == cancel_after {
            cancel.cancel();
        }
    }
    (pieces, g.finish().reason)
}

/// Generation `i` on a session with a pool of its own.
fn alone(model: &Arc<Model>, i: usize) -> Pieces {
    let mut s = Session::new(model.clone(), &options()).unwrap();
    generate(&mut s, model, i, None, None)
}

/// Runs the generations `(model, i, cancel_after)` at once, each on a thread of its own, with
/// sessions on one pool; returns their pieces and the pool.
fn together(jobs: &[(Arc<Model>, usize, Option<usize>)]) -> (Vec<Pieces>, Arc<ThreadPool>) {
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let start = Barrier::new(jobs.len());
    let sessions: Vec<Session> = jobs
        .iter()
        .map(|(m, ..)| Session::with_pool(m.clone(), pool.clone(), &options()).unwrap())
        .collect();
    let results = std::thread::scope(|scope| {
        let threads: Vec<_> = jobs
            .iter()
            .zip(sessions)
            .map(|((m, i, cancel_after), mut s)| {
                let start = &start;
                scope.spawn(move || generate(&mut s, m, *i, *cancel_after, Some(start)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    (results, pool)
}

#[test]
fn generations_on_one_pool_share_passes_and_generate_what_they_do_alone() {
    for name in ["llama", "gpt2"] {
        let m = model(name);
        let jobs: Vec<_> = (0..5).map(|i| (m.clone(), i, None)).collect();
        let (got, pool) = together(&jobs);
        for (i, pieces) in got.iter().enumerate() {
            assert_eq!(pieces, &alone(&m, i), "{name}: generation {i}");
            assert_eq!(pieces.1, StopReason::MaxTokens);
        }
        let counts = pool.combined_steps();
        // Every generated token but each generation's first is a generation step.
        let steps: u64 = got
            .iter()
            .map(|p| p.0.iter().filter(|piece| piece.0.is_some()).count() as u64 - 1)
            .sum();
        assert_eq!(counts.steps, steps, "{name}");
        assert!(
            counts.passes < counts.steps,
            "{name}: {counts:?}: generations did not step together"
        );
    }
}

#[test]
fn other_models_and_cancelled_generations_leave_the_rest_as_they_are_alone() {
    let (llama, gpt2) = (model("llama"), model("gpt2"));
    let jobs = vec![
        (llama.clone(), 0, None),
        (gpt2.clone(), 1, None),
        (llama.clone(), 2, Some(5)),
        (gpt2.clone(), 3, None),
        (llama.clone(), 4, None),
    ];
    let (got, _) = together(&jobs);
    for ((m, i, cancel_after), pieces) in jobs.iter().zip(&got) {
        let want = alone(m, *i);
        match cancel_after {
            None => assert_eq!(pieces, &want, "generation {i}"),
            Some(n) => {
                // Cancelled after its n-th piece: what it gave is a prefix of its own tokens.
                assert_eq!(pieces.1, StopReason::Cancelled);
                let tokens: Vec<_> = pieces.0.iter().filter_map(|p| p.0).collect();
                let own: Vec<_> = want.0.iter().filter_map(|p| p.0).collect();
                assert!(tokens.len() >= *n && tokens.len() < own.len());
                assert_eq!(tokens[..], own[..tokens.len()], "generation {i}");
            }
        }
    }
}

#[test]
fn a_paused_generation_holds_the_others_up_once_not_at_every_pass() {
    let m = model("llama");
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let on_pool = || Session::with_pool(m.clone(), pool.clone(), &options()).unwrap();
    let (mut paused, mut running) = (on_pool(), on_pool());
    let (prompt, options) = job(&m, 0);
    let mut sampler0 = sampler(0);
    // Generating (its prompt is computed), then not read while the other runs.
    let mut held = Generator::new(&mut paused, &mut sampler0, &prompt, &options).unwrap();
    let other = std::thread::scope(|scope| {
        scope
            .spawn(|| generate(&mut running, &m, 1, None, None))
            .join()
            .unwrap()
    });
    assert_eq!(other, alone(&m, 1));
    let counts = pool.combined_steps();
    assert_eq!(counts.passes, counts.steps);
    // Its first pass waited for the paused one; the next ones did not.
    assert_eq!(counts.missed, 1, "{counts:?}");
    let mut pieces = Vec::new();
    while let Some(Piece { token, text, .. }) = held.next_piece().unwrap() {
        pieces.push((token, text));
    }
    assert_eq!((pieces, held.finish().reason), alone(&m, 0));
    assert_eq!(pool.combined_steps().missed, 1);
}

#[test]
fn one_thread_alternating_generations_does_not_wait_for_itself() {
    let m = model("llama");
    let pool = Arc::new(ThreadPool::new(2).unwrap());
    let on_pool = || Session::with_pool(m.clone(), pool.clone(), &options()).unwrap();
    let (mut a, mut b) = (on_pool(), on_pool());
    let ((prompt_a, options_a), (prompt_b, options_b)) = (job(&m, 0), job(&m, 2));
    let (mut sampler_a, mut sampler_b) = (sampler(0), sampler(2));
    let mut ga = Generator::new(&mut a, &mut sampler_a, &prompt_a, &options_a).unwrap();
    let mut gb = Generator::new(&mut b, &mut sampler_b, &prompt_b, &options_b).unwrap();
    // A game loop pulling both characters' pieces in turn on one thread.
    let (mut pieces_a, mut pieces_b) = (Vec::new(), Vec::new());
    let (mut live_a, mut live_b) = (true, true);
    while live_a || live_b {
        for (g, pieces, live) in [
            (&mut ga, &mut pieces_a, &mut live_a),
            (&mut gb, &mut pieces_b, &mut live_b),
        ] {
            if *live {
                match g.next_piece().unwrap() {
                    Some(Piece { token, text, .. }) => pieces.push((token, text)),
                    None => *live = false,
                }
            }
        }
    }
    assert_eq!((pieces_a, ga.finish().reason), alone(&m, 0));
    assert_eq!((pieces_b, gb.finish().reason), alone(&m, 2));
    let counts = pool.combined_steps();
    assert_eq!(
        (counts.missed, counts.passes),
        (0, counts.steps),
        "{counts:?}"
    );
}

#[test]
fn a_generation_of_another_model_is_not_waited_for() {
    let (llama, gpt2) = (model("llama"), model("gpt2"));
    let jobs = vec![(llama.clone(), 0, None), (gpt2.clone(), 1, None)];
    let (got, pool) = together(&jobs);
    assert_eq!(got[0], alone(&llama, 0));
    assert_eq!(got[1], alone(&gpt2, 1));
    let counts = pool.combined_steps();
    assert_eq!(
        (counts.missed, counts.passes),
        (0, counts.steps),
        "{counts:?}"
    );
}
