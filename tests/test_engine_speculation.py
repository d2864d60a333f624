"""Speculation inside the batched engine (prompt lookup): greedy output token for token the plain output,
alone and batched with plain sequences, on the native and the torch step; the sampling distribution; exact
stops and budgets; cancel, preemption and the prefix cache; the row budget of a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from native_reference import NativeBackend
from small_vocab import open_native, small_vocab_source
from test_spec_verify import chi_square_p_value
from test_speculative import exact_marginals

from ripelm.runtime import engine_spec
from ripelm.runtime.engine import SPEC_MAX_ROWS, Engine
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.sequence import Finish, SpecToken
from ripelm.runtime.tokenizer import Tokenizer

ENGLISH = (Path(__file__).parent / "data" / "english.txt").read_text()
ALPHA = 0.001

# Texts whose continuation repeats them (proposals get accepted), and plain prose (they mostly do not).
TEXTS = [
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return",
    "one two three four five one two three four five one two three",
    "Repeat after me: the quick brown fox jumps over the lazy dog. Again: the quick brown fox",
    ENGLISH[:400],
    "List: apple, banana, cherry. Again the list: apple, banana,",
    ENGLISH[1000:1200] + " To repeat: " + ENGLISH[1000:1100],
    "Q: What is 2 + 2? A: 4. Q: What is 3 + 3? A: 6. Q: What is 4 + 4? A:",
]


@pytest.fixture(scope="module")
def prompts(bundled) -> list[list[int]]:
    return [bundled.tokenizer.encode(t, add_bos=False) for t in TEXTS]


def generate(engine: Engine, prompts: list[list[int]], n: int, modes: list[str], **kw) -> list:
    """Submit all prompts at once (a batch), run the engine to idle; the finished streams."""
    params = SamplingParams(temperature=0, max_tokens=n)
    reqs = [
        engine.submit(p, params, ignore_eos=True, speculate=m, **{"spec_adaptive": False, **kw})
        for p, m in zip(prompts, modes, strict=True)
    ]
    engine.run_until_idle()
    return [r.streams[0] for r in reqs]


def alone(model, prompts: list[list[int]], n: int, mode: str, **engine_kw) -> tuple[list[list[int]], Engine]:
    """Each prompt on its own (one sequence in the engine at a time)."""
    engine = Engine(model, context_length=2048, kv_memory=32 << 20, threaded=False, **engine_kw)
    out = []
    for p in prompts:
        (stream,) = generate(engine, [p], n, [mode])
        out.append(list(stream))
    assert engine.allocator.num_used == 0
    engine.allocator.check()
    return out, engine


@pytest.fixture(scope="module")
def plain(bundled, prompts) -> list[list[int]]:
    return alone(bundled.model, prompts, 40, "off")[0]


def test_greedy_alone_is_token_for_token_plain_decoding(bundled, prompts, plain):
    got, engine = alone(bundled.model, prompts, 40, "ngram")
    for i, (g, w) in enumerate(zip(got, plain, strict=True)):
        assert g == w, f"prompt {i} diverged"
    c = engine.counters
    assert c.spec_accepted >= 40 and c.spec_proposed > c.spec_accepted  # accepted, and rejected too
    assert c.decode_tokens == len(prompts) * 39  # the first token of each comes from its prefill


def test_eight_sequences_batched_some_speculating(bundled, prompts, plain):
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    modes = ["ngram", "off"] * 4
    streams = generate(engine, prompts, 40, modes)
    for i, (s, w) in enumerate(zip(streams, plain, strict=True)):
        assert list(s) == w, f"prompt {i} ({modes[i]}) diverged"
        if modes[i] == "off":
            assert s.spec is None and s.finish.spec is None
        else:
            assert s.finish.spec.proposer == "ngram" and s.finish.spec == s.spec
    tallies = [s.finish.spec for s in streams if s.finish.spec is not None]
    assert sum(t.accepted for t in tallies) > 0
    assert sum(t.accepted for t in tallies) == engine.counters.spec_accepted
    assert sum(t.proposed for t in tallies) == engine.counters.spec_proposed
    for t in tallies:
        # every token after the first came from a decode step; a round emits its accepted tokens plus one
        assert t.forwards == 40 - t.accepted
    assert engine.allocator.num_used == 0
    engine.allocator.check()


def test_adaptive_lookup_is_plain_decoding_and_proposes_where_it_pays(bundled, prompts, plain):
    """The default (adaptive) controller: the same tokens as plain decoding; it times plain steps first, then
    proposes on these self-repeating texts, and its state reaches the stats."""
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    params = SamplingParams(temperature=0, max_tokens=40)
    for p, want in zip(prompts, plain, strict=True):
        req = engine.submit(p, params, ignore_eos=True, speculate="ngram")
        engine.run_until_idle()
        stream = req.streams[0]
        assert list(stream) == want
        assert stream.finish.spec.state  # "k=4, predicted 1.8x", "off", ...
    assert engine.counters.spec_accepted > 0


def test_the_controller_stops_proposing_what_is_never_accepted():
    """Prompt lookup drafts for free; with every proposal rejected and a 4-row step costing 1.5 plain steps
    the controller turns proposals off (and probes now and then); with every one accepted it proposes k."""
    from ripelm.runtime.spec_control import DraftPolicy, SpecController

    def controller(accept: bool) -> SpecController:
        ctl = SpecController(DraftPolicy(k_max=4, k_init=4, min_confidence=0.0))
        ctl.record_draft(0.0)
        for _ in range(4):
            ctl.record_verify(1, 0.010)
            ctl.record_round(0, 0, 1)
        for _ in range(20):
            k = ctl.next_k()
            if k:
                ctl.record_verify(1 + k, 0.010 + 0.0017 * k)
                ctl.record_round(k, k if accept else 0, (k if accept else 0) + 1)
            else:
                ctl.record_verify(1, 0.010)
                ctl.record_round(0, 0, 1)
        return ctl

    bad, good = controller(False), controller(True)
    assert bad.off and [bad.next_k() for _ in range(10)] == [0] * 10
    assert not good.off and good.next_k() == 4


def test_a_step_never_has_more_rows_than_the_native_batch(bundled, prompts, plain):
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    rows: list[int] = []
    run = engine._run

    def counted(plan):
        if plan.kind == "decode":
            rows.append(sum(plan.counts))
            assert plan.counts == [1 + len(d) for d in plan.drafts]
        return run(plan)

    engine._run = counted
    # 8 sequences proposing up to 6 tokens each would want 56 rows
    streams = generate(engine, prompts, 40, ["ngram"] * 8, spec_k=6)
    assert [list(s) for s in streams] == plain
    assert max(rows) == SPEC_MAX_ROWS
    assert engine.counters.spec_accepted > 0


@pytest.mark.parametrize("qtype", ["Q4_0", "F32"], ids=["native-step", "torch"])
def test_greedy_identity_on_tiny_models(tiny_model_factory, qtype):
    """A random tiny model falls into loops, which prompt lookup predicts; F32 runs on the torch path."""
    b = NativeBackend(tiny_model_factory(qtype=qtype, n_layers=2, seed=11), device="cpu", n_ctx=512)
    try:
        assert (b.model.native is not None) == (qtype == "Q4_0")
        words = b.tokenizer.encode(ENGLISH, add_bos=False)
        ps = [words[i * 13 : i * 13 + n] for i, n in enumerate([3, 30, 7, 64, 12, 1])]
        want, _ = alone(b.model, ps, 48, "off")
        got, engine = alone(b.model, ps, 48, "ngram")
        assert got == want
        assert engine.counters.spec_accepted > 0
        batched = Engine(b.model, context_length=512, kv_memory=32 << 20, threaded=False)
        streams = generate(batched, ps, 48, ["ngram", "off", "ngram", "ngram", "off", "ngram"])
        assert [list(s) for s in streams] == want
    finally:
        b.close()


def test_budget_and_stop_tokens_cut_exactly(bundled, prompts, plain):
    """max_tokens from 1 to 9 on a self-repeating text: exactly that many tokens, plain decoding's. A stop
    token that sits inside an accepted run of proposals ends the sequence there."""
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    p = prompts[0]
    for n in range(1, 10):
        (s,) = generate(engine, [p], n, ["ngram"])
        assert list(s) == plain[0][:n] and s.finish.reason == "length"
    # The rounds of an unstopped run, read from the raw event queue: each decode step's figures come
    # with its first token. Pick a token whose first occurrence is not the last token of its round.
    req = engine.submit(
        p,
        SamplingParams(temperature=0, max_tokens=40),
        ignore_eos=True,
        speculate="ngram",
        spec_adaptive=False,
    )
    engine.run_until_idle()
    rounds: list[list[int]] = []
    while not isinstance(item := req.queues[0].get_nowait(), Finish):
        if isinstance(item, SpecToken):
            rounds.append([item.token])
        elif isinstance(item, int):
            rounds[-1].append(item)
    out = [t for r in rounds for t in r]
    assert out == plain[0]
    candidates = []
    at = 0
    for r in rounds:
        for i, t in enumerate(r[:-1]):
            if out.index(t) == at + i:
                candidates.append(t)
        at += len(r)
    assert candidates  # the text repeats: some round accepted proposals, and one of them is new
    stop = candidates[-1]
    stopper = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, eog_ids={stop}, threaded=False)
    req = stopper.submit(
        p, SamplingParams(temperature=0, max_tokens=40), speculate="ngram", spec_adaptive=False
    )
    stopper.run_until_idle()
    got = list(req.streams[0])
    assert got == out[: out.index(stop) + 1]
    assert req.streams[0].finish.reason == "stop"
    assert stopper.allocator.num_used == 0


def test_cancel_mid_speculation_frees_every_block(bundled, prompts):
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, threaded=False)
    free0, used0 = engine.allocator.num_free, engine.allocator.num_used
    req = engine.submit(
        prompts[2], SamplingParams(temperature=0, max_tokens=400), speculate="ngram", spec_adaptive=False, n=2
    )
    other = engine.submit(
        prompts[3], SamplingParams(temperature=0, max_tokens=400), speculate="ngram", spec_adaptive=False
    )
    for _ in range(200):
        engine.step()
        if engine.counters.spec_accepted >= 8:
            break
    assert engine.counters.spec_accepted >= 8
    assert engine.allocator.num_used > used0
    ack = req.cancel()
    other.cancel()
    engine.step()
    assert ack.is_set() and other.cancelled.is_set()
    for s in req.streams + other.streams:
        toks = list(s)
        assert s.finish.reason == "cancelled" and len(toks) < 400
    assert engine.allocator.num_free == free0 and engine.allocator.num_used == used0 == 0
    engine.allocator.check()
    engine.step()
    assert engine.snapshot().used_blocks == 0 and engine.snapshot().free_blocks == free0


def test_preempted_speculating_sequences_recompute_correctly(bundled, prompts, plain):
    """A pool of 16 blocks for 8 sequences that need ~50: the newest are preempted and recomputed, the
    speculating ones among them too."""
    cfg = bundled.model.cfg
    per_block = 2 * cfg.n_layers * 16 * cfg.n_kv_heads * cfg.head_dim * 2
    engine = Engine(bundled.model, context_length=2048, kv_memory=16 * per_block, threaded=False)
    assert engine.allocator.num_blocks == 16
    modes = ["off", "ngram", "off", "ngram", "off", "ngram", "ngram", "ngram"]
    streams = generate(engine, prompts, 40, modes)
    assert [list(s) for s in streams] == plain
    assert engine.counters.preemptions > 0
    assert any(s.finish.preemptions for s, m in zip(streams, modes, strict=True) if m == "ngram")
    assert engine.counters.spec_accepted > 0
    assert engine.allocator.num_used == 0
    engine.allocator.check()


def test_the_prefix_cache_serves_a_speculating_sequences_history(bundled, prompts, plain):
    """A second turn over a first turn's prompt and reply finds them cached (rejected proposals were rolled
    back, never cached under the wrong tokens) and continues as plain decoding does."""
    # small blocks: rejected proposals often reach into a block of their own
    engine = Engine(bundled.model, context_length=2048, kv_memory=32 << 20, block_size=4, threaded=False)
    (first,) = generate(engine, [prompts[1]], 40, ["ngram"], spec_k=8)
    assert list(first) == plain[1] and first.finish.spec.proposed > first.finish.spec.accepted
    # the only blocks holding tokens are the sequence's own (the prompt and 39 tokens with K/V)
    bs = engine.allocator.block_size
    assert sum(1 for b in engine.allocator.blocks if b.token_ids) == -(-(len(prompts[1]) + 39) // bs)
    turn = prompts[1] + plain[1] + prompts[1][:5]
    (second,) = generate(engine, [turn], 24, ["ngram"])
    got = list(second)
    assert second.finish.cached_tokens >= len(prompts[1]) + 39 - bs
    want, _ = alone(bundled.model, [turn], 24, "off")
    assert got == want[0]
    engine.allocator.check()


def test_sampled_tokens_follow_the_target_distribution(
    tiny_model_factory, tmp_path_factory, bundled_model_path, monkeypatch
):
    """Small vocabulary (32 tokens), one small layer, temperature 2.5 with top-k and top-p: the 1st, 2nd and
    3rd sampled tokens over 2000 runs, chi-square at significance 0.001 against the exact distributions
    (enumerated), with prompt lookup proposing after a self-repeating prompt (matches from one token on, so
    that many proposals are rejected and many accepted); on the native step (Q4_0) and on torch (F32).
    Requests go four at a time, so the steps also batch."""
    monkeypatch.setattr(engine_spec, "NGRAM_SIZES", (1, 3))
    tokenizer = Tokenizer(bundled_model_path)
    vocab = small_vocab_source(tmp_path_factory.mktemp("vocab") / "v32.gguf", 32)
    shape = dict(n_layers=1, hidden=64, ffn=128, n_heads=2, n_kv_heads=1, vocab_from=vocab)
    params = SamplingParams(temperature=2.5, top_k=20, top_p=0.95, min_p=0.0, max_tokens=5)
    prompt = [3, 17, 9, 3, 17, 9, 3]
    runs = 2000
    for qtype in ("Q4_0", "F32"):
        target = open_native(tiny_model_factory(qtype=qtype, seed=5, **shape), tokenizer, n_ctx=64)
        exact = exact_marginals(target, prompt, params, 3)
        engine = Engine(target.model, context_length=64, kv_memory=1 << 20, threaded=False)
        counts = torch.zeros(3, 32, dtype=torch.long)
        for first in range(0, runs, 4):
            reqs = []
            for seed in range(first, first + 4):
                p = SamplingParams(**{**vars(params), "seed": seed})
                reqs.append(
                    engine.submit(
                        prompt, p, ignore_eos=True, speculate="ngram", spec_adaptive=False, spec_k=3
                    )
                )
            engine.run_until_idle()
            for r in reqs:
                toks = list(r.streams[0])[:3]
                for i, t in enumerate(toks):
                    counts[i, t] += 1
        c = engine.counters
        assert c.spec_accepted >= 200 and c.spec_proposed - c.spec_accepted >= 200, (qtype, c)
        for i in range(3):
            assert int((exact[i] * runs >= 5).sum()) >= 5
            assert chi_square_p_value(counts[i], exact[i]) > ALPHA, f"{qtype}: token {i + 1}"
        assert engine.allocator.num_used == 0
        engine.close()
        target.close()
