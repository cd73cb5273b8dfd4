//! Streaming generation and chat, and the incremental detokenizer.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::model::chat_messages;
use super::session::with_session;
use super::{
    borrow, c_text, ember_chat_message, ember_model, ember_sampler, ember_session, ember_status,
    read_params, run, slice, text, write_params, write_text,
};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Generation, StopReason};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::session::Session;
use crate::tokenizer::StreamDecoder;

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
    /// `ember_generate` only: non-zero recognises special tokens written in the prompt.
    /// Default 0, so user text cannot inject control tokens.
    pub parse_special: u32,
}

const GENERATE_PARAMS_DEFAULT: ember_generate_params = ember_generate_params {
    struct_size: std::mem::size_of::<ember_generate_params>() as u32,
    max_tokens: 256,
    stop_strings: std::ptr::null(),
    n_stop_strings: 0,
    ignore_end_tokens: 0,
    add_special: 1,
    parse_special: 0,
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
unsafe fn options(
    params: *const ember_generate_params,
) -> Result<(ember_generate_params, GenerateOptions)> {
    // SAFETY: forwarded contract.
    let p = unsafe { read_params(params, GENERATE_PARAMS_DEFAULT, "params") }?;
    // SAFETY: forwarded contract.
    let stops = unsafe { slice(p.stop_strings, p.n_stop_strings, "params.stop_strings") }?;
    let stop_strings = stops
        .iter()
        .enumerate()
        // SAFETY: forwarded contract: each stop string is NUL-terminated.
        .map(|(i, &s)| {
            unsafe { c_text(s, &format!("params.stop_strings[{i}]")) }.map(str::to_string)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((
        p,
        GenerateOptions {
            max_tokens: p.max_tokens as usize,
            stop_strings,
            ignore_end_tokens: p.ignore_end_tokens != 0,
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

fn report(result: Generation, out_reason: *mut ember_stop_reason, out_n_tokens: *mut usize) {
    let reason = match result.reason {
        StopReason::EndToken => ember_stop_reason::EMBER_STOP_REASON_END_TOKEN,
        StopReason::MaxTokens => ember_stop_reason::EMBER_STOP_REASON_MAX_TOKENS,
        StopReason::StopString => ember_stop_reason::EMBER_STOP_REASON_STOP_STRING,
        StopReason::Callback => ember_stop_reason::EMBER_STOP_REASON_CALLBACK,
        StopReason::ContextFull => ember_stop_reason::EMBER_STOP_REASON_CONTEXT_FULL,
    };
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
/// The session then holds the prompt and the generated tokens except the last. Cancellation
/// (`ember_session_cancel`) returns `EMBER_ERR_CANCELLED`; a prompt that does not fit is
/// `EMBER_ERR_CONTEXT_FULL`; either way the session stays usable.
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
        let mut sampler = sampler.lock()?;
        let mut on_text = callback(on_text, user);
        // SAFETY: caller's contract.
        let result = unsafe {
            with_session(session, |s| {
                body(s, &mut sampler, &p, &options, &mut on_text)
            })
        }?;
        report(result, out_reason, out_n_tokens);
        Ok(())
    })
}

/// An incremental detokenizer: feed tokens one by one, get only complete UTF-8 text. Used by
/// one thread at a time.
pub struct ember_detokenizer {
    model: Arc<Model>,
    state: StreamDecoder,
}

/// Creates a detokenizer for `model`'s tokenizer (it keeps the model alive).
///
/// # Safety
/// `model` a live model; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenizer_new(
    model: *const ember_model,
    out: *mut *mut ember_detokenizer,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        model.tokenizer()?;
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let handle = Box::new(ember_detokenizer {
            model: model.model.clone(),
            state: StreamDecoder::new(),
        });
        // SAFETY: out checked non-NULL.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a detokenizer (NULL is ignored).
///
/// # Safety
/// `detokenizer` NULL or a pointer from `ember_detokenizer_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenizer_free(detokenizer: *mut ember_detokenizer) {
    // SAFETY: the caller's contract (a pointer from this library's constructor, or NULL).
    unsafe { super::free_handle(detokenizer) }
}

/// Runs `step` on a copy of the detokenizer's state and writes the text it returns; the copy
/// replaces the state only when the text fit, so a too-small buffer consumes nothing.
///
/// # Safety
/// `detokenizer` NULL or a live detokenizer; `out` valid for `out_cap` bytes; `n_out` for
/// writing.
unsafe fn detokenizer_emit(
    detokenizer: *mut ember_detokenizer,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
    step: impl FnOnce(&mut StreamDecoder, &crate::tokenizer::Tokenizer) -> Result<String>,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let d = unsafe { detokenizer.as_mut() }
            .ok_or_else(|| Error::InvalidArgument("detokenizer is NULL".into()))?;
        let mut next = d.state.clone();
        let piece = step(&mut next, d.model.tokenizer()?)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_text(&piece, out, out_cap, n_out) }?;
        d.state = next;
        Ok(())
    })
}

/// Adds `token` and writes the text it completes (often "" while a character is incomplete)
/// as `ember_detokenize` writes text. If `out_cap` is too small the token is not consumed:
/// call again with the size written to `*n_out`.
///
/// # Safety
/// `detokenizer` a live detokenizer; `out` valid for `out_cap` bytes; `n_out` for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenizer_push(
    detokenizer: *mut ember_detokenizer,
    token: i32,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe {
        detokenizer_emit(detokenizer, out, out_cap, n_out, |state, tokenizer| {
            let token = u32::try_from(token)
                .map_err(|_| Error::InvalidArgument(format!("token {token} is negative")))?;
            state.push(tokenizer, token)
        })
    }
}

/// Writes the text still held back (an incomplete character at the end, as U+FFFD) and
/// resets the detokenizer. Same buffer rules as `ember_detokenizer_push`.
///
/// # Safety
/// As `ember_detokenizer_push`.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenizer_flush(
    detokenizer: *mut ember_detokenizer,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe {
        detokenizer_emit(detokenizer, out, out_cap, n_out, |state, tokenizer| {
            state.finish(tokenizer)
        })
    }
}

/// Forgets every token fed so far.
///
/// # Safety
/// `detokenizer` NULL or a live detokenizer.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenizer_reset(
    detokenizer: *mut ember_detokenizer,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let d = unsafe { detokenizer.as_mut() }
            .ok_or_else(|| Error::InvalidArgument("detokenizer is NULL".into()))?;
        d.state.reset();
        Ok(())
    })
}
