//! Embeddings: the final hidden state of a text, pooled over its tokens, for comparing texts
//! by meaning (an NPC's memories against a question) without logits.

use super::Session;
use crate::error::{Error, Result};
use crate::model::{LogitsWanted, Pooling};

impl Session {
    /// Appends `tokens` and writes their embedding into `out` (at least
    /// [`crate::Model::n_embd`] floats): the final hidden state after the final norm (what
    /// the output matrix would read) of the last of them, or the mean over all of them, as
    /// `pooling` says; with `normalize`, scaled to unit length (so a dot product is the
    /// cosine similarity). Pending tokens are computed first but are not pooled; earlier
    /// tokens condition the states through attention, so [`Session::reset`] first to embed a
    /// text on its own.
    ///
    /// No logits are computed: [`Session::current_logits`] is `None` until the next step.
    /// `out` is written only on success; on any error the session holds the same tokens
    /// (pending ones may have been computed).
    pub fn embed(
        &mut self,
        tokens: &[u32],
        pooling: Pooling,
        normalize: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let n_embd = self.model.n_embd();
        if out.len() < n_embd {
            return Err(Error::BufferTooSmall { needed: n_embd });
        }
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to embed".into()));
        }
        if self.n_pending() > 0 {
            // Computed by a pass of their own (no logits needed), so that the next pools
            // `tokens` alone.
            self.run(&[], LogitsWanted::LastHidden)?;
        }
        let wanted = match pooling {
            Pooling::Last => LogitsWanted::LastHidden,
            Pooling::Mean => LogitsWanted::MeanHidden,
        };
        self.run(tokens, wanted)?;
        let out = &mut out[..n_embd];
        out.copy_from_slice(&self.ws.scratch.embedding);
        if normalize {
            let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                out.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok(())
    }
}
