//! The forward pass: tokens in, logits out, keys and values appended to the cache.
//!
//! Prompts are processed in micro-batches of up to `ubatch` tokens, so every weight matrix is
//! read once per micro-batch (matrix-matrix work). All buffers are allocated when the session
//! is created; a decode step allocates nothing.

use super::config::{Activation, LayerKind, ModelConfig, Rope, RopeScaling};
use super::layers::{FeedForward, Norm};
use super::Model;
use crate::error::{try_zeroed_f32, Error, Result};
use crate::kernels;
use crate::kernels::quant::{QuantActs, BLOCK};
use crate::threading::{DisjointSlice, Par};

pub(crate) use super::capture::AttentionCapture;
use super::capture::LayerRows;
pub(crate) use super::kv_cache::KvCache;
use super::kv_cache::{with_planes, KvElement};

/// Activation buffers for one micro-batch, plus the RoPE table and the output logits.
#[derive(Debug)]
pub(crate) struct ForwardScratch {
    ubatch: usize,
    x: Vec<f32>,      // [ubatch, hidden] residual stream
    xn: Vec<f32>,     // [ubatch, hidden] normalised
    q: Vec<f32>,      // [ubatch, n_heads * head_dim]
    k: Vec<f32>,      // [ubatch, kv_dim]
    v: Vec<f32>,      // [ubatch, kv_dim]
    att: Vec<f32>,    // [ubatch, n_heads * head_dim]
    out: Vec<f32>,    // [ubatch, hidden]
    ff_a: Vec<f32>,   // [ubatch, intermediate]
    ff_b: Vec<f32>,   // [ubatch, intermediate]
    scores: Vec<f32>, // [n_threads, n_ctx] attention weights, one row per task
    /// cos/sin tables of the model's RoPE and, where it has one, of its local RoPE (empty
    /// when no layer rotates).
    ropes: Vec<RopeTable>,
    /// `[ubatch, max(hidden, intermediate, q_dim) / 32]` activations quantized for products
    /// with quantized weights (empty when no weight is quantized).
    act: QuantActs,
    /// `[vocab]` logits of the last position computed.
    pub(crate) logits: Vec<f32>,
    /// `[hidden]` the pooled final hidden state of the last pass that asked for one.
    pub(crate) embedding: Vec<f32>,
}

impl ForwardScratch {
    /// Allocates buffers for micro-batches of `ubatch` tokens, `n_ctx` positions and
    /// `n_threads` attention tasks.
    pub(crate) fn new(
        config: &ModelConfig,
        n_ctx: usize,
        ubatch: usize,
        n_threads: usize,
        quantized: bool,
    ) -> Result<ForwardScratch> {
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let buf = |n: usize, what: &str| try_zeroed_f32(ubatch * n, what);
        let mut ropes = Vec::new();
        for rope in scratch_ropes(config) {
            ropes.push(RopeTable::new(rope, n_ctx)?);
        }
        let act = QuantActs::with_capacity(act_blocks(config, ubatch, quantized))?;
        Ok(ForwardScratch {
            ubatch,
            act,
            x: buf(h, "activations")?,
            xn: buf(h, "activations")?,
            q: buf(config.q_dim(), "queries")?,
            k: buf(config.kv_dim(), "keys")?,
            v: buf(config.kv_dim(), "values")?,
            att: buf(config.q_dim(), "attention output")?,
            out: buf(h, "activations")?,
            ff_a: buf(inter, "feed-forward activations")?,
            ff_b: buf(inter, "feed-forward activations")?,
            scores: try_zeroed_f32(n_threads.max(1) * n_ctx, "attention scores")?,
            ropes,
            logits: try_zeroed_f32(config.vocab_size, "logits")?,
            embedding: try_zeroed_f32(h, "embedding")?,
        })
    }

    /// Tokens per micro-batch.
    pub(crate) fn ubatch(&self) -> usize {
        self.ubatch
    }

