//! Portable kernels: plain Rust that runs on every CPU, and the reference the SIMD kernels are
//! tested against.
//!
//! The dot product keeps eight partial sums, like one 8-lane SIMD register, and reduces them
//! in the same order as the SIMD kernels, so both give the same result up to the rounding of
//! a fused multiply-add.

use super::WeightElement;

/// Number of partial sums a dot product keeps (the width of one AVX register of f32).
pub(crate) const LANES: usize = 8;

/// Sums eight partial sums in the fixed order all kernels use (pairs, then quads, then the
/// two halves: the order of AVX's horizontal adds).
#[inline(always)]
pub fn reduce_lanes(l: [f32; LANES]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// Dot product of a weight row with an activation row: eight lanes over whole groups of
/// eight, reduced, then the leftover elements added one by one.
#[inline(always)]
pub fn dot<W: WeightElement>(w: &[W], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let whole = w.len() / LANES * LANES;
    let mut lanes = [0.0f32; LANES];
    for (wc, xc) in w[..whole]
        .chunks_exact(LANES)
        .zip(x[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            lanes[l] += wc[l].to_f32() * xc[l];
        }
    }
    let mut sum = reduce_lanes(lanes);
    for (wv, xv) in w[whole..].iter().zip(&x[whole..]) {
        sum += wv.to_f32() * xv;
    }
    sum
}

/// `y[j] += a * w[j]` over a weight row.
#[inline(always)]
pub fn axpy<W: WeightElement>(a: f32, w: &[W], y: &mut [f32]) {
    for (yv, wv) in y.iter_mut().zip(w) {
        *yv += a * wv.to_f32();
    }
}

/// `out[p] = scale * dot(q, keys[p * stride..][..q.len()])` for every position `p`.
pub fn attention_scores<W: WeightElement>(
    q: &[f32],
    keys: &[W],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    for (p, o) in out.iter_mut().enumerate() {
        *o = dot(&keys[p * stride..p * stride + q.len()], q) * scale;
    }
}

/// `out[j] = Σ_p weights[p] * values[p * stride + j]`, summed in position order.
pub fn weighted_sum<W: WeightElement>(
    weights: &[f32],
    values: &[W],
    stride: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    for (p, &w) in weights.iter().enumerate() {
        axpy(w, &values[p * stride..p * stride + out.len()], out);
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate = silu(gate) * up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
