"""Speculation under a grammar mask (runtime/engine_spec.py): prompt-lookup proposals cut at the first
forbidden token, draft-model proposals drawn under the mask, every proposal verified under the mask of its
position. Greedy output is token for token the constrained output without speculation; sampled output
validates; proposals are really checked (and accepted) on constrained sequences."""

from __future__ import annotations

import json

import jsonschema
import pytest
from native_reference import NativeBackend
from test_grammar import PROMPTS, SCHEMAS

from ripelm.runtime.engine import Engine
from ripelm.runtime.grammar import Constraint
from ripelm.runtime.sampling import SamplingParams

# A prompt that repeats what the answer will say, so prompt lookup has something to propose.
ECHO = 'Copy this JSON exactly: {"name": "Alice", "age": 30, "city": "Paris"}. Again: {"name": "Alice",'


def EOG(b: NativeBackend) -> frozenset[int]:  # noqa: N802 - reads as the constant it is
    return b.tokenizer.eog_ids


def run(bundled, engine: Engine, prompt: str, params: SamplingParams, speculate: str) -> tuple:
    text = bundled.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = bundled.tokenizer.encode(text, add_bos=False)
    c = Constraint(bundled.tokenizer, params.grammar)
    req = engine.submit(ids, params, speculate=speculate, spec_k=4, spec_adaptive=False, constraint=c)
    engine.run_until_idle()
    toks = [t for t in req.streams[0] if t not in bundled.tokenizer.eog_ids]
    return toks, engine.snapshot().spec_accepted


@pytest.mark.parametrize("speculate", ["ngram", "draft"])
def test_greedy_constrained_output_is_the_same_with_speculation(bundled, speculate):
    engine = Engine(bundled.model, context_length=1024, kv_memory=32 << 20, threaded=False,
                    eog_ids=EOG(bundled),
                    draft_model=bundled.model if speculate == "draft" else None)  # fmt: skip
    accepted = 0
    try:
        cases = [(ECHO, SCHEMAS[0])] + [(p, SCHEMAS[i % len(SCHEMAS)]) for i, p in enumerate(PROMPTS[:3])]
        for prompt, schema in cases:
            grammar = ("json_schema", json.dumps(schema))
            params = SamplingParams(temperature=0, max_tokens=120, grammar=grammar)
            plain, _ = run(bundled, engine, prompt, params, "off")
            fast, accepted = run(bundled, engine, prompt, params, speculate)
            assert fast == plain, prompt
            jsonschema.validate(json.loads(bundled.tokenizer.decode(fast)), schema)
    finally:
        engine.close()
    assert accepted > 0  # proposals were made, verified under the mask and accepted


def test_sampled_constrained_output_with_draft_speculation_validates(bundled):
    engine = Engine(bundled.model, context_length=1024, kv_memory=32 << 20, threaded=False,
                    eog_ids=EOG(bundled),
                    draft_model=bundled.model)  # fmt: skip
    try:
        for i, prompt in enumerate(PROMPTS):
            schema = SCHEMAS[i % len(SCHEMAS)]
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=150,
                                    grammar=("json_schema", json.dumps(schema)))  # fmt: skip
            toks, accepted = run(bundled, engine, prompt, params, "draft")
            jsonschema.validate(json.loads(bundled.tokenizer.decode(toks)), schema)
        assert accepted > 0
    finally:
        engine.close()
