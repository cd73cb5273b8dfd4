"""Threads: sessions on several Python threads over one model, the GIL released during
calls, concurrent use of one session refused, and a clean exit with generations running."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import ember
from conftest import LLAMA, ROOT

LONG_PROMPT = [3 + i % 300 for i in range(2000)]


def test_sessions_in_threads_match_sequential(llama):
    def run(seed):
        sampler = ember.Sampler(temperature=0.8, top_k=40, seed=seed)
        return llama.generate("The robot said", max_tokens=40, ignore_end_tokens=True,
                              sampler=sampler, n_ctx=96, threads=2).read()

    seeds = [1, 2, 3, 4, 5, 6]
    sequential = [run(seed) for seed in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        parallel = list(pool.map(run, seeds))
    assert parallel == sequential
    assert len(set(sequential)) == len(seeds)  # the seeds do differ


def test_steps_in_threads_match_sequential(llama, gpt2):
    def run(job):
        model, tokens = job
        with model.session(n_ctx=64, threads=1) as session:
            return [session.step(t).copy() for t in tokens]

    jobs = [(model, [[5 + k, 6, 7], [8 + k], [9]]) for k in range(4) for model in (llama, gpt2)]
    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(run, jobs))
    for a, b in zip(sequential, parallel):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_long_step_does_not_hold_the_gil(long_context):
    # ctypes.CDLL releases the GIL around each call: while one thread is inside a long step,
    # this thread keeps running Python code. Were the GIL held, no tick of this thread would
    # fall inside the step and the largest gap between ticks would be the whole step.
    with long_context.session(n_ctx=2048, threads=1, n_ubatch=1) as session:
        window = {}

        def run():
            window["start"] = time.perf_counter()
            session.step(LONG_PROMPT)
            window["end"] = time.perf_counter()

        ticks = []
        thread = threading.Thread(target=run)
        thread.start()
        while thread.is_alive():
            ticks.append(time.perf_counter())
        thread.join()
        start, end = window["start"], window["end"]
        assert end - start > 0.1, "the step is too short to tell"
        inside = [start] + [t for t in ticks if start < t < end] + [end]
        largest_gap = max(b - a for a, b in zip(inside, inside[1:]))
        assert largest_gap < (end - start) / 2
        assert session.position == len(LONG_PROMPT)


def test_one_session_is_used_by_one_thread_at_a_time(long_context):
    with long_context.session(n_ctx=2048, threads=1, n_ubatch=1) as session:
        started = threading.Event()
        thread = threading.Thread(target=lambda: (started.set(), session.step(LONG_PROMPT)))
        thread.start()
        started.wait()
        time.sleep(0.05)
        with pytest.raises(ember.BusyError):
            session.step(1)
        with pytest.raises(ember.BusyError):
            session.close()  # never frees a session another thread is inside
        assert 0 <= session.position <= len(LONG_PROMPT)  # safe from any thread
        thread.join()
        assert session.position == len(LONG_PROMPT)


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_exit_with_a_suspended_generation():
    result = run_python("""
        import sys, ember
        model = ember.Model(sys.argv[1])
        stream = model.generate("Once upon a time", ignore_end_tokens=True)
        print(next(stream) is not None)
    """, str(LLAMA))
    assert result.returncode == 0 and result.stdout == "True\n", result.stderr
    assert "FATAL" not in result.stderr


def test_exit_while_a_generation_computes(long_context):
    # The main thread exits while a daemon thread waits for a generation that is inside a
    # long prompt step: the exit hook cancels it; the process ends cleanly.
    result = run_python("""
        import sys, threading, time, ember
        model = ember.Model(sys.argv[1], threads=1)
        session = model.session(n_ctx=2048, n_ubatch=1)
        prompt = bytes(range(97, 123)).decode() * 70
        stream = session.generate(prompt, ignore_end_tokens=True)
        threading.Thread(target=lambda: next(stream, None), daemon=True).start()
        time.sleep(0.1)
        print("exiting")
    """, long_context.path)
    assert result.returncode == 0 and result.stdout == "exiting\n", result.stderr
    assert result.stderr == ""  # no abort, and no error for the generation it ended


def test_without_numpy_logits_are_memoryviews():
    result = run_python("""
        import sys
        sys.modules["numpy"] = None  # import numpy now fails
        import ember
        assert not ember.HAVE_NUMPY
        with ember.Model(sys.argv[1]) as model, model.session(n_ctx=16) as session:
            logits = session.step([5, 6, 7])
            assert isinstance(logits, memoryview) and logits.format == "f"
            assert len(logits) == 320 and logits.nbytes == 1280
            best = max(range(320), key=logits.__getitem__)
            assert ember.Sampler().sample(logits) == best
            last = logits.tolist()
            session.reset()
            rows = session.step_all([5, 6, 7])
            assert rows.shape == (3, 320) and rows.tolist()[2] == last
            text = model.generate("Hi", max_tokens=4, ignore_end_tokens=True).read()
            assert text
        print("ok")
    """, str(LLAMA))
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_library_lookup_order(tmp_path):
    # EMBER_LIBRARY wins and must name a file; a folder holding the library works too.
    library = Path(ember.LIBRARY_PATH).resolve()
    code = "import ember; print(ember.LIBRARY_PATH)"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
    for value, expected in [(str(library), str(library)),
                            (str(library.parent), str(library.parent / library.name))]:
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, EMBER_LIBRARY=value),
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected
    missing = subprocess.run([sys.executable, "-c", code],
                             env=dict(env, EMBER_LIBRARY=str(tmp_path / "nothing.so")),
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "EMBER_LIBRARY" in missing.stderr
    # Without it: next to the package, then target/release, then target/debug.
    from ember import _ffi
    candidates = [str(p) for p in _ffi._candidates()]
    package = ROOT / "bindings" / "python" / "ember"
    assert candidates == [str(package / _ffi.LIBRARY_NAME),
                          str(ROOT / "target" / "release" / _ffi.LIBRARY_NAME),
                          str(ROOT / "target" / "debug" / _ffi.LIBRARY_NAME)]
