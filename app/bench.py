"""`ripe bench`: native engine vs llama.cpp on the same GGUF, medians of fresh-process runs, with ratios."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from ripelm.models.errors import RipelmError
from ripelm.models.store import resolve_model

METRICS = [  # key, label
    ("prefill_tok_s", "prefill tok/s"),
    ("decode_tok_s", "decode tok/s"),
    ("load_s", "load s"),
    ("peak_rss_mb", "peak RSS MB"),
]


def run_once(engine: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "ripelm.runtime.bench_worker",
        "--engine",
        engine,
        "--model",
        model,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
        "--threads",
        str(args.threads),
    ]
    if engine == "native" and args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RipelmError(f"benchmark run of {engine} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_bench(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1 or args.threads < 1:
        raise RipelmError("--runs, --prompt-tokens, --gen-tokens and --threads must be positive")
    model = str(resolve_model(args.model))
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ("native", "llama.cpp"):
            raise RipelmError(f"unknown engine '{e}' in --engines (native, llama.cpp)")
    print(
        f"model {model}\nprompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens, "
        f"{args.threads} threads, {args.runs} runs per engine (fresh process each)",
        file=sys.stderr,
    )
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for i in range(args.runs):
        for e in engines:  # interleave engines so drift in machine load hits both alike
            r = run_once(e, model, args)
            results[e].append(r)
            print(
                f"  run {i + 1}/{args.runs} {e:<9} prefill {r['prefill_tok_s']:7.1f}  decode "
                f"{r['decode_tok_s']:6.1f} tok/s  load {r['load_s']:.2f} s  rss {r['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    med = {e: {k: statistics.median(r[k] for r in rs) for k, _ in METRICS} for e, rs in results.items()}
    print_table(med, engines, device=results[engines[0]][0].get("device", "cpu"))
    return 0


def print_table(med: dict[str, dict[str, float]], engines: list[str], device: str) -> None:
    header = f"{'metric (median)':<16}" + "".join(f"{e:>12}" for e in engines)
    both = "native" in med and "llama.cpp" in med
    if both:
        header += f"{'ratio':>10}"
    print(header)
    for key, label in METRICS:
        row = f"{label:<16}" + "".join(f"{med[e][key]:>12.2f}" for e in engines)
        if both:
            n, ref = med["native"][key], med["llama.cpp"][key]
            ratio = n / ref if ref else float("nan")
            row += f"{ratio:>9.2f}x"
        print(row)
    if both:
        print(
            "ratio = native / llama.cpp (higher is better for tok/s, lower for load and RSS); "
            f"native device: {device}"
        )
