//! The C API (`include/ember.h` is generated from this module by cbindgen).
//!
//! Rules every exported function follows:
//! - its body runs inside [`run`], which catches panics (nothing unwinds into C) and turns
//!   every failure into an [`ember_status`] plus a message for [`ember_last_error`];
//! - every pointer is checked (NULL gives `EMBER_ERR_INVALID_ARGUMENT`), text is checked to
//!   be UTF-8, token ids to be in the vocabulary;
//! - outputs are written only on success;
//! - nothing is printed: messages go to the log callback the host installs, if any.
//!
//! Parameter structs start with `uint32_t struct_size`, which `*_params_default` fills in: the
//! library reads only the fields that fit in `struct_size`, so a program built against an
//! older, smaller struct keeps working with a newer library (missing fields take defaults).

#![allow(non_camel_case_types)]

// The header lists the functions in the order of these modules (each a group of its own, so
// that formatting keeps the order): the order a user needs them in.
mod model;

mod tokenizer;

mod session;

mod sampler;

mod generate;

mod generation;

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

pub use generate::*;
pub use generation::*;
pub use model::*;
pub use sampler::*;
pub use session::*;
pub use tokenizer::*;

/// Version of the C ABI. It changes only when existing declarations change incompatibly;
/// additions (new functions, new trailing struct fields) keep it.
pub const EMBER_ABI_VERSION: u32 = 1;

/// Result of every fallible call. On anything but `EMBER_OK`, `ember_last_error()` describes
/// the failure.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_status {
    /// Success.
    EMBER_OK = 0,
    /// A NULL pointer, an out-of-range value, invalid UTF-8, a bad token id.
    EMBER_ERR_INVALID_ARGUMENT = 1,
    /// A file could not be opened or read.
    EMBER_ERR_IO = 2,
    /// A file is malformed (truncated, corrupt, inconsistent).
    EMBER_ERR_BAD_FORMAT = 3,
    /// Something Ember does not implement (architecture, dtype, ...).
    EMBER_ERR_UNSUPPORTED = 4,
    /// The session's context cannot hold the tokens.
    EMBER_ERR_CONTEXT_FULL = 5,
    /// An output buffer is too small; the size needed was written to the size output.
    EMBER_ERR_BUFFER_TOO_SMALL = 6,
    /// The call was cancelled (`ember_session_cancel`).
    EMBER_ERR_CANCELLED = 7,
    /// An allocation failed.
    EMBER_ERR_OUT_OF_MEMORY = 8,
    /// The session is in use by another thread.
    EMBER_ERR_BUSY = 9,
    /// A bug in Ember; the session involved (if any) is no longer usable.
    EMBER_ERR_INTERNAL = 10,
}

impl ember_status {
    fn of(error: &Error) -> ember_status {
        match error {
            Error::InvalidArgument(_) => ember_status::EMBER_ERR_INVALID_ARGUMENT,
            Error::Io { .. } => ember_status::EMBER_ERR_IO,
            Error::BadFormat(_) => ember_status::EMBER_ERR_BAD_FORMAT,
            Error::Unsupported(_) => ember_status::EMBER_ERR_UNSUPPORTED,
            Error::ContextFull { .. } => ember_status::EMBER_ERR_CONTEXT_FULL,
            Error::BufferTooSmall { .. } => ember_status::EMBER_ERR_BUFFER_TOO_SMALL,
            Error::Cancelled => ember_status::EMBER_ERR_CANCELLED,
            Error::OutOfMemory(_) => ember_status::EMBER_ERR_OUT_OF_MEMORY,
            Error::Busy(_) => ember_status::EMBER_ERR_BUSY,
            Error::Internal(_) => ember_status::EMBER_ERR_INTERNAL,
            Error::InBatch { source, .. } => ember_status::of(source),
        }
    }
}

/// Severity of a log message.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_log_level {
    /// Something failed inside Ember (a caught panic).
    EMBER_LOG_LEVEL_ERROR = 0,
    /// Something the host may want to know about.
    EMBER_LOG_LEVEL_WARN = 1,
    /// Progress: model loaded, sessions created.
    EMBER_LOG_LEVEL_INFO = 2,
}

