"""The batched engine over the paged KV cache, against the single-sequence path, on real models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from native_reference import NativeBackend

from ripelm.runtime.backend import GenerationStats
from ripelm.runtime.engine import Engine, KVPoolError
from ripelm.runtime.sampling import SamplingParams

ENGLISH = (Path(__file__).parent / "data" / "english.txt").read_text()
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def single_sequence(backend: NativeBackend, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    backend.cache.truncate(0)
    backend.cached_tokens.clear()
    for tok in backend.generate_ids(prompt, GREEDY, GenerationStats()):
        out.append(tok)
        if len(out) == n:
            break
    return out


def prompts_of_mixed_lengths(backend: NativeBackend, lengths: list[int]) -> list[list[int]]:
    words = backend.tokenizer.encode(ENGLISH, add_bos=False)
    return [words[i * 7 : i * 7 + n] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> NativeBackend:
    b = NativeBackend(tiny_model_factory(qtype="Q4_0", n_layers=2), device="cpu", n_ctx=2048)
    yield b
    b.close()


def run_all(engine: Engine, prompts: list[list[int]], n_tokens: int, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n_tokens)
    reqs = [engine.submit(p, params, ignore_eos=True, **kw) for p in prompts]
    return [list(r.streams[0]) for r in reqs]


def test_batched_greedy_matches_single_sequence_on_bundled_model(bundled):
    prompts = prompts_of_mixed_lengths(bundled, [3, 40, 17, 600, 120, 1, 9, 260])
    want = [single_sequence(bundled, p, 24) for p in prompts]
    engine = Engine(bundled.model, context_length=2048, kv_memory=96 << 20)
    try:
        got = run_all(engine, prompts, 24)
    finally:
        engine.close()
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g == w, f"prompt {i} ({len(prompts[i])} tokens) diverged"


def test_batched_greedy_matches_single_sequence_on_tiny_model(tiny):
    prompts = prompts_of_mixed_lengths(tiny, [5, 33, 70, 2, 530])
    want = [single_sequence(tiny, p, 40) for p in prompts]
    engine = Engine(tiny.model, context_length=2048, kv_memory=8 << 20)
    try:
        got = run_all(engine, prompts, 40)
    finally:
        engine.close()
    assert got == want


def test_pool_exhaustion_preempts_and_every_request_completes_correctly(bundled):
    """A pool of 16 blocks (256 slots) for 8 requests that need ~700: newest sequences are preempted and
    recomputed. (On the real model: a random tiny model has near-ties that recomputation, which runs the
    history through the prefill matmuls instead of the decode ones, may flip.)"""
    prompts = prompts_of_mixed_lengths(bundled, [40, 25, 60, 33, 48, 20, 55, 30])
    want = [single_sequence(bundled, p, 40) for p in prompts]
    cfg = bundled.model.cfg
    per_block = 2 * cfg.n_layers * 16 * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, bf16
    engine = Engine(bundled.model, context_length=2048, kv_memory=16 * per_block, threaded=False)
    assert engine.allocator.num_blocks == 16
    params = SamplingParams(temperature=0, max_tokens=40)
    reqs = [engine.submit(p, params, ignore_eos=True) for p in prompts]
    engine.run_until_idle()
    got = [list(r.streams[0]) for r in reqs]
    assert engine.counters.preemptions > 0
    assert got == want
    assert engine.allocator.num_used == 0
    engine.allocator.check()


def test_sequence_larger_than_the_pool_ends_with_a_clear_error(tiny):
    engine = Engine(
        tiny.model, context_length=2048, kv_memory=4 * 16384, threaded=False
    )  # 4 blocks = 64 slots
    with pytest.raises(KVPoolError):
        engine.submit(list(range(100)), GREEDY)
    req = engine.submit(list(range(50)), SamplingParams(temperature=0, max_tokens=40), ignore_eos=True)
    engine.run_until_idle()
    stream = req.streams[0]
    with pytest.raises(KVPoolError, match="KV pool"):
        list(stream)
    assert engine.allocator.num_used == 0


def test_parallel_samples_share_the_prompt_blocks(tiny):
    prompt = prompts_of_mixed_lengths(tiny, [1000])[0]
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=8)

    def peak_blocks(n: int) -> tuple[int, list[list[int]]]:
        engine = Engine(tiny.model, context_length=2048, kv_memory=8 << 20, threaded=False)
        req = engine.submit(prompt, params, n=n, ignore_eos=True)
        peak = 0
        while engine.step():
            peak = max(peak, engine.allocator.num_used)
        outs = [list(s) for s in req.streams]
        assert all(len(o) == 8 for o in outs)
        return peak, outs

    one, _ = peak_blocks(1)
    four, outs = peak_blocks(4)
    assert four <= 1.3 * one, (one, four)
    assert len({tuple(o) for o in outs}) > 1  # the samples really differ


def test_second_turn_computes_only_new_tokens(tiny):
    engine = Engine(tiny.model, context_length=2048, kv_memory=8 << 20, threaded=False)
    first = prompts_of_mixed_lengths(tiny, [150])[0]
    req = engine.submit(first, SamplingParams(temperature=0, max_tokens=20), ignore_eos=True)
    engine.run_until_idle()
    reply = list(req.streams[0])
    assert req.streams[0].finish.computed_tokens == len(first) + len(reply) - 1
    # The next turn's prompt: the whole first exchange plus a new user message.
    second = first + reply + prompts_of_mixed_lengths(tiny, [0, 37])[1]
    req2 = engine.submit(second, SamplingParams(temperature=0, max_tokens=1))
    engine.run_until_idle()
    list(req2.streams[0])
    fin = req2.streams[0].finish
    cached = len(first) + len(reply) - 1  # the last reply token was sampled but never fed back
    assert fin.cached_tokens == cached
    assert fin.computed_tokens == len(second) - cached


def test_forced_hash_collisions_never_serve_wrong_blocks(tiny):
    prompts = prompts_of_mixed_lengths(tiny, [64, 64, 80])
    want = [single_sequence(tiny, p, 12) for p in prompts]
    engine = Engine(
        tiny.model, context_length=2048, kv_memory=8 << 20, hash_fn=lambda prefix, tokens: 7, threaded=False
    )
    params = SamplingParams(temperature=0, max_tokens=12)
    got = []
    for p in prompts:  # one after another, so each finds the previous one's blocks under the same hash
        req = engine.submit(p, params, ignore_eos=True)
        engine.run_until_idle()
        got.append(list(req.streams[0]))
        assert req.streams[0].finish.cached_tokens == 0
    assert got == want


def test_cancel_mid_stream_frees_blocks(bundled):
    engine = Engine(bundled.model, context_length=2048, kv_memory=64 << 20)
    try:
        prompt = prompts_of_mixed_lengths(bundled, [200])[0]
        req = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=500), ignore_eos=True, n=2)
        seen = []
        for tok in req.streams[0]:
            seen.append(tok)
            if len(seen) == 5:
                assert engine.snapshot().used_blocks > 0
                assert req.cancel().wait(timeout=30)
                break
        assert engine.snapshot().used_blocks == 0
        rest = list(req.streams[0]) + list(req.streams[1])
        assert len(rest) < 500
        assert req.streams[0].finish.reason == "cancelled" and req.streams[1].finish.reason == "cancelled"
    finally:
        engine.close()


def test_cancel_stops_a_prefill_between_layers_and_leaves_the_cache_clean(bundled):
    """A cancel that arrives mid-prefill ends the forward at the next layer (torch path) or the next
    native step of 32 rows (native path), frees the blocks, and the partly written rows do not leak into
    a later request over the same prompt."""
    engine = Engine(
        bundled.model, context_length=2048, kv_memory=64 << 20, prefill_chunk=2048, threaded=False
    )
    prompt = prompts_of_mixed_lengths(bundled, [900])[0]
    ran: list[int] = []
    req = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=8), ignore_eos=True)
    if engine.native is not None and engine.native.prefills:
        step = engine.native._step

        def counted(*args, **kw):
            ran.append(len(ran))
            if len(ran) == 3:
                req.cancel()
            return step(*args, **kw)

        engine.native._step = counted
        try:
            engine.step()
        finally:
            del engine.native._step
        assert ran == [0, 1, 2]  # the third step ran (the cancel came during it), the fourth never started
    else:
        hooks = []
        for i, layer in enumerate(bundled.model.layers):

            def note(module, args, i=i):
                ran.append(i)
                if i == 5:
                    req.cancel()

            hooks.append(layer.register_forward_pre_hook(note))
        try:
            engine.step()
        finally:
            for h in hooks:
                h.remove()
        assert ran == list(range(6))  # layer 5 ran (the cancel came during it), layer 6 never started
    assert req.cancelled.is_set()
    assert list(req.streams[0]) == [] and req.streams[0].finish.reason == "cancelled"
    assert engine.counters.prefill_tokens == 0
    assert engine.allocator.num_used == 0
    engine.allocator.check()
    again = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=8), ignore_eos=True)
    engine.run_until_idle()
    assert list(again.streams[0]) == single_sequence(bundled, prompt, 8)
    assert again.streams[0].finish.cached_tokens == 0


def test_chat_turns_through_the_engine_backend_reuse_the_prefix(bundled_model_path):
    from ripelm.runtime.backend import prompt_ids, stream
    from ripelm.runtime.engine_backend import EngineBackend

    backend = EngineBackend(bundled_model_path, device="cpu", n_ctx=2048, kv_memory=64 << 20)
    try:
        params = SamplingParams(temperature=0, max_tokens=16)
        messages = [{"role": "user", "content": "Name three colours of the rainbow."}]

        def turn() -> tuple[list[int], str, GenerationStats]:
            ids = prompt_ids(backend, backend.template.render(messages, add_generation_prompt=True))
            events = list(stream(backend, ids, params))
            return ids, "".join(e.text for e in events), events[-1].stats

        first_ids, reply, s1 = turn()
        assert s1.cached_tokens == 0
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And three more?"}]
        second_ids, _, s2 = turn()
        # Everything up to where the re-tokenized reply differs from the sampled one comes from the cache.
        assert s2.cached_tokens >= len(first_ids)
        # Finished turns hold no blocks, only cache (the engine frees them at its next step boundary).
        deadline = time.monotonic() + 30
        while backend.engine.snapshot().used_blocks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.engine.snapshot().used_blocks == 0
    finally:
        backend.close()
