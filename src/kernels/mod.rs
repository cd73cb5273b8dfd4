//! Numerical kernels: matrix products over weights in place, norms, RoPE, softmax, activations.
//!
//! SIMD is chosen at run time ([`Isa::detect`]); the shipped library runs on any CPU of its
//! architecture and uses AVX2/FMA/F16C where the CPU has them. Every kernel has a portable
//! version that gives the same results up to rounding.

pub mod quant;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_quant;

use std::ops::Range;
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::tensor::{Elements, Tensor};
use crate::threading::{DisjointSlice, Par};

/// A weight element type that widens to f32.
pub trait WeightElement: Copy + Send + Sync + 'static {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl WeightElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl WeightElement for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// `self` if this CPU supports it, else the portable kernels: a caller-chosen instruction
    /// set can never run unsupported instructions.
    pub fn supported(self) -> Isa {
        if self == Isa::Portable || self == Isa::detect() {
            self
        } else {
            Isa::Portable
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma+f16c",
        }
    }
}

/// One matrix product `y = x · wᵀ`, shared by the tasks that compute parts of it.
pub(crate) struct Gemm<'a, W> {
    /// `[n_out, k]` weights.
    pub(crate) w: &'a [W],
    /// Inner dimension.
    pub(crate) k: usize,
    /// `[n_tok, k]` activations.
    pub(crate) x: &'a [f32],
    /// Number of activation rows.
    pub(crate) n_tok: usize,
    /// `[n_tok, n_out]` output, written by disjoint tasks.
    pub(crate) y: &'a DisjointSlice<'a, f32>,
    /// Number of weight rows.
    pub(crate) n_out: usize,
}

/// One task's share of a [`Gemm`]: the output columns `rows`, for every token.
fn gemm_rows_typed<W: WeightElement + SimdWeight>(isa: Isa, g: &Gemm<'_, W>, rows: Range<usize>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after detecting AVX2, FMA and F16C (tests use
        // it only when `Isa::detect()` returned it); `matmul_isa` checked the shapes and hands
        // each task a disjoint range of rows.
        Isa::Avx2 => unsafe { x86::gemm_rows(g, rows) },
        _ => {
            let k = g.k;
            for r in rows {
                let row = &g.w[r * k..(r + 1) * k];
                for t in 0..g.n_tok {
                    let v = scalar::dot(row, &g.x[t * k..(t + 1) * k]);
                    // SAFETY: element (t, r) belongs to this task's rows.
                    unsafe { g.y.write(t * g.n_out + r, v) };
                }
            }
        }
    }
}

fn matmul_typed<W: WeightElement + SimdWeight>(
    isa: Isa,
    par: Par,
    w: &[W],
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    let n_out = y.len() / n_tok;
    let k = x.len() / n_tok;
    let y = DisjointSlice::new(y);
    let g = Gemm {
        w,
        k,
        x,
        n_tok,
        y: &y,
        n_out,
    };
    // Enough rows per task to amortise scheduling; a multiple of the 4-row tile.
    par.for_ranges(n_out, 16, |rows| gemm_rows_typed(isa, &g, rows));
}

