"""A draft model inside the batched engine: greedy output token for token the target's own, alone and with 8
sequences batched (some drafting, some on prompt lookup, some plain), on the native and the torch step; the
sampling distribution with a draft far from the target; the draft's own pool in the counters, freed with the
target's on finish, cancel and preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from small_vocab import open_native, small_vocab_source
from test_spec_verify import chi_square_p_value
from test_speculative import exact_marginals

from ripelm.runtime import engine_spec
from ripelm.runtime.engine import Engine
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.tokenizer import Tokenizer

ENGLISH = (Path(__file__).parent / "data" / "english.txt").read_text()
ALPHA = 0.001


@pytest.fixture(scope="module")
def tokenizer(bundled_model_path: Path) -> Tokenizer:
    return Tokenizer(bundled_model_path)


@pytest.fixture(scope="module", params=["Q8_0", "F32"], ids=["native-step", "torch"])
def pair(request, tiny_model_factory, tokenizer):
    """A tiny target and its Q4_0 quantization as the draft (same weights: most proposals are accepted).
    A Q8_0 target runs on the native step, an F32 one on torch."""
    shape = dict(n_layers=2, seed=3)
    target = open_native(tiny_model_factory(qtype=request.param, **shape), tokenizer, n_ctx=512)
    draft = open_native(tiny_model_factory(qtype="Q4_0", **shape), tokenizer, n_ctx=512)
    assert (target.model.native is not None) == (request.param == "Q8_0")
    yield target, draft
    target.close()
    draft.close()


def engine_for(pair, **kw) -> Engine:
    target, draft = pair
    return Engine(
        target.model, context_length=512, kv_memory=32 << 20, threaded=False, draft_model=draft.model, **kw
    )


def prompts_for(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = tokenizer.encode(ENGLISH, add_bos=False)
    out = []
    for _ in range(n):
        start, length = rng.randrange(0, len(words) - 80), rng.randint(1, 70)
        out.append(words[start : start + length])
    return out


def run(engine: Engine, prompts: list[list[int]], modes: list[str], n: int, **kw) -> list:
    params = SamplingParams(temperature=0, max_tokens=n)
    reqs = [
        engine.submit(p, params, ignore_eos=True, speculate=m, **kw)
        for p, m in zip(prompts, modes, strict=True)
    ]
    engine.run_until_idle()
    return [r.streams[0] for r in reqs]


@pytest.mark.parametrize("adaptive", [False, True], ids=["k5", "adaptive"])
def test_greedy_alone_is_the_targets_own_output(pair, tokenizer, adaptive):
    prompts = prompts_for(tokenizer, 12)
    engine = engine_for(pair)
    want = [list(s) for p in prompts for s in run(engine, [p], ["off"], 32)]
    got = []
    for p in prompts:
        (s,) = run(engine, [p], ["draft"], 32, spec_k=5, spec_adaptive=adaptive)
        got.append(list(s))
        assert s.finish.spec.proposer == "draft"
    assert got == want
    c = engine.counters
    assert c.spec_accepted > 0 and c.spec_proposed >= c.spec_accepted
    assert c.draft_total_blocks == c.total_blocks and c.draft_used_blocks == 0
    engine.allocator.check()
    engine.drafter.allocator.check()


def test_eight_sequences_batched_some_drafting(pair, tokenizer):
    """Drafting, prompt lookup and plain sequences in the same steps: each one the target's own output."""
    prompts = prompts_for(tokenizer, 8, seed=1)
    engine = engine_for(pair)
    want = [list(s) for p in prompts for s in run(engine, [p], ["off"], 40)]
    modes = ["draft", "off", "draft", "ngram", "draft", "off", "draft", "draft"]
    streams = run(engine, prompts, modes, 40, spec_k=4, spec_adaptive=False)
    assert [list(s) for s in streams] == want
    for s, m in zip(streams, modes, strict=True):
        assert (s.finish.spec is None) == (m == "off")
        if m == "draft":
            assert s.finish.spec.accepted > 0
    assert engine.allocator.num_used == 0 and engine.drafter.allocator.num_used == 0


