//! Sessions: stepping tokens through the model, rewinding, cancelling.

use std::sync::Arc;

use super::{
    borrow, ember_model, ember_status, read_params, run, run_value, slice, token_ids, write_params,
    Exclusive,
};
use crate::error::{Error, Result};
use crate::session::{CancelHandle, Session, SessionOptions, SessionShared};

/// One sequence's state (KV cache, position) over a model. A session is used by one call at
/// a time: a call made while another is running on the same session (from another thread,
/// or from a callback of the running call) fails with `EMBER_ERR_BUSY`. The functions that
/// take a `const ember_session *` (position, context length, cancel) may be called from any
/// thread at any time.
pub struct ember_session {
    session: Exclusive<Session>,
    shared: Arc<SessionShared>,
    cancel: CancelHandle,
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
}

const SESSION_PARAMS_DEFAULT: ember_session_params = ember_session_params {
    struct_size: std::mem::size_of::<ember_session_params>() as u32,
    n_ctx: 0,
    n_threads: 0,
    n_ubatch: crate::defaults::UBATCH as u32,
};

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
        let options = SessionOptions {
            n_ctx: params.n_ctx as usize,
            n_threads: crate::defaults::threads(params.n_threads as usize),
            ubatch: params.n_ubatch as usize,
        };
        let session = Session::new(model.model.clone(), &options)?;
        let handle = Box::new(ember_session {
            cancel: session.cancel_handle(),
            shared: session.shared().clone(),
            session: Exclusive::new(session, "session"),
        });
        // SAFETY: out checked non-NULL.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Frees a session (NULL is ignored) and its worker threads, which have exited when this
/// returns. No other thread may be using the session.
///
/// # Safety
/// `session` must be NULL or a pointer from `ember_session_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ember_session_free(session: *mut ember_session) {
    // SAFETY: the caller's contract (a pointer from this library's constructor, or NULL).
    unsafe { super::free_handle(session) }
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
