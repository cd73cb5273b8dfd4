#!/usr/bin/env python3
"""Writes the dequantization references of every GGML block type Ember reads.

For each type, random blocks (every bit pattern of values, scales and minimums; finite f16
scales) and the f32 values llama.cpp's own gguf-py (`gguf.quants.dequantize`, the numpy
transcription of ggml's `dequantize_row_*`) gives for them. Ember's `dequantize` must match
them bit for bit (tests in src/kernels/tests.rs).

Outputs: tests/fixtures/quants/<TYPE>.blocks (the bytes) and <TYPE>.f32 (little-endian f32).
Needs numpy; fetches the llama.cpp sources (scripts/llamacpp_source.py). Not run by CI.
Usage: python3 scripts/make_quant_fixtures.py
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from llamacpp_source import llama_cpp_dir  # noqa: E402

llama_cpp_dir()
import gguf  # noqa: E402  (llama.cpp's gguf-py)
from gguf.quants import dequantize  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quants"

# Type, super-blocks to write, byte offsets of the f16 scale fields in a block.
TYPES = [
    ("Q8_0", 16, [0]), ("Q4_0", 16, [0]), ("Q4_1", 16, [0, 2]), ("Q5_0", 16, [0]),
    ("Q5_1", 16, [0, 2]), ("IQ4_NL", 16, [0]), ("Q2_K", 4, [80, 82]), ("Q3_K", 4, [108]),
    ("Q4_K", 4, [0, 2]), ("Q5_K", 4, [0, 2]), ("Q6_K", 4, [208]), ("IQ4_XS", 4, [0]),
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261201)
    for name, n, f16_fields in TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
        for at in f16_fields:
            scales = (rng.standard_normal(n) * 0.02).astype(np.float16)
            data[:, at:at + 2] = scales.view(np.uint8).reshape(n, 2)
        values = dequantize(data.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert values.size == n * block_len and np.isfinite(values).all(), name
        (OUT / f"{name}.blocks").write_bytes(data.tobytes())
        (OUT / f"{name}.f32").write_bytes(values.tobytes())
        print(f"{name}: {n} blocks of {block_len}")


if __name__ == "__main__":
    main()
