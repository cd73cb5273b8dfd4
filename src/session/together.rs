//! Generations on a shared thread pool step together: a generation's next forward pass
//! waits in the pool's [`StepQueue`], and whoever finds no pass under way computes every
//! waiting session of its model in one [`Session::step_batch`]. So N characters generating
//! at once on one pool (each with its own thread, sampler and stop conditions, as
//! `ember_generation_start` or `ember_generate` from several threads run them) read the
//! weights about once per round instead of N times, and each gets bitwise the tokens it
//! would get alone (a batched step gives each session exactly its own step's logits).
//!
//! A round is gathered briefly: every session generating on the pool ([`StepQueue::join`])
//! that could share the pass (same model and RoPE factors) and is driven by another thread
//! is expected (it may be sampling its next token), and the pass waits for those not yet
//! waiting up to [`crate::defaults::STEP_GATHER`]. One that misses that wait (its host paused
//! it, or reads its pieces slowly) is no longer expected until it next asks for a step, so a
//! paused generation delays the others once, not at every pass. A session that stops
//! generating leaves ([`StepQueue::leave`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Instant;

use super::Session;
use crate::error::{Error, Result};
use crate::model::rope_signature;

/// Which sessions can share a pass: the model's address and the RoPE factors of the
/// session's context length ([`rope_signature`]).
type Class = (usize, u64);

/// The class of `session`.
fn class_of(session: &Session) -> Class {
    (
        Arc::as_ptr(&session.model) as usize,
        rope_signature(&session.model.config, session.n_ctx()),
    )
}

/// A session waiting for its next pass.
struct Waiting {
    /// Which session this is (its address, stable while its generation waits).
    key: usize,
    /// Which sessions it can share a pass with.
    class: Class,
    /// The session, exclusively borrowed by the waiting thread, which does not touch it
    /// until `outcome` is set.
    session: *mut Session,
    /// Set by the pass that computed it.
    outcome: Option<Result<()>>,
    /// Taken by a pass under way.
    taken: bool,
}

/// A session generating on the pool.
struct Member {
    /// Its address.
    key: usize,
    /// Which sessions it can share a pass with.
    class: Class,
    /// The thread that last asked for its step: a pass led by that thread does not wait for
    /// it (one thread alternating between generations steps one at a time).
    thread: ThreadId,
    /// Whether a pass waits for it: false once it missed a pass's wait, until it asks for a
    /// step again.
    expected: bool,
}

#[derive(Default)]
struct QueueState {
    waiting: Vec<Waiting>,
    /// A thread is gathering or running a pass.
    pass_under_way: bool,
    members: Vec<Member>,
    counts: CombinedSteps,
}

// SAFETY: the raw session pointers are only dereferenced by the thread running a pass, while
// each pointer's owner is blocked in `StepQueue::step` waiting for the outcome (see there);
// `Session` itself is `Send`.
unsafe impl Send for QueueState {}

impl QueueState {
    /// Whether session `key` waits for a pass and none has taken it.
    fn is_waiting(&self, key: usize) -> bool {
        (self.waiting.iter()).any(|w| w.key == key && !w.taken && w.outcome.is_none())
    }
}

/// Passes run by a pool's generations and the generation steps they carried
/// ([`crate::ThreadPool::combined_steps`]): `steps / passes` sessions per pass on average.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CombinedSteps {
    /// Forward passes run.
    pub passes: u64,
    /// Generation steps (one session's next token each) they computed.
    pub steps: u64,
    /// Passes that waited the whole gather time for a generation that did not ask for its
    /// step (paused by its host); each such generation is then not waited for until it does.
    pub missed: u64,
}

