"""What `ripe run`, `ripe chat` and `ripe models` do."""

from __future__ import annotations

import argparse
import sys

from ripelm.models.store import list_models, resolve_model
from ripelm.runtime.backend import Backend, GenerationStats, prompt_ids, stream
from ripelm.runtime.engines import open_backend
from ripelm.runtime.errors import BadSamplingError, EmptyPromptError
from ripelm.runtime.sampling import SamplingParams


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    p = SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
    )
    p.validate()
    return p


def _notice(msg: str) -> None:
    print(f"ripe: {msg}", file=sys.stderr)


def open_from_args(args: argparse.Namespace) -> Backend:
    path = resolve_model(args.model)
    if getattr(args, "draft", None):
        from ripelm.draft_cli import open_from_args as open_with_draft

        return open_with_draft(path, args, _notice)
    if getattr(args, "draft_k", None) is not None:
        raise BadSamplingError("--draft-k needs --draft MODEL (or --draft auto)")
    return open_backend(
        path, engine=args.engine, device=args.device, n_ctx=args.ctx, threads=args.threads, notice=_notice
    )


def format_stats(s: GenerationStats) -> str:
    parts = [f"engine {s.engine}", f"prompt {s.prompt_tokens} tok"]
    if s.cached_tokens:
        parts.append(f"({s.cached_tokens} cached)")
    parts += [
        f"generated {s.generated_tokens} tok",
        f"ttft {s.ttft_s * 1000:.0f} ms",
        f"prefill {s.prefill_tok_s:.1f} tok/s",
        f"decode {s.decode_tok_s:.1f} tok/s",
        f"finish {s.finish_reason}",
    ]
    from ripelm.draft_cli import format_spec_stats

    spec = format_spec_stats(s)
    if spec:
        parts.append(spec)
    return ", ".join(parts)


def _reply(backend: Backend, text: str, params: SamplingParams, *, raw: bool) -> tuple[str, GenerationStats]:
    ids = prompt_ids(backend, text, add_bos=None if raw else False)
    out: list[str] = []
    stats = GenerationStats()
    for ev in stream(backend, ids, params):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            out.append(ev.text)
        if ev.done and ev.stats is not None:
            stats = ev.stats
    return "".join(out), stats


def cmd_run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise EmptyPromptError("the prompt is empty")
    params = sampling_from_args(args)
    backend = open_from_args(args)
    try:
        if args.raw:
            text = prompt
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt})
            text = backend.template.render(messages, add_generation_prompt=True)
        _, stats = _reply(backend, text, params, raw=args.raw)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            print(format_stats(stats), file=sys.stderr)
    finally:
        backend.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A line-based chat; the cache keeps earlier turns, so each turn only prefills what is new."""
    params = sampling_from_args(args)
    backend = open_from_args(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"ripe chat — {backend.name} on {backend.device}. /exit or Ctrl-D to leave, /reset to start over.")
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return 0
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/reset":
                messages = messages[:1] if args.system else []
                continue
            messages.append({"role": "user", "content": line})
            text = backend.template.render(messages, add_generation_prompt=True)
            try:
                reply, stats = _reply(backend, text, params, raw=False)
            except KeyboardInterrupt:
                print("\n[interrupted]")
                messages.pop()
                continue
            print()
            spec = f", {stats.acceptance_rate * 100:.0f}% of drafts accepted" if stats.drafted else ""
            speed = f"{stats.decode_tok_s:.1f} tok/s, ttft {stats.ttft_s * 1000:.0f} ms"
            print(f"[{speed}{spec}]", file=sys.stderr)
            messages.append({"role": "assistant", "content": reply})
    finally:
        backend.close()


def cmd_models(args: argparse.Namespace) -> int:
    models = list_models()
    if not models:
        print("no models found")
        return 0
    w = max(len(m.name) for m in models)
    print(f"{'NAME':<{w}}  {'SIZE':>9}  {'SOURCE':<8}  PATH")
    for m in models:
        mark = " (default)" if m.default else ""
        print(f"{m.name:<{w}}  {m.size / 1e6:>7.1f}MB  {m.source:<8}  {m.path}{mark}")
    return 0
