"""Engine benchmarks, one run per process: batched decode, KV utilization, prefix reuse across turns.

`ripe bench --batch N`, `--kv` and `--chat` start this module and read one JSON line.
- batch: aggregate decode tokens/s of N concurrent greedy streams, and of 1 stream in the same process.
- kv: a mixed-length workload through the real engine; at every step, the fraction of allocated KV
  slots that hold live tokens, for the paged pool and for a contiguous reservation of the same live
  requests (the context window per request, and prompt + max tokens per request).
- chat: time to first token of a second chat turn with the first turn in the prefix cache, and of the
  same prompt with the cache emptied.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from ripelm.bench.speed_worker import prompt_tokens
from ripelm.runtime.engine import Engine
from ripelm.runtime.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from ripelm.runtime.native import LoadedModel
from ripelm.runtime.sampling import SamplingParams


def decode_throughput(engine: Engine, prompts: list[list[int]], n_gen: int) -> float:
    """Tokens/s over the steps where every stream is decoding (prefill excluded)."""
    params = SamplingParams(temperature=0, max_tokens=n_gen)
    reqs = [engine.submit(p, params, ignore_eos=True) for p in prompts]
    sched = engine.scheduler
    while True:  # prefill every prompt first
        engine.step()
        if not sched.waiting and all(s.remaining == 1 for s in sched.running):
            break
    before = engine.counters.decode_tokens
    t = time.perf_counter()
    while engine.step():
        pass
    elapsed = time.perf_counter() - t
    for r in reqs:
        list(r.streams[0])
    return (engine.counters.decode_tokens - before) / elapsed


def bench_batch(model: str, batch: int, n_prompt: int, n_gen: int, device: str | None) -> dict:
    b = LoadedModel(model, device=device, n_ctx=n_prompt + n_gen + 16)
    # A pool that holds every stream at full length (plus a block each for the admission margin): the
    # default pool (a few context windows) would preempt streams and measure recomputation instead.
    bs = DEFAULT_BLOCK_SIZE
    blocks = batch * (-(-(n_prompt + n_gen) // bs) + 2)
    per_block = PagedKVCache.bytes_per_block(
        b.model.cfg.n_layers, b.model.cfg.n_kv_heads, b.model.cfg.head_dim, bs, b.model.dtype
    )
    engine = Engine(b.model, context_length=b.context_length, kv_memory=blocks * per_block, threaded=False)
    words = prompt_tokens(b.tokenizer, n_prompt + batch)
    prompts = [words[i : i + n_prompt] for i in range(batch)]  # distinct prompts: no prefix sharing
    decode_throughput(engine, prompts[:1], 8)  # warm-up
    one = decode_throughput(engine, [words[batch : batch + n_prompt]], n_gen)
    many = decode_throughput(engine, prompts, n_gen)
    return {
        "batch": batch,
        "one_tok_s": one,
        "batch_tok_s": many,
        "preemptions": engine.counters.preemptions,
        "device": b.device,
    }


def bench_kv(model: str, requests: int, seed: int, device: str | None) -> dict:
    rng = random.Random(seed)
    shapes = [(rng.randint(16, 2048), rng.randint(16, 512)) for _ in range(requests)]
    b = LoadedModel(model, device=device, n_ctx=2048 + 512 + 16)
    ctx = b.context_length
    engine = Engine(b.model, context_length=ctx, kv_memory=1 << 30, threaded=False)
    text = prompt_tokens(b.tokenizer, 2048 + requests)
    reqs = []
    for i, (n_prompt, n_gen) in enumerate(shapes):
        # Offset every prompt so no two share a prefix (prefix sharing would flatter the paged figure).
        n_prompt = min(n_prompt, ctx - 1)  # a model with a shorter context gets shorter prompts
        prompt = [(tok + i) % b.tokenizer.vocab_size for tok in text[i : i + n_prompt]]
        reqs.append(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=n_gen), ignore_eos=True))
    bs = engine.allocator.block_size
    live_sum = paged_sum = ctx_sum = exact_sum = 0
    steps = 0
    t = time.perf_counter()
    while engine.step():
        running = engine.scheduler.running
        if not running:
            continue
        live = sum(s.table.num_tokens for s in running)
        live_sum += live
        paged_sum += engine.cache.used_blocks * bs
        ctx_sum += len(running) * ctx
        exact_sum += sum(s.prompt_len + s.max_new for s in running)
        steps += 1
    elapsed = time.perf_counter() - t
    for r in reqs:
        list(r.streams[0])
    c = engine.counters
    return {
        "requests": requests,
        "steps": steps,
        "paged_utilization": live_sum / paged_sum,
        "contiguous_ctx_utilization": live_sum / ctx_sum,
        "contiguous_exact_utilization": live_sum / exact_sum,
        "context": ctx,
        "pool_blocks": c.total_blocks,
        "block_size": bs,
        "preemptions": c.preemptions,
        "prefill_tokens": c.prefill_tokens,
        "decode_tokens": c.decode_tokens,
        "seconds": elapsed,
        "device": b.device,
    }


def bench_chat(model: str, n_prompt: int, n_gen: int, device: str | None) -> dict:
    """Time to first token of a second chat turn, with the first turn's blocks in the prefix cache and
    with the cache emptied first (the same prompt computed from scratch)."""
    b = LoadedModel(model, device=device, n_ctx=2 * (n_prompt + n_gen) + 256)
    words = b.tokenizer.decode(prompt_tokens(b.tokenizer, n_prompt))
    messages = [{"role": "user", "content": words}]
    params = SamplingParams(temperature=0, max_tokens=n_gen)

    def fresh_engine() -> Engine:
        """An engine with an empty prefix cache, past its first-call allocations: the warm-up's tokens
        (the words backwards) start no prompt of this benchmark, so nothing of it is reused."""
        engine = Engine(b.model, context_length=b.context_length, threaded=False)
        engine.submit(prompt_tokens(b.tokenizer, n_prompt)[::-1], params)
        engine.run_until_idle()
        return engine

    def turn(engine: Engine) -> tuple[float, int, int]:
        ids = b.tokenizer.encode(b.template.render(messages, add_generation_prompt=True), add_bos=False)
        req = engine.submit(ids, params)
        t = time.perf_counter()
        stream = iter(req.streams[0])
        while engine.step() and req.queues[0].qsize() < 2:  # the ("cached", n) event, then a token
            pass
        ttft = time.perf_counter() - t
        while engine.step():
            pass
        out = list(stream)
        messages.append({"role": "assistant", "content": b.tokenizer.decode(out)})
        return ttft, len(ids), req.streams[0].finish.cached_tokens

    engine = fresh_engine()
    turn(engine)
    messages.append({"role": "user", "content": "Summarise that in one sentence, please."})
    warm, n2, cached = turn(engine)
    messages.pop()  # the same second turn again, computed from scratch
    del engine
    cold, _, cold_cached = turn(fresh_engine())
    return {
        "prompt_tokens": n2,
        "cached_tokens": cached,
        "ttft_cached_s": warm,
        "ttft_cold_s": cold,
        "cold_cached_tokens": cold_cached,
        "device": b.device,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ripelm.bench.engine_worker")
    p.add_argument("--mode", required=True, choices=["batch", "kv", "chat"])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.mode == "batch":
        res = bench_batch(a.model, a.batch, a.prompt_tokens, a.gen_tokens, a.device)
    elif a.mode == "chat":
        res = bench_chat(a.model, a.prompt_tokens, a.gen_tokens, a.device)
    else:
        res = bench_kv(a.model, a.requests, a.seed, a.device)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
