//! Streaming generation: a prompt in, text pieces out until a stop condition, pulled one
//! token at a time ([`Generator`]) or pushed through a callback ([`generate`], [`chat`]).
//! Used by the C API (its callbacks and its background generation handles), the CLI and the
//! bindings.

use std::sync::Arc;
use std::time::Instant;

use crate::constraint::{Constraint, ConstraintKind, ConstraintState};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::session::{CallScope, PerfCounts, Session};
use crate::tokenizer::{ChatMessage, Conversation, StreamDecoder};
use crate::tools::{reply_grammar, ReplyShape, ToolChoice};

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
    /// Compute each token's log-probability ([`Piece::logprob`]; about one pass over the
    /// vocabulary per token).
    pub logprobs: bool,
    /// With `logprobs`: also the most likely alternatives ([`Piece::top_logprobs`]).
    pub top_logprobs: usize,
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
    /// The sampler's constraint is satisfied and allows nothing more (or only an end
    /// token, which was drawn): the output is complete.
    ConstraintComplete,
    /// `max_tokens` or the context ran out before the sampler's constraint was satisfied:
    /// the text is only the start of a valid output.
    ConstraintIncomplete,
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

/// Adds decoded `text` to what is `held` back; returns what can be emitted, and whether a
/// stop string was found (the text before it is then the last to emit, and nothing is held).
fn hold_back(stops: &[String], held: &mut String, text: &str) -> (String, bool) {
    held.push_str(text);
    if let Some(at) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| held.find(s.as_str()))
        .min()
    {
        let before = held[..at].to_string();
        held.clear();
        return (before, true);
    }
    // Hold back the longest end of the text that could still grow into a stop string.
    let hold = stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(move |&n| s.is_char_boundary(n))
                .map(move |n| &s[..n])
        })
        .filter(|prefix| held.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    let emit_to = held.len() - hold;
    let out = held[..emit_to].to_string();
    held.drain(..emit_to);
    (out, false)
}

/// One generated token and the text it completes, as [`Generator::next_piece`] yields them.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Text ready for the host: complete UTF-8, stop strings held back until they can be
    /// ruled out (so it may be empty, or hold the text of earlier tokens too).
    pub text: String,
    /// The token sampled; `None` for the last piece of a generation, which delivers the text
    /// held back when it stopped.
    pub token: Option<u32>,
    /// The token's log-probability under the model's distribution (the logits before any
    /// sampling option); `NaN` unless [`GenerateOptions::logprobs`] asked for it.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probabilities, best first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A generation as an iterator: the prompt is computed when it is made, then each
/// [`Generator::next_piece`] samples one token (and computes the one before it). The host
/// pulls tokens at its own pace and may stop at any time; [`Generator::finish`] then says why
/// and how many tokens the session holds. [`generate`] and [`chat`] are loops over it.
///
/// The session holds every token whose piece was returned: the last one stays pending, so
/// stopping early costs no forward pass.
pub struct Generator<'s> {
    session: &'s mut Session,
    sampler: &'s mut Sampler,
    model: Arc<Model>,
    options: GenerateOptions,
    /// Marks the generation as one call, for cancellation.
    call: CallScope,
    decoder: StreamDecoder,
    /// Text held back because it may begin a stop string.
    held: String,
    n_tokens: usize,
    /// The last token's piece was returned: the stop conditions that follow a delivered
    /// token, then its forward pass, come first in the next call.
    delivered: bool,
    /// Why it stopped, once it has.
    reason: Option<StopReason>,
    /// The held-back text was delivered (or must not be).
    flushed: bool,
    n_prompt: u64,
    prompt_seconds: f64,
    generating: Instant,
    /// The sampler follows a reply's tool-call constraint, removed when the generator is
    /// dropped (the sampler had none of its own: [`check_tool_sampler`]).
    tool_constraint: bool,
}

impl Drop for Generator<'_> {
    fn drop(&mut self) {
        // The other generations on the pool no longer wait for this one's steps.
        self.session.pool().clone().steps.leave(self.session);
        if self.tool_constraint {
            self.sampler.set_constraint(None);
        }
    }
}

