"""The chat app decodes nearly as fast as `ripe run`: the engine's step runs without the GIL (native
library), streamed text reaches the UI ten times a second, and the UI thread runs at a lower priority
than the engine's threads, so the Textual thread does not take a core from the step.
Both figures are the engine's own decode tokens/s (GenerationStats), the app's as its status bar shows
it, on the bundled model with the same greedy request. (Before the native step, the app ran at half of
`ripe run`'s speed: its UI thread and the engine thread fought for the GIL ~1,000 times per token.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROMPT = "Write a long story about an old lighthouse keeper and the storms he lived through."
TOKENS = 320


def _ripe_run_tok_s(model, home) -> float:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ripelm.cli",
            "run",
            "-m",
            str(model),
            "--temp",
            "0",
            "--max-tokens",
            str(TOKENS),
            "--stats",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RIPELM_HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"generated (\d+) tok.*decode ([0-9.]+) tok/s", r.stderr)
    assert m, r.stderr
    assert int(m.group(1)) >= 64, "the reply is too short to measure"
    return float(m.group(2))


def _app_tok_s(model, tmp_path) -> list[float]:
    """The status bar's tok/s of two replies, the app run as `ripe chat` runs it (chat_app_speed_proc.py)."""
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "chat_app_speed_proc.py"),
            str(model),
            PROMPT,
            str(TOKENS),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RIPELM_HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out["tok_s"]


def test_chat_app_decode_speed_against_ripe_run(bundled_model_path, tmp_path):
    """Measures the ratio (printed; `pytest -s`). The target, within 15% of `ripe run`, is a benchmark
    figure and not asserted here (timing on a shared 2-core CI machine); the assertion guards against the
    old failure, the UI starving the engine (0.3-0.5x)."""
    run = max(_ripe_run_tok_s(bundled_model_path, tmp_path) for _ in range(2))
    app = max(_app_tok_s(bundled_model_path, tmp_path))
    print(f"\nripe run {run:.1f} tok/s, chat app {app:.1f} tok/s ({app / run:.2f}x)")
    assert app >= 0.55 * run
