"""`ripe show NAME` (what a model is: architecture, parameters, quant, context length, license, which engine
runs it, its chat template) and `ripe cp SRC DST` (a second name for a model; the store shares the file)."""

from __future__ import annotations

import argparse

from ripelm.models.blobstore import human_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser(
        "show",
        help="describe a model: architecture, size, quant, context, license, engine, template",
        description="Describe a model from its GGUF header: architecture, parameter count, quantization, "
        "context length, license, the engine that runs it (native, or llama.cpp for what the native "
        "engine does not support) and its chat template.",
    )
    show.add_argument("name", help="a model name (`ripe models` lists them) or a .gguf path")
    show.add_argument("--template", action="store_true", help="print the whole chat template")
    cp = sub.add_parser(
        "cp",
        help="copy a model under a new name",
        description="Give a model a second name. A store entry's copy shares its file (no bytes are "
        "copied); the bundled model or a loose .gguf is imported into the store under the new name. "
        "An existing DST is replaced.",
        epilog="Example:\n  ripe cp smollm2:135m mine:latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("src", help="the model to copy")
    cp.add_argument("dst", help="its new name, e.g. mine:latest")


def cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ripelm.models.gguf_file import open_gguf
    from ripelm.ollama_models import NotFound, find, model_info
    from ripelm.runtime.engines import native_support_problem

    try:
        name, path, _ = find(args.name)
    except NotFound:
        from ripelm.models.store import resolve_model

        path = resolve_model(args.name)  # a path, or the store's own "not found" message
        name = str(path) if Path(args.name).expanduser().is_file() else args.name
    info = model_info(path)
    with open_gguf(path) as g:
        problem = native_support_problem(g)
    d = info["details"]
    template = info["template"]
    rows = [
        ("name", name),
        ("architecture", d["family"]),
        ("parameters", d["parameter_size"]),
        ("quantization", d["quantization_level"]),
        ("context", str(info["context_length"] or "unknown")),
        ("license", info["license"] or "not stated in the file"),
        ("engine", "native" if problem is None else f"llama.cpp ({problem})"),
        ("capabilities", ", ".join(info["capabilities"])),
        ("file", f"{path} ({human_size(path.stat().st_size)})"),
    ]
    for key, value in rows:
        print(f"{key:<14}{value}")
    if args.template:
        print(f"template\n{template}")
    elif template:
        first = template.strip().splitlines()[0]
        print(f"{'template':<14}{first[:80]}{' ...' if len(template.strip()) > len(first[:80]) else ''}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from ripelm.models.store import copy_model
    from ripelm.ollama_models import find

    find(args.src)  # a clear "not found" before anything is written
    target = copy_model(args.src, args.dst)
    print(f"copied {args.src} to {target}")
    return 0
