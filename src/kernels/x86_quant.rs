//! AVX2 integer kernels for block-quantized weights (see [`super::quant`] for the
//! decomposition every format is read with).
//!
//! A weight block's 32 values sit in one register (unsigned bytes, or signed ones whose sign
//! is moved onto the activations). One block's dot product with an activation block is one
//! `maddubs` (pairs of byte products summed to 16 bits) and one `madd` against the halves'
//! integer multipliers (to eight 32-bit sums). The eight sums of eight products are reduced
//! together into one vector of exact integer totals, whose lanes are eight weight rows
//! (products over fewer than eight tokens: one token's decode, a few sessions stepped
//! together, a prompt's last tokens) or eight tokens (prompts, larger batches). Every path,
//! including the one for leftover rows, then accumulates each output the same way,
//! `acc = fma(scale·dx, total, acc)` and `acc = fma(offset·dx, osum, acc)` per block, so a
//! result does not depend on the tile or the thread that computed it: decode and prompt
//! products agree bit for bit, and with the portable kernel.

use std::arch::x86_64::*;
use std::ops::Range;

use super::quant::{factors, BlockFactors, QuantGemm, IQ4_VALUES};
use crate::tensor::DType;

/// How one quantized weight format is read.
trait Format {
    /// The format.
    const DTYPE: DType;
    /// Bytes per (super-)block.
    const BYTES: usize;
    /// 32-value blocks per (super-)block: 1, or 8 for the 256-value formats.
    const BLOCKS: usize;
    /// True when the values are signed bytes; false for unsigned ones.
    const SIGNED: bool;
    /// True when blocks carry an offset term.
    const HAS_OFFSET: bool;
    /// True when the two halves of a block have integer multipliers other than 1.
    const HALF_MULS: bool;
    /// True when the offset term weighs the two half sums differently (Q2_K's minimums).
    const HALF_OFFSETS: bool;
    /// The 32 values of block `j` of the (super-)block at `p`, in element order.
    ///
    /// # Safety
    /// `p` must be valid for reading `BYTES` bytes; the CPU must support AVX2.
    unsafe fn values(p: *const u8, j: usize) -> __m256i;
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

/// Byte `e` of the result is 0xFF where bit `e` of `bits` is set, else 0.
#[inline(always)]
unsafe fn bytes_of_bits(bits: u32) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        // Byte e holds byte e / 8 of `bits`, then only its bit e % 8 is kept.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
    }
}

/// The bytes of `v` shifted right by `n` bits (within each byte) and masked with `mask`.
#[inline(always)]
unsafe fn shift_mask(v: __m256i, n: usize, mask: i8) -> __m256i {
    // SAFETY: register-only AVX2 operations; the mask removes the bits a 16-bit shift moves
    // across the byte boundary.
    unsafe {
        _mm256_and_si256(
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32)),
            _mm256_set1_epi8(mask),
        )
    }
}

/// IQ4_NL/IQ4_XS indices (bytes 0..16) looked up in their table of values.
#[inline(always)]
unsafe fn iq4_lookup(indices: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations; the 16-byte table is loaded from a constant.
    unsafe {
        let table = _mm_loadu_si128(IQ4_VALUES.as_ptr().cast());
        _mm256_shuffle_epi8(_mm256_set_m128i(table, table), indices)
    }
}

/// Loads 32 bytes at `p`.
#[inline(always)]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Defines a format: its type, sizes, flags and how to read block `j` at `p`.
macro_rules! format {
    ($name:ident, $dtype:ident, $bytes:expr, $blocks:expr, signed: $signed:expr,
     offset: $offset:expr, half_muls: $hm:expr, half_offsets: $ho:expr,
     |$p:ident, $j:ident| $values:expr) => {
        #[allow(non_camel_case_types)]
        struct $name;
        impl Format for $name {
            const DTYPE: DType = DType::$dtype;
            const BYTES: usize = $bytes;
            const BLOCKS: usize = $blocks;
            const SIGNED: bool = $signed;
            const HAS_OFFSET: bool = $offset;
            const HALF_MULS: bool = $hm;
            const HALF_OFFSETS: bool = $ho;
            #[inline(always)]
            #[allow(unused_variables)]
            unsafe fn values($p: *const u8, $j: usize) -> __m256i {
                // SAFETY: every read stays inside the format's `BYTES` bytes at `p`
                // (the caller's contract), at the offsets of llama.cpp's block layout.
                unsafe { $values }
            }
        }
    };
}

