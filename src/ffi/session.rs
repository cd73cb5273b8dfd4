//! Sessions: stepping tokens through the model, rewinding, cancelling.

use std::sync::Arc;

use super::{
    borrow, ember_model, ember_status, read_params, run, run_value, slice, token_ids, write_out,
    write_params, Exclusive,
};
use crate::error::{Error, Result};
use crate::model::{AttentionSelection, KvType, Pooling};
use crate::session::{CancelHandle, Session, SessionOptions, SessionShared};
use crate::threading::ThreadPool;

/// One sequence's state (KV cache, position) over a model. A session is used by one call at
/// a time: a call made while another is running on the same session (from another thread,
/// or from a callback of the running call) fails with `EMBER_ERR_BUSY`. The functions that
/// take a `const ember_session *` (position, context length, cancel) may be called from any
/// thread at any time.
pub struct ember_session {
    pub(crate) session: Exclusive<Session>,
    pub(crate) shared: Arc<SessionShared>,
    pub(crate) cancel: CancelHandle,
}

/// Runs `body` on the session with exclusive access; a panic inside poisons the session.
///
/// # Safety
/// `session` must be NULL or a live session.
pub(crate) unsafe fn with_session<T>(
    session: *mut ember_session,
    body: impl FnOnce(&mut Session) -> Result<T>,
) -> Result<T> {
    // SAFETY: caller's contract.
    unsafe { borrow(session, "session") }?.session.with(body)
}

/// Options for `ember_session_new`. Fill with `ember_session_params_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_session_params {
    /// Size of this struct in bytes, as the caller knows it (set by the default function).
    pub struct_size: u32,
    /// Context length in tokens; 0 = the model's trained context, capped at 2048 (the KV cache
    /// is allocated up front). Default 0.
    pub n_ctx: u32,
    /// Threads each step may use, the calling thread included; 1 = the calling thread only.
    /// 0 = half the machine's hardware threads (at least 1), so a host keeps cores for
    /// itself. A count above the machine's hardware threads is clamped to them. Default 0.
    pub n_threads: u32,
    /// Prompt tokens processed per batch. Default 64.
    pub n_ubatch: u32,
    /// A thread pool shared with other sessions (`ember_pool_new`), or NULL (the default)
    /// for a pool of the session's own with `n_threads` threads. With a pool, `n_threads` is
    /// ignored: the session computes on the pool's threads, taking turns with the other
    /// sessions using it (one step at a time; generations running at once step together,
    /// `ember_pool_combined_steps`), so eight NPCs need one pool, not eight. The
    /// session keeps the pool alive; the pool is read only during the call that made the
    /// session.
    pub pool: *const ember_pool,
    /// Element type of the KV cache, an `ember_kv_type`: `EMBER_KV_F32` (the default: keys
    /// and values exactly as computed) or `EMBER_KV_F16` (half the memory, rounded to
    /// nearest: on SmolLM2-135M with f32 weights logits move by 0.0015 on average, perplexity
    /// by 0.002%). A session's saved states, forks and copied prefixes keep its cache type.
    /// `ember_session_memory_estimate` gives the bytes of each.
    pub kv_type: u32,
}

/// Element types of a KV cache, for `ember_session_params.kv_type` (a `uint32_t` there, so
/// that any value a caller writes is defined; unknown ones are `EMBER_ERR_INVALID_ARGUMENT`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_kv_type {
    /// Keys and values stored as f32 (4 bytes per number).
    EMBER_KV_F32 = 0,
    /// Keys and values stored as f16 (2 bytes per number).
    EMBER_KV_F16 = 1,
}

/// The cache type a params' `kv_type` code names.
fn kv_type(code: u32) -> Result<KvType> {
    match code {
        c if c == ember_kv_type::EMBER_KV_F32 as u32 => Ok(KvType::F32),
        c if c == ember_kv_type::EMBER_KV_F16 as u32 => Ok(KvType::F16),
        _ => Err(Error::InvalidArgument(format!(
            "kv_type {code} (must be EMBER_KV_F32 or EMBER_KV_F16)"
        ))),
    }
}

const SESSION_PARAMS_DEFAULT: ember_session_params = ember_session_params {
    struct_size: std::mem::size_of::<ember_session_params>() as u32,
    n_ctx: 0,
    n_threads: 0,
    n_ubatch: crate::defaults::UBATCH as u32,
    pool: std::ptr::null(),
    kv_type: ember_kv_type::EMBER_KV_F32 as u32,
};

/// A pool of worker threads that several sessions share (`ember_session_params.pool`). Its
/// threads sleep when idle and are joined when the pool and every session using it have
/// been freed.
pub struct ember_pool {
    pool: Arc<ThreadPool>,
}

/// Options for `ember_pool_new`. Fill with `ember_pool_params_default` first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_pool_params {
    /// Size of this struct in bytes, as the caller knows it (set by the default function).
    pub struct_size: u32,
    /// Threads each step may use, the calling thread included, as in
    /// `ember_session_params.n_threads` (0 = half the machine's hardware threads). Default 0.
    pub n_threads: u32,
}

