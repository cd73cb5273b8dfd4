//! Samplers: choosing tokens from logits.

use super::{borrow, ember_status, read_params, run, slice, write_out, write_params, Exclusive};
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

/// Picks a token from `n_vocab` logits into `*out_token`, and remembers it for the penalties.
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

/// Restarts the random sequence from the seed and forgets recent tokens.
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
