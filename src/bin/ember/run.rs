//! `ember run` (stream a completion) and `ember chat` (an interactive conversation).

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use ember::generate::{self, GenerateOptions, Generation};
use ember::sampler::{Sampler, SamplerOptions};
use ember::tokenizer::ChatMessage;
use ember::{Model, Session, SessionOptions};

use crate::{load, Args};

/// Flags shared by `run` and `chat`: they take a value.
pub const OPTIONS_HELP: &str =
    "  sampling: --temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05 --repeat-penalty 1.0
            --seed N (default: from the clock); --temp 0 is greedy
  limits:   --max-tokens 256 --ctx 2048 --threads N (default: half the cores) --stop TEXT
  memory:   --kv f32|f16 (the KV cache's element type; f16 takes half the memory)";

fn float(args: &Args, name: &str, default: f32) -> Result<f32, String> {
    match args.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{name} takes a number, not {v:?}")),
    }
}

fn sampler(args: &Args) -> Result<Sampler, String> {
    let seed = match args.get("seed") {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--seed takes a whole number, not {v:?}"))?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let options = SamplerOptions {
        temperature: float(args, "temp", 0.8)?,
        top_k: args.number("top-k", 40)?,
        top_p: float(args, "top-p", 0.95)?,
        min_p: float(args, "min-p", 0.05)?,
        repetition_penalty: float(args, "repeat-penalty", 1.0)?,
        seed,
        ..SamplerOptions::default()
    };
    Sampler::new(options).map_err(|e| e.to_string())
}

fn session(args: &Args, model: &Arc<Model>) -> Result<Session, String> {
    let options = SessionOptions {
        n_ctx: args
            .number("ctx", 0)?
            .min(model.config().max_position_embeddings),
        n_threads: ember::defaults::threads(args.number("threads", 0)?),
        ubatch: ember::defaults::UBATCH,
        kv_type: args.kv_type()?,
    };
    Session::new(model.clone(), &options).map_err(|e| e.to_string())
}

fn generate_options(args: &Args) -> Result<GenerateOptions, String> {
    Ok(GenerateOptions {
        max_tokens: args.number("max-tokens", 256)?,
        stop_strings: args.all("stop"),
        ..Default::default()
    })
}

/// Writes generated text to stdout as it comes.
fn print_piece(piece: &str) -> bool {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) stops the generation.
    out.write_all(piece.as_bytes()).is_ok() && out.flush().is_ok()
}

fn report(prompt_tokens: usize, start: Instant, g: &Generation) {
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "\n[{prompt_tokens} prompt tokens, {} generated in {seconds:.2} s ({:.1} tok/s overall); \
         stopped: {:?}]",
        g.n_tokens,
        (prompt_tokens + g.n_tokens) as f64 / seconds,
        g.reason
    );
}

/// `ember run MODEL PROMPT`: streams a completion of PROMPT (with `--chat`, of PROMPT as one
/// user message in the model's chat template).
pub fn run(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["chat", "q8_0"]);
    let prompt = args
        .positional
        .get(1)
        .ok_or_else(|| format!("missing PROMPT\n{}", crate::usage()))?;
    let (model, load_seconds) = load(args.model()?, &args)?;
    eprintln!("[loaded in {:.0} ms]", load_seconds * 1e3);
    let mut session = session(&args, &model)?;
    let mut sampler = sampler(&args)?;
    let options = generate_options(&args)?;
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (prompt_tokens, generation) = if args.flag("chat") {
        let messages = [ChatMessage {
            role: "user".into(),
            content: prompt.clone(),
        }];
        let n = tokenizer
            .apply_chat_template(&messages, true)
            .and_then(|t| tokenizer.encode(&t, false, true))
            .map_err(|e| e.to_string())?
            .len();
        let g = generate::chat(
            &mut session,
            &mut sampler,
            &messages,
            &options,
            &mut print_piece,
        );
        (n, g)
    } else {
        let ids = tokenizer
            .encode(prompt, true, false)
            .map_err(|e| e.to_string())?;
        print_piece(prompt);
        let g = generate::generate(&mut session, &mut sampler, &ids, &options, &mut print_piece);
        (ids.len(), g)
    };
    let generation = generation.map_err(|e| e.to_string())?;
    report(prompt_tokens, start, &generation);
    Ok(())
}

/// `ember chat MODEL`: reads user messages line by line from stdin and streams the replies,
/// keeping the conversation in one session. `/reset` starts over; end of input quits.
pub fn chat(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["q8_0"]);
    let (model, _) = load(args.model()?, &args)?;
    let mut session = session(&args, &model)?;
    let mut sampler = sampler(&args)?;
    let options = generate_options(&args)?;
    let mut messages = Vec::new();
    if let Some(system) = args.get("system") {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.to_string(),
        });
    }
    let first_turn = messages.len();
    eprintln!("[chat: one message per line; /reset starts over; end of input quits]");
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            messages.truncate(first_turn);
            session.reset();
            continue;
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: line.to_string(),
        });
        let mut reply = String::new();
        let start = Instant::now();
        let before = session.position();
        let result = generate::chat(
            &mut session,
            &mut sampler,
            &messages,
            &options,
            &mut |piece| {
                reply.push_str(piece);
                print_piece(piece)
            },
        );
        match result {
            Ok(g) => {
                out!();
                report(session.position().saturating_sub(before), start, &g);
                messages.push(ChatMessage {
                    role: "assistant".into(),
                    content: reply,
                });
            }
            Err(e) => {
                // A failed turn (e.g. a full context) is forgotten; the conversation goes on.
                messages.pop();
                eprintln!("ember: {e}");
            }
        }
    }
    Ok(())
}