const POOL_PARAMS_DEFAULT: ember_pool_params = ember_pool_params {
    struct_size: std::mem::size_of::<ember_pool_params>() as u32,
    n_threads: 0,
};

/// Fills `*params` (a struct of `struct_size` bytes) with the defaults. Use the
/// `EMBER_POOL_PARAMS_DEFAULT(&params)` macro.
///
/// # Safety
/// `params` must be NULL or valid for writing `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_pool_params_default(
    struct_size: usize,
    params: *mut ember_pool_params,
) -> ember_status {
    // SAFETY: forwarded contract.
    run(|| unsafe { write_params(struct_size, params, POOL_PARAMS_DEFAULT) })
}

/// Creates a thread pool for sessions to share (`params` NULL: defaults). Its threads start
/// here and sleep until a session steps.
///
/// # Safety
/// `params` NULL or a params struct; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_pool_new(
    params: *const ember_pool_params,
    out: *mut *mut ember_pool,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let params = unsafe { read_params(params, POOL_PARAMS_DEFAULT, "params") }?;
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let threads = crate::defaults::threads(params.n_threads as usize);
        let pool = Arc::new(ThreadPool::new(threads)?);
        // SAFETY: out checked non-NULL.
        unsafe { out.write(Box::into_raw(Box::new(ember_pool { pool }))) };
        Ok(())
    })
}

/// The number of threads the pool's steps use (0 if `pool` is NULL).
///
/// # Safety
/// `pool` must be NULL or a live pool.
#[no_mangle]
pub unsafe extern "C" fn ember_pool_n_threads(pool: *const ember_pool) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || Ok(unsafe { borrow(pool, "pool") }?.pool.n_threads()))
}

/// Writes the forward passes the generations on `pool` have run to `*passes` and the
/// generation steps (one session's next token each) they computed to `*steps`: generations
/// running at once on one pool (`ember_generation_start`, or `ember_generate` from several
/// threads) step together, `steps / passes` sessions per pass. Outputs are written only on
/// success.
///
/// # Safety
/// `pool` a live pool; `passes` and `steps` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_pool_combined_steps(
    pool: *const ember_pool,
    passes: *mut u64,
    steps: *mut u64,
) -> ember_status {
    run(|| {
        if passes.is_null() || steps.is_null() {
            return Err(Error::InvalidArgument("passes or steps is NULL".into()));
        }
        // SAFETY: caller's contract.
        let counts = unsafe { borrow(pool, "pool") }?.pool.combined_steps();
        // SAFETY: checked non-NULL; the caller's contract.
        unsafe {
            passes.write(counts.passes);
            steps.write(counts.steps);
        }
        Ok(())
    })
}

/// Frees a pool (NULL is ignored). Sessions made with it keep working: its threads are
/// joined when the last of them is freed too (here, if none is left).
///
/// # Safety
/// `pool` must be NULL or a pointer from `ember_pool_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_pool_free(pool: *mut ember_pool) {
    // SAFETY: the caller's contract (a pointer from this library's constructor, or NULL).
    unsafe { super::free_handle(pool) }
}

/// The pool a session's params name, if any.
///
/// # Safety
/// `params.pool` NULL or a live pool.
unsafe fn params_pool(params: &ember_session_params) -> Option<Arc<ThreadPool>> {
    // SAFETY: caller's contract.
    unsafe { params.pool.as_ref() }.map(|p| p.pool.clone())
}

/// A session over `model` with `params`, on the params' pool or a pool of its own.
///
/// # Safety
/// `params.pool` NULL or a live pool.
unsafe fn new_session(model: Arc<crate::Model>, params: &ember_session_params) -> Result<Session> {
    let options = session_options(params)?;
    // SAFETY: forwarded contract.
    match unsafe { params_pool(params) } {
        Some(pool) => Session::with_pool(model, pool, &options),
        None => Session::new(model, &options),
    }
}

/// Fills `*params` (a struct of `struct_size` bytes) with the defaults. Use the
/// `EMBER_SESSION_PARAMS_DEFAULT(&params)` macro.
///
/// # Safety
/// `params` must be NULL or valid for writing `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_session_params_default(
    struct_size: usize,
    params: *mut ember_session_params,
) -> ember_status {
    // SAFETY: forwarded contract.
    run(|| unsafe { write_params(struct_size, params, SESSION_PARAMS_DEFAULT) })
}

/// Creates a session over `model` (which it keeps alive). `params` may be NULL for defaults.
/// The KV cache is allocated here (`EMBER_ERR_OUT_OF_MEMORY` if it does not fit).
///
/// # Safety
/// `model` a live model; `params` NULL or a params struct; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_session_new(
    model: *const ember_model,
    params: *const ember_session_params,
    out: *mut *mut ember_session,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, params) = unsafe {
            (
                borrow(model, "model")?,
                read_params(params, SESSION_PARAMS_DEFAULT, "params")?,
            )
        };
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        // SAFETY: the caller's contract for params.pool.
        let session = unsafe { new_session(model.model.clone(), &params) }?;
        // SAFETY: out checked non-NULL.
        unsafe { out.write(session_handle(session)) };
        Ok(())
    })
}

