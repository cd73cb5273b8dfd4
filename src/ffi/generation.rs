//! Generation in the background: a handle that generates on a thread of its own while the
//! host polls for text from its frame loop, never blocking and never called back.

use std::ffi::c_char;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::generate::{options, report};
use super::tokenizer::{chat_messages, conversation_json};
use super::{
    borrow, ember_chat_message, ember_generate_params, ember_sampler, ember_session, ember_status,
    ember_stop_reason, read_params, run, slice, text, token_ids, write_out, Lease,
};
use crate::constraint::Constraint;
use crate::error::{Error, Result};
use crate::generate::{
    chat_tokens, check_tool_sampler, conversation_tokens, GenerateOptions, Generation, Generator,
    StopReason,
};
use crate::sampler::Sampler;
use crate::session::{Session, SessionShared};

/// What to generate from (`ember_generation_start`): set `struct_size = sizeof` and one of
/// text, tokens, messages or conversation (a zeroed struct with all of them empty continues
/// after the tokens a generation left pending). Read during `ember_generation_start` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ember_generation_prompt {
    /// Size of this struct in bytes, as the caller knows it.
    pub struct_size: u32,
    /// UTF-8 text appended to what the session holds (tokenized as `ember_generate` does,
    /// with `params.add_special` and `params.parse_special`).
    pub text: *const c_char,
    /// Bytes of `text`.
    pub text_len: usize,
    /// Token ids appended to what the session holds.
    pub tokens: *const i32,
    /// Number of `tokens`.
    pub n_tokens: usize,
    /// A whole conversation: the chat template is applied and the assistant's reply
    /// generated, as `ember_chat` does.
    pub messages: *const ember_chat_message,
    /// Number of `messages`.
    pub n_messages: usize,
    /// A whole conversation as JSON (as `ember_chat_json` takes it: tools, tool calls and
    /// results, `tool_choice`, template variables), instead of `messages`; read when
    /// `conversation_len` is not 0. (Added after
    /// `n_messages`: a smaller struct has none.)
    pub conversation: *const c_char,
    /// Bytes of `conversation`.
    pub conversation_len: usize,
}

const PROMPT_EMPTY: ember_generation_prompt = ember_generation_prompt {
    struct_size: 0,
    text: std::ptr::null(),
    text_len: 0,
    tokens: std::ptr::null(),
    n_tokens: 0,
    messages: std::ptr::null(),
    n_messages: 0,
    conversation: std::ptr::null(),
    conversation_len: 0,
};

/// Where a background generation is (`ember_generation_poll`, `ember_generation_wait`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ember_generation_state {
    /// Still generating, or text remains to be polled.
    EMBER_GENERATION_RUNNING = 0,
    /// It has ended and all its text has been polled: call `ember_generation_finish`.
    EMBER_GENERATION_FINISHED = 1,
}

/// One generated token (`ember_generation_poll_tokens`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ember_token_info {
    /// The token id.
    pub token: i32,
    /// Its log-probability under the model's distribution; NaN unless
    /// `ember_generate_params.logprobs` was set.
    pub logprob: f32,
}

/// What the worker hands over; the lock is held only to append or take, never while the
/// model computes or the host runs.
#[derive(Default)]
struct Outbox {
    text: String,
    /// Pieces generated since the host last polled (text or tokens).
    pieces: usize,
    /// `ember_generation_finish` is waiting: the worker must not pause.
    closing: bool,
    tokens: Vec<ember_token_info>,
    /// `top` alternatives per entry of `tokens`, best first (padded with token -1, logprob
    /// -inf where the vocabulary has fewer).
    alternatives: Vec<ember_token_info>,
    /// Alternatives per token (`ember_generate_params.top_logprobs`).
    top: usize,
    /// Set when the worker has ended: the outcome of the generation.
    ended: Option<Result<Generation>>,
}

struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled when text arrives or the generation ends.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn state_of(outbox: &Outbox) -> ember_generation_state {
    if outbox.ended.is_some() && outbox.text.is_empty() {
        ember_generation_state::EMBER_GENERATION_FINISHED
    } else {
        ember_generation_state::EMBER_GENERATION_RUNNING
    }
}

/// A generation running in the background on a session (`ember_generation_start`). Its
/// functions may be called from any thread; `ember_generation_finish` ends it and frees it.
pub struct ember_generation {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The session's shared state, to cancel this generation's call (and no other).
    cancel: Arc<SessionShared>,
    /// The id of the generation's call.
    call_id: u64,
    session: Arc<SessionShared>,
    /// The session's position before the prompt, and the prompt's length in tokens.
    prompt: (usize, usize),
}

