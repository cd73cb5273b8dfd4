//! Block-quantized weights (GGML's Q8_0, Q4_0 and Q4_1) and their matrix products.
//!
//! A weight row is a sequence of blocks of [`BLOCK`] weights. Products never dequantize the
//! weights: the activations are quantized to 8 bits per block ([`ActBlock`]) and each block's
//! dot product is an integer sum, scaled once per block:
//!
//! - Q8_0, `w = d·q` with `q` in -127..=127:           `Σ w·x = d·dx·Σ q·qx`
//! - Q4_0, `w = d·(q − 8)` with `q` in 0..=15:         `Σ w·x = d·dx·Σ q·qx − 8·d·(dx·Σ qx)`
//! - Q4_1, `w = d·q + m` with `q` in 0..=15:           `Σ w·x = d·dx·Σ q·qx + m·(dx·Σ qx)`
//!
//! so every format is `scale·Σ q·qx + offset·sx`, with `sx = dx·Σ qx` stored with the block.

use std::ops::Range;

use half::f16;

use super::Isa;
use crate::tensor::DType;
use crate::threading::{DisjointSlice, Par};

/// Weights per block, for every quantized type.
pub const BLOCK: usize = 32;

/// Activations of one block, quantized to 8 bits for integer dot products.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct ActBlock {
    /// Scale: the values are `d * qs[i]`.
    pub d: f32,
    /// `d * Σ qs`, used by formats with an offset (Q4_0's −8, Q4_1's minimum).
    pub sum: f32,
    /// The quantized values.
    pub qs: [i8; BLOCK],
}

/// Quantized activations of several tokens, with each block's scale and sum also stored
/// block-major (`[n_blocks, n_tok]`) so SIMD kernels can load eight tokens' values at once.
#[derive(Debug, Default, Clone)]
pub struct QuantActs {
    /// `[n_tok, n_blocks]` blocks.
    blocks: Vec<ActBlock>,
    /// `[n_blocks, n_tok]` scales (`ActBlock::d`).
    scales: Vec<f32>,
    /// `[n_blocks, n_tok]` sums (`ActBlock::sum`).
    sums: Vec<f32>,
}

impl QuantActs {
    /// Buffers for `n_blocks` blocks in all (tokens × blocks per token), allocated now and
    /// fallibly, so that products never allocate.
    pub fn with_capacity(n_blocks: usize) -> crate::Result<QuantActs> {
        let mut acts = QuantActs::default();
        let oom = |_| crate::Error::OutOfMemory("quantized activations".into());
        acts.blocks.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.scales.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.sums.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.blocks.resize(n_blocks, ActBlock::default());
        acts.scales.resize(n_blocks, 0.0);
        acts.sums.resize(n_blocks, 0.0);
        Ok(acts)
    }

    /// Quantizes `n_tok` rows of `x` (`[n_tok, k]`, `k` a multiple of [`BLOCK`]), growing the
    /// buffers only if they are too small.
    pub fn quantize(&mut self, x: &[f32], n_tok: usize) {
        let n = x.len() / BLOCK;
        if self.blocks.len() < n {
            self.blocks.resize(n, ActBlock::default());
            self.scales.resize(n, 0.0);
            self.sums.resize(n, 0.0);
        }
        quantize_activations(x, &mut self.blocks[..n]);
        let n_blocks = n / n_tok.max(1);
        for t in 0..n_tok {
            for b in 0..n_blocks {
                let block = &self.blocks[t * n_blocks + b];
                self.scales[b * n_tok + t] = block.d;
                self.sums[b * n_tok + t] = block.sum;
            }
        }
    }
}

/// Rounds `v` (within ±127) to the nearest integer, halves away from zero. Unlike
/// `f32::round` this needs no library call on CPUs without SSE4.1, so it vectorizes.
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    (v + 0.5f32.copysign(v)) as i8
}

/// Quantizes activations (a multiple of [`BLOCK`] long) into `out`, one block per 32 values,
/// rounding to nearest.
pub fn quantize_activations(x: &[f32], out: &mut [ActBlock]) {
    for (xb, ob) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut total = 0i32;
        for (q, v) in ob.qs.iter_mut().zip(xb) {
            *q = round_to_i8(v * inv);
            total += *q as i32;
        }
        ob.d = d;
        ob.sum = d * total as f32;
    }
}

/// Reads the f16 at `bytes[at..at + 2]` as f32.
#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The 32 quantized values of one weight block (in element order), its scale, and its offset
/// coefficient (see the module documentation).
#[inline(always)]
fn unpack_block(dtype: DType, b: &[u8]) -> ([i32; BLOCK], f32, f32) {
    let mut q = [0i32; BLOCK];
    match dtype {
        DType::Q8_0 => {
            for (qi, &v) in q.iter_mut().zip(&b[2..34]) {
                *qi = v as i8 as i32;
            }
            (q, f16_at(b, 0), 0.0)
        }
        DType::Q4_0 | DType::Q4_1 => {
            let nibbles = if dtype == DType::Q4_0 {
                &b[2..18]
            } else {
                &b[4..20]
            };
            for (j, &v) in nibbles.iter().enumerate() {
                q[j] = (v & 0x0F) as i32;
                q[j + BLOCK / 2] = (v >> 4) as i32;
            }
            let d = f16_at(b, 0);
            let offset = if dtype == DType::Q4_0 {
                -8.0 * d
            } else {
                f16_at(b, 2)
            };
            (q, d, offset)
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a quantized type"),
    }
}

/// Dequantizes whole blocks of `dtype` into `out` (`out.len()` values).
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let block_bytes = dtype.block_bytes();
    for (b, o) in bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let (q, d, offset) = unpack_block(dtype, b);
        // Q4_0's offset is −8·d, so `d·q + offset` is `d·(q − 8)`.
        for (oi, &qi) in o.iter_mut().zip(&q) {
            *oi = d * qi as f32 + offset;
        }
    }
}