fn session_options(params: &ember_session_params) -> Result<SessionOptions> {
    Ok(SessionOptions {
        n_ctx: params.n_ctx as usize,
        n_threads: crate::defaults::threads(params.n_threads as usize),
        ubatch: params.n_ubatch as usize,
        kv_type: kv_type(params.kv_type)?,
    })
}

/// A C handle owning `session`.
fn session_handle(session: Session) -> *mut ember_session {
    Box::into_raw(Box::new(ember_session {
        cancel: session.cancel_handle(),
        shared: session.shared().clone(),
        session: Exclusive::new(session, "session"),
    }))
}

/// Writes to `*bytes` the memory a session of `model` with `params` (NULL: defaults) would
/// allocate: its KV cache, the buffers of one micro-batch and its token history, not counting
/// the model's weights; computed without allocating. Invalid params fail as in
/// `ember_session_new`.
///
/// # Safety
/// `model` a live model; `params` NULL or a params struct; `bytes` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_memory_estimate(
    model: *const ember_model,
    params: *const ember_session_params,
    bytes: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let (model, params) = unsafe {
            (
                borrow(model, "model")?,
                read_params(params, SESSION_PARAMS_DEFAULT, "params")?,
            )
        };
        let mut options = session_options(&params)?;
        // SAFETY: the caller's contract for params.pool.
        if let Some(pool) = unsafe { params_pool(&params) } {
            options.n_threads = pool.n_threads();
        }
        let estimate = Session::memory_estimate(&model.model, &options)?;
        // SAFETY: caller's contract.
        unsafe { write_out(bytes, estimate, "bytes") }
    })
}

/// Creates a session holding `src`'s tokens and KV cache, without recomputing them: one
/// shared prompt (an NPC's system prompt), many continuations. `params` as in
/// `ember_session_new` (its context must hold `src`'s tokens: `EMBER_ERR_CONTEXT_FULL`), or
/// NULL: `src`'s context length and batch size, on `src`'s thread pool (no new threads; the
/// two take turns, as sessions on one `ember_pool` do). `src` is only read, and must not be in use by
/// another thread (`EMBER_ERR_BUSY`).
///
/// # Safety
/// `src` a live session; `params` NULL or a params struct; `out` valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_session_fork(
    src: *mut ember_session,
    params: *const ember_session_params,
    out: *mut *mut ember_session,
) -> ember_status {
    run(|| {
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        // SAFETY: caller's contract.
        let fork = unsafe {
            with_session(src, |s| {
                if params.is_null() {
                    let mut fork =
                        Session::with_pool(s.model().clone(), s.pool().clone(), &s.options())?;
                    fork.copy_prefix(s, s.position())?;
                    return Ok(fork);
                }
                let params = read_params(params, SESSION_PARAMS_DEFAULT, "params")?;
                let mut fork = new_session(s.model().clone(), &params)?;
                fork.copy_prefix(s, s.position())?;
                Ok(fork)
            })
        }?;
        // SAFETY: out checked non-NULL.
        unsafe { out.write(session_handle(fork)) };
        Ok(())
    })
}

/// Replaces what `dst` holds by the first `n_tokens` tokens of `src` (a session of the same
/// model, not `dst`) and their KV rows, without recomputing them. On error `dst` is unchanged.
///
/// # Safety
/// `dst` and `src` live sessions.
#[no_mangle]
pub unsafe extern "C" fn ember_session_copy_prefix(
    dst: *mut ember_session,
    src: *mut ember_session,
    n_tokens: usize,
) -> ember_status {
    run(|| {
        if std::ptr::eq(dst, src) {
            return Err(Error::InvalidArgument(
                "dst and src are the same session".into(),
            ));
        }
        // SAFETY: caller's contract; the two sessions are distinct (checked above), so the
        // two exclusive borrows cannot alias.
        unsafe { with_session(src, |s| with_session(dst, |d| d.copy_prefix(s, n_tokens))) }
    })
}

/// Writes to `*bytes` the size of the session's saved state (`ember_session_state_save`) as
/// the session is now: a header, its tokens, the last logits and the KV rows of the tokens it
/// holds (not of the whole context).
///
/// # Safety
/// `session` a live session; `bytes` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_state_size(
    session: *mut ember_session,
    bytes: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let size = unsafe { with_session(session, |s| Ok(s.state_size())) }?;
        // SAFETY: caller's contract.
        unsafe { write_out(bytes, size, "bytes") }
    })
}