    /// Bytes [`ForwardScratch::new`] allocates with the same arguments.
    pub(crate) fn bytes_for(
        config: &ModelConfig,
        n_ctx: usize,
        ubatch: usize,
        n_threads: usize,
        quantized: bool,
    ) -> usize {
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let per_token = 3 * h + 2 * config.q_dim() + 2 * config.kv_dim() + 2 * inter;
        let rope: usize = scratch_ropes(config)
            .map(|r| 2 * n_ctx * (r.dims / 2))
            .sum();
        let floats = ubatch * per_token + n_threads.max(1) * n_ctx + rope + config.vocab_size + h;
        floats * std::mem::size_of::<f32>()
            + QuantActs::bytes_for(act_blocks(config, ubatch, quantized))
    }

    /// Bytes of memory the buffers hold.
    pub(crate) fn heap_bytes(&self) -> usize {
        let vecs = [
            &self.x,
            &self.xn,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.out,
            &self.ff_a,
            &self.ff_b,
            &self.scores,
            &self.logits,
            &self.embedding,
        ];
        let floats: usize = vecs.iter().map(|v| v.capacity()).sum::<usize>()
            + self
                .ropes
                .iter()
                .map(|r| r.cos.capacity() + r.sin.capacity())
                .sum::<usize>();
        floats * std::mem::size_of::<f32>() + self.act.heap_bytes()
    }
}

/// A fingerprint of the rotations a session of `n_ctx` positions applies to keys (LongRoPE's
/// factors depend on the context length): cached keys are only valid in a session with the
/// same one.
pub(crate) fn rope_signature(config: &ModelConfig, n_ctx: usize) -> u64 {
    let mut h = crate::checksum::Hash64::default();
    for rope in scratch_ropes(config) {
        let (freqs, factor) = inv_freq(rope, n_ctx);
        for f in freqs.iter().chain(std::iter::once(&factor)) {
            h.update(&f.to_le_bytes());
        }
        h.update_u64(rope.dims as u64);
    }
    h.finish()
}

/// The RoPEs a session needs tables for: the model's and its local one, if any layer rotates.
fn scratch_ropes(config: &ModelConfig) -> impl Iterator<Item = &Rope> {
    let rotates = config.layers.iter().any(|l| l.rope);
    std::iter::once(&config.rope)
        .chain(config.rope_local.as_ref())
        .filter(move |_| rotates)
}

/// Quantized-activation blocks for a micro-batch: `[ubatch, max(hidden, intermediate,
/// q_dim) / 32]`, none when no weight is quantized.
fn act_blocks(config: &ModelConfig, ubatch: usize, quantized: bool) -> usize {
    let widest = config
        .hidden_size
        .max(config.intermediate_size)
        .max(config.q_dim());
    if quantized {
        ubatch * widest.div_ceil(BLOCK)
    } else {
        0
    }
}

/// cos and sin of every position's RoPE angles, `[n_ctx, dims / 2]` each, with LongRoPE's
/// attention factor folded in.
#[derive(Debug)]
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Leading dimensions of a head that rotate.
    dims: usize,
}

impl RopeTable {
    /// The table for `n_ctx` positions. The angle is formed in f32, as transformers does,
    /// then its cosine and sine are taken accurately.
    fn new(rope: &Rope, n_ctx: usize) -> Result<RopeTable> {
        let (inv_freq, factor) = inv_freq(rope, n_ctx);
        let half = inv_freq.len();
        let mut cos = try_zeroed_f32(n_ctx * half, "RoPE table")?;
        let mut sin = try_zeroed_f32(n_ctx * half, "RoPE table")?;
        for pos in 0..n_ctx {
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = (pos as f32 * f) as f64;
                cos[pos * half + i] = angle.cos() as f32 * factor;
                sin[pos * half + i] = angle.sin() as f32 * factor;
            }
        }
        Ok(RopeTable {
            cos,
            sin,
            dims: rope.dims,
        })
    }

    /// Rotates the heads of one row (`head_dim` wide each) for position `pos`.
    fn rotate(&self, row: &mut [f32], head_dim: usize, pos: usize, interleaved: bool) {
        let half = self.dims / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            let rotating = &mut head[..self.dims];
            if interleaved {
                kernels::rope_interleaved(rotating, cos, sin);
            } else {
                kernels::rope(rotating, cos, sin);
            }
        }
    }
}

