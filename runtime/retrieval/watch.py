"""Keep a collection in step with folders: re-index when files under them change (``ripe index --watch``).

Change notices come from watchdog (Apache-2.0), which uses the OS's own file events (inotify, FSEvents,
ReadDirectoryChangesW), so an idle watch of a large tree costs nothing; when the OS refuses more watches
(inotify's per-user limit) it falls back to watchdog's polling observer. A notice only marks the
collection dirty: after the events settle (``debounce``) the ordinary incremental indexer runs over the
watched paths, so the same rules apply as for a manual ``ripe index`` (unchanged size and mtime: not read;
same content hash: re-stamped; changed: re-embedded and replaced in one transaction; gone: removed).
Events that arrive during a run mark it dirty again and another run follows. A full pass also runs every
``rescan`` seconds, in case a notice was lost (network file systems do not always send them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ripelm.runtime.retrieval.indexer import IGNORED_DIRS
from ripelm.runtime.retrieval.loaders import SUPPORTED


def relevant(path: str, is_directory: bool) -> bool:
    """Whether an event on ``path`` can change what the indexer sees."""
    parts = Path(path).parts
    if any(p in IGNORED_DIRS or (p.startswith(".") and p not in (".", "..")) for p in parts[:-1]):
        return False
    name = parts[-1] if parts else ""
    if is_directory:
        return not name.startswith(".") and name not in IGNORED_DIRS
    return not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED


class _Handler:
    """A watchdog event handler (duck-typed: ``dispatch`` is all an observer calls)."""

    def __init__(self, dirty: threading.Event, stamp: list[float]):
        self.dirty = dirty
        self.stamp = stamp

    def dispatch(self, event) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and relevant(str(p), event.is_directory) for p in paths):
            self.stamp[0] = time.monotonic()
            self.dirty.set()


class FolderWatch:
    def __init__(self, paths: Iterable[Path], *, debounce: float = 0.2, rescan: float = 300.0):
        self.paths = [Path(p).expanduser().absolute() for p in paths]
        self.debounce = debounce
        self.rescan = rescan
        self.dirty = threading.Event()
        self._last = [0.0]
        self.polling = False
        self._observer = None

    def start(self) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        handler = _Handler(self.dirty, self._last)
        try:
            self._observer = self._schedule(Observer(), handler)
        except OSError:  # e.g. inotify watch limit reached
            self._observer = self._schedule(PollingObserver(timeout=1.0), handler)
            self.polling = True

    def _schedule(self, observer, handler):
        for p in self.paths:
            folder = p if p.is_dir() else p.parent
            observer.schedule(handler, str(folder), recursive=p.is_dir())
        observer.start()
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def wait(self, stop: threading.Event) -> bool:
        """Block until a change has settled (True) or ``stop`` is set (False); a rescan is due counts."""
        deadline = time.monotonic() + self.rescan
        while not stop.is_set():
            if self.dirty.wait(timeout=0.1):
                # settle: no event for ``debounce`` seconds (an editor's save is several events)
                while time.monotonic() - self._last[0] < self.debounce and not stop.is_set():
                    time.sleep(self.debounce / 4)
                self.dirty.clear()
                return not stop.is_set()
            if time.monotonic() >= deadline:
                return True
        return False

    def run(self, reindex: Callable[[], object], stop: threading.Event) -> None:
        """Call ``reindex`` after every settled change until ``stop`` is set (starts watching if needed)."""
        if self._observer is None:
            self.start()
        try:
            while self.wait(stop):
                reindex()
        finally:
            self.stop()