/// Weight types with a SIMD load on every architecture Ember has kernels for.
#[cfg(target_arch = "x86_64")]
pub trait SimdWeight: x86::Avx2Load {}
#[cfg(target_arch = "x86_64")]
impl<T: x86::Avx2Load> SimdWeight for T {}
/// Weight types with a SIMD load on every architecture Ember has kernels for.
#[cfg(not(target_arch = "x86_64"))]
pub trait SimdWeight {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> SimdWeight for T {}

/// `y = x · wᵀ`: `w` is `[n_out, k]` (a Linear weight), `x` is `[n_tok, k]`, `y` is
/// `[n_tok, n_out]`. Work is split over output rows, so each element is computed by one thread.
///
/// Quantized weights need their activations quantized into a buffer; this function allocates
/// one. The forward pass uses [`matmul_with`] and a buffer made with the session.
pub fn matmul(par: Par, w: &Tensor, x: &[f32], n_tok: usize, y: &mut [f32]) {
    matmul_isa(
        Isa::detect(),
        par,
        w,
        x,
        n_tok,
        y,
        &mut quant::QuantActs::default(),
    )
}

/// [`matmul`] with buffers for quantized activations (grown only if they hold fewer than
/// `n_tok * k / 32` blocks).
pub fn matmul_with(
    par: Par,
    w: &Tensor,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    act: &mut quant::QuantActs,
) {
    matmul_isa(Isa::detect(), par, w, x, n_tok, y, act)
}

/// [`matmul_with`] with an explicit instruction set (for tests and benchmarks).
pub fn matmul_isa(
    isa: Isa,
    par: Par,
    w: &Tensor,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    act: &mut quant::QuantActs,
) {
    let isa = isa.supported();
    assert_eq!(w.shape().len(), 2, "matmul needs a matrix");
    let (n_out, k) = (w.shape()[0], w.shape()[1]);
    assert!(
        x.len() >= n_tok * k && y.len() >= n_tok * n_out,
        "matmul: buffers too small"
    );
    let (x, y) = (&x[..n_tok * k], &mut y[..n_tok * n_out]);
    if n_tok == 0 {
        return;
    }
    match w.elements() {
        Elements::F32(w) => matmul_typed(isa, par, w, x, n_tok, y),
        Elements::F16(w) => matmul_typed(isa, par, w, x, n_tok, y),
        Elements::BF16(w) => matmul_typed(isa, par, w, x, n_tok, y),
        Elements::Quantized(dtype, w) => {
            quant::matmul(isa, par, dtype, w, (n_out, k), x, n_tok, y, act)
        }
    }
}

fn axpy_typed<W: WeightElement + SimdWeight>(isa: Isa, a: f32, w: &[W], y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` implies the CPU features were detected.
        Isa::Avx2 => unsafe { x86::axpy(a, w, y) },
        _ => scalar::axpy(a, w, y),
    }
}

/// Columns `cols` of the `[k, stride]` matrix `w` against `n_tok` rows of `x`, into `y`.
fn matmul_in_out_typed<W: WeightElement + SimdWeight>(
    isa: Isa,
    par: Par,
    (w, stride): (&[W], usize),
    cols: Range<usize>,
    x: &[f32],
    y: &mut [f32],
) {
    let n_out = cols.len();
    let n_tok = y.len() / n_out.max(1);
    let k = x.len() / n_tok.max(1);
    let y = DisjointSlice::new(y);
    par.for_ranges(n_out, 32, |part| {
        let (c0, c1) = (cols.start + part.start, cols.start + part.end);
        for t in 0..n_tok {
            // SAFETY: this task alone owns columns `part` of every token's output row.
            let out = unsafe { y.range_mut(t * n_out + part.start..t * n_out + part.end) };
            out.fill(0.0);
            for (i, &a) in x[t * k..(t + 1) * k].iter().enumerate() {
                axpy_typed(isa, a, &w[i * stride + c0..i * stride + c1], out);
            }
        }
    });
}

/// `y = x · w[:, cols]`: `w` is `[k, n_total]` (GPT-2's Conv1D layout), `x` is `[n_tok, k]`,
/// `y` is `[n_tok, cols.len()]`. Each output element sums its `k` products in order, on one
/// thread.
pub fn matmul_in_out_cols(
    par: Par,
    w: &Tensor,
    cols: Range<usize>,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    matmul_in_out_isa(Isa::detect(), par, w, cols, x, n_tok, y)
}

/// [`matmul_in_out_cols`] with an explicit instruction set.
pub fn matmul_in_out_isa(
    isa: Isa,
    par: Par,
    w: &Tensor,
    cols: Range<usize>,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    let isa = isa.supported();
    assert_eq!(w.shape().len(), 2, "matmul needs a matrix");
    let (k, stride) = (w.shape()[0], w.shape()[1]);
    assert!(
        cols.start <= cols.end && cols.end <= stride,
        "matmul: columns out of range"
    );
    let n_out = cols.len();
    assert!(
        x.len() >= n_tok * k && y.len() >= n_tok * n_out,
        "matmul: buffers too small"
    );
    if n_tok == 0 || n_out == 0 {
        return;
    }
    let (x, y) = (&x[..n_tok * k], &mut y[..n_tok * n_out]);
    match w.elements() {
        Elements::F32(w) => matmul_in_out_typed(isa, par, (w, stride), cols, x, y),
        Elements::F16(w) => matmul_in_out_typed(isa, par, (w, stride), cols, x, y),
        Elements::BF16(w) => matmul_in_out_typed(isa, par, (w, stride), cols, x, y),
        Elements::Quantized(..) => unreachable!("Conv1D weights are never quantized"),
    }
}

/// Writes elements `start..start + out.len()` as f32 into `out`. For quantized types
/// `start` and `out.len()` must be multiples of the block length.
pub fn to_f32(elements: Elements<'_>, start: usize, out: &mut [f32]) {
    let range = start..start + out.len();
    match elements {
        Elements::F32(e) => out.copy_from_slice(&e[range]),
        Elements::F16(e) => out
            .iter_mut()
            .zip(&e[range])
            .for_each(|(o, v)| *o = v.to_f32()),
        Elements::BF16(e) => out
            .iter_mut()
            .zip(&e[range])
            .for_each(|(o, v)| *o = v.to_f32()),
        Elements::Quantized(dtype, bytes) => {
            let (block, block_bytes) = (dtype.block_len(), dtype.block_bytes());
            assert!(start % block == 0 && out.len() % block == 0);
            let first = start / block * block_bytes;
            let bytes = &bytes[first..first + out.len() / block * block_bytes];
            quant::dequantize(dtype, bytes, out);
        }
    }
}

/// Every element of a tensor, as f32.
pub fn to_f32_vec(tensor: &Tensor) -> Vec<f32> {
    let mut out = vec![0.0; tensor.len()];
    to_f32(tensor.elements(), 0, &mut out);
    out
}

/// Dot product of two f32 vectors.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only returned after detecting the features.
        Isa::Avx2 => unsafe { x86::dot_f32(a, b) },
        _ => scalar::dot(a, b),
    }
}

/// `y += a * x` over f32 vectors.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_typed(Isa::detect(), a, x, y)
}

/// Attention scores of one query against `out.len()` cached keys:
/// `out[p] = scale * q · keys[p * stride..][..q.len()]`.
pub fn attention_scores<W: WeightElement + SimdWeight>(
    q: &[f32],
    keys: &[W],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only returned after detecting the features.
        Isa::Avx2 => unsafe { x86::attention_scores(q, keys, stride, scale, out) },
        _ => scalar::attention_scores(q, keys, stride, scale, out),
    }
}

/// The attention output of one head: `out[j] = Σ_p weights[p] * values[p * stride + j]`.
pub fn weighted_sum<W: WeightElement + SimdWeight>(
    weights: &[f32],
    values: &[W],
    stride: usize,
    out: &mut [f32],
) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only returned after detecting the features.
        Isa::Avx2 => unsafe { x86::weighted_sum(weights, values, stride, out) },
        _ => scalar::weighted_sum(weights, values, stride, out),
    }
}

/// Adds `bias` to every row of `x` (`[n_rows, bias.len()]`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `out = x / rms(x) * weight` (RMSNorm), for one row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// `x = x / rms(x) * weight` (RMSNorm) in place, for one row (per-head norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * scale);
    }
}

/// `out = (x - mean) / std * weight + bias` (LayerNorm), for one row.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let scale = 1.0 / (var + eps).sqrt();
    for (((o, v), w), b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * scale * w + b;
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only returned after detecting the features.
        Isa::Avx2 => unsafe { x86::softmax(x) },
        _ => scalar::softmax(x),
    }
}

/// `gate = silu(gate) * up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only returned after detecting the features.
        Isa::Avx2 => unsafe { x86::silu_mul(gate, up) },
        _ => scalar::silu_mul(gate, up),
    }
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`), in place.
pub fn gelu_tanh(x: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for v in x.iter_mut() {
        let u = *v;
        *v = 0.5 * u * (1.0 + (SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)).tanh());
    }
}

/// `gate = gelu_tanh(gate) * up` (GeGLU).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gelu_tanh(gate);
    for (g, u) in gate.iter_mut().zip(up) {
        *g *= u;
    }
}

/// `x = cap * tanh(x / cap)` in place (Gemma's soft caps on scores and logits).
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// Rotates one head vector by RoPE in the "rotate half" layout (pairs `i` and `i + d/2`),
/// with `cos`/`sin` of length `d/2` for the token's position.
pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// Rotates one head vector by RoPE in the interleaved layout (pairs `2i` and `2i + 1`, the
/// layout of GGUF `llama` models, whose Q/K rows are permuted to match), with `cos`/`sin` of
/// length `d/2`.
pub fn rope_interleaved(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (pair, (c, s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = b * c + a * s;
    }
}

#[cfg(test)]
mod tests;
