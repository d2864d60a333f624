"""`ripe pull NAME`: from a catalog entry to a verified blob in the store and a manifest entry.

Order of events, and what is left behind when one fails:

1. look the name up (built-in catalog, then the user's ``catalog.toml``);
2. ask the hub for the file's size and LFS sha256, and refuse before downloading anything if that
   digest differs from the catalog's (the file changed on the hub) or no digest is known at all;
3. download into ``downloads/<sha256>.part``, resuming an earlier part of the same file;
4. check the sha256 of the whole part: a mismatch deletes the part (its bytes are wrong);
5. rename the part into ``blobs/`` (same file system: atomic) and add the name to the manifest.

A failure or Ctrl-C in 3 leaves only the part, which the next `ripe pull` of that model continues and
`ripe rm --partial` deletes; nothing half-written ever appears in ``blobs/`` or the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ripelm.models.blobstore import ManifestEntry, ModelStore, new_entry
from ripelm.models.catalog import CatalogEntry
from ripelm.models.downloader import fetch_to_part, resolve_remote
from ripelm.models.errors import ChecksumError, DownloadError


@dataclass
class PullResult:
    entry: ManifestEntry | None  # None for the bundled model
    downloaded: int  # bytes fetched in this run
    status: str  # "downloaded", "up to date", "linked" (blob already in the store), "bundled"


def _auth_headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    return {k: v for k, v in headers.items() if k.lower() == "authorization"}


def pull(
    entry: CatalogEntry,
    store: ModelStore,
    *,
    endpoint: str | None = None,
    retries: int = 2,
    progress: bool | None = None,
    notice: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> PullResult:
    if entry.bundled:
        return PullResult(None, 0, "bundled")
    current = store.get(entry.name)
    if current is not None and entry.sha256 and current.hex == entry.sha256:
        if store.blob_path(current.hex).is_file():
            return PullResult(current, 0, "up to date")

    remote = resolve_remote(entry.repo, entry.file, entry.revision, endpoint=endpoint)
    if entry.sha256 and remote.sha256 and remote.sha256 != entry.sha256:
        raise ChecksumError(
            f"the hub's {entry.file} at {entry.revision[:12]} has sha256 {remote.sha256}, but the catalog "
            f"expects {entry.sha256}; not downloading it"
        )
    want = entry.sha256 or remote.sha256
    if want is None:
        raise ChecksumError(
            f"no sha256 is known for {entry.repo}/{entry.file} (none in the catalog, none from the hub), "
            "so the download could not be verified; add `sha256` to its catalog entry"
        )
    origin = f"{entry.repo}/{entry.file}@{remote.commit or entry.revision}"

    if store.blob_path(want).is_file():
        record = new_entry(entry.name, want, store.blob_path(want).stat().st_size, "pull", origin)
        store.add(record)
        return PullResult(record, 0, "linked")

    store.ensure_dirs()
    part = store.downloads / f"{want}.part"
    before = part.stat().st_size if part.exists() else 0
    if before and notice:
        notice(f"resuming {entry.name} from a partial download")
    got = fetch_to_part(
        remote,
        part,
        label=entry.name,
        retries=retries,
        progress=progress,
        auth_headers=_auth_headers(),
        notice=notice,
        on_progress=on_progress,
    )
    size = part.stat().st_size
    if got != want:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"the download of {entry.name} is corrupt: sha256 {got}, expected {want}; "
            "it was discarded, nothing was added to the store"
        )
    if remote.size is not None and size != remote.size:  # pragma: no cover - the digest would differ
        part.unlink(missing_ok=True)
        raise DownloadError(f"the download of {entry.name} has {size} bytes, expected {remote.size}")
    store.adopt_blob(part, want)
    record = new_entry(entry.name, want, size, "pull", origin)
    store.add(record)
    return PullResult(record, max(0, size - before), "downloaded")
