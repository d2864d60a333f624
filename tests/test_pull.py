"""`ripe pull` against a real HTTP server on loopback that speaks the hub's resolve protocol and serves a
real GGUF: good download, corrupted payload, truncated and interrupted transfers (resumed), full disk,
Ctrl-C. Each failure must end with a clear error and nothing half-written in the store."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import LoopbackHub

from ripelm.models.blobstore import ModelStore
from ripelm.models.catalog import CatalogEntry
from ripelm.models.errors import ChecksumError, DownloadError
from ripelm.models.pull import pull
from ripelm.models.store import resolve_model

REPO = "someone/Tiny-GGUF"
FILE = "tiny-Q4_0.gguf"
NAME = "tiny:q4"


@pytest.fixture(scope="module")
def gguf_bytes(tiny_model_factory) -> bytes:
    return tiny_model_factory(qtype="Q4_0").read_bytes()


@pytest.fixture
def hub(gguf_bytes):
    server = LoopbackHub()
    server.add(REPO, FILE, gguf_bytes)
    yield server
    server.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("RIPELM_HOME", str(h))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # never read a real hub token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return h


def entry(sha: str | None, name: str = NAME) -> CatalogEntry:
    return CatalogEntry(name, REPO, FILE, "main", "Q4_0", 9, sha)


def store_of(home: Path) -> ModelStore:
    return ModelStore(home / "models")


def assert_nothing_stored(home: Path) -> None:
    s = store_of(home)
    assert not s.blobs.exists() or not any(s.blobs.iterdir()), list(s.blobs.iterdir())
    assert s.entries() == {}


def write_user_catalog(home: Path, sha: str) -> None:
    (home / "catalog.toml").write_text(
        f'["{NAME}"]\nrepo = "{REPO}"\nfile = "{FILE}"\nsha256 = "{sha}"\nquant = "Q4_0"\nsize_mb = 9\n'
    )


def test_good_download_lands_in_store_by_digest_and_resolves(hub, home, gguf_bytes):
    sha = hub.state.sha256(REPO, FILE)
    result = pull(entry(sha), store_of(home), endpoint=hub.url, progress=False)
    assert result.status == "downloaded" and result.downloaded == len(gguf_bytes)
    s = store_of(home)
    blob = s.blob_path(sha)
    assert blob.read_bytes() == gguf_bytes
    assert s.entries()[NAME].digest == f"sha256:{sha}"
    assert s.partial_downloads() == []
    assert resolve_model(NAME) == blob
    # the hub redirected to the CDN and the bytes came from there, in one request
    assert [r.range for r in hub.gets()] == [None]
    again = pull(entry(sha), store_of(home), endpoint=hub.url, progress=False)
    assert again.status == "up to date" and len(hub.gets()) == 1


def test_digest_from_hub_when_catalog_has_none(hub, home):
    result = pull(entry(None), store_of(home), endpoint=hub.url, progress=False)
    assert result.entry.hex == hub.state.sha256(REPO, FILE)


def test_corrupted_payload_is_discarded(hub, home):
    hub.state.faults.corrupt = True
    with pytest.raises(ChecksumError, match="corrupt: sha256 .* expected .* discarded"):
        pull(entry(hub.state.sha256(REPO, FILE)), store_of(home), endpoint=hub.url, progress=False)
    assert_nothing_stored(home)
    assert store_of(home).partial_downloads() == []


def test_hub_digest_disagreeing_with_catalog_stops_before_downloading(hub, home):
    with pytest.raises(ChecksumError, match="catalog expects"):
        pull(entry("ab" * 32), store_of(home), endpoint=hub.url, progress=False)
    assert hub.gets() == []
    assert_nothing_stored(home)


def test_truncated_transfer_fails_clearly_and_keeps_only_a_resumable_part(hub, home):
    hub.state.faults.truncate_after = 100_000
    sha = hub.state.sha256(REPO, FILE)
    with pytest.raises(DownloadError, match=r"stopped at .* run `ripe pull tiny:q4` again to resume"):
        pull(entry(sha), store_of(home), endpoint=hub.url, progress=False, retries=1)
    assert_nothing_stored(home)
    parts = store_of(home).partial_downloads()
    assert [p.name for p in parts] == [f"{sha}.part"]
    # the retry continued where the first attempt stopped
    assert [r.range for r in hub.gets()] == [None, "bytes=100000-"]
    assert parts[0].stat().st_size == 200_000


def test_interrupted_transfer_is_resumed_by_the_next_pull(hub, home, gguf_bytes):
    hub.state.faults.truncate_after = 300_000
    hub.state.faults.truncate_times = 1
    sha = hub.state.sha256(REPO, FILE)
    with pytest.raises(DownloadError, match="resume"):
        pull(entry(sha), store_of(home), endpoint=hub.url, progress=False, retries=0)
    assert_nothing_stored(home)
    result = pull(entry(sha), store_of(home), endpoint=hub.url, progress=False, retries=0)
    assert result.status == "downloaded" and result.downloaded == len(gguf_bytes) - 300_000
    assert [r.range for r in hub.gets()] == [None, "bytes=300000-"]
    assert store_of(home).blob_path(sha).read_bytes() == gguf_bytes
    assert store_of(home).partial_downloads() == []


def test_dropped_connection_is_resumed_within_one_pull(hub, home, gguf_bytes):
    hub.state.faults.truncate_after = 50_000
    hub.state.faults.truncate_times = 2
    notes: list[str] = []
    sha = hub.state.sha256(REPO, FILE)
    pull(entry(sha), store_of(home), endpoint=hub.url, progress=False, retries=2, notice=notes.append)
    assert [r.range for r in hub.gets()] == [None, "bytes=50000-", "bytes=100000-"]
    assert len(notes) == 2 and all("resuming" in n for n in notes)
    assert store_of(home).blob_path(sha).read_bytes() == gguf_bytes


def test_server_ignoring_range_restarts_cleanly(hub, home, gguf_bytes):
    sha = hub.state.sha256(REPO, FILE)
    s = store_of(home)
    s.ensure_dirs()
    (s.downloads / f"{sha}.part").write_bytes(gguf_bytes[:1000])
    hub.state.faults.ignore_range = True
    pull(entry(sha), s, endpoint=hub.url, progress=False)
    assert s.blob_path(sha).read_bytes() == gguf_bytes


def test_missing_file_and_unreachable_hub_are_clear_errors(hub, home):
    missing = CatalogEntry("x:y", REPO, "nope.gguf", "main", "Q4_0", 1, None)
    with pytest.raises(DownloadError, match="not found on the hub"):
        pull(missing, store_of(home), endpoint=hub.url, progress=False)
    closed = LoopbackHub()
    url = closed.url
    closed.close()
    with pytest.raises(DownloadError, match="cannot reach the hub"):
        pull(entry(None), store_of(home), endpoint=url, progress=False)
    assert_nothing_stored(home)


# ---- the real `ripe pull` in a subprocess ---------------------------------------------------------


def ripe_env(home: Path, hub: LoopbackHub) -> dict[str, str]:
    env = dict(os.environ, RIPELM_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf"))
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    return env


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("ripe: "), stderr
    return lines[0]


def test_cli_pull_then_models_and_rm(hub, home):
    write_user_catalog(home, hub.state.sha256(REPO, FILE))
    env = ripe_env(home, hub)
    cli = [sys.executable, "-m", "ripelm.cli"]
    p = subprocess.run([*cli, "pull", NAME], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sha256 verified" in p.stdout
    listed = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, timeout=60)
    assert NAME in listed.stdout and "* smollm2:135m" in listed.stdout and "pull" in listed.stdout
    rm = subprocess.run([*cli, "rm", NAME], env=env, capture_output=True, text=True, timeout=60)
    assert rm.returncode == 0 and "freed" in rm.stdout
    assert_nothing_stored(home)


def test_ctrl_c_leaves_nothing_in_the_store_and_the_next_pull_resumes(hub, home, gguf_bytes):
    sha = hub.state.sha256(REPO, FILE)
    write_user_catalog(home, sha)
    hub.state.faults.hold_after = 200_000
    proc = subprocess.Popen(
        [sys.executable, "-m", "ripelm.cli", "pull", NAME],
        env=ripe_env(home, hub),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    part = store_of(home).downloads / f"{sha}.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 200_000):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    line = one_error_line(err)
    assert "interrupted" in line and "nothing was added" in line and "resumes" in line
    assert_nothing_stored(home)
    hub.state.release.set()
    hub.state.faults.hold_after = None
    pull(entry(sha), store_of(home), endpoint=hub.url, progress=False)
    assert hub.gets()[-1].range == "bytes=200000-"
    assert store_of(home).blob_path(sha).read_bytes() == gguf_bytes


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_disk_file_size_limit(hub, home):
    """RLIMIT_FSIZE makes the kernel refuse writes past 300 kB (EFBIG), as a full disk would (ENOSPC):
    both reach the same write path."""
    write_user_catalog(home, hub.state.sha256(REPO, FILE))
    p = subprocess.run(
        [sys.executable, "-m", "ripelm.cli", "pull", NAME],
        env=ripe_env(home, hub),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size,
    )
    assert p.returncode == 1
    assert "ripe: error: no space left while writing the download of tiny:q4" in one_error_line(p.stderr)
    assert_nothing_stored(home)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user+mount namespaces for a tmpfs")
@pytest.mark.parametrize("hide_size", [False, True], ids=["size-known", "size-unknown"])
def test_full_disk_on_a_small_tmpfs(hub, home, tmp_path, hide_size):
    """The store on a real 2 MB tmpfs. With the size known the pull refuses up front; without it the
    write itself fails with ENOSPC. Either way: one clear line and nothing in the store."""
    hub.state.faults.hide_size = hide_size
    mnt = tmp_path / "small"
    mnt.mkdir()
    write_user_catalog(home, hub.state.sha256(REPO, FILE))
    env = ripe_env(home, hub)
    env["RIPELM_HOME"] = str(mnt)
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {mnt} && cp {home / 'catalog.toml'} {mnt}/ && "
        f"{sys.executable} -m ripelm.cli pull {NAME}; rc=$?; "
        f"ls -A {mnt}/models/blobs; cat {mnt}/models/manifest.json 2>/dev/null; exit $rc"
    )
    p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 1
    expect = "no space left while writing" if hide_size else "not enough disk space for tiny:q4"
    assert expect in one_error_line(p.stderr)
    assert p.stdout.strip().splitlines()[-1].startswith("pulling"), p.stdout  # blobs/ empty, no manifest


def test_manifest_is_plain_json(hub, home):
    sha = hub.state.sha256(REPO, FILE)
    pull(entry(sha), store_of(home), endpoint=hub.url, progress=False)
    data = json.loads((home / "models" / "manifest.json").read_text())
    assert data["version"] == 1
    assert data["models"][NAME]["digest"] == f"sha256:{sha}"
    assert data["models"][NAME]["origin"].startswith(f"{REPO}/{FILE}@")
