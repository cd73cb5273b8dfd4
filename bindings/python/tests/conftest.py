"""Shared fixtures of the Python binding tests: the tiny models of tests/fixtures.

The package is imported from this source tree (bindings/python); the library is the one
EMBER_LIBRARY names (scripts/test-bindings points it at target/debug/libember.so), else the
package's usual lookup.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bindings" / "python"))

import ember  # noqa: E402

LLAMA = ROOT / "tests" / "fixtures" / "llama"
GPT2 = ROOT / "tests" / "fixtures" / "gpt2"


@pytest.fixture(scope="session")
def llama() -> ember.Model:
    """The tiny Llama fixture (320 tokens, byte-level BPE, chat template, 128 context)."""
    with ember.Model(LLAMA, threads=1) as model:
        yield model


@pytest.fixture(scope="session")
def gpt2() -> ember.Model:
    """The tiny GPT-2 fixture."""
    with ember.Model(GPT2, threads=1) as model:
        yield model


@pytest.fixture(scope="session")
def long_context(tmp_path_factory: pytest.TempPathFactory) -> ember.Model:
    """The Llama fixture with a 2048-token context (its config says so; the weights are the
    same), so that one step over ~2000 tokens takes a noticeable time."""
    folder = tmp_path_factory.mktemp("long-context")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA / name, folder / name)
    config = json.loads((LLAMA / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    with ember.Model(folder, threads=1) as model:
        yield model


def greedy_by_hand(model: ember.Model, prompt: List[int], n: int,
                   sampler: Optional[ember.Sampler] = None) -> List[int]:
    """``n`` tokens generated with step + sample (greedy unless ``sampler``), no end check."""
    sampler = sampler or ember.Sampler()
    out = []
    with model.session(threads=1) as session:
        logits = session.step(prompt)
        for _ in range(n):
            token = sampler.sample(logits)
            out.append(token)
            logits = session.step(token)
    return out
