"""Speculative decoding end to end on real (tiny and bundled) models: same greedy output as the target alone,
the target's sampling distribution, ternary drafts, and turning itself off when the draft cannot pay."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from native_reference import NativeBackend
from small_vocab import open_native, reset, small_vocab_source
from speculative_reference import SpeculativeBackend
from test_spec_verify import chi_square_p_value

from ripelm.models.quantize import quantize_model
from ripelm.runtime.backend import GenerationStats, stream
from ripelm.runtime.sampling import SamplingParams, token_probs
from ripelm.runtime.spec_control import DraftPolicy
from ripelm.runtime.tokenizer import Tokenizer

ALPHA = 0.001  # significance of the distribution tests (fixed seeds: the outcome is deterministic)
GREEDY = SamplingParams(temperature=0, max_tokens=10_000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forwards do not gain from a second thread, and on a busy machine a parallel region can wait
    a whole scheduler slice for its other thread (measured: 3.4 ms vs 136 ms per tiny forward)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer(bundled_model_path: Path) -> Tokenizer:
    return Tokenizer(bundled_model_path)


def take(it: Iterator[int], n: int) -> list[int]:
    out = []
    for tok in it:
        out.append(tok)
        if len(out) == n:
            break
    return out


def greedy_run(backend, target: NativeBackend, draft: NativeBackend, prompt: list[int], n: int) -> list[int]:
    reset(target, draft)
    gen = backend.generate_ids(prompt, GREEDY, GenerationStats())
    try:
        return take(gen, n)
    finally:
        gen.close()


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_factory, tokenizer):
    """A tiny F32 target and its Q4_0 quantization as the draft (same weights, see gguf_factory)."""
    target = open_native(tiny_model_factory(qtype="F32", seed=3), tokenizer)
    draft = open_native(tiny_model_factory(qtype="Q4_0", seed=3), tokenizer)
    return target, draft


@pytest.mark.parametrize(
    "policy", [DraftPolicy(), DraftPolicy(fixed_k=5, min_confidence=0.0)], ids=["adaptive", "k5"]
)
def test_greedy_is_token_for_token_the_target_alone_on_tiny_models(tiny_pair, policy):
    target, draft = tiny_pair
    spec = SpeculativeBackend(target, draft, policy, owns_models=False)
    rng = random.Random(0)
    drafted = 0
    for _ in range(24):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 40))]
        alone = greedy_run(target, target, draft, prompt, 24)
        stats = GenerationStats()
        reset(target, draft)
        gen = spec.generate_ids(prompt, GREEDY, stats)
        together = take(gen, 24)
        gen.close()
        assert together == alone, prompt
        drafted += stats.drafted
    assert drafted > 0


def test_greedy_identity_on_the_bundled_model(bundled_model_path, tmp_path_factory, tokenizer):
    """The f16 re-encoding of the bundled model as target, the original Q4_1 as draft, chat prompts."""
    f16 = quantize_model(bundled_model_path, tmp_path_factory.mktemp("f16") / "smol-f16.gguf", "f16").path
    target = NativeBackend(f16, device="cpu", n_ctx=512, tokenizer=tokenizer)
    draft = NativeBackend(bundled_model_path, device="cpu", n_ctx=512, tokenizer=tokenizer)
    spec = SpeculativeBackend(target, draft, DraftPolicy(fixed_k=4), owns_models=False)
    questions = [
        "What is the capital of France?",
        "Write a haiku about autumn.",
        "Explain what a CPU does in two sentences.",
        "def add(a, b):",
    ]
    accepted = 0
    for q in questions:
        text = target.template.render([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_bos=False)
        params = SamplingParams(temperature=0, max_tokens=24)
        reset(target, draft)
        alone = [e.token_id for e in stream(target, ids, params) if e.token_id is not None]
        reset(target, draft)
        events = list(stream(spec, ids, params))
        assert [e.token_id for e in events if e.token_id is not None] == alone, q
        stats = events[-1].stats
        assert stats.engine == "native+draft" and stats.target_forwards >= 1
        accepted += stats.accepted
    assert accepted > 0
    target.close()
    draft.close()


def exact_marginals(target: NativeBackend, prompt: list[int], params: SamplingParams, steps: int) -> list:
    """The target's exact distributions of the 1st..steps-th sampled token (enumerating all prefixes)."""
    vocab = target.cfg.vocab_size
    out = []
    layer = {(): 1.0}
    for _ in range(steps):
        marginal = torch.zeros(vocab, dtype=torch.float64)
        nxt = {}
        for prefix, w in layer.items():
            logits, _ = target.prefill(prompt + list(prefix))
            p = token_probs(logits, params).double()
            marginal += w * p
            for t in torch.nonzero(p).flatten().tolist():
                nxt[prefix + (t,)] = w * float(p[t])
        out.append(marginal)
        layer = nxt
    return out


