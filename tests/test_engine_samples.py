"""Parallel samples share their prompt's K/V blocks, and reported logprobs are the model's own log-softmax
at the chosen tokens (engine level, on the bundled model; `ripe serve`'s side is test_serve_choices.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ripelm.runtime.engine import Engine
from ripelm.runtime.sampling import SamplingParams

ENGLISH = (Path(__file__).parent / "data" / "english.txt").read_text()


def peak_blocks(engine: Engine, prompt: list[int], n: int, params: SamplingParams) -> tuple[int, list]:
    """The most KV blocks in use at any step boundary while n samples of `prompt` run to their end."""
    req = engine.submit(prompt, params, n=n, ignore_eos=True)
    peak = 0
    while engine.step():
        peak = max(peak, engine.snapshot().used_blocks)
    return peak, [list(s) for s in req.streams]


def test_four_samples_use_at_most_1_3x_the_blocks_of_one(bundled):
    prompt = bundled.tokenizer.encode(ENGLISH, add_bos=False)[:400]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=12)
    peaks = {}
    for n in (1, 4):
        engine = Engine(bundled.model, context_length=2048, kv_memory=64 << 20, threaded=False)
        try:
            peaks[n], outs = peak_blocks(engine, prompt, n, params)
            assert len(outs) == n and all(len(o) == 12 for o in outs)
            if n == 4:
                assert len({tuple(o) for o in outs}) > 1  # they are samples, not copies
            assert engine.snapshot().used_blocks == 0  # all freed at the end
        finally:
            engine.close()
    assert peaks[1] >= 400 // 16
    assert peaks[4] <= 1.3 * peaks[1], peaks


@pytest.mark.parametrize("speculate", ["off", "ngram"])
def test_logprobs_are_the_log_softmax_at_the_chosen_tokens(bundled, speculate):
    text = "The list: apples, pears, plums, apples, pears, plums, apples, pears,"
    prompt = bundled.tokenizer.encode(text, add_bos=True)
    params = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_tokens=16, logprobs=5)
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    try:
        req = engine.submit(prompt, params, ignore_eos=True, speculate=speculate, spec_k=4)
        engine.run_until_idle()
        stream = req.streams[0]
        tokens = list(stream)
    finally:
        engine.close()
    assert len(tokens) == 16 and len(stream.logprobs) == 16
    # the model's logits over prompt + output, one token per forward (the decode path the engine steps on)
    logits = bundled.teacher_forced_logits(prompt + tokens, chunk=1)[len(prompt) - 1 : -1]
    want = torch.log_softmax(logits.float(), dim=-1)
    for i, (tok, lp) in enumerate(zip(tokens, stream.logprobs, strict=True)):
        assert lp.token == tok
        assert lp.logprob == pytest.approx(float(want[i, tok]), abs=0.01), i
        top_ids = [t for t, _ in lp.top]
        assert len(top_ids) == 5 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert set(top_ids[:2]) & set(torch.topk(want[i], 3).indices.tolist())
        assert lp.logprob <= lp.top[0][1] + 1e-6
