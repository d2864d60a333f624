"""`ripe index / search / ask / collections` end to end in subprocesses, on a tiny real corpus."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from openai_servers import ripe_serve
from pdf_factory import build_pdf
from retrieval_helpers import make_home, ripe

from ripelm.models.store import bundled_model_path

DOCS = {
    "kv.md": "# KV cache\n\nThe KV cache stores keys and values of earlier tokens.\n\n"
    "Paged attention splits the cache into blocks that a block table maps.\n",
    "spec.txt": "Speculative decoding: a small draft model proposes tokens and the target model verifies "
    "them in one forward pass. The output distribution is identical to the target model's.\n",
    "notes/mrl.rst": "Matryoshka\n==========\n\nMatryoshka embeddings keep most of their quality when "
    "truncated to a short prefix.\n",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "paper.pdf").write_bytes(build_pdf([["Title page"], ["FlashAttention tiles Q and K in SRAM."]]))
    (root / "data.txt").write_bytes(b"\x00\x01binary")
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory, corpus):
    h = make_home(tmp_path_factory.mktemp("home"))
    p = ripe("index", str(corpus), "--collection", "docs", home=h)
    assert p.returncode == 0, p.stderr
    return h


def one_line_error(p, *needles: str) -> None:
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripe: error: "), p.stderr
    for n in needles:
        assert n in lines[0]


def test_index_summary_and_reindex(home, corpus):
    again = ripe("index", str(corpus), "--collection", "docs", home=home)
    assert again.returncode == 0, again.stderr
    assert "5 files, 0 indexed, 4 unchanged" in again.stdout
    assert "data.txt: binary file" in again.stdout
    listing = ripe("collections", home=home)
    assert re.search(r"^docs\s+4\s+\d+\s+all-minilm:l6-v2 \(PCA\)\s+384", listing.stdout, re.M), (
        listing.stdout
    )


def test_search_prints_ranked_locations(home, corpus):
    p = ripe("search", "which model checks the drafted tokens?", "--collection", "docs", "-k", "2", home=home)
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("1. ") and f"{corpus / 'spec.txt'}:1 " in first
    pdf = ripe("search", "SRAM tiles", "-c", "docs", "-k", "1", "--mode", "bm25", home=home)
    assert "paper.pdf (p. 2, lines 1)" in pdf.stdout


def test_errors_are_one_line(home, tmp_path):
    one_line_error(ripe("search", "x", "--collection", "nope", home=home), "no collection named 'nope'")
    one_line_error(ripe("search", "   ", "--collection", "docs", home=home), "empty")
    one_line_error(ripe("index", str(tmp_path), "--chunk-size", "10", home=home), "--chunk-size")
    one_line_error(ripe("collections", "rm", home=home), "which collection")
    one_line_error(ripe("index", str(tmp_path), "--embedder", "no-such-model", home=home), "unknown embedder")


def test_changed_embedder_needs_rebuild_and_rm(home, corpus):
    model = bundled_model_path()
    if model is None:
        pytest.skip("bundled model not installed")
    p = ripe("index", str(corpus / "kv.md"), "-c", "swap", home=home)
    assert p.returncode == 0, p.stderr
    one_line_error(
        ripe("index", str(corpus / "kv.md"), "-c", "swap", "--embedder", str(model), home=home), "--rebuild"
    )
    p = ripe("index", str(corpus / "kv.md"), "-c", "swap", "--embedder", str(model), "--rebuild", home=home)
    assert p.returncode == 0 and "1 indexed" in p.stdout, p.stderr
    assert "576" in ripe("collections", home=home).stdout
    assert ripe("collections", "rm", "swap", home=home).returncode == 0
    assert "swap" not in ripe("collections", home=home).stdout


def test_ask_through_a_server_engine(home, tmp_path):
    """`ripe ask --engine openai`: the question and its sources go to the server as chat messages (a
    server engine has no local template or tokenizer), and the answer comes back with the sources."""
    model = bundled_model_path()
    if model is None:
        pytest.skip("bundled model not installed")
    with ripe_serve(model, tmp_path / "serve-home", "--ctx", "2048") as (url, _):
        p = ripe(
            "ask", "What does the KV cache store?", "-c", "docs", "--engine", "openai", "--base-url", url,
            "--temp", "0", "--max-tokens", "24", "--sources", "2",
            home=home,
        )  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    answer, _, footer = p.stdout.partition("\n\nSources")
    assert answer.strip(), p.stdout
    assert re.search(r"^  \[1\] .+kv\.md:\d+", footer, re.M), p.stdout


def test_ask_cites_existing_chunks(home, corpus):
    if bundled_model_path() is None:
        pytest.skip("bundled model not installed")
    p = ripe(
        "ask",
        "How does speculative decoding verify drafted tokens?",
        "-c",
        "docs",
        "--temp",
        "0",
        "--max-tokens",
        "40",
        "--sources",
        "2",
        "--threads",
        "1",  # one thread: a busy 2-core CI machine makes multi-threaded decode crawl
        home=home,
    )
    assert p.returncode == 0, p.stderr
    answer, _, footer = p.stdout.partition("\n\nSources")
    listed = dict(re.findall(r"^  \[(\d+)\] (.+)$", footer, re.M))
    assert listed, p.stdout
    for n in re.findall(r"\[(\d+)\]", answer):
        assert n in listed, (n, p.stdout)  # every citation in the answer names a listed source
    for where in listed.values():
        m = re.fullmatch(r"(.+?):(\d+)(?:-(\d+))?|(.+?) \(p\. (\d+), lines (\d+)(?:-(\d+))?\)", where)
        assert m, where
        path = Path(m.group(1) or m.group(4))
        assert path.is_file()
        if m.group(1):
            start, end = int(m.group(2)), int(m.group(3) or m.group(2))
            assert 1 <= start <= end <= len(path.read_text().splitlines())
