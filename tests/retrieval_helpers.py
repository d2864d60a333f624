"""Shared helpers for the retrieval tests: one converted default embedder per test process, run `ripe`."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=1)
def _converted_home() -> Path:
    """A RIPELM_HOME whose model store holds the converted all-MiniLM-L6-v2 GGUF (built once)."""
    from ripelm.models.bundled_embedder import embedder_gguf_path, find_source

    if find_source() is None:
        pytest.skip("the all-MiniLM-L6-v2 weights package is not installed")
    home = Path(tempfile.mkdtemp(prefix="ripelm-embedder-"))
    old = os.environ.get("RIPELM_HOME")
    os.environ["RIPELM_HOME"] = str(home)
    try:
        embedder_gguf_path()
    finally:
        if old is None:
            del os.environ["RIPELM_HOME"]
        else:
            os.environ["RIPELM_HOME"] = old
    return home


def make_home(dest: Path) -> Path:
    """A fresh RIPELM_HOME at ``dest`` that already has the converted embedder (copied, not rebuilt)."""
    src = _converted_home() / "models" / "embedders"
    shutil.copytree(src, dest / "models" / "embedders")
    return dest


def embedder_gguf(home: Path) -> Path:
    return next((home / "models" / "embedders").glob("*.gguf"))


def ripe(
    *args: str, home: Path, timeout: float = 600, stdin: str | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=stdin,
    )
