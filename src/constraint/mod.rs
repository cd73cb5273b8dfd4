//! Constrained output: a JSON schema, a regular expression or a Lark grammar that every
//! sampled token must keep satisfiable, on llguidance (the engine llama.cpp, onnxruntime-genai
//! and vLLM use).
//!
//! A [`Constraint`] lives in a [`crate::Sampler`]: before each draw it gives the set of tokens
//! that can continue a valid output (the others' logits become -inf), and each token drawn
//! is fed back to it. Its token trie and lexer tables are built once per model, on the
//! first constraint (the [`ConstraintFactory`] the model keeps).
//!
//! Hostile input is bounded: the grammar text is limited to [`MAX_CONSTRAINT_TEXT`] bytes, and
//! llguidance's own limits (grammar size, lexer states, per-step lexer fuel and Earley items)
//! bound the work of compiling it and of each step; a constraint over its limits is an error
//! with llguidance's message, never a hang.

use std::sync::Arc;

pub mod gbnf;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};

use crate::error::{catch_dependency_panic, Error, Result};
use crate::tokenizer::Tokenizer;

/// The longest grammar, schema or regular expression accepted, in bytes.
pub const MAX_CONSTRAINT_TEXT: usize = 1 << 20;

/// What a constraint's text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintKind {
    /// A JSON schema (as JSON text): the output is one JSON value valid against it, laid out
    /// as [`json_layout`] says unless the schema has an `x-guidance` key of its own.
    JsonSchema,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex,
    /// A context-free grammar in Lark syntax as llguidance defines it (start rule `start`).
    Lark,
    /// A grammar in llama.cpp's GBNF (start rule `root`), converted to Lark ([`gbnf`]).
    Gbnf,
}

/// Where a constraint stands after the tokens fed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintState {
    /// The output so far is a prefix of a valid output, not yet a whole one.
    Incomplete,
    /// The output is valid as it is (it may still be extended, when the grammar allows).
    Complete,
    /// The output is valid and nothing can follow it: generation must end.
    Finished,
}

/// llguidance's view of a byte-level BPE vocabulary: the trie of every token's bytes, and the
/// tokenizer itself for the canonical tokens of text the grammar forces.
struct CanonicalEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for CanonicalEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

/// A constraint's token trie and parser settings for one tokenizer, built once.
pub struct ConstraintFactory {
    factory: ParserFactory,
    n_vocab: usize,
}

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintFactory")
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

impl ConstraintFactory {
    /// The factory for `tokenizer`'s vocabulary padded to `n_vocab` tokens (the model's
    /// logits; ids past the tokenizer's vocabulary are never allowed).
    pub(crate) fn new(tokenizer: &Tokenizer, n_vocab: usize) -> Result<ConstraintFactory> {
        // The tokenizer may come from a hostile file: a panic of llguidance's on its
        // vocabulary is an error.
        catch_dependency_panic(|| ConstraintFactory::build(tokenizer, n_vocab))
            .map_err(|p| Error::Unsupported(format!("constraints for this tokenizer: {p}")))?
    }

    fn build(tokenizer: &Tokenizer, n_vocab: usize) -> Result<ConstraintFactory> {
        let json = tokenizer.to_json_value()?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| Error::Unsupported(format!("constraints for this tokenizer: {e}")))?;
        if words.len() > n_vocab {
            return Err(Error::Unsupported(format!(
                "constraints: the tokenizer has {} tokens, the model's output {n_vocab}",
                words.len()
            )));
        }
        words.resize(n_vocab, Vec::new());
        let stops = tokenizer.stop_tokens();
        let Some(&eos) = stops.first() else {
            return Err(Error::Unsupported(
                "constraints need an end token (the tokenizer has none)".into(),
            ));
        };
        let trie = TokTrie::from(&TokRxInfo::new(n_vocab as u32, eos), &words);
        let trie = trie.with_eos_tokens(stops);
        // Byte-level BPE (GPT-2's scheme: SmolLM2, Qwen, Llama 3) tokenizes a piece of text
        // the same wherever it stands, so text the grammar forces can be given its canonical
        // tokens, as the model saw it in training. Other schemes (SentencePiece's "▁") would
        // tokenize it as the start of a text: there any tokenization is allowed.
        let env: TokEnv = if json["decoder"]["type"].as_str() == Some("ByteLevel") {
            Arc::new(CanonicalEnv {
                trie,
                tokenizer: tokenizer.clone(),
            })
        } else {
            Arc::new(ApproximateTokEnv::new(trie))
        };
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Internal(format!("constraints: {e}")))?;
        // Never print: a library inside a host is silent. The default ParserLimits bound each
        // grammar's size and each step's work.
        factory.quiet();
        Ok(ConstraintFactory { factory, n_vocab })
    }

    /// A constraint of `kind` from `text`; an invalid schema, expression or grammar (or one
    /// over the limits) is [`Error::InvalidArgument`] with llguidance's message.
    pub(crate) fn constraint(&self, kind: ConstraintKind, text: &str) -> Result<Constraint> {
        if text.len() > MAX_CONSTRAINT_TEXT {
            return Err(Error::InvalidArgument(format!(
                "constraint of {} bytes (at most {MAX_CONSTRAINT_TEXT})",
                text.len()
            )));
        }
        let grammar = match kind {
            ConstraintKind::JsonSchema => {
                let mut schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| Error::InvalidArgument(format!("JSON schema is not JSON: {e}")))?;
                if let Some(object) = schema.as_object_mut() {
                    if !object.contains_key("x-guidance") {
                        object.insert("x-guidance".into(), json_layout());
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            ConstraintKind::Regex => TopLevelGrammar::from_regex(text),
            ConstraintKind::Lark => TopLevelGrammar::from_lark(text.to_string()),
            ConstraintKind::Gbnf => TopLevelGrammar::from_lark(gbnf::to_lark(text)?),
        };
        let made = catch_dependency_panic(|| Matcher::new(self.factory.create_parser(grammar)));
        let matcher = made.map_err(|p| Error::InvalidArgument(format!("constraint: {p}")))?;
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidArgument(format!("constraint: {e}")));
        }
        let mut c = Constraint {
            matcher,
            mask: None,
            kind,
        };
        // The first mask is computed here, so that an expensive grammar fails now.
        c.allowed()?;
        Ok(c)
    }
}

