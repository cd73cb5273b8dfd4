//! The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata.
//!
//! GGUF keeps a tokenizer as arrays (`tokens`, `token_type`, `merges`, `scores`) plus a few
//! names and ids. Ember turns them back into the `tokenizer.json` that Hugging Face's
//! `tokenizers` crate reads, so that the GGUF tokenizer equals the model's original Hugging Face
//! tokenizer token for token.
//!
//! What GGUF does not store is the pre-tokenizer: `tokenizer.ggml.pre` only names it (the name
//! llama.cpp's converter chose by hashing the Hugging Face tokenizer's output on a test text).
//! Each name Ember knows maps onto the pre-tokenizer of the Hugging Face `tokenizer.json` behind
//! it; any other name is [`Error::Unsupported`], never a guess.
//!
//! Supported:
//! - `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with `tokenizer.ggml.pre` one of
//!   `gpt-2` (alias `gpt2`), `smollm`, `qwen2`, `llama-bpe` (Llama 3). Not `default`: llama.cpp
//!   gives that name (or a missing key) its own regex set, which no Hugging Face tokenizer has.
//! - `tokenizer.ggml.model = "llama"` (SentencePiece BPE with byte fallback; the pre-tokenizer
//!   name is ignored, as llama.cpp ignores it). Laid out like the tokenizer.json published with
//!   Llama 2, Mistral 7B v0.1 or Phi-3 (transformers' "legacy" conversion), which tokenizes as
//!   SentencePiece itself does. transformers 5 converts a `tokenizer.model` differently
//!   (`Metaspace` with `prepend_scheme: first`, merges in id order), which differs on leading
//!   spaces and on pieces whose score does not follow their id; GGUF does not record which
//!   conversion a model's repository used.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{Tokenizer, TokenizerSettings};
use crate::error::{Error, Result};
use crate::loader::gguf::{GgufMetadata, GgufValue};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const SCORES: &str = "tokenizer.ggml.scores";
const MERGES: &str = "tokenizer.ggml.merges";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Special-token id keys that are only validated (Ember does not otherwise use them).
const OTHER_ID_KEYS: [&str; 5] = [
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.mask_token_id",
];

/// The `Split` regex of Llama 3's tokenizer.json (digits in runs of up to three).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `Split` regex of Qwen2's tokenizer.json (one digit at a time).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `Split` regex of the o200k tokenizer.json files (GPT-4o, Phi-4-mini): words keep their
/// case runs together, contractions attach, numbers in threes.
const O200K_REGEX: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// The pre-tokenizer names Ember supports for byte-level BPE, for error messages.
const KNOWN_PRE: &str = "gpt-2, smollm, refact, qwen2, llama-bpe, smaug-bpe, gpt-4o";

