"""Pairing a draft with a target: `--draft MODEL|auto`, `--draft-k`, clear errors, stats, `bench --draft`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from small_vocab import small_vocab_source

from ripelm.models.drafts import auto_draft, auto_draft_path
from ripelm.models.gguf_file import open_gguf
from ripelm.runtime.draft_pairing import check_vocab, open_speculative, open_with_draft
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.errors import BadSamplingError, DraftModelError


@pytest.fixture(scope="module")
def tiny_f32(tiny_model_factory) -> Path:
    return tiny_model_factory(qtype="F32", seed=12)


@pytest.fixture(scope="module")
def tiny_q4(tiny_model_factory) -> Path:
    return tiny_model_factory(qtype="Q4_0", seed=12)


@pytest.fixture(scope="module")
def small_vocab_model(tiny_model_factory, tmp_path_factory) -> Path:
    vocab = small_vocab_source(tmp_path_factory.mktemp("vocab") / "v64.gguf", 64)
    return tiny_model_factory(qtype="F32", seed=12, vocab_from=vocab)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("RIPELM_HOME", str(h))
    return h


def test_vocabulary_mismatch_is_one_clear_error(tiny_f32, small_vocab_model, tmp_path):
    a, b = open_gguf(tiny_f32), open_gguf(small_vocab_model)
    with pytest.raises(DraftModelError, match="has 64 tokens but the target's has 49152"):
        check_vocab(a, b)
    a.close()
    b.close()
    # same size, one token different
    other = small_vocab_source(tmp_path / "v64b.gguf", 64)
    g1, g2 = open_gguf(small_vocab_source(tmp_path / "v64.gguf", 64)), open_gguf(other)
    check_vocab(g1, g2)  # identical lists pair fine
    g1.close()
    g2.close()
    with pytest.raises(DraftModelError, match="a draft must share the target's tokenizer"):
        open_speculative(tiny_f32, small_vocab_model)


def test_a_draft_that_fails_validation_is_named_in_the_error(tiny_f32, tmp_path):
    bad = tmp_path / "broken-draft.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(DraftModelError, match="cannot use draft model broken-draft.gguf"):
        open_speculative(tiny_f32, bad)
    with pytest.raises(DraftModelError, match="no-such-draft.gguf|not found"):
        open_with_draft(tiny_f32, str(tmp_path / "no-such-draft.gguf"))


def test_draft_length_zero_and_negative(tiny_f32, tiny_q4):
    said: list[str] = []
    b = open_with_draft(tiny_f32, str(tiny_q4), draft_k=0, notice=said.append)
    assert isinstance(b, EngineBackend) and said == ["draft length 0: decoding without speculation"]
    b.close()
    with pytest.raises(BadSamplingError, match="draft length must be in 0..15"):
        open_with_draft(tiny_f32, str(tiny_q4), draft_k=-1)
    with pytest.raises(DraftModelError, match="native engine"):
        open_with_draft(tiny_f32, str(tiny_q4), engine="llama.cpp")


def test_explicit_draft_opens_a_speculative_backend(tiny_f32, tiny_q4):
    b = open_with_draft(tiny_f32, str(tiny_q4), draft_k=3)
    assert isinstance(b, EngineBackend) and b.engine.drafter is not None  # the draft inside the engine
    assert (b.speculate, b.spec_k, b.spec_adaptive) == ("auto", 3, False)  # the draft or prompt lookup
    assert b.name == "native+draft" and b.draft.tokenizer is b.tokenizer
    b.close()


def test_auto_makes_a_quantized_copy_once_and_reuses_it(tiny_f32, home):
    first = auto_draft(tiny_f32)
    assert first.path == auto_draft_path(tiny_f32) and first.path.parent == home / "drafts"
    assert "new Q4_1 copy" in first.reason
    mtime = first.path.stat().st_mtime_ns
    second = auto_draft(tiny_f32)
    assert second.path == first.path and "cached" in second.reason
    assert first.path.stat().st_mtime_ns == mtime
    b = open_with_draft(tiny_f32, "auto")
    assert isinstance(b, EngineBackend) and b.speculate == "auto" and b.draft.path == first.path
    b.close()


def test_auto_on_a_4_bit_target_falls_back_to_prompt_lookup(bundled_model_path, home):
    said: list[str] = []
    b = open_with_draft(bundled_model_path, "auto", notice=said.append)
    assert isinstance(b, EngineBackend) and b.speculate == "ngram"  # the engine, speculating on its own
    assert said == [
        "no automatic draft: the target's weights are already Q4_1; speculating with prompt lookup instead"
    ]
    assert not (home / "drafts").exists()
    b.close()


def ripe(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_cli_run_with_draft_prints_speculation_stats(tiny_f32, tiny_q4, tmp_path):
    args = ["run", "--raw", "--temp", "0", "-n", "12", "--stats", "--threads", "1", "-m", str(tiny_f32)]
    p = ripe(*args, "--draft", str(tiny_q4), "--draft-k", "3", "Once upon a time", home=tmp_path)
    assert p.returncode == 0, p.stderr
    stats = p.stderr.strip().splitlines()[-1]
    for needle in (
        "engine native+draft",
        "drafted ",
        "accepted ",
        "acceptance ",
        "tok per target forward",
        "k=3",
    ):
        assert needle in stats, stats
    plain = ripe(*args, "Once upon a time", home=tmp_path)
    assert plain.returncode == 0 and plain.stdout == p.stdout  # greedy: the same text


def test_cli_errors_are_one_line(tiny_f32, small_vocab_model, tmp_path):
    for extra, needle in [
        (["--draft", str(small_vocab_model)], "share the target's tokenizer"),
        (["--draft", str(tmp_path / "missing.gguf")], "missing.gguf"),
        (["--draft-k", "2"], "--draft-k needs --draft"),
        (["--draft", "auto", "--draft-k", "99"], "draft length must be in 0..15"),
    ]:
        p = ripe("run", "--raw", "-n", "4", "-m", str(tiny_f32), *extra, "Hi", home=tmp_path)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ripe: error: ") and needle in lines[0], p.stderr


def test_bench_draft_reports_the_cost_model(tiny_f32, tiny_q4, tmp_path):
    p = ripe(
        "bench", "-m", str(tiny_f32), "--draft", str(tiny_q4), "--draft-k", "3", "--runs", "1",
        "--prompt-tokens", "16", "--gen-tokens", "12", "--threads", "1", home=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    for needle in (
        "target alone: ",
        "draft model",
        "prompt lookup",
        "draft forward, ms",
        "decode step of k+1 rows, ms",
        "acceptance rate",
        "predicted speedup",
        "measured speedup",
        "measured / predicted",
        "target computes as: ",
    ):
        assert needle in p.stdout, p.stdout


REPEATING = "Repeat exactly: " + "the quick brown fox jumps over the lazy dog. " * 2


def test_cli_draft_auto_on_the_bundled_model_answers_with_prompt_lookup(tmp_path):
    """The issue's report: `--draft auto` on the bundled Q4_1 model ended in "unknown engine 'None'"."""
    args = ["run", "--temp", "0", "-n", "24", "--threads", "1", "Photosynthesis converts light energy into"]
    p = ripe(*args[:1], "--draft", "auto", "--stats", *args[1:], home=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0] == (
        "ripe: no automatic draft: the target's weights are already Q4_1; "
        "speculating with prompt lookup instead"
    )
    from ripelm.runtime.engine import DEFAULT_SPEC_K

    assert "drafted " in lines[-1] and f"prompt lookup, up to {DEFAULT_SPEC_K} tokens per step" in lines[-1]
    plain = ripe(*args, home=tmp_path)
    assert plain.returncode == 0 and plain.stdout == p.stdout and p.stdout.strip()


