//! Streaming generation: a prompt in, text pieces out through a callback, until a stop
//! condition. Used by the C API, the CLI and the bindings.

use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::session::{PerfCounts, Session};
use crate::tokenizer::{ChatMessage, StreamDecoder};
use std::time::Instant;

/// When generation stops.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate (0 = until another condition or the context is full).
    pub max_tokens: usize,
    /// Texts that end generation; the stop text itself is not emitted.
    pub stop_strings: Vec<String>,
    /// Keep going past end-of-sequence / end-of-turn tokens.
    pub ignore_end_tokens: bool,
    /// [`chat`] only: special tokens written in message contents become control tokens. Off
    /// (the default), they are plain text, so user text cannot inject control tokens.
    pub parse_special: bool,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence or end-of-turn token.
    EndToken,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop string appeared.
    StopString,
    /// The callback returned false.
    Callback,
    /// The session's context is full.
    ContextFull,
    /// [`crate::CancelHandle::cancel`] stopped the generation.
    Cancelled,
}

/// The outcome of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    /// Tokens generated and held by the session: every token whose text was delivered (an
    /// end token that stopped generation is neither counted nor held).
    pub n_tokens: usize,
    /// Why it stopped.
    pub reason: StopReason,
}

/// Text decoded but not yet handed to the caller because it may begin a stop string.
struct StopFilter<'a> {
    stops: &'a [String],
    pending: String,
}

impl StopFilter<'_> {
    /// Adds text; returns what can be emitted, and whether a stop string was found (the
    /// text before it is then the last to emit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return (before, true);
        }
        // Hold back the longest end of the text that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(move |&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let emit_to = self.pending.len() - hold;
        let out = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        (out, false)
    }
}

/// Generates from `prompt` (appended to what the session holds) until a stop condition,
/// handing complete UTF-8 text to `on_text` as it comes; `on_text` returns false to stop.
///
/// The session then holds the prompt and every generated token whose text was delivered
/// ([`Generation::n_tokens`] of them); the last one stays pending, computed by the next step.
/// `prompt` may be empty when the session holds pending tokens (to continue a generation).
///
/// A cancellation ([`crate::CancelHandle::cancel`]) while the prompt is processed leaves the
/// session as it was and reports [`StopReason::Cancelled`] with no tokens; during generation
/// it keeps what was delivered. Other errors (a prompt that does not fit the context) leave
/// the session as it was.
pub fn generate(
    session: &mut Session,
    sampler: &mut Sampler,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() && session.n_pending() == 0 {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let model = session.model().clone();
    let tokenizer = model.tokenizer()?;
    let call = session.call();
    let cancelled = Generation {
        n_tokens: 0,
        reason: StopReason::Cancelled,
    };
    let n_prompt = (prompt.len() + session.n_pending()) as u64;
    let started = Instant::now();
    let mut logits = match session.step(prompt) {
        Err(Error::Cancelled) => return Ok(cancelled),
        other => other?,
    };
    let prompt_seconds = started.elapsed().as_secs_f64();
    let generating = Instant::now();
    // Records the call's work however the loop ends.
    let perf = |n_tokens: usize| PerfCounts {
        prompt_tokens: n_prompt,
        prompt_seconds,
        generated_tokens: n_tokens as u64,
        generation_seconds: generating.elapsed().as_secs_f64(),
    };
    for &t in prompt {
        sampler.accept(t);
    }
    let mut decoder = StreamDecoder::new();
    let mut filter = StopFilter {
        stops: &options.stop_strings,
        pending: String::new(),
    };
    let mut n_tokens = 0;
    let reason = loop {
        let token = sampler.sample(logits)?;
        if !options.ignore_end_tokens && tokenizer.stop_tokens().contains(&token) {
            break StopReason::EndToken;
        }
        if session.position() == session.n_ctx() {
            break StopReason::ContextFull;
        }
        // Held from here on: its text is about to be delivered.
        session.push_pending(token)?;
        n_tokens += 1;
        let (text, stopped) = filter.push(&decoder.push(tokenizer, token)?);
        if stopped {
            if !text.is_empty() {
                on_text(&text);
            }
            session.record_perf(perf(n_tokens));
            return Ok(Generation {
                n_tokens,
                reason: StopReason::StopString,
            });
        }
        if !text.is_empty() && !on_text(&text) {
            break StopReason::Callback;
        }
        if n_tokens == options.max_tokens {
            break StopReason::MaxTokens;
        }
        if call.cancelled() {
            break StopReason::Cancelled;
        }
        logits = match session.step(&[]) {
            Err(Error::Cancelled) => break StopReason::Cancelled,
            other => other?,
        };
    };
    // What was held back: an incomplete character or the start of a stop string that never
    // completed.
    if reason != StopReason::Callback {
        let (mut rest, _) = filter.push(&decoder.finish(tokenizer)?);
        rest.push_str(&filter.pending);
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    session.record_perf(perf(n_tokens));
    Ok(Generation { n_tokens, reason })
}

/// Applies the model's chat template to the whole conversation and generates the assistant's
/// reply. Tokens the session already holds from earlier turns are reused (the session is
/// rewound to the longest common prefix), so a conversation kept in one session costs only
/// its new tokens.
///
/// Message contents are tokenized as plain text (unless `options.parse_special`): a special
/// token written in a message stays text, and only the template's own control tokens are
/// control tokens ([`crate::Tokenizer::encode_chat`]).
pub fn chat(
    session: &mut Session,
    sampler: &mut Sampler,
    messages: &[ChatMessage],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let model = session.model().clone();
    let ids = model
        .tokenizer()?
        .encode_chat(messages, true, options.parse_special)?;
    let common = session
        .tokens()
        .iter()
        .zip(&ids)
        .take_while(|(a, b)| a == b)
        .count();
    // At least one token is stepped again, to have fresh logits.
    let keep = common.min(ids.len().saturating_sub(1));
    session.rewind(keep)?;
    generate(session, sampler, &ids[keep..], options, on_text)
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_strings_are_held_back_then_cut() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("Hello </"), ("Hello ".to_string(), false));
        assert_eq!(f.push("en"), (String::new(), false));
        assert_eq!(f.push("d> more"), (String::new(), true));
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("ST"), (String::new(), false));
        assert_eq!(f.push("ART"), ("START".to_string(), false));
        assert_eq!(f.push("xSTOPy"), ("x".to_string(), true));
        let none: Vec<String> = Vec::new();
        let mut f = StopFilter {
            stops: &none,
            pending: String::new(),
        };
        assert_eq!(f.push("é"), ("é".to_string(), false));
    }
}