format!(Q8_0, Q8_0, 34, 1, signed: true, offset: false, half_muls: false, half_offsets: false,
    |p, j| load32(p.add(2)));
format!(Q4_0, Q4_0, 18, 1, signed: false, offset: true, half_muls: false, half_offsets: false,
    |p, j| unpack_nibbles(p.add(2)));
format!(Q4_1, Q4_1, 20, 1, signed: false, offset: true, half_muls: false, half_offsets: false,
    |p, j| unpack_nibbles(p.add(4)));
format!(Q5_0, Q5_0, 22, 1, signed: false, offset: true, half_muls: false, half_offsets: false,
|p, j| {
    let high = bytes_of_bits(std::ptr::read_unaligned(p.add(2).cast::<u32>()));
    _mm256_or_si256(unpack_nibbles(p.add(6)), _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
});
format!(Q5_1, Q5_1, 24, 1, signed: false, offset: true, half_muls: false, half_offsets: false,
|p, j| {
    let high = bytes_of_bits(std::ptr::read_unaligned(p.add(4).cast::<u32>()));
    _mm256_or_si256(unpack_nibbles(p.add(8)), _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
});
format!(IQ4_NL, IQ4_NL, 18, 1, signed: true, offset: false, half_muls: false, half_offsets: false,
    |p, j| iq4_lookup(unpack_nibbles(p.add(2))));
format!(Q4_K, Q4_K, 144, 8, signed: false, offset: true, half_muls: false, half_offsets: false,
    |p, j| shift_mask(load32(p.add(16 + 32 * (j / 2))), 4 * (j % 2), 0x0F));
format!(Q5_K, Q5_K, 176, 8, signed: false, offset: true, half_muls: false, half_offsets: false,
|p, j| {
    let low = shift_mask(load32(p.add(48 + 32 * (j / 2))), 4 * (j % 2), 0x0F);
    let high = _mm256_slli_epi16::<4>(shift_mask(load32(p.add(16)), j, 1));
    _mm256_or_si256(low, high)
});
format!(IQ4_XS, IQ4_XS, 136, 8, signed: true, offset: false, half_muls: false, half_offsets: false,
    |p, j| iq4_lookup(unpack_nibbles(p.add(8 + 16 * j))));
format!(Q6_K, Q6_K, 210, 8, signed: true, offset: false, half_muls: true, half_offsets: false,
|p, j| {
    let (n, g) = (j / 4, j % 4);
    let low = shift_mask(load32(p.add(64 * n + 32 * (g & 1))), 4 * (g / 2), 0x0F);
    let high = _mm256_slli_epi16::<4>(shift_mask(load32(p.add(128 + 32 * n)), 2 * g, 3));
    _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32))
});
format!(Q3_K, Q3_K, 110, 8, signed: true, offset: false, half_muls: true, half_offsets: false,
|p, j| {
    let (h, s) = (j / 4, j % 4);
    let low = shift_mask(load32(p.add(32 + 32 * h)), 2 * s, 3);
    let high = _mm256_slli_epi16::<2>(shift_mask(load32(p), j, 1));
    _mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(4))
});
format!(Q2_K, Q2_K, 84, 8, signed: false, offset: true, half_muls: true, half_offsets: true,
    |p, j| shift_mask(load32(p.add(16 + 32 * (j / 4))), 2 * (j % 4), 3));

/// The halves' multipliers `[m0, m1]` as sixteen 16-bit lanes (eight of each).
#[inline(always)]
unsafe fn half_muls(m: [i16; 2]) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe { _mm256_set_m128i(_mm_set1_epi16(m[1]), _mm_set1_epi16(m[0])) }
}

