//! The weights of a model, arranged as its forward pass uses them: projections, norms,
//! feed-forward networks and blocks.

use std::ops::Range;

use crate::kernels;
use crate::kernels::quant::QuantActs;
use crate::tensor::{DType, Tensor};
use crate::threading::Par;

/// A weight matrix applied to activations, with an optional bias.
#[derive(Debug)]
pub(crate) struct Projection {
    /// The weights, in one of two layouts.
    pub(crate) weight: ProjectionWeight,
    /// Added to every output row when present.
    pub(crate) bias: Option<Vec<f32>>,
}

#[derive(Debug)]
pub(crate) enum ProjectionWeight {
    /// `[n_out, n_in]`, as `torch.nn.Linear` stores it (or rows of a fused matrix).
    Linear(Tensor),
    /// Columns `cols` of an `[n_in, n_total]` matrix, as GPT-2's `Conv1D` stores it.
    InOut { weight: Tensor, cols: Range<usize> },
}

impl Projection {
    /// A Linear projection.
    pub(crate) fn linear(weight: Tensor, bias: Option<Tensor>) -> Projection {
        Projection {
            weight: ProjectionWeight::Linear(weight),
            bias: bias.map(|b| crate::kernels::to_f32_vec(&b)),
        }
    }

    /// `y[t] = W x[t] + b` for `n_tok` rows of `x`; `act` holds quantized activations.
    pub(crate) fn forward(
        &self,
        par: Par,
        x: &[f32],
        n_tok: usize,
        y: &mut [f32],
        act: &mut QuantActs,
    ) {
        match &self.weight {
            ProjectionWeight::Linear(w) => kernels::matmul_with(par, w, x, n_tok, y, act),
            ProjectionWeight::InOut { weight, cols } => {
                kernels::matmul_in_out_cols(par, weight, cols.clone(), x, n_tok, y)
            }
        }
        if let Some(bias) = &self.bias {
            kernels::add_bias(&mut y[..n_tok * bias.len()], bias);
        }
    }

    /// The weights' element type.
    pub(crate) fn dtype(&self) -> DType {
        match &self.weight {
            ProjectionWeight::Linear(w) | ProjectionWeight::InOut { weight: w, .. } => w.dtype(),
        }
    }

    /// Bytes of weights one product reads.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.weight {
            ProjectionWeight::Linear(w) => w.bytes().len(),
            ProjectionWeight::InOut { weight, cols } => {
                weight.shape()[0] * cols.len() * weight.dtype().block_bytes()
            }
        }
    }
}

/// A normalisation layer's parameters (RMSNorm when `bias` is `None`, else LayerNorm).
#[derive(Debug)]
pub(crate) struct Norm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Option<Vec<f32>>,
    pub(crate) eps: f32,
}

impl Norm {
    /// Normalises one row.
    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        match &self.bias {
            None => kernels::rms_norm(x, &self.weight, self.eps, out),
            Some(bias) => kernels::layer_norm(x, &self.weight, bias, self.eps, out),
        }
    }

    /// RMS-normalises each `weight.len()`-wide piece of `row` (each head's queries or keys)
    /// in place.
    pub(crate) fn apply_per_head(&self, row: &mut [f32]) {
        debug_assert!(self.bias.is_none(), "per-head norms are RMSNorms");
        for head in row.chunks_exact_mut(self.weight.len()) {
            kernels::rms_norm_in_place(head, &self.weight, self.eps);
        }
    }
}

/// The feed-forward part of a block.
#[derive(Debug)]
pub(crate) enum FeedForward {
    /// `down(act(gate(x)) * up(x))` (SwiGLU, GeGLU).
    Gated {
        gate: Projection, // [intermediate, hidden]
        up: Projection,   // [intermediate, hidden]
        down: Projection, // [hidden, intermediate]
    },
    /// `proj(act(fc(x)))` (GPT-2).
    Plain {
        fc: Projection,   // [hidden -> intermediate]
        proj: Projection, // [intermediate -> hidden]
    },
}

/// One Transformer block.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) attn_norm: Norm,
    pub(crate) q: Projection, // [n_heads * head_dim, hidden]
    pub(crate) k: Projection, // [n_kv_heads * head_dim, hidden]
    pub(crate) v: Projection, // [n_kv_heads * head_dim, hidden]
    pub(crate) o: Projection, // [hidden, n_heads * head_dim]
    /// Per-head norms of queries and keys (`[head_dim]` each).
    pub(crate) q_norm: Option<Norm>,
    pub(crate) k_norm: Option<Norm>,
    /// Applied to the attention output before the residual add.
    pub(crate) post_attn_norm: Option<Norm>,
    pub(crate) ffn_norm: Norm,
    pub(crate) ffn: FeedForward,
    /// Applied to the feed-forward output before the residual add.
    pub(crate) post_ffn_norm: Option<Norm>,
}

impl Block {
    /// Every projection of the block.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &Projection> {
        let ffn: Vec<&Projection> = match &self.ffn {
            FeedForward::Gated { gate, up, down } => vec![gate, up, down],
            FeedForward::Plain { fc, proj } => vec![fc, proj],
        };
        [&self.q, &self.k, &self.v, &self.o].into_iter().chain(ffn)
    }

    /// Every norm of the block.
    pub(crate) fn norms(&self) -> impl Iterator<Item = &Norm> {
        [&self.attn_norm, &self.ffn_norm]
            .into_iter()
            .chain(self.q_norm.as_ref())
            .chain(self.k_norm.as_ref())
            .chain(self.post_attn_norm.as_ref())
            .chain(self.post_ffn_norm.as_ref())
    }

    /// Every projection of the block, for replacing their weights.
    pub(crate) fn projections_mut(&mut self) -> Vec<&mut Projection> {
        let Block {
            q, k, v, o, ffn, ..
        } = self;
        let mut all: Vec<&mut Projection> = vec![q, k, v, o];
        match ffn {
            FeedForward::Gated { gate, up, down } => all.extend([gate, up, down]),
            FeedForward::Plain { fc, proj } => all.extend([fc, proj]),
        }
        all
    }
}
