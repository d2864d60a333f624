"""Which draft model pairs with a target for speculative decoding, and the quantized copies made for `auto`.

`--draft auto` takes the catalog's pairing when there is one (`catalog_draft`, the hook the model
catalog fills in), else a Q4_1 copy of the target made once with `ripe quantize` and kept in the store
(`$RIPELM_HOME/drafts`), named after the target file's identity so a changed target gets a new copy. A
target that is already 4-bit or ternary gets no automatic draft: a 4-bit copy would cost as much to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.models.quant_types import QuantType
from ripelm.models.quantize import quantize_model
from ripelm.models.store import data_dir, resolve_model

AUTO_DRAFT_TYPE = QuantType.Q4_1
# Targets stored in these types gain from a 4-bit draft (it reads 2-8x fewer weight bytes per token).
WIDER_THAN_4_BIT = {
    QuantType.F32,
    QuantType.F16,
    QuantType.BF16,
    QuantType.Q8_0,
    QuantType.Q5_0,
    QuantType.Q5_1,
    QuantType.Q5_K,
    QuantType.Q6_K,
}


@dataclass(frozen=True)
class DraftChoice:
    path: Path | None  # None: no draft (the target alone: open_with_draft uses prompt lookup), see `reason`
    reason: str  # what was chosen and why, for the user


def drafts_dir() -> Path:
    return data_dir() / "drafts"


def catalog_draft(target: Path) -> Path | None:
    """The catalog's draft model for `target`, if the catalog pairs one (hook for the model catalog)."""
    return None


def main_weight_type(g: GGUFFile) -> QuantType | None:
    """The type holding most of the model's 2-D weight bytes."""
    by_type: dict[int, int] = {}
    for t in g.tensors.values():
        if len(t.shape) >= 2:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
    if not by_type:
        return None
    best = max(by_type, key=lambda k: by_type[k])
    try:
        return QuantType(best)
    except ValueError:
        return None


def auto_draft_path(target: Path, qtype: QuantType = AUTO_DRAFT_TYPE) -> Path:
    """Where the automatic draft of `target` lives: keyed by the target's resolved path, size and mtime."""
    st = target.stat()
    ident = f"{target.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    key = hashlib.sha256(ident).hexdigest()[:16]
    return drafts_dir() / f"{target.stem}-{key}.{qtype.name}.gguf"


def auto_draft(target: Path, progress: Callable[[int, int, str], None] | None = None) -> DraftChoice:
    """The catalog's draft, else the cached quantized copy of `target` (made now if missing), else none."""
    paired = catalog_draft(target)
    if paired is not None:
        return DraftChoice(paired, f"draft {paired.name} (catalog pairing)")
    g = open_gguf(target)
    try:
        main = main_weight_type(g)
    finally:
        g.close()
    if main not in WIDER_THAN_4_BIT:
        kind = main.name if main is not None else "unknown"
        return DraftChoice(None, f"no automatic draft: the target's weights are already {kind}")
    path = auto_draft_path(target)
    if path.is_file():
        return DraftChoice(path, f"draft {path.name} (cached {AUTO_DRAFT_TYPE.name} copy of the target)")
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_model(target, path, AUTO_DRAFT_TYPE, progress=progress)
    return DraftChoice(path, f"draft {path.name} (new {AUTO_DRAFT_TYPE.name} copy of the target)")


def resolve_draft(
    spec: str, target: Path, progress: Callable[[int, int, str], None] | None = None
) -> DraftChoice:
    """`--draft` value -> the draft file: `auto`, a model name, or a path."""
    if spec == "auto":
        return auto_draft(target, progress)
    path = resolve_model(spec)
    return DraftChoice(path, f"draft {path.name}")