/// Saves what the session holds (tokens, KV rows, last logits, the model's fingerprint; a
/// versioned little-endian format with a checksum) into `buf[0..cap]`, writing its length to
/// `*n_out`. If `cap` is too small nothing is written to `buf`, `*n_out` is the size needed
/// and the status is `EMBER_ERR_BUFFER_TOO_SMALL`. The bytes can be stored in a save file and
/// loaded into any session of the same model.
///
/// # Safety
/// `session` a live session; `buf` valid for writing `cap` bytes; `n_out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_state_save(
    session: *mut ember_session,
    buf: *mut u8,
    cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        if n_out.is_null() {
            return Err(Error::InvalidArgument("n_out is NULL".into()));
        }
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let needed = s.state_size();
                if cap < needed {
                    // SAFETY: n_out checked non-NULL.
                    n_out.write(needed);
                    return Err(Error::BufferTooSmall { needed });
                }
                if buf.is_null() {
                    return Err(Error::InvalidArgument("buf is NULL".into()));
                }
                // SAFETY: buf holds cap >= needed writable bytes (caller's contract).
                let out = std::slice::from_raw_parts_mut(buf, needed);
                let n = s.save_state(out)?;
                n_out.write(n);
                Ok(())
            })
        }
    })
}

/// Replaces what the session holds by a state saved with `ember_session_state_save` from the
/// same model (any thread count or context length that holds its tokens). Every check comes
/// first: bytes from another model (`EMBER_ERR_INVALID_ARGUMENT`), too many tokens for the
/// context (`EMBER_ERR_CONTEXT_FULL`), truncated or corrupted bytes (`EMBER_ERR_BAD_FORMAT`),
/// or a newer format (`EMBER_ERR_UNSUPPORTED`) leave the session exactly as it was. Continuing
/// after a load gives the same logits, bit for bit, as continuing the saved session.
///
/// # Safety
/// `session` a live session; `buf` valid for reading `len` bytes during the call.
#[no_mangle]
pub unsafe extern "C" fn ember_session_state_load(
    session: *mut ember_session,
    buf: *const u8,
    len: usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let bytes = unsafe { slice(buf, len, "buf") }?;
        // SAFETY: caller's contract.
        unsafe { with_session(session, |s| s.load_state(bytes)) }
    })
}

/// Copies the logits of the last token the session holds into `logits[0..cap]`
/// (`ember_model_n_vocab` floats): for sampling the first token after
/// `ember_session_fork`, `ember_session_copy_prefix` or `ember_session_state_load`, or
/// again after a step. Fails with `EMBER_ERR_INVALID_ARGUMENT` when they are not at hand (no
/// token computed yet, the last token pending, the session rewound, or `ember_step_all`
/// last): step to get them. A too-small `cap` is `EMBER_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `session` a live session; `logits` valid for writing `cap` floats.
#[no_mangle]
pub unsafe extern "C" fn ember_session_logits(
    session: *mut ember_session,
    logits: *mut f32,
    cap: usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let needed = s.model().n_vocab();
                if cap < needed {
                    return Err(Error::BufferTooSmall { needed });
                }
                if logits.is_null() {
                    return Err(Error::InvalidArgument("logits is NULL".into()));
                }
                let current = s.current_logits().ok_or_else(|| {
                    Error::InvalidArgument(
                        "the session's last token has no logits at hand; step to compute them"
                            .into(),
                    )
                })?;
                // SAFETY: logits holds cap >= n_vocab floats (caller's contract).
                std::ptr::copy_nonoverlapping(current.as_ptr(), logits, needed);
                Ok(())
            })
        }
    })
}

/// Tokens and time of a session's work (`ember_session_perf`). Times in milliseconds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ember_perf {
    /// Bytes of this struct the library wrote.
    pub struct_size: u32,
    /// Last call (a step, or a whole generation): prompt tokens computed (a generation's
    /// prompt, or a step of more than one token).
    pub last_prompt_tokens: u64,
    /// Last call: milliseconds computing them.
    pub last_prompt_ms: f64,
    /// Last call: tokens generated (sampled by a generation, or stepped one at a time).
    pub last_generated_tokens: u64,
    /// Last call: milliseconds generating them (forward passes and sampling).
    pub last_generation_ms: f64,
    /// Since the session was created: prompt tokens.
    pub total_prompt_tokens: u64,
    /// Since the session was created: prompt milliseconds.
    pub total_prompt_ms: f64,
    /// Since the session was created: generated tokens.
    pub total_generated_tokens: u64,
    /// Since the session was created: generation milliseconds.
    pub total_generation_ms: f64,
}

/// Writes the session's counts and times into `*perf` (of `perf_size` bytes: call it through
/// `EMBER_SESSION_PERF(session, &perf)`, which passes `sizeof perf`; the fields that fit in
/// both structs are written, and their size in `struct_size`).
///
/// # Safety
/// `session` a live session; `perf` valid for writing `perf_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ember_session_perf(
    session: *mut ember_session,
    perf_size: usize,
    perf: *mut ember_perf,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let p = unsafe { with_session(session, |s| Ok(s.perf())) }?;
        let ms = |s: f64| s * 1e3;
        let out = ember_perf {
            struct_size: std::mem::size_of::<ember_perf>() as u32,
            last_prompt_tokens: p.last.prompt_tokens,
            last_prompt_ms: ms(p.last.prompt_seconds),
            last_generated_tokens: p.last.generated_tokens,
            last_generation_ms: ms(p.last.generation_seconds),
            total_prompt_tokens: p.total.prompt_tokens,
            total_prompt_ms: ms(p.total.prompt_seconds),
            total_generated_tokens: p.total.generated_tokens,
            total_generation_ms: ms(p.total.generation_seconds),
        };
        // SAFETY: caller's contract.
        unsafe { write_params(perf_size, perf, out) }
    })
}

