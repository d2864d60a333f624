"""Keeping a loaded model file from crashing the process when it is truncated or rewritten on disk.

Engines read weights from a memory map of the GGUF file (ours through `GGUFFile.tensor_bytes`, llama.cpp
through its own mmap). If that file is truncated in place (a download rewritten over it, a full disk, a
user's `truncate`), the next read of a page past the new end raises SIGBUS, which kills the process: no
Python handler can turn a fault inside numpy, torch or llama.cpp into an exception. Replacing the file by
a rename, or deleting it, is harmless: the mapping holds the old inode, whose bytes do not change.

What we do, for both engines:

- **Copy at load when the file is small** (up to `COPY_AT_LOAD_MAX_BYTES`): the native loader reads the
  file into private memory (`GGUFFile.load_into_memory`) and llama.cpp loads with `use_mmap=False`. Nothing
  then aliases the file, so no later change of it can fault. The cost is small: every weight page is
  touched at load (repacking) and by each prefill (the dense prefill path reads the file's bytes), so a
  mapped file is resident anyway; the copy is the same number of pages, only no longer shared with the
  page cache of other processes. `MAP_PRIVATE` would not help: a private mapping's clean pages still
  come from the file and fault the same way once it shrinks.
- **A check before each request** (`ModelFileGuard.check`): we hold a descriptor of the very inode that
  was loaded and compare its size and modification time with those seen at load. A truncated or
  rewritten file ends the request with `ModelFileChangedError`, one line, instead of serving weights that
  no longer match the file (for a copied model) or faulting (for a mapped one). Larger files stay mapped
  (copying gigabytes would double their memory where the page cache cannot reclaim it); for them a
  truncation in the middle of a request can still fault, a window the check narrows to one request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ripelm.models.errors import ModelFileChangedError

COPY_AT_LOAD_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class FileState:
    """Which file (device, inode) and what it looked like (size, modification time)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change_since(self, loaded: FileState) -> str | None:
        """What differs from `loaded`, in words, or None if this is the same file, unchanged."""
        if (self.dev, self.ino) != (loaded.dev, loaded.ino):
            return "it was replaced by another file"
        if self.size < loaded.size:
            return f"it was truncated from {loaded.size} to {self.size} bytes"
        if self.size > loaded.size:
            return f"it grew from {loaded.size} to {self.size} bytes"
        if self.mtime_ns != loaded.mtime_ns:
            return "it was rewritten in place"
        return None


def changed_message(path: Path, change: str) -> str:
    return f"the model file {path} changed on disk after it was loaded ({change}); load the model again"


class ModelFileGuard:
    """An open descriptor on the loaded model file; `check()` raises if that file has changed since."""

    def __init__(self, path: str | os.PathLike[str], loaded: FileState):
        self.path = Path(path)
        self.loaded = loaded
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ModelFileChangedError(
                changed_message(self.path, f"it cannot be opened: {e.strerror}")
            ) from None
        try:
            self.check()
        except ModelFileChangedError:
            self.close()
            raise

    def check(self) -> None:
        if self._fd is None:
            return
        change = FileState.of(os.fstat(self._fd)).change_since(self.loaded)
        if change is not None:
            raise ModelFileChangedError(changed_message(self.path, change))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