/// GGUF token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i128) -> Option<TokenType> {
        Some(match code {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// The vocabulary arrays of the file, checked against each other.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<TokenType>,
    /// `tokenizer.ggml.scores`, when present.
    scores: Option<Vec<f64>>,
}

impl Vocab<'_> {
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn missing(key: &str) -> Error {
    Error::format(format!("GGUF metadata {key} is missing"))
}

/// An array of numbers (any integer or float type) as f64.
fn f64_array(meta: &GgufMetadata, key: &str) -> Result<Option<Vec<f64>>> {
    match meta.get(key) {
        None => Ok(None),
        Some(GgufValue::Array(items)) => items
            .iter()
            .map(|v| match v {
                GgufValue::Float(f) => Ok(*f),
                GgufValue::Int(i) => Ok(*i as f64),
                _ => Err(Error::format(format!(
                    "GGUF metadata {key} is not an array of numbers"
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(Error::format(format!(
            "GGUF metadata {key} is not an array"
        ))),
    }
}

fn check_len(key: &str, len: usize, n_tokens: usize) -> Result<()> {
    if len == n_tokens {
        Ok(())
    } else {
        Err(Error::format(format!(
            "GGUF metadata {key} has {len} entries but {TOKENS} has {n_tokens}"
        )))
    }
}

fn read_vocab(meta: &GgufMetadata) -> Result<Vocab<'_>> {
    let tokens = meta.str_array(TOKENS)?.ok_or_else(|| missing(TOKENS))?;
    if tokens.is_empty() {
        return Err(Error::format(format!("GGUF metadata {TOKENS} is empty")));
    }
    if tokens.len() > super::MAX_VOCAB {
        return Err(Error::format(format!(
            "GGUF metadata {TOKENS} has {} tokens, more than the {} accepted",
            tokens.len(),
            super::MAX_VOCAB
        )));
    }
    let codes = meta
        .int_array(TOKEN_TYPE)?
        .ok_or_else(|| missing(TOKEN_TYPE))?;
    check_len(TOKEN_TYPE, codes.len(), tokens.len())?;
    let types = codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            TokenType::from_code(code).ok_or_else(|| {
                Error::format(format!(
                    "GGUF metadata {TOKEN_TYPE}[{i}] is {code}, not a token type (1 to 6)"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let scores = f64_array(meta, SCORES)?;
    if let Some(scores) = &scores {
        check_len(SCORES, scores.len(), tokens.len())?;
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        if let Some(first) = seen.insert(token, id) {
            return Err(Error::format(format!(
                "GGUF metadata {TOKENS}: token {token:?} appears twice (ids {first} and {id})"
            )));
        }
    }
    Ok(Vocab {
        tokens,
        types,
        scores,
    })
}

/// A special-token id, checked against the vocabulary.
fn special_id(meta: &GgufMetadata, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    match meta.usize(key)? {
        None => Ok(None),
        Some(id) if id < n_tokens => Ok(Some(id as u32)),
        Some(id) => Err(Error::format(format!(
            "GGUF metadata {key} is {id}, outside the vocabulary of {n_tokens} tokens"
        ))),
    }
}

/// The `added_tokens` of tokenizer.json: control and unknown tokens as special tokens,
/// user-defined tokens as ordinary added tokens. All are matched in the raw text, before
/// normalization: llama.cpp's converter stores them in that form (it rewrites a user-defined
/// token's "▁" as a space).
fn added_tokens(vocab: &Vocab) -> Vec<Value> {
    vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .enumerate()
        .filter_map(|(id, (&content, &kind))| {
            let special = match kind {
                TokenType::Control | TokenType::Unknown => true,
                TokenType::UserDefined => false,
                _ => return None,
            };
            Some(json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": special,
            }))
        })
        .collect()
}

/// `TemplateProcessing` that adds BOS before and EOS after each sequence, as requested (the
/// layout of Hugging Face's Llama tokenizers). With neither it leaves the ids as they are.
fn post_processor(vocab: &Vocab, bos: Option<u32>, eos: Option<u32>) -> Value {
    let special = |id: u32, type_id: u32| {
        let text = vocab.tokens[id as usize];
        json!({"SpecialToken": {"id": text, "type_id": type_id}})
    };
    let sequence = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        out.extend(bos.map(|id| special(id, type_id)));
        out.push(sequence(name, type_id));
        out.extend(eos.map(|id| special(id, type_id)));
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = Map::new();
    for id in bos.into_iter().chain(eos) {
        let text = vocab.tokens[id as usize];
        special_tokens.insert(
            text.to_string(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// The BOS/EOS ids the post-processor adds, from `add_bos_token` / `add_eos_token` (with the
/// defaults llama.cpp applies when a key is absent).
fn added_specials(
    meta: &GgufMetadata,
    bos: Option<u32>,
    eos: Option<u32>,
    default_add_bos: bool,
) -> Result<(Option<u32>, Option<u32>)> {
    let add_bos = meta.bool(ADD_BOS)?.unwrap_or(default_add_bos);
    let add_eos = meta.bool(ADD_EOS)?.unwrap_or(false);
    let pick = |add: bool, id: Option<u32>, add_key: &str, id_key: &str| match (add, id) {
        (false, _) => Ok(None),
        (true, Some(id)) => Ok(Some(id)),
        (true, None) => Err(Error::format(format!(
            "GGUF metadata {add_key} asks for a token that {id_key} does not give"
        ))),
    };
    Ok((
        pick(add_bos, bos, ADD_BOS, BOS_ID)?,
        pick(add_eos, eos, ADD_EOS, EOS_ID)?,
    ))
}

fn byte_level(use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": use_regex,
    })
}

/// A regex `Split` (matches kept as pieces) followed by byte-level mapping without GPT-2's regex.
fn split_then_byte_level(regex: &str) -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": regex},
                "behavior": "Isolated",
                "invert": false,
            },
            byte_level(false),
        ],
    })
}

/// Normalizer, pre-tokenizer, `ignore_merges` and the default of `add_bos_token` for a
/// byte-level BPE pre-tokenizer name.
struct BytePre {
    normalizer: Value,
    pre_tokenizer: Value,
    ignore_merges: bool,
    default_add_bos: bool,
}

fn byte_level_pre(name: Option<&str>) -> Result<BytePre> {
    let plain = |pre_tokenizer| BytePre {
        normalizer: Value::Null,
        pre_tokenizer,
        ignore_merges: false,
        default_add_bos: false,
    };
    Ok(match name {
        // GPT-2: its regex, built into ByteLevel.
        Some("gpt-2" | "gpt2") => plain(byte_level(true)),
        // SmolLM / SmolLM2, Granite 3 ("refact", StarCoder's): every digit on its own, then
        // GPT-2's byte-level regex.
        Some("smollm" | "refact") => plain(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ],
        })),
        // Qwen2 / Qwen2.5 / Qwen3: NFC, then the Qwen2 regex.
        Some("qwen2") => BytePre {
            normalizer: json!({"type": "NFC"}),
            ..plain(split_then_byte_level(QWEN2_REGEX))
        },
        // Llama 3: its regex; whole pieces found in the vocabulary skip the merges; BOS added.
        Some("llama-bpe") => BytePre {
            ignore_merges: true,
            default_add_bos: true,
            ..plain(split_then_byte_level(LLAMA3_REGEX))
        },
        // SmolLM3 (Smaug's name for Llama 3's regex, with the merges applied as usual).
        Some("smaug-bpe") => plain(split_then_byte_level(LLAMA3_REGEX)),
        // Phi-4-mini: the o200k regex.
        Some("gpt-4o") => plain(split_then_byte_level(O200K_REGEX)),
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} ({PRE}) is not supported; Ember knows {KNOWN_PRE}"
            )))
        }
        None => {
            return Err(Error::Unsupported(format!(
                "the GGUF file does not name its pre-tokenizer ({PRE} is missing), so its \
                 tokenization cannot be reproduced; convert the model again with a current \
                 llama.cpp (Ember knows {KNOWN_PRE})"
            )))
        }
    })
}