/// Receives log messages. `message` is NUL-terminated UTF-8, valid only during the call.
/// It may be called from any thread that calls into Ember.
pub type ember_log_callback =
    Option<unsafe extern "C" fn(level: ember_log_level, message: *const c_char, user: *mut c_void)>;

#[derive(Clone, Copy)]
struct Logger {
    callback: ember_log_callback,
    user: usize,
}

/// The installed callback. The lock is held only to read or replace it, never while the
/// callback runs, so a callback may call back into Ember (even `ember_set_log_callback`).
static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    callback: None,
    user: 0,
});

/// Calls of a log callback in progress, on every thread.
static LOG_CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Calls of a log callback in progress on this thread (a callback that logs re-enters).
    static LOG_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Sends a message to the host's log callback, if one is installed.
pub(crate) fn log(level: ember_log_level, message: &str) {
    // Counted before the callback is read, so that `ember_set_log_callback` sees this call.
    LOG_CALLS.fetch_add(1, Ordering::SeqCst);
    let logger = *LOGGER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(callback) = logger.callback {
        let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
        LOG_DEPTH.with(|d| d.set(d.get() + 1));
        // SAFETY: the host installed this callback with `ember_set_log_callback` and promised
        // it may be called from any thread; the message outlives the call.
        unsafe { callback(level, text.as_ptr(), logger.user as *mut c_void) };
        LOG_DEPTH.with(|d| d.set(d.get() - 1));
    }
    LOG_CALLS.fetch_sub(1, Ordering::SeqCst);
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs the body of an exported function: catches panics, records errors, maps statuses.
pub(crate) fn run(body: impl FnOnce() -> Result<()>) -> ember_status {
    match crate::error::catch_quietly(body) {
        Ok(Ok(())) => ember_status::EMBER_OK,
        Ok(Err(error)) => {
            set_last_error(&error.to_string());
            ember_status::of(&error)
        }
        Err(panic) => {
            let message = format!("internal error: {panic}");
            log(ember_log_level::EMBER_LOG_LEVEL_ERROR, &message);
            set_last_error(&message);
            ember_status::EMBER_ERR_INTERNAL
        }
    }
}

/// Like [`run`] for functions that return a value rather than a status: `fallback` on any
/// failure.
pub(crate) fn run_value<T: Copy>(fallback: T, body: impl FnOnce() -> Result<T>) -> T {
    let mut value = fallback;
    run(|| {
        value = body()?;
        Ok(())
    });
    value
}

/// A reference from a pointer the caller promises is valid, or an error naming it.
///
/// # Safety
/// `ptr` must be NULL or point to a live `T` for the duration of the borrow.
pub(crate) unsafe fn borrow<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Error::InvalidArgument(format!("{name} is NULL")))
}

/// The `len` bytes at `ptr` as a slice (an empty slice when `len` is 0, whatever `ptr`).
///
/// # Safety
/// Unless `len` is 0, `ptr` must be NULL or valid for reading `len` elements.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, name: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::InvalidArgument(format!("{name} is NULL")));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Error::InvalidArgument(format!(
            "{name}: length {len} is too large"
        )));
    }
    // SAFETY: non-NULL, length checked against isize::MAX; validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// UTF-8 text from a pointer and a length.
///
/// # Safety
/// As [`slice`].
pub(crate) unsafe fn text<'a>(ptr: *const c_char, len: usize, name: &str) -> Result<&'a str> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { slice(ptr.cast::<u8>(), len, name) }?;
    std::str::from_utf8(bytes)
        .map_err(|e| Error::InvalidArgument(format!("{name} is not valid UTF-8: {e}")))
}

/// UTF-8 text from a NUL-terminated string.
///
/// # Safety
/// `ptr` must be NULL or a valid NUL-terminated string.
pub(crate) unsafe fn c_text<'a>(ptr: *const c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::InvalidArgument(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    std::str::from_utf8(bytes)
        .map_err(|e| Error::InvalidArgument(format!("{name} is not valid UTF-8: {e}")))
}

/// Token ids from C (`int32_t`), checked to be non-negative.
pub(crate) fn token_ids(tokens: &[i32]) -> Result<Vec<u32>> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t)
                .map_err(|_| Error::InvalidArgument(format!("token {t} at index {i} is negative")))
        })
        .collect()
}

