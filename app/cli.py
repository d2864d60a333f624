"""The `ripe` command line: run, chat, serve, bench, the model store (pull, models, rm, import) and
document Q&A (index, search, ask, collections).

Errors a user can cause print one line (`ripe: error: ...`) and exit 1; nothing here touches a tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ripelm import __version__
from ripelm.draft_cli import add_draft_args
from ripelm.models.errors import RipelmError
from ripelm.models.synthetic import SHAPES as SYNTHETIC_SHAPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="model name (see `ripe models`) or path to a .gguf file (default: the bundled SmolLM2-135M)",
    )
    p.add_argument(
        "--engine",
        default=None,
        choices=["auto", "native", "llama.cpp", "openai"],
        help="inference engine (default: native when it supports the model, else llama.cpp; "
        "openai: an OpenAI-compatible server, see --base-url)",
    )
    p.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="OpenAI-compatible server for --engine openai, e.g. http://127.0.0.1:8080/v1",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="API key for --engine openai (default: $RIPELM_OPENAI_API_KEY, $OPENAI_API_KEY or config.toml)",
    )
    p.add_argument(
        "--no-server",
        action="store_true",
        help="load the model in this process even when a local `ripe serve` could answer (the default "
        "uses one that runs on 127.0.0.1:11434 or :8080 with the same model store; $RIPELM_NO_SERVER=1 too)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["auto", "cpu", "cuda", "mps"],
        help="compute device for the native engine (default: CUDA, then MPS, then CPU)",
    )
    p.add_argument(
        "--ctx", type=int, default=None, metavar="N", help="context window in tokens (default 4096)"
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument(
        "--kv-memory",
        default=None,
        metavar="SIZE",
        help="memory for the native engine's paged KV cache, e.g. 512M or 2G "
        "(default: four context windows, within a quarter of free memory and 2G)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temp", type=float, default=0.7, metavar="T", help="temperature; 0 is greedy (default 0.7)"
    )
    p.add_argument(
        "--top-k", type=int, default=40, metavar="K", help="keep the K most likely tokens (0: all)"
    )
    p.add_argument(
        "--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling mass (default 0.95)"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.05,
        metavar="P",
        help="drop tokens below P x the top token's probability (default 0.05)",
    )
    p.add_argument(
        "--repeat-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="penalty for recently seen tokens (1.0: off)",
    )
    p.add_argument(
        "--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling"
    )
    p.add_argument("--max-tokens", "-n", type=int, default=512, metavar="N", help="most tokens to generate")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ripe",
        description="A local, private LLM assistant for the terminal.",
        epilog='Examples:\n  ripe chat\n  ripe run "What is the capital of France? Answer in one sentence."\n'
        '  ripe pull qwen2.5:0.5b\n  ripe run -m qwen2.5:0.5b "Hello"\n  ripe bench --runs 5',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ripe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="answer one prompt and stream the reply to stdout",
        description="Answer one prompt (chat template applied) and stream the reply.",
    )
    run.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    run.add_argument("--raw", action="store_true", help="plain text completion, no chat template")
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--stats", action="store_true", help="print speed and token counts to stderr afterwards")
    _add_model_args(run)
    add_draft_args(run)
    _add_sampling_args(run)
    out = run.add_mutually_exclusive_group()
    out.add_argument(
        "--format",
        choices=["json"],
        default=None,
        help="structured output: json makes the answer one JSON object (grammar-constrained sampling)",
    )
    out.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="structured output: the answer is JSON valid against the JSON schema in FILE "
        "(grammar-constrained sampling, so even a small model emits valid JSON)",
    )

    from ripelm.chat_cli import add_parser as add_chat_parser

    add_chat_parser(sub, model_args=_add_model_args, sampling_args=_add_sampling_args)

    from ripelm.models_cli import add_parsers as add_store_parsers

    add_store_parsers(sub)

    from ripelm.serve_cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    from ripelm.server_cli import add_parsers as add_server_parsers

    add_server_parsers(sub)
    from ripelm.show_cli import add_parsers as add_show_parsers

    add_show_parsers(sub)

    bench = sub.add_parser(
        "bench",
        help="compare native and llama.cpp speed on one model",
        description="Prefill and decode tokens/s, load time and peak memory of the native "
        "engine and llama.cpp on the same GGUF, medians of several runs, each "
        "run in a fresh process.",
    )
    bench.add_argument("--model", "-m", default=None, help="model name or .gguf path (default: bundled)")
    bench.add_argument(
        "--synthetic",
        choices=sorted(SYNTHETIC_SHAPES),
        default=None,
        help="measure a synthetic model of a real shape (random weights, the bundled tokenizer; built once)",
    )
    bench.add_argument("--runs", type=int, default=5, help="runs per engine (default 5)")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    bench.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode (default 128)")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default 2)")
    bench.add_argument("--engines", default="native,llama.cpp", help="comma-separated engines to measure")
    bench.add_argument(
        "--device", default=None, choices=["auto", "cpu", "cuda", "mps"], help="device for the native engine"
    )
    bench.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="measure aggregate decode tok/s of N concurrent streams against 1 (native engine)",
    )
    bench.add_argument(
        "--kv",
        action="store_true",
        help="run a mixed-length workload and report KV slot utilization, paged vs contiguous",
    )
    bench.add_argument(
        "--kv-requests", type=int, default=64, metavar="N", help="requests in the --kv workload (default 64)"
    )
    bench.add_argument(
        "--chat",
        action="store_true",
        help="time to first token of a second chat turn, with and without the prefix cache",
    )
    from ripelm import retrieval_cli

    retrieval_cli.add_parsers(sub, model_args=_add_model_args, sampling_args=_add_sampling_args)
    from ripelm.bench.draft import add_bench_draft_args
    from ripelm.quantize_cli import add_parser as add_quantize_parser

    add_bench_draft_args(bench)
    add_quantize_parser(sub)
    return parser


def printable(text: str) -> str:
    """One line with control characters escaped: error messages quote names read from untrusted files
    (a metadata key with a newline or a terminal escape sequence must not break or drive the terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "run":
            from ripelm.server_client import run_via_server

            if args.prompt == "-":
                args.prompt = sys.stdin.read()
            if args.prompt.strip():
                done = run_via_server(args, args.prompt)  # a warm local server: no torch, no load
                if done is not None:
                    return done
            from ripelm.commands import cmd_run

            return cmd_run(args)
        if args.command == "chat":
            from ripelm.chat_cli import cmd_chat

            return cmd_chat(args)
        if args.command in ("pull", "models", "rm", "import"):
            from ripelm.models_cli import dispatch

            return dispatch(args)
        if args.command == "serve":
            from ripelm.serve_cli import cmd_serve

            return cmd_serve(args)
        if args.command in ("show", "cp"):
            from ripelm import show_cli

            return show_cli.cmd_show(args) if args.command == "show" else show_cli.cmd_cp(args)
        if args.command in ("ps", "stop"):
            from ripelm import server_cli

            return server_cli.cmd_ps(args) if args.command == "ps" else server_cli.cmd_stop(args)
        if args.command == "bench" and args.draft:
            from ripelm.bench.draft import cmd_bench_draft

            return cmd_bench_draft(args)
        if args.command == "quantize":
            from ripelm.quantize_cli import cmd_quantize

            return cmd_quantize(args)
        if args.command == "bench":
            from ripelm.bench.compare import cmd_bench

            return cmd_bench(args)
        from ripelm.retrieval_cli import HANDLERS as RETRIEVAL

        if args.command in RETRIEVAL:
            return RETRIEVAL[args.command](args)
    except RipelmError as e:
        print(f"ripe: error: {printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `ripe run ... | head`); not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
