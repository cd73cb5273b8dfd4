//! Text to token ids and back, exactly as Hugging Face does it.
//!
//! Encoding and decoding are Hugging Face's own `tokenizers` crate reading the model's
//! `tokenizer.json`, so ids match transformers token for token. Ember adds the settings from
//! `tokenizer_config.json` (special tokens, chat template), a guard that keeps user text from
//! turning into control tokens, a streaming decoder ([`StreamDecoder`]) and chat templates
//! ([`ChatTemplate`]).

mod build;
mod chat;
mod gguf;
mod guard;
mod stream;

use std::path::Path;

use serde_json::Value;
use tokenizers::{Model as _, OffsetReferential, OffsetType, PreTokenizer as _};

use crate::error::{Error, Result};
use guard::{Escapes, SpecialMatcher};

pub use chat::{
    ChatMessage, ChatTemplate, Conversation, MAX_CONVERSATION_BYTES, MAX_TEMPLATE_BYTES,
};
pub use gguf::{tokenizer_from_gguf, tokenizer_json_from_gguf};
pub use stream::StreamDecoder;

/// Largest `tokenizer.json` accepted (real ones are up to about 35 MB).
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 128 << 20;

/// Largest `tokenizer_config.json` or `generation_config.json` accepted.
pub const MAX_CONFIG_JSON_BYTES: u64 = 64 << 20;

/// Most tokens a vocabulary may have, model and added tokens each (real ones have up to
/// about 260 thousand).
pub const MAX_VOCAB: usize = 1 << 21;

/// Most merges a BPE model may have, given or derived (real ones have up to about 300
/// thousand).
pub const MAX_MERGES: usize = 1 << 22;

/// A model's tokenizer.
///
/// Tokenizer files may be hostile: their size, vocabulary and merges are bounded
/// ([`MAX_TOKENIZER_JSON_BYTES`], [`MAX_VOCAB`], [`MAX_MERGES`]) before the `tokenizers`
/// crate builds anything, so building takes time and memory linear in bounded input, and a
/// panic inside that crate (it has some on malformed input) is an error, never a crash.
#[derive(Clone)]
pub struct Tokenizer {
    /// Recognises added/special tokens written in the text.
    parsing: tokenizers::Tokenizer,
    /// The added vocabulary with special tokens treated as plain text: what encoding with
    /// special-token parsing off matches (the rest of `parsing` is shared).
    plain_added: tokenizers::AddedVocabulary,
    /// The pre-tokenizer for text that does not start the input, where it differs (a
    /// `Metaspace` that prepends "▁" only to the first piece of a text).
    later_pre_tokenizer: Option<tokenizers::PreTokenizerWrapper>,
    /// The special tokens' texts, escaped in caller strings given to the chat template.
    specials: SpecialMatcher,
    /// Ids of the special tokens (sorted).
    special_ids: Vec<u32>,
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
    /// Where the chat template comes from, for messages (e.g. "the chat template of
    /// tokenizer_config.json"); empty for "chat template".
    pub chat_template_origin: String,
}

