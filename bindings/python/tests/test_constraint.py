"""Constrained output from Python: what is generated is valid (checked by Python's own
`jsonschema` and `re`), and greedy constrained output equals a reference made by masking
Ember's raw logits with llguidance's own Python package."""

import json
import re

import numpy as np
import pytest

import ember
from conftest import LLAMA

jsonschema = pytest.importorskip("jsonschema")
llguidance = pytest.importorskip("llguidance")
import llguidance.numpy as lnp  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"enum": ["trade", "fight", "flee"]},
        "price": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                 "maxItems": 2},
    },
    "required": ["action", "price", "tags"],
    "additionalProperties": False,
}


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def test_sampled_json_is_valid_against_the_schema(llama):
    for seed in range(30):
        sampler = ember.Sampler(temperature=1.0, seed=seed)
        stream = llama.generate("Hello", max_tokens=100, sampler=sampler, json_schema=SCHEMA)
        text = stream.read()
        assert stream.stop_reason == ember.StopReason.CONSTRAINT_COMPLETE, text
        jsonschema.validate(json.loads(text), SCHEMA)
        # The caller's sampler is given back without the constraint.
        assert sampler.constraint_state == ember.ConstraintState.NONE


def test_regex_and_grammar_outputs_match(llama, gpt2):
    for model in (llama, gpt2):
        for seed in range(10):
            text = model.generate("Hi", max_tokens=40, regex=r"[0-9]{2}:[0-9]{2}",
                                  sampler=ember.Sampler(temperature=1.0, seed=seed)).read()
            assert re.fullmatch(r"[0-9]{2}:[0-9]{2}", text), text
        text = model.generate("Hi", max_tokens=40,
                              grammar='start: ("ab" | "cd")+ "."').read()
        assert re.fullmatch(r"(ab|cd)+\.", text), text


def test_greedy_output_equals_llguidance_masking_the_same_logits(llama):
    # The model's end tokens end a complete output (llguidance would take the tokenizer's).
    ends = [t for t in range(llama.n_vocab) if llama.is_end_token(t)]
    tokenizer = llguidance.LLTokenizer((LLAMA / "tokenizer.json").read_text(),
                                       n_vocab=llama.n_vocab, eos_token=ends)
    prompt = llama.tokenize("Hello")
    for grammar, kwargs in [
        # Ember lays JSON out on one line with ", " and ": " unless the schema says otherwise.
        (llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_LAYOUT),
         {"json_schema": SCHEMA}),
        (llguidance.LLMatcher.grammar_from_regex(r"[a-z]{3,6} [0-9]+"),
         {"regex": r"[a-z]{3,6} [0-9]+"}),
    ]:
        with llama.session(n_ctx=128) as s:
            stream = s.generate("Hello", max_tokens=60, **kwargs)
            stream.read()
            ours = [t for t, _ in stream.tokens]
            # Past the last token, the reference must end too, unless max_tokens cut it.
            limit = len(ours) + (stream.stop_reason != ember.StopReason.MAX_TOKENS)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        mask = lnp.allocate_token_bitmask(1, tokenizer.vocab_size)
        reference = []
        with llama.session(n_ctx=128) as s:
            logits = np.array(s.step(prompt), dtype=np.float32)
            while len(reference) < limit:
                lnp.fill_next_token_bitmask(matcher, mask)
                masked = logits[None, :].copy()
                lnp.apply_token_bitmask_inplace(masked, mask)
                token = int(np.argmax(masked[0]))
                if llama.is_end_token(token):
                    break
                assert matcher.consume_token(token), matcher.get_error()
                reference.append(token)
                if matcher.is_stopped():
                    break
                logits = np.array(s.step(token), dtype=np.float32)
        assert ours == reference, kwargs


def test_states_stop_reasons_and_errors(llama):
    sampler = ember.Sampler()
    sampler.set_constraint(llama, regex="[a-z]{30}")
    assert sampler.constraint_state == ember.ConstraintState.INCOMPLETE
    with llama.session(n_ctx=64) as s:
        stream = s.generate("Hello", max_tokens=4, sampler=sampler)
        text = stream.read()
        assert stream.stop_reason == ember.StopReason.CONSTRAINT_INCOMPLETE
        assert re.fullmatch("[a-z]+", text)
    # The sampler's own constraint stays (it was set on it, not by the stream).
    assert sampler.constraint_state == ember.ConstraintState.INCOMPLETE
    sampler.clear_constraint()
    assert sampler.constraint_state == ember.ConstraintState.NONE
    with pytest.raises(ember.InvalidArgumentError, match="constraint"):
        sampler.set_constraint(llama, grammar="start: undefined_rule")
    with pytest.raises(ember.InvalidArgumentError, match="not JSON"):
        sampler.set_constraint(llama, json_schema="{oops")
    with pytest.raises(ValueError):
        sampler.set_constraint(llama, regex="a", grammar="start: \"a\"")
    assert sampler.constraint_state == ember.ConstraintState.NONE


def test_gbnf_grammars_constrain_as_llama_cpp_writes_them(llama):
    gbnf = ember.Gbnf('root ::= dir " " [1-9] [0-9]? " steps"\ndir ::= "north" | "south"\n')
    for seed in range(10):
        stream = llama.generate("Hello", max_tokens=40, grammar=gbnf,
                                sampler=ember.Sampler(temperature=1.0, seed=seed))
        text = stream.read()
        assert stream.stop_reason == ember.StopReason.CONSTRAINT_COMPLETE, text
        assert re.fullmatch(r"(north|south) [1-9][0-9]? steps", text), text
    with pytest.raises(ember.InvalidArgumentError, match="no `root` rule"):
        ember.Sampler().set_constraint(llama, grammar=ember.Gbnf('start ::= "a"\n'))
