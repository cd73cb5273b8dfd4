//! `ember`: the command-line front end of the library.
//!
//! - `ember run MODEL PROMPT [--chat] [sampling flags]`: streams a completion to stdout.
//! - `ember chat MODEL [--system TEXT]`: an interactive conversation with the chat template.
//! - `ember convert MODEL.gguf OUT_DIR [--dtype f32|f16|bf16]`: writes a Hugging Face folder.
//! - `ember info MODEL`: architecture, sizes, weight dtype, special tokens.
//! - `ember bench MODEL [--threads 1,2] [--pp 512] [--tg 128] [--depth 0] [--reps 3] [--json]
//!   [--bandwidth] [--kv f32|f16]`: load time, resident memory, prompt-processing and generation
//!   speed, and (with `--bandwidth`) the memory read bandwidth and the generation speed it
//!   allows; `--kv` picks the KV cache's element type.
//!
//! - `ember tokenize MODEL (TEXT | --file FILE) [--bench]`: token ids of a text with the
//!   model's tokenizer, or (with `--bench`) single-thread tokenization speed.
//! - `ember attention MODEL TEXT [--token WORD] [--layer L,..] [--head H,..] [--top 5]
//!   [--png FILE]`: the positions a token attends to most, per head and averaged, and a
//!   heatmap picture.
//!
//! Progress and timings go to stderr, results to stdout; errors are one line and exit code 1.

/// `println!` for command output: a closed stdout (e.g. piped into `head`) ends the command
/// quietly instead of panicking. Only in functions returning `Result<(), String>`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(format!("writing to stdout: {e}"));
        }
    }};
}

mod attention;
mod bench;
mod heatmap;
mod run;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use ember::Model;

/// MODEL is a GGUF file or a Hugging Face model folder.
const USAGE: &str = "usage:
  ember run MODEL PROMPT [--chat] [options]
  ember chat MODEL [--system TEXT] [options]
  ember convert MODEL.gguf OUT_DIR [--dtype f32|f16|bf16]
  ember info MODEL
  ember bench MODEL [--threads 1,2] [--pp 512] [--tg 128] [--depth 0] [--reps 3] [--json]
              [--bandwidth] [--kv f32|f16]
  ember tokenize MODEL (TEXT | --file FILE) [--bench] [--add-special] [--parse-special]
  ember attention MODEL TEXT [--token WORD] [--layer L,..] [--head H,..] [--top 5] [--png FILE]
MODEL is a GGUF file or a Hugging Face model folder; --q8_0 (run, chat, bench, info,
tokenize) quantizes F32/F16/BF16 weights to Q8_0 at load. Options of run and chat:";

fn usage() -> String {
    format!("{USAGE}\n{}", run::OPTIONS_HELP)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("run") => run::run(rest),
        Some("chat") => run::chat(rest),
        Some("convert") => convert(rest),
        Some("info") => info(rest),
        Some("bench") => bench::bench(rest),
        Some("tokenize") => tokenize(rest),
        Some("attention") => attention::attention(rest),
        Some("-h") | Some("--help") | Some("help") => {
            println!("{}", usage());
            Ok(())
        }
        _ => Err(format!("unknown command\n{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ember: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Options of the form `--name value`, and the positional arguments.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(args: &[String], flags: &[&str]) -> Args {
        let (mut positional, mut options) = (Vec::new(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let value = if flags.contains(&name) {
                    None
                } else {
                    it.next().cloned()
                };
                options.push((name.to_string(), value));
            } else {
                positional.push(a.clone());
            }
        }
        Args {
            positional,
            options,
        }
    }

    /// Every value given for a repeatable option.
    fn all(&self, name: &str) -> Vec<String> {
        self.options
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The value of an option, or an error when it is given without one (last on the line,
    /// or followed by another option).
    fn value(&self, name: &str) -> Result<Option<&str>, String> {
        match self.options.iter().rev().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, Some(v))) if !v.starts_with("--") => Ok(Some(v)),
            Some(_) => Err(format!("--{name} needs a value")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| n == name)
    }

    fn number(&self, name: &str, default: usize) -> Result<usize, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name} takes a whole number, not {v:?}")),
        }
    }

    /// The KV cache type `--kv f32|f16` names (default f32).
    fn kv_type(&self) -> Result<ember::KvType, String> {
        match self.get("kv") {
            None => Ok(ember::KvType::default()),
            Some(v) => ember::KvType::from_name(v).ok_or_else(|| format!("--kv {v}: f32 or f16")),
        }
    }

    fn model(&self) -> Result<&str, String> {
        self.positional
            .first()
            .map(String::as_str)
            .ok_or_else(|| format!("missing MODEL\n{}", usage()))
    }
}

