//! Text in and out: tokenizing, detokenizing (at once or token by token), chat templates.

use std::ffi::c_char;
use std::sync::Arc;

use super::{
    borrow, c_text, ember_model, ember_status, run, slice, text, token_ids, write_text,
    write_tokens, Exclusive,
};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::{ChatMessage, Conversation, StreamDecoder};

/// A message of a conversation for chat templates: NUL-terminated UTF-8 strings, borrowed
/// for the duration of the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_chat_message {
    /// "system", "user", "assistant", ...
    pub role: *const c_char,
    /// The message text.
    pub content: *const c_char,
}

/// Tokenizes `text_len` bytes of UTF-8 at `text` into `out[0..out_cap]`.
///
/// - `add_special`: add BOS/EOS as the model's tokenizer does.
/// - `parse_special`: recognise special tokens written in the text (e.g. `<|im_start|>`);
///   false treats them as plain text, so user input cannot inject control tokens.
///
/// On success `*n_out` is the number of tokens. If `out_cap` is too small, nothing is written
/// to `out`, `*n_out` is the number needed and the status is `EMBER_ERR_BUFFER_TOO_SMALL`
/// (call with `out_cap` 0 to size the buffer).
///
/// # Safety
/// `text` valid for `text_len` bytes; `out` valid for `out_cap` tokens (or NULL with
/// `out_cap` 0); `n_out` valid for writing.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_tokenize(
    model: *const ember_model,
    text_ptr: *const c_char,
    text_len: usize,
    add_special: bool,
    parse_special: bool,
    out: *mut i32,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract for model and text.
        let (model, input) =
            unsafe { (borrow(model, "model")?, text(text_ptr, text_len, "text")?) };
        if n_out.is_null() {
            return Err(Error::InvalidArgument("n_out is NULL".into()));
        }
        let ids = model
            .tokenizer()?
            .encode(input, add_special, parse_special)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_tokens(&ids, out, out_cap, n_out) }
    })
}

/// Turns `n_tokens` tokens into UTF-8 text, written NUL-terminated to `out[0..out_cap]`;
/// `*n_out` is the text's length in bytes (without the NUL). If `out_cap` is too small,
/// nothing is written to `out`, `*n_out` is the capacity needed (length + 1) and the status is
/// `EMBER_ERR_BUFFER_TOO_SMALL`. Tokens outside the vocabulary are `EMBER_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `tokens` valid for `n_tokens` tokens; `out` for `out_cap` bytes; `n_out` for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_detokenize(
    model: *const ember_model,
    tokens: *const i32,
    n_tokens: usize,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, tokens) =
            unsafe { (borrow(model, "model")?, slice(tokens, n_tokens, "tokens")?) };
        let text = model.tokenizer()?.decode(&token_ids(tokens)?)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_text(&text, out, out_cap, n_out) }
    })
}

/// Applies the model's chat template to `n_messages` messages (with the assistant's turn
/// opened when `add_generation_prompt`), writing the prompt text as `ember_detokenize` writes
/// text. Fails with `EMBER_ERR_INVALID_ARGUMENT` if the model has no chat template or the
/// template rejects the conversation.
///
/// # Safety
/// `messages` valid for `n_messages` entries whose strings are NUL-terminated; `out` for
/// `out_cap` bytes; `n_out` for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_chat_apply(
    model: *const ember_model,
    messages: *const ember_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, messages) = unsafe {
            (
                borrow(model, "model")?,
                chat_messages(messages, n_messages)?,
            )
        };
        let text = model
            .tokenizer()?
            .apply_chat_template(&messages, add_generation_prompt)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_text(&text, out, out_cap, n_out) }
    })
}

/// Applies a chat template to a conversation given as JSON (`conversation_len` bytes of
/// UTF-8), as transformers' `apply_chat_template(messages, tools=..., chat_template=...,
/// **variables)` renders it: an object with `messages` (each an object with a `role`, its
/// `content` as text or typed parts, and what templates read besides: `tool_calls` as
/// `[{"type": "function", "function": {"name": ..., "arguments": {...}}}]`, `name`,
/// `reasoning_content`; tool results as messages of role `tool`), optionally `tools` (a
/// list of `{"type": "function", "function": {"name", "description", "parameters"}}`),
/// `chat_template` (Jinja source used instead of the model's: it decides which text becomes
/// control tokens, so never forward a `chat_template` that came from a player or a client),
/// `tool_choice` and
/// `parallel_tool_calls` (read by `ember_chat_json`), and any other key as a template variable (`enable_thinking`, ...).
/// Writes the prompt text as `ember_detokenize` writes text. Fails with
/// `EMBER_ERR_INVALID_ARGUMENT` for JSON that is not such a conversation, a model without a
/// template, tools given to a template that does not read them, or a template that rejects
/// the conversation.
///
/// # Safety
/// `conversation` valid for `conversation_len` bytes; `out` for `out_cap` bytes; `n_out`
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_chat_apply_json(
    model: *const ember_model,
    conversation: *const c_char,
    conversation_len: usize,
    add_generation_prompt: bool,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, conversation) = unsafe {
            (
                borrow(model, "model")?,
                conversation_json(conversation, conversation_len)?,
            )
        };
        let text = model
            .tokenizer()?
            .render_conversation(&conversation, add_generation_prompt)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_text(&text, out, out_cap, n_out) }
    })
}

