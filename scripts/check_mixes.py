#!/usr/bin/env python3
"""Fidelity of every quantization mix, Ember next to llama.cpp on the same GGUF files.

For each mix of SmolLM2-135M-Instruct that llama.cpp's quantizer makes (the files of
scripts/bench_vs_llamacpp.py, made on first use), over the tokens of
tests/reference/perplexity.txt (one pass, every position scored):
  - the perplexity in Ember and in llama.cpp, and their difference;
  - the mean absolute logit error against the exact model (Ember on the F32 file, which
    matches transformers), for both engines.
Also prints the F32 file's numbers. Prints a markdown table.

Needs llama-cpp-python and numpy, `cargo build --release --lib`.
Usage: python3 scripts/check_mixes.py [--mixes q4_k_m,q8_0,...]
"""

import argparse
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bindings" / "python"))
os.environ.setdefault("EMBER_LIBRARY", str(ROOT / "target" / "release" / "libember.so"))

import ember  # noqa: E402
from bench_vs_llamacpp import MIXES, gguf_for  # noqa: E402
from llamacpp_run import logits as llama_cpp_logits  # noqa: E402


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits, tokens):
    lp = log_softmax(logits[:-1].astype(np.float64))
    return float(np.exp(-lp[np.arange(len(tokens) - 1), tokens[1:]].mean()))


def ember_logits(path, tokens):
    with ember.Model(path, threads=2) as model, model.session(n_ctx=len(tokens)) as session:
        return np.asarray(session.step_all(tokens), dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixes", default=MIXES)
    args = ap.parse_args()
    text = (ROOT / "tests" / "reference" / "perplexity.txt").read_text()
    f32 = gguf_for("f32")
    with ember.Model(f32) as model:
        tokens = model.tokenize(text, add_special=False)
    exact = ember_logits(f32, tokens)
    print(f"{len(tokens)} tokens; F32 perplexity: Ember {perplexity(exact, tokens):.4f}, "
          f"llama.cpp {perplexity(llama_cpp_logits(f32, tokens, threads=2), tokens):.4f}")
    rows = []
    for mix in [m for m in args.mixes.split(",") if m != "f32"]:
        path = gguf_for(mix)
        ours = ember_logits(path, tokens)
        theirs = llama_cpp_logits(path, tokens, threads=2)
        p_e, p_l = perplexity(ours, tokens), perplexity(theirs, tokens)
        e_err = float(np.abs(ours - exact).mean())
        l_err = float(np.abs(theirs - exact).mean())
        rows.append((mix, p_e, p_l, e_err, l_err))
        print(f"{mix}: ppl {p_e:.4f} vs {p_l:.4f} ({100 * (p_e / p_l - 1):+.2f}%), "
              f"|logit - F32| {e_err:.4f} vs {l_err:.4f}", flush=True)
    print()
    print("| mix | Ember ppl | llama.cpp ppl | difference | Ember mean abs logit error | llama.cpp |")
    print("|---|---|---|---|---|---|")
    for mix, p_e, p_l, e_err, l_err in rows:
        print(f"| {mix.upper()} | {p_e:.4f} | {p_l:.4f} | {100 * (p_e / p_l - 1):+.2f}% | {e_err:.4f} | {l_err:.4f} |")


if __name__ == "__main__":
    main()
