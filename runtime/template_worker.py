"""The process chat templates render in: kept warm, one render at a time, under a time and a memory limit.

A template is a program from a stranger; bounding its work from inside the app would mean predicting the
size of every operation before it runs. Here the operating system bounds it: each render runs under
``RLIMIT_AS`` (the address space may grow by `RENDER_MEMORY`, past that allocations raise MemoryError) and
``SIGALRM`` (stops Python-level work at the time limit); a render stuck in one long C call is killed after
`KILL_GRACE`, and the process restarts on the next render. It starts with the first `ChatTemplate` (while
the model loads) and then costs a pipe round trip per render. Requests are pickled (the app trusts its own
data); replies are a status byte and UTF-8 text, so the app never unpickles what a template could shape.
The memory limit needs Linux's /proc/self/statm; elsewhere renders run without it.
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
from collections.abc import Callable
from typing import Any, BinaryIO

RENDER_MEMORY = 256 * 1024 * 1024  # bytes a render may add to the process's address space
KILL_GRACE = 0.4  # seconds past the time limit before a render stuck in C is killed
START_TIMEOUT = 30.0  # for a cold start (imports jinja2) and for unpickling a request; generous
_REPLY = struct.Struct("<cI")  # status (b"o" text, b"e" one-line error), length of the UTF-8 text
_LENGTH = struct.Struct("<I")


class _Deadline(BaseException):
    """Raised by SIGALRM; a BaseException so no ``except Exception`` in jinja or a filter swallows it."""


def _read(read: Callable[[int], bytes], size: int) -> bytes | None:
    data = b""
    while len(data) < size and (chunk := read(size - len(data))):
        data += chunk
    return data if len(data) == size else None


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _render(env: Any, compiled: dict[str, Any], request: tuple[Any, ...]) -> tuple[bytes, str]:
    """One render in the render process, under the limits."""
    import resource

    from ripelm.runtime.template_sandbox import NAMESPACE_ARGS, describe

    source, context, time_limit, max_output = request
    env.value_limit = max_output * 4
    size, hard = _address_space(), resource.getrlimit(resource.RLIMIT_AS)[1]
    try:
        try:
            if size:
                resource.setrlimit(resource.RLIMIT_AS, (size + RENDER_MEMORY, hard))
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            if source not in compiled:  # compiling evaluates constant expressions, so it is limited too
                compiled[source] = env.from_string(source)
                while len(compiled) > 16:
                    compiled.pop(next(iter(compiled)))
            parts, written = [], 0
            for chunk in compiled[source].generate(context):
                written += len(chunk)
                if written > max_output:
                    return b"e", f"chat template output exceeded {max_output} characters"
                parts.append(chunk)
            return b"o", "".join(parts)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if size:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            NAMESPACE_ARGS.clear()
    except _Deadline:
        return b"e", f"chat template exceeded {time_limit} s"
    except Exception as exc:
        return b"e", describe(exc)


def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    from ripelm.runtime.template_sandbox import make_environment

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    env, compiled = make_environment(), {}
    stdout.write(b"r")
    stdout.flush()
    while (header := _read(stdin.read, _LENGTH.size)) and (
        payload := _read(stdin.read, _LENGTH.unpack(header)[0])
    ):
        try:
            request = pickle.loads(payload)
        except Exception as exc:  # a value of a class this process cannot import
            request, error = None, f"chat template failed: its variables could not be sent: {exc}"
        stdout.write(b"s")  # the render starts now: the app's clock for it starts here
        stdout.flush()
        status, text = _render(env, compiled, request) if request is not None else (b"e", error)
        data = text.encode("utf-8", "surrogatepass")
        stdout.write(_REPLY.pack(status, len(data)) + data)
        stdout.flush()


class RenderProcess:
    """The app's handle on the render process; thread-safe (renders queue on a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False

    def start(self) -> None:
        """Start the process unless it runs; returns at once (it imports jinja2 in the background)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ripelm.runtime.template_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal goes to the app, not to its renders
            # the app's import path, so values of the app's own classes unpickle there
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )  # fmt: skip
        self._ready = False

    def _send(self, payload: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(_LENGTH.pack(len(payload)) + payload)
        self._proc.stdin.flush()

    def _stop(self, message: str) -> tuple[bool, str]:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        return False, message

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
            assert self._proc is not None and self._proc.stdout is not None
            out = self._proc.stdout.fileno()  # read unbuffered: select() sees only what is still in the pipe

            def read(size: int) -> bytes:
                return os.read(out, size)

            if not self._ready:
                if not select.select([out], [], [], START_TIMEOUT)[0] or read(1) != b"r":
                    return self._stop("chat template failed: its render process did not start")
                self._ready = True
            try:
                self._send(payload)
            except OSError:
                return self._stop("chat template failed: its render process stopped")
            if not select.select([out], [], [], START_TIMEOUT)[0] or read(1) != b"s":
                return self._stop("chat template failed: its render process stopped")
            if not select.select([out], [], [], time_limit + KILL_GRACE)[0]:
                return self._stop(f"chat template exceeded {time_limit} s")
            header = _read(read, _REPLY.size)
            body = _read(read, _REPLY.unpack(header)[1]) if header else None
            if header is None or body is None:
                return self._stop("chat template failed: its render process stopped")
            return header[:1] == b"o", body.decode("utf-8", "surrogatepass")


if __name__ == "__main__":
    _out, sys.stdout = sys.stdout.buffer, sys.stderr  # nothing but replies on the pipe
    _serve(sys.stdin.buffer, _out)