/// A merge: the left and right tokens it joins.
type Merge<'a> = (&'a str, &'a str);

/// `tokenizer.ggml.merges` as pairs, each checked against the vocabulary.
fn read_merges<'a>(meta: &'a GgufMetadata, vocab: &Vocab) -> Result<Vec<Merge<'a>>> {
    let merges = meta.str_array(MERGES)?.ok_or_else(|| {
        Error::format(format!(
            "GGUF metadata {MERGES} is missing (a BPE tokenizer needs its merges)"
        ))
    })?;
    if merges.len() > super::MAX_MERGES {
        return Err(Error::format(format!(
            "GGUF metadata {MERGES} has {} merges, more than the {} accepted",
            merges.len(),
            super::MAX_MERGES
        )));
    }
    let known: HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t, id))
        .collect();
    let mut joined = String::new();
    merges
        .into_iter()
        .enumerate()
        .map(|(i, merge)| {
            let bad =
                |why: &str| Error::format(format!("GGUF metadata {MERGES}[{i}] {merge:?}: {why}"));
            let (left, right) = merge
                .split_once(' ')
                .filter(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains(' '))
                .ok_or_else(|| bad("not two tokens separated by one space"))?;
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            for part in [left, right, joined.as_str()] {
                if !known.contains_key(part) {
                    return Err(bad(&format!("{part:?} is not in the vocabulary")));
                }
            }
            Ok((left, right))
        })
        .collect()
}

/// tokenizer.json for a byte-level BPE (`tokenizer.ggml.model = "gpt2"`), but for its
/// model's vocabulary and merges, and the merges.
fn byte_level_bpe_json<'a>(
    meta: &'a GgufMetadata,
    vocab: &Vocab,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<(Value, Vec<Merge<'a>>)> {
    let pre = byte_level_pre(meta.str(PRE)?)?;
    if meta.bool(ADD_SPACE_PREFIX)? == Some(true) {
        return Err(Error::Unsupported(format!(
            "{ADD_SPACE_PREFIX} = true on a byte-level BPE tokenizer"
        )));
    }
    let merges = read_merges(meta, vocab)?;
    let (add_bos, add_eos) = added_specials(meta, bos, eos, pre.default_add_bos)?;
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(vocab),
        "normalizer": pre.normalizer,
        "pre_tokenizer": pre.pre_tokenizer,
        "post_processor": post_processor(vocab, add_bos, add_eos),
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
        },
    });
    Ok((json, merges))
}

