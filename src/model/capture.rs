//! Opt-in capture of attention probabilities: for chosen layers and heads, the softmax
//! weights each of a step's last few query tokens gives every position it can see.
//!
//! The buffer is allocated when the capture is chosen (its size is stated then) and a step
//! only writes into it; a session without a capture pays one branch per attention row.

use crate::error::{try_zeroed_f32, Error, Result};

/// What to capture: which layers and heads, and how many of a step's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttentionSelection {
    /// Layers to capture (indices from 0); empty means every layer.
    pub layers: Vec<usize>,
    /// Query heads to capture (indices from 0); empty means every head.
    pub heads: Vec<usize>,
    /// Rows kept per step: the weights of its last `max_queries` tokens (at least 1).
    pub max_queries: usize,
}

/// The attention weights of one (layer, head) from the last step, `[n_queries, n_positions]`
/// row by row: row `i` is the query at position `n_positions - n_queries + i`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionRows<'a> {
    data: &'a [f32],
    stride: usize,
    /// Query tokens (rows).
    pub n_queries: usize,
    /// Positions each row covers: every token the session held after the step.
    pub n_positions: usize,
}

impl<'a> AttentionRows<'a> {
    /// Row `i`: the weights over positions `0..n_positions` (0 where the query does not look:
    /// later positions, and positions outside a sliding window).
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.n_positions]
    }

    /// Copies the rows into `out` (`n_queries * n_positions` floats, row by row).
    pub fn copy_to(&self, out: &mut [f32]) {
        for (i, dst) in out
            .chunks_exact_mut(self.n_positions)
            .take(self.n_queries)
            .enumerate()
        {
            dst.copy_from_slice(self.row(i));
        }
    }
}

/// A session's attention capture: the selection and a buffer of
/// `[n_layers_chosen, n_heads_chosen, max_queries, n_ctx]` weights.
#[derive(Debug)]
pub(crate) struct AttentionCapture {
    selection: AttentionSelection,
    /// Slot of each model layer in the buffer (`None`: not captured).
    layer_slot: Vec<Option<usize>>,
    /// Slot of each query head in the buffer.
    head_slot: Vec<Option<usize>>,
    n_ctx: usize,
    data: Vec<f32>,
    /// Position of the first captured query of the step being computed or last computed.
    first_query: usize,
    /// Positions held at the end of that step.
    n_positions: usize,
    /// The rows hold a successful step's weights.
    valid: bool,
}

impl AttentionCapture {
    /// Bytes a capture of `selection` takes for a model of `n_layers` layers and `n_heads`
    /// heads in a session of `n_ctx` positions (the selection checked).
    pub(crate) fn bytes_for(
        selection: &AttentionSelection,
        n_layers: usize,
        n_heads: usize,
        n_ctx: usize,
    ) -> Result<usize> {
        let (layers, heads) = (
            chosen(&selection.layers, n_layers, "layer")?,
            chosen(&selection.heads, n_heads, "head")?,
        );
        if selection.max_queries == 0 {
            return Err(Error::InvalidArgument(
                "an attention capture keeps at least one query row".into(),
            ));
        }
        layers
            .len()
            .checked_mul(heads.len())
            .and_then(|n| n.checked_mul(selection.max_queries.min(n_ctx)))
            .and_then(|n| n.checked_mul(n_ctx))
            .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
            .ok_or_else(|| Error::OutOfMemory("attention capture size overflows".into()))
    }

    /// Allocates a capture of `selection` (checked as [`AttentionCapture::bytes_for`] does).
    pub(crate) fn new(
        selection: &AttentionSelection,
        n_layers: usize,
        n_heads: usize,
        n_ctx: usize,
    ) -> Result<AttentionCapture> {
        let bytes = AttentionCapture::bytes_for(selection, n_layers, n_heads, n_ctx)?;
        let slots = |picked: Vec<usize>, n: usize| {
            let mut slot = vec![None; n];
            for (i, &p) in picked.iter().enumerate() {
                slot[p] = Some(i);
            }
            slot
        };
        let layers = chosen(&selection.layers, n_layers, "layer")?;
        let heads = chosen(&selection.heads, n_heads, "head")?;
        let mut selection = selection.clone();
        selection.max_queries = selection.max_queries.min(n_ctx);
        selection.layers = layers.clone();
        selection.heads = heads.clone();
        Ok(AttentionCapture {
            data: try_zeroed_f32(bytes / std::mem::size_of::<f32>(), "attention capture")?,
            layer_slot: slots(layers, n_layers),
            head_slot: slots(heads, n_heads),
            selection,
            n_ctx,
            first_query: 0,
            n_positions: 0,
            valid: false,
        })
    }

