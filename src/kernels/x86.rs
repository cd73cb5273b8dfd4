//! AVX2 + FMA + F16C kernels for x86-64, used only after run-time detection of those features.
//!
//! Every dot product here keeps one 8-lane accumulator per (weight row, token) pair and
//! reduces it exactly as [`scalar::dot`] does, so a result does not depend on how rows and
//! tokens were grouped into tiles, nor on the thread that computed it.

use std::arch::x86_64::*;
use std::mem::size_of;
use std::ops::Range;

use half::{bf16, f16};

use super::scalar::{self, LANES};
use super::{Gemm, WeightElement};

/// Weight element types that AVX2 can load eight at a time as f32.
pub trait Avx2Load: WeightElement {
    /// Loads eight consecutive elements starting at `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading eight elements, and the CPU must support AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Avx2Load for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable f32 at `p`; loadu has no alignment need.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Avx2Load for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: eight f16 are 16 readable bytes at `p` (caller's guarantee); F16C is present.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl Avx2Load for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: eight bf16 are 16 readable bytes at `p` (caller's guarantee). A bf16 is the
        // upper half of an f32, so widening to 32 bits and shifting left by 16 converts exactly.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
}

/// Horizontal sum in the order of [`reduce_lanes`].
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only AVX operations; the caller enabled AVX2.
    unsafe {
        let pairs = _mm256_hadd_ps(v, v);
        let quads = _mm256_hadd_ps(pairs, pairs);
        _mm_cvtss_f32(_mm_add_ss(
            _mm256_castps256_ps128(quads),
            _mm256_extractf128_ps::<1>(quads),
        ))
    }
}

/// Four horizontal sums at once, each in the order of [`reduce_lanes`].
#[inline(always)]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> [f32; 4] {
    // SAFETY: register-only AVX operations, then a store into a local array of four f32.
    unsafe {
        let quads = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let sums = _mm_add_ps(
            _mm256_castps256_ps128(quads),
            _mm256_extractf128_ps::<1>(quads),
        );
        let mut out = [0.0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), sums);
        out
    }
}

/// Computes the dot products of weight rows `r..r + R` with tokens `t..t + C`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows and tokens must exist in `g`, and this
/// task must own the corresponding elements of `g.y`.
#[inline(always)]
// Indexing keeps the R x C accumulator grid in registers after unrolling.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<W: Avx2Load, const R: usize, const C: usize>(g: &Gemm<'_, W>, r: usize, t: usize) {
    let k = g.k;
    let whole = k / LANES * LANES;
    let wp = g.w.as_ptr();
    let xp = g.x.as_ptr();
    // SAFETY: all pointer offsets stay within rows r..r+R of `w` and tokens t..t+C of `x`,
    // which the caller guarantees exist; the features are enabled by the caller.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        // Single-token products are bound by memory: fetch the tile `PREFETCH_TILES` ahead
        // (contiguous rows), a few cache lines per step, as one sequential stream.
        let ahead = (wp as *const u8).wrapping_add((r + PREFETCH_TILES * R) * k * size_of::<W>());
        let lines_per_step = (R * LANES * size_of::<W>()).div_ceil(64);
        let mut kk = 0;
        while kk < whole {
            if C == 1 {
                let line = kk / LANES * lines_per_step;
                for l in 0..lines_per_step {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add((line + l) * 64).cast());
                }
            }
            let mut wv = [_mm256_setzero_ps(); R];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = W::load8(wp.add((r + i) * k + kk));
            }
            for c in 0..C {
                let xv = _mm256_loadu_ps(xp.add((t + c) * k + kk));
                for i in 0..R {
                    acc[i][c] = _mm256_fmadd_ps(wv[i], xv, acc[i][c]);
                }
            }
            kk += LANES;
        }
        for c in 0..C {
            let mut sums = [0.0f32; R];
            if R == 4 {
                sums.copy_from_slice(&hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
            } else {
                for i in 0..R {
                    sums[i] = hsum(acc[i][c]);
                }
            }
            for i in 0..R {
                let mut sum = sums[i];
                for j in whole..k {
                    sum += (*wp.add((r + i) * k + j)).to_f32() * *xp.add((t + c) * k + j);
                }
                g.y.write((t + c) * g.n_out + r + i, sum);
            }
        }
    }
}

