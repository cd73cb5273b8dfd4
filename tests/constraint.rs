//! Constrained sampling on the tiny fixture models (a byte-level BPE of 320 tokens, so every
//! text can be written): what is generated satisfies the constraint, generation ends when
//! the constraint is complete, and bad or hostile constraints are errors in bounded time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember::{
    generate, ConstraintKind, ConstraintState, Error, GenerateOptions, Model, Sampler,
    SamplerOptions, Session, SessionOptions, StopReason,
};

fn model(name: &str) -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    Arc::new(Model::load(dir.join(name)).unwrap())
}

fn session(model: &Arc<Model>) -> Session {
    let options = SessionOptions {
        n_ctx: 0,
        n_threads: 2,
        ubatch: 16,
        ..Default::default()
    };
    Session::new(model.clone(), &options).unwrap()
}

fn sampler(
    model: &Model,
    temperature: f32,
    seed: u64,
    kind: ConstraintKind,
    text: &str,
) -> Sampler {
    let mut s = Sampler::new(SamplerOptions {
        temperature,
        seed,
        ..Default::default()
    })
    .unwrap();
    s.set_constraint(Some(model.constraint(kind, text).unwrap()));
    s
}

/// Generates from "Hello" and returns the text and why it stopped.
fn run(model: &Arc<Model>, sampler: &mut Sampler, max_tokens: usize) -> (String, StopReason) {
    let mut s = session(model);
    let prompt = model
        .tokenizer()
        .unwrap()
        .encode("Hello", false, false)
        .unwrap();
    let mut text = String::new();
    let options = GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    let g = generate(&mut s, sampler, &prompt, &options, &mut |piece: &str| {
        text.push_str(piece);
        true
    })
    .unwrap();
    (text, g.reason)
}

/// A tiny matcher for the regex of the tests: `[0-9]{3}-[a-z]{2,4}`.
fn is_code(text: &str) -> bool {
    let (digits, letters) = match text.split_once('-') {
        Some(parts) => parts,
        None => return false,
    };
    digits.len() == 3
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (2..=4).contains(&letters.len())
        && letters.bytes().all(|b| b.is_ascii_lowercase())
}

#[test]
fn sampled_text_matches_a_regex_and_ends_when_complete() {
    for name in ["llama", "gpt2"] {
        let model = model(name);
        for seed in 0..20 {
            let mut s = sampler(
                &model,
                1.0,
                seed,
                ConstraintKind::Regex,
                "[0-9]{3}-[a-z]{2,4}",
            );
            let (text, reason) = run(&model, &mut s, 32);
            assert!(is_code(&text), "{name} seed {seed}: {text:?}");
            assert!(
                matches!(reason, StopReason::ConstraintComplete),
                "{name} seed {seed}: {reason:?} after {text:?}"
            );
        }
    }
}

#[test]
fn sampled_json_is_valid_against_its_schema() {
    let model = model("llama");
    let schema = r#"{
        "type": "object",
        "properties": {
            "action": {"enum": ["trade", "fight", "flee"]},
            "price": {"type": "integer", "minimum": 1, "maximum": 99},
            "items": {"type": "array", "items": {"type": "string", "maxLength": 3},
                      "minItems": 1, "maxItems": 2}
        },
        "required": ["action", "price", "items"],
        "additionalProperties": false
    }"#;
    for seed in 0..20 {
        let mut s = sampler(&model, 1.0, seed, ConstraintKind::JsonSchema, schema);
        let (text, reason) = run(&model, &mut s, 120);
        assert!(
            matches!(reason, StopReason::ConstraintComplete),
            "seed {seed}: {reason:?} after {text:?}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e} in {text:?}"));
        let action = v["action"].as_str().unwrap();
        assert!(["trade", "fight", "flee"].contains(&action), "{text}");
        let price = v["price"].as_i64().unwrap();
        assert!((1..=99).contains(&price), "{text}");
        let items = v["items"].as_array().unwrap();
        assert!((1..=2).contains(&items.len()), "{text}");
        assert!(
            items
                .iter()
                .all(|i| i.as_str().unwrap().chars().count() <= 3),
            "{text}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn a_lark_grammar_constrains_greedy_output() {
    let model = model("gpt2");
    let grammar = r#"
        start: greeting " " name "!"
        greeting: "hi" | "hello"
        name: /[A-Z][a-z]{1,5}/
    "#;
    let mut s = sampler(&model, 0.0, 0, ConstraintKind::Lark, grammar);
    let (text, reason) = run(&model, &mut s, 32);
    let (greeting, rest) = text.split_once(' ').unwrap();
    assert!(["hi", "hello"].contains(&greeting), "{text:?}");
    let name = rest.strip_suffix('!').unwrap();
    assert!(
        name.chars().next().unwrap().is_ascii_uppercase(),
        "{text:?}"
    );
    assert_eq!(reason, StopReason::ConstraintComplete);
    // The same sampler starts over for the next generation: the same greedy text.
    assert_eq!(run(&model, &mut s, 32), (text, reason));
}

