"""`ripe bench --batch/--kv/--chat` end to end on a tiny model: they run and report what they say."""

from __future__ import annotations

import re

import pytest
from test_cli import assert_one_line_error, ripe


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory(qtype="Q4_0", n_layers=2))


def test_bench_batch_reports_both_throughputs(tiny, tmp_path):
    proc = ripe(
        "bench",
        "--batch",
        "3",
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "6",
        "--model",
        tiny,
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"1 stream\s+\d+\.\d", proc.stdout)
    assert re.search(r"3 streams\s+\d+\.\d", proc.stdout)
    assert re.search(r"3 streams / 1 stream .*: \d+\.\d\dx", proc.stdout)


def test_bench_kv_reports_paged_and_contiguous_utilization(tiny, tmp_path):
    proc = ripe("bench", "--kv", "--kv-requests", "3", "--model", tiny, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    paged = float(re.search(r"paged \(block 16\)\s+([\d.]+)%", proc.stdout).group(1))
    contiguous = float(re.search(r"context window .*?([\d.]+)%", proc.stdout).group(1))
    assert 0 < contiguous < paged <= 100


def test_bench_chat_reports_cached_second_turn(tiny, tmp_path):
    proc = ripe(
        "bench",
        "--chat",
        "--runs",
        "1",
        "--prompt-tokens",
        "40",
        "--gen-tokens",
        "8",
        "--model",
        tiny,
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"(\d+) prompt tokens, (\d+) from the prefix cache", proc.stdout)
    assert m and 0 < int(m.group(2)) < int(m.group(1))


def test_bench_rejects_nonpositive_batch(tmp_path):
    assert_one_line_error(ripe("bench", "--batch", "0", home=tmp_path), "--batch")