/// Writes `value` through `out` (an output pointer checked to be non-NULL).
///
/// # Safety
/// `out` must be NULL or valid for writing a `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T, name: &str) -> Result<()> {
    if out.is_null() {
        return Err(Error::InvalidArgument(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL; validity is the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `text` and a terminating NUL into `out[..cap]`, writing the text's length (without
/// the NUL) to `*n_out`. When `cap` is too small, writes nothing to `out`, sets `*n_out` to
/// the capacity needed (length + 1) and fails with `EMBER_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `out` must be NULL or valid for `cap` bytes; `n_out` NULL or valid for a `size_t`.
pub(crate) unsafe fn write_text(
    text: &str,
    out: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> Result<()> {
    if n_out.is_null() {
        return Err(Error::InvalidArgument("n_out is NULL".into()));
    }
    let needed = text.len() + 1;
    if cap < needed {
        // SAFETY: n_out checked non-NULL; validity is the caller's contract.
        unsafe { n_out.write(needed) };
        return Err(Error::BufferTooSmall { needed });
    }
    if out.is_null() {
        return Err(Error::InvalidArgument("out is NULL".into()));
    }
    // SAFETY: out holds at least `needed` bytes (checked above against `cap`, the caller's
    // promise); the regions cannot overlap (`text` is Ember's own string).
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), text.len());
        out.add(text.len()).write(0);
        n_out.write(text.len());
    }
    Ok(())
}

/// Copies `tokens` into `out[..cap]` and writes their number to `*n_out`. When `cap` is too
/// small, writes nothing to `out`, sets `*n_out` to the number needed and fails with
/// `EMBER_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `out` must be NULL or valid for `cap` tokens; `n_out` NULL or valid for a `size_t`.
pub(crate) unsafe fn write_tokens(
    tokens: &[u32],
    out: *mut i32,
    cap: usize,
    n_out: *mut usize,
) -> Result<()> {
    if n_out.is_null() {
        return Err(Error::InvalidArgument("n_out is NULL".into()));
    }
    if tokens.len() > cap {
        // SAFETY: n_out checked non-NULL; validity is the caller's contract.
        unsafe { n_out.write(tokens.len()) };
        return Err(Error::BufferTooSmall {
            needed: tokens.len(),
        });
    }
    if out.is_null() && !tokens.is_empty() {
        return Err(Error::InvalidArgument("out is NULL".into()));
    }
    // SAFETY: out holds cap >= tokens.len() tokens (caller's contract); n_out is non-NULL.
    unsafe {
        for (i, &id) in tokens.iter().enumerate() {
            out.add(i).write(id as i32);
        }
        n_out.write(tokens.len());
    }
    Ok(())
}

/// Reads a caller's parameter struct that starts with `uint32_t struct_size`: the bytes that
/// fit in both the caller's and this library's struct are taken, the rest keep `defaults`.
/// NULL gives `defaults`.
///
/// # Safety
/// `params` must be NULL or valid for reading its own `struct_size` bytes. `T` must accept any
/// bit pattern in its fields (integers, floats, raw pointers).
pub(crate) unsafe fn read_params<T: Copy>(params: *const T, defaults: T, name: &str) -> Result<T> {
    if params.is_null() {
        return Ok(defaults);
    }
    // SAFETY: a non-NULL params struct starts with its u32 size (caller's contract).
    let size = unsafe { params.cast::<u32>().read_unaligned() } as usize;
    if size < std::mem::size_of::<u32>() {
        return Err(Error::InvalidArgument(format!(
            "{name}.struct_size is {size}; use the *_params_default function"
        )));
    }
    let mut value = defaults;
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's struct holds `size >= n` readable bytes and ours `size_of::<T>() >= n`;
    // `T` accepts any bit pattern (documented requirement), so the mixed value is valid.
    unsafe {
        std::ptr::copy_nonoverlapping(params.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), n)
    };
    Ok(value)
}

