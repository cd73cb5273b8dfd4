#!/usr/bin/env python3
"""Side-by-side benchmark of two builds of Ember: the working tree against a git revision.

Builds REV in a temporary worktree (its own target directory, kept under target/ab/ for
reuse), builds the working tree, then alternates `ember bench` runs of the two binaries on the
same model and settings, so both see the same machine noise, and prints the median prompt and
generation rates of each and their ratio.

    python3 scripts/bench_ab.py 8ed38da --threads 2 --runs 8 -- --pp 128 --tg 128 --reps 3
    python3 scripts/bench_ab.py HEAD --kv-b f16 -- --depth 1536 --pp 0 --tg 64

`--kv-a`/`--kv-b` give each side its own `--kv` (to compare cache types with one build: pass
the working tree's revision as REV, or `--same`). Not a test: it takes minutes.
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_rev(rev: str) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    target = ROOT / "target" / "ab" / sha
    binary = target / "release" / "ember"
    if binary.exists():
        return binary
    tree = target / "tree"
    if not tree.exists():
        subprocess.check_call(["git", "worktree", "add", "--detach", "-f", str(tree), sha], cwd=ROOT)
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "ember"], cwd=tree, env=env)
    subprocess.check_call(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    return binary


def run(binary: Path, model: Path, threads: int, kv: str, extra: list) -> tuple:
    cmd = [str(binary), "bench", str(model), "--threads", str(threads), *extra]
    if kv:
        cmd += ["--kv", kv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = out.strip().splitlines()[-1].split()
    return float(row[1]), float(row[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="git revision of side A (side B is the working tree)")
    ap.add_argument("--same", action="store_true", help="side A is the working tree too")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=8, help="alternating runs of each side")
    ap.add_argument("--kv-a", default="", help="--kv of side A")
    ap.add_argument("--kv-b", default="", help="--kv of side B")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1:]  # after --: more `ember bench` options
    if not args.model.exists():
        subprocess.check_call(["bash", str(ROOT / "scripts" / "fetch-model")])
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "ember"], cwd=ROOT)
    b = ROOT / "target" / "release" / "ember"
    a = b if args.same else build_rev(args.rev)
    results = {"A": ([], []), "B": ([], [])}
    for i in range(args.runs):
        for side, binary, kv in (("A", a, args.kv_a), ("B", b, args.kv_b)):
            pp, tg = run(binary, args.model, args.threads, kv, args.bench_args)
            results[side][0].append(pp)
            results[side][1].append(tg)
            print(f"run {i + 1}/{args.runs} {side}: pp {pp:.1f} tg {tg:.1f} tok/s", file=sys.stderr)
    med = {s: (statistics.median(p), statistics.median(t)) for s, (p, t) in results.items()}
    label_a = "working tree" if args.same else args.rev
    print(f"{args.model.name}, {args.threads} threads, {args.runs} alternating runs, "
          f"bench {' '.join(args.bench_args)}")
    print(f"{'side':<22} {'pp tok/s':>10} {'tg tok/s':>10}")
    for side, label, kv in (("A", label_a, args.kv_a), ("B", "working tree", args.kv_b)):
        name = f"{side}: {label}" + (f" --kv {kv}" if kv else "")
        print(f"{name:<22} {med[side][0]:>10.1f} {med[side][1]:>10.1f}")
    ratio = [med["B"][k] / med["A"][k] if med["A"][k] else float("nan") for k in (0, 1)]
    print(f"{'B / A':<22} {ratio[0]:>10.3f} {ratio[1]:>10.3f}")


if __name__ == "__main__":
    main()
