"""`ripe pull hf.co/{user}/{repo}[:{quant}]` against a loopback server that speaks the hub's model API and
resolve protocol: the quant picked, the file's sha256 taken from the API's LFS metadata and checked, and
each failure (missing quant, corrupt bytes, private or gated repo) one clear line with nothing stored;
then `ripe show` and `ripe cp` on what was pulled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import COMMIT, LoopbackHub

from ripelm.models.blobstore import ModelStore
from ripelm.models.hf_pull import PREFERENCE, parse, pick, quant_of

REPO = "someone/Tiny-GGUF"
FILES = {"Tiny-Q8_0.gguf": "Q8_0", "Tiny-Q4_K_M.gguf": "Q4_0", "tiny.Q4_0.gguf": "Q4_0"}


@pytest.fixture(scope="module")
def hub(tiny_model_factory):
    server = LoopbackHub()
    for i, (name, qtype) in enumerate(FILES.items()):
        server.add(REPO, name, tiny_model_factory(qtype=qtype, n_layers=i + 1).read_bytes())
    server.add(REPO, "mmproj-Tiny-F16.gguf", b"not a model")
    server.add(REPO, "README.md", b"# Tiny")
    for repo in ("someone/Private-GGUF", "someone/Gated-GGUF"):
        server.add(repo, "x-Q4_K_M.gguf", b"x")
    server.state.private.add("someone/Private-GGUF")
    server.state.gated.add("someone/Gated-GGUF")
    yield server
    server.close()


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def ripe(home: Path, hub: LoopbackHub, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf"))
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "ripelm.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("ripe: error: "), p.stderr
    return lines[0]


def assert_nothing_stored(home: Path) -> None:
    s = ModelStore(home / "models")
    assert s.entries() == {} and not s.partial_downloads()
    assert not s.blobs.exists() or not any(s.blobs.iterdir())


def test_quant_names_and_picking():
    assert parse("hf.co/a/b:Q8_0") == ("a/b", "Q8_0") and parse("huggingface.co/a/b") == ("a/b", None)
    assert parse("hf.co/a/b:latest") == ("a/b", None)
    assert quant_of("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_of("model-IQ4_XS.gguf") == "IQ4_XS" and quant_of("model-bf16.gguf") == "BF16"
    assert quant_of("model.gguf") is None
    assert pick({"a-Q8_0.gguf": "Q8_0", "a-Q4_K_M.gguf": "Q4_K_M"}, None, "r") == ("Q4_K_M", "a-Q4_K_M.gguf")
    # no Q4_K_M: the closest in the preference order
    assert pick({"a-Q8_0.gguf": "Q8_0", "a-Q5_K_S.gguf": "Q5_K_S"}, None, "r")[0] == "Q5_K_S"
    assert pick({"a-Q8_0.gguf": "Q8_0", "a-F16.gguf": "F16"}, None, "r")[0] == "Q8_0"
    assert pick({"a-Q8_0.gguf": "Q8_0"}, "q8_0", "r")[0] == "Q8_0"
    assert PREFERENCE[0] == "Q4_K_M"


def test_pull_picks_q4_k_m_and_verifies_the_api_sha256(hub, home):
    p = ripe(home, hub, "pull", "hf.co/someone/Tiny-GGUF")
    assert p.returncode == 0, p.stderr
    name = "hf.co/someone/tiny-gguf:q4_k_m"
    assert name in p.stdout and "sha256 verified" in p.stdout
    entry = ModelStore(home / "models").get(name)
    assert entry.hex == hub.state.sha256(REPO, "Tiny-Q4_K_M.gguf")
    assert entry.origin == f"{REPO}/Tiny-Q4_K_M.gguf@{COMMIT}"  # pinned to the commit the API named
    again = ripe(home, hub, "pull", "hf.co/someone/Tiny-GGUF:Q4_K_M")
    assert again.returncode == 0 and "up to date" in again.stdout

    explicit = ripe(home, hub, "pull", "hf.co/someone/Tiny-GGUF:q8_0")
    assert explicit.returncode == 0, explicit.stderr
    q8 = ModelStore(home / "models").get("hf.co/someone/tiny-gguf:q8_0")
    assert q8.hex == hub.state.sha256(REPO, "Tiny-Q8_0.gguf")

    shown = ripe(home, hub, "show", "hf.co/someone/tiny-gguf:q8_0")
    assert shown.returncode == 0, shown.stderr
    assert "quantization  Q8_0" in shown.stdout and "engine        native" in shown.stdout
    copied = ripe(home, hub, "cp", "hf.co/someone/tiny-gguf:q8_0", "tiny:mine")
    assert copied.returncode == 0, copied.stderr
    assert ModelStore(home / "models").get("tiny:mine").hex == q8.hex
    missing = one_error_line(ripe(home, hub, "cp", "nope:missing", "x:y"))
    assert "nope:missing" in missing


def test_a_missing_quant_says_which_there_are(hub, home):
    line = one_error_line(ripe(home, hub, "pull", "hf.co/someone/Tiny-GGUF:Q3_K_S"))
    assert "has no Q3_K_S file (it has: Q4_0, Q4_K_M, Q8_0)" in line
    assert_nothing_stored(home)


def test_bytes_that_do_not_match_the_api_sha256_are_discarded(hub, home):
    hub.state.faults.corrupt = True
    try:
        line = one_error_line(ripe(home, hub, "pull", "hf.co/someone/Tiny-GGUF:Q8_0"))
    finally:
        hub.state.faults.corrupt = False
    assert "corrupt" in line and "sha256" in line
    assert_nothing_stored(home)


@pytest.mark.parametrize(
    "repo, words",
    [("Private-GGUF", ["not found", "private", "HF_TOKEN"]), ("Gated-GGUF", ["gated", "HF_TOKEN"])],
)
def test_private_and_gated_repos_are_one_clear_line(hub, home, repo, words):
    line = one_error_line(ripe(home, hub, "pull", f"hf.co/someone/{repo}"))
    assert all(w in line for w in words), line
    assert_nothing_stored(home)
