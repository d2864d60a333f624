"""`ripe quantize MODEL --to TYPE -o OUT.gguf`: write the model re-encoded at another precision."""

from __future__ import annotations

import argparse
import sys

from ripelm.progress import ProgressBar

# The `--to` choices (models.quantize.TARGETS, listed here so that `ripe --help` does not import torch).
TYPE_NAMES = ("q4_0", "q4_1", "q8_0", "tq1_0", "tq2_0", "f16", "f32")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a model at another precision (e.g. a 4-bit draft, or an f32 copy)",
        description="Re-encode a GGUF model at another precision, keeping its metadata and tokenizer. "
        "Norms and other 1-D tensors stay F32; the output head gets Q8_0 for quantized types; "
        "tensors whose rows do not fit the type's blocks fall back (TQ1_0/TQ2_0 to Q4_0, else F16) "
        "and are listed.",
        epilog="Examples:\n  ripe quantize smollm2:135m --to f32 -o smollm2-f32.gguf\n"
        "  ripe quantize big-model.gguf --to q4_1 -o draft.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name (see `ripe models`) or path to a .gguf file")
    p.add_argument(
        "--to", required=True, choices=TYPE_NAMES, metavar="TYPE", help=f"one of {', '.join(TYPE_NAMES)}"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument(
        "--head-type",
        choices=TYPE_NAMES,
        default=None,
        metavar="TYPE",
        help="type of the output head (default: Q8_0 for quantized types); a 4-bit head makes a faster draft",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ripelm.models.quantize import QuantizeError, quantize_model, summarize_fallbacks
    from ripelm.models.store import resolve_model

    src = resolve_model(args.model)
    dst = Path(args.output).expanduser()
    if dst.exists() and not args.force:
        raise QuantizeError(f"{dst} exists; pass --force to overwrite it")
    bar = ProgressBar(f"quantizing to {args.to.upper()}")
    try:
        res = quantize_model(src, dst, args.to, progress=bar, head=args.head_type)
    finally:
        bar.close()
    print(
        f"wrote {res.path} ({res.dst_bytes / 1e6:.1f} MB of tensors, from {res.src_bytes / 1e6:.1f} MB) "
        f"in {bar.elapsed:.1f} s",
        file=sys.stderr,
    )
    if res.fallbacks:
        print(
            f"{len(res.fallbacks)} tensor(s) could not take {res.target.name} and fell back:", file=sys.stderr
        )
        for line in summarize_fallbacks(res.fallbacks):
            print(f"  {line}", file=sys.stderr)
    return 0
