//! Each kernel against a plain scalar version computed in f64.

use std::sync::Arc;

use half::{bf16, f16};

use super::*;
use crate::tensor::{DType, Storage};
use crate::threading::ThreadPool;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor holding `data` converted to `dtype`, and the values it really holds as f32.
fn tensor(data: &[f32], dtype: DType, shape: Vec<usize>) -> (Tensor, Vec<f32>) {
    let (bytes, exact): (Vec<u8>, Vec<f32>) = match dtype {
        DType::F32 => (
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            data.to_vec(),
        ),
        DType::F16 => {
            let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        DType::BF16 => {
            let h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        quantized => {
            let n = data.len() / quantized.block_len();
            let bytes = quantized_blocks(quantized, n, data.len() as u64);
            let mut exact = vec![0.0; data.len()];
            quant::dequantize(quantized, &bytes, &mut exact);
            (bytes, exact)
        }
    };
    let storage = Arc::new(Storage::owned(&bytes).unwrap());
    (
        Tensor::new(storage, 0, dtype, shape, "test").unwrap(),
        exact,
    )
}

/// Where a quantized type's blocks hold f16 scales (and minimums).
fn f16_fields(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        DType::F32 | DType::F16 | DType::BF16 => &[],
    }
}

/// `n` random blocks of a quantized type: random bytes everywhere (every bit pattern of the
/// values, scales and minimums, including Q8_0's -128), with finite, moderate f16 scales.
fn quantized_blocks(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let size = dtype.block_bytes();
    let noise = values(n * size, seed);
    let mut bytes: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 128.0) as u8).collect();
    for b in 0..n {
        for (i, &at) in f16_fields(dtype).iter().enumerate() {
            let scale = if i == 0 { 0.05 } else { 0.2 } / (dtype.block_len() as f32 / 32.0);
            let v = f16::from_f32(noise[b * size + at] * scale).to_le_bytes();
            bytes[b * size + at..b * size + at + 2].copy_from_slice(&v);
        }
    }
    bytes
}

/// The quantized types.
fn quantized_types() -> Vec<DType> {
    DType::all()
        .into_iter()
        .filter(|d| d.is_quantized())
        .collect()
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    if Isa::detect() != Isa::Portable {
        v.push(Isa::detect());
    }
    v
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn matmul_matches_scalar_for_every_dtype_isa_and_shape() {
    let pool = ThreadPool::new(3).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(n_out, k, n_tok) in &[
            (1, 1, 1),
            (7, 13, 3),
            (16, 64, 1),
            (37, 100, 5),
            (64, 24, 2),
        ] {
            let (w, exact) = tensor(&values(n_out * k, 1), dtype, vec![n_out, k]);
            let x = values(n_tok * k, 2);
            let want: Vec<f64> = (0..n_tok)
                .flat_map(|t| {
                    let (exact, x) = (&exact, &x);
                    (0..n_out).map(move |r| {
                        (0..k)
                            .map(|i| exact[r * k + i] as f64 * x[t * k + i] as f64)
                            .sum()
                    })
                })
                .collect();
            let mut results = Vec::new();
            for isa in isas() {
                let mut y = vec![0.0; n_tok * n_out];
                pool.install(|par| {
                    matmul_isa(
                        isa,
                        par,
                        &w,
                        &x,
                        n_tok,
                        &mut y,
                        &mut quant::QuantActs::default(),
                    )
                });
                assert_close(
                    &y,
                    &want,
                    1e-5,
                    &format!("{dtype:?} {isa:?} {n_out}x{k}x{n_tok}"),
                );
                results.push(y);
            }
            // Single-token and batched products agree bit for bit on the same ISA.
            for isa in isas() {
                let mut batched = vec![0.0; n_tok * n_out];
                matmul_isa(
                    isa,
                    Par::sequential(),
                    &w,
                    &x,
                    n_tok,
                    &mut batched,
                    &mut quant::QuantActs::default(),
                );
                for t in 0..n_tok {
                    let mut single = vec![0.0; n_out];
                    matmul_isa(
                        isa,
                        Par::sequential(),
                        &w,
                        &x[t * k..(t + 1) * k],
                        1,
                        &mut single,
                        &mut quant::QuantActs::default(),
                    );
                    assert_eq!(
                        single,
                        batched[t * n_out..(t + 1) * n_out],
                        "{isa:?} token {t}"
                    );
                }
            }
        }
    }
}

