//! Samplers: choosing tokens from logits.

use std::ffi::c_char;

use super::{
    borrow, ember_model, ember_status, read_params, run, slice, text, write_out, write_params,
    Exclusive,
};
use crate::constraint::{ConstraintKind, ConstraintState};
use crate::error::Error;
use crate::sampler::{Sampler, SamplerOptions};

/// A token sampler (random state and recent tokens for penalties). Used by one call at a
/// time: a concurrent call (or one from a callback of a generation using the sampler) fails
/// with `EMBER_ERR_BUSY`.
pub struct ember_sampler {
    pub(crate) sampler: Exclusive<Sampler>,
}

/// Options for `ember_sampler_new`. Fill with `ember_sampler_params_default` first; the
/// defaults are greedy decoding without penalties.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_sampler_params {
    /// Size of this struct in bytes, as the caller knows it (set by the default function).
    pub struct_size: u32,
    /// Softmax temperature; 0 = greedy (the most likely token). Default 0.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off. Default 0.
    pub top_k: u32,
    /// Keep the most likely tokens up to this probability mass; 1 = off. Default 1.
    pub top_p: f32,
    /// Drop tokens below this fraction of the best token's probability; 0 = off. Default 0.
    pub min_p: f32,
    /// Repetition penalty on recent tokens (logit / p if positive, * p if negative); 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every recent token; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every recent token; 0 = off.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties consider. Default 64.
    pub penalty_window: u32,
    /// Seed: the same seed gives the same tokens. Default 0x5eed.
    pub seed: u64,
    /// `n_logit_bias` values added to token logits before anything else (a bias of
    /// `-INFINITY` bans a token); copied by `ember_sampler_new`, so the array need only live
    /// during that call. NULL with 0 (the default): none. A token outside the vocabulary makes
    /// `ember_sample` fail with `EMBER_ERR_INVALID_ARGUMENT`.
    pub logit_bias: *const ember_logit_bias,
    /// Number of entries of `logit_bias` (at most 2^20).
    pub n_logit_bias: usize,
}

/// A bias on one token's logit (`ember_sampler_params.logit_bias`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_logit_bias {
    /// The token.
    pub token: i32,
    /// Added to its logit; `-INFINITY` bans it.
    pub bias: f32,
}

fn defaults() -> ember_sampler_params {
    let o = SamplerOptions::default();
    ember_sampler_params {
        struct_size: std::mem::size_of::<ember_sampler_params>() as u32,
        temperature: o.temperature,
        top_k: o.top_k as u32,
        top_p: o.top_p,
        min_p: o.min_p,
        repetition_penalty: o.repetition_penalty,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        penalty_window: o.penalty_window as u32,
        seed: o.seed,
        logit_bias: std::ptr::null(),
        n_logit_bias: 0,
    }
}

/// Fills `*params` (a struct of `struct_size` bytes) with the defaults. Use the
/// `EMBER_SAMPLER_PARAMS_DEFAULT(&params)` macro.
///
/// # Safety
/// `params` must be NULL or valid for writing `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_params_default(
    struct_size: usize,
    params: *mut ember_sampler_params,
) -> ember_status {
    // SAFETY: forwarded contract.
    run(|| unsafe { write_params(struct_size, params, defaults()) })
}

