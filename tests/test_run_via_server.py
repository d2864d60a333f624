"""`ripe run` and `ripe chat --plain` through a running `ripe serve` (a separate process) on the same model
store: the same greedy answer as the embedded engine, without importing torch on the `run` path;
`--no-server` and another store keep the embedded engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from openai_servers import ripe_serve

from ripelm.models.blobstore import ModelStore
from ripelm.models.gguf_file import open_gguf

RUN = ["run", "-m", "tiny:test", "--temp", "0", "-n", "8", "--stats", "Once upon a time"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_factory):
    home = tmp_path_factory.mktemp("via-server-home")
    tiny = tiny_model_factory(qtype="Q4_0", n_layers=2)
    ModelStore(home / "models").import_file(tiny, "tiny:test", validate=lambda p: open_gguf(p).close())
    with ripe_serve("tiny:test", home, "--ctx", "512") as (url, _):
        yield home, url.removesuffix("/v1")


def ripe(home, server: str, *args: str, stdin: str | None = None, pyflags=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home), RIPELM_SERVER=server)
    env.pop("RIPELM_NO_SERVER", None)
    return subprocess.run(
        [sys.executable, *pyflags, "-m", "ripelm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=300,
    )


def test_run_through_the_server_matches_the_embedded_engine(served):
    home, base = served
    via = ripe(home, base, *RUN, pyflags=("-X", "importtime"))
    assert via.returncode == 0, via.stderr
    assert f"engine server {base} (tiny:test)" in via.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in via.stderr.splitlines() if "import time" in line]
    assert "ripelm.server_client" in imported and "torch" not in imported  # no cold start on this path
    alone = ripe(home, base, *RUN, "--no-server")
    assert alone.returncode == 0, alone.stderr
    assert "engine native" in alone.stderr and "engine server" not in alone.stderr
    assert via.stdout == alone.stdout and via.stdout.strip()


def test_another_store_or_a_model_the_server_lacks_runs_embedded(served, tmp_path, tiny_model_factory):
    home, base = served
    other = ripe(tmp_path, base, "run", "-m", str(tiny_model_factory(qtype="Q4_0", n_layers=2)), *RUN[3:])
    assert other.returncode == 0 and "engine native" in other.stderr, other.stderr


def test_plain_chat_uses_the_servers_openai_api(served):
    home, base = served
    out = ripe(
        home, base, "chat", "--plain", "-m", "tiny:test", "--temp", "0", "-n", "6", stdin="Hello\n/exit\n"
    )
    assert out.returncode == 0, out.stderr
    assert f"ripe chat — openai on tiny:test at {base}/v1" in out.stdout, out.stdout