/// The generation steps waiting on one thread pool; see the module documentation.
#[derive(Default)]
pub(crate) struct StepQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl StepQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the pool's generations have run so far.
    pub(crate) fn counts(&self) -> CombinedSteps {
        self.lock().counts
    }

    /// `session` starts generating: passes wait briefly for its steps.
    pub(crate) fn join(&self, session: &Session) {
        let key = session as *const Session as usize;
        let class = class_of(session);
        let mut state = self.lock();
        if !state.members.iter().any(|m| m.key == key) {
            state.members.push(Member {
                key,
                class,
                thread: std::thread::current().id(),
                expected: true,
            });
        }
    }

    /// `session` stops generating: passes no longer wait for it.
    pub(crate) fn leave(&self, session: &Session) {
        let key = session as *const Session as usize;
        let mut state = self.lock();
        if let Some(i) = state.members.iter().position(|m| m.key == key) {
            state.members.swap_remove(i);
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Computes `session`'s pending tokens (as `session.step(&[])` does, with its outcome),
    /// together with the other sessions of its model waiting on this pool.
    pub(crate) fn step(&self, session: &mut Session) -> Result<()> {
        let key = session as *mut Session as usize;
        let class = class_of(session);
        let me = std::thread::current().id();
        let mut state = self.lock();
        state.waiting.push(Waiting {
            key,
            class,
            session,
            outcome: None,
            taken: false,
        });
        if let Some(member) = state.members.iter_mut().find(|m| m.key == key) {
            member.expected = true;
            member.thread = me;
        }
        self.changed.notify_all();
        loop {
            let mine = state
                .waiting
                .iter()
                .position(|w| w.key == key)
                .expect("a waiting session stays listed until it takes its outcome");
            if let Some(outcome) = state.waiting[mine].outcome.take() {
                state.waiting.swap_remove(mine);
                return outcome;
            }
            if state.pass_under_way || state.waiting[mine].taken {
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.pass_under_way = true;
            state = self.gather(state, class, me);
            let batch = take_batch(&mut state, key, class);
            drop(state);
            // SAFETY: every pointer in `batch` belongs to a thread blocked in this function
            // until its `outcome` is set below (only this thread took them: `taken`), and the
            // pointers are distinct sessions (a session waits once: its thread is blocked).
            let mut sessions: Vec<&mut Session> =
                batch.iter().map(|&(_, s)| unsafe { &mut *s }).collect();
            let outcomes =
                crate::error::catch_quietly(|| run_pass(&mut sessions)).unwrap_or_else(|panic| {
                    (0..sessions.len())
                        .map(|_| Err(Error::Internal(panic.clone())))
                        .collect()
                });
            drop(sessions);
            state = self.lock();
            state.counts.passes += 1;
            state.counts.steps += batch.len() as u64;
            for ((k, _), outcome) in batch.iter().zip(outcomes) {
                if let Some(w) = state.waiting.iter_mut().find(|w| w.key == *k) {
                    w.outcome = Some(outcome);
                }
            }
            state.pass_under_way = false;
            self.changed.notify_all();
        }
    }

    /// Waits (up to [`crate::defaults::STEP_GATHER`]) until every generating session of
    /// `class` waits for its step, so that the sessions generating together share one pass.
    /// Sessions whose last step was asked for by `leader` (this thread) are not waited for.
    fn gather<'a>(
        &'a self,
        mut state: MutexGuard<'a, QueueState>,
        class: Class,
        leader: ThreadId,
    ) -> MutexGuard<'a, QueueState> {
        let deadline = Instant::now() + crate::defaults::STEP_GATHER;
        let awaited = |m: &Member| m.class == class && m.thread != leader && m.expected;
        let ready = |state: &QueueState| {
            let full = (state.waiting.iter())
                .filter(|w| w.class == class && !w.taken && w.outcome.is_none())
                .count()
                >= crate::defaults::MAX_BATCH;
            full || (state.members.iter())
                .filter(|m| awaited(m))
                .all(|m| state.is_waiting(m.key))
        };
        while !ready(&state) {
            let now = Instant::now();
            if now >= deadline {
                // Those still missing are not waited for again until they ask for a step.
                let missing: Vec<usize> = (state.members.iter())
                    .filter(|m| awaited(m) && !state.is_waiting(m.key))
                    .map(|m| m.key)
                    .collect();
                for member in state.members.iter_mut() {
                    if missing.contains(&member.key) {
                        member.expected = false;
                    }
                }
                state.counts.missed += 1;
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state
    }
}

/// Marks and returns the session `leader` and the waiting sessions of its `class` (at most
/// [`crate::defaults::MAX_BATCH`] in all), the leader first.
fn take_batch(state: &mut QueueState, leader: usize, class: Class) -> Vec<(usize, *mut Session)> {
    let mut batch = Vec::new();
    for w in state.waiting.iter_mut() {
        if w.key == leader {
            w.taken = true;
            batch.insert(0, (w.key, w.session));
        }
    }
    for w in state.waiting.iter_mut() {
        if batch.len() == crate::defaults::MAX_BATCH {
            break;
        }
        if !w.taken && w.outcome.is_none() && w.class == class {
            w.taken = true;
            batch.push((w.key, w.session));
        }
    }
    batch
}

/// Steps every session's pending tokens in one pass; returns each one's outcome. A session
/// whose input fails, or whose call is cancelled, gets its error and the others are stepped
/// again without it; when the pass fails as a whole, each session is stepped alone.
fn run_pass(sessions: &mut [&mut Session]) -> Vec<Result<()>> {
    let mut outcomes: Vec<Option<Result<()>>> = (0..sessions.len()).map(|_| None).collect();
    let mut due: Vec<usize> = (0..sessions.len()).collect();
    while !due.is_empty() {
        let result = if let [only] = due[..] {
            sessions[only].step(&[]).map(|_| ())
        } else {
            let mut members: Vec<&mut Session> = sessions
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| due.contains(i))
                .map(|(_, s)| &mut **s)
                .collect();
            let tokens = vec![&[][..]; members.len()];
            Session::step_batch(&mut members, &tokens)
        };
        let failed: Vec<(usize, Error)> = match result {
            Ok(()) => {
                for &i in &due {
                    outcomes[i] = Some(Ok(()));
                }
                break;
            }
            Err(Error::InBatch { index, source }) if due.len() > 1 => vec![(due[index], *source)],
            Err(Error::Cancelled)
                if due.len() > 1 && due.iter().any(|&i| sessions[i].call().cancelled()) =>
            {
                (due.iter())
                    .filter(|&&i| sessions[i].call().cancelled())
                    .map(|&i| (i, Error::Cancelled))
                    .collect()
            }
            Err(e) if due.len() == 1 => vec![(due[0], e)],
            Err(_) => {
                // A failure of the pass as a whole (memory for the batch, say): each alone.
                for &i in &due {
                    outcomes[i] = Some(sessions[i].step(&[]).map(|_| ()));
                }
                break;
            }
        };
        for (i, e) in failed {
            due.retain(|&d| d != i);
            outcomes[i] = Some(Err(e));
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::Internal("a session of a pass was lost".into()))))
        .collect()
}
