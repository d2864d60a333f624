"""oterm (the Ollama terminal client, from PyPI) in a real terminal (tmux) against `ripe serve --ollama` on
a test port: its new-chat screen lists our models (/api/tags, /api/show), and a chat with the bundled
model streams an answer onto the screen.

oterm's dependencies pin versions the project's environment does not use (an older pydantic and
huggingface_hub), so it lives in its own virtual environment: set RIPELM_OTERM to its `oterm` script
(`python -m venv /tmp/oterm && /tmp/oterm/bin/pip install oterm`), or have `oterm` on PATH. Skipped
without tmux or oterm."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from openai_servers import ripe_serve

_LOCAL = Path(__file__).resolve().parent.parent / ".venv-oterm" / "bin" / "oterm"  # install_test_tools.sh
OTERM = os.environ.get("RIPELM_OTERM") or (str(_LOCAL) if _LOCAL.is_file() else shutil.which("oterm"))
pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.skipif(
        OTERM is None or not Path(OTERM).is_file(), reason="oterm is not installed (see RIPELM_OTERM)"
    ),
]


def tmux(session: str, *args: str) -> str:
    """tmux on its own server (`-L`) per run, as tests/test_chat_tmux.py does."""
    return subprocess.run(["tmux", "-L", session, *args], check=True, capture_output=True, text=True).stdout


def screen(session: str) -> str:
    return tmux(session, "capture-pane", "-p", "-t", session)


def poll(predicate, timeout: float, what: str, session: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # poll interval
    raise AssertionError(f"timed out waiting for {what}:\n{screen(session)}")


def click(session: str, label: str) -> None:
    """A left click (SGR mouse report, which Textual reads) on the first place `label` is on screen."""
    rows = screen(session).splitlines()
    y = next(i for i, row in enumerate(rows) if label in row)
    x = rows[y].index(label) + 2
    for end in ("M", "m"):  # press, release
        tmux(session, "send-keys", "-t", session, "-l", f"\x1b[<0;{x};{y + 1}{end}")


def reply_lines(text: str) -> list[str]:
    """The messages of oterm's chat view: each starts with its prompt marker."""
    return [
        row.strip().removeprefix("❯").strip() for row in text.splitlines() if row.strip().startswith("❯ ")
    ]


def test_oterm_lists_our_models_and_streams_a_chat(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    session = f"oterm-test-{os.getpid()}"
    with ripe_serve(None, home, "--ollama", "--ctx", "2048") as (url, _):
        host = url.removeprefix("http://").removesuffix("/v1")
        # (without COLUMNS and LINES, which Textual would take over the terminal's own size)
        env = f"env -u COLUMNS -u LINES OLLAMA_HOST={host} OTERM_DATA_DIR={tmp_path / 'oterm'}"
        env += " TERM=xterm-256color"
        tmux(session, "new-session", "-d", "-s", session, "-x", "120", "-y", "40", f"{env} {OTERM}")
        try:
            poll(
                lambda: "Press Ctrl+N to start a new chat" in screen(session), 180, "oterm to start", session
            )
            tmux(session, "send-keys", "-t", session, "C-n")
            # the new-chat screen lists the server's models (from /api/tags)
            poll(lambda: "smollm2:135m" in screen(session), 60, "the model list", session)
            time.sleep(1)  # the screen takes its focus after it shows
            tmux(session, "send-keys", "-t", session, "Tab")  # from the provider to the model name
            tmux(session, "send-keys", "-t", session, "-l", "smollm2:135m")
            poll(lambda: "│  smollm2:135m" in screen(session), 30, "the typed model name", session)
            tmux(session, "send-keys", "-t", session, "Tab")
            # choosing it shows its size (from /api/show)
            poll(lambda: "Size: 0.10" in screen(session), 60, "the model's details", session)
            click(session, "Save")
            poll(lambda: "chat #1 - smollm2:135m" in screen(session), 60, "the chat to open", session)
            question = "Write a long story about a lighthouse keeper and the sea."
            tmux(session, "send-keys", "-t", session, "-l", question)
            tmux(session, "send-keys", "-t", session, "Enter")
            partial: list[str] = []  # the reply as seen on screen before it ended

            def finished() -> str | None:
                text = screen(session)
                done = "↓" in text and "ctx" in text  # oterm's token counts appear when the reply ends
                lines = reply_lines(text)
                if not done and len(lines) >= 2 and lines[0] == question and lines[1]:
                    partial.append(lines[1])
                return text if done else None

            final = poll(finished, 300, "the answer", session)
            # streamed: the answer was on the screen while it grew, before the reply ended
            assert len(set(partial)) >= 2, partial
            assert any(len(a) < len(b) for a, b in zip(partial, partial[1:], strict=False)), partial
            rows = final.splitlines()
            stats_row = next(i for i, row in enumerate(rows) if "↓" in row)
            assert any(row.strip() for row in rows[:stats_row][-3:])  # the answer's end, above its stats
        finally:
            subprocess.run(["tmux", "-L", session, "kill-server"], capture_output=True)
