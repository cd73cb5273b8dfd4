//! GGUF files: the tiny fixtures of `scripts/make_gguf_fixtures.py` in llama.cpp's layout
//! (F32 ones are also checked against transformers in `tests/engine.rs`), quantized files
//! against llama.cpp's logits, corrupt files, and conversion to Hugging Face folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::loader::gguf::GgufFile;

mod common;
use common::max_abs_diff;
use ember::tensor::{DType, Storage};
use ember::{Error, Model, Session, SessionOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn all_logits(model: Model, tokens: &[u32]) -> Vec<f32> {
    let vocab = model.n_vocab();
    let options = SessionOptions {
        n_ctx: 64,
        n_threads: 2,
        ubatch: 5,
        ..Default::default()
    };
    let mut session = Session::new(Arc::new(model), &options).unwrap();
    let mut out = vec![0.0; tokens.len() * vocab];
    session.step_all(tokens, &mut out).unwrap();
    out
}

#[test]
fn quantized_files_match_llama_cpp() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let tokens: Vec<u32> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    // Logits here reach about 6 in magnitude. llama.cpp keeps its key/value cache in f16
    // (5e-3 from Ember on the F32 file). Both engines quantize activations to 8 bits per block
    // for quantized weights, rounding differently (measured: 0.12-0.14 apart), while the weight
    // quantization itself moves llama.cpp's logits by 0.39 (Q8_0) and 2.4-2.7 (Q4_0, Q4_1)
    // from the F32 file's: a kernel that misread a format would be far outside these bounds.
    for (file, dtype, tolerance) in [
        ("llama.F32.gguf", "F32", 1e-2),
        ("llama.Q8_0.gguf", "Q8_0", 0.2),
        ("llama.Q4_0.gguf", "Q4_0", 0.2),
        ("llama.Q4_1.gguf", "Q4_1", 0.2),
    ] {
        let model = Model::load(fixture(file)).unwrap();
        assert_eq!(model.weight_dtype(), dtype);
        let ours = all_logits(model, &tokens);
        let theirs: Vec<f32> = reference["logits"][file]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let err = max_abs_diff(&ours, &theirs);
        eprintln!("{file}: max abs difference from llama.cpp {err:.2e}");
        assert!(err < tolerance, "{file}: {err}");
    }
}

/// Parses `bytes` as a GGUF file held in memory.
fn parse(bytes: &[u8]) -> Result<GgufFile, Error> {
    GgufFile::parse(Arc::new(Storage::owned(bytes).unwrap()))
}

