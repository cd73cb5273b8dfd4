#!/usr/bin/env python3
"""Constrained output on the default model (SmolLM2-135M-Instruct, Q4_1), checked by tools
that are not Ember's:

1. validity: for each of five JSON schemas, SAMPLES generations at temperature 1.0, each
   validated by Python's `jsonschema`; a regular expression checked by `re.fullmatch` and a
   Lark grammar checked by a small recursive parser, likewise;
2. greedy parity: greedy constrained output equals, token for token, a reference made by
   masking Ember's raw logits with llguidance's own Python package (PyPI `llguidance`);
3. overhead: generation speed with and without a constraint, 1 and 2 threads;
4. tool calls: SAMPLES replies at temperature 1.0 with tool_choice "required" under a
   Qwen-style (<tool_call> blocks) and a Llama-style (one JSON object) template (those of
   tests/fixtures/tokenizers/chat_features.json), each parsed by Ember and every call's
   arguments validated by `jsonschema` against its tool's parameters (Qwen-style with and
   without parallel calls: a small model may keep calling until max_tokens cuts a call).

    python3 scripts/check_constraints.py [--samples 200] [--threads 2]

Uses target/release (built here). Not a test (it takes minutes); the CI tests run a few
samples of the same checks (bindings/python/tests/test_constraint.py).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "stats": {"type": "object", "properties": {
                "hp": {"type": "integer"}, "mood": {"type": "string", "maxLength": 12}},
                "required": ["hp", "mood"], "additionalProperties": False},
        },
        "required": ["name", "stats"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"action": {"enum": ["trade", "fight", "flee", "talk"]},
                       "target": {"enum": ["guard", "merchant", "dragon"]}},
        "required": ["action", "target"], "additionalProperties": False,
    },
    "arrays with bounds": {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 4,
                                 "items": {"type": "string", "maxLength": 10}}},
        "required": ["items"], "additionalProperties": False,
    },
    "numbers with ranges": {
        "type": "object",
        "properties": {"price": {"type": "integer", "minimum": 10, "maximum": 500},
                       "discount": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["price", "discount"], "additionalProperties": False,
    },
    "strings with patterns": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["code", "date"], "additionalProperties": False,
    },
}
REGEX = r"(north|south|east|west) [0-9]{1,3} steps"
# Sums of products of small numbers: "3*4+12".
GRAMMAR = r"""
start: sum
sum: product ("+" product){0,3}
product: NUMBER ("*" NUMBER){0,2}
NUMBER: /[1-9][0-9]?/
"""
PROMPT = [{"role": "system", "content": "You are an NPC in a fantasy game. Answer in JSON."},
          {"role": "user", "content": "What do you do next?"}]


TOOLS = [
    {"type": "function", "function": {
        "name": "trade", "description": "Offer an item for a price in gold.",
        "parameters": {"type": "object", "properties": {
            "item": {"type": "string", "enum": ["sword", "shield", "potion"]},
            "price": {"type": "integer", "minimum": 1, "maximum": 500}},
            "required": ["item", "price"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "move", "description": "Walk somewhere.",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string", "maxLength": 20},
            "steps": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["to", "steps"], "additionalProperties": False}}},
]
TOOL_PROMPT = [{"role": "system", "content": "You are a merchant NPC in a fantasy game."},
               {"role": "user", "content": "I want to buy a sword. What is your price?"}]


def grammar_ok(text: str) -> bool:
    return all(re.fullmatch(r"[1-9][0-9]?(\*[1-9][0-9]?)*", p) for p in text.split("+"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for module in ("jsonschema", "llguidance", "numpy"):
        try:
            __import__(module)
        except ImportError:
            subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", module])
    import jsonschema
    import numpy as np
    import llguidance
    import llguidance.numpy as lnp

    if not MODEL.exists():
        subprocess.check_call(["bash", str(ROOT / "scripts" / "fetch-model")])
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--lib"], cwd=ROOT)
    os.environ["EMBER_LIBRARY"] = str(ROOT / "target" / "release" / "libember.so")
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import ember

    model = ember.Model(str(MODEL), threads=args.threads)
    session = model.session(n_ctx=512)

    print(f"== validity: {args.samples} samples per constraint at temperature 1.0")
    cases = [(name, {"json_schema": s}, lambda t, s=s: jsonschema.validate(json.loads(t), s))
             for name, s in SCHEMAS.items()]
    cases.append(("regex", {"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or 1 / 0))
    cases.append(("Lark grammar", {"grammar": GRAMMAR}, lambda t: grammar_ok(t) or 1 / 0))
    for name, constraint, check in cases:
        valid, reasons, tokens = 0, {}, 0
        start = time.perf_counter()
        for i in range(args.samples):
            sampler = ember.Sampler(temperature=1.0, seed=i)
            stream = session.chat(PROMPT, max_tokens=160, sampler=sampler, **constraint)
            text = stream.read()
            sampler.close()
            tokens += stream.n_tokens
            reasons[stream.stop_reason.name] = reasons.get(stream.stop_reason.name, 0) + 1
            try:
                check(text)
                valid += 1
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                print(f"  INVALID {name} #{i}: {text!r} ({e})")
        dt = time.perf_counter() - start
        print(f"  {name:<22} {valid}/{args.samples} valid; stop reasons {reasons}; "
              f"{tokens / args.samples:.1f} tokens each, {tokens / dt:.1f} tok/s")

    print(f"== tool calls: {args.samples} replies per template at temperature 1.0, tool_choice required")
    features = json.loads((ROOT / "tests" / "fixtures" / "tokenizers" / "chat_features.json").read_text())
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    tool_session = model.session(n_ctx=1024)
    styles = [("Qwen-style <tool_call>", "tool_thinking", True),
              ("Qwen-style, one call", "tool_thinking", False),
              ("Llama-style JSON", "dated_tools", True)]
    for style, template, parallel in styles:
        valid, calls, names, reasons = 0, 0, {}, {}
        for i in range(args.samples):
            sampler = ember.Sampler(temperature=1.0, seed=i)
            stream = tool_session.chat(TOOL_PROMPT, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=parallel,
                                       chat_template=features["templates"][template],
                                       variables={"enable_thinking": False},
                                       max_tokens=200, sampler=sampler)
            try:
                message = stream.message()
                reasons[stream.stop_reason.name] = reasons.get(stream.stop_reason.name, 0) + 1
                for call in message["tool_calls"]:
                    jsonschema.validate(call["function"]["arguments"], schemas[call["function"]["name"]])
                    names[call["function"]["name"]] = names.get(call["function"]["name"], 0) + 1
                    calls += 1
                valid += 1
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                print(f"  INVALID {style} #{i}: ({e})")
            sampler.close()
        print(f"  {style:<24} {valid}/{args.samples} replies parse with valid calls; "
              f"{calls} calls {names}; stop reasons {reasons}")

    print("== greedy parity with llguidance's Python package (masking Ember's logits)")
    ends = [t for t in range(model.n_vocab) if model.is_end_token(t)]
    tokenizer = llguidance.LLTokenizer(tokenizer_json(), n_vocab=model.n_vocab, eos_token=ends)
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for name, constraint in [(n, {"json_schema": s}) for n, s in SCHEMAS.items()] + [
            ("regex", {"regex": REGEX}), ("Lark grammar", {"grammar": GRAMMAR})]:
        ours = session.chat(PROMPT, max_tokens=120, **constraint)
        ours.read()
        got = [t for t, _ in ours.tokens]
        if "json_schema" in constraint:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint["json_schema"],
                                                                    defaults=layout)
        elif "regex" in constraint:
            grammar = llguidance.LLMatcher.grammar_from_regex(constraint["regex"])
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(constraint["grammar"])
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        prompt = session.tokens[: len(session.tokens) - ours.n_tokens]
        ref_session = model.session(n_ctx=512)
        logits = np.array(ref_session.step(prompt), dtype=np.float32)
        mask = lnp.allocate_token_bitmask(1, tokenizer.vocab_size)
        want = []
        # Past Ember's last token the reference must end too, unless max_tokens cut Ember off.
        for _ in range(len(got) + (ours.stop_reason != ember.StopReason.MAX_TOKENS)):
            lnp.fill_next_token_bitmask(matcher, mask)
            masked = logits[None, : tokenizer.vocab_size].copy()
            lnp.apply_token_bitmask_inplace(masked, mask)
            token = int(np.argmax(masked[0]))
            if model.is_end_token(token) or matcher.is_stopped():
                break
            assert matcher.consume_token(token), matcher.get_error()
            want.append(token)
            if matcher.is_stopped():
                break
            logits = np.array(ref_session.step(token), dtype=np.float32)
        same = got == want
        print(f"  {name:<22} {'equal' if same else 'DIFFERENT'}: {len(got)} tokens"
              + ("" if same else f"\n    ember {got}\n    llguidance {want}"))

    print("== overhead: time of each draw (mask + sample) against the step it follows")
    free_text = {"type": "object", "properties": {"story": {"type": "string"}},
                 "required": ["story"]}
    for threads in (1, 2):
        m = ember.Model(str(MODEL), threads=threads)
        story = [{"role": "user", "content": "Tell me a long story."}]
        prompt = m.tokenize(m.apply_chat_template(story, True), parse_special=True)
        for label in ("none", "json_schema"):
            sampler = ember.Sampler()
            if label != "none":
                sampler.set_constraint(m, json_schema=free_text)
            best = None
            for _ in range(3):
                sampler.reset()
                with m.session(n_ctx=512) as s:
                    logits, draw, step, n = s.step(prompt), 0.0, 0.0, 0
                    for _ in range(96):
                        a = time.perf_counter()
                        token = sampler.sample(logits)
                        b = time.perf_counter()
                        if m.is_end_token(token) or \
                                sampler.constraint_state == ember.ConstraintState.FINISHED:
                            break
                        logits = s.step(token)
                        draw, step, n = draw + b - a, step + time.perf_counter() - b, n + 1
                run = (1000 * draw / n, 1000 * step / n, n)
                best = run if best is None or sum(run[:2]) < sum(best[:2]) else best
            print(f"  {threads} thread(s), {label:<11}: draw {best[0]:.3f} ms, step {best[1]:.3f} "
                  f"ms ({best[2]} tokens): draws are {100 * best[0] / (best[0] + best[1]):.1f}% "
                  f"of decode time")


def tokenizer_json() -> str:
    """The default model's tokenizer as tokenizer.json text (what llguidance's LLTokenizer
    reads), written by `ember convert` from the GGUF's metadata."""
    out = ROOT / "target" / "check_constraints" / "smollm2"
    if not (out / "tokenizer.json").exists():
        subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "ember"], cwd=ROOT)
        subprocess.check_call([str(ROOT / "target" / "release" / "ember"), "convert", str(MODEL),
                               str(out), "--dtype", "f16"], stdout=subprocess.DEVNULL)
    return (out / "tokenizer.json").read_text()


if __name__ == "__main__":
    main()
