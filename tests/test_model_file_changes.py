"""A model file truncated or rewritten on disk while engines have it loaded: the next request ends with
one line saying so (ModelFileChangedError), and the process lives. Small files are copied at load, so
even a request that skipped the check would not fault (models/file_guard.py).

The engines run in a child process (tests/model_file_proc.py, and `ripe chat --plain` for the CLI's
line): a SIGBUS there fails the test with the child's exit status instead of killing pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from polling import wait_until

from ripelm.models.errors import ModelFileChangedError
from ripelm.models.file_guard import FileState, ModelFileGuard
from ripelm.models.gguf_file import open_gguf

pytest.importorskip("llama_cpp")
HELPER = Path(__file__).with_name("model_file_proc.py")


class Child:
    """A subprocess whose stdout and stderr lines are collected by threads, so the test can wait for a
    line with a deadline instead of blocking on a read."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:  # noqa: ANN001 - a text pipe
        for line in stream:
            lines.append(line.rstrip("\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next_line(self, lines: list[str], start: int, timeout: float = 120) -> str:
        """The first line at index >= start, waiting for it (fails if the process ends without it)."""
        wait_until(lambda: len(lines) > start or self.proc.poll() is not None, timeout)
        if len(lines) <= start:
            for r in self.readers:  # it ended: let the readers drain the pipes before judging
                r.join(timeout=10)
        assert len(lines) > start, (self.proc.poll(), self.out, self.err)
        return lines[start]

    def ask(self, command: str) -> str:
        n = len(self.out)
        self.send(command)
        return self.next_line(self.out, n)

    def finish(self, timeout: float = 60) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=timeout)
        for r in self.readers:  # the pipes close with the process: the readers have all its lines
            r.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def child(args: list[str], env: dict[str, str] | None = None) -> Iterator[Child]:
    c = Child(args, env)
    try:
        yield c
    finally:
        c.kill()


@pytest.fixture
def model_copy(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> Path:
    """A private copy of a tiny model (the factory's file is shared by the whole session)."""
    dst = tmp_path / "model.gguf"
    shutil.copyfile(tiny_model_factory(qtype="Q4_0", n_layers=2), dst)
    return dst


def test_truncated_file_ends_the_next_request_of_both_engines_and_the_process_lives(model_copy: Path) -> None:
    with child([sys.executable, str(HELPER), str(model_copy)]) as c:
        assert c.next_line(c.out, 0) == "ready"
        before = {cmd: c.ask(cmd) for cmd in ("native", "llama.cpp", "native-direct", "llama.cpp-direct")}
        assert all(answer.startswith("ok ") for answer in before.values()), before

        size = model_copy.stat().st_size
        os.truncate(model_copy, size // 3)

        for engine in ("native", "llama.cpp"):
            answer = c.ask(engine)
            assert answer.startswith("error ModelFileChangedError: "), answer
            assert f"truncated from {size} to {size // 3} bytes" in answer
            assert str(model_copy) in answer
        # Past the check, both engines still run from their private copy of the weights: no SIGBUS, and
        # the same tokens as before the file changed.
        assert c.ask("native-direct") == before["native-direct"]
        assert c.ask("llama.cpp-direct") == before["llama.cpp-direct"]
        assert c.ask("alive") == "alive"
        assert c.finish() == 0
        assert not any("Traceback" in line for line in c.err), c.err


def test_file_rewritten_in_place_is_reported_and_a_renamed_replacement_is_not(
    model_copy: Path, tmp_path: Path
) -> None:
    g = open_gguf(model_copy)
    guard = ModelFileGuard(model_copy, g.state)
    try:
        # Replacing the file by a rename leaves the loaded inode as it was: nothing to report.
        replacement = tmp_path / "new.gguf"
        shutil.copyfile(model_copy, replacement)
        held = os.open(model_copy, os.O_RDWR)
        os.replace(replacement, model_copy)
        guard.check()
        # Writing into the loaded file itself (same size) is a change.
        os.pwrite(held, b"\0" * 64, g.data_offset)
        os.utime(held, ns=(g.state.mtime_ns + 1_000_000, g.state.mtime_ns + 1_000_000))
        os.close(held)
        with pytest.raises(ModelFileChangedError, match="rewritten in place"):
            guard.check()
    finally:
        guard.close()
        g.close()


def test_guard_refuses_a_file_that_changed_between_validation_and_load(model_copy: Path) -> None:
    g = open_gguf(model_copy)
    with open(model_copy, "ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(ModelFileChangedError, match=r"grew from \d+ to \d+ bytes"):
        ModelFileGuard(model_copy, g.state)
    with pytest.raises(ModelFileChangedError, match="grew"):
        g.load_into_memory()
    g.close()


def test_small_model_is_copied_at_load_and_matches_the_file(model_copy: Path) -> None:
    g = open_gguf(model_copy)
    name = next(iter(g.tensors))
    mapped = bytes(g.tensor_bytes(name))
    assert not g.in_memory
    g.load_into_memory()
    assert g.in_memory and bytes(g.tensor_bytes(name)) == mapped
    assert g.state == FileState.of(model_copy.stat())
    g.close()


def test_cli_prints_one_line_when_the_model_file_is_truncated_mid_chat(
    model_copy: Path, tmp_path: Path
) -> None:
    """`ripe chat --plain` on each engine: the first turn is answered, the file is truncated, the second
    turn ends the chat with one error line and status 1, never a signal or a traceback."""
    env = dict(os.environ, RIPELM_HOME=str(tmp_path / "home"))
    base = [sys.executable, "-m", "ripelm.cli", "chat", "--plain", "--model", str(model_copy), "--temp", "0",
            "--max-tokens", "4", "--ctx", "256", "--threads", "1"]  # fmt: skip
    with (
        child(base + ["--engine", "native"], env) as native,
        child(base + ["--engine", "llama.cpp"], env) as lcpp,
    ):
        for c in (native, lcpp):
            c.send("hello")
            assert wait_until(
                lambda c=c: any("tok/s" in line for line in c.err) or c.proc.poll() is not None, 120
            )
            assert c.proc.poll() is None, c.err
        size = model_copy.stat().st_size
        os.truncate(model_copy, size // 2)
        for c in (native, lcpp):
            c.send("hello again")
            rc = c.finish()
            errors = [line for line in c.err if line.startswith("ripe: error")]
            assert rc == 1, (rc, c.err)
            assert not any("Traceback" in line for line in c.err), c.err
            assert errors == [
                f"ripe: error: the model file {model_copy} changed on disk after it was loaded "
                f"(it was truncated from {size} to {size // 2} bytes); load the model again"
            ], c.err
