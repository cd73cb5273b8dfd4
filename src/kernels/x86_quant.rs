//! AVX2 integer kernels for block-quantized weights (see [`super::quant`]).
//!
//! One block's dot product is one `maddubs` (unsigned 8-bit × signed 8-bit, pairs summed to
//! 16 bits) and one `madd` against ones (to eight 32-bit sums). The eight sums of eight
//! products are reduced together into one vector of exact integer totals, whose lanes are
//! eight weight rows (single-token products) or eight tokens (prompts). Every path, including
//! the one for leftover rows and tokens, then accumulates each output the same way,
//! `acc = fma(d_w·d_x, total, acc)` and `acc = fma(offset_w, sum_x, acc)` per block, so a
//! result does not depend on the tile or the thread that computed it: decode and prompt
//! products agree bit for bit.

use std::arch::x86_64::*;
use std::ops::Range;

use super::quant::{ActBlock, QuantGemm};
use crate::tensor::DType;

/// How one quantized weight format is read.
trait Format {
    /// Bytes per block.
    const BYTES: usize;
    /// True when the values are signed 8-bit (Q8_0); false for unsigned 4-bit values.
    const SIGNED: bool;
    /// True when blocks carry an offset term (Q4_0's −8, Q4_1's minimum).
    const HAS_OFFSET: bool;
    /// The block at `p`: 32 values in element order, its scale and its offset coefficient.
    ///
    /// # Safety
    /// `p` must be valid for reading `BYTES` bytes; the CPU must support AVX2 and F16C.
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
}

/// The f16 at `p` as f32.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p` and F16C support.
    unsafe {
        let bits = u16::from_le_bytes(std::ptr::read_unaligned(p.cast::<[u8; 2]>()));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Sixteen bytes of packed nibbles at `p`, as 32 bytes: low nibbles (elements 0..16), then
/// high nibbles (elements 16..32).
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; register-only operations follow.
    unsafe {
        let packed = _mm_loadu_si128(p.cast());
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(packed, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
        _mm256_set_m128i(hi, lo)
    }
}

struct Q8_0;
struct Q4_0;
struct Q4_1;

impl Format for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const HAS_OFFSET: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        // SAFETY: a Q8_0 block is an f16 scale then 32 bytes, all readable (caller).
        unsafe { (_mm256_loadu_si256(p.add(2).cast()), f16_at(p), 0.0) }
    }
}

impl Format for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    const HAS_OFFSET: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        // SAFETY: a Q4_0 block is an f16 scale then 16 bytes, all readable (caller).
        unsafe {
            let d = f16_at(p);
            (unpack_nibbles(p.add(2)), d, -8.0 * d)
        }
    }
}

impl Format for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const HAS_OFFSET: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        // SAFETY: a Q4_1 block is f16 scale and minimum then 16 bytes, all readable (caller).
        unsafe { (unpack_nibbles(p.add(4)), f16_at(p), f16_at(p.add(2))) }
    }
}

/// Σ w·x over 32 lanes as eight 32-bit partial sums.
#[inline(always)]
unsafe fn block_dot_i32(signed: bool, w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations (the caller enabled AVX2). `maddubs` multiplies
    // unsigned by signed bytes: signed weights are made unsigned by moving their sign onto
    // the activations. No pair sum can saturate 16 bits (at most 2·128·127).
    unsafe {
        let pairs = if signed {
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
        } else {
            _mm256_maddubs_epi16(w, x)
        };
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// How many 8-row tiles ahead single-token products prefetch.
const PREFETCH_TILES: usize = 2;

/// The total of the eight 32-bit lanes of `v`.
#[inline(always)]
unsafe fn total_i32(v: __m256i) -> i32 {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// One output, row `r` × token `t`, block by block (for rows and tokens left over by the
/// 8-lane tiles), with the same arithmetic as the tiles.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `r` and `t` must be in range and row `r` owned by
/// the calling task.
#[inline(always)]
unsafe fn single<F: Format>(g: &QuantGemm<'_>, r: usize, t: usize) {
    let w = g.w_row(r).as_ptr();
    let x = g.x_row(t).as_ptr();
    // SAFETY: the pointers stay inside row `r` and token `t`'s blocks (checked by the slices
    // above); the output element belongs to this task.
    unsafe {
        let mut acc = 0.0f32;
        for b in 0..g.n_blocks {
            let (wq, d, off) = F::load(w.add(b * F::BYTES));
            let xb = &*x.add(b);
            let xq = _mm256_loadu_si256(xb.qs.as_ptr().cast());
            let total = total_i32(block_dot_i32(F::SIGNED, wq, xq));
            acc = (d * xb.d).mul_add(total as f32, acc);
            if F::HAS_OFFSET {
                acc = off.mul_add(xb.sum, acc);
            }
        }
        g.y.write(t * g.n_out + r, acc);
    }
}

/// The eight 8-lane sums `p[0..8]` as one vector of eight totals (exact integer sums).
#[inline(always)]
unsafe fn sum_lanes8(p: [__m256i; 8]) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        let q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        let q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
        // q0 = [p0..p3 of the low 128 bits | p0..p3 of the high], q1 likewise for p4..p7.
        let lo = _mm256_permute2x128_si256::<0x20>(q0, q1);
        let hi = _mm256_permute2x128_si256::<0x31>(q0, q1);
        _mm256_add_epi32(lo, hi)
    }
}

/// Rows `r0..r0 + 8` × one token: the lanes of the accumulator are the rows. Weights are
/// prefetched `PREFETCH_TILES` tiles ahead, since single-token products wait on memory.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows must be in range and owned by the calling
/// task.
#[inline(always)]
unsafe fn tile_rows8<F: Format>(g: &QuantGemm<'_>, r0: usize) {
    let mut w = [std::ptr::null::<u8>(); 8];
    for (i, p) in w.iter_mut().enumerate() {
        *p = g.w_row(r0 + i).as_ptr();
    }
    let x = g.x_row(0).as_ptr();
    // SAFETY: the pointers stay inside rows r0..r0 + 8 and token 0's blocks (checked by the
    // slices above); prefetches may point anywhere; the outputs belong to this task.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let ahead = w[0].wrapping_add(PREFETCH_TILES * 8 * g.row_bytes);
        let step = 8 * F::BYTES;
        for b in 0..g.n_blocks {
            let mut line = b * step;
            while line < (b + 1) * step {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                line += 64;
            }
            let xb = &*x.add(b);
            let xq = _mm256_loadu_si256(xb.qs.as_ptr().cast());
            let mut p = [_mm256_setzero_si256(); 8];
            let mut d = [0.0f32; 8];
            let mut off = [0.0f32; 8];
            for i in 0..8 {
                let (wq, di, oi) = F::load(w[i].add(b * F::BYTES));
                p[i] = block_dot_i32(F::SIGNED, wq, xq);
                d[i] = di;
                off[i] = oi;
            }
            let totals = _mm256_cvtepi32_ps(sum_lanes8(p));
            let scale = _mm256_mul_ps(_mm256_loadu_ps(d.as_ptr()), _mm256_set1_ps(xb.d));
            acc = _mm256_fmadd_ps(scale, totals, acc);
            if F::HAS_OFFSET {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(off.as_ptr()), _mm256_set1_ps(xb.sum), acc);
            }
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for (i, v) in lanes.iter().enumerate() {
            g.y.write(r0 + i, *v);
        }
    }
}

