"""`ripe run` on hostile model files: one clean error line and exit 1, whatever the file holds.

The fuzz tests (test_fuzz_gguf.py) prove the loader only raises named errors; this checks the last step,
what the user sees: names read from the file (architecture, keys) are quoted in error messages, so control
characters in them are escaped - a newline must not split the line and an ANSI escape sequence must not
reach the terminal. A few mutation-corpus files go through the whole CLI as well, including the automatic
fallback to llama.cpp for files the native engine does not support.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_factory import build_tiny_model
from gguf_mutations import (
    field_map,
    mut_duplicate_entry,
    mut_huge_length,
    mut_nested_array,
    mut_tensor_offset,
    mut_truncate_boundary,
    mut_wrong_type,
    set_string_kv,
)


def ripe_run(model: Path, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", "run", "--model", str(model), "--max-tokens", "2", "hi"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip


def assert_clean_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("ripe: error: "), p.stderr
    assert "Traceback" not in p.stderr and "\x1b" not in p.stderr
    assert all(c.isprintable() for c in lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> bytes:
    d = tmp_path_factory.mktemp("hostile_model")
    return build_tiny_model(d / "m.gguf", hidden=64, ffn=128, context_length=256).read_bytes()


def test_control_characters_from_the_file_are_escaped(model: bytes, tmp_path: Path) -> None:
    evil = tmp_path / "evil.gguf"
    evil.write_bytes(set_string_kv(model, "general.architecture", "llama\n\x1b[2J\x1b]0;pwned\x07"))
    line = assert_clean_error(ripe_run(evil, tmp_path / "home"))
    assert "unsupported architecture 'llama\\n\\x1b[2J" in line


def test_mutated_files_through_the_cli(model: bytes, tmp_path: Path) -> None:
    rng = random.Random(5)
    fm = field_map(model)
    mutators = (
        mut_truncate_boundary, mut_huge_length, mut_tensor_offset, mut_wrong_type, mut_duplicate_entry,
        mut_nested_array,
    )  # fmt: skip
    for i, mutate in enumerate(mutators):
        p = tmp_path / f"case{i}.gguf"
        data = mutate(rng, fm)
        while data == model:
            data = mutate(rng, fm)
        p.write_bytes(data)
        out = ripe_run(p, tmp_path / "home")
        if out.returncode != 0:  # some mutations leave a file that loads: those must then just work
            assert_clean_error(out)