/// A GGUF file's tokenizer, ready to become a `tokenizer.json` or a tokenizer: the
/// `tokenizer.json` but for its model's vocabulary and merges, those, and the settings.
struct GgufTokenizer<'a> {
    json: Value,
    tokens: Vec<&'a str>,
    merges: Vec<Merge<'a>>,
    settings: TokenizerSettings,
}

fn gguf_tokenizer(meta: &GgufMetadata) -> Result<Option<GgufTokenizer<'_>>> {
    let Some(model) = meta.str(MODEL)? else {
        return Ok(None);
    };
    let vocab = read_vocab(meta)?;
    let n = vocab.len();
    let bos = special_id(meta, BOS_ID, n)?;
    let eos = special_id(meta, EOS_ID, n)?;
    let eot = special_id(meta, EOT_ID, n)?;
    let eom = special_id(meta, EOM_ID, n)?;
    for key in OTHER_ID_KEYS {
        special_id(meta, key, n)?;
    }
    let (json, merges) = match model {
        "gpt2" => byte_level_bpe_json(meta, &vocab, bos, eos)?,
        "llama" => sentencepiece_bpe_json(meta, &vocab, bos, eos)?,
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model {other:?} ({MODEL}); Ember supports \"gpt2\" (byte-level \
                 BPE) and \"llama\" (SentencePiece BPE)"
            )))
        }
    };
    let text = |id: Option<u32>| id.map(|id| vocab.tokens[id as usize].to_string());
    let settings = TokenizerSettings {
        bos_token: text(bos),
        eos_token: text(eos),
        extra_stop_ids: eot.into_iter().chain(eom).collect(),
        chat_template: meta.str(CHAT_TEMPLATE)?.map(str::to_string),
        chat_template_origin: format!("the chat template of the GGUF file ({CHAT_TEMPLATE})"),
    };
    Ok(Some(GgufTokenizer {
        json,
        tokens: vocab.tokens,
        merges,
        settings,
    }))
}

/// The Hugging Face `tokenizer.json` (as a JSON value) and the settings of the tokenizer a
/// GGUF file describes, or `None` when the file has no `tokenizer.ggml.model`.
///
/// For conversion to a Hugging Face folder; [`tokenizer_from_gguf`] builds the same tokenizer
/// without writing its vocabulary and merges out as JSON.
pub fn tokenizer_json_from_gguf(meta: &GgufMetadata) -> Result<Option<(Value, TokenizerSettings)>> {
    let Some(t) = gguf_tokenizer(meta)? else {
        return Ok(None);
    };
    let mut json = t.json;
    let mut vocab = Map::with_capacity(t.tokens.len());
    for (id, &token) in t.tokens.iter().enumerate() {
        vocab.insert(token.to_string(), json!(id));
    }
    let merges: Vec<Value> = t.merges.iter().map(|(l, r)| json!([l, r])).collect();
    json["model"]["vocab"] = Value::Object(vocab);
    json["model"]["merges"] = Value::Array(merges);
    Ok(Some((json, t.settings)))
}

/// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (with its
/// chat template), equal to the model's original Hugging Face tokenizer. `Ok(None)` when the
/// file has no `tokenizer.ggml.model`.
///
/// Errors: [`Error::BadFormat`] for missing, mistyped or inconsistent metadata (array lengths,
/// special ids outside the vocabulary, merges of unknown tokens); [`Error::Unsupported`] for a
/// tokenizer model or pre-tokenizer Ember does not know.
pub fn tokenizer_from_gguf(meta: &GgufMetadata) -> Result<Option<Tokenizer>> {
    let Some(t) = gguf_tokenizer(meta)? else {
        return Ok(None);
    };
    let in_gguf = |e: Error| match e {
        Error::BadFormat(m) => Error::BadFormat(format!("tokenizer from GGUF metadata: {m}")),
        other => other,
    };
    let vocab: tokenizers::models::bpe::Vocab = t
        .tokens
        .iter()
        .enumerate()
        .map(|(id, &token)| (token.to_string(), id as u32))
        .collect();
    let merges = t
        .merges
        .iter()
        .map(|&(l, r)| (l.to_string(), r.to_string()))
        .collect();
    let model = super::build::bpe(&t.json["model"], vocab, merges).map_err(in_gguf)?;
    let built = super::build::assemble(&t.json, model).map_err(in_gguf)?;
    Tokenizer::from_built(built, t.settings)
        .map(Some)
        .map_err(in_gguf)
}

