"""The chat app's first frame, drawn before Textual is imported.

Why our own: importing Textual and the app takes most of a launch (Textual alone ~0.4 s on a 2-core
EPYC VM), and the message box must be there within a second of `ripe chat` on any machine. This draws
the message box and a status line with a few escape codes at once, keeps what is typed (shown in the box)
while the rest loads, and hands it to the app, which replays it as key presses through Textual's own
input parser once its screen is up, so nothing typed in the meantime is lost or sent differently.

POSIX terminals only (termios); elsewhere, or without a terminal, the app simply starts as before.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from typing import Any

try:
    import termios
    import tty
except ImportError:  # pragma: no cover - Windows
    termios = None  # type: ignore[assignment]

_DIM, _BAR, _RESET = "\x1b[38;5;243m", "\x1b[38;5;253;48;5;17m", "\x1b[0m"


def prompt_placeholder(enter_sends: bool) -> str:
    """The message box's placeholder (the app's and this frame's)."""
    keys = "Enter sends · Ctrl+J newline" if enter_sends else "Ctrl+J sends · Enter newline"
    return f"Message · {keys} · Esc stops"


class EarlyFrame:
    def __init__(self, fd: int, saved: list[Any], placeholder: str, status: str):
        self.fd, self.saved, self.placeholder, self.status = fd, saved, placeholder, status
        self.typed = b""
        self.closed = False
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="early-keys", daemon=True)

    @classmethod
    def open(cls, placeholder: str, status: str) -> EarlyFrame | None:
        """Draw the frame and start keeping keys, or None where that is not possible."""
        if termios is None or os.environ.get("RIPELM_NO_EARLY_FRAME"):
            return None
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            return None
        fd = sys.stdin.fileno()
        try:
            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # keys one by one and not echoed; Ctrl+C still interrupts
            mode = termios.tcgetattr(fd)
            mode[0] &= ~termios.ICRNL  # Enter as the app sees it (CR), not turned into Ctrl+J's LF
            termios.tcsetattr(fd, termios.TCSANOW, mode)
        except termios.error:
            return None
        frame = cls(fd, saved, placeholder, status)
        frame._draw()
        frame._reader.start()
        return frame

    def _write(self, text: str) -> None:
        try:
            os.write(sys.stdout.fileno(), text.encode())
        except OSError:
            pass

    def _draw(self) -> None:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
        self._size = (cols, rows)
        line = "\u2594" * cols
        status = f" {self.status}"[:cols].ljust(cols)
        # alternate screen (as Textual's), cleared; the box's top edge, its line, the status bar
        edge, bar = f"\x1b[{rows - 2};1H{_DIM}{line}{_RESET}", f"\x1b[{rows};1H{_BAR}{status}{_RESET}"
        self._write(f"\x1b[?1049h\x1b[2J{edge}{bar}")
        self._draw_input()

    def _draw_input(self) -> None:
        cols, rows = self._size
        text = shown_text(self.typed)
        shown = f" {text[-(cols - 2):]}" if text else f" {_DIM}{self.placeholder[: cols - 2]}{_RESET}"
        cursor = min(len(text) + 2, cols)
        self._write(f"\x1b[{rows - 1};1H\x1b[2K{shown}\x1b[{rows - 1};{cursor}H")

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.02)
                if not ready:
                    continue
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.typed += data
            self._draw_input()

    def close(self) -> str:
        """Stop keeping keys and give the terminal back as it was (the app sets its own mode); what was
        typed, as text for the app to replay. Keys pressed from now on wait in the terminal for the app."""
        self._stop.set()
        if self._reader.is_alive():
            self._reader.join()
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        except termios.error:
            pass
        return self.typed.decode("utf-8", errors="ignore")

    def abandon(self) -> None:
        """Close, and leave the frame's screen: the app will not start (an error line follows)."""
        self.close()
        self._write("\x1b[?1049l")


def shown_text(typed: bytes) -> str:
    """What the box shows of the keys typed so far: printable text, Ctrl+J as a return sign, Backspace
    deleting, escape sequences (arrows...) left out; Enter shows that the message will be sent."""
    out: list[str] = []
    text = typed.decode("utf-8", errors="ignore")
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":  # an escape sequence: ESC, an optional '[' or 'O', then up to a final letter
            i += 1
            if i < len(text) and text[i] in "[O":
                i += 1
                while i < len(text) and not text[i].isalpha() and text[i] != "~":
                    i += 1
            i += 1
            continue
        if ch in "\x7f\x08":
            if out:
                out.pop()
        elif ch == "\n":
            out.append(" \u23ce ")
        elif ch == "\r":
            out.append("  (sent when the app is ready)")
        elif ch.isprintable():
            out.append(ch)
        i += 1
    return "".join(out)


async def replay(text: str, pilot: Any) -> None:
    """Press the keys typed before the app was up, parsed as Textual's driver parses terminal input."""
    from textual import events
    from textual._xterm_parser import XTermParser

    keys = [e.key for e in XTermParser().feed(text) if isinstance(e, events.Key)]
    if keys:
        await pilot.press(*keys)
