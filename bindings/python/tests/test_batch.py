"""ember.step_batch: several sessions in one forward pass, each as if stepped alone."""

import numpy as np
import pytest

import ember


def test_a_batch_equals_each_session_alone(llama):
    prompts = [[10, 20, 30, 40, 50], [7], [100, 101]]
    with llama.session(n_ctx=32) as a, llama.session(n_ctx=32) as b, \
            llama.session(n_ctx=64, threads=2) as c:
        batch = [a, b, c]
        out = ember.step_batch(batch, prompts)
        assert [s.position for s in batch] == [5, 1, 2]
        assert out[0] is not out[1] and out[1].ctypes.data == b._logits_view.ctypes.data
        firsts = [o.copy() for o in out]
        # Then one token each (a decodes while c takes another prompt).
        out = ember.step_batch(batch, [60, 8, [102, 103, 104]])
        seconds = [o.copy() for o in out]
        for prompt, first, second, more in zip(prompts, firsts, seconds, [[60], [8], [102, 103, 104]]):
            with llama.session(n_ctx=32) as alone:
                assert np.array_equal(alone.step(prompt), first)  # bitwise
                assert np.array_equal(alone.step(more), second)


def test_errors_name_the_session_and_change_nothing(llama):
    with llama.session(n_ctx=8) as a, llama.session(n_ctx=8) as b:
        a.step([1, 2])
        with pytest.raises(ember.InvalidArgumentError, match="session 1 of the batch"):
            ember.step_batch([a, b], [[3], [999999]])  # a bad token in the second
        with pytest.raises(ember.ContextFullError, match="session 1 of the batch"):
            ember.step_batch([a, b], [[3], list(range(9))])  # more than its context
        with pytest.raises(ember.InvalidArgumentError, match="session 1 of the batch: .*same session as index 0"):
            ember.step_batch([a, a], [[3], [4]])
        with pytest.raises(ember.InvalidArgumentError):
            ember.step_batch([a, b], [[3]])
        assert a.position == 2 and b.position == 0
        a.close()
        with pytest.raises(ember.InvalidArgumentError, match="closed"):
            ember.step_batch([b, a], [[3], [4]])
        assert b.position == 0
