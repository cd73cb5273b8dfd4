#!/usr/bin/env python3
"""What attention capture costs: prompt processing and generation on the default model with
capture off and with several selections, runs alternating so all see the same machine noise.

    python3 scripts/bench_attention.py [--threads 2] [--pp 512] [--tg 64] [--runs 5]

Builds the release library, steps a prompt of `--pp` token ids and then `--tg` single tokens
(fixed ids: the cost does not depend on which), and prints the median time of each and its
ratio to capture off, with the capture buffer's size. Not a test: it takes a minute or two.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    subprocess.check_call(["bash", "scripts/fetch-model"], cwd=ROOT)
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--lib"], cwd=ROOT)
    os.environ["EMBER_LIBRARY"] = str(ROOT / "target" / "release" / "libember.so")
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import ember

    model = ember.Model(str(MODEL))
    n_ctx = args.pp + args.tg
    prompt = [(17 * i + 5) % 40000 + 100 for i in range(args.pp)]
    generated = [(31 * i + 11) % 40000 + 100 for i in range(args.tg)]
    # name -> keyword arguments of capture_attention (None: capture off).
    cases = {
        "off": None,
        "one layer, one head, last token": dict(layers=[12], heads=[8], max_queries=1),
        "every layer and head, last token": dict(max_queries=1),
        "every layer and head, whole prompt": dict(max_queries=args.pp),
    }
    times = {name: ([], []) for name in cases}
    sizes = {}
    for _ in range(args.runs):
        for name, selection in cases.items():
            with model.session(n_ctx=n_ctx, threads=args.threads) as session:
                if selection is not None:
                    sizes[name] = session.capture_attention(**selection)
                start = time.perf_counter()
                session.step(prompt)
                middle = time.perf_counter()
                for token in generated:
                    session.step(token)
                end = time.perf_counter()
            times[name][0].append(middle - start)
            times[name][1].append(end - middle)

    base_pp = statistics.median(times["off"][0])
    base_tg = statistics.median(times["off"][1])
    print(f"SmolLM2-135M Q4_1, {args.threads} threads, pp{args.pp} then tg{args.tg}, "
          f"median of {args.runs} alternating runs")
    print(f"| capture | buffer | pp{args.pp} tok/s | vs off | tg{args.tg} tok/s | vs off |")
    print("|---|---|---|---|---|---|")
    for name in cases:
        pp = statistics.median(times[name][0])
        tg = statistics.median(times[name][1])
        size = sizes.get(name, 0)
        shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        print(f"| {name} | {shown} | {args.pp / pp:.0f} | {base_pp / pp:.3f} | "
              f"{args.tg / tg:.1f} | {base_tg / tg:.3f} |")


if __name__ == "__main__":
    main()
