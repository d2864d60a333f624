"""`ripe` end to end in a subprocess: real answers from the bundled model, and one clear error line for
every kind of bad input (never a traceback, never a hang)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest


def ripe(
    *args: str, home: Path, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripe: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_run_answers_capital_of_france_reproducibly(home):
    a = ripe(
        "run",
        "--temp",
        "0",
        "--max-tokens",
        "40",
        "What is the capital of France? Answer in one sentence.",
        home=home,
    )
    assert a.returncode == 0, a.stderr
    assert "Paris" in a.stdout
    b = ripe(
        "run",
        "--temp",
        "0",
        "--max-tokens",
        "40",
        "What is the capital of France? Answer in one sentence.",
        home=home,
    )
    assert a.stdout == b.stdout


def test_run_llama_cpp_engine_and_stats(home):
    p = ripe(
        "run",
        "--engine",
        "llama.cpp",
        "--temp",
        "0",
        "--max-tokens",
        "24",
        "--stats",
        "What is the capital of France? Answer in one sentence.",
        home=home,
    )
    assert p.returncode == 0, p.stderr
    # llama.cpp's own greedy pick here is a near tie (" L'Étoile..." vs "The capital..."); any answer will do.
    assert p.stdout.strip()
    assert "engine llama.cpp" in p.stderr and "decode" in p.stderr


def test_run_seeded_sampling_is_reproducible_and_raw_mode_works(home):
    args = ("run", "--raw", "--temp", "0.9", "--seed", "7", "--max-tokens", "20", "Once upon a time")
    a, b = ripe(*args, home=home), ripe(*args, home=home)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_models_lists_bundled_default(home):
    p = ripe("models", home=home)
    assert p.returncode == 0
    assert "* smollm2:135m" in p.stdout and "* default model" in p.stdout


def test_help_and_version(home):
    p = ripe("--help", home=home)
    assert p.returncode == 0 and "run" in p.stdout and "bench" in p.stdout
    p = ripe("--version", home=home)
    assert p.returncode == 0 and p.stdout.startswith("ripe ")


def _minimal_gguf(path: Path, arch: str) -> None:
    """A well-formed GGUF with only an architecture key and no tensors."""
    key, val = b"general.architecture", arch.encode()
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1)
    body += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val
    path.write_bytes(body)


def test_bad_model_files_give_one_line_errors(home, tmp_path, bundled_model_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n" * 10)
    assert_one_line_error(ripe("run", "--model", str(text), "hi", home=home), "not a GGUF")

    truncated = tmp_path / "truncated.gguf"
    with open(bundled_model_path, "rb") as f:
        truncated.write_bytes(f.read(3_000_000))
    assert_one_line_error(ripe("run", "--model", str(truncated), "hi", home=home), "truncated.gguf")

    absurd = tmp_path / "absurd.gguf"
    absurd.write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 2**62, 2**62) + b"\0" * 64)
    assert_one_line_error(ripe("run", "--model", str(absurd), "hi", home=home))

    offsets = tmp_path / "offsets.gguf"
    data = bytearray(bundled_model_path.read_bytes()[:2_000_000])
    _patch_first_tensor_offset(data, bundled_model_path)
    offsets.write_bytes(bytes(data) + b"\0" * 64)
    assert_one_line_error(ripe("run", "--model", str(offsets), "hi", home=home))

    missing = tmp_path / "nope.gguf"
    assert_one_line_error(ripe("run", "--model", str(missing), "hi", home=home), "nope.gguf")
    assert_one_line_error(ripe("run", "--model", "nosuchmodel:7b", "hi", home=home), "nosuchmodel")


def _patch_first_tensor_offset(data: bytearray, model: Path) -> None:
    from ripelm.models.gguf_file import open_gguf

    g = open_gguf(model)
    first = next(iter(g.tensors.values()))
    rel = first.offset - g.data_offset
    g.close()
    # The tensor table entry ends with the 8-byte relative offset; find it after the tensor's name.
    name = first.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name)
    pos = data.index(struct.pack("<Q", rel), at)
    data[pos : pos + 8] = struct.pack("<Q", 2**40)


def test_unsupported_architecture(home, tmp_path):
    m = tmp_path / "weird.gguf"
    _minimal_gguf(m, "bogusformer")
    assert_one_line_error(
        ripe("run", "--engine", "native", "--model", str(m), "hi", home=home), "bogusformer"
    )
    assert_one_line_error(ripe("run", "--model", str(m), "hi", home=home))


def test_unsupported_quant_type_falls_back_or_errors(home, tiny_model_factory):
    # IQ4_NL is valid GGUF that llama.cpp runs but the native engine does not.
    path = tiny_model_factory(arch="llama", qtype="IQ4_NL")
    p = ripe("run", "--engine", "native", "--model", str(path), "hi", home=home)
    assert_one_line_error(p, "IQ4_NL")
    p = ripe("run", "--model", str(path), "--max-tokens", "4", "hi", home=home)
    assert p.returncode == 0, p.stderr
    assert "using llama.cpp" in p.stderr


def test_bad_prompts_and_flags(home):
    assert_one_line_error(ripe("run", "", home=home), "empty")
    assert_one_line_error(ripe("run", "   \n", home=home), "empty")
    long = "word " * 400
    assert_one_line_error(ripe("run", "--ctx", "128", long, home=home), "context")
    assert_one_line_error(ripe("run", "--temp", "-1", "hi", home=home), "temperature")
    assert_one_line_error(ripe("run", "--top-p", "2", "hi", home=home), "top-p")


def test_prompt_from_stdin(home):
    p = ripe("run", "--temp", "0", "--max-tokens", "8", "-", home=home, stdin="Say hello.")
    assert p.returncode == 0 and p.stdout.strip()


def test_bench_prints_side_by_side_table(home, tiny_model_factory):
    path = tiny_model_factory(arch="llama", qtype="Q4_0")
    p = ripe(
        "bench", "--model", str(path), "--runs", "1", "--prompt-tokens", "32", "--gen-tokens", "8", home=home
    )
    assert p.returncode == 0, p.stderr
    for label in ("prefill tok/s", "decode tok/s", "load s", "peak RSS MB", "native", "llama.cpp", "ratio"):
        assert label in p.stdout