#[test]
fn every_truncation_and_corruption_is_an_error_not_a_panic() {
    let bytes = std::fs::read(fixture("llama.Q4_1.gguf")).unwrap();
    parse(&bytes).unwrap();
    // Every cut inside the metadata and tensor infos, and a few inside the data.
    let header_end = 40_000.min(bytes.len());
    for cut in (0..header_end).step_by(7).chain([bytes.len() - 1]) {
        match parse(&bytes[..cut]) {
            Err(Error::BadFormat(_)) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // Bytes overwritten with pseudo-random values: any outcome but a panic or a huge
    // allocation (the process would abort).
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..3000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut corrupt = bytes.clone();
        let at = (state as usize) % header_end;
        corrupt[at] = (state >> 32) as u8;
        if (state >> 40) & 1 == 1 {
            corrupt[(at + 1) % header_end] = 0xFF;
        }
        let _ = parse(&corrupt);
    }
    let mut wrong = bytes.clone();
    wrong[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(parse(&wrong), Err(Error::Unsupported(_))));
    wrong[..4].copy_from_slice(b"GGML");
    assert!(matches!(parse(&wrong), Err(Error::BadFormat(_))));
    // A tensor count far beyond what the file could describe.
    let mut wrong = bytes.clone();
    wrong[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(matches!(parse(&wrong), Err(Error::BadFormat(_))));
}

#[test]
fn metadata_arrays_cannot_grow_past_their_cap() {
    // A well-formed file whose one metadata array holds 9M one-byte items: each would cost
    // far more in memory than on disk, so the total is capped.
    let n: u64 = 9 << 20;
    let mut bytes = Vec::new();
    bytes.extend(b"GGUF");
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes()); // metadata pairs
    bytes.extend(1u64.to_le_bytes());
    bytes.push(b'k');
    bytes.extend(9u32.to_le_bytes()); // array
    bytes.extend(0u32.to_le_bytes()); // of u8
    bytes.extend(n.to_le_bytes());
    bytes.resize(bytes.len() + n as usize, 7);
    match parse(&bytes) {
        Err(Error::BadFormat(msg)) => assert!(msg.contains("more than"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    // The same file with a small array parses.
    let small: u64 = 1000;
    let header_len = bytes.len() - n as usize - 8;
    let mut ok = bytes[..header_len].to_vec();
    ok.extend(small.to_le_bytes());
    ok.resize(ok.len() + small as usize, 7);
    let file = parse(&ok).unwrap();
    assert!(file.tensors.is_empty());
}

#[test]
fn a_truncated_file_on_disk_names_the_file() {
    let dir = std::env::temp_dir().join(format!("ember-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cut.gguf");
    let bytes = std::fs::read(fixture("llama.Q8_0.gguf")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    match Model::load(&path) {
        Err(Error::BadFormat(msg)) => {
            assert!(
                msg.contains("cut.gguf") && msg.contains("outside the file"),
                "{msg}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_metadata_gives_the_tokenizer_and_chat_template() {
    // The fixtures' tokenizer as tokenizer.ggml.* must equal its tokenizer.json.
    for name in ["llama", "qwen2", "gpt2"] {
        let gguf = Model::load(fixture(&format!("{name}.F32.gguf"))).unwrap();
        let folder = Model::load(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap();
        let (a, b) = (gguf.tokenizer().unwrap(), folder.tokenizer().unwrap());
        for text in [
            "Hello, world!",
            "  tabs\tand\nnewlines 12345",
            "héllo ✓ <|im_start|>",
        ] {
            for parse_special in [false, true] {
                assert_eq!(
                    a.encode(text, true, parse_special).unwrap(),
                    b.encode(text, true, parse_special).unwrap(),
                    "{name}: {text:?}"
                );
            }
        }
        assert_eq!((a.bos(), a.eos()), (b.bos(), b.eos()), "{name}");
        let messages = [ember::ChatMessage::new("user", "Hi there")];
        assert_eq!(
            a.apply_chat_template(&messages, true).unwrap(),
            b.apply_chat_template(&messages, true).unwrap()
        );
    }
}

#[test]
fn converted_folders_give_the_gguf_logits() {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 300).collect();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("converted");
    for name in ["qwen2.F32", "gpt2.F32", "llama.Q8_0"] {
        let file = fixture(&format!("{name}.gguf"));
        let expected = all_logits(Model::load(&file).unwrap(), &tokens);
        if name.starts_with("llama") {
            // RoPE frequency factors (Llama 3 scaling in GGUF) have no exact config.json form.
            let err = ember::convert::gguf_to_hf_folder(&file, &out.join(name), DType::F32);
            assert!(matches!(err, Err(Error::Unsupported(_))), "{err:?}");
            continue;
        }
        for dtype in [DType::F32, DType::BF16] {
            let dir = out.join(format!("{name}-{}", dtype.name()));
            ember::convert::gguf_to_hf_folder(&file, &dir, dtype).unwrap();
            let model = Model::load(&dir).unwrap();
            assert_eq!(model.weight_dtype(), dtype.name());
            let got = all_logits(model, &tokens);
            let err = max_abs_diff(&got, &expected);
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 0.1 };
            eprintln!(
                "{name} converted to {}: max abs difference {err:.2e}",
                dtype.name()
            );
            assert!(err <= tolerance, "{name} {}: {err}", dtype.name());
        }
    }
}

/// llama.cpp's logits of `file` in a reference JSON, flattened.
fn reference_logits(reference: &serde_json::Value, key: &str) -> Vec<f32> {
    reference["logits"][key]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn every_quantization_mix_of_llama_cpps_quantizer_matches_llama_cpp() {
    // scripts/make_kquant_fixtures.py: a random Llama of 256-wide rows converted by llama.cpp
    // and quantized by its quantizer into every mix; llama.cpp's logits on each.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kquant");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tokens: Vec<u32> = reference["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let exact = reference_logits(&reference, "F32");
    let types = reference["types"].as_object().unwrap();
    assert_eq!(types.len(), 9);
    for (mix, counts) in types {
        let model = Model::load(dir.join(format!("{mix}.gguf"))).unwrap();
        // The file holds the types llama.cpp's quantizer chose, and Ember reads them all.
        for (dtype, n) in counts.as_object().unwrap() {
            assert_eq!(
                model.tensor_type_counts().get(dtype.as_str()).copied(),
                Some(n.as_u64().unwrap() as usize),
                "{mix}: {dtype}"
            );
        }
        let ours = all_logits(model, &tokens);
        let theirs = reference_logits(&reference, mix);
        let err = max_abs_diff(&ours, &theirs);
        // How far the weight quantization moves the logits, in each engine.
        let (ours_f32, theirs_f32) = (mean_abs_diff(&ours, &exact), mean_abs_diff(&theirs, &exact));
        eprintln!(
            "{mix}: max |ember - llama.cpp| {err:.3}; mean |logit - F32|: ember {ours_f32:.4}, \
             llama.cpp {theirs_f32:.4}"
        );
        assert!(err < 0.25, "{mix}: {err}");
        assert!(
            ours_f32 <= theirs_f32 * 1.1 + 1e-3,
            "{mix}: {ours_f32} vs {theirs_f32}"
        );
    }
}
