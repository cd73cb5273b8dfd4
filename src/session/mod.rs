//! A session: one conversation's KV cache and position over a shared model.
//!
//! A session holds a sequence of tokens. Most of them have their keys and values in the cache
//! ("computed"); the last few may be *pending*: held, counted by [`Session::position`], but
//! computed only by the next step. Generation leaves its last sampled token pending, so the
//! session holds every token whose text was delivered without paying a forward pass that may
//! never be needed.
//!
//! `state.rs` saves and restores a session's tokens and cache, and copies them between
//! sessions (fork).

mod batch;
mod embed;
mod state;
pub(crate) mod together;

pub use together::CombinedSteps;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{
    AttentionCapture, AttentionRows, AttentionSelection, ForwardScratch, KvCache, KvType,
    LogitsWanted, Model, Workspace,
};
use crate::threading::ThreadPool;

/// How to create a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context length in tokens; 0 means the model's trained context, capped at
    /// [`crate::defaults::CONTEXT_CAP`].
    pub n_ctx: usize,
    /// Threads used by each step (1 runs everything on the calling thread), used as given.
    pub n_threads: usize,
    /// Tokens per micro-batch when processing a prompt.
    pub ubatch: usize,
    /// Element type of the KV cache (default f32: what the transformers-parity tests check;
    /// f16 halves the cache's memory).
    pub kv_type: KvType,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 0,
            n_threads: crate::defaults::threads(0),
            ubatch: crate::defaults::UBATCH,
            kv_type: KvType::default(),
        }
    }
}

/// Tokens computed and the time they took, over some span of a session's work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerfCounts {
    /// Prompt tokens computed: a generation's prompt, or the tokens of a step of more than
    /// one token.
    pub prompt_tokens: u64,
    /// Seconds spent computing them.
    pub prompt_seconds: f64,
    /// Tokens generated: sampled by a generation, or stepped one at a time by the host.
    pub generated_tokens: u64,
    /// Seconds spent generating them (forward passes and sampling).
    pub generation_seconds: f64,
}

impl PerfCounts {
    fn add(&mut self, other: &PerfCounts) {
        self.prompt_tokens += other.prompt_tokens;
        self.prompt_seconds += other.prompt_seconds;
        self.generated_tokens += other.generated_tokens;
        self.generation_seconds += other.generation_seconds;
    }
}

/// What a session has computed: in its last call (a step or a whole generation) and since it
/// was created.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Perf {
    /// The most recent call that computed something.
    pub last: PerfCounts,
    /// Every call since the session was created (not cleared by reset).
    pub total: PerfCounts,
}

/// What a session shares with the threads that watch or cancel it: everything here may be
/// read or written from any thread at any time, without a lock.
#[derive(Debug)]
pub(crate) struct SessionShared {
    /// Tokens the session holds; during a step it advances as micro-batches complete.
    position: AtomicUsize,
    /// The context length (fixed at creation).
    n_ctx: usize,
    /// The id of the call running on the session, 0 when none is.
    running: AtomicU64,
    /// The id of the call a cancellation was asked for (0: none).
    cancelled: AtomicU64,
    /// The id the next call takes.
    next_call: AtomicU64,
}

impl SessionShared {
    /// True when the call `call` has been asked to stop.
    pub(crate) fn is_cancelled(&self, call: u64) -> bool {
        call != 0 && self.cancelled.load(Ordering::Acquire) == call
    }

    /// Asks the call `call` to stop, if it is the one running (once it has ended, nothing
    /// happens: a later call is never reached).
    pub(crate) fn cancel_call(&self, call: u64) {
        if call != 0 && self.running.load(Ordering::Acquire) == call {
            self.cancelled.store(call, Ordering::Release);
        }
    }

    /// Publishes the number of tokens held.
    pub(crate) fn set_position(&self, position: usize) {
        self.position.store(position, Ordering::Release);
    }

    /// Tokens held, as last published.
    pub(crate) fn position(&self) -> usize {
        self.position.load(Ordering::Acquire)
    }

