//! The error type shared by every part of Ember.
//!
//! Each variant maps onto one status code of the C API, so the boundary never has to guess
//! what kind of failure a message describes.

use std::path::PathBuf;

/// Everything that can go wrong inside Ember.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller passed a value that cannot be used (bad token id, zero threads, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A file could not be opened, mapped or read.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A file was read but its contents are malformed or inconsistent.
    #[error("bad model format: {0}")]
    BadFormat(String),

    /// The file is well formed but uses something Ember does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The session's context window cannot hold the tokens given.
    #[error("context full: {needed} positions needed, the session holds {capacity}")]
    ContextFull {
        /// Positions the call would need in total.
        needed: usize,
        /// The session's context length.
        capacity: usize,
    },

    /// An output buffer is too small; `needed` elements are required.
    #[error("buffer too small: {needed} elements needed")]
    BufferTooSmall {
        /// The number of elements the caller must provide.
        needed: usize,
    },

    /// The operation was cancelled from another thread.
    #[error("cancelled")]
    Cancelled,

    /// An allocation failed.
    #[error("out of memory allocating {0}")]
    OutOfMemory(String),

    /// The object is in use by another thread.
    #[error("busy: {0}")]
    Busy(String),

    /// A bug inside Ember (for example a caught panic).
    #[error("internal error: {0}")]
    Internal(String),

    /// What went wrong with one session of a batched step (nothing was stepped).
    #[error("session {index} of the batch: {source}")]
    InBatch {
        /// The session's index in the batch.
        index: usize,
        /// Its error.
        source: Box<Error>,
    },
}

/// Shorthand for results carrying an Ember [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-file error.
    pub fn format(message: impl Into<String>) -> Self {
        Error::BadFormat(message.into())
    }

    /// A copy of this error (I/O errors keep their kind and message).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::BadFormat(m) => Error::BadFormat(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::ContextFull { needed, capacity } => Error::ContextFull {
                needed: *needed,
                capacity: *capacity,
            },
            Error::BufferTooSmall { needed } => Error::BufferTooSmall { needed: *needed },
            Error::Cancelled => Error::Cancelled,
            Error::OutOfMemory(m) => Error::OutOfMemory(m.clone()),
            Error::Busy(m) => Error::Busy(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::InBatch { index, source } => Error::InBatch {
                index: *index,
                source: Box::new(source.duplicate()),
            },
        }
    }

    /// This error as that of session `index` of a batch.
    pub fn in_batch(self, index: usize) -> Self {
        Error::InBatch {
            index,
            source: Box::new(self),
        }
    }

    /// Prefixes format and support errors with the file they are about.
    pub fn in_file(self, file: &str) -> Self {
        match self {
            Error::BadFormat(m) => Error::BadFormat(format!("{file}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{file}: {m}")),
            other => other,
        }
    }
}

/// Allocates a zeroed `Vec<f32>` of `len` elements, reporting failure instead of aborting.
pub fn try_zeroed_f32(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::OutOfMemory(format!("{what} ({len} floats)")))?;
    v.resize(len, 0.0);
    Ok(v)
}

thread_local! {
    /// True while this thread runs code under [`catch_quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for panics Ember catches itself (under
/// [`catch_quietly`], and on Ember's worker threads), and defers to the previous hook for
/// every other panic of the process.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = QUIET.with(std::cell::Cell::get)
                || std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("ember-worker"));
            if !ours {
                previous(info);
            }
        }));
    });
}

/// Panics [`catch_quietly`] has caught in this process: each one is a bug (the fuzz targets
/// check that none happens).
pub static CAUGHT_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f`, turning a panic into `Err(message)` without printing anything: Ember never
/// prints, whether the panic is its own bug or one inside a library it calls. Counted in
/// [`CAUGHT_PANICS`].
pub(crate) fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let result = catch_dependency_panic(f);
    if result.is_err() {
        CAUGHT_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

/// [`catch_quietly`] for a call into a library with a known panic on some input, which the
/// caller maps to an ordinary error (not counted as a bug of Ember's).
pub(crate) fn catch_dependency_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    install_quiet_panic_hook();
    let outer = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}