/// Inverse RoPE frequencies after scaling, and the factor on cos and sin, for a session of
/// `n_ctx` positions (LongRoPE's factors depend on it).
fn inv_freq(rope: &Rope, n_ctx: usize) -> (Vec<f32>, f32) {
    let dims = rope.dims;
    let base = rope.theta as f64;
    let plain = |i: usize| (1.0 / base.powf((2 * i) as f64 / dims as f64)) as f32;
    let mut factor = 1.0;
    let freqs = (0..dims / 2)
        .map(|i| {
            let inv = plain(i);
            match &rope.scaling {
                RopeScaling::None => inv,
                RopeScaling::Linear { factor } => inv / factor,
                RopeScaling::Factors(f) => inv / f[i],
                RopeScaling::LongRope {
                    short,
                    long,
                    original_max,
                    attention_factor,
                } => {
                    factor = *attention_factor;
                    let ext = if n_ctx > *original_max { long } else { short };
                    (1.0 / (ext[i] as f64 * base.powf((2 * i) as f64 / dims as f64))) as f32
                }
                RopeScaling::Llama3(s) => {
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                    if wavelen < high_wavelen {
                        inv
                    } else if wavelen > low_wavelen {
                        inv / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * inv / s.factor + smooth * inv
                    }
                }
            }
        })
        .collect();
    (freqs, factor)
}

/// A session's mutable state for the forward pass: its cache and its buffers.
#[derive(Debug)]
pub(crate) struct Workspace {
    /// Keys and values of past positions.
    pub(crate) cache: KvCache,
    /// Activation buffers and output logits.
    pub(crate) scratch: ForwardScratch,
    /// The attention weights the host asked to see, if any.
    pub(crate) capture: Option<AttentionCapture>,
}

/// How an embedding pools the final hidden states of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The last token's state: with causal attention, the only one that has seen them all.
    Last,
    /// The mean of every token's state.
    Mean,
}

/// Which logits a forward pass must produce.
pub(crate) enum LogitsWanted<'a> {
    /// Only the last token's, into the scratch's `logits` (one sequence).
    Last,
    /// Every token's but the first `skip`, `[n_tokens - skip, vocab]`, into `out` (one
    /// sequence).
    All {
        /// Receives the rows.
        out: &'a mut [f32],
        /// Leading tokens whose logits are not wanted.
        skip: usize,
    },
    /// The last token's of each sequence, `[n_sequences, vocab]`, into `out`.
    LastOfEach {
        /// Receives the rows.
        out: &'a mut [f32],
    },
    /// No logits: the final hidden state (after the final norm) of the last token, into the
    /// scratch's `embedding` (one sequence). A variant without fields, as are the next: a
    /// field read before the variant is known would be an unset byte for every other kind,
    /// which valgrind reports.
    LastHidden,
    /// No logits: the mean of the final hidden states of every token of the pass, into the
    /// scratch's `embedding` (one sequence).
    MeanHidden,
}

/// Called at every layer boundary of a forward pass with the number of tokens completed so
/// far; returns true to stop the pass with [`Error::Cancelled`].
pub(crate) type Progress<'a> = &'a (dyn Fn(usize) -> bool + Sync);

/// One sequence of a forward pass: its cache, its attention capture, and the tokens it adds
/// at positions `pos0..`. Several sequences go through the pass together (their tokens as
/// the rows of the same micro-batches), each attending over its own cache.
pub(crate) struct Sequence<'a> {
    pub(crate) cache: &'a mut KvCache,
    pub(crate) capture: &'a mut Option<AttentionCapture>,
    pub(crate) tokens: &'a [u32],
    pub(crate) pos0: usize,
}