/// Quantizes `x` (a multiple of [`BLOCK`] long) to Q8_0 blocks appended to `out`, with GGML's
/// rounding (scale `amax / 127` stored as f16, values rounded to nearest).
pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(BLOCK) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(xb.iter().map(|v| round_to_i8(v * inv) as u8));
    }
}

/// Dot product of one weight row (`k / BLOCK` blocks) with one quantized activation row:
/// the portable reference of the SIMD kernels.
pub fn dot_row(dtype: DType, w: &[u8], x: &[ActBlock]) -> f32 {
    let mut sum = 0.0f32;
    for (b, xb) in w.chunks_exact(dtype.block_bytes()).zip(x) {
        let (q, d, offset) = unpack_block(dtype, b);
        let dot: i32 = q.iter().zip(&xb.qs).map(|(&a, &b)| a * b as i32).sum();
        sum += d * xb.d * dot as f32 + offset * xb.sum;
    }
    sum
}

/// One quantized matrix product shared by the tasks that compute parts of it.
pub(crate) struct QuantGemm<'a> {
    /// Weight format.
    pub(crate) dtype: DType,
    /// `[n_out, k / BLOCK]` blocks, row after row.
    pub(crate) w: &'a [u8],
    /// Bytes per weight row.
    pub(crate) row_bytes: usize,
    /// `[n_tok, k / BLOCK]` quantized activations.
    pub(crate) x: &'a [ActBlock],
    /// `[k / BLOCK, n_tok]` the activations' block scales.
    pub(crate) x_scales: &'a [f32],
    /// `[k / BLOCK, n_tok]` the activations' block sums.
    pub(crate) x_sums: &'a [f32],
    /// Blocks per row.
    pub(crate) n_blocks: usize,
    /// Number of activation rows.
    pub(crate) n_tok: usize,
    /// `[n_tok, n_out]` output, written by disjoint tasks.
    pub(crate) y: &'a DisjointSlice<'a, f32>,
    /// Number of weight rows.
    pub(crate) n_out: usize,
}

impl QuantGemm<'_> {
    /// Weight row `r`.
    #[inline(always)]
    pub(crate) fn w_row(&self, r: usize) -> &[u8] {
        &self.w[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Quantized activations of token `t`.
    #[inline(always)]
    pub(crate) fn x_row(&self, t: usize) -> &[ActBlock] {
        &self.x[t * self.n_blocks..(t + 1) * self.n_blocks]
    }
}

fn gemm_rows(isa: Isa, g: &QuantGemm<'_>, rows: Range<usize>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after detecting AVX2, FMA and F16C; `matmul`
        // checked the sizes and each task gets a disjoint range of rows.
        Isa::Avx2 => unsafe { super::x86_quant::gemm_rows(g, rows) },
        _ => {
            for r in rows {
                for t in 0..g.n_tok {
                    let v = dot_row(g.dtype, g.w_row(r), g.x_row(t));
                    // SAFETY: element (t, r) belongs to this task's rows.
                    unsafe { g.y.write(t * g.n_out + r, v) };
                }
            }
        }
    }
}

/// `y = x · wᵀ` for quantized `w` (`[n_out, k]` as blocks): quantizes `x` (`[n_tok, k]`)
/// into `act` (grown if too small: callers that must not allocate pass one made by
/// [`QuantActs::with_capacity`] for `n_tok * k / BLOCK` blocks), then runs the integer
/// products in parallel over rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    isa: Isa,
    par: Par,
    dtype: DType,
    w: &[u8],
    (n_out, k): (usize, usize),
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    act: &mut QuantActs,
) {
    assert!(k % BLOCK == 0, "quantized rows must be whole blocks");
    let n_blocks = k / BLOCK;
    let row_bytes = n_blocks * dtype.block_bytes();
    assert_eq!(
        w.len(),
        n_out * row_bytes,
        "quantized weights of the wrong size"
    );
    act.quantize(&x[..n_tok * k], n_tok);
    let n = n_tok * n_blocks;
    let y = DisjointSlice::new(&mut y[..n_tok * n_out]);
    let g = QuantGemm {
        dtype,
        w,
        row_bytes,
        x: &act.blocks[..n],
        x_scales: &act.scales[..n],
        x_sums: &act.sums[..n],
        n_blocks,
        n_tok,
        y: &y,
        n_out,
    };
    par.for_ranges(n_out, 16, |rows| gemm_rows(isa, &g, rows));
}
