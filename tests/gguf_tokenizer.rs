//! The tokenizer Ember rebuilds from GGUF metadata against Hugging Face's original tokenizers
//! (references made by `scripts/make_tokenizer_reference.py`).
//!
//! - SmolLM2: the GGUF file `scripts/fetch-model` downloads, against SmolLM2's tokenizer.json.
//! - GPT-2: GGUF metadata written here from `tests/fixtures/tokenizers/gpt2` the way llama.cpp's
//!   converter writes it, against GPT-2's Hugging Face tokenizer.
//!
//! Set `EMBER_LLAMA_CPP_MODELS` to llama.cpp's `models/` folder to also check its vocabulary-only
//! GGUF files (`ggml-vocab-*.gguf`) against the Hugging Face ids in their `.gguf.out` files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::loader::gguf::{GgufFile, GgufMetadata, GgufValue};
use ember::tensor::Storage;
use ember::{ChatMessage, Error, Tokenizer};
use serde_json::Value;

mod common;
use common::{compare_with_reference, json, tokenizer_fixtures};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The default model's metadata, or `None` (test skipped) when it has not been fetched.
fn smollm2_metadata() -> Option<GgufMetadata> {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        assert!(
            std::env::var("EMBER_REQUIRE_MODEL").as_deref() != Ok("1"),
            "{} is missing and EMBER_REQUIRE_MODEL=1",
            path.display()
        );
        println!("SKIPPED: run scripts/fetch-model");
        return None;
    }
    Some(GgufFile::open(&path).unwrap().metadata)
}

#[test]
fn smollm2_gguf_tokenizer_matches_hugging_face_on_the_corpus() {
    let Some(meta) = smollm2_metadata() else {
        return;
    };
    let tok = Tokenizer::from_gguf(&meta).unwrap().expect("a tokenizer");
    let matched = compare_with_reference(&tok, "smollm2");
    println!("smollm2: {matched} corpus strings match Hugging Face");
}

#[test]
fn smollm2_gguf_tokenizer_json_is_smollm2s_tokenizer_json() {
    let Some(meta) = smollm2_metadata() else {
        return;
    };
    let (built, settings) = ember::tokenizer::tokenizer_json_from_gguf(&meta)
        .unwrap()
        .unwrap();
    let hf = json("smollm2/tokenizer.json");
    // Section by section for readable failures, then the whole document.
    for key in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(built[key], hf[key], "{key}");
    }
    assert_eq!(built["model"]["vocab"], hf["model"]["vocab"]);
    assert_eq!(built["model"]["merges"], hf["model"]["merges"]);
    assert_eq!(built, hf);
    let config = json("smollm2/tokenizer_config.json");
    assert_eq!(settings.bos_token.as_deref(), config["bos_token"].as_str());
    assert_eq!(settings.eos_token.as_deref(), config["eos_token"].as_str());
    assert_eq!(
        settings.chat_template.as_deref(),
        config["chat_template"].as_str()
    );
    assert!(settings.extra_stop_ids.is_empty());
}