#[test]
fn conv1d_matmul_matches_scalar() {
    let pool = ThreadPool::new(2).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (k, total, n_tok) = (19, 90, 3);
        let (w, exact) = tensor(&values(k * total, 3), dtype, vec![k, total]);
        let x = values(n_tok * k, 4);
        for cols in [0..30, 30..90, 5..6] {
            let want: Vec<f64> = (0..n_tok)
                .flat_map(|t| {
                    let (exact, x) = (&exact, &x);
                    cols.clone().map(move |j| {
                        (0..k)
                            .map(|i| exact[i * total + j] as f64 * x[t * k + i] as f64)
                            .sum()
                    })
                })
                .collect();
            for isa in isas() {
                let mut y = vec![0.0; n_tok * cols.len()];
                pool.install(|par| {
                    matmul_in_out_isa(isa, par, &w, cols.clone(), &x, n_tok, &mut y)
                });
                assert_close(
                    &y,
                    &want,
                    1e-5,
                    &format!("conv1d {dtype:?} {isa:?} {cols:?}"),
                );
            }
        }
    }
}

#[test]
fn dot_and_axpy_match_scalar() {
    for n in [0, 1, 7, 8, 9, 64, 77] {
        let (a, b) = (values(n, 5), values(n, 6));
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert_close(&[dot(&a, &b)], &[want], 1e-5, "dot");
        let mut y = b.clone();
        axpy(0.5, &a, &mut y);
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| 0.5 * *x as f64 + *y as f64)
            .collect();
        assert_close(&y, &want, 1e-6, "axpy");
    }
}