    /// The context length.
    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }
}

/// Stops the call running on its session, from any thread.
#[derive(Debug, Clone)]
pub struct CancelHandle(Arc<SessionShared>);

impl CancelHandle {
    /// Asks the call running on the session (a step, or a whole generation) to stop: a step
    /// returns [`Error::Cancelled`] at the next layer boundary and leaves the session as it
    /// was; a generation stops with [`crate::StopReason::Cancelled`]. With no call running
    /// this does nothing: a cancellation never reaches a later call.
    pub fn cancel(&self) {
        let running = self.0.running.load(Ordering::Acquire);
        if running != 0 {
            self.0.cancelled.store(running, Ordering::Release);
        }
    }

    /// Tokens the session holds, readable while another thread uses the session (it advances
    /// during a long prompt as micro-batches complete).
    pub fn position(&self) -> usize {
        self.0.position()
    }
}

/// Which logits a step produced (what [`LogitsWanted`] asked for, without its buffer).
enum WantedKind {
    Last,
    All,
}

/// The state of one sequence being generated: a KV cache and a position, over a shared model.
///
/// A session belongs to one thread at a time (it is `Send`, not shared); [`CancelHandle`]
/// reaches it from others.
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    ws: Workspace,
    /// Every token the session holds, in order (`history.len()` is the position); capacity
    /// for `n_ctx` tokens is reserved at creation, so appending never allocates.
    history: Vec<u32>,
    /// `history[..computed]` have their keys and values in the cache; the rest are pending.
    computed: usize,
    /// The scratch's logits are those of the last held token (false after a rewind, before
    /// any step, or after a step that wrote them elsewhere).
    logits_current: bool,
    perf: Perf,
    shared: Arc<SessionShared>,
}

/// Marks a call running on a session for [`CancelHandle::cancel`]; nested calls (the steps of
/// a generation) belong to the outermost one.
pub(crate) struct CallScope {
    shared: Arc<SessionShared>,
    id: u64,
    /// False for the steps inside a generation.
    pub(crate) outermost: bool,
}

impl CallScope {
    /// The call's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// True when this call has been asked to stop.
    pub(crate) fn cancelled(&self) -> bool {
        self.shared.is_cancelled(self.id)
    }
}

impl Drop for CallScope {
    fn drop(&mut self) {
        if self.outermost {
            self.shared.running.store(0, Ordering::Release);
        }
    }
}

impl Session {
    /// Creates a session with its own thread pool.
    pub fn new(model: Arc<Model>, options: &SessionOptions) -> Result<Session> {
        let pool = Arc::new(ThreadPool::new(options.n_threads)?);
        Session::with_pool(model, pool, options)
    }

    /// The context length a session of `model` gets for a requested `n_ctx`, checked, and
    /// its micro-batch size checked.
    fn checked_sizes(model: &Model, n_ctx: usize, ubatch: usize) -> Result<(usize, usize)> {
        let max = model.config.max_position_embeddings;
        let n_ctx = crate::defaults::context(n_ctx, max);
        if n_ctx > max {
            return Err(Error::InvalidArgument(format!(
                "context length {n_ctx} exceeds the model's maximum of {max}"
            )));
        }
        if ubatch == 0 || ubatch > crate::defaults::MAX_UBATCH {
            return Err(Error::InvalidArgument(format!(
                "micro-batch size {ubatch} (must be 1..={})",
                crate::defaults::MAX_UBATCH
            )));
        }
        Ok((n_ctx, ubatch.min(n_ctx)))
    }

    /// Bytes of memory a session of `model` with `options` allocates (its KV cache, the
    /// buffers of one micro-batch and its token history), computed without allocating; the
    /// model's weights are not included.
    pub fn memory_estimate(model: &Model, options: &SessionOptions) -> Result<usize> {
        let (n_ctx, ubatch) = Session::checked_sizes(model, options.n_ctx, options.ubatch)?;
        let threads = options.n_threads;
        let cache = KvCache::bytes_for(&model.config, n_ctx, options.kv_type)
            .ok_or_else(|| Error::OutOfMemory("KV cache size overflows".into()))?;
        let scratch = ForwardScratch::bytes_for(
            &model.config,
            n_ctx,
            ubatch,
            threads,
            model.has_quantized_weights(),
        );
        Ok(cache + scratch + n_ctx * std::mem::size_of::<u32>())
    }