#[test]
fn running_out_of_tokens_says_the_output_is_incomplete() {
    let model = model("llama");
    let mut s = sampler(&model, 0.0, 0, ConstraintKind::Regex, "[a-z]{20}");
    let (text, reason) = run(&model, &mut s, 5);
    assert_eq!(reason, StopReason::ConstraintIncomplete, "{text:?}");
    assert!(text.bytes().all(|b| b.is_ascii_lowercase()) && text.len() < 20);
    assert_eq!(
        s.constraint_state().unwrap(),
        Some(ConstraintState::Incomplete)
    );
}

#[test]
fn a_host_loop_samples_under_the_constraint_and_reads_its_state() {
    let model = model("llama");
    let mut s = sampler(&model, 0.7, 3, ConstraintKind::Regex, "(yes|no)");
    let mut session = session(&model);
    let tokenizer = model.tokenizer().unwrap();
    let mut logits = session
        .step(&tokenizer.encode("Say", false, false).unwrap())
        .unwrap()
        .to_vec();
    let mut out = Vec::new();
    while s.constraint_state().unwrap() != Some(ConstraintState::Finished) {
        assert_eq!(
            s.constraint_state().unwrap(),
            Some(ConstraintState::Incomplete)
        );
        let token = s.sample(&logits).unwrap();
        out.push(token);
        logits = session.step(&[token]).unwrap().to_vec();
        assert!(out.len() < 10);
    }
    let text = tokenizer.decode(&out).unwrap();
    assert!(text == "yes" || text == "no", "{text:?}");
    // Finished: only an end token may follow.
    let eos = tokenizer.stop_tokens()[0];
    assert_eq!(s.sample(&logits).unwrap(), eos);
    // Without the constraint the sampler draws freely again.
    s.set_constraint(None);
    assert_eq!(s.constraint_state().unwrap(), None);
    s.sample(&logits).unwrap();
}