#[test]
fn norms_match_scalar() {
    let (x, w, b) = (values(50, 7), values(50, 8), values(50, 9));
    let n = x.len() as f64;
    let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n;
    let want: Vec<f64> = x
        .iter()
        .zip(&w)
        .map(|(v, w)| *w as f64 * *v as f64 / (ms + 1e-5).sqrt())
        .collect();
    let mut out = vec![0.0; 50];
    rms_norm(&x, &w, 1e-5, &mut out);
    assert_close(&out, &want, 1e-5, "rms_norm");
    let mean: f64 = x.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var: f64 = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    let want: Vec<f64> = (0..50)
        .map(|i| (x[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64)
        .collect();
    layer_norm(&x, &w, &b, 1e-5, &mut out);
    assert_close(&out, &want, 1e-5, "layer_norm");
}

#[test]
fn softmax_and_activations_match_scalar() {
    let x: Vec<f32> = values(33, 10).iter().map(|v| v * 20.0).collect();
    for n in [33, 8, 5, 1] {
        let mut y = x[..n].to_vec();
        let max = y.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
        let sum: f64 = y.iter().map(|v| (*v as f64 - max).exp()).sum();
        let want: Vec<f64> = y.iter().map(|v| (*v as f64 - max).exp() / sum).collect();
        let mut portable = y.clone();
        softmax(&mut y);
        assert_close(&y, &want, 1e-6, "softmax");
        scalar::softmax(&mut portable);
        assert_close(&portable, &want, 1e-6, "portable softmax");
    }

    let up = values(33, 11);
    let want: Vec<f64> = x
        .iter()
        .zip(&up)
        .map(|(g, u)| *g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64)
        .collect();
    let mut g = x.clone();
    silu_mul(&mut g, &up);
    assert_close(&g, &want, 1e-6, "silu_mul");

    let want: Vec<f64> = x
        .iter()
        .map(|&v| {
            let v = v as f64;
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        })
        .collect();
    let mut g = x.clone();
    gelu_tanh(&mut g);
    assert_close(&g, &want, 1e-6, "gelu_tanh");
}

#[test]
fn rope_rotates_pairs_half_a_head_apart() {
    let head = values(16, 12);
    let angles: Vec<f64> = (0..8).map(|i| 0.3 * (i + 1) as f64).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    let mut want = vec![0.0f64; 16];
    for i in 0..8 {
        let (a, b) = (head[i] as f64, head[i + 8] as f64);
        want[i] = a * angles[i].cos() - b * angles[i].sin();
        want[i + 8] = b * angles[i].cos() + a * angles[i].sin();
    }
    let mut got = head.clone();
    rope(&mut got, &cos, &sin);
    assert_close(&got, &want, 1e-6, "rope");
}

#[test]
fn attention_kernels_match_scalar() {
    attention_kernels_match_scalar_for(|v| v);
    // An f16 cache: the same kernels read keys and values widened exactly from f16.
    attention_kernels_match_scalar_for(f16::from_f32);
}

fn attention_kernels_match_scalar_for<W: WeightElement + SimdWeight>(to: impl Fn(f32) -> W) {
    for (d, n, stride) in [(64, 37, 192), (12, 5, 12), (40, 1, 80), (64, 0, 64)] {
        let q = values(d, 13);
        let keys: Vec<W> = values((n.max(1) - 1) * stride + d, 14)
            .into_iter()
            .map(&to)
            .collect();
        let want: Vec<f64> = (0..n)
            .map(|p| {
                0.125
                    * (0..d)
                        .map(|i| q[i] as f64 * keys[p * stride + i].to_f32() as f64)
                        .sum::<f64>()
            })
            .collect();
        let mut got = vec![0.0; n];
        attention_scores(&q, &keys, stride, 0.125, &mut got);
        assert_close(&got, &want, 1e-5, "attention_scores");
        let mut portable = vec![0.0; n];
        scalar::attention_scores(&q, &keys, stride, 0.125, &mut portable);
        assert_close(&portable, &want, 1e-5, "portable attention_scores");

        let weights = values(n, 15);
        let want: Vec<f64> = (0..d)
            .map(|j| {
                (0..n)
                    .map(|p| weights[p] as f64 * keys[p * stride + j].to_f32() as f64)
                    .sum()
            })
            .collect();
        let mut got = vec![1.0; d];
        weighted_sum(&weights, &keys, stride, &mut got);
        assert_close(&got, &want, 1e-5, "weighted_sum");
        scalar::weighted_sum(&weights, &keys, stride, &mut got);
        assert_close(&got, &want, 1e-5, "portable weighted_sum");
    }
}

#[test]
fn quantized_matmul_is_the_exact_product_of_dequantized_weights_and_activations() {
    let pool = ThreadPool::new(3).unwrap();
    for dtype in quantized_types() {
        let shapes: &[(usize, usize, usize)] = if dtype.block_len() == 256 {
            &[(1, 256, 1), (7, 512, 3), (37, 256, 5), (64, 768, 9)]
        } else {
            &[(1, 32, 1), (7, 64, 3), (37, 96, 5), (64, 160, 9)]
        };
        for &(n_out, k, n_tok) in shapes {
            let (w, exact) = tensor(&values(n_out * k, 3), dtype, vec![n_out, k]);
            let x: Vec<f32> = values(n_tok * k, 4).iter().map(|v| v * 3.0).collect();
            // The kernels quantize the activations to 8 bits per block; the integer product
            // must equal the f64 product of what both sides really hold.
            let mut act = vec![quant::ActBlock::default(); n_tok * k / quant::BLOCK];
            quant::quantize_activations(&x, &mut act);
            let x_held: Vec<f64> = act
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d as f64 * q as f64))
                .collect();
            let product = |xs: &dyn Fn(usize) -> f64| -> Vec<f64> {
                (0..n_tok)
                    .flat_map(|t| {
                        (0..n_out)
                            .map(|r| {
                                (0..k)
                                    .map(|i| exact[r * k + i] as f64 * xs(t * k + i))
                                    .sum()
                            })
                            .collect::<Vec<f64>>()
                    })
                    .collect()
            };
            let want = product(&|i| x_held[i]);
            let want_f32_x = product(&|i| x[i] as f64);
            // Σ|w·x| per output: f32 accumulation errors scale with it, not with the result.
            let magnitude: Vec<f64> = (0..n_tok * n_out)
                .map(|i| {
                    let (t, r) = (i / n_out, i % n_out);
                    (0..k)
                        .map(|j| (exact[r * k + j] as f64 * x_held[t * k + j]).abs())
                        .sum()
                })
                .collect();
            let mut results = Vec::new();
            for isa in isas() {
                for threads in [1, 3] {
                    let mut y = vec![0.0; n_tok * n_out];
                    let mut act = quant::QuantActs::default();
                    if threads == 1 {
                        matmul_isa(isa, Par::sequential(), &w, &x, n_tok, &mut y, &mut act);
                    } else {
                        pool.install(|par| matmul_isa(isa, par, &w, &x, n_tok, &mut y, &mut act));
                    }
                    let what = format!("{dtype:?} {isa:?} {threads}t {n_out}x{k}x{n_tok}");
                    for (i, ((g, w), m)) in y.iter().zip(&want).zip(&magnitude).enumerate() {
                        let err = (*g as f64 - w).abs();
                        assert!(err <= 1e-6 * m + 1e-9, "{what}: element {i}: {g} vs {w}");
                    }
                    // Against dequantize-then-f32: only the activations' 8-bit rounding
                    // differs (at most half a step, amax/254, per element).
                    for (i, (g, f)) in y.iter().zip(&want_f32_x).enumerate() {
                        let bound: f64 = (0..k)
                            .map(|j| {
                                let (t, r) = (i / n_out, i % n_out);
                                exact[r * k + j].abs() as f64 * 3.0 / 254.0 * 1.01 + 0.0 * t as f64
                            })
                            .sum();
                        assert!((*g as f64 - f).abs() <= bound, "{what}: element {i}");
                    }
                    results.push(y);
                }
            }
            for r in &results[1..] {
                // Portable and SIMD, 1 and 3 threads: the same arithmetic, bit for bit.
                assert_eq!(
                    &results[0], r,
                    "{dtype:?} {n_out}x{k}x{n_tok}: isas and threads"
                );
            }
        }
    }
}