/// The part of a sequence whose tokens are `start..start + len` of the pass that falls in the
/// micro-batch of tokens `chunk_start..chunk_start + n`: `(first row, rows, first token's
/// index in the sequence)`.
fn span(start: usize, len: usize, chunk_start: usize, n: usize) -> Option<(usize, usize, usize)> {
    let (lo, hi) = (start.max(chunk_start), (start + len).min(chunk_start + n));
    (lo < hi).then(|| (lo - chunk_start, hi - lo, lo - start))
}

/// The sequence and position of token `index` of the pass (sequences laid end to end).
fn locate(sequences: &[Sequence<'_>], index: usize) -> (usize, usize) {
    let mut start = 0;
    for (i, seq) in sequences.iter().enumerate() {
        if index < start + seq.tokens.len() {
            return (i, seq.pos0 + index - start);
        }
        start += seq.tokens.len();
    }
    unreachable!("token {index} is beyond the pass's {start} tokens")
}

impl Model {
    /// Runs `tokens` (at positions `pos0..`) through the model, appending their keys and
    /// values to `cache`. Fails with [`Error::Cancelled`] when `progress` says so; the
    /// positions written so far are then simply beyond the session's position.
    pub(crate) fn forward(
        &self,
        par: Par,
        ws: &mut Workspace,
        tokens: &[u32],
        pos0: usize,
        progress: Progress<'_>,
        wanted: LogitsWanted<'_>,
    ) -> Result<()> {
        let Workspace {
            cache,
            scratch,
            capture,
        } = ws;
        let mut sequence = [Sequence {
            cache,
            capture,
            tokens,
            pos0,
        }];
        self.forward_sequences(par, scratch, &mut sequence, progress, wanted)
    }

    /// Runs several sequences through the model in the same micro-batches of `scratch`
    /// (whose context must be at least each sequence's, and whose `par` it was sized for):
    /// every weight is read once per micro-batch, whatever the number of sequences. Each
    /// row's result is what the sequence would get alone (the kernels' rows are independent).
    pub(crate) fn forward_sequences(
        &self,
        par: Par,
        scratch: &mut ForwardScratch,
        sequences: &mut [Sequence<'_>],
        progress: Progress<'_>,
        mut wanted: LogitsWanted<'_>,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        let h = self.config.hidden_size;
        let ubatch = scratch.ubatch;
        let total: usize = sequences.iter().map(|s| s.tokens.len()).sum();
        for first in (0..total).step_by(ubatch) {
            let n = ubatch.min(total - first);
            // Every layer boundary reports the tokens of the chunks before this one as done.
            let at_layer = || progress(first);
            self.forward_chunk(par, scratch, sequences, first, n, &at_layer)?;
            match &mut wanted {
                LogitsWanted::All { out, skip } => {
                    // Rows of this chunk that are wanted: tokens first.max(skip)..first + n.
                    let from = skip.saturating_sub(first).min(n);
                    if from == n {
                        continue;
                    }
                    for t in from..n {
                        self.final_norm.apply(
                            &scratch.x[t * h..(t + 1) * h],
                            &mut scratch.xn[t * h..(t + 1) * h],
                        );
                    }
                    let row0 = first + from - *skip;
                    let out = &mut out[row0 * vocab..(row0 + n - from) * vocab];
                    kernels::matmul_with(
                        par,
                        &self.lm_head,
                        &scratch.xn[from * h..n * h],
                        n - from,
                        out,
                        &mut scratch.act,
                    );
                    self.finish_logits(par, out);
                    if first + n == total {
                        scratch
                            .logits
                            .copy_from_slice(&out[(n - from - 1) * vocab..]);
                    }
                }
                LogitsWanted::Last if first + n == total => {
                    let last = &scratch.x[(n - 1) * h..n * h];
                    self.final_norm.apply(last, &mut scratch.xn[..h]);
                    kernels::matmul_with(
                        par,
                        &self.lm_head,
                        &scratch.xn[..h],
                        1,
                        &mut scratch.logits,
                        &mut scratch.act,
                    );
                    self.finish_logits(par, &mut scratch.logits);
                }
                LogitsWanted::Last => {}
                LogitsWanted::LastOfEach { out } => {
                    // The sequences whose last token is in this chunk (consecutive ones),
                    // their last rows normalised into rows 0.. of `xn`, then one product.
                    let (mut start, mut ending) = (0, None::<(usize, usize)>);
                    for (i, seq) in sequences.iter().enumerate() {
                        let last = start + seq.tokens.len() - 1;
                        start += seq.tokens.len();
                        if !(first..first + n).contains(&last) {
                            continue;
                        }
                        let (i0, m) = ending.unwrap_or((i, 0));
                        let row = last - first;
                        self.final_norm.apply(
                            &scratch.x[row * h..(row + 1) * h],
                            &mut scratch.xn[m * h..(m + 1) * h],
                        );
                        ending = Some((i0, m + 1));
                    }
                    if let Some((i0, m)) = ending {
                        let out = &mut out[i0 * vocab..(i0 + m) * vocab];
                        kernels::matmul_with(
                            par,
                            &self.lm_head,
                            &scratch.xn[..m * h],
                            m,
                            out,
                            &mut scratch.act,
                        );
                        self.finish_logits(par, out);
                    }
                }
                LogitsWanted::LastHidden => {
                    if first + n == total {
                        let last = &scratch.x[(n - 1) * h..n * h];
                        self.final_norm.apply(last, &mut scratch.embedding);
                    }
                }
                LogitsWanted::MeanHidden => {
                    if first == 0 {
                        scratch.embedding.fill(0.0);
                    }
                    // A sum in token order, divided once at the end.
                    for t in 0..n {
                        let xn = &mut scratch.xn[t * h..(t + 1) * h];
                        self.final_norm.apply(&scratch.x[t * h..(t + 1) * h], xn);
                        let sum = scratch.embedding.iter_mut().zip(xn.iter());
                        sum.for_each(|(o, v)| *o += v);
                    }
                    if first + n == total {
                        let count = total as f32;
                        scratch.embedding.iter_mut().for_each(|o| *o /= count);
                    }
                }
            }
        }
        Ok(())
    }

    /// The output logits' multiplier and soft cap (Granite, Gemma), on rows of `vocab`.
    fn finish_logits(&self, par: Par, rows: &mut [f32]) {
        let c = &self.config;
        if c.logit_scale == 1.0 && c.final_softcap.is_none() {
            return;
        }
        par.for_rows(rows, c.vocab_size, |_, row| {
            if c.logit_scale != 1.0 {
                let inv = 1.0 / c.logit_scale;
                row.iter_mut().for_each(|v| *v *= inv);
            }
            if let Some(cap) = c.final_softcap {
                kernels::softcap(row, cap);
            }
        });
    }

    /// One micro-batch: tokens `first..first + n` of the sequences laid end to end.
    fn forward_chunk(
        &self,
        par: Par,
        s: &mut ForwardScratch,
        sequences: &mut [Sequence<'_>],
        first: usize,
        n: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let c = &self.config;
        let h = c.hidden_size;
        let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);

        // Embeddings (plus learned positions for GPT-2).
        for t in 0..n {
            let (i, pos) = locate(sequences, first + t);
            let token = sequences[i].tokens[pos - sequences[i].pos0];
            let row = &mut s.x[t * h..(t + 1) * h];
            kernels::to_f32(self.embed.elements(), token as usize * h, row);
            if c.embedding_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embedding_scale);
            }
            if let Some(positions) = &self.positions {
                kernels::to_f32(positions.elements(), pos * h, &mut s.xn[..h]);
                for (a, b) in row.iter_mut().zip(&s.xn[..h]) {
                    *a += b;
                }
            }
        }

        for (layer, (block, kind)) in self.blocks.iter().zip(&c.layers).enumerate() {
            if stop() {
                return Err(Error::Cancelled);
            }
            // Attention.
            let x = &s.x;
            par.for_rows(&mut s.xn[..n * h], h, |t, row| {
                block.attn_norm.apply(&x[t * h..(t + 1) * h], row)
            });
            block.q.forward(par, &s.xn, n, &mut s.q, &mut s.act);
            block.k.forward(par, &s.xn, n, &mut s.k, &mut s.act);
            block.v.forward(par, &s.xn, n, &mut s.v, &mut s.act);
            for (norm, rows, width) in [
                (&block.q_norm, &mut s.q[..n * q_dim], q_dim),
                (&block.k_norm, &mut s.k[..n * kv_dim], kv_dim),
            ] {
                if let Some(norm) = norm {
                    par.for_rows(rows, width, |_, row| norm.apply_per_head(row));
                }
            }
            if kind.rope {
                let table = &s.ropes[usize::from(kind.local_rope).min(s.ropes.len() - 1)];
                let seqs = &*sequences;
                let rotate = |t: usize, row: &mut [f32]| {
                    let (_, pos) = locate(seqs, first + t);
                    table.rotate(row, c.head_dim, pos, c.rope_interleaved)
                };
                par.for_rows(&mut s.q[..n * q_dim], q_dim, rotate);
                par.for_rows(&mut s.k[..n * kv_dim], kv_dim, rotate);
            }
            // Each sequence stores its keys and values, then attends over its own cache.
            let mut start = 0;
            for seq in sequences.iter_mut() {
                let len = seq.tokens.len();
                let Some((row0, m, offset)) = span(start, len, first, n) else {
                    start += len;
                    continue;
                };
                start += len;
                let pos0 = seq.pos0 + offset;
                for t in row0..row0 + m {
                    seq.cache.store(
                        layer,
                        pos0 + t - row0,
                        &s.k[t * kv_dim..(t + 1) * kv_dim],
                        &s.v[t * kv_dim..(t + 1) * kv_dim],
                    );
                }
                attention(
                    par,
                    c,
                    kind,
                    seq.cache,
                    layer,
                    &s.q[row0 * q_dim..(row0 + m) * q_dim],
                    pos0,
                    &mut s.scores,
                    &mut s.att[row0 * q_dim..(row0 + m) * q_dim],
                    seq.capture.as_mut().and_then(|c| c.layer_writer(layer)),
                );
            }
            block.o.forward(par, &s.att, n, &mut s.out, &mut s.act);
            add_residual(par, c, &block.post_attn_norm, s, n);

            // Feed-forward.
            let x = &s.x;
            par.for_rows(&mut s.xn[..n * h], h, |t, row| {
                block.ffn_norm.apply(&x[t * h..(t + 1) * h], row)
            });
            match &block.ffn {
                FeedForward::Gated { gate, up, down } => {
                    gate.forward(par, &s.xn, n, &mut s.ff_a, &mut s.act);
                    up.forward(par, &s.xn, n, &mut s.ff_b, &mut s.act);
                    let up = &s.ff_b;
                    par.for_rows(&mut s.ff_a[..n * inter], inter, |t, row| {
                        let up = &up[t * inter..(t + 1) * inter];
                        match c.activation {
                            Activation::Silu => kernels::silu_mul(row, up),
                            Activation::GeluTanh => kernels::gelu_tanh_mul(row, up),
                        }
                    });
                    down.forward(par, &s.ff_a, n, &mut s.out, &mut s.act);
                }
                FeedForward::Plain { fc, proj } => {
                    fc.forward(par, &s.xn, n, &mut s.ff_a, &mut s.act);
                    par.for_rows(&mut s.ff_a[..n * inter], inter, |_, row| {
                        kernels::gelu_tanh(row)
                    });
                    proj.forward(par, &s.ff_a, n, &mut s.out, &mut s.act);
                }
            }
            add_residual(par, c, &block.post_ffn_norm, s, n);
        }
        Ok(())
    }
}

