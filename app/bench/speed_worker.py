"""One benchmark run of one engine, in its own process: load, prefill, greedy decode, peak memory.

`ripe bench` starts this module once per run so every run has a cold process (load time and peak RSS
are the process's own) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

# Ordinary English prose used as the benchmark prompt (repeated to the requested length).
PROSE = (
    "The old lighthouse stood at the end of a narrow spit of land, where the river met the sea. For most of "
    "the year the keeper lived alone, trimming the wick, winding the clockwork that turned the great lens, "
    "and writing the weather into a thick ledger. Ships passed at night without knowing his name. In the "
    "spring, when the fog rolled in from the cold water, he would sound the horn every thirty seconds until "
    "dawn, and the fishermen in the village said they could set their watches by it. He kept a small garden "
    "behind the tower, sheltered by a stone wall, where he grew potatoes, beans and a few stubborn roses. "
    "Letters came once a month with the supply boat, and he answered each one slowly, in careful "
    "handwriting, "
    "describing the birds he had seen, the storms that had tested the windows, and the books he had read "
    "by lamplight. "
)


def prompt_tokens(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROSE, add_bos=False)
    return ids[:n]


def run(engine: str, model: str, n_prompt: int, n_gen: int, threads: int, device: str | None) -> dict:
    t0 = time.perf_counter()
    if engine == "native":
        import torch

        from ripelm.runtime.native import LoadedModel

        torch.set_num_threads(threads)
        b = LoadedModel(model, device=device, n_ctx=n_prompt + n_gen + 16)
    else:
        from ripelm.runtime.llama_cpp_backend import LlamaCppBackend

        b = LlamaCppBackend(model, n_ctx=n_prompt + n_gen + 16, n_threads=threads)
    load_s = time.perf_counter() - t0
    ids = prompt_tokens(b.tokenizer, n_prompt)
    warm = ids[:16][::-1]  # not the prompt's start: the warm-up leaves nothing the prompt could reuse
    if engine == "native":
        # Through the engine (paged KV cache, scheduler, sampler), stepped on this thread: what `ripe run`
        # and `ripe chat` do, minus the thread hand-off.
        from ripelm.runtime.engine import Engine
        from ripelm.runtime.sampling import SamplingParams

        eng = Engine(b.model, context_length=b.context_length, threaded=False)
        eng.submit(warm, SamplingParams(temperature=0, max_tokens=2), ignore_eos=True)
        eng.run_until_idle()  # first-call allocations, not part of the steady state
        if len(ids) > eng.scheduler.prefill_chunk:
            raise SystemExit(f"native benchmark prompts are at most {eng.scheduler.prefill_chunk} tokens")
        req = eng.submit(ids, SamplingParams(temperature=0, max_tokens=n_gen + 1), ignore_eos=True)
        t = time.perf_counter()
        eng.step()  # the whole prompt (one prefill chunk) and the first token
        _sync(b)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        while eng.step():
            pass
        decode_s = time.perf_counter() - t
        assert len(list(req.streams[0])) == n_gen + 1
    else:
        import llama_cpp
        import numpy as np

        llm = b.llm
        n_vocab = llm.n_vocab()

        def last_argmax() -> int:
            # llama-cpp-python keeps no scores without logits_all; read the last row from llama.cpp.
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

        llm.reset()
        llm.eval(warm)
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t
        tok = last_argmax()
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = last_argmax()
        decode_s = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "engine": engine,
        "load_s": load_s,
        "prefill_tok_s": n_prompt / prefill_s,
        "decode_tok_s": n_gen / decode_s,
        "peak_rss_mb": peak_kb / 1024,
        "device": str(b.device),
    }


def _sync(b) -> None:
    import torch

    if b.torch_device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ripelm.bench.speed_worker")
    p.add_argument("--engine", required=True, choices=["native", "llama.cpp"])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    res = run(a.engine, a.model, a.prompt_tokens, a.gen_tokens, a.threads, a.device)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