    /// The selection, with every layer and head listed.
    pub(crate) fn selection(&self) -> &AttentionSelection {
        &self.selection
    }

    /// Bytes of memory the capture holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<f32>()
    }

    /// Prepares for a step computing positions `pos0..end`: its last `max_queries` queries are
    /// kept. The rows are invalid until [`AttentionCapture::finish_step`].
    pub(crate) fn begin_step(&mut self, pos0: usize, end: usize) {
        self.first_query = pos0.max(end.saturating_sub(self.selection.max_queries));
        self.n_positions = end;
        self.valid = false;
    }

    /// Marks the rows as those of a step that succeeded.
    pub(crate) fn finish_step(&mut self) {
        self.valid = true;
    }

    /// Forgets the rows (the session was rewound or reset past them).
    pub(crate) fn invalidate(&mut self) {
        self.valid = false;
    }

    /// The writer of one layer's rows, or `None` when the layer is not captured.
    pub(crate) fn layer_writer(&mut self, layer: usize) -> Option<LayerRows<'_>> {
        let slot = self.layer_slot[layer]?;
        let per_layer = self.selection.heads.len() * self.selection.max_queries * self.n_ctx;
        Some(LayerRows {
            data: crate::threading::DisjointSlice::new(
                &mut self.data[slot * per_layer..(slot + 1) * per_layer],
            ),
            head_slot: &self.head_slot,
            max_queries: self.selection.max_queries,
            n_ctx: self.n_ctx,
            first_query: self.first_query,
            n_positions: self.n_positions,
        })
    }

    /// The rows of `(layer, head)` from the last successful step.
    pub(crate) fn rows(&self, layer: usize, head: usize) -> Result<AttentionRows<'_>> {
        let (Some(Some(l)), Some(Some(h))) = (self.layer_slot.get(layer), self.head_slot.get(head))
        else {
            return Err(Error::InvalidArgument(format!(
                "layer {layer}, head {head} is not in the attention capture"
            )));
        };
        if !self.valid {
            return Err(Error::InvalidArgument(
                "no step has been captured since the capture was chosen (or the session was \
                 rewound)"
                    .into(),
            ));
        }
        let rows = self.selection.max_queries * self.n_ctx;
        let start = (l * self.selection.heads.len() + h) * rows;
        Ok(AttentionRows {
            data: &self.data[start..start + rows],
            stride: self.n_ctx,
            n_queries: self.n_positions - self.first_query,
            n_positions: self.n_positions,
        })
    }
}

/// The indices `picked` (every one of `0..n` when empty), checked, sorted and deduplicated.
fn chosen(picked: &[usize], n: usize, what: &str) -> Result<Vec<usize>> {
    if let Some(&bad) = picked.iter().find(|&&p| p >= n) {
        return Err(Error::InvalidArgument(format!(
            "{what} {bad} does not exist (the model has {n})"
        )));
    }
    let mut v: Vec<usize> = if picked.is_empty() {
        (0..n).collect()
    } else {
        picked.to_vec()
    };
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Where the attention of one layer writes the captured rows (parallel tasks write the rows
/// of different (token, head) pairs).
pub(crate) struct LayerRows<'a> {
    data: crate::threading::DisjointSlice<'a, f32>, // [heads chosen, max_queries, n_ctx]
    head_slot: &'a [Option<usize>],
    max_queries: usize,
    n_ctx: usize,
    first_query: usize,
    n_positions: usize,
}

impl LayerRows<'_> {
    /// Records the weights `probs` that the query of `head` at position `pos` gives positions
    /// `first..=pos`; every other position of the row gets 0.
    ///
    /// # Safety
    /// No other thread may record the same `(pos, head)` at the same time.
    pub(crate) unsafe fn record(&self, pos: usize, head: usize, first: usize, probs: &[f32]) {
        let Some(slot) = self.head_slot[head] else {
            return;
        };
        if pos < self.first_query || pos >= self.n_positions {
            return;
        }
        let start = (slot * self.max_queries + pos - self.first_query) * self.n_ctx;
        // SAFETY: the row belongs to (pos, head) alone (the caller's contract), and lies
        // within the layer's buffer: slot < heads chosen, pos - first_query < max_queries
        // (begin_step keeps at most max_queries), n_positions <= n_ctx.
        let row = unsafe { self.data.range_mut(start..start + self.n_positions) };
        row[..first].fill(0.0);
        row[first..=pos].copy_from_slice(probs);
        row[pos + 1..].fill(0.0);
    }
}