/// Parses an assistant's reply (`text_len` bytes of UTF-8) to a conversation into the
/// message to append to it, written as JSON like `ember_detokenize` writes text:
/// `{"role": "assistant", "content": TEXT}`, with `"reasoning_content"` when the reply
/// opened with a `<think>` block and `"tool_calls": [{"type": "function", "function":
/// {"name": ..., "arguments": {...}}}, ...]` when it called tools in the format of the
/// conversation's template (the model's, or the conversation's `chat_template`).
/// `conversation` (JSON as `ember_chat_apply_json` takes it) may be NULL for the model's
/// template. With `tool_choice` `"none"` the reply holds no calls; a Llama-style JSON object
/// is a call only when it names one of the `tools`. A tool call that is not valid JSON with a
/// name is `EMBER_ERR_INVALID_ARGUMENT` naming it: a reply that ended with
/// `EMBER_STOP_REASON_CONSTRAINT_COMPLETE` always parses, one cut off inside a call (by
/// `max_tokens` or the context) does not. A reply cut off inside its `<think>` block is all
/// `reasoning_content`.
///
/// # Safety
/// `conversation` NULL or valid for `conversation_len` bytes; `text` for `text_len` bytes;
/// `out` for `out_cap` bytes; `n_out` for writing.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_chat_parse_reply(
    model: *const ember_model,
    conversation: *const c_char,
    conversation_len: usize,
    text: *const c_char,
    text_len: usize,
    out: *mut c_char,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, reply) =
            unsafe { (borrow(model, "model")?, self::text(text, text_len, "text")?) };
        let conversation = if conversation.is_null() {
            Conversation::default()
        } else {
            // SAFETY: caller's contract.
            unsafe { conversation_json(conversation, conversation_len) }?
        };
        let message = model.tokenizer()?.parse_reply(&conversation, reply)?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { write_text(&message.to_string(), out, out_cap, n_out) }
    })
}

/// Reads a conversation given as JSON text.
///
/// # Safety
/// `ptr` valid for `len` bytes.
pub(crate) unsafe fn conversation_json(ptr: *const c_char, len: usize) -> Result<Conversation> {
    // SAFETY: forwarded contract.
    Conversation::from_json(unsafe { text(ptr, len, "conversation") }?)
}

/// Copies C chat messages into Rust ones, checking every string.
///
/// # Safety
/// `messages` must be valid for `n` entries with NUL-terminated strings.
pub(crate) unsafe fn chat_messages(
    messages: *const ember_chat_message,
    n: usize,
) -> crate::Result<Vec<ChatMessage>> {
    // SAFETY: forwarded contract.
    let list = unsafe { slice(messages, n, "messages") }?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            // SAFETY: forwarded contract: each string is NUL-terminated.
            let (role, content) = unsafe {
                (
                    c_text(m.role, &format!("messages[{i}].role"))?,
                    c_text(m.content, &format!("messages[{i}].content"))?,
                )
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// An incremental detokenizer: feed tokens one by one, get only complete UTF-8 text. Used by
/// one call at a time (a concurrent call fails with `EMBER_ERR_BUSY`).
pub struct ember_detokenizer {
    model: Arc<Model>,
    state: Exclusive<StreamDecoder>,
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
            state: Exclusive::new(StreamDecoder::new(), "detokenizer"),
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
        let d = unsafe { borrow(detokenizer, "detokenizer") }?;
        let tokenizer = d.model.tokenizer()?;
        d.state.with(|state| {
            let mut next = state.clone();
            let piece = step(&mut next, tokenizer)?;
            // SAFETY: caller's contract for out and n_out.
            unsafe { write_text(&piece, out, out_cap, n_out) }?;
            *state = next;
            Ok(())
        })
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
        unsafe { borrow(detokenizer, "detokenizer") }?
            .state
            .with(|state| {
                state.reset();
                Ok(())
            })
    })
}
