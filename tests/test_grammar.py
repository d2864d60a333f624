"""Structured output (grammar-constrained sampling, runtime/grammar.py): on the bundled model, JSON schemas
with nested objects, enums, arrays and required fields give JSON that validates, greedy and sampled,
batched, with parallel samples; the same through llama.cpp's own grammar; `ripe run --format json` and
`--json-schema`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from ripelm.runtime.backend import stream
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.errors import BadSamplingError
from ripelm.runtime.sampling import SamplingParams

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        },
        "required": ["sentiment", "keywords"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "author": {
                "type": "object",
                "properties": {
                    "first": {"type": "string", "maxLength": 20},
                    "last": {"type": "string", "maxLength": 20},
                },
                "required": ["first", "last"],
                "additionalProperties": False,
            },
            "year": {"type": "integer"},
            "available": {"type": "boolean"},
        },
        "required": ["title", "author", "year", "available"],
        "additionalProperties": False,
    },
]
PROMPTS = [
    "Give me a person as JSON: Alice is 30 and lives in Paris.",
    "Describe the sentiment of 'I love this phone, the battery lasts forever' as JSON.",
    "Return a book as JSON: Dune by Frank Herbert, 1965, in stock.",
    "Extract: Bob, 42, from Berlin.",
    "What is the sentiment of 'The food was cold and late'? Answer in JSON.",
    "Make up a book record in JSON.",
]


@pytest.fixture(scope="module")
def backend(bundled_model_path):
    b = EngineBackend(bundled_model_path, device="cpu", n_ctx=1024, kv_memory=64 << 20)
    yield b
    b.close()


def answer(backend, prompt: str, params: SamplingParams) -> str:
    text = backend.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = backend.tokenizer.encode(text, add_bos=False)
    return "".join(e.text for e in stream(backend, ids, params))


@pytest.mark.parametrize("temp", [0.0, 0.8], ids=["greedy", "sampled"])
def test_schema_constrained_output_validates(backend, temp):
    for i, prompt in enumerate(PROMPTS):
        schema = SCHEMAS[i % len(SCHEMAS)]
        params = SamplingParams(
            temperature=temp, seed=i, max_tokens=200, grammar=("json_schema", json.dumps(schema))
        )
        out = answer(backend, prompt, params)
        jsonschema.validate(json.loads(out), schema)


def test_batched_and_parallel_samples_each_follow_the_grammar(backend):
    """Four requests at once, one of them with n=3 samples sharing the prompt (each its own matcher)."""
    schema = SCHEMAS[1]
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=120, grammar=("json_schema", json.dumps(schema))
    )
    from ripelm.runtime.grammar import Constraint

    reqs = []
    for prompt in PROMPTS[:3]:
        text = backend.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = backend.tokenizer.encode(text, add_bos=False)
        reqs.append(
            backend.engine.submit(ids, params, constraint=Constraint(backend.tokenizer, params.grammar))
        )
    reqs.append(
        backend.engine.submit(ids, params, n=3, constraint=Constraint(backend.tokenizer, params.grammar))
    )
    outs = []
    for r in reqs:
        for s in r.streams:
            toks = [t for t in s if t not in backend.tokenizer.eog_ids]
            outs.append(backend.tokenizer.decode(toks))
    assert len(outs) == 6
    for out in outs:
        jsonschema.validate(json.loads(out), schema)
    assert len(set(outs[3:])) > 1  # the samples differ


def test_json_object_and_regex(backend):
    out = answer(
        backend,
        "Say hi in JSON.",
        SamplingParams(temperature=0, max_tokens=200, grammar=("json_object", "")),
    )
    assert isinstance(json.loads(out), dict)
    out = answer(
        backend,
        "What is 6 times 7?",
        SamplingParams(temperature=0, max_tokens=20, grammar=("regex", r"[0-9]{1,3}")),
    )
    assert out.isdigit()


def test_bad_grammars_are_one_clear_error():
    for grammar, needle in [
        (("json_schema", "{not json"), "invalid json schema grammar"),
        (("json_schema", "[1, 2]"), "must be a JSON object"),
        (("xml", "<a/>"), "unknown grammar kind 'xml'"),
        (("regex", "(unclosed"), "invalid regex grammar"),
    ]:
        with pytest.raises(BadSamplingError, match=needle):
            SamplingParams(grammar=grammar).validate()


def test_llama_cpp_engine_takes_json_schemas(bundled_model_path):
    from ripelm.runtime.errors import BackendError
    from ripelm.runtime.llama_cpp_backend import LlamaCppBackend

    b = LlamaCppBackend(bundled_model_path, n_ctx=1024, n_threads=1)
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            schema = SCHEMAS[i]
            params = SamplingParams(
                temperature=0, max_tokens=200, grammar=("json_schema", json.dumps(schema))
            )
            jsonschema.validate(json.loads(answer(b, prompt, params)), schema)
        with pytest.raises(BackendError, match="needs the native engine"):
            answer(b, "hi", SamplingParams(grammar=("regex", "[a-z]+")))
    finally:
        b.close()


def ripe(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home), RIPELM_NO_SERVER="1")
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_format_json_and_json_schema(tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    base = ["run", "--temp", "0", "-n", "120", "--threads", "1"]
    p = ripe(*base, "--json-schema", str(schema), PROMPTS[0], home=tmp_path)
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout), SCHEMAS[0])
    prompt = "Give a JSON object with the keys name and color for a red apple."
    p = ripe(*base, "--format", "json", prompt, home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert isinstance(json.loads(p.stdout), dict)
    p = ripe(*base, "--json-schema", str(tmp_path / "missing.json"), "Hi", home=tmp_path)
    assert p.returncode == 1 and p.stderr.startswith("ripe: error: cannot read the JSON schema")
    assert len(p.stderr.strip().splitlines()) == 1
