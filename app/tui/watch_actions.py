"""The chat app's "Watch documents" toggle: keep the chat's collection in step with its folder while the
app runs (what `ripe index --watch` does in a terminal of its own).

A mixin of `RipeApp` (through `ChatActions`): one background thread watches the folder that holds the
collection's documents (`chat_docs.collection_folders`) and re-indexes changed files with the
collection's own embedder; the status bar says what each run did. The toggle again, or quitting the app,
stops it.
"""

from __future__ import annotations

import threading
from typing import Any

from textual import work
from textual.worker import get_current_worker

from ripelm.chat_docs import collection_folders, watch_collection
from ripelm.tui.status_bar import StatusBar


class _Stop:
    """Set by the toggle, or by the app cancelling the worker at exit: the watch loop polls `is_set`."""

    def __init__(self, worker: Any):
        self.event = threading.Event()
        self.worker = worker

    def is_set(self) -> bool:
        return self.event.is_set() or self.worker.is_cancelled


class WatchActions:
    chat: Any
    watched: str | None = None  # the collection being watched
    watch_runs: int = 0  # index runs the watch has made (tests wait on it)
    _watch_stop: _Stop | None = None

    def action_toggle_watch(self) -> None:
        """Start (or stop) re-indexing this chat's collection when files in its folder change."""
        if self.watched is not None:
            if self._watch_stop is not None:
                self._watch_stop.event.set()
            self.notify(f"stopped watching the documents of {self.watched}")
            self.watched = None
            return
        name = self.chat.collection if self.chat is not None else None
        if not name:
            self.notify("attach a collection first (Attach collection / Index folder)", severity="warning")
            return
        try:
            folders = collection_folders(name)
        except Exception as e:  # a collection gone from the store, or empty: one line, the app goes on
            self.notify(str(e), severity="warning")
            return
        self.watched = name
        self._watch(name, folders)
        self.notify(f"watching {folders[0]} for {name}: changed files are re-indexed")

    @work(thread=True, group="watch")
    def _watch(self, name: str, folders: list) -> None:
        stop = self._watch_stop = _Stop(get_current_worker())

        def report(r: Any) -> None:
            self.call_from_thread(self._watch_report, name, r)

        try:
            watch_collection(name, folders, stop, report)
        except Exception as e:
            if not stop.is_set():
                self.call_from_thread(self.notify, str(e), title="watching stopped", severity="error")
            if self.watched == name:
                self.watched = None

    def _watch_report(self, name: str, r: Any) -> None:
        self.watch_runs += 1
        if r.indexed or r.removed:
            done = f"{name}: {r.indexed} re-indexed, {r.removed} removed, {r.chunks_total} chunks"
            self.query_one(StatusBar).show(notice=done)