/// Frees a session (NULL is ignored) and its worker threads, which have exited when this
/// returns. No other thread may be using the session; a session a background generation
/// still holds (`ember_generation_finish` not called) is not freed (a warning is logged).
///
/// # Safety
/// `session` must be NULL or a pointer from `ember_session_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_session_free(session: *mut ember_session) {
    // SAFETY: the caller's contract (a pointer from this library's constructor, or NULL).
    unsafe { super::free_unless_in_use(session, |s| &s.session) }
}

/// Forgets every token.
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_reset(session: *mut ember_session) -> ember_status {
    // SAFETY: caller's contract.
    run(|| unsafe {
        with_session(session, |s| {
            s.reset();
            Ok(())
        })
    })
}

/// Truncates the session to its first `n_past` tokens (undo, regenerate).
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_rewind(
    session: *mut ember_session,
    n_past: usize,
) -> ember_status {
    // SAFETY: caller's contract.
    run(|| unsafe { with_session(session, |s| s.rewind(n_past)) })
}

/// Number of tokens the session holds (0 if `session` is NULL). Lock-free: it may be called
/// from any thread at any time. During a step it advances as each micro-batch of the new
/// tokens completes (so a host can show the progress of a long prompt), and after a failed or
/// cancelled step it returns to the position before the step.
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_position(session: *const ember_session) -> usize {
    run_value(0, || {
        // SAFETY: caller's contract.
        let session = unsafe { borrow(session, "session") }?;
        Ok(session.shared.position())
    })
}

/// The session's context length: the most tokens it can hold (0 if `session` is NULL).
/// Lock-free, like `ember_session_position`.
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_n_ctx(session: *const ember_session) -> usize {
    run_value(0, || {
        // SAFETY: caller's contract.
        let session = unsafe { borrow(session, "session") }?;
        Ok(session.shared.n_ctx())
    })
}

/// Copies the tokens the session holds, oldest first, into `out[0..out_cap]` and writes their
/// number to `*n_out`. If `out_cap` is too small, nothing is written to `out`, `*n_out` is
/// the number needed and the status is `EMBER_ERR_BUFFER_TOO_SMALL` (call with `out_cap` 0 to
/// size the buffer).
///
/// # Safety
/// `session` a live session; `out` valid for `out_cap` tokens (or NULL with `out_cap` 0);
/// `n_out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_tokens(
    session: *mut ember_session,
    out: *mut i32,
    out_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let tokens: Vec<u32> = unsafe { with_session(session, |s| Ok(s.tokens().to_vec())) }?;
        // SAFETY: caller's contract for out and n_out.
        unsafe { super::write_tokens(&tokens, out, out_cap, n_out) }
    })
}

/// Chooses the attention weights the session's following steps keep, for
/// `ember_session_attention` (the default is none, at no cost). `layers[0..n_layers]` and
/// `heads[0..n_heads]` are the layers and query heads to keep (NULL with 0 = every one); of
/// each step, the rows of its last `max_queries` tokens are kept (the whole step up to
/// that many). `max_queries` 0 turns capture off and frees its buffer. The buffer, of
/// `layers × heads × max_queries × n_ctx` floats, is allocated here, once (steps allocate
/// nothing); its size in bytes is written to `*bytes` (NULL: not wanted), and
/// `ember_session_memory_estimate` does not include it. An index the model does not have
/// is `EMBER_ERR_INVALID_ARGUMENT` and leaves the previous capture in place.
///
/// # Safety
/// `session` a live session; `layers` / `heads` valid for their counts (or NULL with 0);
/// `bytes` NULL or valid for writing. The arrays are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn ember_session_capture_attention(
    session: *mut ember_session,
    layers: *const i32,
    n_layers: usize,
    heads: *const i32,
    n_heads: usize,
    max_queries: usize,
    bytes: *mut usize,
) -> ember_status {
    run(|| {
        let indices = |v: &[i32], what: &str| -> Result<Vec<usize>> {
            v.iter()
                .map(|&i| {
                    usize::try_from(i)
                        .map_err(|_| Error::InvalidArgument(format!("{what} {i} is negative")))
                })
                .collect()
        };
        // SAFETY: caller's contract for the arrays.
        let (layers, heads) = unsafe {
            (
                indices(slice(layers, n_layers, "layers")?, "layer")?,
                indices(slice(heads, n_heads, "heads")?, "head")?,
            )
        };
        let selection = (max_queries > 0).then_some(AttentionSelection {
            layers,
            heads,
            max_queries,
        });
        // SAFETY: caller's contract.
        let n = unsafe {
            with_session(session, |s| {
                if let Some(selection) = &selection {
                    // Checked first, so a bad selection leaves the old capture in place.
                    Session::attention_capture_bytes(s.model(), s.n_ctx(), selection)?;
                }
                s.capture_attention(selection.as_ref())
            })
        }?;
        if !bytes.is_null() {
            // SAFETY: non-NULL; validity is the caller's contract.
            unsafe { bytes.write(n) };
        }
        Ok(())
    })
}

