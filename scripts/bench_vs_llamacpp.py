#!/usr/bin/env python3
"""Ember against llama.cpp on the same weights, threads and machine, in one run.

For each type or mix (default: every one llama.cpp's quantizer makes that Ember reads, of
SmolLM2-135M-Instruct) and thread count, measures
prompt processing (one 512-token batch on an empty context) and generation (128 single-token
steps from an empty context), best of --reps runs, alternating Ember and llama.cpp so both see
the same machine load. Also measures the machine's read bandwidth and prints the generation
limit it implies: bandwidth / weight bytes read per token.

Weights: both read the same GGUF file: the default model's Q4_1 file (scripts/fetch-model),
or the file of another type or mix that llama.cpp's own quantizer writes from its F32 GGUF
(itself requantized from the Q4_1 file with llama_model_quantize, allow_requantize), cached
in models/. Another model: --base FILE.gguf (an F32 GGUF, e.g. from
scripts/bench_1b.py).

Needs: pip install llama-cpp-python numpy (CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF"),
and `cargo build --release`. Usage: python3 scripts/bench_vs_llamacpp.py [--dtypes q4_1,q8_0]
[--threads 1,2] [--reps 3]
"""

import argparse
import ctypes
import json
import pathlib
import subprocess
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
Q4_1 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBER = ROOT / "target" / "release" / "ember"
MIXES = "q4_1,q4_0,q8_0,q5_0,q5_1,q4_k_m,q5_k_m,q6_k,q3_k_m,q2_k,iq4_nl,iq4_xs,bf16,f32"
PP, TG = 512, 128


def bench_tokens(n, vocab):
    """The same pseudo-random token ids as `ember bench` (xorshift64)."""
    state, out, mask = 0x2545F4914F6CDD1D, [], (1 << 64) - 1
    for _ in range(n):
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        out.append(state % min(vocab, 32000))
    return out


def quantize(src, dst, dtype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    name = "LLAMA_FTYPE_ALL_F32" if dtype == "f32" else f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}"
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {dtype} failed ({rc})")


def gguf_for(dtype, base=None):
    """The GGUF of `dtype`, made by llama.cpp's quantizer from the F32 file (`base`, or the
    F32 requantization of the default Q4_1 file)."""
    if base is None:
        if dtype == "q4_1":
            return Q4_1
        f32 = MODELS / "SmolLM2-135M-Instruct.F32.gguf"
        if not f32.exists():
            quantize(Q4_1, f32, "f32")
        base, stem = f32, MODELS / "SmolLM2-135M-Instruct"
    else:
        base = pathlib.Path(base)
        stem = base.with_name(base.name.split(".")[0])
    if dtype == "f32":
        return base
    path = stem.with_name(f"{stem.name}.{dtype.upper()}.gguf")
    if not path.exists():
        quantize(base, path, dtype)
    return path


def run_ember(model, threads, bandwidth=False):
    out = subprocess.run(
        [str(EMBER), "bench", str(model), "--threads", str(threads), "--pp", str(PP), "--tg", str(TG), "--reps", "1", "--json"]
        + (["--bandwidth"] if bandwidth else []),
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout)
    row = result["results"][0]
    return row["pp_tok_s"], row["tg_tok_s"], result


class LlamaCpp:
    def __init__(self, path, threads):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=PP + TG,
            n_batch=PP,
            n_ubatch=PP,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.tokens = bench_tokens(PP, self.llm.n_vocab())
        self.llm.eval(self.tokens[:8])  # warm-up

    def run(self):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.tokens)
        pp = PP / (time.perf_counter() - start)
        self.llm.reset()
        token = self.tokens[0]
        start = time.perf_counter()
        for _ in range(TG):
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        tg = TG / (time.perf_counter() - start)
        return pp, tg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default=MIXES)
    ap.add_argument("--base", default=None, help="an F32 GGUF to quantize (default SmolLM2)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not EMBER.exists():
        raise SystemExit("build Ember first: cargo build --release")
    thread_counts = [int(t) for t in args.threads.split(",")]
    # Read bandwidth per thread count, measured by `ember bench --bandwidth` (1 GiB summed).
    bandwidth = {}
    rows = []
    for dtype in args.dtypes.split(","):
        gguf = gguf_for(dtype, args.base)
        for threads in thread_counts:
            peer = LlamaCpp(gguf, threads)
            e_pp, e_tg, l_pp, l_tg = 0.0, 0.0, 0.0, 0.0
            info = None
            for rep in range(args.reps):
                measure = threads not in bandwidth and rep == 0
                pp, tg, info = run_ember(gguf, threads, bandwidth=measure)
                if measure:
                    bandwidth[threads] = info["results"][0]["read_gb_s"]
                e_pp, e_tg = max(e_pp, pp), max(e_tg, tg)
                pp, tg = peer.run()
                l_pp, l_tg = max(l_pp, pp), max(l_tg, tg)
            del peer
            limit = bandwidth[threads] * 1e9 / info["weight_bytes_per_token"]
            rows.append((dtype, threads, e_pp, l_pp, e_tg, l_tg, limit))
            print(f"{dtype} {threads}t: pp {e_pp:.1f} vs {l_pp:.1f}, tg {e_tg:.1f} vs {l_tg:.1f} (limit {limit:.1f})", flush=True)
    print()
    print(f"read bandwidth: " + ", ".join(f"{t} thread(s) {bw:.1f} GB/s" for t, bw in bandwidth.items()))
    print()
    print(f"| dtype | threads | Ember pp{PP} tok/s | llama.cpp pp{PP} | ratio | Ember tg{TG} tok/s | llama.cpp tg{TG} | ratio | tg bandwidth limit | Ember % of limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, t, e_pp, l_pp, e_tg, l_tg, limit in rows:
        print(
            f"| {dtype.upper()} | {t} | {e_pp:.1f} | {l_pp:.1f} | {e_pp / l_pp:.2f} | {e_tg:.1f} | {l_tg:.1f} | {e_tg / l_tg:.2f} | {limit:.1f} | {100 * e_tg / limit:.0f}% |"
        )


if __name__ == "__main__":
    main()
