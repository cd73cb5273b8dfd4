//! Streaming generation and chat.

use std::ffi::{c_char, c_void};

use super::session::with_session;
use super::tokenizer::{chat_messages, conversation_json};
use super::{
    borrow, c_text, ember_chat_message, ember_sampler, ember_session, ember_status, read_params,
    run, slice, text, write_params,
};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Generation, StopReason};
use crate::sampler::Sampler;
use crate::session::Session;

/// Receives generated text: `len` bytes of complete UTF-8 at `piece` (also NUL-terminated),
/// valid only during the call. Return true to continue, false to stop. Called on the thread
/// that called `ember_generate`/`ember_chat`; it must not unwind or longjmp out of the call.
pub type ember_text_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> bool>;

/// Why generation stopped.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_stop_reason {
    /// The model produced an end-of-sequence or end-of-turn token.
    EMBER_STOP_REASON_END_TOKEN = 0,
    /// `max_tokens` tokens were generated.
    EMBER_STOP_REASON_MAX_TOKENS = 1,
    /// A stop string appeared (it is not passed to the callback).
    EMBER_STOP_REASON_STOP_STRING = 2,
    /// The callback returned false.
    EMBER_STOP_REASON_CALLBACK = 3,
    /// The session's context is full.
    EMBER_STOP_REASON_CONTEXT_FULL = 4,
    /// `ember_session_cancel` stopped the generation (the call returns
    /// `EMBER_ERR_CANCELLED`, and still writes this reason and the token count).
    EMBER_STOP_REASON_CANCELLED = 5,
    /// The sampler's constraint (`ember_sampler_set_constraint`) is satisfied and allows
    /// nothing more, or only an end token, which was drawn: the output is complete.
    EMBER_STOP_REASON_CONSTRAINT_COMPLETE = 6,
    /// `max_tokens` or the context ran out before the sampler's constraint was satisfied:
    /// the text is only the start of a valid output (raise `max_tokens` or `n_ctx`).
    EMBER_STOP_REASON_CONSTRAINT_INCOMPLETE = 7,
}

/// Options for `ember_generate` and `ember_chat`. Fill with `ember_generate_params_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_generate_params {
    /// Size of this struct in bytes, as the caller knows it (set by the default function).
    pub struct_size: u32,
    /// Most tokens to generate; 0 = until an end token, a stop string or a full context.
    /// Default 256.
    pub max_tokens: u32,
    /// `n_stop_strings` NUL-terminated UTF-8 strings that end generation (borrowed for the
    /// call); may be NULL when `n_stop_strings` is 0.
    pub stop_strings: *const *const c_char,
    /// Number of stop strings.
    pub n_stop_strings: usize,
    /// Non-zero: continue past end-of-sequence/end-of-turn tokens. Default 0.
    pub ignore_end_tokens: u32,
    /// `ember_generate` only: non-zero adds BOS/EOS as the tokenizer does (for a prompt that
    /// starts the sequence). Default 1.
    pub add_special: u32,
    /// Non-zero recognises special tokens written in the text: in the prompt of
    /// `ember_generate`, in the message contents of `ember_chat`. Default 0, so user text
    /// can never inject control tokens (a message cannot open a system turn); only what the
    /// chat template itself writes becomes control tokens. Turn it on only for text the host
    /// wrote itself.
    pub parse_special: u32,
    /// Non-zero: compute each generated token's log-probability under the model's
    /// distribution (`ember_generation_poll_tokens`; about one pass over the vocabulary per
    /// token). Default 0.
    pub logprobs: u32,
    /// `ember_generation_start` only: the most pieces of text the generation computes ahead
    /// of `ember_generation_poll`; it pauses while that many wait to be polled (so a host
    /// that stops reading costs no more tokens). 0 (the default): no limit.
    pub max_ahead: u32,
    /// `ember_generation_start` only, with `logprobs`: each token also carries the
    /// `top_logprobs` most likely tokens and their log-probabilities, best first, read with
    /// `ember_generation_poll_tokens_top`. 0 (the default) to 20.
    pub top_logprobs: u32,
}

const GENERATE_PARAMS_DEFAULT: ember_generate_params = ember_generate_params {
    struct_size: std::mem::size_of::<ember_generate_params>() as u32,
    max_tokens: 256,
    stop_strings: std::ptr::null(),
    n_stop_strings: 0,
    ignore_end_tokens: 0,
    add_special: 1,
    parse_special: 0,
    logprobs: 0,
    max_ahead: 0,
    top_logprobs: 0,
};

/// Fills `*params` (a struct of `struct_size` bytes) with the defaults. Use the
/// `EMBER_GENERATE_PARAMS_DEFAULT(&params)` macro.
///
/// # Safety
/// `params` must be NULL or valid for writing `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_generate_params_default(
    struct_size: usize,
    params: *mut ember_generate_params,
) -> ember_status {
    // SAFETY: forwarded contract.
    run(|| unsafe { write_params(struct_size, params, GENERATE_PARAMS_DEFAULT) })
}

