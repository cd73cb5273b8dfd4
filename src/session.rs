//! A session: one conversation's KV cache and position over a shared model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{ForwardScratch, KvCache, LogitsWanted, Model, Workspace};
use crate::threading::ThreadPool;

/// How to create a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context length in tokens; 0 means the model's maximum.
    pub n_ctx: usize,
    /// Threads used by each step (1 runs everything on the calling thread).
    pub n_threads: usize,
    /// Tokens per micro-batch when processing a prompt.
    pub ubatch: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 0,
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ubatch: 64,
        }
    }
}

/// Stops a running step of its session from any thread.
#[derive(Debug, Clone)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the session's current step (or, if none is running, its next one) to stop with
    /// [`Error::Cancelled`]. The step stops at the next layer boundary and leaves the session
    /// at its previous position. [`Session::reset`] clears a pending request.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The state of one sequence being generated: a KV cache and a position, over a shared model.
///
/// A session belongs to one thread at a time (it is `Send`, not shared).
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    ws: Workspace,
    /// Every token in the cache, in order (`history.len()` is the position).
    history: Vec<u32>,
    cancel: Arc<AtomicBool>,
}

impl Session {
    /// Creates a session with its own thread pool.
    pub fn new(model: Arc<Model>, options: &SessionOptions) -> Result<Session> {
        let pool = Arc::new(ThreadPool::new(options.n_threads)?);
        Session::with_pool(model, pool, options.n_ctx, options.ubatch)
    }

    /// Creates a session that runs its steps on `pool` (which several sessions may share;
    /// their steps then take turns).
    pub fn with_pool(
        model: Arc<Model>,
        pool: Arc<ThreadPool>,
        n_ctx: usize,
        ubatch: usize,
    ) -> Result<Session> {
        let max = model.config.max_position_embeddings;
        let n_ctx = if n_ctx == 0 { max } else { n_ctx };
        if n_ctx > max {
            return Err(Error::InvalidArgument(format!(
                "context length {n_ctx} exceeds the model's maximum of {max}"
            )));
        }
        if ubatch == 0 || ubatch > 4096 {
            return Err(Error::InvalidArgument(format!(
                "micro-batch size {ubatch} (must be 1..=4096)"
            )));
        }
        let cache = KvCache::new(&model.config, n_ctx)?;
        let scratch = ForwardScratch::new(
            &model.config,
            n_ctx,
            ubatch.min(n_ctx),
            pool.n_threads(),
            model.has_quantized_weights(),
        )?;
        let mut history = Vec::new();
        history
            .try_reserve_exact(n_ctx)
            .map_err(|_| Error::OutOfMemory(format!("token history of {n_ctx} positions")))?;
        Ok(Session {
            model,
            pool,
            ws: Workspace { cache, scratch },
            history,
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The model this session runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Number of tokens in the cache (the position of the next token).
    pub fn position(&self) -> usize {
        self.history.len()
    }

    /// The tokens in the cache, oldest first.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Context length: the most tokens the session can hold.
    pub fn n_ctx(&self) -> usize {
        self.ws.cache.n_ctx()
    }

    /// Threads each step uses.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// A handle that cancels this session's steps from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.cancel.clone())
    }

    /// The last position's logits from the most recent successful step (zeros before any).
    pub fn logits(&self) -> &[f32] {
        &self.ws.scratch.logits
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to step".into()));
        }
        let vocab = self.model.n_vocab();
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(Error::InvalidArgument(format!(
                "token {t} at index {i} is outside the vocabulary (0..{vocab})"
            )));
        }
        let needed = self.position() + tokens.len();
        if needed > self.n_ctx() {
            return Err(Error::ContextFull {
                needed,
                capacity: self.n_ctx(),
            });
        }
        Ok(())
    }

    fn run(&mut self, tokens: &[u32], wanted: LogitsWanted<'_>) -> Result<()> {
        self.check_tokens(tokens)?;
        let Session {
            model,
            pool,
            ws,
            history,
            cancel,
        } = self;
        let pos0 = history.len();
        pool.install(|par| model.forward(par, ws, tokens, pos0, cancel, wanted))?;
        // Capacity for n_ctx tokens was reserved at creation: this never reallocates.
        history.extend_from_slice(tokens);
        Ok(())
    }

    /// Appends `tokens` and returns the logits of the last one (`n_vocab` values).
    ///
    /// On any error (bad token, full context, cancellation) the position is unchanged and the
    /// session stays usable.
    pub fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.run(tokens, LogitsWanted::Last)?;
        Ok(&self.ws.scratch.logits)
    }

    /// Appends `tokens` and writes the logits of every one of them into `out`
    /// (`tokens.len() * n_vocab` values, row by row), for scoring and perplexity.
    pub fn step_all(&mut self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let needed = tokens.len() * self.model.n_vocab();
        if out.len() < needed {
            return Err(Error::BufferTooSmall { needed });
        }
        self.run(tokens, LogitsWanted::All(&mut out[..needed]))
    }

    /// Truncates the sequence to its first `n_past` tokens (undo, regenerate).
    pub fn rewind(&mut self, n_past: usize) -> Result<()> {
        if n_past > self.position() {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {n_past}: the session holds {} tokens",
                self.position()
            )));
        }
        self.history.truncate(n_past);
        Ok(())
    }

    /// Forgets every token and any pending cancellation.
    pub fn reset(&mut self) {
        self.history.clear();
        self.cancel.store(false, Ordering::Release);
    }
}