/// Rows `r..r + R` against `tokens`, `TOKEN_TILE` tokens at a time.
#[inline(always)]
unsafe fn row_tile<W: Avx2Load, const R: usize>(g: &Gemm<'_, W>, r: usize, tokens: Range<usize>) {
    let mut t = tokens.start;
    // SAFETY: forwarded from `gemm_rows`; every call names rows and tokens that exist.
    unsafe {
        while t + TOKEN_TILE <= tokens.end {
            tile::<W, R, TOKEN_TILE>(g, r, t);
            t += TOKEN_TILE;
        }
        while t < tokens.end {
            tile::<W, R, 1>(g, r, t);
            t += 1;
        }
    }
}

/// How many row tiles ahead single-token products prefetch.
const PREFETCH_TILES: usize = 2;

/// Weight rows per register tile.
const ROW_TILE: usize = 4;
/// Tokens per register tile.
const TOKEN_TILE: usize = 2;
/// Weight rows per cache block: their bytes stay in L2 while every token block passes.
const ROW_BLOCK: usize = 64;
/// Tokens per cache block: their activations stay in L2 while the block's rows pass.
const TOKEN_BLOCK: usize = 128;

/// `y[t, rows] = w[rows, :] · x[t, :]` for every token `t`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `g` must be consistent (see [`Gemm`]), and no
/// other task may write the columns `rows` of `g.y`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_rows<W: Avx2Load>(g: &Gemm<'_, W>, rows: Range<usize>) {
    let mut block = rows.start;
    while block < rows.end {
        let block_end = (block + ROW_BLOCK).min(rows.end);
        let mut t0 = 0;
        while t0 < g.n_tok {
            let tokens = t0..(t0 + TOKEN_BLOCK).min(g.n_tok);
            let mut r = block;
            // SAFETY: rows r..r+ROW_TILE (or r) lie inside `rows`, which the caller guarantees
            // are rows of `w` and columns of `y` owned by this task; tokens lie in 0..n_tok.
            unsafe {
                while r + ROW_TILE <= block_end {
                    row_tile::<W, ROW_TILE>(g, r, tokens.clone());
                    r += ROW_TILE;
                }
                while r < block_end {
                    row_tile::<W, 1>(g, r, tokens.clone());
                    r += 1;
                }
            }
            t0 = tokens.end;
        }
        block = block_end;
    }
}

/// Dot product of two f32 vectors of equal length.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_with(a, b) }
}

/// Dot product of an f32 vector with a vector of `W` of equal length: eight lanes, reduced
/// by [`hsum`], then the leftover elements one by one.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_with<W: Avx2Load>(a: &[f32], b: &[W]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n / LANES * LANES;
    // SAFETY: every load reads eight elements below `whole <= n` of both slices.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < whole {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                W::load8(b.as_ptr().add(i)),
                acc,
            );
            i += LANES;
        }
        let mut sum = hsum(acc);
        for j in whole..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }
}

/// `y += a * w`, eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy<W: Avx2Load>(a: f32, w: &[W], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let whole = n / LANES * LANES;
    // SAFETY: every access stays below `whole <= n` in both slices.
    unsafe {
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i < whole {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(av, W::load8(w.as_ptr().add(i)), _mm256_loadu_ps(yp)),
            );
            i += LANES;
        }
    }
    scalar::axpy(a, &w[whole..n], &mut y[whole..n]);
}

