"""The local model store on disk: content-addressed blobs and the name -> blob manifest.

Layout under the models folder (``$RIPELM_HOME/models`` or the platform's user data dir)::

    blobs/sha256-<hex>      one file per distinct GGUF, named by its sha256; only complete, verified
                            files ever get here, by an atomic rename from downloads/
    manifest.json           {"version": 1, "models": {"name:tag": {digest, size, source, origin, added}}}
    downloads/              work in progress on the same file system: resumable `<hex>.part` files
                            of `ripe pull`, and temporary copies of `ripe import`
    .lock                   an advisory lock held while the manifest is rewritten

A name points at one blob; several names may share a blob, and removing the last name that uses a
blob deletes it. The manifest is rewritten whole (temp file + rename), so a crash leaves the old or
the new one, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ripelm.models.errors import DiskFullError, ModelNotFoundError, StoreError

MANIFEST_VERSION = 1
CHUNK = 1 << 20
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass
class ManifestEntry:
    name: str
    digest: str  # "sha256:<hex>"
    size: int
    source: str  # "pull" or "import"
    origin: str  # "repo/file@revision" or the imported file's path
    added: str  # ISO 8601 UTC

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(e: OSError, what: str) -> StoreError:
    """A named error for a failed write: disk-full kinds get their own class and advice."""
    if e.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"no space left while writing {what} ({os.strerror(e.errno)}); free some space")
    return StoreError(f"cannot write {what}: {e.strerror or e}")


class ModelStore:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.downloads = root / "downloads"
        self.manifest_path = root / "manifest.json"

    # ---- reading -------------------------------------------------------------------------------

    def entries(self) -> dict[str, ManifestEntry]:
        if not self.manifest_path.is_file():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unknown manifest version {data.get('version')!r}")
            return {n: ManifestEntry(name=n, **e) for n, e in data["models"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"the model manifest {self.manifest_path} is damaged: {e}") from e

    def get(self, name: str) -> ManifestEntry | None:
        return self.entries().get(name)

    def blob_path(self, digest_hex: str) -> Path:
        return self.blobs / f"sha256-{digest_hex}"

    def path_of(self, entry: ManifestEntry) -> Path:
        p = self.blob_path(entry.hex)
        if not p.is_file():
            raise StoreError(
                f"the file of '{entry.name}' is missing from the store ({p}); `ripe rm {entry.name}` "
                "and pull or import it again"
            )
        return p

    def partial_downloads(self) -> list[Path]:
        return sorted(self.downloads.glob("*.part")) if self.downloads.is_dir() else []

    # ---- writing -------------------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        try:
            for d in (self.root, self.blobs, self.downloads):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise disk_error(e, f"the model store {self.root}") from e

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure_dirs()
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_manifest(self, entries: dict[str, ManifestEntry]) -> None:
        data = {
            "version": MANIFEST_VERSION,
            "models": {n: {k: v for k, v in asdict(e).items() if k != "name"} for n, e in entries.items()},
        }
        tmp = self.manifest_path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.manifest_path)
            fsync_dir(self.root)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise disk_error(e, f"the model manifest {self.manifest_path}") from e

    def adopt_blob(self, verified: Path, digest_hex: str) -> Path:
        """Move a complete file whose sha256 was checked into blobs/ (atomic: same file system)."""
        dest = self.blob_path(digest_hex)
        try:
            with open(verified, "rb+") as f:
                os.fsync(f.fileno())
            if dest.is_file():
                verified.unlink()  # the store already has these bytes under another name
            else:
                os.replace(verified, dest)
                fsync_dir(self.blobs)
        except OSError as e:
            raise disk_error(e, str(dest)) from e
        return dest

    def add(self, entry: ManifestEntry) -> None:
        with self.locked():
            entries = self.entries()
            entries[entry.name] = entry
            self._write_manifest(entries)

    def remove(self, name: str) -> tuple[ManifestEntry, bool]:
        """Drop a name; delete its blob when no other name uses it. Returns (entry, blob deleted)."""
        with self.locked():
            entries = self.entries()
            entry = entries.pop(name, None)
            if entry is None:
                raise ModelNotFoundError(f"'{name}' is not in the model store")
            self._write_manifest(entries)
            if any(e.digest == entry.digest for e in entries.values()):
                return entry, False
            self.blob_path(entry.hex).unlink(missing_ok=True)
            return entry, True

    def clear_partial(self) -> int:
        """Delete every partial download and temporary file; returns the bytes freed."""
        freed = 0
        if self.downloads.is_dir():
            for p in self.downloads.iterdir():
                if p.is_file():
                    freed += p.stat().st_size
                    p.unlink()
        return freed

    def import_file(
        self,
        src: Path,
        name: str,
        *,
        validate: Callable[[Path], None],
        progress: Callable[[int], None] | None = None,
    ) -> ManifestEntry:
        """Copy a local GGUF into the store under `name`; `validate` checks the copy before it is adopted."""
        if not src.is_file():
            raise ModelNotFoundError(f"no such file: {src}")
        existing = self.get(name)
        if existing is not None:
            raise StoreError(f"'{name}' is already in the store; `ripe rm {name}` first or choose --name")
        self.ensure_dirs()
        size = src.stat().st_size
        free = shutil.disk_usage(self.downloads).free
        if free < size:
            raise DiskFullError(
                f"not enough disk space to import {src.name}: it needs {human_size(size)}, "
                f"{human_size(free)} is free in {self.root}"
            )
        tmp = self.downloads / f"import-{os.getpid()}-{time.monotonic_ns()}.tmp"
        h = hashlib.sha256()
        try:
            try:
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        h.update(chunk)
                        fout.write(chunk)
                        if progress:
                            progress(len(chunk))
            except OSError as e:
                if e.filename == str(src):
                    raise StoreError(f"cannot read {src}: {e.strerror}") from e
                raise disk_error(e, f"the copy of {src.name} in {self.downloads}") from e
            validate(tmp)  # the bytes that enter the store are the bytes that were checked
            digest = h.hexdigest()
            self.adopt_blob(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        entry = ManifestEntry(name, f"sha256:{digest}", size, "import", str(src.resolve()), _now())
        self.add(entry)
        return entry


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_entry(name: str, digest_hex: str, size: int, source: str, origin: str) -> ManifestEntry:
    return ManifestEntry(name, f"sha256:{digest_hex}", size, source, origin, _now())