/// `x[t] += residual_scale * norm(out[t])` for the `n` rows of the micro-batch (the norm is
/// a sandwich norm, when the block has one).
fn add_residual(par: Par, c: &ModelConfig, norm: &Option<Norm>, s: &mut ForwardScratch, n: usize) {
    let h = c.hidden_size;
    let added = match norm {
        Some(norm) => {
            let out = &s.out;
            par.for_rows(&mut s.xn[..n * h], h, |t, row| {
                norm.apply(&out[t * h..(t + 1) * h], row)
            });
            &s.xn
        }
        None => &s.out,
    };
    let scale = c.residual_scale;
    par.for_rows(&mut s.x[..n * h], h, |t, row| {
        let added = &added[t * h..(t + 1) * h];
        if scale == 1.0 {
            row.iter_mut().zip(added).for_each(|(a, b)| *a += b);
        } else {
            row.iter_mut().zip(added).for_each(|(a, b)| *a += scale * b);
        }
    });
}

/// Causal attention of `n` query rows (positions `pos0..pos0 + n`) over the cache of `layer`,
/// one (token, head) pair per work item. Grouped-query heads share key/value heads. A sliding
/// layer attends to the last `window` positions only (the token's own included). The weights
/// go to `captured` too, for the rows it keeps.
#[allow(clippy::too_many_arguments)]
fn attention(
    par: Par,
    c: &ModelConfig,
    kind: &LayerKind,
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    pos0: usize,
    scores: &mut [f32],
    out: &mut [f32],
    captured: Option<LayerRows<'_>>,
) {
    let range = cache.layer_range(layer);
    with_planes!(&cache.data, p => attention_over(
        par,
        c,
        kind,
        (&p.keys[range.clone()], &p.values[range]),
        cache.n_ctx(),
        q,
        pos0,
        scores,
        out,
        captured.as_ref()
    ))
}