/// `out[p] = scale * dot(q, keys[p * stride..][..q.len()])`, four positions at a time with `q`
/// held in registers; each dot product is reduced exactly as [`dot_f32`] reduces it. Keys are f32 or f16 (a cache of either type).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attention_scores<W: Avx2Load>(
    q: &[f32],
    keys: &[W],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (d, n) = (q.len(), out.len());
    assert!(
        n == 0 || (n - 1) * stride + d <= keys.len(),
        "attention_scores: keys too short"
    );
    let whole = d / LANES * LANES;
    let mut p = 0;
    // SAFETY: position p..p+4 rows start at p*stride and hold d elements, inside `keys`
    // (asserted); q loads stay below `whole <= d`.
    unsafe {
        while p + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < whole {
                let qv = _mm256_loadu_ps(q.as_ptr().add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, W::load8(keys.as_ptr().add((p + j) * stride + i)), *a);
                }
                i += LANES;
            }
            let sums = hsum4(acc[0], acc[1], acc[2], acc[3]);
            for (j, mut sum) in sums.into_iter().enumerate() {
                for i in whole..d {
                    sum += q[i] * keys[(p + j) * stride + i].to_f32();
                }
                out[p + j] = sum * scale;
            }
            p += 4;
        }
        while p < n {
            out[p] = dot_with(q, &keys[p * stride..p * stride + d]) * scale;
            p += 1;
        }
    }
}

/// `out[j] = Σ_p weights[p] * values[p * stride + j]`: 32 outputs at a time kept in registers
/// across all positions, each summed in position order with fused multiply-adds.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_sum<W: Avx2Load>(
    weights: &[f32],
    values: &[W],
    stride: usize,
    out: &mut [f32],
) {
    let (d, n) = (out.len(), weights.len());
    assert!(
        n == 0 || (n - 1) * stride + d <= values.len(),
        "weighted_sum: values too short"
    );
    let mut j = 0;
    // SAFETY: every load reads lanes j..j+8 (or j..j+32) < d of a row inside `values`
    // (asserted above); stores write inside `out`.
    unsafe {
        while j + 4 * LANES <= d {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (p, &w) in weights.iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let row = values.as_ptr().add(p * stride + j);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, W::load8(row.add(c * LANES)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(j + c * LANES), *a);
            }
            j += 4 * LANES;
        }
        while j + LANES <= d {
            let mut acc = _mm256_setzero_ps();
            for (p, &w) in weights.iter().enumerate() {
                acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(w),
                    W::load8(values.as_ptr().add(p * stride + j)),
                    acc,
                );
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(j), acc);
            j += LANES;
        }
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = 0.0;
        for (p, &w) in weights.iter().enumerate() {
            *o += w * values[p * stride + jj].to_f32();
        }
    }
}

/// e^x for eight lanes: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor series to r^6
/// (relative error about 1e-7), times 2^n built in the exponent bits.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register-only AVX2/FMA operations; the caller enabled the features.
    unsafe {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split in a part exact in f32 and a remainder, so n * LN2_HI is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }
}

/// Softmax in place, eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let whole = n / LANES * LANES;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // SAFETY: loads and stores stay below `whole <= n`; the tail goes through exp8 via a
    // local buffer.
    unsafe {
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < whole {
            let p = x.as_mut_ptr().add(i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
            _mm256_storeu_ps(p, e);
            sum = _mm256_add_ps(sum, e);
            i += LANES;
        }
        let mut total = hsum(sum);
        if whole < n {
            let mut tail = [f32::NEG_INFINITY; LANES];
            tail[..n - whole].copy_from_slice(&x[whole..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            for (v, t) in x[whole..].iter_mut().zip(tail) {
                *v = t;
                total += t;
            }
        }
        let inv = _mm256_set1_ps(1.0 / total);
        i = 0;
        while i < whole {
            let p = x.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), inv));
            i += LANES;
        }
        for v in &mut x[whole..] {
            *v *= 1.0 / total;
        }
    }
}

/// `gate = silu(gate) * up`, eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let whole = n / LANES * LANES;
    let mut i = 0;
    // SAFETY: loads and stores stay below `whole <= n` in both slices.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        while i < whole {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(
                gate.as_mut_ptr().add(i),
                _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i))),
            );
            i += LANES;
        }
    }
    scalar::silu_mul(&mut gate[whole..n], &up[whole..n]);
}
