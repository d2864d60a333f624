"""Reading and listing files for the model, only under the folders the user allowed.

Every path the model names is checked before anything is opened, and each refusal is one clear sentence
(it goes back to the model as the tool's result and is shown in the app):

- `..` anywhere in the path is refused outright (even when it would land inside a folder again);
- a relative path is taken under the first allowed folder; an absolute one must lie inside one of them;
- the path is resolved to its real path (every symlink followed) and must still lie inside an allowed
  folder, so a symlink pointing outside is refused;
- /proc, /sys and /dev are never read, even when a folder above them was allowed;
- the file is opened without following a last symlink and without blocking (a FIFO would otherwise hang
  the open), and what was opened must be a regular file (not a FIFO, socket or device) with one link: a
  hard link to a file elsewhere looks like an ordinary file inside the folder, and the other names of a
  file cannot be found, so files with more than one link are refused;
- where /proc/self/fd exists, the opened descriptor's own path is checked again (a path swapped for a
  symlink between the check and the open is caught);
- a file is read up to a size cap (the rest is cut with a note), a listing up to an entry cap; binary files
  are refused.

Written here rather than taken from a library: the sandboxing libraries on PyPI confine processes
(seccomp, namespaces), not the paths one Python function opens, and none refuses hard links.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

MAX_FILE_BYTES = 64 * 1024  # a file's text handed to the model at most (the rest is cut, with a note)
MAX_ENTRIES = 200  # entries of one listing
SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


class ToolRefused(Exception):
    """A tool call the sandbox (or the user) refused; str(e) is the one-line reason."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class FileSandbox:
    folders: list[Path]  # the allowed folders (as the user wrote them; resolved on use)
    max_bytes: int = MAX_FILE_BYTES
    max_entries: int = MAX_ENTRIES
    _roots: list[Path] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._roots = [Path(os.path.realpath(Path(f).expanduser())) for f in self.folders]

    def roots(self) -> list[Path]:
        return list(self._roots)

    def resolve(self, path: str) -> Path:
        """The real path of `path`, inside an allowed folder, or ToolRefused saying why not."""
        if not self._roots:
            raise ToolRefused(
                "no folders are allowed for reading: add some under [tools] folders in config.toml"
            )
        if not isinstance(path, str) or not path.strip():
            raise ToolRefused("give a file path")
        if "\x00" in path:
            raise ToolRefused("a path may not contain a NUL character")
        given = Path(path.strip()).expanduser()
        if ".." in given.parts:
            raise ToolRefused(f"'{path}': '..' is not allowed in a path")
        named = given if given.is_absolute() else self._roots[0] / given
        if given.is_absolute() and not any(_inside(Path(os.path.normpath(named)), r) for r in self._roots):
            raise ToolRefused(f"'{path}' is outside the allowed folders ({self._folder_list()})")
        real = Path(os.path.realpath(named))
        if any(_inside(real, t) for t in SYSTEM_TREES):
            raise ToolRefused(f"'{path}': system files under /proc, /sys and /dev are never read")
        if not any(_inside(real, r) for r in self._roots):
            raise ToolRefused(f"'{path}' is a symbolic link to {real}, outside the allowed folders")
        return real

    def _folder_list(self) -> str:
        return ", ".join(str(r) for r in self._roots)

    def _check_fd(self, fd: int, path: str) -> os.stat_result:
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode):
            raise ToolRefused(f"'{path}' is a FIFO (named pipe), not a file")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            raise ToolRefused(f"'{path}' is a device, not a file")
        if stat.S_ISSOCK(st.st_mode):
            raise ToolRefused(f"'{path}' is a socket, not a file")
        if stat.S_ISDIR(st.st_mode):
            raise ToolRefused(f"'{path}' is a folder: list it with list_files")
        if not stat.S_ISREG(st.st_mode):
            raise ToolRefused(f"'{path}' is not a regular file")
        if st.st_nlink > 1:
            raise ToolRefused(
                f"'{path}' has {st.st_nlink} hard links; a hard link can point at a file outside the "
                "allowed folders, so such files are not read"
            )
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.parent.is_dir():
            real = Path(os.readlink(opened))
            if not any(_inside(real, r) for r in self._roots):
                raise ToolRefused(f"'{path}' changed into a link outside the allowed folders while opening")
        return st

    def read(self, path: str) -> str:
        """The file's text (up to max_bytes)."""
        real = self.resolve(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            raise ToolRefused(f"'{path}' does not exist") from None
        except OSError as e:
            raise ToolRefused(f"'{path}' cannot be opened: {e.strerror}") from None
        try:
            st = self._check_fd(fd, path)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.max_bytes + 1)
        finally:
            os.close(fd)
        if b"\x00" in data[:8192]:
            raise ToolRefused(f"'{path}' is a binary file ({st.st_size} bytes), not text")
        text = data[: self.max_bytes].decode("utf-8", errors="replace")
        if len(data) > self.max_bytes:
            text += f"\n[… cut at {self.max_bytes} of {st.st_size} bytes]"
        return text

    def list(self, path: str = ".") -> str:
        """The folder's entries, one a line: name (a trailing / for folders, -> for links) and size."""
        real = self.resolve(path or ".")
        if not real.exists():
            raise ToolRefused(f"'{path}' does not exist")
        if not real.is_dir():
            raise ToolRefused(f"'{path}' is not a folder: read it with read_file")
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except OSError as e:
            raise ToolRefused(f"'{path}' cannot be listed: {e.strerror}") from None
        lines = []
        for e in entries[: self.max_entries]:
            if e.is_symlink():
                lines.append(f"{e.name} -> (link)")
            elif e.is_dir(follow_symlinks=False):
                lines.append(f"{e.name}/")
            else:
                try:
                    lines.append(f"{e.name}  {e.stat(follow_symlinks=False).st_size} bytes")
                except OSError:
                    lines.append(e.name)
        if len(entries) > self.max_entries:
            lines.append(f"[… {len(entries) - self.max_entries} more entries not shown]")
        return "\n".join(lines) if lines else "(empty folder)"
