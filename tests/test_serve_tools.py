"""Tool calling through `ripe serve` (a separate process) with the official `openai` client: the bundled
model (a template that knows no tools: the generic form) makes a valid call when the call is required or
named, on the native engine and on llama.cpp, streamed and not; tool results are taken on the next turn;
tiny models carrying the real templates of Qwen2.5, Qwen3, Llama 3.2 and Mistral Nemo have their forced
calls parsed from their own syntax; request mistakes are a 400 naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai_servers import ripe_serve
from test_tool_calls import MODELS, TEMPLATES

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}  # fmt: skip
CONVERT = {"type": "function", "function": {
    "name": "convert", "description": "Convert an amount of money",
    "parameters": {"type": "object", "properties": {
        "amount": {"type": "integer", "minimum": 0, "maximum": 1000},
        "to": {"type": "string", "enum": ["EUR", "USD"]}},
        "required": ["amount", "to"], "additionalProperties": False}}}  # fmt: skip
TOOLS = [WEATHER, CONVERT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days, in celsius?"}]


def calls_of(c, stream: bool, **kw) -> tuple[list[tuple[str, dict]], str, str]:
    """(name, arguments) of each call, the content, and the finish reason; streamed deltas reassembled."""
    kw = dict(model="m", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120) | kw
    if not stream:
        r = c.chat.completions.create(**kw).choices[0]
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in r.message.tool_calls or []]
        if calls:
            assert all(t.id.startswith("call_") and t.type == "function" for t in r.message.tool_calls)
        return calls, r.message.content or "", r.finish_reason
    calls, content, finish = {}, [], None
    for chunk in c.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content.append(d.content or "")
        for t in d.tool_calls or []:
            assert t.index not in calls and t.id.startswith("call_")  # one whole call per delta
            calls[t.index] = (t.function.name, json.loads(t.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], "".join(content), finish


def check_valid(calls: list[tuple[str, dict]], names=tuple(SCHEMAS), engine: str = "native") -> None:
    assert calls
    for name, args in calls:
        assert name in names
        schema = SCHEMAS[name]
        if engine == "llama.cpp":  # llama-cpp-python's schema-to-GBNF converter ignores integer bounds
            text = json.dumps(schema).replace('"minimum"', '"x-min"').replace('"maximum"', '"x-max"')
            schema = json.loads(text)
        jsonschema.validate(args, schema)


@pytest.mark.parametrize("engine", ["native", "llama.cpp"])
def test_bundled_model_makes_valid_calls_when_required_or_named(tmp_path, engine):
    with ripe_serve(None, tmp_path, "--engine", engine, "--ctx", "2048") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for stream in (False, True):
            calls, content, finish = calls_of(c, stream, tool_choice="required")
            check_valid(calls, engine=engine)
            assert finish == "tool_calls" and content == ""
            named = {"type": "function", "function": {"name": "convert"}}
            calls, _, finish = calls_of(c, stream, tool_choice=named)
            check_valid(calls, ("convert",), engine)
            assert len(calls) == 1 and finish == "tool_calls"
            calls, _, _ = calls_of(c, stream, tool_choice="required", parallel_tool_calls=False)
            assert len(calls) == 1
            calls, content, finish = calls_of(c, stream, tool_choice="none", max_tokens=16)
            assert calls == [] and content and finish in ("stop", "length")


def test_tool_results_reach_the_next_turn(tmp_path):
    with ripe_serve(None, tmp_path, "--ctx", "2048") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        first = c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                          temperature=0, max_tokens=120).choices[0].message  # fmt: skip
        assert first.tool_calls
        history = ASK + [first.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": t.id, "content": "Sunny, 24 degrees, every day."}
            for t in first.tool_calls
        ]
        plain = c.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=1)
        after = c.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0,
                                          max_tokens=40)  # fmt: skip
        assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # the prompt holds the call and its result (the generic form writes them as text)
        assert after.usage.prompt_tokens > plain.usage.prompt_tokens + 30


FAMILY_MODELS = {"qwen2.5": "qwen2", "qwen3": "qwen3", "llama3.2": "llama", "mistral-nemo": "llama"}


@pytest.mark.parametrize("model", list(FAMILY_MODELS))
def test_forced_calls_in_each_family_syntax(tmp_path, tiny_model_factory, model):
    path = TEMPLATES / f"{MODELS[model][0]}.jinja"
    if not path.exists():
        pytest.skip(f"{path} is missing: packaging/install_test_tools.sh extracts llama.cpp's templates")
    gguf = tiny_model_factory(arch=FAMILY_MODELS[model], chat_template=path.read_text())
    engines = ("native", "llama.cpp") if model in ("qwen2.5", "mistral-nemo") else ("native",)
    for engine in engines:
        with ripe_serve(gguf, tmp_path, "--engine", engine, "--ctx", "2048") as (url, _):
            c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
            for stream in (False, True):
                calls, content, finish = calls_of(c, stream, tool_choice="required",
                                                  parallel_tool_calls=False)  # fmt: skip
                check_valid(calls, engine=engine)
                assert len(calls) == 1 and finish == "tool_calls" and content == "", (engine, content)


def test_request_mistakes_are_a_400_naming_the_field(tmp_path):
    bad_tool = {"type": "function", "function": {"description": "no name"}}
    cases = [
        ({"tool_choice": "required"}, "'tool_choice'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "'tool_choice.function.name'"),
        ({"tools": [bad_tool]}, "'tools[0].function.name'"),
        ({"tools": [{"type": "retrieval"}]}, "'tools[0].type'"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "'parallel_tool_calls'"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "'tool_choice'"),
        ({"functions": [WEATHER["function"]]}, "'functions'"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}]},
         "'messages[0].tool_calls[0].function.name'"),
        ({"extra_body_kw": {"chat_template_kwargs": {"messages": []}}}, "'chat_template_kwargs.messages'"),
    ]  # fmt: skip
    with ripe_serve(None, tmp_path, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for extra, needle in cases:
            kw = {"model": "m", "messages": ASK, "max_tokens": 4, **extra}
            if "extra_body_kw" in kw:
                kw["extra_body"] = kw.pop("extra_body_kw")
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(**kw)
            assert needle in str(e.value), (extra, str(e.value))