/// Σ w·x over 32 lanes, each half times its multiplier, as eight 32-bit partial sums.
#[inline(always)]
unsafe fn block_dot<F: Format>(w: __m256i, x: __m256i, muls: __m256i) -> __m256i {
    // SAFETY: register-only AVX2 operations (the caller enabled AVX2). `maddubs` multiplies
    // unsigned by signed bytes: signed weights are made unsigned by moving their sign onto
    // the activations. No pair sum can saturate 16 bits (at most 2·128·127), and no 32-bit
    // sum can overflow (at most 2·(2·128·127)·128).
    unsafe {
        let pairs = if F::SIGNED {
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
        } else {
            _mm256_maddubs_epi16(w, x)
        };
        _mm256_madd_epi16(pairs, muls)
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

/// The eight 8-lane sums `p[0..8]` as one vector of eight totals (exact integer sums).
#[inline(always)]
unsafe fn sum_lanes8(p: [__m256i; 8]) -> __m256i {
    // SAFETY: register-only AVX2 operations.
    unsafe {
        // Interleave-and-add instead of `hadd` (integer sums are exact in any order).
        let pair = |a: __m256i, b: __m256i| {
            _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
        };
        let quad = |ab: __m256i, cd: __m256i| {
            _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd))
        };
        let q0 = quad(pair(p[0], p[1]), pair(p[2], p[3]));
        let q1 = quad(pair(p[4], p[5]), pair(p[6], p[7]));
        // q0 = [p0..p3 of the low 128 bits | p0..p3 of the high], q1 likewise for p4..p7.
        let lo = _mm256_permute2x128_si256::<0x20>(q0, q1);
        let hi = _mm256_permute2x128_si256::<0x31>(q0, q1);
        _mm256_add_epi32(lo, hi)
    }
}