#[test]
fn smollm2_gguf_special_tokens_and_chat_template_match_hugging_face() {
    let Some(meta) = smollm2_metadata() else {
        return;
    };
    let tok = Tokenizer::from_gguf(&meta).unwrap().unwrap();
    let hf = Tokenizer::from_hf_folder(&tokenizer_fixtures().join("smollm2"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (tok.bos(), tok.eos(), tok.eot()),
        (hf.bos(), hf.eos(), hf.eot())
    );
    assert_eq!(
        (tok.bos(), tok.eos(), tok.eot()),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(tok.stop_tokens(), hf.stop_tokens());
    assert_eq!(tok.n_vocab(), hf.n_vocab());
    for id in 0..tok.n_vocab() as u32 {
        assert_eq!(tok.token_text(id), hf.token_text(id), "token {id}");
    }

    let chat = json("chat.json");
    let template = &chat["templates"]["smollm2"];
    assert_eq!(template["bos_token"].as_str(), Some("<|im_start|>"));
    assert_eq!(template["eos_token"].as_str(), Some("<|im_end|>"));
    let mut compared = 0;
    for case in chat["cases"].as_array().unwrap() {
        if case["template"] != "smollm2" {
            continue;
        }
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(&messages, add_generation_prompt);
        match (&case["text"], got) {
            (Value::String(want), Ok(got)) => assert_eq!(&got, want, "{case}"),
            (want, got) => panic!("{case}: expected {want}, got {got:?}"),
        }
        compared += 1;
    }
    assert!(compared >= 10, "{compared} smollm2 chat cases");
}

/// GGUF metadata for GPT-2 written from its Hugging Face tokenizer.json, as llama.cpp's
/// converter writes it (tokens by id, added special tokens as control tokens, "a b" merges).
fn gpt2_metadata() -> GgufMetadata {
    let hf = json("gpt2/tokenizer.json");
    let vocab = hf["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    let mut types = vec![1; vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    for added in hf["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap() as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, String::new());
            types.resize(id + 1, 1);
        }
        tokens[id] = added["content"].as_str().unwrap().to_string();
        types[id] = if added["special"] == true { 3 } else { 4 };
    }
    let merges: Vec<GgufValue> = hf["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            GgufValue::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let strings = |v: Vec<String>| GgufValue::Array(v.into_iter().map(GgufValue::String).collect());
    let mut meta = GgufMetadata::default();
    let mut set = |k: &str, v: GgufValue| meta.entries.insert(k.to_string(), v);
    set("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    set("tokenizer.ggml.pre", GgufValue::String("gpt-2".into()));
    set("tokenizer.ggml.tokens", strings(tokens));
    set(
        "tokenizer.ggml.token_type",
        GgufValue::Array(types.into_iter().map(GgufValue::Int).collect()),
    );
    set("tokenizer.ggml.merges", GgufValue::Array(merges));
    set("tokenizer.ggml.bos_token_id", GgufValue::Int(50256));
    set("tokenizer.ggml.eos_token_id", GgufValue::Int(50256));
    meta
}

#[test]
fn gpt2_from_gguf_metadata_matches_hugging_face_on_the_corpus() {
    let tok = Tokenizer::from_gguf(&gpt2_metadata()).unwrap().unwrap();
    assert_eq!((tok.bos(), tok.eos()), (Some(50256), Some(50256)));
    assert!(tok.chat_template().is_none());
    let matched = compare_with_reference(&tok, "gpt2");
    println!("gpt2: {matched} corpus strings match Hugging Face");
}

#[test]
fn an_unknown_pre_tokenizer_in_real_metadata_is_refused() {
    let mut meta = gpt2_metadata();
    meta.entries.insert(
        "tokenizer.ggml.pre".into(),
        GgufValue::String("deepseek-coder".into()),
    );
    match Tokenizer::from_gguf(&meta) {
        Err(Error::Unsupported(m)) => assert!(m.contains("deepseek-coder"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    meta.entries.remove("tokenizer.ggml.model");
    assert!(Tokenizer::from_gguf(&meta).unwrap().is_none());
}

/// The metadata of a GGUF file without tensors. Such files may end before the (empty) aligned
/// tensor data, which the loader reports as truncated, so the bytes are padded first.
fn vocab_only_metadata(path: &Path) -> GgufMetadata {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len().div_ceil(64) * 64;
    bytes.resize(len, 0);
    let words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let storage = Storage::Owned { words, len };
    GgufFile::parse(Arc::new(storage)).unwrap().metadata
}

/// llama.cpp's vocabulary-only GGUF files with the Hugging Face ids of their test strings
/// (`<name>.gguf.inp` / `.gguf.out`, written by llama.cpp's convert_hf_to_gguf_update.py with
/// `AutoTokenizer.encode(text, add_special_tokens=False)`). Runs when `EMBER_LLAMA_CPP_MODELS`
/// names llama.cpp's `models/` folder.
#[test]
fn llama_cpp_vocab_files_match_their_hugging_face_ids() {
    let Ok(dir) = std::env::var("EMBER_LLAMA_CPP_MODELS") else {
        println!("SKIPPED: set EMBER_LLAMA_CPP_MODELS to llama.cpp's models/ folder");
        return;
    };
    let dir = PathBuf::from(dir);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| {
            let file = entry.unwrap().file_name().into_string().ok()?;
            let name = file
                .strip_prefix("ggml-vocab-")?
                .strip_suffix(".gguf.out")?;
            Some(name.to_string())
        })
        .collect();
    names.sort();
    let mut checked = 0;
    for name in &names {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let meta = vocab_only_metadata(&path);
        let tok = match Tokenizer::from_gguf(&meta) {
            Ok(tok) => tok.unwrap(),
            Err(Error::Unsupported(m)) => {
                println!("{name}: unsupported ({m})");
                continue;
            }
            Err(e) => panic!("{name}: {e}"),
        };
        let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
        let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let expected: Vec<&str> = out.lines().collect();
        assert_eq!(texts.len(), expected.len() + 1, "{name}: test count");
        let mut failures = Vec::new();
        for (text, want) in texts.iter().zip(&expected) {
            let want: Vec<u32> = want
                .split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect();
            let got = tok.encode(text, false, true).unwrap();
            if got != want {
                failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{name}: {failures:#?}");
        println!("{name}: {} strings match", expected.len());
        checked += 1;
    }
    assert!(checked > 0);
}
