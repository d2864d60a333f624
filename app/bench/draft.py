"""`ripe bench --draft MODEL`: the speculative decoding cost model against measurement, medians of fresh runs.

Per proposer (the draft model, prompt lookup), in the one engine: the cost of a draft forward and of a decode
step of k + 1 rows, the acceptance rate, the speedup those figures predict, and the speedup measured by
decoding with and without it (plus what the adaptive controller achieves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from ripelm.models.errors import RipelmError

ROWS = [  # key (per proposer), label, format
    ("draft_ms", "draft forward, ms", "{:.2f}"),
    ("verify_ms", "decode step of k+1 rows, ms", "{:.2f}"),
    ("proposing_share", "steps that proposed", "{:.0%}"),
    ("acceptance", "acceptance rate (accepted/proposed)", "{:.1%}"),
    ("token_acceptance", "per-token acceptance (model)", "{:.1%}"),
    ("expected_tokens", "tokens per proposing step (model)", "{:.2f}"),
    ("tokens_per_pass", "tokens per target forward", "{:.2f}"),
    ("predicted", "predicted speedup", "{:.2f}x"),
    ("measured", "measured speedup", "{:.2f}x"),
    ("spec_tok_s", "tok/s", "{:.1f}"),
    ("adaptive_measured", "adaptive k: measured speedup", "{:.2f}x"),
]
PROPOSERS = (("draft", "draft model"), ("ngram", "prompt lookup"))


def add_bench_draft_args(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="instead of engines, measure speculative decoding of --model with this draft ('auto' allowed): "
        "costs, acceptance, predicted and measured speedup",
    )
    bench.add_argument(
        "--draft-k", type=int, default=4, metavar="K", help="draft length for --draft (default 4)"
    )
    bench.add_argument(
        "--temp",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature for --draft (default 0: greedy)",
    )


def run_once(target: str, draft: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "ripelm.bench.spec_worker", "--model", target, "--draft", draft,
        "--k", str(args.draft_k), "--prompt-tokens", str(args.prompt_tokens),
        "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--temp", str(args.temp),
    ]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RipelmError(f"speculative benchmark run failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_bench_draft(args: argparse.Namespace) -> int:
    from ripelm.models.drafts import resolve_draft
    from ripelm.models.gguf_file import open_gguf
    from ripelm.models.store import resolve_model
    from ripelm.progress import ProgressBar
    from ripelm.runtime.draft_pairing import check_vocab
    from ripelm.runtime.errors import DraftModelError

    if args.runs < 1 or args.gen_tokens < 2 or args.prompt_tokens < 1 or args.threads < 1:
        raise RipelmError("--runs, --prompt-tokens and --threads must be positive, --gen-tokens at least 2")
    if args.temp < 0:
        raise RipelmError("--temp must be >= 0")
    if not 1 <= args.draft_k <= 15:
        raise RipelmError("--draft-k must be in 1..15 for the benchmark")
    target = resolve_model(args.model)
    bar = ProgressBar("making a draft model")
    try:
        choice = resolve_draft(args.draft, target, bar)
    finally:
        bar.close()
    if choice.path is None:
        raise DraftModelError(choice.reason)
    tg, dg = open_gguf(target), open_gguf(choice.path)
    try:
        check_vocab(tg, dg)
    finally:
        tg.close()
        dg.close()
    mode = "greedy" if args.temp == 0 else f"temperature {args.temp}"
    print(
        f"target {target}\ndraft  {choice.path}\nprompt {args.prompt_tokens} tokens, decode "
        f"{args.gen_tokens} tokens ({mode}), k={args.draft_k}, {args.threads} threads, {args.runs} runs "
        "(fresh process each)",
        file=sys.stderr,
    )
    runs = []
    for i in range(args.runs):
        r = run_once(str(target), str(choice.path), args)
        runs.append(r)
        print(
            f"  run {i + 1}/{args.runs}: target {r['target_ms']:.1f} ms/token; "
            + "; ".join(
                f"{label} acceptance {r[f'{key}_acceptance']:.0%}, predicted {r[f'{key}_predicted']:.2f}x, "
                f"measured {r[f'{key}_measured']:.2f}x, adaptive {r[f'{key}_adaptive_measured']:.2f}x"
                for key, label in PROPOSERS
            ),
            file=sys.stderr,
        )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"target alone: {med('target_ms'):.2f} ms/token, {med('target_tok_s'):.1f} tok/s (median)")
    print(f"{'metric (median)':<38}" + "".join(f"{label:>15}" for _, label in PROPOSERS))
    for key, label, fmt in ROWS:
        print(f"{label:<38}" + "".join(f"{fmt.format(med(f'{p}_{key}')):>15}" for p, _ in PROPOSERS))
    print(
        f"{'measured / predicted':<38}"
        + "".join(f"{med(f'{p}_measured') / med(f'{p}_predicted'):>15.2f}" for p, _ in PROPOSERS)
    )
    last = runs[-1]
    print(f"target computes as: {last['target_compute']} (device {last['device']})")
    print(f"draft computes as:  {last['draft_compute']}")
    for p, label in PROPOSERS:
        print(f"adaptive controller, {label} (last run): {last[f'{p}_adaptive_state']}")
    return 0
