//! Models: loading, queries, tokenization, chat templates.

use std::ffi::c_char;
use std::sync::Arc;

use super::{borrow, c_text, ember_status, log, read_params, run, run_value, write_params};
use crate::error::Error;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

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
    /// first use (about 30 ms for a 50k vocabulary). Default 1.
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
        let model = Model::load_with(path, &load_options(&params))?;
        // SAFETY: out checked non-NULL above.
        unsafe { publish_model(model, path, start, out) };
        Ok(())
    })
}

fn load_options(params: &ember_model_params) -> crate::LoadOptions {
    crate::LoadOptions {
        load_tokenizer: params.load_tokenizer != 0,
        quantize_q8_0: params.quantize_q8_0 != 0,
    }
}

/// Logs a loaded model and hands it to the caller.
///
/// # Safety
/// `out` must be non-NULL and valid for writing a pointer.
unsafe fn publish_model(
    model: Model,
    what: &str,
    start: std::time::Instant,
    out: *mut *mut ember_model,
) {
    log(
        super::ember_log_level::EMBER_LOG_LEVEL_INFO,
        &format!(
            "loaded {what} ({}, {}) in {:.1} ms",
            model.config().architecture.name(),
            model.weight_dtype(),
            start.elapsed().as_secs_f64() * 1e3
        ),
    );
    let handle = Box::into_raw(Box::new(ember_model {
        model: Arc::new(model),
    }));
    // SAFETY: the caller's contract.
    unsafe { out.write(handle) };
}

/// Loads a model from the `len` bytes of a GGUF file at `data`, used in place: nothing is
/// copied (tensors not aligned for their type aside, so `data` should be 32-byte aligned, as
/// GGUF aligns tensors relative to the file's start). The caller keeps the bytes alive and
/// unchanged until the model and every session over it are freed. `params` as
/// `ember_model_load`.
///
/// # Safety
/// `data` valid for reading `len` bytes for the model's lifetime; `params` NULL or a params
/// struct; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_model_load_from_memory(
    data: *const std::ffi::c_void,
    len: usize,
    params: *const ember_model_params,
    out: *mut *mut ember_model,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract for each pointer.
        let (bytes, params) = unsafe {
            (
                super::slice(data.cast::<u8>(), len, "data")?,
                read_params(params, MODEL_PARAMS_DEFAULT, "params")?,
            )
        };
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let start = std::time::Instant::now();
        // SAFETY: the caller keeps the bytes alive for the model's lifetime (contract above).
        let model =
            unsafe { Model::load_gguf_unowned(bytes, "GGUF in memory", &load_options(&params)) }?;
        // SAFETY: out checked non-NULL above.
        unsafe { publish_model(model, "a GGUF file in memory", start, out) };
        Ok(())
    })
}

/// Loads a GGUF model stored inside a larger file: `len` bytes (0: to the end of the file)
/// from `offset` of the open file descriptor `fd` (an Android APK asset from
/// `AAsset_openFileDescriptor`, an archive entry), memory-mapped. The descriptor is
/// duplicated: the caller may close `fd` when this returns; the file must stay unchanged while
/// the model lives. POSIX systems only (`EMBER_ERR_UNSUPPORTED` elsewhere). `params` as
/// `ember_model_load`.
///
/// # Safety
/// `fd` an open file descriptor the caller owns; `params` NULL or a params struct; `out` valid
/// for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_model_load_fd(
    fd: i32,
    offset: u64,
    len: u64,
    params: *const ember_model_params,
    out: *mut *mut ember_model,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let params = unsafe { read_params(params, MODEL_PARAMS_DEFAULT, "params") }?;
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        if fd < 0 {
            return Err(Error::InvalidArgument(format!(
                "fd {fd} is not a descriptor"
            )));
        }
        let start = std::time::Instant::now();
        #[cfg(unix)]
        {
            use std::os::fd::BorrowedFd;
            // SAFETY: the caller promises fd is open for the duration of this call; it is
            // only duplicated here.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let file = std::fs::File::from(
                borrowed
                    .try_clone_to_owned()
                    .map_err(|e| Error::io(std::path::Path::new(&format!("fd {fd}")), e))?,
            );
            let model = Model::load_gguf_in_file(&file, offset, len, &load_options(&params))?;
            // SAFETY: out checked non-NULL above.
            unsafe { publish_model(model, &format!("fd {fd} at offset {offset}"), start, out) };
            Ok(())
        }
        #[cfg(not(unix))]
        {
            let _ = (offset, len, params, start);
            Err(Error::Unsupported(
                "ember_model_load_fd needs a POSIX system".into(),
            ))
        }
    })
}

