"""Fetching one file from the Hugging Face Hub (or any server speaking its `resolve` protocol) into a
resumable partial file.

`resolve_remote` asks the hub, through huggingface_hub (`hf_hub_url`, `get_hf_file_metadata`), where
the bytes are, how big the file is and its sha256 (the LFS oid in ``X-Linked-Etag``); ``HF_ENDPOINT``
picks another hub or mirror. `fetch_to_part` then downloads into ``<hex>.part`` with HTTP Range
requests: an existing part is continued, not restarted, and a dropped connection is resumed a few
times before giving up. The caller checks the sha256 and moves the part into the store; this module
never writes anywhere else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2

from ripelm import __version__
from ripelm.models.blobstore import CHUNK, DiskFullError, disk_error, human_size
from ripelm.models.catalog import SHA256_RE
from ripelm.models.errors import DownloadError

HEADROOM = 16 << 20  # keep this much free beyond the file itself


@dataclass
class RemoteFile:
    url: str  # the hub's resolve URL
    location: str  # where the bytes are served (a CDN after the hub's redirect, or the resolve URL)
    size: int | None
    sha256: str | None  # the hub's LFS oid, when it looks like one
    commit: str | None


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` when set (read now, not at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_remote(repo: str, filename: str, revision: str, endpoint: str | None = None) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = endpoint or hub_endpoint()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    where = f"{repo}/{filename}@{revision[:12]}"
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint, timeout=30)
    except OfflineModeIsEnabled as e:
        raise DownloadError("HF_HUB_OFFLINE is set: cannot download; unset it to pull models") from e
    except GatedRepoError as e:
        raise DownloadError(f"{repo} is gated: accept its license on the hub and set HF_TOKEN") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise DownloadError(f"not found on the hub ({endpoint}): {where}") from e
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        raise DownloadError(f"the hub ({endpoint}) answered HTTP {code} for {where}") from e
    except httpx2.HTTPError as e:
        raise DownloadError(f"cannot reach the hub at {endpoint}: {_reason(e)}") from e
    etag = (meta.etag or "").lower()
    return RemoteFile(
        url=url,
        location=meta.location or url,
        size=meta.size,
        sha256=etag if SHA256_RE.match(etag) else None,
        commit=meta.commit_hash,
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text or type(e).__name__


class _Interrupted(Exception):
    """The transfer stopped before the end; the part file keeps what arrived."""


def fetch_to_part(
    remote: RemoteFile,
    part: Path,
    *,
    label: str,
    retries: int = 2,
    progress: bool | None = None,
    auth_headers: dict[str, str] | None = None,
    notice: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> str:
    """Download `remote` into `part` (continuing what is there) and return the sha256 of the whole file.
    `on_progress(bytes in the part, total or None)` is called as bytes arrive (the server's streamed
    /api/pull progress)."""
    attempt = 0
    while True:
        try:
            return _fetch_once(
                remote, part, label=label, progress=progress, auth_headers=auth_headers,
                on_progress=on_progress,
            )  # fmt: skip
        except _Interrupted as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                total = f" of {human_size(remote.size)}" if remote.size else ""
                raise DownloadError(
                    f"the download of {label} stopped at {human_size(have)}{total} ({e}); "
                    f"run `ripe pull {label}` again to resume"
                ) from None
            attempt += 1
            if notice:
                notice(f"connection lost at {human_size(have)} ({e}); resuming (retry {attempt}/{retries})")


def _fetch_once(
    remote: RemoteFile,
    part: Path,
    *,
    label: str,
    progress: bool | None,
    auth_headers: dict[str, str] | None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> str:
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()  # longer than the file can be: not ours to continue
        offset = 0
    h = hashlib.sha256()
    if offset:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    if remote.size is not None:
        _check_space(part.parent, remote.size - offset, label)
    headers = {"User-Agent": f"ripelm/{__version__}", "Accept-Encoding": "identity"}
    if auth_headers and _same_origin(remote.location, remote.url):
        headers.update(auth_headers)  # a token never goes to a CDN host
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = httpx2.Timeout(30.0, read=120.0)
    try:
        with httpx2.Client(follow_redirects=True, timeout=timeout) as client:
            with client.stream("GET", remote.location, headers=headers) as r:
                if r.status_code == 416 and remote.size is not None and offset == remote.size:
                    return h.hexdigest()  # the part already holds the whole file
                if r.status_code == 206:
                    start = _range_start(r.headers.get("Content-Range", ""))
                    if start != offset:
                        raise DownloadError(f"the server sent a range starting at {start}, not {offset}")
                elif r.status_code == 200:
                    if offset:
                        h = hashlib.sha256()  # the server ignored Range: start over
                        offset = 0
                else:
                    raise DownloadError(
                        f"the server answered HTTP {r.status_code} for {label} ({_host(remote.location)})"
                    )
                expected = remote.size
                if expected is None and "Content-Length" in r.headers:
                    expected = offset + int(r.headers["Content-Length"])
                    remote.size = expected
                    _check_space(part.parent, expected - offset, label)
                got = _stream_body(r, part, offset, h, expected, label, progress, on_progress)
    except httpx2.TransportError as e:
        raise _Interrupted(_reason(e)) from e
    if expected is not None and got < expected:
        raise _Interrupted(f"the server closed the connection after {human_size(got)}")
    return h.hexdigest()


def _stream_body(
    r: httpx2.Response,
    part: Path,
    offset: int,
    h: hashlib._Hash,
    expected: int | None,
    label: str,
    progress: bool | None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> int:
    from tqdm import tqdm

    bar = tqdm(
        total=expected,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=label,
        file=sys.stderr,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
        leave=False,
    )
    got = offset
    what = f"the download of {label} ({part})"
    f = None
    try:
        try:
            f = open(part, "r+b" if offset else "wb")
            f.seek(offset)
            f.truncate()
        except OSError as e:
            raise disk_error(e, what) from e
        for chunk in r.iter_bytes():
            try:
                f.write(chunk)
            except OSError as e:
                raise disk_error(e, what) from e
            h.update(chunk)
            got += len(chunk)
            bar.update(len(chunk))
            if on_progress is not None:
                on_progress(got, expected)
        try:
            f.flush()
        except OSError as e:
            raise disk_error(e, what) from e
    finally:
        if f is not None:
            try:
                f.close()
            except OSError:
                # Closing flushes what is still buffered; on a full disk that fails again, and the error
                # already raised (a DiskFullError) is the one to report, not this repeat.
                pass
        bar.close()
    return got


def _check_space(folder: Path, need: int, label: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + HEADROOM:
        raise DiskFullError(
            f"not enough disk space for {label}: it needs {human_size(need)} more, "
            f"{human_size(free)} is free in {folder}"
        )


def _range_start(content_range: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.netloc) == (y.scheme, y.netloc)