REPEATING = [
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the",
    "one two three four five one two three four five one two three",
    "List: apple, banana, cherry. Again the list: apple, banana,",
]


@pytest.mark.parametrize("adaptive", [False, True], ids=["k4", "adaptive"])
def test_auto_picks_draft_or_lookup_per_step_and_keeps_the_output(pair, tokenizer, adaptive):
    """Both proposers per sequence: prompt lookup where it has a match (texts that repeat themselves),
    the draft model elsewhere; alone and batched, the output is the target's own."""
    prompts = [tokenizer.encode(t, add_bos=False) for t in REPEATING] + prompts_for(tokenizer, 3, seed=4)
    engine = engine_for(pair)
    want = [list(s) for p in prompts for s in run(engine, [p], ["off"], 40)]
    used: dict[str, int] = {}
    choose = engine_spec.choose

    def counted(seq):
        choose(seq)
        used[seq.proposer.name] = used.get(seq.proposer.name, 0) + 1

    engine_spec.choose = counted
    try:
        streams = run(engine, prompts, ["auto"] * len(prompts), 40, spec_k=4, spec_adaptive=adaptive)
    finally:
        engine_spec.choose = choose
    assert [list(s) for s in streams] == want
    assert all(s.finish.spec.proposer == "draft+ngram" for s in streams)
    assert used.get("draft", 0) > 0 and used.get("ngram", 0) > 0, used
    assert engine.counters.spec_accepted > 0
    assert engine.allocator.num_used == 0 and engine.drafter.allocator.num_used == 0


def test_a_draft_stream_and_seven_plain_ones_share_the_pools_and_cancel_frees_both(pair, tokenizer):
    prompts = prompts_for(tokenizer, 8, seed=2)
    engine = engine_for(pair)
    want = [list(s) for p in prompts for s in run(engine, [p], ["off"], 48)]
    params = SamplingParams(temperature=0, max_tokens=48)
    reqs = [
        engine.submit(p, params, ignore_eos=True, speculate="draft" if i == 0 else "off", spec_k=4)
        for i, p in enumerate(prompts)
    ]
    seen_draft_blocks = 0
    while engine.step():
        c = engine.snapshot()
        seen_draft_blocks = max(seen_draft_blocks, c.draft_used_blocks)
        assert c.draft_used_blocks + c.draft_free_blocks == c.draft_total_blocks
    assert seen_draft_blocks > 0  # the draft's pool is counted while it holds the drafting sequence
    assert [list(r.streams[0]) for r in reqs] == want
    # Cancel a drafting sequence mid-generation: both pools give back its blocks at the same step.
    req = engine.submit(
        prompts[0],
        SamplingParams(temperature=0, max_tokens=200),
        ignore_eos=True,
        speculate="draft",
        spec_k=4,
        spec_adaptive=False,
    )
    for _ in range(6):
        engine.step()
    c = engine.snapshot()
    assert c.used_blocks > 0 and c.draft_used_blocks > 0
    done = req.cancel()
    engine.step()
    assert done.is_set()
    c = engine.snapshot()
    assert (c.used_blocks, c.draft_used_blocks) == (0, 0)
    engine.allocator.check()
    engine.drafter.allocator.check()


def test_preempted_drafting_sequences_recompute_correctly(pair, tokenizer):
    """A pool too small for all of them at once: preemption frees a drafting sequence's blocks in both
    pools; recomputed later, every output is still the target's own."""
    words = tokenizer.encode(ENGLISH, add_bos=False)
    prompts = [words[i * 50 : i * 50 + 40 + i] for i in range(8)]
    engine = engine_for(pair)
    want = [list(s) for p in prompts for s in run(engine, [p], ["off"], 40)]
    target, draft = pair
    small = Engine(
        target.model,
        context_length=512,
        threaded=False,
        draft_model=draft.model,
        kv_memory=_block_bytes(target) * 16,
    )
    assert small.allocator.num_blocks == 16
    streams = run(small, prompts, ["draft"] * 8, 40, spec_k=4, spec_adaptive=False)
    assert [list(s) for s in streams] == want
    assert small.counters.preemptions > 0 and any(s.finish.preemptions for s in streams)
    assert small.allocator.num_used == 0 and small.drafter.allocator.num_used == 0


