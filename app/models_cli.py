"""`ripe pull`, `ripe models`, `ripe rm` and `ripe import`: the model store on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ripelm.models.blobstore import human_size
from ripelm.models.catalog import all_entries, normalize_name
from ripelm.models.errors import ModelNotFoundError
from ripelm.models.store import (
    BUNDLED_NAME,
    list_models,
    model_store,
    models_dir,
    user_catalog_path,
)

COMMANDS = ("pull", "models", "rm", "import")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    pull = sub.add_parser(
        "pull",
        help="download a model by name from the Hugging Face Hub",
        formatter_class=fmt,
        description="Download a model from the catalog (see `ripe models --catalog`), or any GGUF on the\n"
        "Hugging Face Hub as hf.co/USER/REPO[:QUANT] (without :QUANT, Q4_K_M or the closest),\n"
        "into the local store. The file's sha256 is checked before it enters the store; an\n"
        "interrupted download is resumed by running the same command again.",
        epilog="Examples:\n  ripe pull qwen2.5:0.5b\n"
        "  ripe pull hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M\n"
        "  HF_ENDPOINT=https://my-mirror.example ripe pull llama3.2:1b\n\n"
        f"Your own entries go in {user_catalog_path()} (see `ripe models --catalog`).\n"
        "Environment: HF_ENDPOINT (another hub or mirror), HF_TOKEN (gated repos).",
    )
    pull.add_argument("name", help="catalog name, e.g. qwen2.5:0.5b, or hf.co/USER/REPO[:QUANT]")
    pull.add_argument(
        "--retries", type=int, default=2, metavar="N", help="resume a dropped connection N times (default 2)"
    )
    pull.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    models = sub.add_parser(
        "models",
        help="list the models you have (or, with --catalog, the ones you can pull)",
        description="List the models that `ripe run -m NAME` can use: the bundled one, pulled and imported\n"
        "ones. The default model is marked with *.",
        formatter_class=fmt,
    )
    models.add_argument("--catalog", action="store_true", help="list the models `ripe pull` knows instead")
    models.add_argument("--paths", action="store_true", help="show where each model file is")

    rm = sub.add_parser(
        "rm",
        help="remove a model from the store",
        description="Remove pulled or imported models (the file goes when no other name uses it).",
    )
    rm.add_argument("names", nargs="*", metavar="NAME", help="model names to remove")
    rm.add_argument(
        "--partial", action="store_true", help="also delete unfinished downloads kept for resuming"
    )

    imp = sub.add_parser(
        "import",
        help="add a local .gguf file to the store",
        description="Check a GGUF file (strict validation of header, metadata and tensor table) and copy\n"
        "it into the store under a name, so `ripe run -m NAME` finds it.",
        formatter_class=fmt,
        epilog="Example:\n  ripe import ~/Downloads/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf --name qwen-small",
    )
    imp.add_argument("path", type=Path, help="the .gguf file")
    imp.add_argument("--name", default=None, help="name in the store (default: the file name, lower-cased)")


def dispatch(args: argparse.Namespace) -> int:
    return {"pull": cmd_pull, "models": cmd_models, "rm": cmd_rm, "import": cmd_import}[args.command](args)


def _say(msg: str) -> None:
    print(f"ripe: {msg}", file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    from ripelm.models.hf_pull import entry_for
    from ripelm.models.pull import pull

    entry = entry_for(args.name, user_catalog_path())
    if entry is None:
        names = ", ".join(e.name for e in all_entries(user_catalog_path()))
        raise ModelNotFoundError(f"'{args.name}' is not in the catalog (known: {names})")
    if args.retries < 0:
        raise ModelNotFoundError("--retries must be 0 or more")
    store = model_store()
    if not entry.bundled:
        print(f"pulling {entry.name} ({entry.repo}/{entry.file}, about {human_size(entry.size_mb * 1e6)})")
    try:
        result = pull(entry, store, retries=args.retries, progress=False if args.quiet else None, notice=_say)
    except KeyboardInterrupt:
        parts = [p for p in store.partial_downloads() if entry.sha256 is None or p.stem == entry.sha256]
        kept = sum(p.stat().st_size for p in parts)
        _say(
            f"pull of {entry.name} interrupted; nothing was added to the store. {human_size(kept)} kept in "
            f"{store.downloads}: `ripe pull {entry.name}` resumes, `ripe rm --partial` deletes it"
        )
        return 130
    if result.status == "bundled":
        print(f"{entry.name} comes with ripelm (bundled); nothing to download")
    elif result.status == "up to date":
        print(f"{entry.name} is up to date ({result.entry.digest[:19]})")
    else:
        done = "downloaded" if result.status == "downloaded" else "already had the file"
        e = result.entry
        print(f"{entry.name}: {done}, sha256 verified ({e.digest[:19]}, {human_size(e.size)})")
        if entry.draft:
            print(f"tip: its speculative-decoding draft is {entry.draft} (`ripe pull {entry.draft}`)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ripelm.config import load_config

    if args.catalog:
        return _print_catalog()
    default = load_config().model
    models = list_models(default=default)
    if not models:
        print("no models found; `ripe models --catalog` lists models to pull")
        return 0
    rows = [
        (
            ("* " if m.default else "  ") + m.name,
            human_size(m.size),
            m.source,
            m.digest.split(":", 1)[-1][:12] if m.digest else "",
            str(m.path) if args.paths else "",
        )
        for m in models
    ]
    _table(("  NAME", "SIZE", "SOURCE", "ID", "PATH" if args.paths else ""), rows)
    hint = "" if default else ' (set model = "NAME" in config.toml to change it)'
    print(f"\n* default model{hint}")
    store = model_store()
    parts = store.partial_downloads()
    if parts:
        total = sum(p.stat().st_size for p in parts)
        print(
            f"{len(parts)} unfinished download(s), {human_size(total)} in {store.downloads} "
            "(`ripe pull NAME` resumes, `ripe rm --partial` deletes)"
        )
    print(f"store: {models_dir()}")
    return 0


def _print_catalog() -> int:
    have = {m.name for m in list_models()}
    rows = [
        (
            e.name,
            e.quant,
            human_size(e.size_mb * 1e6),
            e.kind,
            e.draft or "",
            "bundled" if e.bundled else ("pulled" if e.name in have else ""),
        )
        for e in all_entries(user_catalog_path())
    ]
    _table(("NAME", "QUANT", "SIZE", "KIND", "DRAFT", "HERE"), rows)
    print(f"\n`ripe pull NAME` downloads one. Add your own in {user_catalog_path()}:")
    print('  ["mymodel:q4"]\n  repo = "someone/Some-Model-GGUF"\n  file = "Some-Model-Q4_K_M.gguf"')
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_rm(args: argparse.Namespace) -> int:
    if not args.names and not args.partial:
        raise ModelNotFoundError("name a model to remove (see `ripe models`), or use --partial")
    store = model_store()
    for raw in args.names:
        name = normalize_name(raw)
        if name == BUNDLED_NAME:
            raise ModelNotFoundError(f"{BUNDLED_NAME} is bundled with ripelm and cannot be removed")
        entry, deleted = store.remove(name)
        freed = f", {human_size(entry.size)} freed" if deleted else " (another name still uses its file)"
        print(f"removed {name}{freed}")
    if args.partial:
        print(f"deleted unfinished downloads, {human_size(store.clear_partial())} freed")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ripelm.models.gguf_file import open_gguf

    src: Path = args.path.expanduser()
    if not src.is_file():
        raise ModelNotFoundError(f"no such file: {src}")
    name = normalize_name(args.name or src.stem)
    if name == BUNDLED_NAME:
        raise ModelNotFoundError(f"{BUNDLED_NAME} is the bundled model's name; choose another --name")

    def validate(path: Path) -> None:
        open_gguf(path).close()  # raises ModelFormatError with what is wrong and where

    open_gguf(src).close()  # fail fast, before copying gigabytes of a broken file
    with tqdm(
        total=src.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=name,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    ) as bar:
        entry = model_store().import_file(src, name, validate=validate, progress=bar.update)
    print(f"imported {src.name} as {name} ({human_size(entry.size)}, {entry.digest[:19]})")
    return 0