impl TokenizerSettings {
    /// The settings of a `tokenizer_config.json` and a `generation_config.json` (either may
    /// be `Value::Null`).
    pub fn from_configs(config: &Value, generation: &Value) -> TokenizerSettings {
        TokenizerSettings {
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            extra_stop_ids: ids_of(generation.get("eos_token_id")),
            chat_template: chat_template_text(config),
            chat_template_origin: String::new(),
        }
    }
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
    let bytes = crate::loader::read_bounded(path, MAX_CONFIG_JSON_BYTES)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

/// Checks the sizes of a tokenizer.json's vocabulary, merges and added tokens.
fn check_tokenizer_json(json: &Value) -> Result<()> {
    let len = |v: Option<&Value>| match v {
        Some(Value::Array(a)) => a.len(),
        Some(Value::Object(o)) => o.len(),
        _ => 0,
    };
    let model = json.get("model");
    for (what, n, max) in [
        (
            "model.vocab",
            len(model.and_then(|m| m.get("vocab"))),
            MAX_VOCAB,
        ),
        ("added_tokens", len(json.get("added_tokens")), MAX_VOCAB),
        (
            "model.merges",
            len(model.and_then(|m| m.get("merges"))),
            MAX_MERGES,
        ),
    ] {
        if n > max {
            return Err(Error::format(format!(
                "tokenizer.json: {what} has {n} entries, more than the {max} accepted"
            )));
        }
    }
    Ok(())
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face folder, with `tokenizer_config.json`,
    /// `chat_template.jinja` and `generation_config.json` when present. Returns `Ok(None)` when there is no
    /// `tokenizer.json`.
    pub fn from_hf_folder(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let json = crate::loader::read_bounded(&path, MAX_TOKENIZER_JSON_BYTES)?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut settings = TokenizerSettings::from_configs(&config, &generation);
        settings.chat_template_origin = format!(
            "the chat template of {}",
            dir.join("tokenizer_config.json").display()
        );
        // transformers 5 saves the template in its own file, which takes precedence.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let bytes = crate::loader::read_bounded(&jinja, chat::MAX_TEMPLATE_BYTES as u64)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::format(format!("{} is not UTF-8", jinja.display())))?;
            settings.chat_template = Some(text);
            settings.chat_template_origin = jinja.display().to_string();
        }
        Tokenizer::from_json_bytes(&json, settings).map(Some)
    }

    /// Builds a tokenizer from the bytes of a `tokenizer.json` and its settings.
    pub fn from_json_bytes(json: &[u8], settings: TokenizerSettings) -> Result<Tokenizer> {
        if json.len() as u64 > MAX_TOKENIZER_JSON_BYTES {
            return Err(Error::format(format!(
                "tokenizer.json: {} bytes, more than the {MAX_TOKENIZER_JSON_BYTES} accepted",
                json.len()
            )));
        }
        // Parsed once into a value (malformed or too deeply nested JSON is an error here,
        // where the `tokenizers` crate would panic), checked, then handed over.
        let value: Value = serde_json::from_slice(json)
            .map_err(|e| Error::format(format!("tokenizer.json: {e}")))?;
        Tokenizer::from_json_value(value, settings)
    }

    /// Builds a tokenizer from a parsed `tokenizer.json` and its settings.
    pub fn from_json_value(json: Value, settings: TokenizerSettings) -> Result<Tokenizer> {
        check_tokenizer_json(&json)?;
        Tokenizer::from_built(build::from_json(json)?, settings)
    }

    /// Completes a tokenizer the `tokenizers` crate has built.
    pub(crate) fn from_built(
        parsing: tokenizers::Tokenizer,
        settings: TokenizerSettings,
    ) -> Result<Tokenizer> {
        let mut plain_added = parsing.get_added_vocabulary().clone();
        plain_added.set_encode_special_tokens(true);
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
        let origin = match settings.chat_template_origin.as_str() {
            "" => "chat template",
            named => named,
        };
        let chat_template = match &settings.chat_template {
            Some(source) => Some(ChatTemplate::from_source(source, origin)?),
            None => None,
        };
        let text_of = |id: Option<u32>| id.and_then(|i| parsing.id_to_token(i)).unwrap_or_default();
        let mut special_ids: Vec<u32> = Vec::new();
        let mut special_texts: Vec<String> = Vec::new();
        for (&id, token) in parsing.get_added_vocabulary().get_added_tokens_decoder() {
            if token.special {
                special_ids.push(id);
                special_texts.push(token.content.clone());
            }
        }
        special_ids.sort_unstable();
        Ok(Tokenizer {
            later_pre_tokenizer: later_pre_tokenizer(&parsing)?,
            specials: SpecialMatcher::new(special_texts)?,
            special_ids,
            bos_text: settings.bos_token.clone().unwrap_or_else(|| text_of(bos)),
            eos_text: settings.eos_token.clone().unwrap_or_else(|| text_of(eos)),
            parsing,
            plain_added,
            n_vocab,
            bos,
            eos,
            eot,
            stop_tokens,
            chat_template,
        })
    }

