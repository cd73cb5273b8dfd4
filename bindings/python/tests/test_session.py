"""Session: steps and their logits, context limits, rewind, reset, cancel, closing."""

import ctypes
import threading
import time

import numpy as np
import pytest

import ember


def test_step_returns_a_view_of_the_sessions_buffer(llama):
    with llama.session(n_ctx=32) as session:
        assert session.n_ctx == 32 and session.position == 0
        logits = session.step([10, 20, 30])
        assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
        assert logits.shape == (320,) and session.position == 3
        # No copy: the array is the session's buffer, overwritten by the next step.
        assert logits.ctypes.data == ctypes.addressof(session._logits)
        first = logits.copy()
        again = session.step(40)
        assert again is logits and not np.array_equal(first, logits)
        assert session.position == 4


def test_logits_agree_with_step_all(llama):
    with llama.session(n_ctx=32) as a, llama.session(n_ctx=32, threads=2) as b:
        rows = a.step_all([10, 20, 30, 40])
        assert rows.shape == (4, 320) and rows.dtype == np.float32
        assert a.position == 4
        last = b.step([10, 20, 30, 40])
        assert np.array_equal(rows[-1], last)  # bitwise, whatever the thread count
        b.reset()
        assert np.array_equal(b.step([10]), rows[0])


def test_steps_accept_numpy_ids(llama):
    with llama.session(n_ctx=16) as a, llama.session(n_ctx=16) as b:
        x = a.step(np.array([5, 6, 7], dtype=np.int64)).copy()
        assert np.array_equal(x, b.step([5, 6, 7]))
        assert np.array_equal(a.step(np.int32(8)), b.step(8))


def test_bad_tokens_leave_the_session_unchanged(llama):
    with llama.session(n_ctx=16) as session:
        session.step([1, 2, 3])
        for bad in ([1, 320], [-5], [2 ** 31], []):
            with pytest.raises(ember.InvalidArgumentError):
                session.step(bad)
        assert session.position == 3
        with pytest.raises(TypeError):
            session.step(["a"])


def test_context_full_then_continued_use(llama):
    with llama.session(n_ctx=16) as session:
        session.step(list(range(10, 20)))
        with pytest.raises(ember.ContextFullError) as info:
            session.step([5] * 7)
        assert info.value.status == ember.Status.CONTEXT_FULL and info.value.message
        assert session.position == 10
        session.step([5] * 6)
        assert session.position == 16
        with pytest.raises(ember.ContextFullError):
            session.step(5)


def test_rewind_and_reset(llama):
    with llama.session(n_ctx=16) as session:
        prompt = list(range(10, 20))
        expected = session.step(prompt).copy()
        session.step([7, 8, 9])
        with pytest.raises(ember.InvalidArgumentError):
            session.rewind(14)
        session.rewind(9)
        assert session.position == 9
        assert np.array_equal(session.step(prompt[9]), expected)  # same state again
        session.reset()
        assert session.position == 0
        assert np.array_equal(session.step(prompt), expected)
        with pytest.raises(ember.InvalidArgumentError):
            session.rewind(-1)


def test_a_cancel_with_nothing_running_reaches_no_later_call(llama):
    with llama.session(n_ctx=32) as session:
        session.step([1, 2, 3])
        session.cancel()
        session.step([4, 5])  # not cancelled: nothing was running when cancel() came
        assert session.position == 5
        assert session.tokens == [1, 2, 3, 4, 5]


def test_cancel_a_long_step_from_another_thread(long_context):
    with long_context.session(n_ctx=2048, threads=1, n_ubatch=1) as session:
        session.step([1, 2])
        errors = []

        def run():
            try:
                session.step([3 + i % 300 for i in range(2000)])
            except ember.EmberError as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        started = time.perf_counter()
        thread.start()
        time.sleep(0.05)
        session.cancel()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], ember.CancelledError)
        assert time.perf_counter() - started < 5
        assert session.position == 2
        session.step([3])
        assert session.position == 3


def test_closed_session(llama):
    session = llama.session(n_ctx=8)
    session.close()
    assert session.closed and "closed" in repr(session)
    with pytest.raises(ember.InvalidArgumentError, match="closed"):
        session.step(1)
    with pytest.raises(ember.InvalidArgumentError):
        _ = session.position
    session.close()


def test_session_options(llama):
    with llama.session() as session:
        assert session.n_ctx == 128  # the trained context
    with pytest.raises(ember.InvalidArgumentError):
        llama.session(n_ctx=100000)
    with pytest.raises(ember.InvalidArgumentError):
        llama.session(n_ctx=-1)
    with llama.session(n_ctx=16, threads=2, n_ubatch=3) as session:
        session.step(list(range(10)))
        assert repr(session) == "<ember.Session 10/16 tokens>"


def test_saved_state_continues_bitwise_in_another_session(llama):
    import math
    s = llama.session(n_ctx=64)
    s.step(llama.tokenize("Once upon a time"))
    data = s.save_state()
    assert isinstance(data, bytes) and data[:8] == b"EMBERSES"
    expected = [list(s.step(t)) for t in (5, 6, 7)]
    other = llama.session(n_ctx=32, threads=2)
    other.load_state(data)
    assert other.tokens == llama.tokenize("Once upon a time")
    assert [list(other.step(t)) for t in (5, 6, 7)] == expected
    # Corrupted and foreign bytes raise and change nothing.
    before = other.tokens
    with pytest.raises(ember.BadFormatError):
        other.load_state(data[:-3])
    with pytest.raises(ember.BadFormatError):
        other.load_state(b"")
    assert other.tokens == before
    assert not any(math.isnan(x) for x in other.step(1))


