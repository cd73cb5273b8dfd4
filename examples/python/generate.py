#!/usr/bin/env python3
"""Streams a completion of a prompt with Ember's Python bindings.

    pip install ./bindings/python        # or: EMBER_LIBRARY=target/release/libember.so
    python3 examples/python/generate.py models/SmolLM2-135M-Instruct.Q4_1.gguf "Once upon a time"

Greedy by default (the same text every run, as examples/c/generate.c prints);
--temperature and --seed sample instead.
"""

import argparse
import sys

import ember


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="GGUF file or Hugging Face folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="0 = half the cores")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    try:
        with ember.Model(args.model, threads=args.threads) as model:
            sampler = ember.Sampler(temperature=args.temperature, seed=args.seed)
            sys.stdout.write(args.prompt)
            for piece in model.generate(args.prompt, max_tokens=args.max_tokens, sampler=sampler):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except ember.EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
