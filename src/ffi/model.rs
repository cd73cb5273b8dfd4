//! Models: loading, queries, tokenization, chat templates.

use std::ffi::c_char;
use std::sync::Arc;

use super::{
    borrow, c_text, ember_status, log, read_params, run, run_value, slice, text, token_ids,
    write_params, write_text,
};
use crate::error::Error;
use crate::model::Model;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// A loaded model: immutable, shared by any number of sessions on any threads.
pub struct ember_model {
    pub(crate) model: Arc<Model>,
}

impl ember_model {
    pub(crate) fn tokenizer(&self) -> crate::Result<&Tokenizer> {
        self.model.tokenizer()
    }
}

/// Options for `ember_model_load`. Fill with `ember_model_params_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_model_params {
    /// Size of this struct in bytes, as the caller knows it (set by the default function).
    pub struct_size: u32,
    /// Non-zero: the model has its tokenizer (tokenizer.json or GGUF metadata), built on its
    /// first use (a few hundred milliseconds for a 50k vocabulary). Default 1.
    pub load_tokenizer: u32,
    /// Non-zero: quantize F32/F16/BF16 weight matrices to Q8_0 at load, for speed and memory
    /// over exactness (GPT-2's Conv1D matrices stay as they are). Default 0. (ABI 1, added
    /// after `load_tokenizer`: older callers' smaller structs get the default.)
    pub quantize_q8_0: u32,
}

const MODEL_PARAMS_DEFAULT: ember_model_params = ember_model_params {
    struct_size: std::mem::size_of::<ember_model_params>() as u32,
    load_tokenizer: 1,
    quantize_q8_0: 0,
};

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

/// Fills `*params` (a struct of `struct_size` bytes, normally `sizeof(ember_model_params)`)
/// with the defaults. Use the `EMBER_MODEL_PARAMS_DEFAULT(&params)` macro.
///
/// # Safety
/// `params` must be NULL or valid for writing `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_model_params_default(
    struct_size: usize,
    params: *mut ember_model_params,
) -> ember_status {
    // SAFETY: forwarded contract.
    run(|| unsafe { write_params(struct_size, params, MODEL_PARAMS_DEFAULT) })
}

/// Loads a model from `path`: a GGUF file, or a Hugging Face folder (config.json, safetensors,
/// tokenizer.json).
/// Weights are memory-mapped; the files must stay unchanged while the model is loaded.
/// `params` may be NULL for defaults. On success `*out` receives a model to free with
/// `ember_model_free`.
///
/// # Safety
/// `path` must be a NUL-terminated string; `params` NULL or a params struct; `out` valid for
/// writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_model_load(
    path: *const c_char,
    params: *const ember_model_params,
    out: *mut *mut ember_model,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract for each pointer.
        let (path, params) = unsafe {
            (
                c_text(path, "path")?,
                read_params(params, MODEL_PARAMS_DEFAULT, "params")?,
            )
        };
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let start = std::time::Instant::now();
        let options = crate::LoadOptions {
            load_tokenizer: params.load_tokenizer != 0,
            quantize_q8_0: params.quantize_q8_0 != 0,
        };
        let model = Model::load_with(path, &options)?;
        log(
            super::ember_log_level::EMBER_LOG_LEVEL_INFO,
            &format!(
                "loaded {path} ({}, {}) in {:.1} ms",
                model.config().architecture.name(),
                model.weight_dtype(),
                start.elapsed().as_secs_f64() * 1e3
            ),
        );
        let handle = Box::into_raw(Box::new(ember_model {
            model: Arc::new(model),
        }));
        // SAFETY: out checked non-NULL above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Releases a model (NULL is ignored). Sessions made from it keep it alive until they are
/// freed too, so the order of the frees does not matter.
///
/// # Safety
/// `model` must be NULL or a pointer from `ember_model_load`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_model_free(model: *mut ember_model) {
    // SAFETY: the caller's contract (a pointer from ember_model_load, or NULL).
    unsafe { super::free_handle(model) }
}

/// Vocabulary size: the length of a logits vector. 0 if `model` is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_n_vocab(model: *const ember_model) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || Ok(unsafe { borrow(model, "model") }?.model.n_vocab()))
}

/// The longest context the model supports (its trained context). 0 if `model` is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_n_ctx_train(model: *const ember_model) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || {
        Ok(unsafe { borrow(model, "model") }?
            .model
            .config()
            .max_position_embeddings)
    })
}

fn token_or_minus_one(token: Option<u32>) -> i32 {
    token.map_or(-1, |t| t as i32)
}

/// Beginning-of-sequence token, or -1 if the model has none (or no tokenizer).
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_bos(model: *const ember_model) -> i32 {
    // SAFETY: caller's contract.
    run_value(-1, || {
        Ok(token_or_minus_one(
            unsafe { borrow(model, "model") }?.tokenizer()?.bos(),
        ))
    })
}

/// End-of-sequence token, or -1.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_eos(model: *const ember_model) -> i32 {
    // SAFETY: caller's contract.
    run_value(-1, || {
        Ok(token_or_minus_one(
            unsafe { borrow(model, "model") }?.tokenizer()?.eos(),
        ))
    })
}

/// End-of-turn token of chat models (e.g. `<|im_end|>`), else the EOS token, or -1.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_eot(model: *const ember_model) -> i32 {
    // SAFETY: caller's contract.
    run_value(-1, || {
        Ok(token_or_minus_one(
            unsafe { borrow(model, "model") }?.tokenizer()?.eot(),
        ))
    })
}

/// True if `token` ends generation (EOS, EOT, or an end token of generation_config.json).
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_is_end(model: *const ember_model, token: i32) -> bool {
    run_value(false, || {
        // SAFETY: caller's contract.
        let tokenizer = unsafe { borrow(model, "model") }?.tokenizer()?;
        Ok(u32::try_from(token).is_ok_and(|t| tokenizer.stop_tokens().contains(&t)))
    })
}

/// The architecture's name ("llama", "qwen2", "gpt2"); a static string, "" if `model` is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_architecture(model: *const ember_model) -> *const c_char {
    run_value(c"".as_ptr(), || {
        // SAFETY: caller's contract.
        let name = match unsafe { borrow(model, "model") }?
            .model
            .config()
            .architecture
        {
            crate::Architecture::Llama => c"llama",
            crate::Architecture::Qwen2 => c"qwen2",
            crate::Architecture::Gpt2 => c"gpt2",
        };
        Ok(name.as_ptr())
    })
}

/// True if the model has a tokenizer with a chat template.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_has_chat_template(model: *const ember_model) -> bool {
    // SAFETY: caller's contract.
    run_value(false, || {
        Ok(unsafe { borrow(model, "model") }?
            .tokenizer()?
            .chat_template()
            .is_some())
    })
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
        if ids.len() > out_cap {
            // SAFETY: n_out checked non-NULL.
            unsafe { n_out.write(ids.len()) };
            return Err(Error::BufferTooSmall { needed: ids.len() });
        }
        if out.is_null() && !ids.is_empty() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        // SAFETY: out holds out_cap >= ids.len() tokens (caller's contract); n_out non-NULL.
        unsafe {
            for (i, &id) in ids.iter().enumerate() {
                out.add(i).write(id as i32);
            }
            n_out.write(ids.len());
        }
        Ok(())
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