impl<'s> Generator<'s> {
    /// Appends `prompt` to what the session holds and computes it (an error here leaves the
    /// session as it was). `prompt` may be empty when the session holds pending tokens. A
    /// cancellation while the prompt is computed gives a generator that has already stopped
    /// ([`StopReason::Cancelled`], no tokens).
    pub fn new(
        session: &'s mut Session,
        sampler: &'s mut Sampler,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<Generator<'s>> {
        if prompt.is_empty() && session.n_pending() == 0 {
            return Err(Error::InvalidArgument("the prompt has no tokens".into()));
        }
        let model = session.model().clone();
        model.tokenizer()?;
        let call = session.call();
        let n_prompt = (prompt.len() + session.n_pending()) as u64;
        let started = Instant::now();
        let reason = match session.step(prompt) {
            Err(Error::Cancelled) => Some(StopReason::Cancelled),
            Err(e) => return Err(e),
            Ok(_) => None,
        };
        if reason.is_none() {
            for &t in prompt {
                sampler.accept(t);
            }
            if !prompt.is_empty() {
                // A new output (an empty prompt continues the last one).
                sampler.restart_constraint();
            }
            // Its steps now share passes with the other generations on the pool.
            session.pool().clone().steps.join(session);
        }
        Ok(Generator {
            session,
            sampler,
            model,
            options: options.clone(),
            call,
            decoder: StreamDecoder::new(),
            held: String::new(),
            n_tokens: 0,
            delivered: false,
            flushed: reason.is_some(),
            reason,
            n_prompt,
            prompt_seconds: started.elapsed().as_secs_f64(),
            generating: Instant::now(),
            tool_constraint: false,
        })
    }

    /// Applies the model's chat template to the conversation and starts the assistant's
    /// reply, reusing the tokens of earlier turns the session still holds (see [`chat`]).
    pub fn chat(
        session: &'s mut Session,
        sampler: &'s mut Sampler,
        messages: &[ChatMessage],
        options: &GenerateOptions,
    ) -> Result<Generator<'s>> {
        let (keep, ids) = chat_tokens(session, messages, options.parse_special)?;
        session.rewind(keep)?;
        Generator::new(session, sampler, &ids[keep..], options)
    }

