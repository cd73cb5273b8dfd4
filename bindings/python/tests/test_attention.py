"""Attention capture from Python: the weights against transformers' (tests/fixtures/llama's
attention.safetensors, from scripts/make_attention_reference.py), shapes and errors."""

import struct

import pytest

import ember
from conftest import LLAMA


def reference():
    """transformers' weights ``[layers][heads][query][key]`` and the tokens, read without
    numpy or safetensors (the binding's tests need neither)."""
    def tensors(path):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        import json
        header = json.loads(data[8:8 + n])
        return header, data[8 + n:]

    header, body = tensors(LLAMA / "reference.safetensors")
    start, end = header["tokens"]["data_offsets"]
    tokens = list(struct.unpack(f"<{(end - start) // 8}q", body[start:end]))
    header, body = tensors(LLAMA / "attention.safetensors")
    layers, heads, t, _ = header["attentions"]["shape"]
    start, end = header["attentions"]["data_offsets"]
    flat = struct.unpack(f"<{(end - start) // 4}f", body[start:end])
    rows = [[[flat[((l * heads + h) * t + q) * t:((l * heads + h) * t + q + 1) * t]
              for q in range(t)] for h in range(heads)] for l in range(layers)]
    return tokens, rows


def test_weights_match_transformers(llama):
    tokens, ref = reference()
    with llama.session(threads=1) as session:
        size = session.capture_attention(max_queries=len(tokens))
        assert size == 2 * 4 * len(tokens) * session.n_ctx * 4
        session.step(tokens[:12])
        for layer in range(2):
            for head in range(4):
                weights = session.attention(layer, head)
                assert tuple(weights.shape) == (12, 12)
                for q in range(12):
                    row = list(weights[q])
                    assert sum(row) == pytest.approx(1.0, abs=1e-5)
                    assert all(w == 0.0 for w in row[q + 1:])
                    assert max(abs(a - b) for a, b in zip(row, ref[layer][head][q])) < 1e-5
        session.step(tokens[12])
        weights = session.attention(1, 2)
        assert tuple(weights.shape) == (1, 13)
        assert max(abs(a - b) for a, b in zip(list(weights[0]), ref[1][2][12])) < 1e-5


def test_selection_and_errors(llama):
    tokens, _ = reference()
    with llama.session(threads=1) as session:
        with pytest.raises(ember.InvalidArgumentError):
            session.attention(0, 0)  # off by default
        with pytest.raises(ember.InvalidArgumentError):
            session.capture_attention(layers=[2])  # the model has 2 layers
        with pytest.raises(ember.InvalidArgumentError):
            session.capture_attention(heads=[-1])
        session.capture_attention(layers=[1], heads=[3], max_queries=2)
        with pytest.raises(ember.InvalidArgumentError):
            session.attention(1, 3)  # no step yet
        session.step(tokens[:6])
        assert tuple(session.attention(1, 3).shape) == (2, 6)
        with pytest.raises(ember.InvalidArgumentError):
            session.attention(0, 3)
        assert session.capture_attention(max_queries=0) == 0
        session.step(tokens[6])
        with pytest.raises(ember.InvalidArgumentError):
            session.attention(1, 3)
