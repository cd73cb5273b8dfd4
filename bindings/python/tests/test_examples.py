"""The Python examples, run on the tiny fixtures: their output is what the API gives."""

import os
import subprocess
import sys

import pytest

import ember
from conftest import GPT2, LLAMA, ROOT

EXAMPLES = ROOT / "examples" / "python"


def run(script, *args, stdin=""):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], input=stdin,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("folder", [LLAMA, GPT2])
def test_generate_example(folder):
    result = run("generate.py", folder, "The robot said", "--max-tokens", 16, "--threads", 1)
    assert result.returncode == 0, result.stderr
    with ember.Model(folder) as model:
        text = model.generate("The robot said", max_tokens=16).read()
    assert result.stdout == "The robot said" + text + "\n"


def test_generate_example_sampling():
    result = run("generate.py", LLAMA, "--max-tokens", 16, "--temperature", 0.8, "--seed", 3)
    assert result.returncode == 0, result.stderr
    with ember.Model(LLAMA) as model:
        sampler = ember.Sampler(temperature=0.8, seed=3)
        text = model.generate("Once upon a time", max_tokens=16, sampler=sampler).read()
    assert result.stdout == "Once upon a time" + text + "\n"


def test_npc_memory_example_ranks_by_cosine_similarity():
    result = run("npc_memory.py", LLAMA, "Where is the sword?", "--threads", 1)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(EXAMPLES))
    from npc_memory import MEMORIES, TEMPLATE

    with ember.Model(LLAMA) as model, model.session() as session:
        def embed(text):
            session.reset()
            return list(session.embed(model.tokenize(TEMPLATE.format(text)), pooling="last"))

        question = embed("Where is the sword?")
        scores = sorted(((sum(a * b for a, b in zip(question, embed(m))), m) for m in MEMORIES),
                        reverse=True)
    assert result.stdout == "".join(f"{s:.3f}  {m}\n" for s, m in scores)


def expected_chat(lines, max_tokens, system=None):
    """What chat.py should print: each reply of a conversation kept in one session."""
    start = [("system", system)] if system else []
    messages, out = list(start), []
    with ember.Model(LLAMA) as model, model.session() as session:
        sampler = ember.Sampler()
        for line in lines:
            if not line.strip():
                continue
            messages.append(("user", line))
            try:
                reply = session.chat(messages, max_tokens=max_tokens, sampler=sampler).read()
            except ember.ContextFullError:
                messages = start + [messages[-1]]
                reply = session.chat(messages, max_tokens=max_tokens, sampler=sampler).read()
            out.append(reply + "\n")
            messages.append(("assistant", reply.replace("\0", "")))
    return "".join(out)


def test_chat_example():
    lines = ["Hello", "How are you?", "", "Tell me more"]
    result = run("chat.py", LLAMA, "--max-tokens", 12, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_chat(lines, 12)
    assert result.stdout.count("\n") >= 3
    assert result.stderr.startswith("> ")  # the prompt goes to stderr


def test_chat_example_with_system_and_a_full_context():
    lines = ["Hello", "How are you?", "Tell me more", "And more", "Still more"]
    result = run("chat.py", LLAMA, "--max-tokens", 30, "--system", "Be brief.",
                 stdin="\n".join(lines))
    assert result.returncode == 0, result.stderr
    assert "context is full" in result.stderr  # 128 tokens of context run out
    assert result.stdout == expected_chat(lines, 30, system="Be brief.")


def test_examples_report_errors():
    for script in ("generate.py", "chat.py"):
        result = run(script, "/nonexistent/model")
        assert result.returncode == 1 and "error:" in result.stderr