/// What `ember_model_probe` says about a model file. Call it through the
/// `EMBER_MODEL_PROBE(path, &info)` macro, which passes `sizeof info`: the library writes the
/// fields that fit in both its and the caller's struct, and their size in `struct_size`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_model_info {
    /// Bytes of this struct the library wrote.
    pub struct_size: u32,
    /// Non-zero when Ember can load and run the file (its tokenizer included).
    pub supported: u32,
    /// Non-zero when the file has a tokenizer Ember can build.
    pub has_tokenizer: u32,
    /// Non-zero when the tokenizer has a chat template.
    pub has_chat_template: u32,
    /// The architecture as the file names it (GGUF `general.architecture`, config.json's
    /// `architectures`), even when unsupported; NUL-terminated, truncated to fit.
    pub architecture: [c_char; 32],
    /// Why the file is not supported ("" when it is); NUL-terminated, truncated to fit.
    pub reason: [c_char; 256],
    /// The context length the model was trained for; 0 when unknown.
    pub n_ctx_train: u64,
    /// Transformer blocks; 0 when unknown.
    pub n_layers: u64,
    /// Vocabulary size; 0 when unknown.
    pub n_vocab: u64,
    /// Number of weights (elements of every tensor).
    pub n_params: u64,
    /// Bytes of the model's files.
    pub file_bytes: u64,
    /// Bytes of weights one generated token reads; 0 when unsupported.
    pub bytes_per_token: u64,
    /// Tensors by type, e.g. "61 F32, 16 Q4_K, 166 Q5_0, 14 Q6_K, 15 Q8_0"; NUL-terminated,
    /// truncated to fit.
    pub tensor_types: [c_char; 192],
}

/// Copies `text` into `dst` NUL-terminated, cut at a character boundary to fit.
fn copy_text<const N: usize>(dst: &mut [c_char; N], text: &str) {
    let mut end = text.len().min(N - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (d, &b) in dst.iter_mut().zip(&text.as_bytes()[..end]) {
        *d = b as c_char;
    }
    dst[end] = 0;
}

/// Describes the model at `path` (a GGUF file or a Hugging Face folder) and whether Ember runs
/// it, without loading it: it reads the metadata, the norm vectors and the tokenizer, never a
/// weight matrix, and keeps nothing mapped. A file Ember cannot use is described (with
/// `supported` 0 and the `reason`) and the call returns `EMBER_OK`; errors are for arguments
/// and unreadable paths. `*out` (of `info_size` bytes, normally `sizeof(ember_model_info)`)
/// is written only on success. Use the `EMBER_MODEL_PROBE(path, &info)` macro.
///
/// # Safety
/// `path` must be a NUL-terminated string; `out` NULL or valid for writing `info_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_model_probe(
    path: *const c_char,
    info_size: usize,
    out: *mut ember_model_info,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let path = unsafe { c_text(path, "path") }?;
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        if info_size < std::mem::size_of::<u32>() {
            return Err(Error::InvalidArgument(format!(
                "info_size {info_size} is too small"
            )));
        }
        let info = Model::probe(path)?;
        let mut c = ember_model_info {
            struct_size: 0,
            supported: info.unsupported.is_none().into(),
            has_tokenizer: info.has_tokenizer.into(),
            has_chat_template: info.has_chat_template.into(),
            architecture: [0; 32],
            reason: [0; 256],
            n_ctx_train: info.n_ctx_train.unwrap_or(0) as u64,
            n_layers: info.n_layers.unwrap_or(0) as u64,
            n_vocab: info.n_vocab.unwrap_or(0) as u64,
            n_params: info.n_params,
            file_bytes: info.file_bytes,
            bytes_per_token: info.bytes_per_token.unwrap_or(0) as u64,
            tensor_types: [0; 192],
        };
        copy_text(&mut c.architecture, &info.architecture);
        copy_text(&mut c.reason, info.unsupported.as_deref().unwrap_or(""));
        let types: Vec<String> = info
            .tensor_types
            .iter()
            .map(|(dtype, n)| format!("{n} {dtype}"))
            .collect();
        copy_text(&mut c.tensor_types, &types.join(", "));
        // SAFETY: `out` holds `info_size` writable bytes (caller's contract).
        unsafe { write_params(info_size, out, c) }
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

/// Width of the model's final hidden state: the length of an embedding
/// (`ember_session_embed`). 0 if `model` is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_n_embd(model: *const ember_model) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || Ok(unsafe { borrow(model, "model") }?.model.n_embd()))
}

/// The longest context the model supports (its trained context). 0 if `model` is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_n_ctx_train(model: *const ember_model) -> usize {
    run_value(0, || {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        Ok(model.model.config().max_position_embeddings)
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
    run_value(-1, || {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        Ok(token_or_minus_one(model.tokenizer()?.bos()))
    })
}

/// End-of-sequence token, or -1.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_eos(model: *const ember_model) -> i32 {
    run_value(-1, || {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        Ok(token_or_minus_one(model.tokenizer()?.eos()))
    })
}

/// End-of-turn token of chat models (e.g. `<|im_end|>`), else the EOS token, or -1.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_token_eot(model: *const ember_model) -> i32 {
    run_value(-1, || {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        Ok(token_or_minus_one(model.tokenizer()?.eot()))
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

/// The architecture's name (GGUF's `general.architecture`: "llama", "qwen2", "qwen3",
/// "gemma2", "gemma3", "phi3", "smollm3", "granite", "gpt2"); a static string, "" if `model`
/// is NULL.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_architecture(model: *const ember_model) -> *const c_char {
    run_value(c"".as_ptr(), || {
        // SAFETY: caller's contract.
        let name = unsafe { borrow(model, "model") }?
            .model
            .config()
            .architecture
            .c_name();
        Ok(name.as_ptr())
    })
}

/// True if the model has a tokenizer with a chat template.
///
/// # Safety
/// `model` must be NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn ember_model_has_chat_template(model: *const ember_model) -> bool {
    run_value(false, || {
        // SAFETY: caller's contract.
        let model = unsafe { borrow(model, "model") }?;
        Ok(model.tokenizer()?.chat_template().is_some())
    })
}