/// Copies the attention weights of layer `layer`'s query head `head` from the session's last
/// step into `out[0..cap]`: `n_queries × n_positions` floats, row by row, row `i` being the
/// query at position `n_positions - n_queries + i` (the step's last tokens, up to the
/// capture's `max_queries`) over positions `0..n_positions` (every token held after the
/// step). Each row sums to 1; keys a query does not see (later ones, and ones outside a
/// sliding window) are exactly 0. The sizes go to `*n_queries` and `*n_positions`; when `cap`
/// is too small nothing goes to `out`, the sizes are still written and the status is
/// `EMBER_ERR_BUFFER_TOO_SMALL` (call with `cap` 0 to size the buffer). Fails with
/// `EMBER_ERR_INVALID_ARGUMENT` when the pair is not captured
/// (`ember_session_capture_attention`) or no step has been captured since (a rewind before
/// the step, a reset and a loaded state forget the rows).
///
/// # Safety
/// `session` a live session; `out` valid for writing `cap` floats (or NULL with `cap` 0);
/// `n_queries` and `n_positions` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_attention(
    session: *mut ember_session,
    layer: i32,
    head: i32,
    out: *mut f32,
    cap: usize,
    n_queries: *mut usize,
    n_positions: *mut usize,
) -> ember_status {
    run(|| {
        if n_queries.is_null() || n_positions.is_null() {
            return Err(Error::InvalidArgument(
                "n_queries and n_positions must not be NULL".into(),
            ));
        }
        let index = |i: i32, what: &str| {
            usize::try_from(i)
                .map_err(|_| Error::InvalidArgument(format!("{what} {i} is negative")))
        };
        let (layer, head) = (index(layer, "layer")?, index(head, "head")?);
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let rows = s.attention(layer, head)?;
                let needed = rows.n_queries * rows.n_positions;
                // SAFETY: both checked non-NULL; validity is the caller's contract.
                n_queries.write(rows.n_queries);
                n_positions.write(rows.n_positions);
                if cap < needed {
                    return Err(Error::BufferTooSmall { needed });
                }
                if out.is_null() {
                    return Err(Error::InvalidArgument("out is NULL".into()));
                }
                // SAFETY: out holds cap >= needed floats (caller's contract).
                rows.copy_to(std::slice::from_raw_parts_mut(out, needed));
                Ok(())
            })
        }
    })
}

/// Asks the call running on `session` (a step or a whole generation, on another thread) to
/// stop. A step returns `EMBER_ERR_CANCELLED` within about one layer's time and leaves the
/// session as it was; a generation returns `EMBER_ERR_CANCELLED` with its stop reason
/// `EMBER_STOP_REASON_CANCELLED` and keeps the tokens it delivered. The rule: a cancellation
/// applies to the call running when it is made, and to no other; with no call running it does
/// nothing. May be called from any thread at any time.
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_cancel(session: *const ember_session) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        unsafe { borrow(session, "session") }?.cancel.cancel();
        Ok(())
    })
}

/// Appends `n_tokens` tokens to the session and, if `logits` is not NULL, copies the last
/// token's logits there (`ember_model_n_vocab` floats). Tokens a generation left pending are
/// computed first; `n_tokens` may be 0 when there are such tokens. On failure (bad token,
/// full context, cancellation) the session is unchanged.
///
/// # Safety
/// `tokens` valid for `n_tokens` tokens; `logits` NULL or valid for n_vocab floats.
#[no_mangle]
pub unsafe extern "C" fn ember_step(
    session: *mut ember_session,
    tokens: *const i32,
    n_tokens: usize,
    logits: *mut f32,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let tokens = token_ids(unsafe { slice(tokens, n_tokens, "tokens") }?)?;
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let out = s.step(&tokens)?;
                if !logits.is_null() {
                    // SAFETY: logits holds n_vocab floats (caller's contract).
                    std::ptr::copy_nonoverlapping(out.as_ptr(), logits, out.len());
                }
                Ok(())
            })
        }
    })
}

/// Runs `body` with exclusive access to every session of `handles` (each distinct; a busy
/// one fails at once, naming its index), `taken` holding those already entered.
fn with_sessions<R>(
    handles: &[&ember_session],
    taken: &mut Vec<*mut Session>,
    body: &mut dyn FnMut(&mut [&mut Session]) -> Result<R>,
) -> Result<R> {
    let Some((first, rest)) = handles.split_first() else {
        // SAFETY: each pointer comes from a `with` scope still running further up this call
        // stack, so its access is exclusive and the session alive; the handles are distinct
        // (the caller checked), so no two references alias.
        let mut sessions: Vec<&mut Session> = taken.iter().map(|&p| unsafe { &mut *p }).collect();
        return body(&mut sessions);
    };
    let index = taken.len();
    first
        .session
        .with(|s| {
            taken.push(s as *mut Session);
            let result = with_sessions(rest, taken, body);
            taken.pop();
            result
        })
        .map_err(|e| match e {
            Error::Busy(_) => e.in_batch(index),
            e => e,
        })
}