/// Creates a sampler; `params` may be NULL for greedy decoding. Out-of-range options are
/// `EMBER_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `params` NULL or a params struct; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_new(
    params: *const ember_sampler_params,
    out: *mut *mut ember_sampler,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let p = unsafe { read_params(params, defaults(), "params") }?;
        if p.n_logit_bias > crate::sampler::MAX_LOGIT_BIAS {
            return Err(Error::InvalidArgument(format!(
                "params.n_logit_bias {} is above 2^20",
                p.n_logit_bias
            )));
        }
        // SAFETY: the caller's contract: logit_bias holds n_logit_bias entries.
        let biases = unsafe { slice(p.logit_bias, p.n_logit_bias, "params.logit_bias") }?;
        let logit_bias = biases
            .iter()
            .map(|b| {
                u32::try_from(b.token).map(|t| (t, b.bias)).map_err(|_| {
                    Error::InvalidArgument(format!("logit bias for negative token {}", b.token))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sampler = Sampler::new(SamplerOptions {
            logit_bias,
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            penalty_window: p.penalty_window as usize,
            seed: p.seed,
        })?;
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let handle = Box::into_raw(Box::new(ember_sampler {
            sampler: Exclusive::new(sampler, "sampler"),
        }));
        // SAFETY: out checked non-NULL.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a sampler (NULL is ignored). A sampler a background generation still holds
/// (`ember_generation_finish` not called) is not freed (a warning is logged).
///
/// # Safety
/// `sampler` must be NULL or a pointer from `ember_sampler_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_free(sampler: *mut ember_sampler) {
    // SAFETY: the caller's contract (a pointer from this library's constructor, or NULL).
    unsafe { super::free_unless_in_use(sampler, |s| &s.sampler) }
}

/// Picks a token from `n_vocab` logits into `*out_token`, and remembers it for the penalties
/// (with a constraint: only among the tokens it allows, and feeds the token to it).
///
/// # Safety
/// `logits` valid for `n_vocab` floats; `out_token` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_sample(
    sampler: *mut ember_sampler,
    logits: *const f32,
    n_vocab: usize,
    out_token: *mut i32,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (sampler, logits) = unsafe {
            (
                borrow(sampler, "sampler")?,
                slice(logits, n_vocab, "logits")?,
            )
        };
        if out_token.is_null() {
            return Err(Error::InvalidArgument("out_token is NULL".into()));
        }
        if n_vocab > i32::MAX as usize {
            return Err(Error::InvalidArgument("n_vocab is too large".into()));
        }
        let token = sampler.sampler.with(|s| s.sample(logits))?;
        // SAFETY: out_token checked non-NULL.
        unsafe { write_out(out_token, token as i32, "out_token") }
    })
}

/// Remembers `token` for the penalties (e.g. the prompt's tokens).
///
/// # Safety
/// `sampler` must be NULL or a live sampler.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_accept(
    sampler: *mut ember_sampler,
    token: i32,
) -> ember_status {
    run(|| {
        let token = u32::try_from(token)
            .map_err(|_| Error::InvalidArgument(format!("token {token} is negative")))?;
        // SAFETY: caller's contract.
        unsafe { borrow(sampler, "sampler") }?.sampler.with(|s| {
            s.accept(token);
            Ok(())
        })
    })
}

/// Restarts the random sequence from the seed, forgets recent tokens, and starts the
/// constraint's output over.
///
/// # Safety
/// `sampler` must be NULL or a live sampler.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_reset(sampler: *mut ember_sampler) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        unsafe { borrow(sampler, "sampler") }?.sampler.with(|s| {
            s.reset();
            Ok(())
        })
    })
}

/// What `ember_sampler_set_constraint`'s text is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_constraint_kind {
    /// No constraint: removes the sampler's (the text is not read).
    EMBER_CONSTRAINT_NONE = 0,
    /// A JSON schema, as JSON text: the output is one JSON value valid against it.
    EMBER_CONSTRAINT_JSON_SCHEMA = 1,
    /// A regular expression (Rust `regex` syntax) that the whole output matches.
    EMBER_CONSTRAINT_REGEX = 2,
    /// A context-free grammar in Lark syntax, as llguidance defines it (rule `start`).
    EMBER_CONSTRAINT_LARK = 3,
    /// A grammar in llama.cpp's GBNF (rule `root`), converted to Lark.
    EMBER_CONSTRAINT_GBNF = 4,
}

/// Where a sampler's constraint stands (`ember_sampler_constraint_state`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_constraint_state {
    /// The sampler has no constraint.
    EMBER_CONSTRAINT_STATE_NONE = 0,
    /// The tokens drawn so far start a valid output, which is not complete yet.
    EMBER_CONSTRAINT_STATE_INCOMPLETE = 1,
    /// The output is valid as it is (the grammar may allow more).
    EMBER_CONSTRAINT_STATE_COMPLETE = 2,
    /// The output is valid and nothing may follow it but an end token.
    EMBER_CONSTRAINT_STATE_FINISHED = 3,
}