/// The prompt, checked and tokenized on the host's thread: the session is rewound to `keep`
/// tokens (a conversation's earlier turns it holds), then `ids` are appended.
struct Input {
    keep: usize,
    ids: Vec<u32>,
    /// The constraint of a conversation's tool calls (the sampler has none of its own).
    constraint: Option<Constraint>,
}

/// Starts generating on `session` with `sampler` from `prompt` (NULL: continue after pending
/// tokens), with `params` as `ember_generate` takes them (NULL: defaults), on a thread of
/// its own, and returns at once with a handle in `*out`. Poll text with
/// `ember_generation_poll` (from the game loop: it never blocks), stop with
/// `ember_generation_cancel`, and end with `ember_generation_finish`, which frees the handle.
///
/// The prompt is checked and tokenized before this returns (errors are reported here: bad
/// UTF-8, bad tokens, a template that fails). From then until `ember_generation_finish`, the
/// session and the sampler belong to the generation: other calls on them get
/// `EMBER_ERR_BUSY` (the lock-free session functions still work), and neither may be freed.
/// The session ends as `ember_generate` leaves it.
///
/// # Safety
/// `session` and `sampler` live handles that outlive the generation handle; `prompt` NULL or
/// a prompt struct with valid pointers; `params` NULL or a params struct; `out` valid for
/// writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_start(
    session: *mut ember_session,
    sampler: *mut ember_sampler,
    prompt: *const ember_generation_prompt,
    params: *const ember_generate_params,
    out: *mut *mut ember_generation,
) -> ember_status {
    run(|| {
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        // SAFETY: the caller's contract for each pointer.
        let (session, sampler, (p, options)) = unsafe {
            (
                borrow(session, "session")?,
                borrow(sampler, "sampler")?,
                options(params)?,
            )
        };
        // SAFETY: the caller's contract.
        let q = unsafe { read_params(prompt, PROMPT_EMPTY, "prompt") }?;
        let kinds = [
            q.text_len > 0,
            q.n_tokens > 0,
            q.n_messages > 0,
            q.conversation_len > 0,
        ];
        if kinds.iter().filter(|&&k| k).count() > 1 {
            return Err(Error::InvalidArgument(
                "prompt: give text, tokens, messages or a conversation, not several".into(),
            ));
        }
        // SAFETY: the caller's contract: the session outlives the generation.
        let mut lease = unsafe { session.session.lease() }?;
        let model = lease.with(|s| Ok(s.model().clone()))?;
        let input = if q.conversation_len > 0 {
            // SAFETY: the caller's contract for the conversation.
            let conversation = unsafe { conversation_json(q.conversation, q.conversation_len) }?;
            let (keep, ids, constraint) =
                lease.with(|s| conversation_tokens(s, &conversation, options.parse_special))?;
            Input {
                keep,
                ids: ids[keep..].to_vec(),
                constraint,
            }
        } else if q.n_messages > 0 {
            // SAFETY: the caller's contract for the messages.
            let messages = unsafe { chat_messages(q.messages, q.n_messages) }?;
            let (keep, ids) = lease.with(|s| chat_tokens(s, &messages, options.parse_special))?;
            Input {
                keep,
                ids: ids[keep..].to_vec(),
                constraint: None,
            }
        } else {
            let ids = if q.n_tokens > 0 {
                // SAFETY: the caller's contract for the tokens.
                token_ids(unsafe { slice(q.tokens, q.n_tokens, "prompt.tokens") }?)?
            } else {
                // SAFETY: the caller's contract for the text.
                let prompt = unsafe { text(q.text, q.text_len, "prompt.text") }?;
                if prompt.is_empty() {
                    Vec::new()
                } else {
                    model
                        .tokenizer()?
                        .encode(prompt, p.add_special != 0, p.parse_special != 0)?
                }
            };
            Input {
                keep: session.shared.position(),
                ids,
                constraint: None,
            }
        };
        let (before, total) = (input.keep, input.ids.len());
        // What the first step would refuse, refused here where the host hears of it.
        let vocab = model.n_vocab();
        if let Some((i, t)) = input
            .ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(Error::InvalidArgument(format!(
                "token {t} at index {i} is outside the vocabulary (0..{vocab})"
            )));
        }
        let capacity = session.shared.n_ctx();
        if before + total > capacity {
            return Err(Error::ContextFull {
                needed: before + total,
                capacity,
            });
        }
        // SAFETY: the caller's contract: the sampler outlives the generation.
        let mut sampler_lease = unsafe { sampler.sampler.lease() }?;
        sampler_lease.with(|s| check_tool_sampler(s, &input.constraint))?;
        // The call begins now, so that a cancel made as soon as this returns stops it.
        let call = lease.with(|s| Ok(s.call()))?;
        let call_id = call.id();
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox {
                top: options.top_logprobs,
                ..Outbox::default()
            }),
            changed: Condvar::new(),
        });
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("ember-generation".into())
            .spawn(move || {
                let (mut lease, mut sampler_lease) = (lease, sampler_lease);
                let result = crate::error::catch_quietly(|| {
                    let limit = p.max_ahead as usize;
                    let ahead = Ahead {
                        shared: &worker_shared,
                        limit,
                        call: &call,
                    };
                    generate_into(&ahead, &mut lease, &mut sampler_lease, input, &options)
                })
                .unwrap_or_else(|panic| Err(Error::Internal(panic)));
                // The call ends before the session is given back, so that no later call on
                // the session can join this one (and its cancellation).
                drop(call);
                drop((lease, sampler_lease));
                worker_shared.lock().ended = Some(result);
                worker_shared.changed.notify_all();
            })
            .map_err(|e| Error::OutOfMemory(format!("a generation thread: {e}")))?;
        let handle = Box::new(ember_generation {
            shared,
            worker: Some(worker),
            cancel: session.shared.clone(),
            call_id,
            session: session.shared.clone(),
            prompt: (before, total),
        });
        // SAFETY: out checked non-NULL above.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// How far the worker may run ahead of the host's polls.
