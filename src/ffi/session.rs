//! Sessions: stepping tokens through the model, rewinding, cancelling.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{
    borrow, ember_model, ember_status, read_params, run, run_value, slice, token_ids, write_params,
};
use crate::error::{Error, Result};
use crate::session::{CancelHandle, Session, SessionOptions};

/// One sequence's state (KV cache, position) over a model. A session is used by one thread
/// at a time: a call made while another thread is inside a call on the same session fails
/// with `EMBER_ERR_BUSY`. Only `ember_session_cancel` and `ember_session_position` may be
/// called concurrently with other calls.
pub struct ember_session {
    session: UnsafeCell<Session>,
    busy: AtomicBool,
    poisoned: AtomicBool,
    position: AtomicUsize,
    cancel: CancelHandle,
}

// SAFETY: the session inside the UnsafeCell is only reached through `with_session`, which
// admits one thread at a time (the `busy` flag); every other field is atomic or Sync.
unsafe impl Sync for ember_session {}

/// Clears the busy flag when a call ends, even by unwinding.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
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
    let handle = unsafe { borrow(session, "session") }?;
    if handle.poisoned.load(Ordering::Acquire) {
        return Err(Error::Internal(
            "this session hit an internal error earlier and can only be freed".into(),
        ));
    }
    if handle
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(Error::Busy(
            "the session is in use by another thread".into(),
        ));
    }
    let _guard = BusyGuard(&handle.busy);
    // SAFETY: the busy flag, just taken, gives this thread the only access to the session
    // until the guard drops.
    let inner = unsafe { &mut *handle.session.get() };
    let result = catch_unwind(AssertUnwindSafe(|| body(inner)));
    handle.position.store(inner.position(), Ordering::Release);
    match result {
        Ok(value) => value,
        Err(panic) => {
            handle.poisoned.store(true, Ordering::Release);
            resume_unwind(panic)
        }
    }
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
    /// Threads each step may use; 1 = the calling thread only. 0 = half the machine's cores
    /// (at least 1), so a host keeps cores for itself. Default 0.
    pub n_threads: u32,
    /// Prompt tokens processed per batch. Default 64.
    pub n_ubatch: u32,
}

const SESSION_PARAMS_DEFAULT: ember_session_params = ember_session_params {
    struct_size: std::mem::size_of::<ember_session_params>() as u32,
    n_ctx: 0,
    n_threads: 0,
    n_ubatch: 64,
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
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max = model.model.config().max_position_embeddings;
        let options = SessionOptions {
            n_ctx: if params.n_ctx == 0 {
                max.min(2048)
            } else {
                params.n_ctx as usize
            },
            n_threads: if params.n_threads == 0 {
                (cores / 2).max(1)
            } else {
                params.n_threads as usize
            },
            ubatch: params.n_ubatch as usize,
        };
        let session = Session::new(model.model.clone(), &options)?;
        let handle = Box::new(ember_session {
            cancel: session.cancel_handle(),
            session: UnsafeCell::new(session),
            busy: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            position: AtomicUsize::new(0),
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

/// Forgets every token (and any pending cancellation).
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

/// Number of tokens the session holds (0 if `session` is NULL). Safe to call from any thread
/// at any time; during a step it gives the position before the step.
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_position(session: *const ember_session) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || {
        Ok(unsafe { borrow(session, "session") }?
            .position
            .load(Ordering::Acquire))
    })
}

/// The session's context length (0 if `session` is NULL).
///
/// # Safety
/// `session` must be NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn ember_session_n_ctx(session: *mut ember_session) -> usize {
    // SAFETY: caller's contract.
    run_value(0, || unsafe { with_session(session, |s| Ok(s.n_ctx())) })
}

/// Asks the step (or generation) running on `session` in another thread to stop; it returns
/// `EMBER_ERR_CANCELLED` within about one layer's time and leaves the session at its previous
/// position. If nothing is running, the next step is cancelled (`ember_session_reset` clears
/// the request). May be called from any thread.
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
/// token's logits there (`ember_model_n_vocab` floats). On failure (bad token, full context,
/// cancellation) the session is unchanged.
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
/// perplexity. A too-small buffer is `EMBER_ERR_BUFFER_TOO_SMALL` before any work is done.
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