def test_fork_and_copy_prefix(llama):
    base = llama.session(n_ctx=64)
    system = llama.tokenize("You are a guard.")
    base.step(system)
    npc = base.fork()
    assert npc.tokens == system and npc.n_ctx == 64
    assert list(npc.logits()) == list(base.logits())
    fresh = llama.session(n_ctx=64)
    assert list(npc.step([9, 10])) == list(fresh.step(system + [9, 10]))
    small = base.fork(n_ctx=32, threads=1)
    assert small.n_ctx == 32
    other = llama.session(n_ctx=64)
    other.copy_prefix(base, 3)
    assert other.tokens == system[:3]
    with pytest.raises(ember.InvalidArgumentError):
        other.logits()  # the third token is recomputed by the next step
    with pytest.raises(ember.InvalidArgumentError):
        other.copy_prefix(base, len(system) + 1)


def test_an_f16_cache_takes_half_the_memory_and_keeps_its_type(llama):
    tokens = llama.tokenize("Once upon a time")
    exact, half = llama.session(n_ctx=64), llama.session(n_ctx=64, kv_type="f16")
    assert half.kv_type == ember.KvType.F16 and exact.kv_type == ember.KvType.F32
    a, b = list(exact.step(tokens)), list(half.step(tokens))
    assert a != b and max(abs(x - y) for x, y in zip(a, b)) < 0.05
    # The cache is half as large: the saving grows with the context, the rest does not.
    saved = [llama.session_memory(n) - llama.session_memory(n, kv_type="f16") for n in (32, 64)]
    assert saved[0] > 0 and saved[1] == 2 * saved[0]
    # Forks, saved states and copies keep the type; a state of the other type is refused.
    fork = half.fork(n_ctx=32)
    assert fork.kv_type == ember.KvType.F16 and list(fork.logits()) == b
    with pytest.raises(ember.InvalidArgumentError, match="cache types must match"):
        exact.load_state(half.save_state())
    assert list(exact.logits()) == a
    with pytest.raises(ValueError):
        llama.session(kv_type="q4")


def test_perf_and_memory_estimate(llama):
    s = llama.session(n_ctx=64)
    s.step([1, 2, 3, 4])
    s.step(5)
    perf = s.perf
    assert (perf["last_prompt_tokens"], perf["last_generated_tokens"]) == (0, 1)
    assert (perf["total_prompt_tokens"], perf["total_generated_tokens"]) == (4, 1)
    assert perf["total_prompt_ms"] > 0
    small, large = llama.session_memory(n_ctx=16), llama.session_memory(n_ctx=128)
    assert 0 < small < large


def test_logit_bias_bans_and_boosts(llama):
    import math
    s = llama.session(n_ctx=64)
    logits = list(s.step(llama.tokenize("Hello")))
    best = max(range(len(logits)), key=logits.__getitem__)
    assert ember.Sampler().sample(logits) == best
    assert ember.Sampler(logit_bias={best: -math.inf}).sample(logits) != best
    assert ember.Sampler(logit_bias={7: 1000.0}).sample(logits) == 7
    with pytest.raises(ember.InvalidArgumentError):
        ember.Sampler(logit_bias={len(logits): 1.0}).sample(logits)


def test_models_load_from_bytes_and_from_inside_a_file(tmp_path):
    from conftest import ROOT
    path = ROOT / "tests" / "fixtures" / "gguf" / "llama.Q4_0.gguf"
    data = path.read_bytes()
    with ember.Model(path) as m:
        expected = list(m.session(n_ctx=16).step([1, 2, 3]))
    with ember.Model.from_bytes(data) as m:
        assert list(m.session(n_ctx=16).step([1, 2, 3])) == expected
    packed = tmp_path / "assets.bin"
    packed.write_bytes(b"x" * 1000 + data + b"tail")
    with open(packed, "rb") as f:
        m = ember.Model.from_fd(f.fileno(), 1000, len(data))
    assert list(m.session(n_ctx=16).step([1, 2, 3])) == expected
    m.close()
    with pytest.raises(ember.UnsupportedError):
        ember.Model.from_bytes(b"GGUF but not really")  # "version" 1953849888


def test_sessions_share_a_pool(llama):
    import threading
    pool = ember.Pool(threads=2)
    assert pool.threads == 2
    npcs = [llama.session(n_ctx=64, pool=pool) for _ in range(4)]
    ids = [[1 + (i * 13 + t) % 300 for t in range(12)] for i in range(4)]
    results = [None] * 4

    def run(i):
        results[i] = list(npcs[i].step(ids[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i] == list(llama.session(n_ctx=64, threads=2).step(ids[i]))
    pool.close()  # the sessions keep it alive
    npcs[0].step(5)
    for s in npcs:
        s.close()


def test_generations_on_a_pool_step_together(llama):
    pool = ember.Pool(threads=2)
    prompts = ["the robot", "a", "once upon a time", "hello"]

    def sampler(i):
        return ember.Sampler(temperature=0.0 if i == 0 else 1.0, seed=5 + i)

    def run(session, i):
        return session.generate(prompts[i], max_tokens=24, sampler=sampler(i),
                                ignore_end_tokens=True)

    alone = ["".join(run(llama.session(n_ctx=64, threads=2), i)) for i in range(4)]
    npcs = [llama.session(n_ctx=64, pool=pool) for _ in range(4)]
    streams = [run(npcs[i], i) for i in range(4)]
    texts = [[] for _ in range(4)]
    live = set(range(4))
    while live:  # the game loop: a piece from each character in turn
        for i in sorted(live):
            piece = next(streams[i], None)
            if piece is None:
                live.discard(i)
            else:
                texts[i].append(piece)
    assert ["".join(t) for t in texts] == alone
    passes, steps = pool.combined_steps
    assert steps == 4 * 23 and passes < steps
    for s in npcs:
        s.close()
    pool.close()
