"""Structured output through `ripe serve` (a separate process) with the official `openai` client: JSON
schemas with nested objects, enums, arrays and required fields on the bundled model, streamed and not, on
the native engine and on llama.cpp; and every field the server cannot honour yet is a 400 naming it."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai_servers import ripe_serve
from test_grammar import PROMPTS, SCHEMAS

openai = pytest.importorskip("openai")


def ask(c, prompt: str, schema: dict, stream: bool) -> str:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    kw = dict(model="smollm2:135m", messages=[{"role": "user", "content": prompt}], temperature=0,
              max_tokens=200, response_format=fmt)  # fmt: skip
    if not stream:
        return c.chat.completions.create(**kw).choices[0].message.content
    return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True))


@pytest.mark.parametrize("engine", ["native", "llama.cpp"])
def test_json_schemas_validate_streamed_and_not(tmp_path, engine):
    with ripe_serve(None, tmp_path, "--engine", engine, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x")
        for i, prompt in enumerate(PROMPTS):
            schema = SCHEMAS[i % len(SCHEMAS)]
            jsonschema.validate(json.loads(ask(c, prompt, schema, stream=bool(i % 2))), schema)
        out = c.chat.completions.create(
            model="smollm2:135m",
            messages=[
                {"role": "user", "content": "A JSON object with the keys name and color for a red apple."}
            ],
            temperature=0,
            max_tokens=200,
            response_format={"type": "json_object"},
        )
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_fields_not_honoured_are_a_400_naming_them(tmp_path):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    BAD = {"type": "nope"}  # noqa: N806
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    cases = [
        ({"functions": [tool["function"]]}, "'functions'"),  # the legacy form of tools
        ({"logprobs": True, "top_logprobs": 50}, "'top_logprobs'"),
        ({"n": 2.5}, "'n'"),
        ({"response_format": {"type": "xml"}}, "'response_format.type'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD}}},
         "'response_format.json_schema.schema'"),
        ({"messages": [{"role": "user", "content": image}]}, "'messages[0].content[1].type'"),
    ]  # fmt: skip
    with ripe_serve(None, tmp_path, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for extra, needle in cases:
            kw = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(**{**kw, **extra})
            assert needle in str(e.value), (extra, str(e.value))
