"""Session.embed: the final hidden state, pooled (tests/embed.rs checks the values against
transformers; here: shapes, pooling, normalisation, determinism, errors)."""

import math

import pytest

import ember


def test_embed_pools_and_normalises(llama):
    model = llama
    with model.session(n_ctx=32, threads=1) as session:
        tokens = model.tokenize("hello world")
        assert model.n_embd > 0
        unit = list(session.embed(tokens))
        assert len(unit) == model.n_embd
        assert math.isclose(sum(v * v for v in unit), 1.0, rel_tol=1e-5)
        assert session.position == len(tokens)
        session.reset()
        raw = list(session.embed(tokens, normalize=False))
        norm = math.sqrt(sum(v * v for v in raw))
        assert max(abs(r / norm - u) for r, u in zip(raw, unit)) < 1e-6
        session.reset()
        last = list(session.embed(tokens, pooling="last"))
        assert last != unit
        session.reset()
        assert list(session.embed(tokens)) == unit  # the same text alone: the same vector


def test_embed_errors_leave_the_session_usable(llama):
    with llama.session(n_ctx=4, threads=1) as session:
        with pytest.raises(ValueError):
            session.embed([1, 2], pooling="cls")
        with pytest.raises(ember.InvalidArgumentError):
            session.embed([])
        with pytest.raises(ember.ContextFullError):
            session.embed([1, 2, 3, 4, 5])
        assert session.position == 0
        session.embed([1, 2])
        assert session.position == 2
