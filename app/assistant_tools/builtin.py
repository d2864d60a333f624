"""The built-in tools: the date and time, search of the chat's document collection, reading and listing
files under the allowed folders, and a shell command (each call confirmed by the user in the app).

The document search numbers its passages across the calls of one turn ([1], [2], ... as `ripe ask` does)
and hands each found passage to `on_sources`, so the reply's citations resolve to files and lines as they
do for a chat with a collection today.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ripelm.assistant_tools.files import FileSandbox
from ripelm.assistant_tools.registry import Tool

SHELL_TIMEOUT_S = 30.0
SHELL_OUTPUT_CHARS = 8_000


def _now(_args: dict[str, Any]) -> str:
    now = dt.datetime.now().astimezone()
    return now.strftime("%A %Y-%m-%d %H:%M:%S %Z (UTC%z)")


def datetime_tool() -> Tool:
    return Tool(
        "current_datetime",
        "The current local date, time, weekday and time zone.",
        {"type": "object", "properties": {}, "additionalProperties": False},
        _now,
        default_on=True,
    )


def file_tools(sandbox: FileSandbox) -> list[Tool]:
    folders = ", ".join(str(r) for r in sandbox.roots()) or "none yet"
    path = {"type": "string", "description": "a path relative to the first allowed folder, or inside one"}
    return [
        Tool(
            "read_file",
            f"Read a text file under the folders the user allowed ({folders}).",
            {
                "type": "object",
                "properties": {"path": path},
                "required": ["path"],
                "additionalProperties": False,
            },
            lambda a: sandbox.read(a["path"]),
        ),
        Tool(
            "list_files",
            f"List a folder under the folders the user allowed ({folders}).",
            {"type": "object", "properties": {"path": path}, "additionalProperties": False},
            lambda a: sandbox.list(a.get("path", ".")),
        ),
    ]


def run_shell(command: str, cwd: Path | None, timeout_s: float = SHELL_TIMEOUT_S) -> str:
    """Run a confirmed command with /bin/sh; its exit status and output (cut to SHELL_OUTPUT_CHARS)."""
    try:
        done = subprocess.run(
            command, shell=True, cwd=cwd, capture_output=True, text=True, errors="replace",
            timeout=timeout_s, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") if isinstance(e.stdout, str) else ""
        return f"[timed out after {timeout_s:.0f} s]\n{out[-SHELL_OUTPUT_CHARS:]}"
    out = done.stdout + (f"\n[stderr]\n{done.stderr}" if done.stderr else "")
    if len(out) > SHELL_OUTPUT_CHARS:
        out = f"[… first {len(out) - SHELL_OUTPUT_CHARS} characters cut]\n" + out[-SHELL_OUTPUT_CHARS:]
    return f"[exit status {done.returncode}]\n{out}"


def shell_tool(cwd: Path | None, timeout_s: float = SHELL_TIMEOUT_S) -> Tool:
    where = str(cwd) if cwd else os.getcwd()
    return Tool(
        "run_shell",
        f"Run a shell command (in {where}) after the user confirms it; returns its exit status and output.",
        {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "the command line"}},
            "required": ["command"],
            "additionalProperties": False,
        },
        lambda a: run_shell(a["command"], cwd, timeout_s),
        confirm=True,
    )


class DocumentSearch:
    """search_documents over one collection; the passages found in a turn are numbered on from the last."""

    def __init__(
        self,
        collection: str,
        on_sources: Callable[[list[Any]], None] | None = None,
        retrieve: Callable[[str, str], list[Any]] | None = None,
    ):
        from ripelm.chat_docs import retrieve as default_retrieve

        self.collection = collection
        self.on_sources = on_sources
        self._retrieve = retrieve or default_retrieve
        self.sources: list[Any] = []  # doc_qa.Source records found so far in this turn

    def __call__(self, args: dict[str, Any]) -> str:
        from dataclasses import replace

        found = self._retrieve(self.collection, args["query"])
        if not found:
            return f"nothing in '{self.collection}' matches that"
        start = len(self.sources)
        numbered = [replace(s, number=start + i) for i, s in enumerate(found, start=1)]
        self.sources.extend(numbered)
        if self.on_sources is not None:
            self.on_sources(list(self.sources))
        passages = [f"[{s.number}] {' '.join(s.text.split())}" for s in numbered]
        return "\n\n".join(passages) + "\n\nCite the passages you use like [1]."

    def tool(self) -> Tool:
        return Tool(
            "search_documents",
            f"Search the user's document collection '{self.collection}' for passages about a question.",
            {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to look for"}},
                "required": ["query"],
                "additionalProperties": False,
            },
            self,
            default_on=True,
        )
