//! Block-quantized weights (GGML's types, laid out as llama.cpp's `ggml-common.h` lays them
//! out) and their matrix products.
//!
//! Products never dequantize the weights. The activations are quantized to 8 bits per block
//! of [`BLOCK`] values ([`ActBlock`]: a scale `dx`, 32 `i8`, and the sums of each half), and
//! every weight format is read, 32 weights at a time, as a [`WeightBlock`]:
//!
//! - 32 small integer values `q` (signed or not, as the format stores them),
//! - an integer multiplier per half of 16 (the 16-weight scales of Q2_K, Q3_K and Q6_K; 1
//!   for the others),
//! - a float `scale`, and for formats with an offset a float `offset` and an integer
//!   multiplier per half (Q2_K's 16-weight minimums; 1 for the others),
//!
//! so that weight `e` of half `h` is `scale·mul[h]·q[e] + offset·omul[h]`. A block's dot
//! product with an activation block is then two exact integer sums,
//!
//! `total = Σ_h mul[h]·Σ_{e∈h} q[e]·qx[e]` and `osum = Σ_h omul[h]·Σ_{e∈h} qx[e]`,
//!
//! and two fused multiply-adds, `acc = fma(scale·dx, total, acc)` then
//! `acc = fma(offset·dx, osum, acc)`, block after block. Every path (the portable one, the
//! SIMD tiles for one token and for eight, the leftover rows and tokens) computes each output
//! exactly this way, so their results agree bit for bit.
//!
//! The formats' fields (the 256-weight "K" super-blocks hold 8 such blocks):
//! - Q8_0 `w = d·q` (q: i8); Q4_0 `d·q − 8d`; Q4_1 `d·q + m`; Q5_0 `d·q − 16d`; Q5_1
//!   `d·q + m`; IQ4_NL `d·T[q]` (T: a fixed table of 16 i8);
//! - Q4_K, Q5_K: per 32 weights `(d·s)·q − dmin·m` (6-bit s, m); IQ4_XS `d·(s − 32)·T[q]`;
//! - Q6_K `d·s·(q − 32)` and Q3_K `d·(s − 32)·q` with per-16 scales `s`; Q2_K
//!   `d·s·q − dmin·m` with per-16 4-bit `s`, `m`.

use std::ops::Range;

use half::f16;

use super::Isa;
use crate::tensor::DType;
use crate::threading::{DisjointSlice, Par};

/// Values per activation block, and per block of every weight format (the K types' 256-value
/// super-blocks are eight of them).
pub const BLOCK: usize = 32;

/// The values of IQ4_NL and IQ4_XS indices (llama.cpp's `kvalues_iq4nl`).
pub(crate) const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Activations of one block, quantized to 8 bits for integer dot products.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct ActBlock {
    /// Scale: the values are `d * qs[i]`.
    pub d: f32,
    /// Sums of `qs` over each half of 16 values (for the formats' offsets).
    pub half_sums: [i16; 2],
    /// The quantized values.
    pub qs: [i8; BLOCK],
}

/// Quantized activations of several tokens, with each block's scale and half sums also
/// stored block-major (`[n_blocks, n_tok]`) so SIMD kernels load eight tokens' at once.
#[derive(Debug, Default, Clone)]
pub struct QuantActs {
    /// `[n_tok, n_blocks]` blocks.
    blocks: Vec<ActBlock>,
    /// `[n_blocks, n_tok]` scales (`ActBlock::d`).
    scales: Vec<f32>,
    /// `[n_blocks, n_tok]` sums of the first halves.
    sums_lo: Vec<i32>,
    /// `[n_blocks, n_tok]` sums of the second halves.
    sums_hi: Vec<i32>,
}

impl QuantActs {
    /// Buffers for `n_blocks` blocks in all (tokens × blocks per token), allocated now and
    /// fallibly, so that products never allocate.
    pub fn with_capacity(n_blocks: usize) -> crate::Result<QuantActs> {
        let mut acts = QuantActs::default();
        let oom = |_| crate::Error::OutOfMemory("quantized activations".into());
        acts.blocks.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.scales.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.sums_lo.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.sums_hi.try_reserve_exact(n_blocks).map_err(oom)?;
        acts.grow(n_blocks);
        Ok(acts)
    }

