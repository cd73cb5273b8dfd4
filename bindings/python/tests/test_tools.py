"""Tool calls from Python: conversations with tools render as the template says, replies in
tool-call mode parse into calls whose arguments Python's own ``jsonschema`` finds valid, and
a parsed reply goes back into the conversation."""

import json
import pathlib

import pytest

import ember

jsonschema = pytest.importorskip("jsonschema")

FEATURES = json.loads((pathlib.Path(__file__).resolve().parents[3] / "tests" / "fixtures"
                       / "tokenizers" / "chat_features.json").read_text())
QWEN_STYLE = FEATURES["templates"]["tool_thinking"]
LLAMA_STYLE = FEATURES["templates"]["dated_tools"]

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TRADE = {"type": "object",
         "properties": {"item": {"enum": ["sword", "shield"]},
                        "price": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["item", "price"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "trade", "parameters": TRADE}}]
SCHEMAS = {"get_weather": WEATHER, "trade": TRADE}
ASK = [{"role": "user", "content": "Sell me a sword."}]


def check(message):
    calls = message["tool_calls"]
    assert calls
    for call in calls:
        jsonschema.validate(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("template", [QWEN_STYLE, LLAMA_STYLE])
def test_required_calls_are_valid_for_their_schemas(long_context, template):
    for seed in range(15):
        stream = long_context.chat(ASK, tools=TOOLS, tool_choice="required",
                                   chat_template=template, max_tokens=1000,
                                   variables={"enable_thinking": False},
                                   sampler=ember.Sampler(temperature=1.0, seed=seed))
        message = stream.message()
        assert stream.stop_reason == ember.StopReason.CONSTRAINT_COMPLETE
        check(message)


def test_a_named_tool_is_called_and_the_reply_becomes_the_next_turn(long_context):
    session = long_context.session()
    choice = {"type": "function", "function": {"name": "trade"}}
    stream = session.chat(ASK, tools=TOOLS, tool_choice=choice, chat_template=QWEN_STYLE,
                          max_tokens=300, variables={"enable_thinking": False},
                          sampler=ember.Sampler(temperature=1.0, seed=5))
    message = stream.message()
    check(message)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["trade"]
    turn = ASK + [message, {"role": "tool", "content": '{"sold": true}'}]
    prompt = long_context.apply_chat_template(turn, tools=TOOLS, chat_template=QWEN_STYLE)
    assert '<tool_call>\n{"name": "trade", "arguments": ' in prompt
    assert '<tool_response>\n{"sold": true}\n</tool_response>' in prompt
    assert long_context.parse_reply(prompt.split("<|im_start|>assistant\n")[-2].split(
        "<|im_end|>")[0], chat_template=QWEN_STYLE)["tool_calls"] == message["tool_calls"]
    # The next turn answers in text, reusing the tokens the session holds.
    held = session.position
    assert held > 300
    reply = session.chat(turn, tools=TOOLS, tool_choice="none", chat_template=QWEN_STYLE,
                         max_tokens=8).message()
    assert "tool_calls" not in reply
    assert session.perf["last_prompt_tokens"] < held // 3


def test_templates_that_do_not_read_tools_say_so(long_context):
    with pytest.raises(ember.InvalidArgumentError, match="does not read `tools`"):
        long_context.apply_chat_template(ASK, tools=TOOLS)
    with pytest.raises(ember.InvalidArgumentError, match="tool_choice"):
        long_context.chat(ASK, tool_choice="required").read()
    with pytest.raises(ember.InvalidArgumentError, match="not among the tools"):
        long_context.chat(ASK, tools=TOOLS, tool_choice={"function": {"name": "fly"}},
                          chat_template=QWEN_STYLE).read()
    with pytest.raises(ember.InvalidArgumentError, match="tool call 1"):
        long_context.parse_reply("<tool_call>\n{oops}\n</tool_call>", chat_template=QWEN_STYLE)
