//! Several sessions stepped in one forward pass: their new tokens are the rows of the same
//! micro-batches, so every weight is read once for all of them, while each attends over its
//! own cache.

use std::sync::Arc;
use std::time::Instant;

use super::Session;
use crate::error::{try_zeroed_f32, Error, Result};
use crate::model::{rope_signature, LogitsWanted, Sequence};

impl Session {
    /// Appends `tokens[i]` to `sessions[i]` for every `i` and computes them (and each
    /// session's pending tokens) in one forward pass; each session's [`Session::logits`] are
    /// then its last token's, bitwise what stepping it alone gives. The sessions must use
    /// one model and each must have something to compute (one may take a prompt while the
    /// others take a token each).
    ///
    /// The pass runs on the threads of the session with the largest context. Every input is
    /// checked first: an error names its session ([`Error::InBatch`]) and nothing is
    /// stepped; a cancellation of any session cancels the pass and leaves every session as
    /// it was. Unlike [`Session::step`], a batched step allocates (its list of sessions and
    /// `sessions.len() * n_vocab` logits).
    pub fn step_batch(sessions: &mut [&mut Session], tokens: &[&[u32]]) -> Result<()> {
        if sessions.len() != tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} sessions but {} token lists",
                sessions.len(),
                tokens.len()
            )));
        }
        let Some(first) = sessions.first() else {
            return Err(Error::InvalidArgument("a batch of no sessions".into()));
        };
        if sessions.len() > crate::defaults::MAX_BATCH {
            return Err(Error::InvalidArgument(format!(
                "a batch of {} sessions (at most {})",
                sessions.len(),
                crate::defaults::MAX_BATCH
            )));
        }
        let model = first.model.clone();
        // The pass uses the scratch and threads of the session with the largest context, so
        // its attention buffers and RoPE tables cover every session.
        let host = (0..sessions.len())
            .rev()
            .max_by_key(|&i| sessions[i].n_ctx())
            .unwrap_or(0);
        let signature = rope_signature(&model.config, sessions[host].n_ctx());
        for (i, (s, t)) in sessions.iter().zip(tokens).enumerate() {
            let check = || {
                if !Arc::ptr_eq(&s.model, &model) {
                    return Err(Error::InvalidArgument(
                        "its model is not the first session's".into(),
                    ));
                }
                s.check_tokens(t)?;
                if s.n_pending() + t.len() == 0 {
                    return Err(Error::InvalidArgument("no tokens to step".into()));
                }
                if rope_signature(&model.config, s.n_ctx()) != signature {
                    return Err(Error::InvalidArgument(format!(
                        "its context of {} positions gives it other RoPE factors than the \
                         batch's {} (this model's rotations depend on the context length)",
                        s.n_ctx(),
                        sessions[host].n_ctx()
                    )));
                }
                Ok(())
            };
            check().map_err(|e| e.in_batch(i))?;
        }

        let vocab = model.n_vocab();
        let mut logits = try_zeroed_f32(sessions.len() * vocab, "batch logits")?;
        let before: Vec<usize> = sessions.iter().map(|s| s.history.len()).collect();
        let calls: Vec<_> = sessions.iter().map(|s| s.call()).collect();
        let started = Instant::now();
        let pool = sessions[host].pool.clone();
        let mut scratch = None;
        let mut sequences = Vec::with_capacity(sessions.len());
        for (i, (s, t)) in sessions.iter_mut().zip(tokens).enumerate() {
            // Capacity for n_ctx tokens was reserved at creation: this never reallocates.
            s.history.extend_from_slice(t);
            let Session {
                ws,
                history,
                computed,
                ..
            } = &mut **s;
            if let Some(capture) = &mut ws.capture {
                capture.begin_step(*computed, history.len());
            }
            if i == host {
                scratch = Some(&mut ws.scratch);
            }
            sequences.push(Sequence {
                cache: &mut ws.cache,
                capture: &mut ws.capture,
                tokens: &history[*computed..],
                pos0: *computed,
            });
        }
        let scratch = scratch.expect("the host is one of the sessions");
        let cancelled = |_done: usize| calls.iter().any(|c| c.cancelled());
        let result = pool.install(|par| {
            model.forward_sequences(
                par,
                scratch,
                &mut sequences,
                &cancelled,
                LogitsWanted::LastOfEach { out: &mut logits },
            )
        });
        drop(sequences);
        let outermost: Vec<bool> = calls.iter().map(|c| c.outermost).collect();
        drop(calls);
        let seconds = started.elapsed().as_secs_f64();
        for (i, s) in sessions.iter_mut().enumerate() {
            match &result {
                Ok(()) => {
                    s.ws.scratch
                        .logits
                        .copy_from_slice(&logits[i * vocab..(i + 1) * vocab]);
                    s.step_succeeded(seconds, outermost[i], true);
                }
                Err(_) => s.history.truncate(before[i]),
            }
            s.shared.set_position(s.history.len());
        }
        result
    }
}
