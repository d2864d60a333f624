"""Acceptance for structured output through `ripe serve` (a separate process) with the official `openai`
client: 50 varied prompts, each with its own small JSON schema (nested objects, enums, arrays, required
fields), on the bundled model; every response parses and validates (`jsonschema`), streamed and not, on the
native engine and on llama.cpp. The same grammar through Ollama's `format` with the `ollama` client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from openai_servers import ripe_serve

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

SUBJECTS = ["a cat", "a city", "a laptop", "a teacher", "a river", "a song", "a bakery", "a bicycle",
            "a planet", "a football club"]  # fmt: skip
ASKS = ["Describe {} as JSON.", "Give me {} as a JSON record.", "Make up {} and answer in JSON.",
        "Return JSON about {}.", "Fill in the JSON for {}."]  # fmt: skip
NAME = {"type": "string", "minLength": 1, "maxLength": 16}
FIELDS = [
    ("name", NAME),
    ("size", {"type": "string", "enum": ["small", "medium", "large"]}),
    ("count", {"type": "integer", "minimum": 0, "maximum": 999}),
    ("active", {"type": "boolean"}),
    ("tags", {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue", "old", "new"]},
              "minItems": 1, "maxItems": 3}),
    ("place", {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city"],
               "additionalProperties": False}),
    ("rating", {"type": "integer", "enum": [1, 2, 3, 4, 5]}),
    ("owner", {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
               "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False}),
]  # fmt: skip


def case(i: int) -> tuple[str, dict]:
    """Prompt i and its schema: 2 to 4 fields picked by i, the first one or two of them required."""
    picked = [FIELDS[(i * 3 + j * (1 + i % 3)) % len(FIELDS)] for j in range(2 + i % 3)]
    props = dict(picked)
    schema = {"type": "object", "properties": props, "required": list(props)[: 1 + i % 2],
              "additionalProperties": False}  # fmt: skip
    return ASKS[(i // len(SUBJECTS)) % len(ASKS)].format(SUBJECTS[i % len(SUBJECTS)]), schema


def ask(c, i: int, stream: bool) -> None:
    prompt, schema = case(i)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    kw = dict(model="smollm2:135m", messages=[{"role": "user", "content": prompt}], temperature=0,
              max_tokens=160, response_format=fmt)  # fmt: skip
    if stream:
        chunks = c.chat.completions.create(**kw, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        text = c.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_the_cases_vary():
    schemas = [json.dumps(case(i)[1], sort_keys=True) for i in range(50)]
    assert len(set(schemas)) >= 20 and len({case(i)[0] for i in range(50)}) == 50


@pytest.mark.parametrize("engine", ["native", "llama.cpp"])
def test_fifty_schemas_validate_streamed_and_not(tmp_path, engine):
    with ripe_serve(None, tmp_path, "--engine", engine, "--ctx", "1024") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        jobs = [(i, s) for i in range(50) for s in (False, True)]
        workers = 8 if engine == "native" else 1  # the native engine batches concurrent requests
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: ask(c, *job), jobs))  # raises the first failure


def test_ollama_format_json_and_schema(tmp_path):
    with ripe_serve(None, tmp_path, "--ctx", "1024") as (url, _):
        client = ollama.Client(host=url.removesuffix("/v1"))
        opts = {"temperature": 0, "num_predict": 160}
        for i in range(4):
            prompt, schema = case(i)
            msgs = [{"role": "user", "content": prompt}]
            out = client.chat(model="smollm2:135m", messages=msgs, format=schema, options=opts)
            jsonschema.validate(json.loads(out.message.content), schema)
            parts = client.chat(model="smollm2:135m", messages=msgs, format=schema, options=opts, stream=True)
            jsonschema.validate(json.loads("".join(p.message.content for p in parts)), schema)
            gen = client.generate(model="smollm2:135m", prompt=prompt, format=schema, options=opts)
            jsonschema.validate(json.loads(gen.response), schema)
        short = 'Reply with the JSON object {"sky": "blue"} and nothing else.'
        out = client.generate(model="smollm2:135m", prompt=short, format="json", options=opts)
        assert isinstance(json.loads(out.response), dict)