/// Fills a caller's parameter struct of `struct_size` bytes with `defaults`, recording the
/// size both sides know in its `struct_size` field.
///
/// # Safety
/// `out` must be NULL or valid for writing `struct_size` bytes.
pub(crate) unsafe fn write_params<T: Copy>(
    struct_size: usize,
    out: *mut T,
    defaults: T,
) -> Result<()> {
    if out.is_null() {
        return Err(Error::InvalidArgument("params is NULL".into()));
    }
    if struct_size < std::mem::size_of::<u32>() {
        return Err(Error::InvalidArgument(format!(
            "struct_size {struct_size} is too small"
        )));
    }
    let n = struct_size.min(std::mem::size_of::<T>());
    // SAFETY: the caller's struct has room for `struct_size >= n` bytes; ours holds `n` bytes;
    // the first field of every params struct is its u32 size.
    unsafe {
        std::ptr::copy_nonoverlapping((&defaults as *const T).cast::<u8>(), out.cast::<u8>(), n);
        out.cast::<u32>().write_unaligned(n as u32);
    }
    Ok(())
}

/// A value used by one thread at a time through a C handle: a call that finds it in use by
/// another thread (or by a callback of its own thread, re-entering) fails with
/// `EMBER_ERR_BUSY` instead of waiting, so no Ember lock is ever held while the host runs.
/// A panic inside a call poisons the value: it can then only be freed.
pub(crate) struct Exclusive<T> {
    value: std::cell::UnsafeCell<T>,
    busy: std::sync::atomic::AtomicBool,
    poisoned: std::sync::atomic::AtomicBool,
    /// What the value is, for messages ("session", "sampler").
    what: &'static str,
}

// SAFETY: the value inside the UnsafeCell is only reached through `with`, which admits one
// thread at a time (the `busy` flag); it is moved between threads, so it must be Send.
unsafe impl<T: Send> Sync for Exclusive<T> {}

/// Clears a busy flag when a call ends, even by unwinding.
struct BusyGuard<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<T> Exclusive<T> {
    /// Wraps `value`, described as `what` in messages.
    pub(crate) fn new(value: T, what: &'static str) -> Exclusive<T> {
        Exclusive {
            value: std::cell::UnsafeCell::new(value),
            busy: std::sync::atomic::AtomicBool::new(false),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            what,
        }
    }