struct Ahead<'a> {
    shared: &'a Shared,
    /// Most pieces waiting to be polled (0: no limit).
    limit: usize,
    call: &'a crate::session::CallScope,
}

impl Ahead<'_> {
    /// Waits while `limit` pieces wait to be polled, unless the generation is cancelled.
    fn pause(&self) {
        if self.limit == 0 {
            return;
        }
        let mut outbox = self.shared.lock();
        while outbox.pieces >= self.limit && !outbox.closing && !self.call.cancelled() {
            // A poll wakes it; a cancel is seen within the timeout.
            outbox = self
                .shared
                .changed
                .wait_timeout(outbox, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The worker's body: generates, appending each piece to the outbox.
fn generate_into(
    ahead: &Ahead<'_>,
    session: &mut Lease<Session>,
    sampler: &mut Lease<Sampler>,
    input: Input,
    options: &GenerateOptions,
) -> Result<Generation> {
    sampler.with(|sampler| {
        session.with(|s| {
            s.rewind(input.keep)?;
            let mut g = Generator::new(s, sampler, &input.ids, options)?;
            if let Some(c) = input.constraint {
                g.follow_tool_constraint(c);
            }
            let shared = ahead.shared;
            while let Some(piece) = g.next_piece()? {
                let mut outbox = shared.lock();
                outbox.pieces += 1;
                outbox.text.push_str(&piece.text);
                if let Some(token) = piece.token {
                    outbox.tokens.push(ember_token_info {
                        token: token as i32,
                        logprob: piece.logprob,
                    });
                    let top = outbox.top;
                    let padding = ember_token_info {
                        token: -1,
                        logprob: f32::NEG_INFINITY,
                    };
                    let alternatives = piece.top_logprobs.iter().map(|&(t, lp)| ember_token_info {
                        token: t as i32,
                        logprob: lp,
                    });
                    let padded = alternatives.chain(std::iter::repeat(padding)).take(top);
                    outbox.alternatives.extend(padded);
                }
                drop(outbox);
                shared.changed.notify_all();
                ahead.pause();
            }
            Ok(g.finish())
        })
    })
}

/// Borrows a generation handle.
///
/// # Safety
/// `generation` NULL or a live handle.
unsafe fn generation<'a>(generation: *const ember_generation) -> Result<&'a ember_generation> {
    // SAFETY: forwarded contract.
    unsafe { borrow(generation, "generation") }
}

/// Checks a poll's outputs: `n_out` always, `out` when it has room.
fn check_outputs<T>(out: *mut T, cap: usize, n_out: *mut usize) -> Result<()> {
    if n_out.is_null() {
        return Err(Error::InvalidArgument("n_out is NULL".into()));
    }
    if out.is_null() && cap > 0 {
        return Err(Error::InvalidArgument("out is NULL".into()));
    }
    Ok(())
}

/// Copies the text generated since the last poll into `out` (at most `cap - 1` bytes, whole
/// characters, then a NUL) and writes its length to `*n_out`; what does not fit stays for
/// the next poll. `*state` (may be NULL) says whether the generation is still running (or has
/// text left) or has finished. Never blocks on the generation (it takes a lock the worker
/// holds only to append text), so it can be called every frame. `out` may be NULL with `cap`
/// 0 to read the state only.
///
/// # Safety
/// `generation` a live handle; `out` valid for `cap` bytes; `n_out` valid for writing;
/// `state` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_poll(
    generation: *mut ember_generation,
    out: *mut c_char,
    cap: usize,
    n_out: *mut usize,
    state: *mut ember_generation_state,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let g = unsafe { self::generation(generation) }?;
        check_outputs(out, cap, n_out)?;
        let mut outbox = g.shared.lock();
        let mut n = outbox.text.len().min(cap.saturating_sub(1));
        while !outbox.text.is_char_boundary(n) {
            n -= 1;
        }
        if cap > 0 {
            // SAFETY: out holds cap > n bytes (the caller's contract); the text is Ember's.
            unsafe {
                std::ptr::copy_nonoverlapping(outbox.text.as_ptr(), out.cast::<u8>(), n);
                out.add(n).write(0);
            }
        }
        outbox.text.drain(..n);
        outbox.pieces = 0;
        let now = state_of(&outbox);
        drop(outbox);
        g.shared.changed.notify_all();
        // SAFETY: n_out checked non-NULL; state NULL or valid (the caller's contract).
        unsafe {
            n_out.write(n);
            if let Some(s) = state.as_mut() {
                *s = now;
            }
        }
        Ok(())
    })
}

