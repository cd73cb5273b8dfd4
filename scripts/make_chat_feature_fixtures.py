#!/usr/bin/env python3
"""Renders chat templates that use what the templates of 2025-26 model families use, with
transformers' apply_chat_template (Jinja2), for tests/tokenizer.rs.

The templates are written for these tests (not copied from any model); each exercises what a
family's published template relies on:
  tool_thinking  namespace() to find the last user turn from the end, reasoning blocks split out of
                 assistant content and kept only after it, loops over tool calls (dict or string
                 arguments, `function` nesting), grouped tool responses (loop.previtem/nextitem),
                 a `tools` list printed with tojson, and `enable_thinking` (Qwen3, SmolLM3 style)
  alternating    raise_exception for bad role order and content types, a system message folded
                 into the first user turn, content given as a list of typed parts, trim (Gemma)
  dated_tools    tools printed with tojson(indent=4), a `date_string` variable with a default,
                 single tool calls enforced with raise_exception, tool results as JSON (Llama 3.2)
  flags          flags in the system prompt (`/no_think`) and the enable_thinking variable,
                 string methods (replace, startswith, split), custom variables (SmolLM3, Phi-4)

Output: tests/fixtures/tokenizers/chat_features.json, a list of cases
  {template, messages, variables (tools, enable_thinking, ...), add_generation_prompt,
   text | error}
Needs transformers (any tokenizer of tests/fixtures serves to call apply_chat_template). Not run
by CI. Usage: python3 scripts/make_chat_feature_fixtures.py
"""

import json
import pathlib

import jinja2
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizers" / "chat_features.json"