/// The offset term's integer sum of one block: `omul[0]·lo + omul[1]·hi`.
#[inline(always)]
fn offset_sum<F: Format>(omul: [i16; 2], lo: i32, hi: i32) -> i32 {
    if F::HALF_OFFSETS {
        omul[0] as i32 * lo + omul[1] as i32 * hi
    } else {
        lo + hi
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
    let w = g.w_row(r);
    let x = g.x_row(t);
    // SAFETY: the pointers stay inside row `r` and token `t`'s blocks (checked by the slices
    // above); the output element belongs to this task.
    unsafe {
        let mut acc = 0.0f32;
        for (sb, wsb) in w.chunks_exact(F::BYTES).enumerate() {
            let f = factors(F::DTYPE, wsb);
            for j in 0..F::BLOCKS {
                let xb = &x[sb * F::BLOCKS + j];
                let xq = _mm256_loadu_si256(xb.qs.as_ptr().cast());
                let wq = F::values(wsb.as_ptr(), j);
                let total = total_i32(block_dot::<F>(wq, xq, half_muls(f.mul[j])));
                acc = (f.scale[j] * xb.d).mul_add(total as f32, acc);
                if F::HAS_OFFSET {
                    let (lo, hi) = (xb.half_sums[0] as i32, xb.half_sums[1] as i32);
                    let osum = offset_sum::<F>(f.omul[j], lo, hi);
                    acc = (f.offset[j] * xb.d).mul_add(osum as f32, acc);
                }
            }
        }
        g.y.write(t * g.n_out + r, acc);
    }
}

/// The factors of eight rows' super-blocks, arranged for eight-lane loads (lane = row).
#[derive(Default)]
struct RowFactors {
    scale: [[f32; 8]; 8],
    offset: [[f32; 8]; 8],
    mul: [[[i16; 2]; 8]; 8],
    omul: [[[i16; 2]; 8]; 8],
}

impl RowFactors {
    fn set(&mut self, row: usize, f: &BlockFactors, blocks: usize) {
        for j in 0..blocks {
            self.scale[j][row] = f.scale[j];
            self.offset[j][row] = f.offset[j];
            self.mul[j][row] = f.mul[j];
            self.omul[j][row] = f.omul[j];
        }
    }
}

/// Rows `r0..r0 + 8` × `T` tokens `t0..t0 + T` (`T` is 1, 2 or 4): the lanes of each
/// token's accumulator are the rows, so a block's weight values are read once for all `T`
/// tokens. Weights are prefetched `PREFETCH_TILES` tiles ahead, since products over few
/// tokens wait on memory.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows and tokens must be in range and the rows
/// owned by the calling task.
#[inline(always)]
unsafe fn tile_rows8<F: Format, const T: usize>(g: &QuantGemm<'_>, r0: usize, t0: usize) {
    let mut w = [std::ptr::null::<u8>(); 8];
    for (i, p) in w.iter_mut().enumerate() {
        *p = g.w_row(r0 + i).as_ptr();
    }
    let mut x = [&[][..]; T];
    for (k, xk) in x.iter_mut().enumerate() {
        *xk = g.x_row(t0 + k);
    }
    let n_super = g.row_bytes / F::BYTES;
    let mut f = RowFactors::default();
    // SAFETY: the pointers stay inside rows r0..r0 + 8 and the tokens' blocks (checked by the
    // slices above); prefetches may point anywhere; the outputs belong to this task.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        let ahead = w[0].wrapping_add(PREFETCH_TILES * 8 * g.row_bytes);
        let step = 8 * F::BYTES;
        for sb in 0..n_super {
            // This super-block's share of the tile two tiles ahead (the tile is contiguous).
            let mut line = sb * step;
            while line < (sb + 1) * step {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                line += 64;
            }
            for (i, &wi) in w.iter().enumerate() {
                let block = std::slice::from_raw_parts(wi.add(sb * F::BYTES), F::BYTES);
                f.set(i, &factors(F::DTYPE, block), F::BLOCKS);
            }
            for j in 0..F::BLOCKS {
                let mut wq = [_mm256_setzero_si256(); 8];
                for (i, wqi) in wq.iter_mut().enumerate() {
                    *wqi = F::values(w[i].add(sb * F::BYTES), j);
                }
                let scale_w = _mm256_loadu_ps(f.scale[j].as_ptr());
                let offset_w = _mm256_loadu_ps(f.offset[j].as_ptr());
                for (k, xk) in x.iter().enumerate() {
                    let xb = &xk[sb * F::BLOCKS + j];
                    let xq = _mm256_loadu_si256(xb.qs.as_ptr().cast());
                    let mut p = [_mm256_setzero_si256(); 8];
                    for (i, pi) in p.iter_mut().enumerate() {
                        let muls = if F::HALF_MULS {
                            half_muls(f.mul[j][i])
                        } else {
                            _mm256_set1_epi16(1)
                        };
                        *pi = block_dot::<F>(wq[i], xq, muls);
                    }
                    let totals = _mm256_cvtepi32_ps(sum_lanes8(p));
                    let xd = _mm256_set1_ps(xb.d);
                    acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(scale_w, xd), totals, acc[k]);
                    if F::HAS_OFFSET {
                        let (lo, hi) = (xb.half_sums[0] as i32, xb.half_sums[1] as i32);
                        let osum = if F::HALF_OFFSETS {
                            let mut osum = [0i32; 8];
                            for (i, o) in osum.iter_mut().enumerate() {
                                *o = offset_sum::<F>(f.omul[j][i], lo, hi);
                            }
                            _mm256_cvtepi32_ps(_mm256_loadu_si256(osum.as_ptr().cast()))
                        } else {
                            _mm256_set1_ps((lo + hi) as f32)
                        };
                        acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(offset_w, xd), osum, acc[k]);
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            for (i, v) in lanes.iter().enumerate() {
                g.y.write((t0 + k) * g.n_out + r0 + i, *v);
            }
        }
    }
}

/// Rows `r0..r0 + 8` × tokens `tokens` (fewer than eight): groups of 4, 2 and 1 token, the
/// rows staying in the L1 cache between groups.
///
/// # Safety
/// As [`tile_rows8`].
#[inline(always)]
unsafe fn tile_rows8_few<F: Format>(g: &QuantGemm<'_>, r0: usize, tokens: Range<usize>) {
    let mut t = tokens.start;
    // SAFETY: forwarded from the caller; every group lies inside `tokens`.
    unsafe {
        if tokens.end - t >= 4 {
            tile_rows8::<F, 4>(g, r0, t);
            t += 4;
        }
        if tokens.end - t >= 2 {
            tile_rows8::<F, 2>(g, r0, t);
            t += 2;
        }
        if tokens.end - t == 1 {
            tile_rows8::<F, 1>(g, r0, t);
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
    let mut x = [std::ptr::null::<super::quant::ActBlock>(); 8];
    for (j, p) in x.iter_mut().enumerate() {
        *p = g.x_row(t0 + j).as_ptr();
    }
    let n_tok = g.n_tok;
    let n_super = g.row_bytes / F::BYTES;
    assert!(
        g.x_scales.len() >= g.n_blocks * n_tok
            && g.x_sums_lo.len() >= g.n_blocks * n_tok
            && g.x_sums_hi.len() >= g.n_blocks * n_tok
            && t0 + 8 <= n_tok
    );
    // SAFETY: weight and activation pointers stay inside the rows checked above; scales and
    // sums are read at b * n_tok + t0 .. + 8 <= n_blocks * n_tok (asserted); the output
    // elements written belong to this task's rows.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for sb in 0..n_super {
            let mut f = [BlockFactors::default(); R];
            for (fi, &wi) in f.iter_mut().zip(&w) {
                *fi = factors(
                    F::DTYPE,
                    std::slice::from_raw_parts(wi.add(sb * F::BYTES), F::BYTES),
                );
            }
            for j in 0..F::BLOCKS {
                let b = sb * F::BLOCKS + j;
                let xd = _mm256_loadu_ps(g.x_scales.as_ptr().add(b * n_tok + t0));
                let osums = if F::HAS_OFFSET {
                    let lo = _mm256_loadu_si256(g.x_sums_lo.as_ptr().add(b * n_tok + t0).cast());
                    let hi = _mm256_loadu_si256(g.x_sums_hi.as_ptr().add(b * n_tok + t0).cast());
                    (lo, hi)
                } else {
                    (_mm256_setzero_si256(), _mm256_setzero_si256())
                };
                for i in 0..R {
                    let wq = F::values(w[i].add(sb * F::BYTES), j);
                    let muls = if F::HALF_MULS {
                        half_muls(f[i].mul[j])
                    } else {
                        _mm256_set1_epi16(1)
                    };
                    let mut p = [_mm256_setzero_si256(); 8];
                    for (k, pk) in p.iter_mut().enumerate() {
                        let xq = _mm256_loadu_si256((*x[k].add(b)).qs.as_ptr().cast());
                        *pk = block_dot::<F>(wq, xq, muls);
                    }
                    let dots = _mm256_cvtepi32_ps(sum_lanes8(p));
                    let scale = _mm256_mul_ps(_mm256_set1_ps(f[i].scale[j]), xd);
                    acc[i] = _mm256_fmadd_ps(scale, dots, acc[i]);
                    if F::HAS_OFFSET {
                        let osum = if F::HALF_OFFSETS {
                            let [m0, m1] = f[i].omul[j];
                            _mm256_add_epi32(
                                _mm256_mullo_epi32(_mm256_set1_epi32(m0 as i32), osums.0),
                                _mm256_mullo_epi32(_mm256_set1_epi32(m1 as i32), osums.1),
                            )
                        } else {
                            _mm256_add_epi32(osums.0, osums.1)
                        };
                        let offset = _mm256_mul_ps(_mm256_set1_ps(f[i].offset[j]), xd);
                        acc[i] = _mm256_fmadd_ps(offset, _mm256_cvtepi32_ps(osum), acc[i]);
                    }
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
        let whole = g.n_tok / 8 * 8;
        let mut r = rows.start;
        // Tiles of eight rows: eight tokens at a time, then the tokens left over.
        while r + 8 <= rows.end {
            for rr in (r..r + 8).step_by(2) {
                for t in (0..whole).step_by(8) {
                    tile_tokens8::<F, 2>(g, rr, t);
                }
            }
            tile_rows8_few::<F>(g, r, whole..g.n_tok);
            r += 8;
        }
        // The rows left over.
        for r in r..rows.end {
            for t in (0..whole).step_by(8) {
                tile_tokens8::<F, 1>(g, r, t);
            }
            for t in whole..g.n_tok {
                single::<F>(g, r, t);
            }
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
            DType::Q5_0 => rows_of::<Q5_0>(g, rows),
            DType::Q5_1 => rows_of::<Q5_1>(g, rows),
            DType::IQ4_NL => rows_of::<IQ4_NL>(g, rows),
            DType::Q4_K => rows_of::<Q4_K>(g, rows),
            DType::Q5_K => rows_of::<Q5_K>(g, rows),
            DType::IQ4_XS => rows_of::<IQ4_XS>(g, rows),
            DType::Q6_K => rows_of::<Q6_K>(g, rows),
            DType::Q3_K => rows_of::<Q3_K>(g, rows),
            DType::Q2_K => rows_of::<Q2_K>(g, rows),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a quantized type"),
        }
    }
}