/// Copies the tokens generated since the last call (ids and, with
/// `ember_generate_params.logprobs`, log-probabilities), oldest first, into `out[0..cap]`
/// and writes their number to `*n_out`; tokens that do not fit stay for the next call. Never
/// blocks, like `ember_generation_poll`. Their alternatives (`top_logprobs`) are dropped:
/// `ember_generation_poll_tokens_top` reads both.
///
/// # Safety
/// `generation` a live handle; `out` valid for `cap` entries; `n_out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_poll_tokens(
    generation: *mut ember_generation,
    out: *mut ember_token_info,
    cap: usize,
    n_out: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract (no alternatives are written).
    unsafe { poll_tokens(generation, out, cap, None, n_out) }
}

/// `ember_generation_poll_tokens`, and for each token copied, its
/// `ember_generate_params.top_logprobs` (k) most likely alternatives, best first, into
/// `top[i * k..(i + 1) * k]` for token i (padded with token -1 and logprob -INFINITY where
/// the vocabulary has fewer than k tokens). At most `top_cap / k` tokens are copied; with
/// k = 0 `top` is not used and may be NULL.
///
/// # Safety
/// `generation` a live handle; `out` valid for `cap` entries; `top` valid for `top_cap`
/// entries (or NULL when k = 0); `n_out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_poll_tokens_top(
    generation: *mut ember_generation,
    out: *mut ember_token_info,
    cap: usize,
    top: *mut ember_token_info,
    top_cap: usize,
    n_out: *mut usize,
) -> ember_status {
    // SAFETY: forwarded contract.
    unsafe { poll_tokens(generation, out, cap, Some((top, top_cap)), n_out) }
}

/// The body of both token polls: `top` is where alternatives go (`None` drops them).
///
/// # Safety
/// As `ember_generation_poll_tokens_top`.
unsafe fn poll_tokens(
    generation: *mut ember_generation,
    out: *mut ember_token_info,
    cap: usize,
    top: Option<(*mut ember_token_info, usize)>,
    n_out: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let g = unsafe { self::generation(generation) }?;
        check_outputs(out, cap, n_out)?;
        if top.is_some_and(|(top, top_cap)| top.is_null() && top_cap > 0) {
            return Err(Error::InvalidArgument("top is NULL".into()));
        }
        let mut outbox = g.shared.lock();
        let k = outbox.top;
        let mut n = outbox.tokens.len().min(cap);
        if let (Some((_, top_cap)), true) = (top, k > 0) {
            n = n.min(top_cap / k);
        }
        for (i, info) in outbox.tokens.drain(..n).enumerate() {
            // SAFETY: out holds cap >= n entries (the caller's contract).
            unsafe { out.add(i).write(info) };
        }
        for (i, info) in outbox.alternatives.drain(..n * k).enumerate() {
            if let Some((top, _)) = top {
                // SAFETY: top holds top_cap >= n * k entries (the caller's contract; k > 0
                // here, so top_cap > 0 and top is not NULL).
                unsafe { top.add(i).write(info) };
            }
        }
        outbox.pieces = 0;
        drop(outbox);
        g.shared.changed.notify_all();
        // SAFETY: n_out checked non-NULL.
        unsafe { n_out.write(n) };
        Ok(())
    })
}

