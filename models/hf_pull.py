"""`ripe pull hf.co/{user}/{repo}:{quant}`: any GGUF on the Hugging Face Hub, as Ollama and llama.cpp
name them, turned into a catalog entry that `pull` downloads like any other.

The repo's file list comes from the hub's model API with file metadata (`HfApi.model_info(...,
files_metadata=True)`): each file's size and Git LFS sha256, and the commit they belong to. The entry
pins that commit and carries that sha256, so `pull` checks the resolve headers and the downloaded bytes
against the hub's own metadata (same verification, resume and atomic store as catalog models).

The quant is read from the file name (`...-Q4_K_M.gguf`, `....Q8_0.gguf`); without `:{quant}`, Q4_K_M is
picked, else the closest in `PREFERENCE` (the 4-bit k-quants, then their neighbours by size and quality).
Projector files (`mmproj`) are not models; a model split into several files is refused (not supported yet).
"""

from __future__ import annotations

import re

from ripelm.models.catalog import CatalogEntry, lookup, normalize_name
from ripelm.models.downloader import DownloadError, hub_endpoint
from ripelm.models.errors import ModelNotFoundError

PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d_(?:K_[SMLX]L?|K|XXS|XS|S|M|NL|\d)|TQ\d_\d|BF16|F16|F32|MXFP4)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_K", "IQ4_XS", "IQ4_NL", "Q4_1", "Q4_0", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1",
    "Q5_0", "Q3_K_L", "Q3_K_M", "Q6_K", "Q3_K_S", "IQ3_M", "IQ3_XS", "Q8_0", "Q2_K", "IQ2_M", "IQ2_XS",
    "BF16", "F16", "F32",
)  # fmt: skip


def is_hf_name(name: str) -> bool:
    return name.strip().lower().startswith(PREFIXES)


def parse(name: str) -> tuple[str, str | None]:
    """'hf.co/user/repo:Q4_K_M' -> ('user/repo', 'Q4_K_M'); the quant is None when not given."""
    rest = name.strip()
    for p in PREFIXES:
        if rest.lower().startswith(p):
            rest = rest[len(p) :]
            break
    repo, _, quant = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelNotFoundError(f"'{name}' is not a Hugging Face model name (hf.co/USER/REPO[:QUANT])")
    return repo, (quant or None) if quant.lower() != "latest" else None


def quant_of(filename: str) -> str | None:
    found = QUANT_RE.findall(filename.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def pick(files: dict[str, str], want: str | None, repo: str) -> tuple[str, str]:
    """(quant, file) among {file: quant}: the one asked for, else Q4_K_M or the closest."""
    by_quant: dict[str, str] = {}
    for f, q in sorted(files.items()):
        by_quant.setdefault(q, f)
    if not by_quant:
        raise ModelNotFoundError(f"hf.co/{repo} has no GGUF model files")
    if want is not None:
        q = want.upper()
        if q not in by_quant:
            raise ModelNotFoundError(
                f"hf.co/{repo} has no {want} file (it has: {', '.join(sorted(by_quant))})"
            )
        return q, by_quant[q]
    for q in PREFERENCE:
        if q in by_quant:
            return q, by_quant[q]
    q = sorted(by_quant)[0]
    return q, by_quant[q]


def resolve(name: str, endpoint: str | None = None) -> CatalogEntry:
    """The catalog entry for an hf.co name, from the hub's model API (file list, sizes, LFS sha256)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, want = parse(name)
    endpoint = endpoint or hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True, timeout=30)
    except OfflineModeIsEnabled as e:
        raise DownloadError("HF_HUB_OFFLINE is set: cannot download; unset it to pull models") from e
    except GatedRepoError as e:
        raise DownloadError(
            f"hf.co/{repo} is gated: accept its conditions on the hub's page, then set HF_TOKEN"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise DownloadError(
            f"hf.co/{repo} was not found on the hub ({endpoint}), or it is private: if it is yours, "
            "set HF_TOKEN to a token that can read it"
        ) from e
    except HfHubHTTPError as e:
        code = e.response.status_code if getattr(e, "response", None) is not None else "?"
        raise DownloadError(f"the hub ({endpoint}) answered HTTP {code} for hf.co/{repo}") from e
    except OSError as e:  # connection refused, DNS: huggingface_hub's transport errors are OSErrors too
        raise DownloadError(f"cannot reach the hub at {endpoint}: {e}") from e
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = {}
    for f in siblings:
        if f.lower().endswith(".gguf") and "mmproj" not in f.lower():
            q = quant_of(f)
            if q is not None:
                files[f] = q
    quant, file = pick(files, want, repo)
    if SPLIT_RE.search(file):
        raise ModelNotFoundError(f"hf.co/{repo}'s {quant} is split into several files; not supported yet")
    s = siblings[file]
    sha = s.lfs.sha256 if s.lfs is not None else None
    size = s.lfs.size if s.lfs is not None else (s.size or 0)
    return CatalogEntry(
        normalize_name(f"hf.co/{repo}:{quant}"),
        repo,
        file,
        info.sha or "main",
        quant,
        size / 1e6,
        sha,
        source_note=f"the hub's LFS metadata of {repo}/{file}",
    )


def entry_for(name: str, user_catalog, endpoint: str | None = None) -> CatalogEntry | None:
    """What `ripe pull NAME` (and /api/pull) downloads: an hf.co name from the hub, else the catalog."""
    if is_hf_name(name):
        return resolve(name, endpoint)
    return lookup(name, user_catalog)
