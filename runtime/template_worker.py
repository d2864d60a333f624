"""The process chat templates render in: kept warm, one render at a time, under a time and a memory limit.

Why a process: a template is a program from a stranger, and bounding what it computes from inside the
interpreter means predicting the size of every operation before it runs. Here the operating system does the
bounding: each render runs under ``RLIMIT_AS`` (its address space may grow by `RENDER_MEMORY`; an allocation
past that raises MemoryError) and ``SIGALRM`` (stops Python-level work at the time limit); a render stuck in
one long C call is killed by the app after a grace period and the process restarts on the next render. The
process starts with the first `ChatTemplate` (while the model loads) and then costs one pipe round trip per
render. Requests are pickled (the app trusts its own data); replies are a status byte and UTF-8 text, so the
app never unpickles anything a template could have shaped. The memory limit needs Linux's /proc; elsewhere
renders run without it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

RENDER_MEMORY = 256 * 1024 * 1024  # bytes a render may add to the process's address space
KILL_GRACE = 0.4  # seconds past the time limit before a render stuck in C is killed
START_TIMEOUT = 30.0  # a cold start imports jinja2; generous for a loaded machine
_HEADER = struct.Struct("<cI")  # status (b"o" text / b"e" one-line error), length
_LENGTH = struct.Struct("<I")


class _Deadline(BaseException):
    """Raised by SIGALRM; a BaseException so no ``except Exception`` inside jinja or a filter swallows it."""


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


# -- the render process -------------------------------------------------------------------------------------


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _render(env: Any, compiled: dict[str, Any], request: tuple[Any, ...]) -> tuple[bytes, str]:
    from ripelm.runtime.template_sandbox import describe, forget_namespaces

    source, context, time_limit, max_output = request
    env.value_limit = max_output * 4
    resource = _resource()
    size = _address_space() if resource else None
    hard = resource.getrlimit(resource.RLIMIT_AS)[1] if size else None
    try:
        try:
            if size:
                resource.setrlimit(resource.RLIMIT_AS, (size + RENDER_MEMORY, hard))
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            template = compiled.get(source)
            if template is None:
                template = compiled[source] = env.from_string(source)
                while len(compiled) > 16:
                    compiled.pop(next(iter(compiled)))
            parts, written = [], 0
            for chunk in template.generate(context):
                written += len(chunk)
                if written > max_output:
                    return b"e", f"chat template output exceeded {max_output} characters"
                parts.append(chunk)
            return b"o", "".join(parts)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if size:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            forget_namespaces()
    except _Deadline:
        return b"e", f"chat template exceeded {time_limit} s"
    except Exception as exc:
        return b"e", describe(exc)


def _resource() -> Any:
    try:
        import resource
    except ImportError:  # not POSIX: no memory limit
        return None
    return resource


def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    from ripelm.runtime.template_sandbox import make_environment

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    env, compiled = make_environment(), {}
    stdout.write(b"r")
    stdout.flush()
    while (header := _read_exact(stdin, _LENGTH.size)) is not None:
        payload = _read_exact(stdin, _LENGTH.unpack(header)[0])
        if payload is None:
            return
        try:
            status, text = _render(env, compiled, pickle.loads(payload))
        except Exception as exc:  # an object in the context that cannot be rebuilt here
            status, text = b"e", f"chat template failed: its variables could not be sent: {exc}"
        data = text.encode("utf-8", "surrogatepass")
        stdout.write(_HEADER.pack(status, len(data)) + data)
        stdout.flush()


# -- the app's side -----------------------------------------------------------------------------------------


class RenderProcess:
    """The app's handle on the render process; thread-safe (renders queue on a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False

    def start(self) -> None:
        """Start the process if it is not running; returns at once (it imports jinja2 in the background)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        proc = subprocess.Popen(
            [sys.executable, "-m", "ripelm.runtime.template_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal goes to the app, not to its renders
        )  # fmt: skip
        assert proc.stdin is not None
        # The app's import path, so values of the app's own classes unpickle there.
        path = pickle.dumps(list(sys.path))
        proc.stdin.write(_LENGTH.pack(len(path)) + path)
        proc.stdin.flush()
        self._proc, self._ready = proc, False

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _wait_readable(self, timeout: float) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        return bool(select.select([self._proc.stdout], [], [], timeout)[0])

    def render(
        self, source: str, context: dict[str, Any], time_limit: float, max_output: int
    ) -> tuple[bool, str]:
        """(True, text) or (False, one-line error message)."""
        try:
            payload = pickle.dumps((source, context, time_limit, max_output))
        except Exception as exc:
            return False, f"chat template failed: its variables could not be sent: {exc}"
        with self._lock:
            self._start()
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            if not self._ready:
                if not self._wait_readable(START_TIMEOUT) or proc.stdout.read(1) != b"r":
                    self._stop()
                    return False, "chat template failed: its render process did not start"
                self._ready = True
            try:
                proc.stdin.write(_LENGTH.pack(len(payload)) + payload)
                proc.stdin.flush()
            except OSError:
                self._stop()
                return False, "chat template failed: its render process stopped"
            if not self._wait_readable(time_limit + KILL_GRACE):
                self._stop()
                return False, f"chat template exceeded {time_limit} s"
            header = _read_exact(proc.stdout, _HEADER.size)
            body = _read_exact(proc.stdout, _HEADER.unpack(header)[1]) if header else None
            if header is None or body is None:
                self._stop()
                return False, "chat template failed: its render process stopped"
            return header[:1] == b"o", body.decode("utf-8", "surrogatepass")


if __name__ == "__main__":
    _in, _out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    _path = _read_exact(_in, _LENGTH.unpack(_read_exact(_in, _LENGTH.size) or bytes(4))[0])
    if _path:
        sys.path[:] = pickle.loads(_path)
    _serve(_in, _out)