    /// Bytes [`QuantActs::with_capacity`] allocates for `n_blocks` blocks.
    pub fn bytes_for(n_blocks: usize) -> usize {
        n_blocks * (std::mem::size_of::<ActBlock>() + 3 * std::mem::size_of::<f32>())
    }

    /// Bytes of memory the buffers hold.
    pub fn heap_bytes(&self) -> usize {
        self.blocks.capacity() * std::mem::size_of::<ActBlock>()
            + (self.scales.capacity() + self.sums_lo.capacity() + self.sums_hi.capacity())
                * std::mem::size_of::<f32>()
    }

    /// Makes room for `n` blocks (without allocating when there is).
    fn grow(&mut self, n: usize) {
        if self.blocks.len() < n {
            self.blocks.resize(n, ActBlock::default());
            self.scales.resize(n, 0.0);
            self.sums_lo.resize(n, 0);
            self.sums_hi.resize(n, 0);
        }
    }

    /// Quantizes `n_tok` rows of `x` (`[n_tok, k]`, `k` a multiple of [`BLOCK`]), growing the
    /// buffers only if they are too small.
    pub fn quantize(&mut self, x: &[f32], n_tok: usize) {
        let n = x.len() / BLOCK;
        self.grow(n);
        quantize_activations(x, &mut self.blocks[..n]);
        let n_blocks = n / n_tok.max(1);
        for t in 0..n_tok {
            for b in 0..n_blocks {
                let block = &self.blocks[t * n_blocks + b];
                let at = b * n_tok + t;
                self.scales[at] = block.d;
                self.sums_lo[at] = block.half_sums[0] as i32;
                self.sums_hi[at] = block.half_sums[1] as i32;
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
/// rounding to nearest; the scale is kept in f32.
pub fn quantize_activations(x: &[f32], out: &mut [ActBlock]) {
    for (xb, ob) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in ob.qs.iter_mut().zip(xb) {
            *q = round_to_i8(v * inv);
        }
        let half = |h: usize| ob.qs[h * 16..(h + 1) * 16].iter().map(|&q| q as i16).sum();
        ob.half_sums = [half(0), half(1)];
        ob.d = d;
    }
}

/// Reads the f16 at `bytes[at..at + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The float and integer factors of the blocks of one super-block (one block for the 32-value
/// formats): see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BlockFactors {
    /// `scale` of each block.
    pub(crate) scale: [f32; 8],
    /// `offset` of each block (0 for formats without one).
    pub(crate) offset: [f32; 8],
    /// Integer multipliers of each block's two halves.
    pub(crate) mul: [[i16; 2]; 8],
    /// Integer multipliers of each block's two half sums in the offset term.
    pub(crate) omul: [[i16; 2]; 8],
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of block `j` (0..8) from their 12 bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's 16 scales (6 bits, stored offset by 32) from their 12 bytes, minus 32.
#[inline(always)]
fn scales_q3_k(b: &[u8]) -> [i16; 16] {
    let mut out = [0i16; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { b[i] & 0x0F } else { b[i - 8] >> 4 };
        let high = (b[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | high << 4) as i16 - 32;
    }
    out
}

/// The factors of the super-block (or block) `b` of `dtype`.
#[inline(always)]
pub(crate) fn factors(dtype: DType, b: &[u8]) -> BlockFactors {
    let mut f = BlockFactors {
        mul: [[1, 1]; 8],
        omul: [[1, 1]; 8],
        ..BlockFactors::default()
    };
    match dtype {
        DType::Q8_0 | DType::IQ4_NL => f.scale[0] = f16_at(b, 0),
        DType::Q4_0 | DType::Q5_0 => {
            let d = f16_at(b, 0);
            f.scale[0] = d;
            f.offset[0] = if dtype == DType::Q4_0 { -8.0 } else { -16.0 } * d;
        }
        DType::Q4_1 | DType::Q5_1 => {
            f.scale[0] = f16_at(b, 0);
            f.offset[0] = f16_at(b, 2);
        }
        DType::Q4_K | DType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &b[4..16]);
                // Exact: an f16 times a 6-bit integer fits an f32.
                f.scale[j] = d * s as f32;
                f.offset[j] = -(dmin * m as f32);
            }
        }
        DType::IQ4_XS => {
            let d = f16_at(b, 0);
            let high = u16::from_le_bytes([b[2], b[3]]);
            for j in 0..8 {
                let low = (b[4 + j / 2] >> (4 * (j % 2))) & 0x0F;
                let s = (low as u16 | ((high >> (2 * j)) & 3) << 4) as i32 - 32;
                f.scale[j] = d * s as f32;
            }
        }
        DType::Q6_K => {
            let d = f16_at(b, 208);
            for j in 0..8 {
                f.scale[j] = d;
                f.mul[j] = [b[192 + 2 * j] as i8 as i16, b[193 + 2 * j] as i8 as i16];
            }
        }
        DType::Q3_K => {
            let d = f16_at(b, 108);
            let s = scales_q3_k(&b[96..108]);
            for j in 0..8 {
                f.scale[j] = d;
                f.mul[j] = [s[2 * j], s[2 * j + 1]];
            }
        }
        DType::Q2_K => {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for j in 0..8 {
                f.scale[j] = d;
                f.offset[j] = -dmin;
                let (lo, hi) = (b[2 * j], b[2 * j + 1]);
                f.mul[j] = [(lo & 0x0F) as i16, (hi & 0x0F) as i16];
                f.omul[j] = [(lo >> 4) as i16, (hi >> 4) as i16];
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a quantized type"),
    }
    f
}

/// True when the format has an offset term.
pub(crate) fn has_offset(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q4_K
            | DType::Q5_K
            | DType::Q2_K
    )
}

/// The 4-bit values of 16 packed bytes: low nibbles (values 0..16), then high nibbles.
#[inline(always)]
fn nibbles(b: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for (j, &v) in b[..16].iter().enumerate() {
        q[j] = (v & 0x0F) as i8;
        q[j + 16] = (v >> 4) as i8;
    }
    q
}

/// The 32 values `q` of block `j` of the super-block (or block) `b` of `dtype`.
#[inline(always)]
pub(crate) fn block_values(dtype: DType, b: &[u8], j: usize) -> [i8; 32] {
    let mut q = [0i8; 32];
    match dtype {
        DType::Q8_0 => q.iter_mut().zip(&b[2..34]).for_each(|(q, &v)| *q = v as i8),
        DType::Q4_0 | DType::IQ4_NL => q = nibbles(&b[2..18]),
        DType::Q4_1 => q = nibbles(&b[4..20]),
        DType::Q5_0 | DType::Q5_1 => {
            let at = if dtype == DType::Q5_0 { 2 } else { 4 };
            let high = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            q = nibbles(&b[at + 4..at + 20]);
            for (e, v) in q.iter_mut().enumerate() {
                *v |= (((high >> e) & 1) << 4) as i8;
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let qs = if dtype == DType::Q4_K { 16 } else { 48 };
            let packed = &b[qs + 32 * (j / 2)..qs + 32 * (j / 2) + 32];
            for (l, v) in q.iter_mut().enumerate() {
                *v = ((packed[l] >> (4 * (j % 2))) & 0x0F) as i8;
                if dtype == DType::Q5_K {
                    *v |= (((b[16 + l] >> j) & 1) << 4) as i8;
                }
            }
        }
        DType::IQ4_XS => q = nibbles(&b[8 + 16 * j..24 + 16 * j]),
        DType::Q6_K => {
            let (n, g) = (j / 4, j % 4);
            let low = &b[64 * n + 32 * (g & 1)..];
            let high = &b[128 + 32 * n..];
            for (l, v) in q.iter_mut().enumerate() {
                let lo = (low[l] >> (4 * (g / 2))) & 0x0F;
                let hi = (high[l] >> (2 * g)) & 3;
                *v = (lo | hi << 4) as i8 - 32;
            }
        }
        DType::Q3_K => {
            let (h, s) = (j / 4, j % 4);
            for (l, v) in q.iter_mut().enumerate() {
                let low = (b[32 + 32 * h + l] >> (2 * s)) & 3;
                let high = (b[l] >> j) & 1;
                *v = (low | high << 2) as i8 - 4;
            }
        }
        DType::Q2_K => {
            let (h, s) = (j / 4, j % 4);
            for (l, v) in q.iter_mut().enumerate() {
                *v = ((b[16 + 32 * h + l] >> (2 * s)) & 3) as i8;
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a quantized type"),
    }
    if matches!(dtype, DType::IQ4_NL | DType::IQ4_XS) {
        q.iter_mut().for_each(|v| *v = IQ4_VALUES[*v as usize]);
    }
    q
}

/// Dequantizes whole blocks of `dtype` into `out` (`out.len()` values), with llama.cpp's
/// arithmetic (its `dequantize_row_*`), so the values are bit for bit the ones it uses.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let (len, size) = (dtype.block_len(), dtype.block_bytes());
    for (b, o) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(len)) {
        let f = factors(dtype, b);
        for (j, o) in o.chunks_exact_mut(BLOCK).enumerate() {
            let q = block_values(dtype, b, j);
            let (scale, offset) = (f.scale[j], f.offset[j]);
            for (e, (o, &q)) in o.iter_mut().zip(&q).enumerate() {
                let h = e / 16;
                *o = match dtype {
                    // `(q − 8)·d`, `(q − 16)·d`: the offset folded into the integer.
                    DType::Q4_0 => (q as i32 - 8) as f32 * scale,
                    DType::Q5_0 => (q as i32 - 16) as f32 * scale,
                    DType::Q4_1 | DType::Q5_1 => q as f32 * scale + offset,
                    DType::Q4_K | DType::Q5_K => scale * q as f32 + offset,
                    DType::Q2_K => {
                        (scale * f.mul[j][h] as f32) * q as f32 + offset * f.omul[j][h] as f32
                    }
                    DType::Q6_K | DType::Q3_K => (scale * f.mul[j][h] as f32) * q as f32,
                    _ => scale * q as f32,
                };
            }
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
/// the portable reference of the SIMD kernels, with the same arithmetic.
pub fn dot_row(dtype: DType, w: &[u8], x: &[ActBlock]) -> f32 {
    let per = dtype.block_len() / BLOCK;
    let offset = has_offset(dtype);
    let mut acc = 0.0f32;
    for (sb, xs) in w.chunks_exact(dtype.block_bytes()).zip(x.chunks(per)) {
        let f = factors(dtype, sb);
        for (j, xb) in xs.iter().enumerate() {
            let q = block_values(dtype, sb, j);
            let mut total = 0i32;
            for h in 0..2 {
                let half: i32 = (h * 16..h * 16 + 16)
                    .map(|e| q[e] as i32 * xb.qs[e] as i32)
                    .sum();
                total += f.mul[j][h] as i32 * half;
            }
            acc = (f.scale[j] * xb.d).mul_add(total as f32, acc);
            if offset {
                let osum = f.omul[j][0] as i32 * xb.half_sums[0] as i32
                    + f.omul[j][1] as i32 * xb.half_sums[1] as i32;
                acc = (f.offset[j] * xb.d).mul_add(osum as f32, acc);
            }
        }
    }
    acc
}

/// One quantized matrix product shared by the tasks that compute parts of it.
pub(crate) struct QuantGemm<'a> {
    /// Weight format.
    pub(crate) dtype: DType,
    /// `[n_out, k / block_len]` (super-)blocks, row after row.
    pub(crate) w: &'a [u8],
    /// Bytes per weight row.
    pub(crate) row_bytes: usize,
    /// `[n_tok, k / BLOCK]` quantized activations.
    pub(crate) x: &'a [ActBlock],
    /// `[k / BLOCK, n_tok]` the activations' block scales.
    pub(crate) x_scales: &'a [f32],
    /// `[k / BLOCK, n_tok]` the activations' first-half sums.
    pub(crate) x_sums_lo: &'a [i32],
    /// `[k / BLOCK, n_tok]` the activations' second-half sums.
    pub(crate) x_sums_hi: &'a [i32],
    /// 32-value blocks per row.
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
    assert!(
        k % dtype.block_len() == 0,
        "quantized rows must be whole blocks"
    );
    let n_blocks = k / BLOCK;
    let row_bytes = k / dtype.block_len() * dtype.block_bytes();
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
        x_sums_lo: &act.sums_lo[..n],
        x_sums_hi: &act.sums_hi[..n],
        n_blocks,
        n_tok,
        y: &y,
        n_out,
    };
    par.for_ranges(n_out, 16, |rows| gemm_rows(isa, &g, rows));
}