/// Reads generation options from C.
///
/// # Safety
/// `params` NULL or a params struct whose stop strings are valid.
pub(super) unsafe fn options(
    params: *const ember_generate_params,
) -> Result<(ember_generate_params, GenerateOptions)> {
    // SAFETY: forwarded contract.
    let p = unsafe { read_params(params, GENERATE_PARAMS_DEFAULT, "params") }?;
    // SAFETY: forwarded contract.
    let stops = unsafe { slice(p.stop_strings, p.n_stop_strings, "params.stop_strings") }?;
    let max_top = crate::defaults::MAX_TOP_LOGPROBS;
    if p.top_logprobs as usize > max_top || (p.top_logprobs > 0 && p.logprobs == 0) {
        return Err(Error::InvalidArgument(format!(
            "params.top_logprobs {} (0 to {max_top}, with params.logprobs set)",
            p.top_logprobs
        )));
    }
    let stop_strings = stops
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            // SAFETY: forwarded contract: each stop string is NUL-terminated.
            unsafe { c_text(s, &format!("params.stop_strings[{i}]")) }.map(str::to_string)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((
        p,
        GenerateOptions {
            max_tokens: p.max_tokens as usize,
            stop_strings,
            ignore_end_tokens: p.ignore_end_tokens != 0,
            parse_special: p.parse_special != 0,
            logprobs: p.logprobs != 0,
            top_logprobs: p.top_logprobs as usize,
        },
    ))
}

/// Adapts the C callback; pieces are copied into a NUL-terminated buffer.
fn callback(on_text: ember_text_callback, user: *mut c_void) -> impl FnMut(&str) -> bool {
    let mut buffer: Vec<u8> = Vec::new();
    move |piece: &str| {
        let Some(f) = on_text else { return true };
        buffer.clear();
        buffer.extend_from_slice(piece.as_bytes());
        buffer.push(0);
        // SAFETY: the host gave this callback for this call; the buffer outlives the call.
        unsafe { f(buffer.as_ptr().cast(), piece.len(), user) }
    }
}

impl ember_stop_reason {
    pub(super) fn of(reason: StopReason) -> ember_stop_reason {
        match reason {
            StopReason::EndToken => ember_stop_reason::EMBER_STOP_REASON_END_TOKEN,
            StopReason::MaxTokens => ember_stop_reason::EMBER_STOP_REASON_MAX_TOKENS,
            StopReason::StopString => ember_stop_reason::EMBER_STOP_REASON_STOP_STRING,
            StopReason::Callback => ember_stop_reason::EMBER_STOP_REASON_CALLBACK,
            StopReason::ContextFull => ember_stop_reason::EMBER_STOP_REASON_CONTEXT_FULL,
            StopReason::Cancelled => ember_stop_reason::EMBER_STOP_REASON_CANCELLED,
            StopReason::ConstraintComplete => {
                ember_stop_reason::EMBER_STOP_REASON_CONSTRAINT_COMPLETE
            }
            StopReason::ConstraintIncomplete => {
                ember_stop_reason::EMBER_STOP_REASON_CONSTRAINT_INCOMPLETE
            }
        }
    }
}

pub(super) fn report(
    result: Generation,
    out_reason: *mut ember_stop_reason,
    out_n_tokens: *mut usize,
) {
    let reason = ember_stop_reason::of(result.reason);
    // SAFETY: both outputs are NULL or valid for writing (the callers' contract).
    unsafe {
        if let Some(r) = out_reason.as_mut() {
            *r = reason;
        }
        if let Some(n) = out_n_tokens.as_mut() {
            *n = result.n_tokens;
        }
    }
}

/// Tokenizes `prompt` (appended to what the session holds), then generates with `sampler`,
/// passing text to `on_text` as it completes, until a stop condition. `params` may be NULL
/// for defaults; `on_text` may be NULL. On success the stop reason and the number of tokens
/// generated are written to `out_reason` and `out_n_tokens` (each may be NULL).
///
/// The session then holds the prompt and every generated token whose text was delivered
/// (`*out_n_tokens` of them; an end token that stopped generation is not held), so
/// `ember_session_position` counts them and a later call continues exactly after the text.
/// The last token stays pending: the next step computes it. `prompt_len` may be 0 to continue
/// after such a token.
///
/// Cancellation (`ember_session_cancel`) returns `EMBER_ERR_CANCELLED` and, unlike other
/// failures, still writes the outputs: `EMBER_STOP_REASON_CANCELLED` and the number of tokens
/// delivered and held (0, with the session as before the call, when the prompt was being
/// processed). A prompt that does not fit is `EMBER_ERR_CONTEXT_FULL` with the session as
/// before. Either way the session stays usable.
///
/// # Safety
/// `prompt` valid for `prompt_len` bytes; `params` NULL or a params struct; outputs NULL or
/// valid for writing.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_generate(
    session: *mut ember_session,
    sampler: *mut ember_sampler,
    prompt: *const c_char,
    prompt_len: usize,
    params: *const ember_generate_params,
    on_text: ember_text_callback,
    user: *mut c_void,
    out_reason: *mut ember_stop_reason,
    out_n_tokens: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe {
        run_generation(
            session,
            sampler,
            params,
            (on_text, user),
            (out_reason, out_n_tokens),
            |s, sampler, p, options, on_text| {
                // SAFETY: caller's contract for the prompt.
                let prompt = text(prompt, prompt_len, "prompt")?;
                let model = s.model().clone();
                let ids =
                    model
                        .tokenizer()?
                        .encode(prompt, p.add_special != 0, p.parse_special != 0)?;
                crate::generate::generate(s, sampler, &ids, options, on_text)
            },
        )
    }
}

