//! The forward pass: tokens in, logits out, keys and values appended to the cache.
//!
//! Prompts are processed in micro-batches of up to `ubatch` tokens, so every weight matrix is
//! read once per micro-batch (matrix-matrix work). All buffers are allocated when the session
//! is created; a decode step allocates nothing.

use super::{FeedForward, Model};
use crate::error::{try_zeroed_f32, Error, Result};
use crate::kernels;
use crate::kernels::quant::{QuantActs, BLOCK};
use crate::loader::{Architecture, ModelConfig};
use crate::threading::{DisjointSlice, Par};

/// Keys and values of every past position, for every layer, in f32.
#[derive(Debug)]
pub(crate) struct KvCache {
    /// `[n_layers, n_ctx, kv_dim]`
    keys: Vec<f32>,
    /// `[n_layers, n_ctx, kv_dim]`
    values: Vec<f32>,
    n_ctx: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Allocates a cache for `n_ctx` positions (fallibly: a large cache may not fit).
    pub(crate) fn new(config: &ModelConfig, n_ctx: usize) -> Result<KvCache> {
        let kv_dim = config.kv_dim();
        let len = config
            .n_layers
            .checked_mul(n_ctx)
            .and_then(|n| n.checked_mul(kv_dim))
            .ok_or_else(|| Error::OutOfMemory("KV cache size overflows".into()))?;
        Ok(KvCache {
            keys: try_zeroed_f32(len, "KV cache keys")?,
            values: try_zeroed_f32(len, "KV cache values")?,
            n_ctx,
            kv_dim,
        })
    }

    /// Positions the cache can hold.
    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let size = self.n_ctx * self.kv_dim;
        let range = layer * size..(layer + 1) * size;
        (&self.keys[range.clone()], &self.values[range])
    }

    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let start = (layer * self.n_ctx + pos) * self.kv_dim;
        self.keys[start..start + k.len()].copy_from_slice(k);
        self.values[start..start + v.len()].copy_from_slice(v);
    }
}

/// Activation buffers for one micro-batch, plus the RoPE table and the output logits.
#[derive(Debug)]
pub(crate) struct ForwardScratch {
    ubatch: usize,
    x: Vec<f32>,        // [ubatch, hidden] residual stream
    xn: Vec<f32>,       // [ubatch, hidden] normalised
    q: Vec<f32>,        // [ubatch, n_heads * head_dim]
    k: Vec<f32>,        // [ubatch, kv_dim]
    v: Vec<f32>,        // [ubatch, kv_dim]
    att: Vec<f32>,      // [ubatch, n_heads * head_dim]
    out: Vec<f32>,      // [ubatch, hidden]
    ff_a: Vec<f32>,     // [ubatch, intermediate]
    ff_b: Vec<f32>,     // [ubatch, intermediate]
    scores: Vec<f32>,   // [n_threads, n_ctx] attention weights, one row per task
    rope_cos: Vec<f32>, // [n_ctx, head_dim / 2]
    rope_sin: Vec<f32>, // [n_ctx, head_dim / 2]
    /// `[ubatch, max(hidden, intermediate, q_dim) / 32]` activations quantized for products
    /// with quantized weights (empty when no weight is quantized).
    act: QuantActs,
    /// `[vocab]` logits of the last position computed.
    pub(crate) logits: Vec<f32>,
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
        let half = config.head_dim / 2;
        let (rope_cos, rope_sin) = if config.architecture == Architecture::Gpt2 {
            (Vec::new(), Vec::new())
        } else {
            rope_table(config, n_ctx)?
        };
        debug_assert_eq!(
            rope_cos.len(),
            if config.architecture == Architecture::Gpt2 {
                0
            } else {
                n_ctx * half
            }
        );
        let widest = h.max(inter).max(config.q_dim());
        let n_act = if quantized {
            ubatch * widest.div_ceil(BLOCK)
        } else {
            0
        };
        let act = QuantActs::with_capacity(n_act)?;
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
            rope_cos,
            rope_sin,
            logits: try_zeroed_f32(config.vocab_size, "logits")?,
        })
    }
}