/// Loads a model, returning it with the seconds the load took.
fn load(path: &str, args: &Args) -> Result<(Arc<Model>, f64), String> {
    let start = Instant::now();
    let options = ember::LoadOptions {
        quantize_q8_0: args.flag("q8_0"),
        ..ember::LoadOptions::default()
    };
    let model = Model::load_with(path, &options).map_err(|e| e.to_string())?;
    Ok((Arc::new(model), start.elapsed().as_secs_f64()))
}

fn info(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["q8_0"]);
    // What the file is, before loading it.
    let probe = Model::probe(args.model()?).map_err(|e| e.to_string())?;
    let mix: Vec<String> = probe
        .tensor_types
        .iter()
        .map(|(dtype, n)| format!("{n} {dtype}"))
        .collect();
    out!("file              {}", probe.architecture);
    out!(
        "size              {:.1} MiB, {:.1}M weights",
        probe.file_bytes as f64 / (1 << 20) as f64,
        probe.n_params as f64 / 1e6
    );
    out!("tensor types      {}", mix.join(", "));
    if let Some(reason) = probe.unsupported {
        out!("supported         no");
        return Err(reason);
    }
    out!("supported         yes");
    let (model, _) = load(args.model()?, &args)?;
    let c = model.config();
    out!("architecture      {}", c.architecture.name());
    out!("weights           {}", model.dtype_summary());
    let sliding: Vec<String> = c
        .layers
        .iter()
        .filter_map(|l| l.sliding_window)
        .map(|w| w.to_string())
        .collect();
    if !sliding.is_empty() {
        out!(
            "sliding window    {} of {} layers, window {}",
            sliding.len(),
            c.n_layers,
            sliding[0]
        );
    }
    out!("vocabulary        {}", c.vocab_size);
    out!("layers            {}", c.n_layers);
    out!(
        "hidden / ffn      {} / {}",
        c.hidden_size,
        c.intermediate_size
    );
    out!(
        "heads (kv)        {} ({}) x {}",
        c.n_heads,
        c.n_kv_heads,
        c.head_dim
    );
    out!("context           {}", c.max_position_embeddings);
    out!(
        "bytes per token   {} ({:.1} MiB of weights read per generated token)",
        model.weight_bytes_per_token(),
        model.weight_bytes_per_token() as f64 / (1 << 20) as f64
    );
    match model.tokenizer() {
        Ok(t) => {
            let name = |id: Option<u32>| match id {
                Some(id) => format!("{id} {:?}", t.token_text(id).unwrap_or_default()),
                None => "none".into(),
            };
            out!("tokenizer         {} tokens", t.n_vocab());
            out!("bos               {}", name(t.bos()));
            out!("eos               {}", name(t.eos()));
            out!("eot               {}", name(t.eot()));
            out!("chat template     {}", t.chat_template().is_some());
        }
        Err(e) => out!("tokenizer         none ({e})"),
    }
    Ok(())
}

fn convert(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &[]);
    let (Some(input), Some(out)) = (args.positional.first(), args.positional.get(1)) else {
        return Err(format!("convert needs MODEL.gguf and OUT_DIR\n{}", usage()));
    };
    let dtype = match args.get("dtype").unwrap_or("f32") {
        "f32" | "F32" => ember::tensor::DType::F32,
        "f16" | "F16" => ember::tensor::DType::F16,
        "bf16" | "BF16" => ember::tensor::DType::BF16,
        other => return Err(format!("--dtype {other}: f32, f16 or bf16")),
    };
    let start = Instant::now();
    ember::convert::gguf_to_hf_folder(input.as_ref(), out.as_ref(), dtype)
        .map_err(|e| e.to_string())?;
    eprintln!(
        "[wrote {out} ({}) in {:.1} s]",
        dtype.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tokenize(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args, &["bench", "add-special", "parse-special", "q8_0"]);
    let (model, _) = load(args.model()?, &args)?;
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let text = match (args.get("file"), args.positional.get(1)) {
        (Some(file), _) => std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?,
        (None, Some(text)) => text.clone(),
        (None, None) => return Err(format!("missing TEXT or --file\n{}", usage())),
    };
    let (add, parse) = (args.flag("add-special"), args.flag("parse-special"));
    if !args.flag("bench") {
        let ids = tokenizer
            .encode(&text, add, parse)
            .map_err(|e| e.to_string())?;
        out!("{ids:?}");
        return Ok(());
    }
    // One call per line, as a server tokenizing prompts would; best of three passes.
    let mut best = f64::INFINITY;
    let mut n_tokens = 0;
    for _ in 0..3 {
        let start = Instant::now();
        n_tokens = 0;
        for line in text.split_inclusive('\n') {
            n_tokens += tokenizer
                .encode(line, add, parse)
                .map_err(|e| e.to_string())?
                .len();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    out!(
        "{} bytes, {n_tokens} tokens in {:.1} ms: {:.2} MB/s, {:.0} tokens/s (1 thread)",
        text.len(),
        best * 1e3,
        text.len() as f64 / best / 1e6,
        n_tokens as f64 / best
    );
    Ok(())
}
