"""What `ripe run` and `ripe chat` do."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ripelm.chat_turns import sampling_from_args
from ripelm.config import load_config
from ripelm.models.store import resolve_model
from ripelm.remote_fit import remote_reply
from ripelm.runtime.backend import Backend, GenerationStats, TokenEvent, prompt_ids, stream
from ripelm.runtime.engines import open_backend
from ripelm.runtime.errors import BackendError, BadSamplingError, EmptyPromptError
from ripelm.runtime.kv_cache import parse_memory
from ripelm.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from ripelm.runtime.openai_backend import OpenAIBackend


def _notice(msg: str) -> None:
    print(f"ripe: {msg}", file=sys.stderr)


def open_from_args(args: argparse.Namespace) -> Backend | OpenAIBackend:
    """The engine the flags ask for, with config.toml filling in what they leave out."""
    from ripelm.server_client import openai_backend_via_server

    via_server = openai_backend_via_server(args)  # a local `ripe serve` with the model loaded
    if via_server is not None:
        return via_server
    cfg = load_config()
    engine = args.engine or cfg.engine or "auto"
    speculate = getattr(args, "speculate", None)
    if engine == "openai":
        from ripelm.runtime.openai_backend import OpenAIBackend

        if getattr(args, "draft", None):
            raise BackendError("--draft is for the local engines; with --engine openai the server decodes")
        if speculate not in (None, "off"):
            raise BackendError(
                "--speculate is for the local engines; with --engine openai the server decodes"
            )
        base_url = args.base_url or cfg.openai.base_url
        if not base_url:
            raise BackendError(
                "--engine openai needs --base-url URL (or base_url under [openai] in config.toml)"
            )
        api_key = (
            args.api_key
            or os.environ.get("RIPELM_OPENAI_API_KEY")
            or os.environ.get("OPENAI_API_KEY")
            or cfg.openai.api_key
        )
        return OpenAIBackend(
            base_url,
            api_key=api_key,
            model=args.model or cfg.openai.model,
            sampling_extras=cfg.openai.sampling_extras,
        )
    if args.base_url or args.api_key:
        raise BackendError("--base-url and --api-key are for --engine openai")
    path = resolve_model(args.model or cfg.model)
    if getattr(args, "draft", None):
        from ripelm.draft_cli import open_from_args as open_with_draft

        if speculate in ("ngram", "off"):
            raise BackendError(
                f"--speculate {speculate} and --draft contradict each other (--speculate auto uses the draft)"
            )
        return open_with_draft(path, args, _notice, engine)
    if getattr(args, "draft_k", None) is not None:
        raise BadSamplingError("--draft-k needs --draft MODEL (or --draft auto)")
    if speculate == "draft":
        raise BackendError("--speculate draft needs --draft MODEL (or --draft auto)")
    kv = getattr(args, "kv_memory", None)
    # auto without --draft: prompt lookup; llama.cpp cannot speculate
    lookup = speculate == "ngram" or (speculate == "auto" and engine != "llama.cpp")
    return open_backend(
        path,
        engine=engine,
        device=args.device,
        n_ctx=args.ctx,
        threads=args.threads,
        kv_memory=parse_memory(kv) if kv else None,
        notice=_notice,
        speculate="ngram" if lookup else "off",
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


def _trim_notice(dropped: int) -> None:
    print(
        f"[the chat no longer fits the context window: {dropped} earliest messages left out]", file=sys.stderr
    )


def _events(
    backend: Backend | OpenAIBackend, messages: list[dict[str, str]], params: SamplingParams, raw: str | None
) -> Iterator[TokenEvent]:
    """Local engines get the rendered chat template as token ids; a server engine (`takes_messages`)
    gets the messages and applies the template itself. `raw` is a plain completion prompt."""
    if backend.caps.takes_messages:
        remote: Any = backend
        if raw is not None:
            return remote.stream_text(raw, params)
        return remote_reply(remote, messages, params, on_trim=_trim_notice)
    text = raw if raw is not None else backend.template.render(messages, add_generation_prompt=True)
    ids = prompt_ids(backend, text, add_bos=None if raw is not None else False)
    return stream(backend, ids, params)


def _reply(
    backend: Backend | OpenAIBackend,
    messages: list[dict[str, str]],
    params: SamplingParams,
    *,
    raw: str | None = None,
) -> tuple[str, GenerationStats]:
    out: list[str] = []
    stats = GenerationStats()
    for ev in _events(backend, messages, params, raw):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            out.append(ev.text)
        if ev.done and ev.stats is not None:
            stats = ev.stats
    return "".join(out), stats


def cmd_run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt  # (cli.main has read it already)
    if not prompt.strip():
        raise EmptyPromptError("the prompt is empty")
    params = sampling_from_args(args)
    backend = open_from_args(args)
    try:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        _, stats = _reply(backend, messages, params, raw=prompt if args.raw else None)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            print(format_stats(stats), file=sys.stderr)
    finally:
        backend.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A line-based chat; the cache keeps earlier turns, so each turn only prefills what is new. Memory
    commands and recall as in the app (memory_commands.PlainMemory)."""
    from ripelm.memory_commands import HELP, PlainMemory

    params = sampling_from_args(args)
    memory = PlainMemory(load_config().memory)
    backend = open_from_args(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"ripe chat — {backend.name} on {backend.device}. /exit or Ctrl-D to leave, /reset to start over.")
    if memory.store is not None:
        print(f"memory: {HELP}")
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
            said = memory.command(cmd)
            if said is not None:
                print(said)
                continue
            for note in memory.noticed(line):
                print(note)
            messages.append({"role": "user", "content": line})
            try:
                reply, stats = _reply(backend, memory.prompt(messages, backend), params)
            except KeyboardInterrupt:
                print("\n[interrupted]")
                messages.pop()
                continue
            print()
            spec = f", {stats.acceptance_rate * 100:.0f}% of drafts accepted" if stats.drafted else ""
            speed = f"{stats.decode_tok_s:.1f} tok/s, ttft {stats.ttft_s * 1000:.0f} ms"
            recalled = f", {len(memory.used)} memories recalled" if memory.used else ""
            print(f"[{speed}{spec}{recalled}]", file=sys.stderr)
            messages.append({"role": "assistant", "content": reply})
    finally:
        backend.close()
        memory.close()
