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
        "ripelm.bench.speed_worker",
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
    return run_worker(cmd, f"benchmark run of {engine}")


def run_worker(cmd: list[str], what: str) -> dict:
    """Run one benchmark worker process and return the JSON line it prints last."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RipelmError(f"{what} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_engine_bench(mode: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "ripelm.bench.engine_worker",
        "--mode",
        mode,
        "--model",
        model,
        "--threads",
        str(args.threads),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--gen-tokens",
        str(args.gen_tokens),
        "--batch",
        str(args.batch or 8),
        "--requests",
        str(args.kv_requests),
    ]
    if args.device:
        cmd += ["--device", args.device]
    return run_worker(cmd, f"engine benchmark ({mode})")


def cmd_bench_batch(model: str, args: argparse.Namespace) -> int:
    print(
        f"model {model}\n{args.batch} concurrent greedy streams vs 1, prompt {args.prompt_tokens} tokens "
        "each, "
        f"{args.gen_tokens} decoded, {args.threads} threads, {args.runs} runs (fresh process each)",
        file=sys.stderr,
    )
    runs = []
    for i in range(args.runs):
        r = run_engine_bench("batch", model, args)
        runs.append(r)
        print(
            f"  run {i + 1}/{args.runs}  1 stream {r['one_tok_s']:7.1f} tok/s  {args.batch} streams "
            f"{r['batch_tok_s']:7.1f} tok/s  ({r['batch_tok_s'] / r['one_tok_s']:.2f}x)",
            file=sys.stderr,
        )
    one = statistics.median(r["one_tok_s"] for r in runs)
    many = statistics.median(r["batch_tok_s"] for r in runs)
    ratio = statistics.median(r["batch_tok_s"] / r["one_tok_s"] for r in runs)
    print(f"{'aggregate decode (median)':<28}{'tok/s':>10}")
    print(f"{'1 stream':<28}{one:>10.1f}")
    print(f"{f'{args.batch} streams':<28}{many:>10.1f}")
    print(
        f"{args.batch} streams / 1 stream (median of per-run ratios): {ratio:.2f}x; "
        f"device {runs[0]['device']}; preemptions {sum(r['preemptions'] for r in runs)}"
    )
    return 0


def cmd_bench_kv(model: str, args: argparse.Namespace) -> int:
    print(
        f"model {model}\n{args.kv_requests} requests, prompts 16..2048 tokens, outputs 16..512 tokens "
        "(seeded), through the engine; KV slot utilization averaged over steps",
        file=sys.stderr,
    )
    r = run_engine_bench("kv", model, args)
    print(f"{'KV layout':<44}{'live / allocated slots':>24}")
    print(f"{'paged (block ' + str(r['block_size']) + ')':<44}{r['paged_utilization']:>23.1%}")
    print(
        f"{'contiguous, context window (' + str(r['context']) + ') per request':<44}"
        f"{r['contiguous_ctx_utilization']:>23.1%}"
    )
    print(f"{'contiguous, prompt + max tokens per request':<44}{r['contiguous_exact_utilization']:>23.1%}")
    print(
        f"{r['steps']} steps, {r['prefill_tokens']} prefill + {r['decode_tokens']} decode tokens, "
        f"{r['preemptions']} preemptions, pool {r['pool_blocks']} blocks, {r['seconds']:.0f} s"
    )
    return 0


def cmd_bench_chat(model: str, args: argparse.Namespace) -> int:
    print(
        f"model {model}\nsecond chat turn after a first turn of about {args.prompt_tokens} tokens; "
        f"{args.runs} runs (fresh process each)",
        file=sys.stderr,
    )
    runs = [run_engine_bench("chat", model, args) for _ in range(args.runs)]
    r = runs[0]
    warm = statistics.median(x["ttft_cached_s"] for x in runs)
    cold = statistics.median(x["ttft_cold_s"] for x in runs)
    print(f"second turn: {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} from the prefix cache")
    print(f"time to first token (median): {warm * 1000:.0f} ms with the cache, {cold * 1000:.0f} ms without")
    return 0


def bench_model(args: argparse.Namespace) -> str:
    """The model to measure: --synthetic (built once into the data dir), else --model or the bundled one."""
    if not getattr(args, "synthetic", None):
        return str(resolve_model(args.model))
    from ripelm.models.store import bundled_model_path, data_dir
    from ripelm.models.synthetic import build_synthetic

    path = data_dir() / "synthetic" / f"{args.synthetic}.gguf"
    if not path.exists():
        print(f"building synthetic model {args.synthetic} (random weights, one time)...", file=sys.stderr)
        build_synthetic(args.synthetic, path, bundled_model_path())
    return str(path)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.synthetic and args.model:
        raise RipelmError("--synthetic and --model name different models: give one")
    if args.chat:
        return cmd_bench_chat(bench_model(args), args)
    if args.batch is not None or args.kv:
        if args.runs < 1 or (args.batch is not None and args.batch < 1) or args.kv_requests < 1:
            raise RipelmError("--runs, --batch and --kv-requests must be positive")
        model = bench_model(args)
        return cmd_bench_kv(model, args) if args.kv else cmd_bench_batch(model, args)
    if args.runs < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1 or args.threads < 1:
        raise RipelmError("--runs, --prompt-tokens, --gen-tokens and --threads must be positive")
    model = bench_model(args)
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
