#!/usr/bin/env python3
"""Aggregate generation speed of N sessions decoding together, Ember against llama.cpp.

For each N (default 1, 2, 4, 8, 16), type and thread count: N sequences each take a 32-token
prompt (all N prompts in one batch), then 64 greedy steps in which every sequence adds its next
token, all N in one forward pass: Ember's `ember.step_batch` over N sessions sharing one
`ember.Pool`, llama.cpp's `llama_decode` of a `llama_batch` with N sequence ids (one unified KV
cache). Reported: aggregate generated tokens/s (N * 64 / time of the 64 steps), best of --reps
runs, alternating the engines so both see the same machine load; the ratio to llama.cpp; and
Ember's speed-up over its own single sequence.

"ember gen" is the same N sequences as generations: N `Session.generate` streams (background
generation handles, greedy, 64 tokens) on sessions of one pool, read in turn as a game loop
would; they step together on the pool by themselves. Reported: generated tokens/s from the
moment every stream has its first token to the end, and the pool's sessions per pass.

Needs: pip install llama-cpp-python numpy (CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF"),
and `cargo build --release`. Weights: the GGUF files of scripts/bench_vs_llamacpp.py.
Usage: python3 scripts/bench_batch.py [--dtypes q4_1,q8_0] [--threads 2] [--sessions 1,2,4,8,16]
"""

import argparse
import ctypes
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("EMBER_LIBRARY", str(ROOT / "target" / "release" / "libember.so"))
sys.path.insert(0, str(ROOT / "bindings" / "python"))
sys.path.insert(0, str(ROOT / "scripts"))

import ember  # noqa: E402
from bench_vs_llamacpp import bench_tokens, gguf_for  # noqa: E402

PROMPT, STEPS = 32, 64


def prompts(n, vocab):
    tokens = bench_tokens(PROMPT * n, vocab)
    return [tokens[i * PROMPT:(i + 1) * PROMPT] for i in range(n)]


def run_ember(model, pool, n):
    sessions = [model.session(n_ctx=PROMPT + STEPS + 1, pool=pool) for _ in range(n)]
    try:
        logits = ember.step_batch(sessions, prompts(n, model.n_vocab))
        start = time.perf_counter()
        for _ in range(STEPS):
            logits = ember.step_batch(sessions, [int(np.argmax(l)) for l in logits])
        return n * STEPS / (time.perf_counter() - start)
    finally:
        for s in sessions:
            s.close()


def run_generations(model, pool, n):
    """Aggregate tokens/s of n background generations on `pool`, and sessions per pass."""
    sessions = [model.session(n_ctx=PROMPT + STEPS + 16, pool=pool) for _ in range(n)]
    before = pool.combined_steps
    try:
        streams = [s.generate(f"Character {i} says:", max_tokens=STEPS, ignore_end_tokens=True)
                   for i, s in enumerate(sessions)]
        for stream in streams:
            next(stream)
        start, live = time.perf_counter(), list(streams)
        while live:
            live = [s for s in live if next(s, None) is not None]
        seconds = time.perf_counter() - start
        tokens = sum(s.n_tokens for s in streams) - n  # the first token of each came before
        passes, steps = (a - b for a, b in zip(pool.combined_steps, before))
        return tokens / seconds, steps / max(passes, 1)
    finally:
        for s in sessions:
            s.close()


class LlamaCpp:
    def __init__(self, path, threads, n_max):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        # Quiet, through a callback kept alive as long as the library may call it.
        self.quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(self.quiet, None)
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params())
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_max * (PROMPT + STEPS + 1)
        p.n_batch = p.n_ubatch = max(512, n_max * PROMPT)
        p.n_seq_max = n_max
        p.kv_unified = True
        p.n_threads = p.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(p.n_batch, 0, 1)

    def decode(self, rows):
        """rows: (sequence, position, token, wants logits) per token of one batch."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (seq, pos, token, last) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, last
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def next_tokens(self, outputs):
        return [int(np.argmax(np.ctypeslib.as_array(
            self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)))) for i in outputs]

    def run(self, n):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        rows = [(s, p, t, p == PROMPT - 1) for s, prompt in enumerate(prompts(n, self.vocab))
                for p, t in enumerate(prompt)]
        self.decode(rows)
        tokens = self.next_tokens([s * PROMPT + PROMPT - 1 for s in range(n)])
        start = time.perf_counter()
        for step in range(STEPS):
            self.decode([(s, PROMPT + step, tokens[s], True) for s in range(n)])
            tokens = self.next_tokens(range(n))
        return n * STEPS / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="q4_1,q8_0")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--sessions", default="1,2,4,8,16")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    print(f"{'type':6} {'thr':>3} {'N':>3} {'ember tok/s':>11} {'llama.cpp':>10} {'ratio':>6} "
          f"{'x ember N=1':>11} {'ember gen':>9} {'per pass':>8}")
    for dtype in args.dtypes.split(","):
        path = gguf_for(dtype)
        for threads in [int(t) for t in args.threads.split(",")]:
            peer = LlamaCpp(path, threads, max(counts))
            with ember.Model(str(path)) as model, ember.Pool(threads) as pool:
                run_ember(model, pool, 1)  # warm-up
                peer.run(1)
                single = None
                for n in counts:
                    ours = theirs = gen = 0.0
                    per_pass = 0.0
                    for _ in range(args.reps):
                        ours = max(ours, run_ember(model, pool, n))
                        theirs = max(theirs, peer.run(n))
                        speed, shared = run_generations(model, pool, n)
                        if speed > gen:
                            gen, per_pass = speed, shared
                    single = single or ours
                    print(f"{dtype:6} {threads:>3} {n:>3} {ours:>11.1f} {theirs:>10.1f} "
                          f"{ours / theirs:>6.2f} {ours / single:>11.2f} {gen:>9.1f} "
                          f"{per_pass:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