/// [`attention`] over one layer's `(keys, values)`, `[n_ctx, kv_dim]` each, of element `T`.
#[allow(clippy::too_many_arguments)]
fn attention_over<T: KvElement>(
    par: Par,
    c: &ModelConfig,
    kind: &LayerKind,
    (keys, values): (&[T], &[T]),
    n_ctx: usize,
    q: &[f32],
    pos0: usize,
    scores: &mut [f32],
    out: &mut [f32],
    captured: Option<&LayerRows<'_>>,
) {
    let (hd, n_heads, kv_dim) = (c.head_dim, c.n_heads, c.kv_dim());
    let group = n_heads / c.n_kv_heads;
    let n = q.len() / (n_heads * hd);
    let out = DisjointSlice::new(out);
    // Later tokens attend to more positions: tasks take items round-robin to share the work.
    par.for_each_strided_with_scratch(n * n_heads, scores, n_ctx, |item, scores| {
        let (t, head) = (item / n_heads, item % n_heads);
        let pos = pos0 + t;
        let first = kind
            .sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w));
        let kv_off = first * kv_dim + (head / group) * hd;
        let q_row = &q[item * hd..(item + 1) * hd];
        let scores = &mut scores[..pos + 1 - first];
        kernels::attention_scores(q_row, &keys[kv_off..], kv_dim, c.attention_scale, scores);
        if let Some(cap) = c.attn_softcap {
            kernels::softcap(scores, cap);
        }
        kernels::softmax(scores);
        if let Some(rows) = captured {
            // SAFETY: this item alone handles (pos, head).
            unsafe { rows.record(pos, head, first, scores) };
        }
        // SAFETY: item (t, head) owns output elements item*hd..(item+1)*hd alone.
        let o = unsafe { out.range_mut(item * hd..(item + 1) * hd) };
        kernels::weighted_sum(scores, &values[kv_off..], kv_dim, o);
    });
}
