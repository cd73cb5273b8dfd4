#!/usr/bin/env python3
"""Time to first token of the 8th NPC that shares a system prompt: forked from a session that
holds the prompt (`Session.fork`) against computing the prompt in a session of its own; and
the size of a saved session state per token. A benchmark, not a test: run it on a quiet
machine and read the ratio.

Usage: python3 scripts/bench_fork.py [MODEL] [--threads N] [--prompt-tokens N] [--npcs N]
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bindings" / "python"))
import ember  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--npcs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with ember.Model(args.model, threads=args.threads) as model:
        words = ("The village of Emberfall lies between two rivers. The guards keep the gate, the "
                 "baker feeds the square, and travellers bring news from the coast. ") * 40
        system = model.tokenize(words)[: args.prompt_tokens]
        personas = [model.tokenize(f" You are NPC number {i}, a {kind}.", add_special=False)
                    for i, kind in enumerate(["guard", "baker", "smith", "bard", "priest",
                                              "farmer", "thief", "merchant"] * 4)][: args.npcs]
        n_ctx = args.prompt_tokens + 64
        forked, fresh = [], []
        for _ in range(args.repeats):
            base = model.session(n_ctx=n_ctx)
            base.step(system)
            npcs = []
            for persona in personas:
                start = time.perf_counter()
                npc = base.fork()
                logits = npc.step(persona)
                ember.Sampler().sample(logits)
                took = time.perf_counter() - start
                npcs.append(npc)
            forked.append(took)  # the last (8th) NPC's
            for npc in npcs:
                npc.close()
            start = time.perf_counter()
            own = model.session(n_ctx=n_ctx)
            logits = own.step(system + personas[-1])
            ember.Sampler().sample(logits)
            fresh.append(time.perf_counter() - start)
            state = own.save_state()
            held = own.position
            per_token = (len(state) - len(model.session(n_ctx=n_ctx).save_state())) / held
            own.close()
            base.close()
        f, c = min(forked), min(fresh)
        print(f"model {Path(args.model).name}, {args.threads} threads, system prompt "
              f"{len(system)} tokens, persona {len(personas[-1])} tokens")
        print(f"NPC {args.npcs}: forked {f * 1e3:.1f} ms, computed {c * 1e3:.1f} ms "
              f"({c / f:.1f}x faster to fork; best of {args.repeats})")
        print(f"saved state: {len(state)} bytes for {held} tokens, {per_token:.0f} bytes per "
              f"token (F32 cache)")
        print(f"session memory at n_ctx {n_ctx}: {model.session_memory(n_ctx=n_ctx) / 1e6:.1f} MB; "
              f"at 2048: {model.session_memory(n_ctx=2048) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