    /// [`Generator::chat`] for a whole [`Conversation`] (tools, tool calls and results,
    /// template variables, a template of its own). With tools, the reply follows the
    /// template's tool-call format ([`crate::tools`]) as `tool_choice` asks, under a
    /// constraint built from the tools' argument schemas that the sampler holds for this
    /// reply (it must have none of its own; it has none again when the generator is
    /// dropped, so a continuation with an empty prompt is not constrained: ask again
    /// with the conversation). Parse the reply with [`crate::Tokenizer::parse_reply`].
    pub fn chat_conversation(
        session: &'s mut Session,
        sampler: &'s mut Sampler,
        conversation: &Conversation,
        options: &GenerateOptions,
    ) -> Result<Generator<'s>> {
        let (keep, ids, constraint) =
            conversation_tokens(session, conversation, options.parse_special)?;
        check_tool_sampler(sampler, &constraint)?;
        session.rewind(keep)?;
        let mut g = Generator::new(session, sampler, &ids[keep..], options)?;
        if let Some(c) = constraint {
            g.follow_tool_constraint(c);
        }
        Ok(g)
    }

    /// Has the sampler (which has no constraint of its own) follow a reply's tool-call
    /// `constraint` until the generator is dropped.
    pub(crate) fn follow_tool_constraint(&mut self, constraint: Constraint) {
        self.sampler.set_constraint(Some(constraint));
        self.tool_constraint = true;
    }

    /// Tokens generated and held so far.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Why the generation stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.reason
    }

    /// The next piece, or `None` when the generation has stopped and everything was
    /// delivered. Errors (a bad sampler option, a failing step) end the generation; the
    /// session keeps the tokens delivered before.
    pub fn next_piece(&mut self) -> Result<Option<Piece>> {
        if self.reason.is_none() && self.delivered {
            self.delivered = false;
            if self.n_tokens == self.options.max_tokens {
                self.reason = Some(self.ran_out(StopReason::MaxTokens)?);
            } else if self.call.cancelled() {
                self.reason = Some(StopReason::Cancelled);
            } else {
                match self.session.step_together() {
                    Err(Error::Cancelled) => self.reason = Some(StopReason::Cancelled),
                    Err(e) => {
                        self.stop(StopReason::Cancelled);
                        return Err(e);
                    }
                    Ok(_) => {}
                }
            }
        }
        if self.reason.is_some() {
            // The other generations on the pool no longer wait for this one's steps.
            self.session.pool().clone().steps.leave(self.session);
            return self.flush();
        }
        let tokenizer = self.model.tokenizer()?;
        let logits = self.session.logits();
        let token = self.sampler.sample(logits)?;
        let (logprob, top_logprobs) = if self.options.logprobs {
            log_probabilities(logits, token, self.options.top_logprobs)
        } else {
            (f32::NAN, Vec::new())
        };
        let finished = self.sampler.constraint_state()? == Some(ConstraintState::Finished);
        if !self.options.ignore_end_tokens && tokenizer.stop_tokens().contains(&token) {
            self.reason = Some(if finished {
                StopReason::ConstraintComplete
            } else {
                StopReason::EndToken
            });
            return self.flush();
        }
        if self.session.position() == self.session.n_ctx() {
            self.reason = Some(self.ran_out(StopReason::ContextFull)?);
            return self.flush();
        }
        // Held from here on: its text is about to be delivered.
        self.session.push_pending(token)?;
        self.n_tokens += 1;
        self.delivered = true;
        let (text, stopped) = hold_back(
            &self.options.stop_strings,
            &mut self.held,
            &self.decoder.push(tokenizer, token)?,
        );
        if stopped {
            self.stop(StopReason::StopString);
        } else if finished {
            self.stop(StopReason::ConstraintComplete);
        }
        Ok(Some(Piece {
            text,
            token: Some(token),
            logprob,
            top_logprobs,
        }))
    }

    /// The text held back when the generation stopped, once.
    fn flush(&mut self) -> Result<Option<Piece>> {
        if self.flushed {
            return Ok(None);
        }
        self.flushed = true;
        let tokenizer = self.model.tokenizer()?;
        let (mut rest, _) = hold_back(
            &self.options.stop_strings,
            &mut self.held,
            &self.decoder.finish(tokenizer)?,
        );
        rest.push_str(&self.held);
        self.held.clear();
        Ok((!rest.is_empty()).then(|| Piece {
            text: rest,
            token: None,
            logprob: f32::NAN,
            top_logprobs: Vec::new(),
        }))
    }

    /// The reason to report when `limit` (tokens or context) ends the generation: the
    /// constraint's, when one is set and not yet satisfied.
    fn ran_out(&mut self, limit: StopReason) -> Result<StopReason> {
        Ok(match self.sampler.constraint_state()? {
            Some(ConstraintState::Incomplete) => StopReason::ConstraintIncomplete,
            _ => limit,
        })
    }

    /// Stops now for `reason`; the text held back is dropped.
    pub fn stop(&mut self, reason: StopReason) {
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        self.flushed = true;
    }

    /// Ends the generation (as stopped by the host, [`StopReason::Callback`], if it had not
    /// stopped by itself) and records its work in the session's [`Session::perf`].
    pub fn finish(mut self) -> Generation {
        self.stop(StopReason::Callback);
        self.session.record_perf(PerfCounts {
            prompt_tokens: self.n_prompt,
            prompt_seconds: self.prompt_seconds,
            generated_tokens: self.n_tokens as u64,
            generation_seconds: self.generating.elapsed().as_secs_f64(),
        });
        Generation {
            n_tokens: self.n_tokens,
            reason: self.reason.unwrap_or(StopReason::Callback),
        }
    }
}

/// The tokens of a conversation with the chat template applied, and how many of them the
/// session already holds and can keep (at least one is stepped again, for fresh logits).
pub(crate) fn chat_tokens(
    session: &Session,
    messages: &[ChatMessage],
    parse_special: bool,
) -> Result<(usize, Vec<u32>)> {
    let ids = session
        .model()
        .tokenizer()?
        .encode_chat(messages, true, parse_special)?;
    Ok((common_prefix(session, &ids), ids))
}

/// [`chat_tokens`] for a [`Conversation`], with the constraint its reply follows for its tools
/// and `tool_choice`, if any.
pub(crate) fn conversation_tokens(
    session: &Session,
    conversation: &Conversation,
    parse_special: bool,
) -> Result<(usize, Vec<u32>, Option<Constraint>)> {
    let model = session.model();
    let constraint = tool_constraint(model, conversation)?;
    let ids = model
        .tokenizer()?
        .encode_conversation(conversation, true, parse_special)?;
    Ok((common_prefix(session, &ids), ids, constraint))
}