impl Tokenizer {
    /// The tokenizer of a GGUF file's metadata; see [`tokenizer_from_gguf`].
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Option<Tokenizer>> {
        tokenizer_from_gguf(meta)
    }
}

/// Merges for a SentencePiece BPE vocabulary, derived from the pieces and their scores as
/// Hugging Face's converter derives them: every way to cut a piece into two pieces of the
/// vocabulary is a merge, ranked by the score of the piece it makes (highest first); ties keep
/// piece id order, and the cuts of one piece are ordered by the ids of their left, then right
/// parts.
fn merges_from_scores<'a>(vocab: &Vocab<'a>, scores: &[f64]) -> Result<Vec<Merge<'a>>> {
    merges_from_scores_capped(vocab, scores, super::MAX_MERGES)
}

/// [`merges_from_scores`], failing when there are more than `cap` merges.
fn merges_from_scores_capped<'a>(
    vocab: &Vocab<'a>,
    scores: &[f64],
    cap: usize,
) -> Result<Vec<Merge<'a>>> {
    /// Pieces longer than this (in bytes) take no part in merges.
    const MAX_PIECE_BYTES: usize = 128;
    let ids: HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t, id))
        .collect();
    // (score, left id, right id, left, right) in piece id order.
    let mut merges: Vec<(f64, usize, usize, &'a str, &'a str)> = Vec::new();
    for (&piece, &score) in vocab.tokens.iter().zip(scores) {
        // Every cut of a piece is a candidate: long pieces would make this quadratic in
        // their length (and a hostile vocabulary cubic in memory). Real pieces are short.
        if piece.len() > MAX_PIECE_BYTES {
            continue;
        }
        let start = merges.len();
        for (cut, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(cut);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                if merges.len() == cap {
                    return Err(Error::format(format!(
                        "GGUF metadata {TOKENS}: the pieces make more than {cap} merges"
                    )));
                }
                merges.push((score, l, r, left, right));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r, _, _)| (l, r));
    }
    // Stable: equal scores keep the order above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(merges
        .into_iter()
        .map(|(_, _, _, left, right)| (left, right))
        .collect())
}