    /// Bytes of memory the session holds (what [`Session::memory_estimate`] predicts).
    pub fn memory_bytes(&self) -> usize {
        self.ws.cache.heap_bytes()
            + self.ws.scratch.heap_bytes()
            + self.ws.capture.as_ref().map_or(0, |c| c.heap_bytes())
            + self.history.capacity() * std::mem::size_of::<u32>()
    }

    /// Creates a session that runs its steps on `pool` (which several sessions may share;
    /// their steps then take turns, and generations running at once step together:
    /// `together.rs`); `options.n_threads` is not used (the pool's count is).
    pub fn with_pool(
        model: Arc<Model>,
        pool: Arc<ThreadPool>,
        options: &SessionOptions,
    ) -> Result<Session> {
        let (n_ctx, ubatch) = Session::checked_sizes(&model, options.n_ctx, options.ubatch)?;
        let cache = KvCache::new(&model.config, n_ctx, options.kv_type)?;
        let scratch = ForwardScratch::new(
            &model.config,
            n_ctx,
            ubatch,
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
            ws: Workspace {
                cache,
                scratch,
                capture: None,
            },
            history,
            computed: 0,
            logits_current: false,
            perf: Perf::default(),
            shared: Arc::new(SessionShared {
                position: AtomicUsize::new(0),
                n_ctx,
                running: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                next_call: AtomicU64::new(1),
            }),
        })
    }

    /// The model this session runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Number of tokens the session holds, pending ones included (the position of the next
    /// token).
    pub fn position(&self) -> usize {
        self.history.len()
    }

    /// The tokens the session holds, oldest first.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Number of held tokens not yet computed (they are computed by the next step).
    pub fn n_pending(&self) -> usize {
        self.history.len() - self.computed
    }

    /// Context length: the most tokens the session can hold.
    pub fn n_ctx(&self) -> usize {
        self.ws.cache.n_ctx()
    }

    /// Tokens per micro-batch when processing a prompt.
    pub fn ubatch(&self) -> usize {
        self.ws.scratch.ubatch()
    }

    /// Element type of the KV cache.
    pub fn kv_type(&self) -> KvType {
        self.ws.cache.kv_type()
    }

    /// The options this session was made with (its thread count is the pool's).
    pub fn options(&self) -> SessionOptions {
        SessionOptions {
            n_ctx: self.n_ctx(),
            n_threads: self.n_threads(),
            ubatch: self.ubatch(),
            kv_type: self.kv_type(),
        }
    }

    /// The thread pool the session computes on (shared with the sessions made on it).
    pub fn pool(&self) -> &Arc<ThreadPool> {
        &self.pool
    }

    /// Threads each step uses.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// A handle that cancels this session's calls from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.shared.clone())
    }

    /// The state other threads may read at any time (position, context, cancellation).
    pub(crate) fn shared(&self) -> &Arc<SessionShared> {
        &self.shared
    }

    /// Starts a call (or joins the one running: the steps of a generation are one call).
    pub(crate) fn call(&self) -> CallScope {
        let shared = self.shared.clone();
        let running = shared.running.load(Ordering::Acquire);
        if running != 0 {
            return CallScope {
                shared,
                id: running,
                outermost: false,
            };
        }
        let id = shared.next_call.fetch_add(1, Ordering::AcqRel);
        shared.running.store(id, Ordering::Release);
        CallScope {
            shared,
            id,
            outermost: true,
        }
    }

    /// The last position's logits from the most recent successful step (zeros before any).
    pub fn logits(&self) -> &[f32] {
        &self.ws.scratch.logits
    }

    /// The logits of the last token the session holds, when they are at hand: after a step
    /// (not [`Session::step_all`]), a fork or a loaded state of a computed session; `None`
    /// when the last token is pending or the session was rewound.
    pub fn current_logits(&self) -> Option<&[f32]> {
        (self.logits_current && self.computed == self.history.len() && self.computed > 0)
            .then_some(&self.ws.scratch.logits[..])
    }

    /// Tokens computed and time taken, by the last call and in total.
    pub fn perf(&self) -> Perf {
        self.perf
    }

    /// Records the work of a call.
    pub(crate) fn record_perf(&mut self, counts: PerfCounts) {
        self.perf.last = counts;
        self.perf.total.add(&counts);
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
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

    /// Appends `tokens` and computes every pending token; on failure the session is as before.
    fn run(&mut self, tokens: &[u32], wanted: LogitsWanted<'_>) -> Result<()> {
        let wanted_kind = match wanted {
            LogitsWanted::Last => WantedKind::Last,
            LogitsWanted::All { .. }
            | LogitsWanted::LastOfEach { .. }
            | LogitsWanted::LastHidden
            | LogitsWanted::MeanHidden => WantedKind::All,
        };
        self.check_tokens(tokens)?;
        if self.n_pending() + tokens.len() == 0 {
            return Err(Error::InvalidArgument("no tokens to step".into()));
        }
        let before = self.history.len();
        // Capacity for n_ctx tokens was reserved at creation: this never reallocates.
        self.history.extend_from_slice(tokens);
        let call = self.call();
        let outermost = call.outermost;
        let started = Instant::now();
        let Session {
            model,
            pool,
            ws,
            history,
            computed,
            shared,
            ..
        } = self;
        let pos0 = *computed;
        if let Some(capture) = &mut ws.capture {
            capture.begin_step(pos0, history.len());
        }
        let result = pool.install(|par| {
            model.forward(
                par,
                ws,
                &history[pos0..],
                pos0,
                &|done| {
                    shared.set_position(before.max(pos0 + done));
                    call.cancelled()
                },
                wanted,
            )
        });
        drop(call);
        match result {
            Ok(()) => {
                let seconds = started.elapsed().as_secs_f64();
                self.step_succeeded(seconds, outermost, matches!(wanted_kind, WantedKind::Last));
            }
            Err(_) => self.history.truncate(before),
        }
        self.shared.set_position(self.history.len());
        result
    }

    /// Marks every held token computed after a step that took `seconds`, and records its
    /// work (when it was a call of its own, not a step of a generation).
    fn step_succeeded(&mut self, seconds: f64, outermost: bool, logits_current: bool) {
        let n = (self.history.len() - self.computed) as u64;
        self.computed = self.history.len();
        if let Some(capture) = &mut self.ws.capture {
            capture.finish_step();
        }
        self.logits_current = logits_current;
        if outermost {
            self.record_perf(if n == 1 {
                PerfCounts {
                    generated_tokens: 1,
                    generation_seconds: seconds,
                    ..Default::default()
                }
            } else {
                PerfCounts {
                    prompt_tokens: n,
                    prompt_seconds: seconds,
                    ..Default::default()
                }
            });
        }
    }

    /// Appends `tokens` and returns the logits of the last token the session then holds
    /// (`n_vocab` values); pending tokens are computed first. `tokens` may be empty when
    /// tokens are pending.
    ///
    /// On any error (bad token, full context, cancellation) the session is unchanged and
    /// stays usable.
    pub fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.run(tokens, LogitsWanted::Last)?;
        Ok(&self.ws.scratch.logits)
    }

    /// Computes the pending tokens as `step(&[])` does, in one pass with the other
    /// generations waiting on this session's pool (`together.rs`): a generation's step.
    pub(crate) fn step_together(&mut self) -> Result<()> {
        let pool = self.pool.clone();
        pool.steps.step(self)
    }

    /// Appends `tokens` and writes the logits of every one of them into `out`
    /// (`tokens.len() * n_vocab` values, row by row), for scoring and perplexity. Pending
    /// tokens are computed first (their logits are not written).
    pub fn step_all(&mut self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let needed = tokens.len() * self.model.n_vocab();
        if out.len() < needed {
            return Err(Error::BufferTooSmall { needed });
        }
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to step".into()));
        }
        let skip = self.n_pending();
        self.run(
            tokens,
            LogitsWanted::All {
                out: &mut out[..needed],
                skip,
            },
        )
    }

    /// Appends `token` without computing it: it is held (and counted by the position) and
    /// computed by the next step.
    pub fn push_pending(&mut self, token: u32) -> Result<()> {
        self.check_tokens(&[token])?;
        self.history.push(token);
        self.logits_current = false;
        self.shared.set_position(self.history.len());
        Ok(())
    }

    /// Truncates the sequence to its first `n_past` tokens (undo, regenerate).
    pub fn rewind(&mut self, n_past: usize) -> Result<()> {
        if n_past > self.position() {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {n_past}: the session holds {} tokens",
                self.position()
            )));
        }
        if n_past < self.history.len() {
            self.logits_current = false;
        }
        if n_past < self.computed {
            self.forget_attention();
        }
        self.history.truncate(n_past);
        self.computed = self.computed.min(n_past);
        self.shared.set_position(n_past);
        Ok(())
    }

    /// Forgets every token.
    pub fn reset(&mut self) {
        self.forget_attention();
        self.history.clear();
        self.computed = 0;
        self.logits_current = false;
        self.shared.set_position(0);
    }

    /// Chooses the attention weights the following steps keep (`None` stops keeping them and
    /// frees the buffer): for the chosen layers and query heads, the softmax weights of each
    /// step's last `max_queries` tokens over every position they see. The buffer is allocated
    /// here, once; returns its size in bytes (what [`Session::memory_bytes`] then adds).
    pub fn capture_attention(&mut self, selection: Option<&AttentionSelection>) -> Result<usize> {
        let Some(selection) = selection else {
            self.ws.capture = None;
            return Ok(0);
        };
        let c = &self.model.config;
        // The old buffer goes first, so the two never need memory at once.
        self.ws.capture = None;
        let capture = AttentionCapture::new(selection, c.layers.len(), c.n_heads, self.n_ctx())?;
        let bytes = capture.heap_bytes();
        self.ws.capture = Some(capture);
        Ok(bytes)
    }

    /// Bytes a capture of `selection` would take in a session of `n_ctx` positions of `model`
    /// (the selection checked), without allocating.
    pub fn attention_capture_bytes(
        model: &Model,
        n_ctx: usize,
        selection: &AttentionSelection,
    ) -> Result<usize> {
        let c = &model.config;
        AttentionCapture::bytes_for(selection, c.layers.len(), c.n_heads, n_ctx)
    }

    /// The capture chosen, with every layer and head listed (`None` when off).
    pub fn attention_selection(&self) -> Option<&AttentionSelection> {
        self.ws.capture.as_ref().map(|c| c.selection())
    }

    /// The attention weights of `layer`'s query head `head` from the last successful step,
    /// `[n_queries, n_positions]`: the step's last tokens (up to the capture's
    /// `max_queries`) over every position then held; each row sums to 1 and is 0 where the
    /// query does not look. Fails when the pair is not captured or no step has been since
    /// the capture was chosen (or since a rewind before it, a reset or a loaded state).
    pub fn attention(&self, layer: usize, head: usize) -> Result<AttentionRows<'_>> {
        self.ws
            .capture
            .as_ref()
            .ok_or_else(|| {
                Error::InvalidArgument("attention capture is off for this session".into())
            })?
            .rows(layer, head)
    }

    /// Forgets captured rows that no longer describe the session's tokens.
    pub(crate) fn forget_attention(&mut self) {
        if let Some(capture) = &mut self.ws.capture {
            capture.invalidate();
        }
    }
}