#[test]
fn quantized_decode_and_batched_products_agree() {
    // The decode path (eight rows per vector, one token), the few-token path (eight rows per
    // vector, groups of 4, 2 and 1 token), the batched path (eight tokens per vector) and
    // the single outputs for leftover rows are different code: the same token must give the
    // same values, whatever the number of tokens beside it.
    let k = 512;
    for (dtype, &(n_out, n_tok)) in quantized_types().into_iter().flat_map(|d| {
        [
            (30, 11),
            (40, 7),
            (24, 6),
            (17, 5),
            (16, 3),
            (9, 2),
            (33, 15),
        ]
        .iter()
        .map(move |s| (d, s))
    }) {
        let (w, _) = tensor(&values(n_out * k, 5), dtype, vec![n_out, k]);
        let x = values(n_tok * k, 6);
        for isa in isas() {
            let mut batched = vec![0.0; n_tok * n_out];
            let mut act = quant::QuantActs::default();
            matmul_isa(
                isa,
                Par::sequential(),
                &w,
                &x,
                n_tok,
                &mut batched,
                &mut act,
            );
            for t in 0..n_tok {
                let mut single = vec![0.0; n_out];
                let xt = &x[t * k..(t + 1) * k];
                matmul_isa(isa, Par::sequential(), &w, xt, 1, &mut single, &mut act);
                let batched = &batched[t * n_out..(t + 1) * n_out];
                // Every path accumulates in the same order: bit for bit.
                assert_eq!(
                    batched,
                    &single[..],
                    "{dtype:?} {isa:?} {n_out}x{n_tok} token {t}"
                );
            }
        }
    }
}

#[test]
fn q8_0_quantization_round_trips_within_half_a_step() {
    let x: Vec<f32> = values(256, 7).iter().map(|v| v * 5.0).collect();
    let mut bytes = Vec::new();
    quant::quantize_q8_0(&x, &mut bytes);
    let mut back = vec![0.0; x.len()];
    quant::dequantize(DType::Q8_0, &bytes, &mut back);
    for (block, (xb, bb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in xb.iter().zip(bb) {
            assert!(
                (a - b).abs() <= amax / 254.0 * 1.01 + 1e-3 * amax,
                "block {block}"
            );
        }
    }
}

#[test]
fn dequantization_equals_llama_cpps_bit_for_bit() {
    // References from llama.cpp's gguf-py (scripts/make_quant_fixtures.py).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants");
    for dtype in quantized_types() {
        let blocks = std::fs::read(dir.join(format!("{}.blocks", dtype.name()))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", dtype.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut got = vec![0.0; want.len()];
        quant::dequantize(dtype, &blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{dtype:?} element {i}: {g} vs {w}"
            );
        }
    }
}
