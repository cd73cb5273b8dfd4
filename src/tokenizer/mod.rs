//! Text to token ids and back, exactly as Hugging Face does it.
//!
//! Encoding and decoding are Hugging Face's own `tokenizers` crate reading the model's
//! `tokenizer.json`, so ids match transformers token for token. Ember adds the settings from
//! `tokenizer_config.json` (special tokens, chat template), a guard that keeps user text from
//! turning into control tokens, a streaming decoder ([`StreamDecoder`]) and chat templates
//! ([`ChatTemplate`]).

mod chat;
mod gguf;
mod stream;

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

pub use chat::{ChatMessage, ChatTemplate};
pub use gguf::{tokenizer_from_gguf, tokenizer_json_from_gguf};
pub use stream::StreamDecoder;

/// A model's tokenizer.
pub struct Tokenizer {
    /// Recognises added/special tokens written in the text.
    parsing: tokenizers::Tokenizer,
    /// Treats special tokens written in the text as plain text.
    literal: tokenizers::Tokenizer,
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    stop_tokens: Vec<u32>,
    bos_text: String,
    eos_text: String,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Where a tokenizer's settings come from besides `tokenizer.json`.
#[derive(Debug, Default, Clone)]
pub struct TokenizerSettings {
    /// Beginning-of-sequence token text (e.g. `<s>`).
    pub bos_token: Option<String>,
    /// End-of-sequence token text (e.g. `</s>`).
    pub eos_token: Option<String>,
    /// Extra end-of-generation ids (e.g. from `generation_config.json`).
    pub extra_stop_ids: Vec<u32>,
    /// Jinja chat template.
    pub chat_template: Option<String>,
}

/// A special-token field of tokenizer_config.json: a string or `{"content": "..."}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Reads `chat_template` from tokenizer_config.json: a string, or a list of named templates
/// of which the one named "default" is used.
fn chat_template_text(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    }
}

/// Token ids of a config field that holds an id or a list of ids.
fn ids_of(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face folder, with `tokenizer_config.json` and
    /// `generation_config.json` when present. Returns `Ok(None)` when there is no
    /// `tokenizer.json`.
    pub fn from_hf_folder(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let json = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let settings = TokenizerSettings {
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            extra_stop_ids: ids_of(generation.get("eos_token_id")),
            chat_template: chat_template_text(&config),
        };
        Tokenizer::from_json_bytes(&json, settings).map(Some)
    }

    /// Builds a tokenizer from the bytes of a `tokenizer.json` and its settings.
    pub fn from_json_bytes(json: &[u8], settings: TokenizerSettings) -> Result<Tokenizer> {
        let parsing = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::format(format!("tokenizer.json: {e}")))?;
        let mut literal = parsing.clone();
        literal.set_encode_special_tokens(true);
        let n_vocab = parsing.get_vocab_size(true);
        let id = |text: &Option<String>| text.as_deref().and_then(|t| parsing.token_to_id(t));
        let bos = id(&settings.bos_token);
        let eos = id(&settings.eos_token);
        // The token that ends a chat turn, where the vocabulary has one.
        let eot = [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
        ]
        .iter()
        .find_map(|t| parsing.token_to_id(t))
        .or(eos);
        let mut stop_tokens: Vec<u32> = eos
            .into_iter()
            .chain(eot)
            .chain(settings.extra_stop_ids.iter().copied())
            .collect();
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        if let Some(bad) = stop_tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::format(format!(
                "stop token {bad} is outside the vocabulary ({n_vocab})"
            )));
        }
        let chat_template = match &settings.chat_template {
            Some(source) => Some(ChatTemplate::new(source)?),
            None => None,
        };
        let text_of = |id: Option<u32>| id.and_then(|i| parsing.id_to_token(i)).unwrap_or_default();
        Ok(Tokenizer {
            bos_text: settings.bos_token.clone().unwrap_or_else(|| text_of(bos)),
            eos_text: settings.eos_token.clone().unwrap_or_else(|| text_of(eos)),
            parsing,
            literal,
            n_vocab,
            bos,
            eos,
            eot,
            stop_tokens,
            chat_template,
        })
    }

    /// Number of token ids the tokenizer knows (added tokens included).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token of chat models (`<|im_end|>`, `<|eot_id|>`, ...), else the EOS token.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Every token that ends generation (EOS, EOT and those of `generation_config.json`).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The text of a token (its vocabulary entry), for diagnostics.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.parsing.id_to_token(id)
    }

    /// The id of a token's exact vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.parsing.token_to_id(text)
    }

    /// Encodes `text`.
    ///
    /// - `add_special`: add BOS/EOS as the tokenizer's post-processor says.
    /// - `parse_special`: when true, special tokens written in the text (e.g. `<|im_start|>`)
    ///   become their ids; when false they are tokenized as plain text, so user input can
    ///   never inject a control token.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.parsing
        } else {
            &self.literal
        };
        let encoding = tokenizer
            .encode(text, add_special)
            .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        self.parsing
            .decode(ids, false)
            .map_err(|e| Error::InvalidArgument(format!("detokenization failed: {e}")))
    }

    /// Fails if any id is outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().position(|&id| id as usize >= self.n_vocab) {
            None => Ok(()),
            Some(i) => Err(Error::InvalidArgument(format!(
                "token {} at index {i} is outside the vocabulary (0..{})",
                ids[i], self.n_vocab
            ))),
        }
    }

    /// Applies the chat template to `messages`. Fails when the model has no template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the model has no chat template".into()))?;
        template.render(
            messages,
            add_generation_prompt,
            &self.bos_text,
            &self.eos_text,
        )
    }
}