TEMPLATES = {
    "tool_thinking": r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- 'Functions you may call, one JSON signature per line:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools>\nCall one as <tool_call>{"name": NAME, "arguments": ARGS}</tool_call>.<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(searching=true, last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.searching and message.role == 'user' and not (message.content is string and message.content.startswith('<tool_response>')) %}
        {%- set ns.searching = false %}
        {%- set ns.last_user = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content if message.content is string else '' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
                {%- if loop.first and content %}{{- '\n' }}{%- elif not loop.first %}{{- '\n' }}{%- endif %}
                {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
                {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.previtem is not defined or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.nextitem is not defined or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
""",
    "alternating": r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set preamble = messages[0]['content'] ~ '\n\n' -%}
    {%- else -%}
        {%- set preamble = messages[0]['content'][0]['text'] ~ '\n\n' -%}
    {%- endif -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set preamble = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for turn in turns -%}
    {%- if (turn['role'] == 'user') != (loop.index0 is even) -%}
        {{ raise_exception('turns must go user, assistant, user, ... (turn ' ~ loop.index ~ ' is ' ~ turn['role'] ~ ')') }}
    {%- endif -%}
    {{ '<start_of_turn>' ~ ('model' if turn['role'] == 'assistant' else turn['role']) ~ '\n' ~ (preamble if loop.first else '') }}
    {%- if turn['content'] is string -%}
        {{ turn['content'] | trim }}
    {%- elif turn['content'] is iterable -%}
        {%- for part in turn['content'] -%}
            {%- if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception('content must be text or a list of parts') }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
""",
    "dated_tools": r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "1 Jan 2026" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|header|>system<|/header|>\n\nToday: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You may answer with a function call, as JSON {\"name\": ..., \"parameters\": ...}.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot|>" }}
{%- for message in messages %}
    {%- if message.role in ['ipython', 'tool'] %}
        {{- "<|header|>ipython<|/header|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("one tool call per message, please") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|header|>assistant<|/header|>\n\n{"name": "' + call.name + '", "parameters": ' }}
        {{- call.arguments | tojson }}
        {{- "}<|eot|>" }}
    {%- else %}
        {{- '<|header|>' + message['role'] + '<|/header|>\n\n' + message['content'] | trim + '<|eot|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|header|>assistant<|/header|>\n\n' }}{%- endif %}
""",
    "flags": r"""
{%- set system = messages[0].content if messages[0].role == 'system' else '' %}
{%- set think = not (enable_thinking is defined and enable_thinking is false) %}
{%- if '/no_think' in system %}{%- set think = false %}{%- elif '/think' in system %}{%- set think = true %}{%- endif %}
{%- set system = system.replace('/no_think', '').replace('/think', '') | trim %}
{{- '<|system|>' }}
{%- if custom_instructions is defined and custom_instructions %}{{- custom_instructions | trim + '\n' }}{%- endif %}
{{- 'Reasoning: ' + ('on' if think else 'off') + '\n' }}
{%- if system %}{{- system + '\n' }}{%- endif %}
{%- if xml_tools is defined and xml_tools %}
    {{- '<|tool|>' }}{%- for tool in xml_tools %}{{- tool | tojson }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- '<|/tool|>' }}
{%- endif %}
{{- '<|end|>' }}
{%- for message in messages %}
    {%- if message.role != 'system' %}
        {%- set text = message.content %}
        {%- if message.role == 'assistant' and not loop.last and '</think>' in text %}
            {%- set text = text.split('</think>')[-1] | trim %}
        {%- endif %}
        {{- '<|' + message.role + '|>' + text + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- if not think %}{{- '<think></think>' }}{%- endif %}{%- endif %}
""",
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TRADE = {
    "type": "function",
    "function": {
        "name": "offer_trade",
        "description": "Offer the player an item for a price in gold.",
        "parameters": {
            "type": "object",
            "properties": {"item": {"type": "string"}, "price": {"type": "integer", "minimum": 0}},
            "required": ["item", "price"],
        },
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are the blacksmith of Oakvale."},
    {"role": "user", "content": "What's the weather in Paris and in Oslo? Then sell me a sword."},
    {"role": "assistant", "content": "<think>\nTwo cities: two calls.\n</think>\n\nLet me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}},
    ]},
    {"role": "tool", "content": "{\"temperature\": 21}"},
    {"role": "tool", "content": "{\"temperature\": -3}"},
    {"role": "assistant", "content": "<think>\nNow the sword.\n</think>\n\nWarm in Paris, cold in Oslo.", "tool_calls": [
        {"type": "function", "function": {"name": "offer_trade", "arguments": {"item": "sword", "price": 40}}},
    ]},
    {"role": "tool", "content": "{\"accepted\": true}"},
    {"role": "user", "content": "Thanks! Anything else?"},
]

PLAIN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"},
    {"role": "user", "content": "  Tell me a joke.  "},
]

CASES = [
    ("tool_thinking", TOOL_CONVERSATION, {"tools": [WEATHER, TRADE]}, True),
    ("tool_thinking", TOOL_CONVERSATION, {"tools": [WEATHER, TRADE], "enable_thinking": False}, True),
    ("tool_thinking", PLAIN, {}, True),
    ("tool_thinking", PLAIN, {"enable_thinking": False}, False),
    ("tool_thinking", PLAIN[1:], {"enable_thinking": True}, True),
    ("alternating", PLAIN, {}, True),
    ("alternating", PLAIN[1:], {}, False),
    ("alternating", [{"role": "system", "content": [{"type": "text", "text": "Rules. "}]},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]}], {}, True),
    ("alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, True),
    ("alternating", [{"role": "assistant", "content": "I speak first"}], {}, True),
    ("alternating", [{"role": "user", "content": 42}], {}, True),
    ("dated_tools", PLAIN, {}, True),
    ("dated_tools", PLAIN, {"date_string": "30 Nov 2026"}, False),
    ("dated_tools", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "ipython", "content": {"temperature": 21, "sky": "clear"}},
        {"role": "tool", "content": "[1, 2]"},
    ], {"tools": [WEATHER]}, True),
    ("dated_tools", TOOL_CONVERSATION[:3], {"tools": [WEATHER]}, True),
    ("flags", PLAIN, {}, True),
    ("flags", PLAIN, {"enable_thinking": False}, True),
    ("flags", [{"role": "system", "content": "Be terse. /no_think"}] + PLAIN[1:], {}, True),
    ("flags", [{"role": "system", "content": "/think Explain."}] + PLAIN[1:], {"enable_thinking": False}, True),
    ("flags", PLAIN[1:], {"xml_tools": [WEATHER, TRADE], "custom_instructions": "  You are Bram.  "}, False),
]


def main():
    tok = transformers.AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "llama")
    cases = []
    for name, messages, variables, add_generation_prompt in CASES:
        case = {
            "template": name,
            "messages": messages,
            "variables": variables,
            "add_generation_prompt": add_generation_prompt,
        }
        kwargs = dict(variables)
        tools = kwargs.pop("tools", None)
        try:
            case["text"] = tok.apply_chat_template(
                messages, tools=tools, chat_template=TEMPLATES[name], tokenize=False,
                add_generation_prompt=add_generation_prompt, **kwargs,
            )
        except jinja2.exceptions.TemplateError as e:
            case["error"] = str(e)
        cases.append(case)
        print(name, "error: " + case["error"] if "error" in case else f"{len(case['text'])} chars")
    data = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "templates": TEMPLATES, "cases": cases}
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