/// Inverse RoPE frequencies, with Llama 3 scaling applied when configured.
fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base = config.rope_theta as f64;
    (0..dim / 2)
        .map(|i| {
            let inv = (1.0 / base.powf((2 * i) as f64 / dim as f64)) as f32;
            if let Some(factors) = &config.rope_freq_factors {
                return inv / factors[i];
            }
            match &config.rope_scaling {
                None => inv,
                Some(s) => {
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
        .collect()
}

/// cos and sin of `position * inv_freq`, `[n_ctx, head_dim / 2]` each. The angle is formed in
/// f32, as transformers does, then its cosine and sine are taken accurately.
fn rope_table(config: &ModelConfig, n_ctx: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let inv_freq = rope_inv_freq(config);
    let half = inv_freq.len();
    let mut cos = try_zeroed_f32(n_ctx * half, "RoPE table")?;
    let mut sin = try_zeroed_f32(n_ctx * half, "RoPE table")?;
    for pos in 0..n_ctx {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = (pos as f32 * f) as f64;
            cos[pos * half + i] = angle.cos() as f32;
            sin[pos * half + i] = angle.sin() as f32;
        }
    }
    Ok((cos, sin))
}

/// A session's mutable state for the forward pass: its cache and its buffers.
#[derive(Debug)]
pub(crate) struct Workspace {
    /// Keys and values of past positions.
    pub(crate) cache: KvCache,
    /// Activation buffers and output logits.
    pub(crate) scratch: ForwardScratch,
}

/// Which logits a forward pass must produce.
pub(crate) enum LogitsWanted<'a> {
    /// Only the last token's, into the scratch's `logits`.
    Last,
    /// Every token's but the first `skip`, `[n_tokens - skip, vocab]`, into `out`.
    All {
        /// Receives the rows.
        out: &'a mut [f32],
        /// Leading tokens whose logits are not wanted.
        skip: usize,
    },
}

/// Called at every layer boundary of a forward pass with the number of tokens completed so
/// far; returns true to stop the pass with [`Error::Cancelled`].
pub(crate) type Progress<'a> = &'a (dyn Fn(usize) -> bool + Sync);

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
        mut wanted: LogitsWanted<'_>,
    ) -> Result<()> {
        let Workspace { cache, scratch } = ws;
        let vocab = self.config.vocab_size;
        let ubatch = scratch.ubatch;
        for (chunk_index, chunk) in tokens.chunks(ubatch).enumerate() {
            let first = chunk_index * ubatch;
            // Every layer boundary reports the tokens of the chunks before this one as done.
            let at_layer = || progress(first);
            self.forward_chunk(par, cache, scratch, chunk, pos0 + first, &at_layer)?;
            let n = chunk.len();
            let h = self.config.hidden_size;
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
                    if first + n == tokens.len() {
                        scratch
                            .logits
                            .copy_from_slice(&out[(n - from - 1) * vocab..]);
                    }
                }
                LogitsWanted::Last if first + n == tokens.len() => {
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
                }
                LogitsWanted::Last => {}
            }
        }
        Ok(())
    }

    fn forward_chunk(
        &self,
        par: Par,
        cache: &mut KvCache,
        s: &mut ForwardScratch,
        tokens: &[u32],
        pos0: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let c = &self.config;
        let (h, n) = (c.hidden_size, tokens.len());
        let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);

        // Embeddings (plus learned positions for GPT-2).
        for (t, &token) in tokens.iter().enumerate() {
            let row = &mut s.x[t * h..(t + 1) * h];
            self.embed.elements().to_f32(token as usize * h, row);
            if let Some(positions) = &self.positions {
                positions.elements().to_f32((pos0 + t) * h, &mut s.xn[..h]);
                for (a, b) in row.iter_mut().zip(&s.xn[..h]) {
                    *a += b;
                }
            }
        }

        for (layer, block) in self.blocks.iter().enumerate() {
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
            if !s.rope_cos.is_empty() {
                let (half, hd) = (c.head_dim / 2, c.head_dim);
                let (cos, sin) = (&s.rope_cos, &s.rope_sin);
                let rotate = |t: usize, row: &mut [f32]| {
                    let pos = pos0 + t;
                    let (cos, sin) = (
                        &cos[pos * half..(pos + 1) * half],
                        &sin[pos * half..(pos + 1) * half],
                    );
                    if c.rope_interleaved {
                        row.chunks_exact_mut(hd)
                            .for_each(|head| kernels::rope_interleaved(head, cos, sin));
                    } else {
                        row.chunks_exact_mut(hd)
                            .for_each(|head| kernels::rope(head, cos, sin));
                    }
                };
                par.for_rows(&mut s.q[..n * q_dim], q_dim, rotate);
                par.for_rows(&mut s.k[..n * kv_dim], kv_dim, rotate);
            }
            for t in 0..n {
                cache.store(
                    layer,
                    pos0 + t,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            attention(
                par,
                c,
                cache,
                layer,
                &s.q[..n * q_dim],
                pos0,
                &mut s.scores,
                &mut s.att[..n * q_dim],
            );
            block.o.forward(par, &s.att, n, &mut s.out, &mut s.act);
            add_rows(par, &mut s.x[..n * h], &s.out, h);

            // Feed-forward.
            let x = &s.x;
            par.for_rows(&mut s.xn[..n * h], h, |t, row| {
                block.ffn_norm.apply(&x[t * h..(t + 1) * h], row)
            });
            match &block.ffn {
                FeedForward::SwiGlu { gate, up, down } => {
                    gate.forward(par, &s.xn, n, &mut s.ff_a, &mut s.act);
                    up.forward(par, &s.xn, n, &mut s.ff_b, &mut s.act);
                    let up = &s.ff_b;
                    par.for_rows(&mut s.ff_a[..n * inter], inter, |t, row| {
                        kernels::silu_mul(row, &up[t * inter..(t + 1) * inter])
                    });
                    down.forward(par, &s.ff_a, n, &mut s.out, &mut s.act);
                }
                FeedForward::Gelu { fc, proj } => {
                    fc.forward(par, &s.xn, n, &mut s.ff_a, &mut s.act);
                    par.for_rows(&mut s.ff_a[..n * inter], inter, |_, row| {
                        kernels::gelu_tanh(row)
                    });
                    proj.forward(par, &s.ff_a, n, &mut s.out, &mut s.act);
                }
            }
            add_rows(par, &mut s.x[..n * h], &s.out, h);
        }
        Ok(())
    }
}

