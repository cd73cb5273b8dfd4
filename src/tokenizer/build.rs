//! Building a `tokenizers::Tokenizer` from a parsed `tokenizer.json`.
//!
//! The `tokenizers` crate deserializes a whole `tokenizer.json` through serde, buffering its
//! model (tens of thousands of vocabulary entries and merges) in generic form before it
//! builds the BPE. For BPE models Ember builds the model with the crate's own builder from
//! the vocabulary and merges, and deserializes only the small parts (normalizer,
//! pre-tokenizer, post-processor, decoder, added tokens), exactly as the crate does: the
//! result is the same tokenizer, built in a fraction of the time. Other models (Unigram,
//! WordPiece, WordLevel) go through the crate's deserializer.

use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams,
    PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

use crate::error::{catch_quietly, Error, Result};

/// A `tokenizer.json` error.
fn bad(what: impl std::fmt::Display) -> Error {
    Error::format(format!("tokenizer.json: {what}"))
}

/// Deserializes one part of `tokenizer.json` (absent or null: `None`), catching the panics
/// the `tokenizers` crate has on some malformed input.
fn part<T: serde::de::DeserializeOwned>(json: &Value, key: &str) -> Result<Option<T>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match catch_quietly(|| serde_json::from_value::<T>(value.clone())) {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(e)) => Err(bad(format_args!("{key}: {e}"))),
            Err(panic) => Err(bad(format_args!(
                "{key} is malformed (the tokenizers library failed on it: {panic})"
            ))),
        },
    }
}

/// A BPE option of the model section: absent or null gives `None`.
fn option<T: serde::de::DeserializeOwned>(model: &Value, key: &str) -> Result<Option<T>> {
    match model.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| bad(format_args!("model.{key}: {e}"))),
    }
}

/// The BPE model from its options (the `model` section without `vocab` and `merges`, which
/// are given separately), as the crate's deserializer configures it.
pub(crate) fn bpe(options: &Value, vocab: Vocab, merges: Merges) -> Result<ModelWrapper> {
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(p) = option::<f32>(options, "dropout")? {
        builder = builder.dropout(p);
    }
    if let Some(t) = option::<String>(options, "unk_token")? {
        builder = builder.unk_token(t);
    }
    if let Some(t) = option::<String>(options, "continuing_subword_prefix")? {
        builder = builder.continuing_subword_prefix(t);
    }
    if let Some(t) = option::<String>(options, "end_of_word_suffix")? {
        builder = builder.end_of_word_suffix(t);
    }
    for (key, set) in [
        ("fuse_unk", BpeFlag::FuseUnk),
        ("byte_fallback", BpeFlag::ByteFallback),
        ("ignore_merges", BpeFlag::IgnoreMerges),
    ] {
        if let Some(on) = option::<bool>(options, key)? {
            builder = set.apply(builder, on);
        }
    }
    let model = catch_quietly(|| builder.build())
        .map_err(|panic| bad(format_args!("model: {panic}")))?
        .map_err(|e| bad(format_args!("model: {e}")))?;
    Ok(ModelWrapper::BPE(model))
}

/// The boolean options of a BPE builder.
#[derive(Clone, Copy)]
enum BpeFlag {
    FuseUnk,
    ByteFallback,
    IgnoreMerges,
}

impl BpeFlag {
    fn apply(
        self,
        b: tokenizers::models::bpe::BpeBuilder,
        on: bool,
    ) -> tokenizers::models::bpe::BpeBuilder {
        match self {
            BpeFlag::FuseUnk => b.fuse_unk(on),
            BpeFlag::ByteFallback => b.byte_fallback(on),
            BpeFlag::IgnoreMerges => b.ignore_merges(on),
        }
    }
}

/// The vocabulary of a BPE `model` section (`{"token": id, ...}`).
fn vocab_of(model: &Value) -> Result<Vocab> {
    let Some(Value::Object(entries)) = model.get("vocab") else {
        return Err(bad("model.vocab is not an object"));
    };
    entries
        .iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| bad(format_args!("model.vocab[{token:?}] is not a token id")))
        })
        .collect()
}

/// The merges of a BPE `model` section: `"a b"` strings (split at the one space, as the
/// crate splits them) or `["a", "b"]` pairs.
fn merges_of(model: &Value) -> Result<Merges> {
    let merges = match model.get("merges") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("model.merges is not an array")),
    };
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            let pair = match merge {
                Value::String(s) => {
                    let mut parts = s.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                        _ => None,
                    }
                }
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| bad(format_args!("model.merges[{i}] is not a pair of tokens")))
        })
        .collect()
}

/// Assembles the tokenizer: `json` is a `tokenizer.json`, whose model is `model`.
pub(crate) fn assemble(json: &Value, model: ModelWrapper) -> Result<tokenizers::Tokenizer> {
    if let Some(version) = json.get("version").and_then(Value::as_str) {
        if version != "1.0" {
            return Err(bad(format_args!("unknown version {version:?}")));
        }
    }
    let built = TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(part::<NormalizerWrapper>(json, "normalizer")?)
        .with_pre_tokenizer(part::<PreTokenizerWrapper>(json, "pre_tokenizer")?)
        .with_post_processor(part::<PostProcessorWrapper>(json, "post_processor")?)
        .with_decoder(part::<DecoderWrapper>(json, "decoder")?)
        .with_truncation(part::<TruncationParams>(json, "truncation")?)
        .with_padding(part::<PaddingParams>(json, "padding")?)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::from(built);
    let added: Vec<AddedToken> = match json.get("added_tokens") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item.clone())
                    .map_err(|e| bad(format_args!("added_tokens[{i}]: {e}")))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("added_tokens is not an array")),
    };
    catch_quietly(|| tokenizer.add_tokens(added))
        .map_err(|panic| bad(format_args!("added_tokens: {panic}")))?
        .map_err(|e| bad(format_args!("added_tokens: {e}")))?;
    Ok(tokenizer)
}

/// The tokenizer a `tokenizer.json` describes.
pub(crate) fn from_json(json: Value) -> Result<tokenizers::Tokenizer> {
    let model = json.get("model").unwrap_or(&Value::Null);
    if model.get("type").and_then(Value::as_str) == Some("BPE") {
        let built = bpe(model, vocab_of(model)?, merges_of(model)?)?;
        return assemble(&json, built);
    }
    // Other models: the crate's deserializer, whose panics become errors.
    match catch_quietly(|| serde_json::from_value::<tokenizers::Tokenizer>(json)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(bad(e)),
        Err(panic) => Err(bad(format_args!(
            "malformed (the tokenizers library failed on it: {panic})"
        ))),
    }
}