/// Waits until text is ready to poll, the generation has ended, or `timeout_ms`
/// milliseconds have passed, and writes the state (as `ember_generation_poll` would) to
/// `*state` (may be NULL). For a worker thread of the host that prefers waiting to polling.
///
/// # Safety
/// `generation` a live handle; `state` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_wait(
    generation: *mut ember_generation,
    timeout_ms: u32,
    state: *mut ember_generation_state,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let g = unsafe { self::generation(generation) }?;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms as u64);
        let mut outbox = g.shared.lock();
        while outbox.text.is_empty() && outbox.ended.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            outbox = g
                .shared
                .changed
                .wait_timeout(outbox, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let now = state_of(&outbox);
        drop(outbox);
        // SAFETY: state NULL or valid (the caller's contract).
        if let Some(s) = unsafe { state.as_mut() } {
            *s = now;
        }
        Ok(())
    })
}

/// Writes how much of the prompt has been computed: `*done` of `*total` tokens (a progress
/// bar for a long prompt; `done == total` once generation proper has begun). Never blocks.
///
/// # Safety
/// `generation` a live handle; `done` and `total` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_progress(
    generation: *const ember_generation,
    done: *mut usize,
    total: *mut usize,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let g = unsafe { self::generation(generation) }?;
        let (before, n) = g.prompt;
        let ended = g.shared.lock().ended.is_some();
        let computed = g.session.position().saturating_sub(before).min(n);
        let value = if ended { n } else { computed };
        if done.is_null() || total.is_null() {
            return Err(Error::InvalidArgument("done or total is NULL".into()));
        }
        // SAFETY: the caller's contract.
        unsafe {
            write_out(total, n, "total")?;
            write_out(done, value, "done")
        }
    })
}

/// Asks the generation to stop (from any thread, at any time): it ends with
/// `EMBER_STOP_REASON_CANCELLED` within about one layer's time, keeping the tokens it
/// delivered. Poll the rest of its text, then `ember_generation_finish`.
///
/// # Safety
/// `generation` a live handle.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_cancel(
    generation: *const ember_generation,
) -> ember_status {
    run(|| {
        // SAFETY: the caller's contract.
        let g = unsafe { self::generation(generation) }?;
        g.cancel.cancel_call(g.call_id);
        g.shared.changed.notify_all();
        Ok(())
    })
}

/// Ends a generation: waits for it if it is still running (`ember_generation_cancel` first to
/// stop it early), writes its stop reason and token count (each output may be NULL), frees
/// the handle (text not polled is dropped) and gives the session and sampler back. Returns
/// the generation's status: `EMBER_OK`, `EMBER_ERR_CANCELLED` (with the outputs written, as
/// `ember_generate` does), or the error that ended it. NULL is `EMBER_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `generation` NULL or a handle from `ember_generation_start`, not yet finished; no other
/// thread may be using it. Outputs NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn ember_generation_finish(
    generation: *mut ember_generation,
    out_reason: *mut ember_stop_reason,
    out_n_tokens: *mut usize,
) -> ember_status {
    run(|| {
        if generation.is_null() {
            return Err(Error::InvalidArgument("generation is NULL".into()));
        }
        // SAFETY: the caller's contract: a handle from ember_generation_start, now ours.
        let mut handle = unsafe { Box::from_raw(generation) };
        // A worker paused ahead of the polls goes on to the end.
        handle.shared.lock().closing = true;
        handle.shared.changed.notify_all();
        if let Some(worker) = handle.worker.take() {
            // The worker catches its own panics; a failed join leaves `ended` unset.
            let _ = worker.join();
        }
        let ended = handle.shared.lock().ended.take();
        let result =
            ended.unwrap_or_else(|| Err(Error::Internal("the generation thread failed".into())))?;
        report(result, out_reason, out_n_tokens);
        if result.reason == StopReason::Cancelled {
            return Err(Error::Cancelled);
        }
        Ok(())
    })
}

impl Drop for ember_generation {
    fn drop(&mut self) {
        // Only reached through ember_generation_finish, which joined the worker; a worker
        // still here (a panic between) is stopped and joined so nothing outlives the handle.
        if let Some(worker) = self.worker.take() {
            self.cancel.cancel_call(self.call_id);
            self.shared.lock().closing = true;
            self.shared.changed.notify_all();
            let _ = worker.join();
        }
    }
}