def test_sampled_tokens_follow_the_target_distribution(tiny_model_factory, tmp_path_factory, tokenizer):
    """Small vocabulary (32 tokens), one small layer: the 1st, 2nd and 3rd sampled tokens over 2000 runs,
    chi-square at significance 0.001 against the target's exact distributions (enumerated).

    The draft is an unrelated model (another seed), so drafts are often rejected and the residual
    distribution is exercised; top-k / top-p filtering applies to p and q alike.
    """
    vocab = small_vocab_source(tmp_path_factory.mktemp("vocab") / "v32.gguf", 32)
    shape = dict(n_layers=1, hidden=64, ffn=128, n_heads=2, n_kv_heads=1, vocab_from=vocab)
    target = open_native(tiny_model_factory(qtype="F32", seed=5, **shape), tokenizer, n_ctx=64)
    draft = open_native(tiny_model_factory(qtype="Q4_0", seed=6, **shape), tokenizer, n_ctx=64)
    # a high temperature spreads the random model's peaked logits; top-k / top-p still cut the tail
    params = SamplingParams(temperature=2.5, top_k=20, top_p=0.95, min_p=0.0, max_tokens=4)
    prompt = [3, 17, 9]
    exact = exact_marginals(target, prompt, params, 3)
    spec = SpeculativeBackend(target, draft, DraftPolicy(fixed_k=3, min_confidence=0.0), owns_models=False)
    counts = torch.zeros(3, 32, dtype=torch.long)
    total = GenerationStats()
    for seed in range(2000):
        params.seed = seed
        stats = GenerationStats()
        gen = spec.generate_ids(prompt, params, stats)
        toks = take(gen, 3)
        gen.close()
        for i, t in enumerate(toks):
            counts[i, t] += 1
        total.drafted += stats.drafted
        total.accepted += stats.accepted
    assert total.accepted >= 200 and total.drafted - total.accepted >= 200  # both paths, many times
    for i in range(3):
        assert int((exact[i] * 2000 >= 5).sum()) >= 5  # a real test: several well-filled cells
        assert chi_square_p_value(counts[i], exact[i]) > ALPHA, f"token {i + 1}"


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_ternary_draft_end_to_end(tiny_model_factory, tmp_path_factory, tokenizer, qtype):
    """Sizes that are multiples of 256: every layer matrix takes the ternary type, none falls back."""
    src = tiny_model_factory(qtype="F32", seed=8, hidden=256, ffn=512, n_heads=4, n_kv_heads=2)
    res = quantize_model(src, tmp_path_factory.mktemp("tern") / f"draft-{qtype}.gguf", qtype)
    assert not res.fallbacks
    layer_types = {p.dst_type.name for p in res.plans if p.name.startswith("blk.") and len(p.shape) == 2}
    assert layer_types == {qtype.upper()}
    target = open_native(src, tokenizer)
    draft = open_native(res.path, tokenizer)
    spec = SpeculativeBackend(target, draft, DraftPolicy(fixed_k=3, min_confidence=0.0), owns_models=False)
    rng = random.Random(1)
    drafted = 0
    for _ in range(6):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(2, 20))]
        alone = greedy_run(target, target, draft, prompt, 16)
        stats = GenerationStats()
        reset(target, draft)
        gen = spec.generate_ids(prompt, GREEDY, stats)
        assert take(gen, 16) == alone
        gen.close()
        drafted += stats.drafted
    assert drafted > 0


def test_a_draft_as_slow_as_the_target_turns_speculation_off(bundled_model_path, tokenizer):
    """The draft is the target itself: no draft length can pay, so the controller stops drafting."""
    target = NativeBackend(bundled_model_path, device="cpu", n_ctx=512, tokenizer=tokenizer)
    draft = NativeBackend(bundled_model_path, device="cpu", n_ctx=512, tokenizer=tokenizer)
    spec = SpeculativeBackend(target, draft, owns_models=False)
    text = target.template.render(
        [{"role": "user", "content": "Tell me about rivers."}], add_generation_prompt=True
    )
    ids = tokenizer.encode(text, add_bos=False)
    params = SamplingParams(temperature=0, max_tokens=48)
    reset(target, draft)
    alone = [e.token_id for e in stream(target, ids, params) if e.token_id is not None]
    reset(target, draft)
    events = list(stream(spec, ids, params))
    stats = events[-1].stats
    assert [e.token_id for e in events if e.token_id is not None] == alone
    assert spec.controller.off
    assert stats.speculation.startswith("speculation off")
    assert stats.drafted <= 2 * spec.controller.policy.k_init  # one or two rounds to measure, then off
    assert stats.tokens_per_target_forward < 1.2
    target.close()
    draft.close()


def test_draft_length_zero_is_plain_decoding(tiny_pair):
    target, draft = tiny_pair
    spec = SpeculativeBackend(target, draft, DraftPolicy(fixed_k=0), owns_models=False)
    prompt = [500, 600, 700]
    alone = greedy_run(target, target, draft, prompt, 12)
    stats = GenerationStats()
    reset(target, draft)
    gen = spec.generate_ids(prompt, GREEDY, stats)
    assert take(gen, 12) == alone
    gen.close()
    assert stats.drafted == 0 and stats.speculation == "speculation disabled (draft length 0)"
    assert stats.tokens_per_target_forward == pytest.approx(1.0)
