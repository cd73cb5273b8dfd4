#!/usr/bin/env python3
"""Tokenization throughput, Ember next to Hugging Face tokenizers (Python), one thread each.

The text is the tokenizer test corpus repeated to about 4 MB, encoded line by line without
special tokens (both sides make one call per line). Usage:
  cargo build --release && python3 scripts/bench_tokenizer.py [tokenizer_dir]
Needs: pip install tokenizers.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
folder = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/tokenizers/smollm2"
corpus = (ROOT / "tests/fixtures/tokenizers/corpus.json").read_text()
import json  # noqa: E402

lines = [s.replace("\n", " ") for s in json.loads(corpus)] + [open(ROOT / "README.md").read()]
text = "\n".join(lines) + "\n"
text = text * max(1, (4 << 20) // len(text.encode()))
with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write(text)
    path = f.name

tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    # Split exactly as Rust's split_inclusive('\n') does.
    pieces = [line + "\n" for line in text.split("\n")[:-1]]
    n = sum(len(tok.encode(line, add_special_tokens=False).ids) for line in pieces)
    best = min(best, time.perf_counter() - start)
size = len(text.encode())
print(f"HF tokenizers (Python): {size} bytes, {n} tokens in {best * 1e3:.1f} ms: {size / best / 1e6:.2f} MB/s")
ember = subprocess.run([str(ROOT / "target/release/ember"), "tokenize", str(folder), "--file", path, "--bench", "--parse-special"], capture_output=True, text=True, check=True)
print(f"Ember:                  {ember.stdout.strip()}")
os.unlink(path)
