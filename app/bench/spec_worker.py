"""One `ripe bench --draft` run in its own process: per proposer, the cost-model figures and the speedup.

One engine holds the target and its draft model, as `ripe run --draft` opens it. On one prompt it decodes
(greedy, or sampling at --temp) plainly, then with each proposer (the draft model, prompt lookup) at a
fixed k without early stops (so the cost model's assumptions hold), then with the adaptive controller.
The costs are the engine's own measurements (`SpecController`: a draft forward, a decode step of 1 and of
k + 1 rows); the predicted speedup follows from them and the acceptance (`spec_control`). Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from ripelm.bench.speed_worker import prompt_tokens
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.spec_control import expected_tokens


def story_prompt(b, n: int) -> list[int]:
    """A chat request about `n` tokens long: continue a story (not the repeated prose itself, which a model
    continues verbatim and which would make every draft token acceptable)."""
    body = b.tokenizer.decode(prompt_tokens(b.tokenizer, max(16, n - 40)))
    request = f"Here is the start of a story:\n\n{body}\n\nWrite what happens next, in your own words."
    text = b.template.render([{"role": "user", "content": request}], add_generation_prompt=True)
    return b.tokenizer.encode(text, add_bos=False)


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
    torch_part = " + ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if getattr(model, "native", None) is not None:  # decode steps on the native CPU step
        return "native step (int8 dot products)" + (f"; prefill also {torch_part}" if torch_part else "")
    return torch_part


def timed_request(engine, prompt: list[int], n: int, temp: float, speculate: str, **kw) -> tuple[float, Any]:
    """Seconds per token after the first of one request through the engine, and its sequence."""
    params = SamplingParams(temperature=temp, max_tokens=n, seed=0)
    req = engine.submit(prompt, params, ignore_eos=True, speculate=speculate, **kw)
    stream = iter(req.streams[0])
    next(stream)  # prefill and first token: not decode
    t = time.perf_counter()
    got = sum(1 for _ in stream)
    dt = time.perf_counter() - t
    return dt / max(got, 1), req.sequences[0]


def proposer_figures(
    engine, prompt: list[int], n: int, temp: float, mode: str, k: int, plain_s: float
) -> dict:  # noqa: E501
    """One proposer at fixed k (no early stop), then adaptive: the engine's own cost measurements, the
    acceptance, the speedup the cost model predicts from them and the one measured against plain decoding."""
    timed_request(engine, prompt[:16], 2 * k + 2, temp, mode, spec_k=k, spec_adaptive=False)  # warm-up
    spec_s, seq = timed_request(engine, prompt, n, temp, mode, spec_k=k, spec_adaptive=False)
    ctl, tally = seq.controller, seq.spec
    rows = {m: t.value for m, t in ctl.verify_timing.items() if t.samples}
    c_t = plain_s  # end to end, as the measured speedup is
    c_v = rows.get(k + 1, max(rows.values()))
    c_d = ctl.draft_timing.value if ctl.draft_timing.samples else 0.0
    tested = ctl.accepted + ctl.rejections
    alpha = ctl.accepted / tested if tested else 0.0  # per-token acceptance probability (cost model)
    # prompt lookup proposes only where it finds a match: the other steps are plain ones
    share = tally.rounds / max(tally.forwards - 1, 1)
    per_pass = share * expected_tokens(alpha, k) + (1 - share)
    cost = share * (k * c_d + c_v) + (1 - share) * c_t
    predicted = per_pass * c_t / cost if cost else 1.0
    timed_request(engine, prompt, n, temp, mode, spec_k=k)  # adaptive: first run measures and settles
    ada_s, ada = timed_request(engine, prompt, n, temp, mode, spec_k=k)
    return {
        "draft_ms": c_d * 1000,
        "verify_ms": c_v * 1000,
        "acceptance": tally.acceptance,
        "token_acceptance": alpha,
        "proposing_share": share,
        "expected_tokens": expected_tokens(alpha, k),
        "tokens_per_pass": n / max(tally.forwards, 1),
        "predicted": predicted,
        "measured": plain_s / spec_s,
        "spec_tok_s": 1.0 / spec_s,
        "adaptive_measured": plain_s / ada_s,
        "adaptive_state": ada.spec.state if ada.spec is not None else "",
        "adaptive_acceptance": ada.spec.acceptance if ada.spec is not None else 0.0,
    }


def run(
    target_path: str,
    draft_path: str,
    k: int,
    n_prompt: int,
    n_gen: int,
    device: str | None,
    temp: float = 0.0,
) -> dict:
    """Plain decoding, then each proposer (the draft model, prompt lookup), all in one engine (as `ripe
    run --draft` opens it), requests one at a time."""
    from ripelm.runtime.engine_backend import EngineBackend

    b = EngineBackend(
        target_path, device=device, n_ctx=n_prompt + n_gen + 64, draft_path=draft_path, speculate="draft"
    )
    try:
        prompt = story_prompt(b, n_prompt)
        engine = b.engine
        timed_request(engine, prompt[:16], 8, temp, "off")  # warm-up of the decode shapes
        plain_s, _ = timed_request(engine, prompt, n_gen, temp, "off")
        out = {
            "device": str(b.device),
            "target_compute": compute_kinds(b.model),
            "draft_compute": compute_kinds(b.draft.model),
            "k": k,
            "target_ms": plain_s * 1000,
            "target_tok_s": 1.0 / plain_s,
        }
        for mode in ("draft", "ngram"):
            figures = proposer_figures(engine, prompt, n_gen, temp, mode, k, plain_s)
            out.update({f"{mode}_{key}": v for key, v in figures.items()})
        return out
    finally:
        b.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ripelm.bench.spec_worker")
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