/// Steps several sessions of one model in one forward pass, so each weight is read once for
/// all of them (eight characters decoding together cost little more than one): session `i`
/// appends `tokens[i][0..n_tokens[i]]` (any number; 0 when it has pending tokens, which are
/// computed first) and, if `logits` is not NULL and `logits[i]` is not NULL, its last token's
/// logits go to `logits[i]` (`ember_model_n_vocab` floats). Each session keeps its own cache,
/// position and logits, bitwise equal to what stepping it alone gives; one may take a prompt
/// while the others take a token each. The pass runs on the threads of the session with the
/// largest context.
///
/// Every input is checked before any work: a session of another model, a bad token, a full
/// context, a session in use (`EMBER_ERR_BUSY`) or one given twice fails the whole call with
/// that session's status, `ember_last_error` naming its index ("session 2 of the batch:
/// ..."), and no session changes; so does a cancellation of any of them during the pass. At
/// most 256 sessions.
///
/// # Safety
/// `sessions`, `tokens` and `n_tokens` valid for `n_sessions` elements (`tokens[i]` valid
/// for `n_tokens[i]` tokens, or NULL with 0); `logits` NULL or valid for `n_sessions`
/// pointers, each NULL or valid for n_vocab floats. Every array is read during the call
/// only.
#[no_mangle]
pub unsafe extern "C" fn ember_step_batch(
    sessions: *const *mut ember_session,
    tokens: *const *const i32,
    n_tokens: *const usize,
    n_sessions: usize,
    logits: *const *mut f32,
) -> ember_status {
    run(|| {
        if n_sessions > crate::defaults::MAX_BATCH {
            return Err(Error::InvalidArgument(format!(
                "a batch of {n_sessions} sessions (at most {})",
                crate::defaults::MAX_BATCH
            )));
        }
        // SAFETY: caller's contract for the arrays.
        let (handles, lists, counts) = unsafe {
            (
                slice(sessions, n_sessions, "sessions")?,
                slice(tokens, n_sessions, "tokens")?,
                slice(n_tokens, n_sessions, "n_tokens")?,
            )
        };
        let outputs: &[*mut f32] = if logits.is_null() {
            &[]
        } else {
            // SAFETY: non-NULL, so valid for n_sessions pointers (caller's contract).
            unsafe { slice(logits, n_sessions, "logits")? }
        };
        let mut order: Vec<(usize, usize)> = handles
            .iter()
            .enumerate()
            .map(|(i, &h)| (h as usize, i))
            .collect();
        order.sort_unstable();
        if let Some(pair) = order.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(
                Error::InvalidArgument(format!("the same session as index {}", pair[0].1))
                    .in_batch(pair[1].1),
            );
        }
        let token_lists = lists
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(i, (&list, &n))| {
                // SAFETY: caller's contract for tokens[i].
                unsafe { slice(list, n, "tokens[i]") }
                    .and_then(token_ids)
                    .map_err(|e| e.in_batch(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let handles = handles
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                // SAFETY: caller's contract: each a live session.
                unsafe { borrow(h, "session") }.map_err(|e| e.in_batch(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let lists: Vec<&[u32]> = token_lists.iter().map(|t| t.as_slice()).collect();
        with_sessions(
            &handles,
            &mut Vec::with_capacity(n_sessions),
            &mut |sessions| {
                Session::step_batch(sessions, &lists)?;
                for (s, &out) in sessions.iter().zip(outputs) {
                    if !out.is_null() {
                        let l = s.logits();
                        // SAFETY: out holds n_vocab floats (caller's contract).
                        unsafe { std::ptr::copy_nonoverlapping(l.as_ptr(), out, l.len()) };
                    }
                }
                Ok(())
            },
        )
    })
}

/// How `ember_session_embed` pools the final hidden states of its tokens (an `int32_t` there,
/// so that any value a caller writes is defined; unknown ones are
/// `EMBER_ERR_INVALID_ARGUMENT`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_pooling {
    /// The last token's state: with causal attention, the only one that has seen them all.
    EMBER_POOLING_LAST = 0,
    /// The mean of every token's state.
    EMBER_POOLING_MEAN = 1,
}

/// Appends `n_tokens` tokens (at least 1) and writes their embedding to `out`: the final
/// hidden state after the final norm (`ember_model_n_embd` floats) of the last token
/// (`EMBER_POOLING_LAST`) or the mean over the tokens (`EMBER_POOLING_MEAN`); with
/// `normalize`, scaled to unit length, so that a dot product of two is their cosine
/// similarity. Tokens a generation left pending are computed first but not pooled; every
/// earlier token conditions the states, so `ember_session_reset` first to embed a text on its
/// own. No logits are computed (a following `ember_sample` needs a step first).
///
/// `*n_out` receives `ember_model_n_embd` once the session is entered (not when it is
/// busy); when `cap` is smaller the status is `EMBER_ERR_BUFFER_TOO_SMALL` before any work
/// (call with `cap` 0 to size the buffer). `out` is written only on success; on any failure
/// the session holds the same tokens as before (pending ones may have been computed).
///
/// # Safety
/// `session` a live session; `tokens` valid for `n_tokens` tokens; `out` valid for writing
/// `cap` floats (or NULL with `cap` 0); `n_out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_session_embed(
    session: *mut ember_session,
    tokens: *const i32,
    n_tokens: usize,
    pooling: i32,
    normalize: bool,
    out: *mut f32,
    cap: usize,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        if n_out.is_null() {
            return Err(Error::InvalidArgument("n_out must not be NULL".into()));
        }
        let pooling = match pooling {
            p if p == ember_pooling::EMBER_POOLING_LAST as i32 => Pooling::Last,
            p if p == ember_pooling::EMBER_POOLING_MEAN as i32 => Pooling::Mean,
            p => {
                return Err(Error::InvalidArgument(format!(
                    "pooling {p} (must be EMBER_POOLING_LAST or EMBER_POOLING_MEAN)"
                )))
            }
        };
        // SAFETY: caller's contract.
        let tokens = token_ids(unsafe { slice(tokens, n_tokens, "tokens") }?)?;
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let n_embd = s.model().n_embd();
                // SAFETY: checked non-NULL; validity is the caller's contract.
                n_out.write(n_embd);
                if cap < n_embd {
                    return Err(Error::BufferTooSmall { needed: n_embd });
                }
                if out.is_null() {
                    return Err(Error::InvalidArgument("out is NULL".into()));
                }
                // SAFETY: out holds cap >= n_embd floats (caller's contract); `embed` writes
                // it only on success.
                let out = std::slice::from_raw_parts_mut(out, n_embd);
                s.embed(&tokens, pooling, normalize, out)
            })
        }
    })
}