/// tokenizer.json for a SentencePiece BPE with byte fallback (`tokenizer.ggml.model =
/// "llama"`), laid out as Hugging Face's Llama converter writes it: spaces become "▁" and one
/// "▁" is prepended (normalizer), unknown characters fall back to byte tokens `<0xXX>`, and the
/// decoder undoes both. As [`byte_level_bpe_json`], without the model's vocabulary and merges.
fn sentencepiece_bpe_json<'a>(
    meta: &'a GgufMetadata,
    vocab: &Vocab<'a>,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<(Value, Vec<Merge<'a>>)> {
    if meta.bool("tokenizer.ggml.remove_extra_whitespaces")? == Some(true) {
        return Err(Error::Unsupported(
            "tokenizer.ggml.remove_extra_whitespaces = true on a SentencePiece tokenizer".into(),
        ));
    }
    if meta.get("tokenizer.ggml.precompiled_charsmap").is_some() {
        return Err(Error::Unsupported(
            "SentencePiece normalization rules (tokenizer.ggml.precompiled_charsmap)".into(),
        ));
    }
    let merges = if meta.get(MERGES).is_some() {
        read_merges(meta, vocab)?
    } else {
        let scores = vocab.scores.as_deref().ok_or_else(|| {
            Error::format(format!(
                "GGUF metadata {SCORES} is missing (a SentencePiece BPE tokenizer without \
                 {MERGES} needs the scores of its pieces)"
            ))
        })?;
        merges_from_scores(vocab, scores)?
    };
    let unk = match special_id(meta, OTHER_ID_KEYS[0], vocab.len())? {
        Some(id) => Some(id as usize),
        None => vocab.types.iter().position(|&t| t == TokenType::Unknown),
    };
    let add_space_prefix = meta.bool(ADD_SPACE_PREFIX)?.unwrap_or(true);
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let (add_bos, add_eos) = added_specials(meta, bos, eos, true)?;
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(vocab),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor(vocab, add_bos, add_eos),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk.map(|id| vocab.tokens[id]),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
        },
    });
    Ok((json, merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The character GPT-2's byte-level alphabet uses for byte `b`: printable Latin-1
    /// characters stand for themselves, the other bytes take the code points from 256 up in
    /// byte order.
    fn byte_char(b: u8) -> char {
        let printable = |c: u8| matches!(c, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(b) {
            char::from(b)
        } else {
            let rank = (0..b).filter(|&c| !printable(c)).count() as u32;
            char::from_u32(256 + rank).unwrap()
        }
    }

    fn strings(items: &[&str]) -> GgufValue {
        GgufValue::Array(
            items
                .iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        )
    }

    fn ints(items: &[i128]) -> GgufValue {
        GgufValue::Array(items.iter().map(|&i| GgufValue::Int(i)).collect())
    }

    /// A tiny byte-level vocabulary: the 256 byte tokens, a few merges up to "hello" and " w",
    /// a control token and a user-defined token.
    fn tiny() -> GgufMetadata {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"];
        for merge in merges {
            tokens.push(merge.replace(' ', ""));
        }
        tokens.push("<|end|>".into());
        tokens.push("<tool>".into());
        let n = tokens.len();
        let mut types = vec![1; n];
        types[n - 2] = 3;
        types[n - 1] = 4;
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut meta = GgufMetadata::default();
        let entries = [
            (MODEL, GgufValue::String("gpt2".into())),
            (PRE, GgufValue::String("gpt-2".into())),
            (TOKENS, strings(&tokens)),
            (TOKEN_TYPE, ints(&types)),
            (MERGES, strings(&merges)),
            (EOS_ID, GgufValue::Int(n as i128 - 2)),
            (
                CHAT_TEMPLATE,
                GgufValue::String("{{ messages[0].content }}".into()),
            ),
        ];
        for (key, value) in entries {
            meta.entries.insert(key.to_string(), value);
        }
        meta
    }

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.token_id(text).unwrap()
    }

    #[test]
    fn a_tiny_byte_level_vocabulary_round_trips_text() {
        let tok = tokenizer_from_gguf(&tiny()).unwrap().unwrap();
        assert_eq!(tok.n_vocab(), 263);
        let text = "hello world<|end|> héllo\n<tool>";
        let ids = tok.encode(text, false, true).unwrap();
        assert_eq!(&ids[..2], &[id(&tok, "hello"), id(&tok, "Ġw")]);
        assert!(ids.contains(&id(&tok, "<|end|>")));
        assert!(ids.contains(&id(&tok, "<tool>")));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Control tokens written in the text stay text when special tokens are not parsed.
        let literal = tok.encode(text, false, false).unwrap();
        assert!(!literal.contains(&id(&tok, "<|end|>")));
        assert_eq!(tok.decode(&literal).unwrap(), text);
        // No BOS unless the file asks for one.
        assert_eq!(
            tok.encode("hello", true, true).unwrap(),
            [id(&tok, "hello")]
        );
        assert_eq!(tok.eos(), Some(261));
        assert!(tok.stop_tokens().contains(&261));
        let chat = tok
            .apply_chat_template(&[super::super::ChatMessage::new("user", "hi")], false)
            .unwrap();
        assert_eq!(chat, "hi");
    }

    #[test]
    fn bos_eos_and_stop_ids_follow_the_metadata() {
        let mut meta = tiny();
        meta.entries.insert(BOS_ID.into(), GgufValue::Int(262));
        meta.entries.insert(ADD_BOS.into(), GgufValue::Bool(true));
        meta.entries.insert(ADD_EOS.into(), GgufValue::Bool(true));
        meta.entries.insert(EOT_ID.into(), GgufValue::Int(10));
        let tok = tokenizer_from_gguf(&meta).unwrap().unwrap();
        let hello = id(&tok, "hello");
        assert_eq!(tok.encode("hello", true, true).unwrap(), [262, hello, 261]);
        assert_eq!(tok.encode("hello", false, true).unwrap(), [hello]);
        assert_eq!(tok.bos(), Some(262));
        assert!(tok.stop_tokens().contains(&10));
        // Asking for a BOS the file does not name is an error.
        meta.entries.remove(BOS_ID);
        let err = tokenizer_from_gguf(&meta).unwrap_err();
        assert!(
            matches!(&err, Error::BadFormat(m) if m.contains(ADD_BOS)),
            "{err}"
        );
    }

    #[test]
    fn no_tokenizer_model_means_no_tokenizer() {
        let mut meta = tiny();
        meta.entries.remove(MODEL);
        assert!(tokenizer_from_gguf(&meta).unwrap().is_none());
    }

    fn expect_unsupported(meta: &GgufMetadata, needle: &str) {
        match tokenizer_from_gguf(meta) {
            Err(Error::Unsupported(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected Unsupported naming {needle:?}, got {other:?}"),
        }
    }

    fn expect_bad_format(meta: &GgufMetadata, needle: &str) {
        match tokenizer_from_gguf(meta) {
            Err(Error::BadFormat(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected BadFormat naming {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn unknown_pre_tokenizers_and_models_are_unsupported() {
        for name in ["falcon", "default", "deepseek-llm", ""] {
            let mut meta = tiny();
            meta.entries
                .insert(PRE.into(), GgufValue::String(name.into()));
            expect_unsupported(&meta, &format!("{name:?}"));
        }
        let mut meta = tiny();
        meta.entries.remove(PRE);
        expect_unsupported(&meta, PRE);
        let mut meta = tiny();
        meta.entries
            .insert(MODEL.into(), GgufValue::String("bert".into()));
        expect_unsupported(&meta, "\"bert\"");
        let mut meta = tiny();
        meta.entries
            .insert(ADD_SPACE_PREFIX.into(), GgufValue::Bool(true));
        expect_unsupported(&meta, ADD_SPACE_PREFIX);
    }

    #[test]
    fn out_of_range_special_ids_are_bad_format() {
        for key in [
            BOS_ID,
            EOS_ID,
            EOT_ID,
            EOM_ID,
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            let mut meta = tiny();
            meta.entries.insert(key.into(), GgufValue::Int(263));
            expect_bad_format(&meta, key);
            meta.entries.insert(key.into(), GgufValue::Int(-1));
            expect_bad_format(&meta, key);
            meta.entries
                .insert(key.into(), GgufValue::String("1".into()));
            expect_bad_format(&meta, key);
        }
    }

    #[test]
    fn inconsistent_arrays_are_bad_format() {
        let mut meta = tiny();
        meta.entries.insert(TOKEN_TYPE.into(), ints(&[1; 262]));
        expect_bad_format(&meta, TOKEN_TYPE);
        let mut meta = tiny();
        meta.entries.insert(
            SCORES.into(),
            GgufValue::Array(vec![GgufValue::Float(0.0); 264]),
        );
        expect_bad_format(&meta, SCORES);
        let mut meta = tiny();
        meta.entries.insert(SCORES.into(), strings(&["x"; 263]));
        expect_bad_format(&meta, SCORES);
        let mut meta = tiny();
        let mut types = vec![1; 263];
        types[7] = 9;
        meta.entries.insert(TOKEN_TYPE.into(), ints(&types));
        expect_bad_format(&meta, &format!("{TOKEN_TYPE}[7]"));
        let mut meta = tiny();
        meta.entries.insert(TOKENS.into(), ints(&[1; 263]));
        expect_bad_format(&meta, TOKENS);
        let mut meta = tiny();
        meta.entries.insert(TOKENS.into(), strings(&[]));
        meta.entries.insert(TOKEN_TYPE.into(), ints(&[]));
        expect_bad_format(&meta, TOKENS);
        for key in [TOKENS, TOKEN_TYPE] {
            let mut meta = tiny();
            meta.entries.remove(key);
            expect_bad_format(&meta, key);
        }
    }

    #[test]
    fn duplicate_tokens_are_bad_format() {
        let mut meta = tiny();
        let GgufValue::Array(tokens) = meta.entries.get_mut(TOKENS).unwrap() else {
            unreachable!()
        };
        tokens[262] = GgufValue::String("hello".into());
        expect_bad_format(&meta, "\"hello\" appears twice");
    }

    #[test]
    fn missing_or_broken_merges_are_bad_format() {
        let mut meta = tiny();
        meta.entries.remove(MERGES);
        expect_bad_format(&meta, MERGES);
        for (merge, why) in [
            ("he", "one space"),
            ("h  e", "one space"),
            ("h e x", "one space"),
            ("q z", "\"qz\" is not in the vocabulary"),
        ] {
            let mut meta = tiny();
            meta.entries.insert(MERGES.into(), strings(&["h e", merge]));
            expect_bad_format(&meta, &format!("{MERGES}[1]"));
            expect_bad_format(&meta, why);
        }
        let mut meta = tiny();
        meta.entries.insert(MERGES.into(), ints(&[1]));
        expect_bad_format(&meta, MERGES);
    }

    /// A tiny SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then
    /// pieces whose scores rank "bc" above "ab" although "ab" has the smaller id.
    fn tiny_sentencepiece() -> GgufMetadata {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let mut types = vec![2, 3, 3];
        types.extend([6; 256]);
        let mut scores = vec![0.0; tokens.len()];
        for (piece, score) in [
            ("\u{2581}", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("ab", -9.0),
            ("bc", -5.0),
            ("\u{2581}a", -8.0),
        ] {
            tokens.push(piece.into());
            types.push(1);
            scores.push(score);
        }
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut meta = GgufMetadata::default();
        let entries = [
            (MODEL, GgufValue::String("llama".into())),
            (PRE, GgufValue::String("default".into())),
            (TOKENS, strings(&tokens)),
            (TOKEN_TYPE, ints(&types)),
            (
                SCORES,
                GgufValue::Array(scores.into_iter().map(GgufValue::Float).collect()),
            ),
            (BOS_ID, GgufValue::Int(1)),
            (EOS_ID, GgufValue::Int(2)),
            ("tokenizer.ggml.unknown_token_id", GgufValue::Int(0)),
        ];
        for (key, value) in entries {
            meta.entries.insert(key.to_string(), value);
        }
        meta
    }

    #[test]
    fn a_tiny_sentencepiece_vocabulary_ranks_merges_by_score_and_falls_back_to_bytes() {
        let tok = tokenizer_from_gguf(&tiny_sentencepiece()).unwrap().unwrap();
        let pieces = |ids: Vec<u32>| -> Vec<String> {
            ids.iter().map(|&i| tok.token_text(i).unwrap()).collect()
        };
        // BOS by default; a space prepended; "bc" (score -5) merges before "ab" (-9), which
        // id order would rank first (giving "▁", "ab", "c").
        let ids = tok.encode("abc", true, true).unwrap();
        assert_eq!(pieces(ids.clone()), ["<s>", "\u{2581}a", "bc"]);
        assert_eq!(tok.decode(&ids[1..]).unwrap(), "abc");
        // Characters outside the vocabulary become their UTF-8 bytes.
        let ids = tok.encode("a é", false, true).unwrap();
        assert_eq!(
            pieces(ids.clone()),
            ["\u{2581}a", "\u{2581}", "<0xC3>", "<0xA9>"]
        );
        assert_eq!(tok.decode(&ids).unwrap(), "a é");
        assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
        // Control tokens in the text are parsed only when asked.
        let ids = tok.encode("</s>", false, true).unwrap();
        assert_eq!(ids, [2]);
        assert!(!tok.encode("</s>", false, false).unwrap().contains(&2));
    }

    #[test]
    fn a_sentencepiece_vocabulary_needs_scores_and_plain_normalization() {
        let mut meta = tiny_sentencepiece();
        meta.entries.remove(SCORES);
        expect_bad_format(&meta, SCORES);
        let mut meta = tiny_sentencepiece();
        meta.entries.insert(
            "tokenizer.ggml.remove_extra_whitespaces".into(),
            GgufValue::Bool(true),
        );
        expect_unsupported(&meta, "remove_extra_whitespaces");
        let mut meta = tiny_sentencepiece();
        meta.entries.insert(
            "tokenizer.ggml.unknown_token_id".into(),
            GgufValue::Int(1_000),
        );
        expect_bad_format(&meta, "tokenizer.ggml.unknown_token_id");
    }

    #[test]
    fn the_byte_alphabet_helper_is_a_bijection_onto_gpt2_characters() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'a'), 'a');
    }

    #[test]
    fn vocabularies_and_merges_beyond_the_limits_are_refused() {
        let mut meta = tiny();
        let n = super::super::MAX_VOCAB + 1;
        let tokens: Vec<GgufValue> = (0..n).map(|i| GgufValue::String(format!("t{i}"))).collect();
        meta.entries.insert(TOKENS.into(), GgufValue::Array(tokens));
        meta.entries.insert(
            TOKEN_TYPE.into(),
            GgufValue::Array(vec![GgufValue::Int(1); n]),
        );
        expect_bad_format(&meta, "accepted");
        // Derived merges stop at the limit: every cut of "a", "aa", ... "a"*k is a merge.
        let tokens: Vec<String> = (1..=64).map(|k| "a".repeat(k)).collect();
        let vocab = Vocab {
            tokens: tokens.iter().map(String::as_str).collect(),
            types: vec![TokenType::Normal; 64],
            scores: None,
        };
        let scores = vec![0.0; 64];
        assert_eq!(
            merges_from_scores_capped(&vocab, &scores, 10_000)
                .unwrap()
                .len(),
            63 * 64 / 2
        );
        assert!(merges_from_scores_capped(&vocab, &scores, 100).is_err());
    }
}