/// `x[t] += y[t]` for every row of width `h`.
fn add_rows(par: Par, x: &mut [f32], y: &[f32], h: usize) {
    par.for_rows(x, h, |t, row| {
        for (a, b) in row.iter_mut().zip(&y[t * h..(t + 1) * h]) {
            *a += b;
        }
    });
}

/// Causal attention of `n` query rows (positions `pos0..pos0 + n`) over the cache of `layer`,
/// one (token, head) pair per work item. Grouped-query heads share key/value heads.
#[allow(clippy::too_many_arguments)]
fn attention(
    par: Par,
    c: &ModelConfig,
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    pos0: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, n_heads, kv_dim) = (c.head_dim, c.n_heads, c.kv_dim());
    let group = n_heads / c.n_kv_heads;
    let n = q.len() / (n_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let (keys, values) = cache.layer(layer);
    let out = DisjointSlice::new(out);
    // Later tokens attend to more positions: tasks take items round-robin to share the work.
    par.for_each_strided_with_scratch(n * n_heads, scores, cache.n_ctx, |item, scores| {
        let (t, head) = (item / n_heads, item % n_heads);
        let kv_off = (head / group) * hd;
        let q_row = &q[item * hd..(item + 1) * hd];
        let scores = &mut scores[..pos0 + t + 1];
        kernels::attention_scores(q_row, &keys[kv_off..], kv_dim, scale, scores);
        kernels::softmax(scores);
        // SAFETY: item (t, head) owns output elements item*hd..(item+1)*hd alone.
        let o = unsafe { out.range_mut(item * hd..(item + 1) * hd) };
        kernels::weighted_sum(scores, &values[kv_off..], kv_dim, o);
    });
}