/// Rows `r0..r0 + R` × eight tokens `t0..t0 + 8`, one accumulator per row whose lanes are the
/// tokens: the integer dot products of a block for eight tokens are summed into one vector,
/// then scaled by the weight's scale times the eight tokens' scales in one multiply.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows and tokens must be in range and the rows
/// owned by the calling task.
#[inline(always)]
unsafe fn tile_tokens8<F: Format, const R: usize>(g: &QuantGemm<'_>, r0: usize, t0: usize) {
    let mut w = [std::ptr::null::<u8>(); R];
    for (i, p) in w.iter_mut().enumerate() {
        *p = g.w_row(r0 + i).as_ptr();
    }
    let mut x = [std::ptr::null::<ActBlock>(); 8];
    for (j, p) in x.iter_mut().enumerate() {
        *p = g.x_row(t0 + j).as_ptr();
    }
    let n_tok = g.n_tok;
    assert!(g.x_scales.len() >= g.n_blocks * n_tok && t0 + 8 <= n_tok);
    // SAFETY: weight and activation pointers stay inside the rows checked above; scales and
    // sums are read at b * n_tok + t0 .. + 8 <= n_blocks * n_tok (asserted); the output
    // elements written belong to this task's rows.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..g.n_blocks {
            let xd = _mm256_loadu_ps(g.x_scales.as_ptr().add(b * n_tok + t0));
            let xs = _mm256_loadu_ps(g.x_sums.as_ptr().add(b * n_tok + t0));
            for i in 0..R {
                let (wq, d, off) = F::load(w[i].add(b * F::BYTES));
                let mut p = [_mm256_setzero_si256(); 8];
                for (j, pj) in p.iter_mut().enumerate() {
                    let xq = _mm256_loadu_si256((*x[j].add(b)).qs.as_ptr().cast());
                    *pj = block_dot_i32(F::SIGNED, wq, xq);
                }
                let dots = _mm256_cvtepi32_ps(sum_lanes8(p));
                acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(d), xd), dots, acc[i]);
                if F::HAS_OFFSET {
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(off), xs, acc[i]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            for (j, v) in lanes.iter().enumerate() {
                g.y.write((t0 + j) * g.n_out + r0 + i, *v);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_of<F: Format>(g: &QuantGemm<'_>, rows: Range<usize>) {
    // SAFETY: (every call below) the features are enabled on this function, rows come from
    // the caller's range and tokens from 0..n_tok.
    unsafe {
        if g.n_tok == 1 {
            let mut r = rows.start;
            while r + 8 <= rows.end {
                tile_rows8::<F>(g, r);
                r += 8;
            }
            for r in r..rows.end {
                single::<F>(g, r, 0);
            }
            return;
        }
        let whole = g.n_tok / 8 * 8;
        let mut r = rows.start;
        while r < rows.end {
            let n = if r + 2 <= rows.end { 2 } else { 1 };
            for t in (0..whole).step_by(8) {
                if n == 2 {
                    tile_tokens8::<F, 2>(g, r, t);
                } else {
                    tile_tokens8::<F, 1>(g, r, t);
                }
            }
            for rr in r..r + n {
                for t in whole..g.n_tok {
                    single::<F>(g, rr, t);
                }
            }
            r += n;
        }
    }
}

/// Computes output rows `rows` for every token.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` must lie in `0..g.n_out` and belong to the
/// calling task alone.
pub(crate) unsafe fn gemm_rows(g: &QuantGemm<'_>, rows: Range<usize>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match g.dtype {
            DType::Q8_0 => rows_of::<Q8_0>(g, rows),
            DType::Q4_0 => rows_of::<Q4_0>(g, rows),
            DType::Q4_1 => rows_of::<Q4_1>(g, rows),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a quantized type"),
        }
    }
}
