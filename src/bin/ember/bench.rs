//! `ember bench`: load time, resident memory, prompt and generation speed, read bandwidth.

use std::time::Instant;

use ember::sampler::argmax;
use ember::{Session, SessionOptions};

use crate::{load, Args};

/// Resident memory of this process in MiB (Linux), or NaN where unknown.
fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Read bandwidth of main memory in GB/s with `threads` threads: the best of three passes
/// summing a 1 GiB buffer (far larger than any cache).
fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let per = words.div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|chunk| {
                    scope.spawn(move || {
                        // Eight independent sums, so the loop vectorises and is bound by memory.
                        let mut lanes = [0u64; 8];
                        for c in chunk.chunks_exact(8) {
                            for (l, v) in lanes.iter_mut().zip(c) {
                                *l = l.wrapping_add(*v);
                            }
                        }
                        lanes.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Token ids for benchmarking: a fixed pseudo-random sequence inside the vocabulary.
fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab.min(32000) as u64) as u32
        })
        .collect()
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["json", "bandwidth", "q8_0"]);
    let path = args.model()?.to_string();
    let (pp, tg, reps, depth) = (
        args.number("pp", 512)?,
        args.number("tg", 128)?,
        args.number("reps", 3)?.max(1),
        // Generation is timed after this many tokens of context (llama-bench's -d).
        args.number("depth", 0)?,
    );
    let threads: Vec<usize> = args
        .get("threads")
        .unwrap_or("1,2")
        .split(',')
        .map(|t| {
            t.trim()
                .parse()
                .map_err(|_| format!("bad --threads value {t:?}"))
        })
        .collect::<Result<_, _>>()?;
    let rss_before = resident_mib();
    let start = Instant::now();
    let (model, load_s) = load(&path, &args)?;
    let rss_loaded = resident_mib();
    // Time to ready: from the start of the load to the first token ids of a short prompt.
    let first_ids = match model.tokenizer() {
        Ok(t) => t
            .encode("Hello, how are you?", true, false)
            .map(|_| start.elapsed().as_secs_f64())
            .unwrap_or(f64::NAN),
        Err(_) => f64::NAN,
    };
    let rss_tokenizer = resident_mib();
    let tokens = bench_tokens(pp.max(depth).max(1), model.n_vocab());
    let mut rows = Vec::new();
    for &n_threads in &threads {
        let options = SessionOptions {
            n_ctx: (pp.max(depth) + tg).max(1),
            n_threads,
            ubatch: 512,
            kv_type: args.kv_type()?,
        };
        let mut session = Session::new(model.clone(), &options).map_err(|e| e.to_string())?;
        // Warm-up: page the weights in and start the workers.
        session
            .step(&tokens[..tokens.len().min(8)])
            .map_err(|e| e.to_string())?;
        let (mut best_pp, mut best_tg) = (f64::INFINITY, f64::INFINITY);
        for rep in 0..reps {
            eprintln!("bench: {n_threads} thread(s), run {}/{reps}", rep + 1);
            if pp > 0 {
                session.reset();
                let start = Instant::now();
                session.step(&tokens[..pp]).map_err(|e| e.to_string())?;
                best_pp = best_pp.min(start.elapsed().as_secs_f64());
            }
            if tg > 0 {
                session.reset();
                if depth > 0 {
                    session.step(&tokens[..depth]).map_err(|e| e.to_string())?;
                }
                let mut next = tokens[0];
                let start = Instant::now();
                for _ in 0..tg {
                    let logits = session.step(&[next]).map_err(|e| e.to_string())?;
                    next = argmax(logits);
                }
                best_tg = best_tg.min(start.elapsed().as_secs_f64());
            }
        }
        let bandwidth = if args.flag("bandwidth") {
            read_bandwidth(n_threads)
        } else {
            f64::NAN
        };
        rows.push((
            n_threads,
            pp as f64 / best_pp,
            tg as f64 / best_tg,
            bandwidth,
        ));
    }
    let rss_after = resident_mib();
    let bytes = model.weight_bytes_per_token() as f64;
    if args.flag("json") {
        let results: Vec<String> = rows
            .iter()
            .map(|(t, p, g, b)| {
                let b = if b.is_nan() {
                    "null".to_string()
                } else {
                    format!("{b:.2}")
                };
                format!(
                    "{{\"threads\":{t},\"pp_tok_s\":{p:.3},\"tg_tok_s\":{g:.3},\"read_gb_s\":{b}}}"
                )
            })
            .collect();
        out!(
            "{{\"model\":{:?},\"dtype\":\"{}\",\"isa\":\"{}\",\"load_s\":{load_s:.6},\"first_ids_s\":{first_ids:.6},\"rss_before_mib\":{rss_before:.1},\"rss_loaded_mib\":{rss_loaded:.1},\"rss_tokenizer_mib\":{rss_tokenizer:.1},\"rss_after_mib\":{rss_after:.1},\"weight_bytes_per_token\":{bytes},\"pp\":{pp},\"tg\":{tg},\"results\":[{}]}}",
            path,
            model.weight_dtype(),
            ember::kernels::Isa::detect().name(),
            results.join(",")
        );
    } else {
        out!(
            "model        {path} ({}, {})",
            model.weight_dtype(),
            ember::kernels::Isa::detect().name()
        );
        out!("load         {:.2} ms", load_s * 1e3);
        out!(
            "first ids    {:.2} ms from the start of the load (resident +{:.1} MiB for the tokenizer)",
            first_ids * 1e3,
            rss_tokenizer - rss_loaded
        );
        out!("resident     {rss_before:.1} MiB before load, {rss_loaded:.1} MiB after load, {rss_after:.1} MiB after the runs");
        out!("weights/tok  {:.1} MiB", bytes / (1 << 20) as f64);
        let at = if depth > 0 {
            format!("@{depth}")
        } else {
            String::new()
        };
        out!("threads  pp{pp} tok/s  tg{tg}{at} tok/s  read GB/s  tg limit tok/s");
        for (t, p, g, b) in rows {
            out!(
                "{t:>7}  {p:>11.1}  {g:>10.1}  {b:>9.1}  {:>14.1}",
                b * 1e9 / bytes
            );
        }
    }
    Ok(())
}