    /// Takes the busy flag, or fails with `Busy` (or `Internal` once poisoned) at once.
    fn acquire(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Internal(format!(
                "this {} hit an internal error earlier and can only be freed",
                self.what
            )));
        }
        if self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::Busy(format!(
                "the {} is in use by another call",
                self.what
            )));
        }
        Ok(())
    }

    /// Runs `body` on the value, poisoning it if `body` panics.
    ///
    /// # Safety
    /// The caller holds the busy flag (the only access to the value).
    unsafe fn enter<R>(&self, body: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        // SAFETY: the caller's busy flag gives this call the only access to the value.
        let inner = unsafe { &mut *self.value.get() };
        match catch_unwind(AssertUnwindSafe(|| body(inner))) {
            Ok(result) => result,
            Err(panic) => {
                self.poisoned.store(true, Ordering::Release);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Runs `body` with exclusive access, or fails with `Busy` at once.
    pub(crate) fn with<R>(&self, body: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        self.acquire()?;
        let _guard = BusyGuard(&self.busy);
        // SAFETY: the busy flag, just taken, is held until the guard drops.
        unsafe { self.enter(body) }
    }
}

impl<T> Exclusive<T> {
    /// True while a call (or a background generation) holds the value.
    pub(crate) fn in_use(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

/// Frees a handle owning an [`Exclusive`] value unless the value is in use: freeing a
/// session or sampler that a background generation (or another thread) is using would leave
/// it with freed memory, so the handle is kept (leaked) and a warning logged instead.
///
/// # Safety
/// As [`free_handle`]; `inner` gives the handle's value.
pub(crate) unsafe fn free_unless_in_use<H, T>(handle: *mut H, inner: impl Fn(&H) -> &Exclusive<T>) {
    // SAFETY: the caller's contract: NULL or a live handle.
    if let Some(h) = unsafe { handle.as_ref() } {
        let what = inner(h).what;
        if inner(h).in_use() {
            log(
                ember_log_level::EMBER_LOG_LEVEL_WARN,
                &format!(
                    "ember_{what}_free: the {what} is in use (a generation not finished, or \
                     another thread's call), so it was not freed"
                ),
            );
            return;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { free_handle(handle) }
}

impl<T: Send> Exclusive<T> {
    /// Takes exclusive access now, for a body that runs later on another thread (a
    /// background generation): until the lease drops, other calls get `Busy`.
    ///
    /// # Safety
    /// The value must outlive the lease (the host may not free the handle meanwhile).
    pub(crate) unsafe fn lease(&self) -> Result<Lease<T>> {
        self.acquire()?;
        Ok(Lease { owner: self })
    }
}

/// Exclusive access to an [`Exclusive`] value, held from [`Exclusive::lease`] until dropped.
pub(crate) struct Lease<T> {
    owner: *const Exclusive<T>,
}

// SAFETY: a lease is the only access to its value while it lives (the busy flag), so moving
// it to another thread moves that access, as moving a `&mut T` would; `T: Send` is required.
unsafe impl<T: Send> Send for Lease<T> {}

impl<T> Lease<T> {
    /// Runs `body` with the value; a panic inside poisons it.
    pub(crate) fn with<R>(&mut self, body: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        // SAFETY: the owner outlives the lease (`lease`'s contract), and the busy flag this
        // lease holds gives it the only access to the value.
        unsafe { (*self.owner).enter(body) }
    }
}

impl<T> Drop for Lease<T> {
    fn drop(&mut self) {
        // SAFETY: the owner outlives the lease (`lease`'s contract).
        unsafe { &*self.owner }.busy.store(false, Ordering::Release);
    }
}

/// Frees a handle made with `Box::into_raw` (NULL is ignored), catching panics of its drop.
///
/// # Safety
/// `handle` must be NULL or a pointer from `Box::into_raw` not yet freed.
pub(crate) unsafe fn free_handle<T>(handle: *mut T) {
    run(|| {
        if !handle.is_null() {
            // SAFETY: the caller's contract: the pointer came from Box::into_raw.
            drop(unsafe { Box::from_raw(handle) });
        }
        Ok(())
    });
}

/// The message of the last failed call on this thread ("" if none). The pointer stays valid
/// until the next failing Ember call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn ember_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn ember_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version the library implements; compare with `EMBER_ABI_VERSION` from the header
/// the program was built with.
#[no_mangle]
pub extern "C" fn ember_abi_version() -> u32 {
    EMBER_ABI_VERSION
}

/// A short name for a status value, e.g. "EMBER_ERR_CONTEXT_FULL" ("EMBER_UNKNOWN_STATUS" for
/// a value that is not an `ember_status`); a static string.
#[no_mangle]
pub extern "C" fn ember_status_name(status: i32) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"EMBER_OK",
        1 => c"EMBER_ERR_INVALID_ARGUMENT",
        2 => c"EMBER_ERR_IO",
        3 => c"EMBER_ERR_BAD_FORMAT",
        4 => c"EMBER_ERR_UNSUPPORTED",
        5 => c"EMBER_ERR_CONTEXT_FULL",
        6 => c"EMBER_ERR_BUFFER_TOO_SMALL",
        7 => c"EMBER_ERR_CANCELLED",
        8 => c"EMBER_ERR_OUT_OF_MEMORY",
        9 => c"EMBER_ERR_BUSY",
        10 => c"EMBER_ERR_INTERNAL",
        _ => c"EMBER_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

/// Installs (or, with NULL, removes) the log callback. Ember prints nothing itself; without a
/// callback its messages are dropped. `user` is passed back to every call.
///
/// When this returns, no other thread is still running the previous callback, so a host may
/// unload the previous callback's code (a Unity domain reload). It may be called from inside
/// the callback itself: the calls on the calling thread are then the only ones not waited for.
/// Ember holds no lock while it runs the callback.
#[no_mangle]
pub extern "C" fn ember_set_log_callback(callback: ember_log_callback, user: *mut c_void) {
    run(|| {
        *LOGGER.lock().unwrap_or_else(|p| p.into_inner()) = Logger {
            callback,
            user: user as usize,
        };
        // Wait for the calls that may have read the previous callback, except this thread's.
        let own = LOG_DEPTH.with(Cell::get);
        let mut spins = 0u32;
        while LOG_CALLS.load(Ordering::SeqCst) > own {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    });
}
