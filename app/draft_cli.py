"""`--draft`, `--draft-k` and `--speculate` on `ripe run`, `ripe chat` and `ripe ask`: open the target with
its draft (or with prompt lookup in the engine); speculation stats."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ripelm.progress import ProgressBar

if TYPE_CHECKING:  # the CLI parser imports this module: keep torch out of `ripe --help`
    from ripelm.runtime.backend import Backend, GenerationStats


SPECULATE_CHOICES = ("auto", "draft", "ngram", "off")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculate",
        default=None,
        choices=SPECULATE_CHOICES,
        help="speculative decoding in the native engine. draft: the --draft model proposes (it runs in the "
        "engine, batched with other requests); ngram: prompt lookup (proposes the tokens that followed the "
        "latest earlier occurrence of the last few tokens; pays when the reply repeats the prompt, as "
        "summaries, document answers and code edits do); off: plain decoding; auto: the draft model with "
        "--draft, else prompt lookup (default: off, auto with --draft). Output is the same either way.",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="speculative decoding with this draft model (name or .gguf sharing the target's vocabulary); "
        "'auto': the catalog's pairing, else a Q4_1 copy of the target made once and cached",
    )
    p.add_argument(
        "--draft-k",
        type=int,
        default=None,
        metavar="K",
        help="draft exactly up to K tokens per target pass (default: adapt K to measured costs and "
        "acceptance, and turn speculation off when it would not pay; 0: no speculation)",
    )


def open_from_args(
    target: Path, args: argparse.Namespace, notice: Callable[[str], None], engine: str
) -> Backend:
    """The target with the `--draft` model; `engine` is the one asked for (flag or config, else auto)."""
    from ripelm.runtime.draft_pairing import open_with_draft
    from ripelm.runtime.kv_cache import parse_memory

    bar = ProgressBar("making a draft model")
    try:
        return open_with_draft(
            target,
            args.draft,
            engine=engine,
            device=args.device,
            n_ctx=args.ctx,
            threads=args.threads,
            draft_k=args.draft_k,
            kv_memory=parse_memory(args.kv_memory) if getattr(args, "kv_memory", None) else None,
            notice=notice,
            progress=bar,
            speculate=args.speculate or "auto",
        )
    finally:
        bar.close()


def format_spec_stats(s: GenerationStats) -> str:
    """The speculative part of `--stats`: drafted, accepted, acceptance, tokens per target pass."""
    if not s.target_forwards and not s.speculation:
        return ""
    parts = [
        f"drafted {s.drafted}",
        f"accepted {s.accepted}",
        f"acceptance {s.acceptance_rate * 100:.0f}%",
        f"{s.tokens_per_target_forward:.2f} tok per target forward",
    ]
    if s.speculation:
        parts.append(s.speculation)
    return ", ".join(parts)