/// The constraint a conversation's reply follows for its tools and `tool_choice`, if any.
fn tool_constraint(model: &Model, conversation: &Conversation) -> Result<Option<Constraint>> {
    let tokenizer = model.tokenizer()?;
    let template = tokenizer.conversation_template(conversation)?;
    let choice = conversation.tool_choice.clone();
    if !template.reads_tools() {
        if choice.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{} does not read `tools`: tool_choice cannot apply",
                template.origin()
            )));
        }
        return Ok(None);
    }
    let Some(format) = template.tool_format() else {
        // A template of another format: the model is told of the tools, and its reply is
        // not constrained.
        return match choice {
            Some(ToolChoice::Required | ToolChoice::Function(_)) => {
                Err(Error::InvalidArgument(format!(
                    "{} asks for tool calls in a format Ember cannot constrain (it knows \
                     <tool_call> blocks and JSON objects with \"parameters\"): use \
                     tool_choice \"auto\"",
                    template.origin()
                )))
            }
            _ => Ok(None),
        };
    };
    let choice = choice.unwrap_or(ToolChoice::Auto);
    let think_open = template.thinks()
        && tokenizer
            .render_conversation(conversation, true)?
            .trim_end()
            .ends_with("<think>");
    // A reply may open with a `<think>` block when the template knows of them and the
    // conversation does not turn thinking off.
    let shape = ReplyShape {
        thinking: template.thinks()
            && conversation.variables.get("enable_thinking")
                != Some(&serde_json::Value::Bool(false)),
        think_open,
        parallel: conversation.parallel_tool_calls.unwrap_or(true),
    };
    reply_grammar(format, conversation.tools(), &choice, shape)?
        .map(|grammar| model.constraint(ConstraintKind::Lark, &grammar))
        .transpose()
}

/// A reply constrained by its tools needs a sampler without a constraint of its own (which
/// of the two would it follow?).
pub(crate) fn check_tool_sampler(sampler: &Sampler, tools: &Option<Constraint>) -> Result<()> {
    if tools.is_some() && sampler.constraint().is_some() {
        return Err(Error::InvalidArgument(
            "the sampler has a constraint of its own, and a reply with tools follows the \
             tools' format: remove one of them"
                .into(),
        ));
    }
    Ok(())
}

/// How many of a prompt's `ids` the session holds already and can keep (at least one is
/// stepped again, for fresh logits).
fn common_prefix(session: &Session, ids: &[u32]) -> usize {
    let common = session
        .tokens()
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(ids.len().saturating_sub(1))
}

/// The log-probability of `token` under `softmax(logits)`, and the `top` best tokens'.
fn log_probabilities(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(order.len());
        let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        order.select_nth_unstable_by(k - 1, by);
        order.truncate(k);
        order.sort_by(by);
        best = order
            .into_iter()
            .map(|t| (t, lp(logits[t as usize])))
            .collect();
    }
    (lp(logits[token as usize]), best)
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
    drive(Generator::new(session, sampler, prompt, options)?, on_text)
}

/// Hands a generator's text to `on_text` until it stops or `on_text` returns false.
fn drive(mut g: Generator<'_>, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation> {
    while let Some(piece) = g.next_piece()? {
        if !piece.text.is_empty() && !on_text(&piece.text) && g.stop_reason().is_none() {
            g.stop(StopReason::Callback);
        }
    }
    Ok(g.finish())
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
    drive(
        Generator::chat(session, sampler, messages, options)?,
        on_text,
    )
}

/// [`chat`] for a whole [`Conversation`] (see [`Generator::chat_conversation`]).
pub fn chat_conversation(
    session: &mut Session,
    sampler: &mut Sampler,
    conversation: &Conversation,
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    drive(
        Generator::chat_conversation(session, sampler, conversation, options)?,
        on_text,
    )
}

#[cfg(test)]
mod tests {
    use super::hold_back;

    #[test]
    fn stop_strings_are_held_back_then_cut() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        let mut held = String::new();
        assert_eq!(
            hold_back(&stops, &mut held, "Hello </"),
            ("Hello ".to_string(), false)
        );
        assert_eq!(hold_back(&stops, &mut held, "en"), (String::new(), false));
        assert_eq!(
            hold_back(&stops, &mut held, "d> more"),
            (String::new(), true)
        );
        let mut held = String::new();
        assert_eq!(hold_back(&stops, &mut held, "ST"), (String::new(), false));
        assert_eq!(
            hold_back(&stops, &mut held, "ART"),
            ("START".to_string(), false)
        );
        assert_eq!(
            hold_back(&stops, &mut held, "xSTOPy"),
            ("x".to_string(), true)
        );
        let mut held = String::new();
        assert_eq!(hold_back(&[], &mut held, "é"), ("é".to_string(), false));
    }

    #[test]
    fn log_probabilities_are_normalised_and_ranked() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let (lp, top) = super::log_probabilities(&logits, 2, 2);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(top[1].1, lp);
    }
}
