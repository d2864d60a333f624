"""One `ripe bench --draft` run in its own process: the cost-model figures and the measured speedup.

Measures on one prompt the target's and the draft's decode cost per token and the cost of one target pass
over k + 1 positions, then decodes (greedy, or sampling at --temp) with the target alone, with target +
draft (fixed k, no early stop, so the cost model's assumptions hold) and with the adaptive controller.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ripelm.runtime.backend import GenerationStats
from ripelm.runtime.bench_worker import prompt_tokens
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.spec_control import DraftPolicy, expected_tokens, predicted_speedup


def story_prompt(b, n: int) -> list[int]:
    """A chat request about `n` tokens long: continue a story (not the repeated prose itself, which a model
    continues verbatim and which would make every draft token acceptable)."""
    body = b.tokenizer.decode(prompt_tokens(b.tokenizer, max(16, n - 40)))
    request = f"Here is the start of a story:\n\n{body}\n\nWrite what happens next, in your own words."
    text = b.template.render([{"role": "user", "content": request}], add_generation_prompt=True)
    return b.tokenizer.encode(text, add_bos=False)


def _sync(b) -> None:
    if b.torch_device.type == "cuda":
        torch.cuda.synchronize()


def decode_cost(b, prompt: list[int], n: int) -> float:
    """Seconds per token of plain greedy decoding (one forward per token)."""
    logits, _ = b.prefill(prompt)
    tok, pos = int(logits.argmax()), len(prompt)
    _sync(b)
    t = time.perf_counter()
    for _ in range(n):
        tok = int(b.forward([tok], pos)[-1].argmax())
        pos += 1
    return (time.perf_counter() - t) / n


def verify_cost(b, prompt: list[int], m: int, reps: int = 15) -> float:
    """Median seconds of one pass over m new positions after `prompt` (all m rows of logits)."""
    b.prefill(prompt)
    n = len(prompt)
    times = []
    for _ in range(reps + 2):
        b.cache.truncate(n)
        del b.cached_tokens[n:]
        t = time.perf_counter()
        float(b.forward(prompt[-m:], n, logits_rows="all")[-1, 0])
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])  # the first calls of a new shape set up kernels


def timed_generation(backend, prompt: list[int], n: int, temp: float = 0.0) -> tuple[float, GenerationStats]:
    """Seconds per token after the first, generating n tokens through `generate_ids` (greedy at temp 0)."""
    stats = GenerationStats()
    gen = backend.generate_ids(prompt, SamplingParams(temperature=temp, max_tokens=n, seed=0), stats)
    next(gen)  # prefill and first token: not decode
    t = time.perf_counter()
    for _ in range(n - 1):
        next(gen)
    dt = time.perf_counter() - t
    gen.close()
    return dt / (n - 1), stats


def compute_kinds(model) -> str:
    """What the forward's matmuls really run as, e.g. '211 dense bf16' or '210 int4 + 1 split-int8'."""
    labels = {"Int4Linear": "int4", "SplitInt8Linear": "split-int8", "DenseLinear": "dense"}
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        kind = labels.get(type(m).__name__)
        if kind is None or name.endswith(".inner"):  # a split-int8 layer's own int4 core
            continue
        dtype = getattr(m, "dtype", None) or m.inner.dtype
        key = f"{kind} {str(dtype).replace('torch.', '')}"
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def run(
    target_path: str,
    draft_path: str,
    k: int,
    n_prompt: int,
    n_gen: int,
    device: str | None,
    temp: float = 0.0,
) -> dict:
    from ripelm.runtime.native import NativeBackend
    from ripelm.runtime.speculative import SpeculativeBackend

    target = NativeBackend(target_path, device=device, n_ctx=n_prompt + n_gen + 64)
    draft = NativeBackend(draft_path, device=device, n_ctx=n_prompt + n_gen + 64, tokenizer=target.tokenizer)
    prompt = story_prompt(target, n_prompt)
    for b in (target, draft):  # warm up the shapes decoding uses
        decode_cost(b, prompt[:16], 4)
    c_t = decode_cost(target, prompt, n_gen)
    c_d = decode_cost(draft, prompt, n_gen)
    c_v = verify_cost(target, prompt, k + 1)
    plain_s, _ = timed_generation(target, prompt, n_gen, temp)
    fixed = SpeculativeBackend(target, draft, DraftPolicy(fixed_k=k, min_confidence=0.0), owns_models=False)
    timed_generation(fixed, prompt[:16], 2 * k + 2)  # warm-up of the verify shapes
    before = (fixed.controller.accepted, fixed.controller.rejections)
    spec_s, st = timed_generation(fixed, prompt, n_gen, temp)
    passed = fixed.controller.accepted - before[0]
    tested = passed + fixed.controller.rejections - before[1]
    alpha = passed / tested if tested else 0.0  # per-token acceptance probability (cost model)
    adaptive = SpeculativeBackend(target, draft, DraftPolicy(), owns_models=False)
    timed_generation(adaptive, prompt, n_gen, temp)  # first run: the controller measures and settles
    ada_s, ast = timed_generation(adaptive, prompt, n_gen, temp)
    return {
        "device": str(target.device),
        "target_compute": compute_kinds(target.model),
        "draft_compute": compute_kinds(draft.model),
        "k": k,
        "target_ms": c_t * 1000,
        "draft_ms": c_d * 1000,
        "verify_ms": c_v * 1000,
        "acceptance": st.acceptance_rate,
        "token_acceptance": alpha,
        "expected_tokens": expected_tokens(alpha, k),
        "tokens_per_pass": st.tokens_per_target_forward,
        "predicted": predicted_speedup(alpha, k, c_t, c_d, c_v),
        "measured": plain_s / spec_s,
        "target_tok_s": 1.0 / plain_s,
        "spec_tok_s": 1.0 / spec_s,
        "adaptive_measured": plain_s / ada_s,
        "adaptive_state": ast.speculation,
        "adaptive_acceptance": ast.acceptance_rate,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ripelm.runtime.spec_bench_worker")
    p.add_argument("--model", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--temp", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.model, a.draft, a.k, a.prompt_tokens, a.gen_tokens, a.device, a.temp)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