/// Constrains the tokens `sampler` draws to those that keep the output valid for `kind`'s
/// `text_len` bytes of UTF-8 at `text` (a JSON schema, a regular expression or a Lark
/// grammar) over `model`'s vocabulary; `EMBER_CONSTRAINT_NONE` removes the constraint (`model`
/// and `text` are then not read). Every `ember_sample` then draws only among the allowed
/// tokens and feeds the token to the constraint; `ember_generate`, `ember_chat` and
/// `ember_generation_start` start its output over for each new prompt and end with
/// `EMBER_STOP_REASON_CONSTRAINT_COMPLETE` (or `_INCOMPLETE` when `max_tokens` or the
/// context runs out first). Use the sampler with sessions of `model` only.
///
/// An invalid schema, expression or grammar, or one over llguidance's limits (text up to
/// 1 MiB, grammar size, lexer states, per-step work: a hostile grammar cannot hang the
/// host) is `EMBER_ERR_INVALID_ARGUMENT` with llguidance's message; the sampler keeps its
/// previous constraint. The first constraint of a model builds its vocabulary's token trie
/// (tens of milliseconds). The text is read during the call only.
///
/// # Safety
/// `sampler` a live sampler; `model` a live model; `text` valid for `text_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_set_constraint(
    sampler: *mut ember_sampler,
    model: *const ember_model,
    kind: u32,
    text_ptr: *const c_char,
    text_len: usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let sampler = unsafe { borrow(sampler, "sampler") }?;
        let kind = match kind {
            k if k == ember_constraint_kind::EMBER_CONSTRAINT_NONE as u32 => None,
            k if k == ember_constraint_kind::EMBER_CONSTRAINT_JSON_SCHEMA as u32 => {
                Some(ConstraintKind::JsonSchema)
            }
            k if k == ember_constraint_kind::EMBER_CONSTRAINT_REGEX as u32 => {
                Some(ConstraintKind::Regex)
            }
            k if k == ember_constraint_kind::EMBER_CONSTRAINT_LARK as u32 => {
                Some(ConstraintKind::Lark)
            }
            k if k == ember_constraint_kind::EMBER_CONSTRAINT_GBNF as u32 => {
                Some(ConstraintKind::Gbnf)
            }
            k => {
                return Err(Error::InvalidArgument(format!(
                    "constraint kind {k} (must be an ember_constraint_kind)"
                )))
            }
        };
        let constraint = match kind {
            None => None,
            Some(kind) => {
                // SAFETY: caller's contract.
                let (model, text) =
                    unsafe { (borrow(model, "model")?, text(text_ptr, text_len, "text")?) };
                Some(model.model.constraint(kind, text)?)
            }
        };
        sampler.sampler.with(|s| {
            s.set_constraint(constraint);
            Ok(())
        })
    })
}

/// Writes where `sampler`'s constraint stands to `*state` (`EMBER_CONSTRAINT_STATE_NONE`
/// without one): a host drawing tokens itself with `ember_sample` stops at `_FINISHED` and
/// may stop at `_COMPLETE`.
///
/// # Safety
/// `sampler` a live sampler; `state` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_sampler_constraint_state(
    sampler: *mut ember_sampler,
    state: *mut ember_constraint_state,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let sampler = unsafe { borrow(sampler, "sampler") }?;
        if state.is_null() {
            return Err(Error::InvalidArgument("state is NULL".into()));
        }
        let now = sampler.sampler.with(|s| s.constraint_state())?;
        let value = match now {
            None => ember_constraint_state::EMBER_CONSTRAINT_STATE_NONE,
            Some(ConstraintState::Incomplete) => {
                ember_constraint_state::EMBER_CONSTRAINT_STATE_INCOMPLETE
            }
            Some(ConstraintState::Complete) => {
                ember_constraint_state::EMBER_CONSTRAINT_STATE_COMPLETE
            }
            Some(ConstraintState::Finished) => {
                ember_constraint_state::EMBER_CONSTRAINT_STATE_FINISHED
            }
        };
        // SAFETY: checked non-NULL; valid by the caller's contract.
        unsafe { write_out(state, value, "state") }
    })
}