/// Appends `n_tokens` tokens and writes the logits of every one of them to `logits`, row by
/// row (`n_tokens * n_vocab` floats; `logits_cap` is its capacity in floats), for scoring and
/// perplexity. Pending tokens are computed first (their logits are not written). A too-small
/// buffer is `EMBER_ERR_BUFFER_TOO_SMALL` before any work is done.
///
/// # Safety
/// `tokens` valid for `n_tokens` tokens; `logits` valid for `logits_cap` floats.
#[no_mangle]
pub unsafe extern "C" fn ember_step_all(
    session: *mut ember_session,
    tokens: *const i32,
    n_tokens: usize,
    logits: *mut f32,
    logits_cap: usize,
) -> ember_status {
    run(|| {
        // SAFETY: caller's contract.
        let tokens = token_ids(unsafe { slice(tokens, n_tokens, "tokens") }?)?;
        // SAFETY: caller's contract.
        unsafe {
            with_session(session, |s| {
                let needed = tokens.len() * s.model().n_vocab();
                if logits_cap < needed {
                    return Err(Error::BufferTooSmall { needed });
                }
                if logits.is_null() {
                    return Err(Error::InvalidArgument("logits is NULL".into()));
                }
                // SAFETY: logits holds logits_cap >= needed floats (caller's contract).
                let out = std::slice::from_raw_parts_mut(logits, needed);
                s.step_all(&tokens, out)
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::{ember_last_error, ember_model_free, ember_model_load};

    #[test]
    fn a_panic_poisons_only_its_session() {
        let path =
            std::ffi::CString::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt2"))
                .unwrap();
        let mut model = std::ptr::null_mut();
        let mut a = std::ptr::null_mut();
        let mut b = std::ptr::null_mut();
        // SAFETY: valid pointers to locals; the handles are freed at the end.
        unsafe {
            assert_eq!(
                ember_model_load(path.as_ptr(), std::ptr::null(), &mut model),
                ember_status::EMBER_OK
            );
            assert_eq!(
                ember_session_new(model, std::ptr::null(), &mut a),
                ember_status::EMBER_OK
            );
            assert_eq!(
                ember_session_new(model, std::ptr::null(), &mut b),
                ember_status::EMBER_OK
            );
            let status = run(|| with_session(a, |_| -> Result<()> { panic!("injected failure") }));
            assert_eq!(status, ember_status::EMBER_ERR_INTERNAL);
            let message = std::ffi::CStr::from_ptr(ember_last_error())
                .to_string_lossy()
                .into_owned();
            assert!(message.contains("injected failure"), "{message}");
            let tokens = [1i32, 2, 3];
            assert_eq!(
                ember_step(a, tokens.as_ptr(), 3, std::ptr::null_mut()),
                ember_status::EMBER_ERR_INTERNAL
            );
            assert_eq!(
                ember_step(b, tokens.as_ptr(), 3, std::ptr::null_mut()),
                ember_status::EMBER_OK
            );
            ember_session_free(a);
            ember_session_free(b);
            ember_model_free(model);
        }
    }
}
