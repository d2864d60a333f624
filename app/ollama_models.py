"""Ollama's model-management endpoints for `ripe serve`: /api/tags, /api/show, /api/pull (streamed
progress), /api/delete and /api/copy, in the shapes Ollama's clients (its Python client, oterm, Open
WebUI) parse, over our model store.

A model's `details` and `model_info` come from its GGUF header (read once per file and cached): the
architecture, the parameter count (summed over the tensor table), the quant (GGUF's `general.file_type`,
named as llama.cpp names it, e.g. Q4_K_M), the chat template and license.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ripelm.errors import NotFound
from ripelm.models.errors import ModelNotFoundError, RipelmError
from ripelm.runtime.reasoning import thinks  # ollama_api reads it from here too

_INFO_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}
_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}
_CACHE_LOCK = threading.Lock()


def rfc3339(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat().replace("+00:00", "Z")


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _param_size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _quant_name(file_type: Any) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


def model_info(path: Path) -> dict[str, Any]:
    """details, model_info, template, license and capabilities of a GGUF file (header only; cached)."""
    from ripelm.models.gguf_file import open_gguf

    key = _key(path)
    with _CACHE_LOCK:
        if key in _INFO_CACHE:
            return _INFO_CACHE[key]
    with open_gguf(path) as g:
        meta = g.metadata
        arch = g.architecture or "unknown"
        n_params = sum(t.n_elements for t in g.tensors.values())
        info: dict[str, Any] = {
            k: v
            for k, v in meta.items()
            if not k.startswith("tokenizer.") and isinstance(v, (str, int, float, bool))
        }
        info["general.parameter_count"] = n_params
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else ""
    is_embedding = meta.get(f"{arch}.pooling_type") is not None or arch in ("bert", "nomic-bert")
    caps = ["embedding"] if is_embedding else ["completion"]
    if thinks(template):
        caps.append("thinking")
    out = {
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": _param_size(n_params),
            "quantization_level": _quant_name(meta.get("general.file_type")),
        },
        "model_info": info,
        "template": template,
        "license": meta.get("general.license") if isinstance(meta.get("general.license"), str) else "",
        "capabilities": caps,
        "context_length": meta.get(f"{arch}.context_length"),
    }
    with _CACHE_LOCK:
        _INFO_CACHE[key] = out
    return out


def file_digest(path: Path, known: str = "") -> str:
    """The file's sha256 hex (a store entry knows it; a loose file is hashed once and cached)."""
    if known:
        return known.split(":", 1)[-1]
    key = _key(path)
    with _CACHE_LOCK:
        if key in _DIGEST_CACHE:
            return _DIGEST_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    with _CACHE_LOCK:
        _DIGEST_CACHE[key] = h.hexdigest()
    return h.hexdigest()


def _bundled_digest() -> str:
    from ripelm.models.catalog import BUILTIN

    return next((e.sha256 or "" for e in BUILTIN if e.bundled), "")


def find(name: str) -> tuple[str, Path, str]:
    """(listed name, file, digest hex) of a model in the store (or the bundled one), else NotFound."""
    from ripelm.models.store import _canonical, list_models

    want = _canonical(name)
    models = list_models()
    if ":" not in name:  # a bare family name (`smollm2`) means the catalog's one size of it, if pulled
        from ripelm.models.catalog import lookup
        from ripelm.models.store import user_catalog_path

        try:
            known = lookup(name, user_catalog_path())
        except RipelmError:
            known = None
        if known is not None and not any(m.name == want for m in models):
            want = known.name
    for m in models:
        if want in (m.name, _canonical(m.name)) or name == m.name:
            digest = m.digest or (_bundled_digest() if m.source == "bundled" else "")
            return m.name, m.path, file_digest(m.path, digest)
    raise NotFound(f'model "{name}" not found, try pulling it first')


def tag_entry(name: str, path: Path, digest: str) -> dict[str, Any]:
    info = model_info(path)
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(path.stat().st_mtime),
        "size": path.stat().st_size,
        "digest": digest,
        "details": info["details"],
    }


def tags(extra: list[tuple[str, Path]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Every model in the store, bundled first; `extra` adds served models that are not in it (a path)."""
    from ripelm.models.store import list_models

    out, seen = [], set()
    for m in list_models():
        digest = m.digest or (_bundled_digest() if m.source == "bundled" else "")
        try:
            out.append(tag_entry(m.name, m.path, file_digest(m.path, digest)))
        except (OSError, RipelmError):
            continue  # a damaged or vanished file is left out of the listing, not a failed listing
        seen.add(m.name)
    for name, path in extra:
        if name not in seen:
            out.append(tag_entry(name, path, file_digest(path)))
    return {"models": out}


def show(name: str, path: Path | None = None) -> dict[str, Any]:
    if path is None:
        name, path, _ = find(name)
    info = model_info(path)
    return {
        "license": info["license"],
        "modelfile": f"# served by ripe\nFROM {path}\n",
        "parameters": "",
        "template": info["template"],
        "details": info["details"],
        "model_info": info["model_info"],
        "capabilities": info["capabilities"],
        "modified_at": rfc3339(path.stat().st_mtime),
    }


def delete(name: str) -> None:
    from ripelm.models.store import _canonical, model_store

    store = model_store()
    canonical = _canonical(name)
    if store.get(canonical) is None:
        _, path, _ = find(name)  # the bundled model or a loose file: say what it is
        raise RipelmError(f"'{name}' is not in the model store ({path}); only store entries can be deleted")
    store.remove(canonical)


def copy(src: str, dst: str) -> None:
    from ripelm.models.store import copy_model

    find(src)
    copy_model(src, dst)


def pull_progress(name: str) -> Iterator[dict[str, Any]]:
    """Ollama's pull progress lines for a catalog name: "pulling manifest", then byte counts while it
    downloads, then "verifying sha256 digest", "writing manifest", "success". The download runs on a
    worker thread (the same `pull` as `ripe pull`: verified, resumable, atomic); an error raises here."""
    from ripelm.models.hf_pull import entry_for
    from ripelm.models.pull import pull
    from ripelm.models.store import model_store, user_catalog_path

    entry = entry_for(name, user_catalog_path())
    if entry is None:
        raise NotFound(f"'{name}' is not in the catalog (`ripe models --catalog` lists what can be pulled)")
    yield {"status": "pulling manifest"}
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    last = [0.0]

    def on_progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1 or (total is not None and done >= total):
            last[0] = now
            events.put(("progress", (done, total)))

    def work() -> None:
        try:
            events.put(("done", pull(entry, model_store(), progress=False, on_progress=on_progress)))
        except BaseException as e:  # handed to the streaming thread, which raises it there
            events.put(("error", e))

    threading.Thread(target=work, name=f"pull-{entry.name}", daemon=True).start()
    label = f"pulling {entry.sha256[:12]}" if entry.sha256 else f"pulling {entry.file}"
    while True:
        kind, value = events.get()
        if kind == "error":
            raise value
        if kind == "progress":
            done, total = value
            line = {"status": label, "completed": done, "total": total if total is not None else done}
            if entry.sha256:
                line["digest"] = f"sha256:{entry.sha256}"
            yield line
            continue
        result = value
        if result.entry is not None:
            size = result.entry.size
            yield {"status": label, "digest": result.entry.digest, "total": size, "completed": size}
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}
        return


def not_found_or(e: Exception) -> int:
    return 404 if isinstance(e, (NotFound, ModelNotFoundError)) else 400