    /// The tokenizer as Hugging Face's `tokenizer.json` would hold it (for llguidance's
    /// token bytes).
    pub(crate) fn to_json_value(&self) -> Result<Value> {
        let text = self
            .parsing
            .to_string(false)
            .map_err(|e| Error::Internal(format!("tokenizer to JSON: {e}")))?;
        serde_json::from_str(&text).map_err(|e| Error::Internal(format!("tokenizer JSON: {e}")))
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
        let encoding = crate::error::catch_quietly(|| {
            if parse_special {
                self.parsing.encode(text, add_special)
            } else {
                let plain = self.plain_encoding(text, true)?;
                self.parsing.post_process(plain, None, add_special)
            }
        })
        .map_err(|panic| Error::InvalidArgument(format!("tokenization failed: {panic}")))?
        .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The encoding of `text` with special tokens as plain text, as the tokenizer encodes a
    /// piece of a longer input (`at_start`: the piece starts the input), before
    /// post-processing: the `tokenizers` crate's own pipeline with the plain added
    /// vocabulary.
    fn plain_encoding(
        &self,
        text: &str,
        at_start: bool,
    ) -> tokenizers::Result<tokenizers::Encoding> {
        let t = &self.parsing;
        let mut pieces = self
            .plain_added
            .extract_and_normalize(t.get_normalizer(), text);
        let pre_tokenizer = match (&self.later_pre_tokenizer, at_start) {
            (Some(later), false) => Some(later),
            _ => t.get_pre_tokenizer(),
        };
        if let Some(p) = pre_tokenizer {
            p.pre_tokenize(&mut pieces)?;
        }
        pieces.tokenize(|piece| t.get_model().tokenize(piece.get()))?;
        pieces.into_encoding(None, 0, OffsetType::None)
    }

    /// Decodes ids to text, special tokens included. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        crate::error::catch_quietly(|| self.parsing.decode(ids, false))
            .map_err(|panic| Error::InvalidArgument(format!("detokenization failed: {panic}")))?
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
        self.render_conversation(
            &Conversation::from_messages(messages),
            add_generation_prompt,
        )
    }

