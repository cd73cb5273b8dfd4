//! Text in and out: tokenizing, detokenizing (at once or token by token), chat templates.

use std::ffi::c_char;
use std::sync::Arc;

use super::{
    borrow, c_text, ember_model, ember_status, run, slice, text, token_ids, write_text,
    write_tokens, Exclusive,
};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::{ChatMessage, StreamDecoder};

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