def _block_bytes(target) -> int:
    from ripelm.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache, kv_dtype_for

    cfg = target.model.cfg
    dtype = kv_dtype_for(target.model)
    return PagedKVCache.bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, DEFAULT_BLOCK_SIZE, dtype)


@pytest.mark.parametrize("mode", ["draft", "auto"])
def test_sampled_tokens_follow_the_target_distribution(tiny_model_factory, tmp_path_factory, tokenizer, mode):
    """Small vocabulary (32 tokens): the 1st..3rd sampled tokens over 2000 runs, chi-square at 0.001 against
    the target's exact distributions; the draft is an unrelated model (another seed), so it is often
    rejected and the residual distribution is exercised; four requests per step, on native and torch."""
    vocab = small_vocab_source(tmp_path_factory.mktemp("vocab") / "v32.gguf", 32)
    shape = dict(n_layers=1, hidden=64, ffn=128, n_heads=2, n_kv_heads=1, vocab_from=vocab)
    params = SamplingParams(temperature=2.5, top_k=20, top_p=0.95, min_p=0.0, max_tokens=4)
    # auto: a self-repeating prompt, so prompt lookup proposes too (and the draft where it has no match)
    prompt = [3, 17, 9] if mode == "draft" else [3, 17, 9, 3, 17, 9, 3]
    runs = 2000
    draft = open_native(tiny_model_factory(qtype="Q4_0", seed=6, **shape), tokenizer, n_ctx=64)
    for qtype in ("Q8_0", "F32"):
        target = open_native(tiny_model_factory(qtype=qtype, seed=5, **shape), tokenizer, n_ctx=64)
        exact = exact_marginals(target, prompt, params, 3)
        engine = Engine(
            target.model, context_length=64, kv_memory=1 << 20, threaded=False, draft_model=draft.model
        )
        counts = torch.zeros(3, 32, dtype=torch.long)
        for first in range(0, runs, 4):
            reqs = [
                engine.submit(
                    prompt,
                    SamplingParams(**{**vars(params), "seed": seed}),
                    ignore_eos=True,
                    speculate=mode,
                    spec_adaptive=False,
                    spec_k=3,
                )
                for seed in range(first, first + 4)
            ]
            engine.run_until_idle()
            for r in reqs:
                for i, t in enumerate(list(r.streams[0])[:3]):
                    counts[i, t] += 1
        c = engine.counters
        assert c.spec_accepted >= 200 and c.spec_proposed - c.spec_accepted >= 200, (qtype, c)
        for i in range(3):
            assert int((exact[i] * runs >= 5).sum()) >= 5
            assert chi_square_p_value(counts[i], exact[i]) > ALPHA, f"{qtype}: token {i + 1}"
        assert engine.allocator.num_used == 0 and engine.drafter.allocator.num_used == 0
        engine.close()
        target.close()
    draft.close()


def test_draft_needs_an_engine_with_a_draft_model(pair):
    target, _ = pair
    engine = Engine(target.model, context_length=512, kv_memory=8 << 20, threaded=False)
    with pytest.raises(ValueError, match="draft model"):
        engine.submit([1, 2, 3], SamplingParams(temperature=0), speculate="draft")


def test_parallel_samples_of_a_drafting_request_each_draft(pair, tokenizer):
    """n = 3 samples forked from one prompt: each keeps both proposers (auto) and its own draft table."""
    (prompt,) = prompts_for(tokenizer, 1, seed=5)
    engine = engine_for(pair)
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=24)
    req = engine.submit(prompt, params, n=3, ignore_eos=True, speculate="auto", spec_k=3, spec_adaptive=False)
    engine.run_until_idle()
    assert [len(list(s)) for s in req.streams] == [24, 24, 24]
    assert all(s.finish.spec.proposer == "draft+ngram" for s in req.streams)
    assert engine.allocator.num_used == 0 and engine.drafter.allocator.num_used == 0