    /// The template a conversation is rendered with: its own `chat_template`, else the
    /// model's. Tools given to a template that does not read them are an error (the model
    /// would never learn of them).
    pub fn conversation_template<'a>(
        &'a self,
        conversation: &Conversation,
    ) -> Result<std::borrow::Cow<'a, ChatTemplate>> {
        let template = match &conversation.chat_template {
            Some(source) => std::borrow::Cow::Owned(ChatTemplate::from_source(
                source,
                "the conversation's chat_template",
            )?),
            None => {
                std::borrow::Cow::Borrowed(self.chat_template.as_ref().ok_or_else(|| {
                    Error::InvalidArgument("the model has no chat template".into())
                })?)
            }
        };
        if !conversation.tools().is_empty() && !template.reads_tools() {
            return Err(Error::InvalidArgument(format!(
                "{} does not read `tools`, so the model would not learn of them (give the \
                 conversation a chat_template that does)",
                template.origin()
            )));
        }
        Ok(template)
    }

    /// The assistant's reply `text` to `conversation` as the message to append to it: its
    /// text, its `<think>` block's reasoning, and its tool calls in the conversation
    /// template's format (see [`crate::tools::parse_reply`]).
    pub fn parse_reply(&self, conversation: &Conversation, text: &str) -> Result<Value> {
        let template = self.conversation_template(conversation)?;
        let format = crate::tools::ReplyFormat::new(
            template.tool_format(),
            template.thinks(),
            conversation.tools(),
            conversation.tool_choice.as_ref(),
        );
        crate::tools::parse_reply(&format, text)
    }

    /// The prompt text of a conversation, as transformers' `apply_chat_template(messages,
    /// tools=..., chat_template=..., **variables, tokenize=False)` renders it.
    pub fn render_conversation(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.conversation_template(conversation)?.render_json(
            &conversation.messages,
            &conversation.variables,
            add_generation_prompt,
            &self.bos_text,
            &self.eos_text,
        )
    }

    /// True when `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }

    /// Applies the chat template and tokenizes the result, as transformers'
    /// `apply_chat_template(..., tokenize=True)` does, except that special tokens written in
    /// the messages stay plain text unless `parse_special` is true: only what the template
    /// itself writes becomes control tokens (see the `guard` module).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        self.encode_conversation(
            &Conversation::from_messages(messages),
            add_generation_prompt,
            parse_special,
        )
    }

    /// [`Tokenizer::encode_chat`] for a whole [`Conversation`]: every string in its messages
    /// and variables (tool definitions, tool results, call arguments) is caller text.
    pub fn encode_conversation(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        if parse_special {
            let text = self.render_conversation(conversation, add_generation_prompt)?;
            return self.encode(&text, false, true);
        }
        let template = self.conversation_template(conversation)?;
        let mut escapes = Escapes::default();
        let messages = conversation
            .messages
            .iter()
            .map(|m| escapes.escape_json(&self.specials, m))
            .collect::<Result<Vec<_>>>()?;
        let mut variables = serde_json::Map::new();
        for (name, value) in &conversation.variables {
            variables.insert(name.clone(), escapes.escape_json(&self.specials, value)?);
        }
        let rendered = template.render_json(
            &messages,
            &variables,
            add_generation_prompt,
            &self.bos_text,
            &self.eos_text,
        )?;
        // The template's own special tokens, found as the tokenizer finds added tokens.
        let pieces = self
            .parsing
            .get_added_vocabulary()
            .extract_and_normalize(self.parsing.get_normalizer(), &rendered);
        let mut ids = Vec::new();
        let mut text_from = 0;
        for (_, (start, end), tokens) in
            pieces.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            let Some([token]) = tokens.as_deref() else {
                continue;
            };
            if !self.is_special(token.id) {
                continue;
            }
            self.encode_plain(
                &escapes.unescape(&rendered[text_from..start]),
                text_from == 0,
                &mut ids,
            )?;
            ids.push(token.id);
            text_from = end;
        }
        self.encode_plain(
            &escapes.unescape(&rendered[text_from..]),
            text_from == 0,
            &mut ids,
        )?;
        Ok(ids)
    }

    /// Appends the ids of `text` (special tokens written in it stay text) as the tokenizer
    /// encodes a piece of a longer input: `at_start` says whether the piece starts the input.
    fn encode_plain(&self, text: &str, at_start: bool, ids: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let encoding = crate::error::catch_quietly(|| self.plain_encoding(text, at_start))
            .map_err(|panic| Error::InvalidArgument(format!("tokenization failed: {panic}")))?
            .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
        ids.extend_from_slice(encoding.get_ids());
        Ok(())
    }
}

/// For a pre-tokenizer that treats the first piece of a text differently (`Metaspace` with
/// `prepend_scheme: first`), the same pre-tokenizer as it treats every later piece
/// (`prepend_scheme: never`); `None` when there is no difference.
fn later_pre_tokenizer(
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Option<tokenizers::PreTokenizerWrapper>> {
    fn first_to_never(v: &mut Value) -> bool {
        match v {
            Value::Object(map) => {
                let mut changed = false;
                if map.get("prepend_scheme").and_then(Value::as_str) == Some("first") {
                    map.insert("prepend_scheme".into(), Value::String("never".into()));
                    changed = true;
                }
                for item in map.values_mut() {
                    changed |= first_to_never(item);
                }
                changed
            }
            Value::Array(items) => items.iter_mut().fold(false, |c, i| first_to_never(i) | c),
            _ => false,
        }
    }
    let Some(pre) = tokenizer.get_pre_tokenizer() else {
        return Ok(None);
    };
    let bad = |e: serde_json::Error| Error::Internal(format!("pre-tokenizer: {e}"));
    let mut json = serde_json::to_value(pre).map_err(bad)?;
    if !first_to_never(&mut json) {
        return Ok(None);
    }
    serde_json::from_value(json).map(Some).map_err(bad)
}
