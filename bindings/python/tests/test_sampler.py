"""Sampler: greedy and random choice, seeds, penalties, the logits it accepts."""

import array

import numpy as np
import pytest

import ember

LOGITS = [0.5, 2.0, -1.0, 1.9, 0.0]


@pytest.mark.parametrize("make", [
    list,
    lambda v: np.array(v, dtype=np.float32),
    lambda v: np.array(v, dtype=np.float64),  # converted
    lambda v: array.array("f", v),
    lambda v: memoryview(array.array("f", v)),
    lambda v: memoryview(bytes(array.array("f", v))).cast("f"),  # read-only
    tuple,
])
def test_greedy_picks_the_best(make):
    with ember.Sampler() as sampler:
        assert sampler.sample(make(LOGITS)) == 1


def test_greedy_on_session_logits(llama):
    with llama.session(n_ctx=16) as session:
        logits = session.step([5, 6, 7])
        assert ember.Sampler().sample(logits) == int(np.argmax(logits))


def test_default_options_are_the_librarys():
    sampler = ember.Sampler()
    p = sampler.params
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0, 0, 1, 0, 1)
    assert p.seed == 0x5EED and p.penalty_window == 64
    assert "temperature=0" in repr(sampler)


def test_seed_fixes_the_sequence():
    def draw(seed, n=40):
        with ember.Sampler(temperature=1.0, seed=seed) as sampler:
            return [sampler.sample(LOGITS) for _ in range(n)]

    assert draw(1234) == draw(1234)
    assert len(set(draw(1234))) > 1  # it does sample
    assert draw(1234) != draw(4321)


def test_reset_restarts_the_sequence():
    sampler = ember.Sampler(temperature=1.0, seed=7)
    first = [sampler.sample(LOGITS) for _ in range(20)]
    sampler.reset()
    assert [sampler.sample(LOGITS) for _ in range(20)] == first


def test_top_k_and_min_p_restrict_the_choice():
    top2 = ember.Sampler(temperature=5.0, top_k=2, seed=3)
    assert {top2.sample(LOGITS) for _ in range(200)} == {1, 3}
    min_p = ember.Sampler(temperature=5.0, min_p=0.9, seed=3)
    assert {min_p.sample(LOGITS) for _ in range(200)} == {1, 3}


def test_repetition_penalty_uses_accepted_tokens():
    sampler = ember.Sampler(repetition_penalty=2.0)
    assert sampler.sample(LOGITS) == 1  # and remembers 1
    assert sampler.sample(LOGITS) == 3  # 2.0 / 2 < 1.9
    fresh = ember.Sampler(repetition_penalty=2.0)
    fresh.accept(1)
    assert fresh.sample(LOGITS) == 3


def test_invalid_options():
    with pytest.raises(ember.InvalidArgumentError):
        ember.Sampler(temperature=-1.0)
    with pytest.raises(ember.InvalidArgumentError):
        ember.Sampler(top_p=2.0)
    with pytest.raises(ember.InvalidArgumentError):
        ember.Sampler(top_k=-1)
    with pytest.raises(ember.InvalidArgumentError):
        ember.Sampler(seed=2 ** 64)
    sampler = ember.Sampler()
    with pytest.raises(ember.InvalidArgumentError):
        sampler.accept(-1)
    with pytest.raises(ember.InvalidArgumentError):
        sampler.sample([])
    with pytest.raises(ember.InvalidArgumentError):
        sampler.sample(np.zeros((2, 3), dtype=np.float32))


def test_closed_sampler():
    sampler = ember.Sampler()
    sampler.close()
    with pytest.raises(ember.InvalidArgumentError, match="closed"):
        sampler.sample(LOGITS)