/// Applies the model's chat template to the whole conversation (`n_messages` messages) and
/// generates the assistant's reply, as `ember_generate` does. Keep a conversation in one
/// session: tokens of earlier turns that the session still holds are reused, so each turn
/// costs only its new tokens.
///
/// Message contents (and roles) are tokenized as plain text: a special token written in a
/// message (`<|im_start|>`, ...) stays text, so player text cannot open or close turns; only
/// what the template itself writes becomes control tokens. `params->parse_special` turns this
/// protection off for hosts that write the messages themselves.
///
/// # Safety
/// `messages` valid for `n_messages` entries with NUL-terminated strings; the rest as
/// `ember_generate`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_chat(
    session: *mut ember_session,
    sampler: *mut ember_sampler,
    messages: *const ember_chat_message,
    n_messages: usize,
    params: *const ember_generate_params,
    on_text: ember_text_callback,
    user: *mut c_void,
    out_reason: *mut ember_stop_reason,
    out_n_tokens: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe {
        run_generation(
            session,
            sampler,
            params,
            (on_text, user),
            (out_reason, out_n_tokens),
            |s, sampler, _, options, on_text| {
                // SAFETY: caller's contract for the messages.
                let messages = chat_messages(messages, n_messages)?;
                crate::generate::chat(s, sampler, &messages, options, on_text)
            },
        )
    }
}

/// `ember_chat` for a conversation given as JSON (`conversation_len` bytes, as
/// `ember_chat_apply_json` takes it): tool calls and tool results in its messages, `tools`,
/// template variables, a `chat_template` of its own. With `tools`, the reply follows the
/// template's tool-call format (`<tool_call>` blocks for Qwen-style templates, one JSON
/// object for Llama-style ones) as the conversation's `tool_choice` says: `"auto"` (the
/// default: text, or tool calls that are valid for the tools' argument schemas), `"required"`
/// (one or more calls), `{"type": "function", "function": {"name": NAME}}` (one call of that
/// tool) or `"none"` (text only); `"parallel_tool_calls": false` allows one call per reply
/// (small models that do not know when to stop calling need it). For that reply the sampler
/// follows a constraint built from the tools (it must have none of its own:
/// `EMBER_ERR_INVALID_ARGUMENT` otherwise; it has none again when the call returns), and the
/// generation ends with `EMBER_STOP_REASON_CONSTRAINT_COMPLETE` when the calls are complete. Read the reply's calls
/// with `ember_chat_parse_reply`. Strings in the conversation are plain text as in
/// `ember_chat` (unless `params->parse_special`).
///
/// # Safety
/// `conversation` valid for `conversation_len` bytes; the rest as `ember_generate`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_chat_json(
    session: *mut ember_session,
    sampler: *mut ember_sampler,
    conversation: *const c_char,
    conversation_len: usize,
    params: *const ember_generate_params,
    on_text: ember_text_callback,
    user: *mut c_void,
    out_reason: *mut ember_stop_reason,
    out_n_tokens: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe {
        run_generation(
            session,
            sampler,
            params,
            (on_text, user),
            (out_reason, out_n_tokens),
            |s, sampler, _, options, on_text| {
                // SAFETY: caller's contract for the conversation.
                let conversation = conversation_json(conversation, conversation_len)?;
                crate::generate::chat_conversation(s, sampler, &conversation, options, on_text)
            },
        )
    }
}

/// What `ember_generate` and `ember_chat` share: reading the options, taking the sampler and
/// the session, adapting the callback, reporting the outcome. `body` generates.
///
/// # Safety
/// As `ember_generate`.
unsafe fn run_generation(
    session: *mut ember_session,
    sampler: *mut ember_sampler,
    params: *const ember_generate_params,
    (on_text, user): (ember_text_callback, *mut c_void),
    (out_reason, out_n_tokens): (*mut ember_stop_reason, *mut usize),
    body: impl FnOnce(
        &mut Session,
        &mut Sampler,
        &ember_generate_params,
        &GenerateOptions,
        &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation>,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract for each pointer.
        let (sampler, (p, options)) = unsafe { (borrow(sampler, "sampler")?, options(params)?) };
        let mut on_text = callback(on_text, user);
        // SAFETY: caller's contract.
        let result = sampler.sampler.with(|sampler| unsafe {
            with_session(session, |s| body(s, sampler, &p, &options, &mut on_text))
        })?;
        report(result, out_reason, out_n_tokens);
        if result.reason == StopReason::Cancelled {
            return Err(Error::Cancelled);
        }
        Ok(())
    })
}