def test_cli_speculate_ngram_same_text_with_stop_strings_and_stats(tmp_path):
    """The stop string falls in the repeated sentence, where proposals are accepted several at a time."""
    args = ["run", "--temp", "0", "-n", "40", "--threads", "1", "--stop", "over the lazy", REPEATING]
    on = ripe(*args, "--speculate", "ngram", "--stats", home=tmp_path)
    assert on.returncode == 0, on.stderr
    stats = on.stderr.strip().splitlines()[-1]
    assert "engine native" in stats and "accepted " in stats and "tok per target forward" in stats, stats
    off = ripe(*args, "--speculate", "off", "--stats", home=tmp_path)
    assert off.returncode == 0 and off.stdout == on.stdout
    assert on.stdout.startswith("The quick brown fox jumps") and "lazy" not in on.stdout
    assert "drafted" not in off.stderr
    auto = ripe(*args, "--speculate", "auto", home=tmp_path)
    assert auto.returncode == 0 and auto.stdout == on.stdout


def test_cli_speculate_errors(tiny_f32, tmp_path):
    for extra, needle in [
        (["--speculate", "off", "--draft", "auto"], "contradict"),
        (["--speculate", "ngram", "--engine", "llama.cpp"], "needs the native engine"),
    ]:
        p = ripe("run", "--raw", "-n", "4", "-m", str(tiny_f32), *extra, "Hi", home=tmp_path)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ripe: error: ") and needle in lines[0], p.stderr
    p = ripe("run", "-m", str(tiny_f32), "--speculate", "sometimes", "Hi", home=tmp_path)
    assert p.returncode == 2 and "invalid choice: 'sometimes'" in p.stderr