#[test]
fn bad_and_hostile_constraints_are_errors_in_bounded_time() {
    let model = model("llama");
    let bad = |kind, text: &str| {
        let start = Instant::now();
        let err = model.constraint(kind, text).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{err}: {:?}",
            start.elapsed()
        );
        err.to_string()
    };
    assert!(bad(ConstraintKind::JsonSchema, "{not json").contains("not JSON"));
    bad(ConstraintKind::JsonSchema, r#"{"type": "no-such-type"}"#);
    bad(ConstraintKind::Regex, "([a-z]");
    bad(ConstraintKind::Lark, "start: missing_rule");
    // Too long a text, and grammars whose compiled size explodes.
    assert!(bad(ConstraintKind::Regex, &"a".repeat(2 << 20)).contains("at most"));
    for (kind, text) in [
        (ConstraintKind::Regex, "(a|b|c|d|e|f|g|h){1000}{1000}"),
        (ConstraintKind::Lark, "start: \"a\"{100000}"),
        (ConstraintKind::Regex, "((a*)*)*b{0,100000}"),
    ] {
        // Compiled lazily (accepted at once); each step's work stays bounded.
        let start = Instant::now();
        if let Ok(c) = model.constraint(kind, text) {
            let mut s = Sampler::new(SamplerOptions {
                temperature: 1.0,
                ..Default::default()
            })
            .unwrap();
            s.set_constraint(Some(c));
            let logits: Vec<f32> = (0..model.n_vocab()).map(|i| (i % 7) as f32).collect();
            for _ in 0..50 {
                if s.sample(&logits).is_err() {
                    break;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{text}: {:?}",
            start.elapsed()
        );
    }
    let nested = format!(
        "{}{}",
        r#"{"type":"array","items":"#.repeat(5000),
        "}".repeat(5000)
    );
    bad(ConstraintKind::JsonSchema, &nested);
    // The model is still fine for constraints.
    model.constraint(ConstraintKind::Regex, "[0-9]+").unwrap();
}

/// JSON objects in GBNF (written for these tests), with bounded strings and numbers so that a
/// random model completes them.
const JSON_GBNF: &str = r#"# JSON objects
root   ::= obj
obj    ::= "{" sp ( member ( "," sp member )* )? "}"
member ::= str sp ":" sp val sp
val    ::= obj | arr | str | num | "true" | "false" | "null"
arr    ::= "[" sp ( val sp ( "," sp val sp )* )? "]"
str    ::= "\"" ( [^"\\\x00-\x1F] | "\\" ["\\/nrt] ){0,6} "\""
num    ::= "-"? ( "0" | [1-9] [0-9]{0,3} ) ( "." [0-9]{1,2} )?
sp     ::= | " "
"#;

#[test]
fn sampled_text_under_a_gbnf_grammar_parses_as_json() {
    let model = model("llama");
    let mut complete = 0;
    for seed in 0..20 {
        let mut s = sampler(&model, 1.0, seed, ConstraintKind::Gbnf, JSON_GBNF);
        let (text, reason) = run(&model, &mut s, 120);
        if reason == StopReason::ConstraintComplete {
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            assert!(value.is_object(), "{text:?}");
            complete += 1;
        } else {
            assert_eq!(reason, StopReason::ConstraintIncomplete, "{text:?}");
        }
    }
    assert!(complete >= 10, "{complete} of 20 complete");
}

/// Feeds `text`'s tokens to a fresh `constraint`: true when each is allowed and the output
/// is then complete.
fn accepts(model: &Model, grammar: &str, text: &str) -> bool {
    let mut c = model.constraint(ConstraintKind::Gbnf, grammar).unwrap();
    let ids = model
        .tokenizer()
        .unwrap()
        .encode(text, false, false)
        .unwrap();
    for t in ids {
        if !c.allows(t).unwrap() {
            return false;
        }
        c.accept(t).unwrap();
    }
    c.state().unwrap() != ConstraintState::Incomplete
}

#[test]
fn a_gbnf_grammar_accepts_its_language_and_nothing_else() {
    // Literals, alternatives, classes, bounded repetitions, an optional group, `.`, escapes.
    let grammar = "root ::= greeting \", \" name tail\n\
                   greeting ::= \"hi\" | \"hello\"\n\
                   name ::= [A-Z] [a-z]{1,5} (\"-\" [A-Z] [a-z]{1,5})?\n\
                   tail ::= \"!\" | \"\\x3F\" . # any one character after a question mark\n";
    let model = model("llama");
    for (text, member) in [
        ("hi, Bob!", true),
        ("hello, Ann-Marie!", true),
        ("hi, Zo?\n", true),
        ("hi, Bo?é", true),
        ("hey, Bob!", false),
        ("hi, bob!", false),
        ("hi, Bobbbbbb!", false),
        ("hi, Bob", false),
        ("hi, Bob?", false),
        ("hi, Ann-!", false),
        ("hi, Bob!!", false),
    ] {
        assert_eq!(accepts(&model, grammar, text), member, "{text:?}");
    }
    let err = model
        .constraint(ConstraintKind::Gbnf, "root ::= undefined-rule\n")
        .unwrap_err();
    assert!(err.to_string().contains("undefined-rule"), "{err}");
}