/// How JSON output is laid out unless the schema says otherwise (llguidance's `x-guidance`
/// key): on one line, with a space after each `,` and `:` (as Python's `json.dumps` writes
/// it, and as models write JSON). llguidance's own default allows any whitespace between
/// tokens, which a model at temperature 1 can fill until `max_tokens` runs out.
pub fn json_layout() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// A grammar being followed, token by token.
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token, when computed.
    mask: Option<SimpleVob>,
    kind: ConstraintKind,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("kind", &self.kind)
            .finish()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
            kind: self.kind,
        }
    }
}

impl Constraint {
    /// What the constraint's text is.
    pub fn kind(&self) -> ConstraintKind {
        self.kind
    }

    /// Calls the matcher: its errors (kept in it) and panics become [`Error::InvalidArgument`].
    fn call<T, E>(
        &mut self,
        f: impl FnOnce(&mut Matcher) -> std::result::Result<T, E>,
    ) -> Result<T> {
        let m = &mut self.matcher;
        match catch_dependency_panic(|| f(m)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => {
                let why = self
                    .matcher
                    .get_error()
                    .unwrap_or_else(|| "unknown error".into());
                Err(Error::InvalidArgument(format!("constraint failed: {why}")))
            }
            Err(panic) => Err(Error::InvalidArgument(format!("constraint: {panic}"))),
        }
    }

    /// The tokens that may come next (the end tokens when the output is complete).
    pub(crate) fn allowed(&mut self) -> Result<&SimpleVob> {
        if self.mask.is_none() {
            self.mask = Some(self.call(|m| m.compute_mask_or_eos())?);
        }
        Ok(self.mask.as_ref().expect("computed above"))
    }

    /// True when `token` may come next.
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        let mask = self.allowed()?;
        Ok((token as usize) < mask.len() && mask.is_allowed(token))
    }

    /// Sets the logit of every `(logit, token)` candidate that may not come next to -inf.
    pub(crate) fn mask_candidates(&mut self, candidates: &mut [(f32, u32)]) -> Result<()> {
        let mask = self.allowed()?;
        for (l, t) in candidates.iter_mut() {
            if *t as usize >= mask.len() || !mask.is_allowed(*t) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Feeds the token chosen next; a token the constraint does not allow is an error (and
    /// changes nothing).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        if !self.allows(token)? {
            return Err(Error::InvalidArgument(format!(
                "token {token} does not satisfy the constraint"
            )));
        }
        if self.matcher.is_stopped() {
            // An end token after a finished output: nothing more to follow.
            return Ok(());
        }
        self.call(|m| m.consume_token(token))?;
        self.mask = None;
        Ok(())
    }

    /// Where the output stands.
    pub fn state(&mut self) -> Result<ConstraintState> {
        if self.matcher.is_stopped() {
            return Ok(ConstraintState::Finished);
        }
        Ok(if self.call(|m| m.is_accepting())? {
            ConstraintState::Complete
        } else {
            ConstraintState::Incomplete
        })
    }

    /// Back to the start of the output.
    pub fn reset(&mut self) -> Result<()> {
        self.call(|m| m.reset())?;
        self.mask = None;
        Ok(())
    }
}
