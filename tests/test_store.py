"""The model catalog, the blob store and manifest, `ripe import` / `ripe rm` / `ripe models`, and how
names in the store resolve for `ripe run -m NAME`."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ripelm.models.blobstore import ModelStore, StoreError
from ripelm.models.catalog import BUILTIN, CatalogError, load_user_catalog, lookup
from ripelm.models.errors import ModelFormatError, ModelNotFoundError
from ripelm.models.gguf_file import open_gguf
from ripelm.models.store import list_models, resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RIPELM_HOME", str(tmp_path))
    return tmp_path


def validate(p: Path) -> None:
    open_gguf(p).close()


def store(home: Path) -> ModelStore:
    return ModelStore(home / "models")


def ripe(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RIPELM_HOME=str(home))
    cmd = [sys.executable, "-m", "ripelm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# ---- catalog ---------------------------------------------------------------------------------------


def test_builtin_catalog_is_consistent():
    names = {e.name for e in BUILTIN}
    assert {
        "smollm2:135m",
        "qwen2.5:0.5b",
        "qwen2.5:1.5b",
        "qwen2.5:7b",
        "llama3.2:1b",
        "llama3.2:3b",
    } <= names
    assert {"llama3.1:8b", "nomic-embed-text:v1.5"} <= names
    assert {"gemma3:270m", "gemma3:1b", "gemma3:4b", "phi4-mini:3.8b"} <= names
    assert lookup("phi4-mini").name == "phi4-mini:3.8b" and lookup("gemma3:1b").draft == "gemma3:270m"
    for e in BUILTIN:
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        # a commit pins the file; without a known commit, "main" with a digest (a re-upload fails the check)
        pinned = re.fullmatch(r"[0-9a-f]{40}", e.revision) or (e.revision == "main" and e.sha256)
        assert e.bundled or pinned, f"{e.name}: pin a commit or a digest"
        assert e.file.endswith(".gguf") and e.size_mb > 0
        if e.draft:
            draft = lookup(e.draft)
            assert draft is not None and draft.family.rstrip("0123456789.") == e.family.rstrip("0123456789.")
            assert draft.size_mb < e.size_mb


def test_bundled_entry_matches_the_bundled_file(bundled_model_path):
    e = lookup("smollm2:135m")
    assert e is not None and e.bundled
    data = bundled_model_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == e.sha256
    assert len(data) == round(e.size_mb * 1e6)


def test_lookup_by_family_and_case():
    assert lookup("smollm2").name == "smollm2:135m"
    assert lookup("Qwen2.5:0.5B").name == "qwen2.5:0.5b"
    assert lookup("nosuch:1b") is None
    with pytest.raises(ModelNotFoundError, match="several sizes; pick one: qwen2.5:0.5b"):
        lookup("qwen2.5")


def test_user_catalog_entries_and_errors(tmp_path):
    p = tmp_path / "catalog.toml"
    p.write_text(
        '["Mine:Q4"]\nrepo = "me/x"\nfile = "x.gguf"\nsha256 = "' + "AB" * 32 + '"\ndraft = "tiny"\n'
    )
    (e,) = load_user_catalog(p)
    assert (e.name, e.revision, e.sha256, e.draft) == ("mine:q4", "main", "ab" * 32, "tiny:latest")
    assert lookup("mine:q4", p) == e
    p.write_text('["m:1"]\nrepo = "me/x"\nfile = "x.gguf"\nsha256 = "123"\n')
    with pytest.raises(CatalogError, match="64 hex"):
        load_user_catalog(p)
    p.write_text('["m:1"]\nrepo = "me/x"\nfile = "x.gguf"\nsha = "1"\n')
    with pytest.raises(CatalogError, match="unknown keys: sha"):
        load_user_catalog(p)
    p.write_text('["m:1"]\nfile = "x.gguf"\n')
    with pytest.raises(CatalogError, match="needs a 'repo'"):
        load_user_catalog(p)
    p.write_text("not toml [")
    with pytest.raises(CatalogError, match="cannot read"):
        load_user_catalog(p)


# ---- import, names, rm -------------------------------------------------------------------------------


def test_import_resolve_share_and_remove(home, tiny_model_factory):
    src = tiny_model_factory(qtype="Q8_0")
    s = store(home)
    a = s.import_file(src, "tiny:latest", validate=validate)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert a.digest == f"sha256:{digest}" and a.source == "import"
    blob = s.blob_path(digest)
    assert blob.read_bytes() == src.read_bytes()
    assert resolve_model("tiny") == blob == resolve_model("tiny:latest")
    s.import_file(src, "again:v1", validate=validate)
    assert sorted(p.name for p in s.blobs.iterdir()) == [f"sha256-{digest}"]  # one copy for two names
    assert list(s.downloads.iterdir()) == []
    listed = {m.name: m for m in list_models()}
    assert listed["tiny:latest"].source == "import" and listed["smollm2:135m"].default
    assert s.remove("tiny:latest") == (a, False) and blob.exists()
    assert s.remove("again:v1")[1] is True and not blob.exists()
    with pytest.raises(ModelNotFoundError, match="not in the model store"):
        s.remove("again:v1")


def test_import_rejects_a_broken_gguf_and_stores_nothing(home, tiny_model_factory, tmp_path):
    good = tiny_model_factory(qtype="Q8_0").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(good[: len(good) // 2])  # tensor data cut off
    s = store(home)
    with pytest.raises(ModelFormatError):
        s.import_file(broken, "broken:latest", validate=validate)
    assert s.entries() == {} and not any(s.blobs.iterdir()) and not any(s.downloads.iterdir())
    p = ripe("import", str(broken), home=home)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("ripe: error: ") and len(p.stderr.strip().splitlines()) == 1
    assert s.entries() == {}


def test_import_name_clash_and_damaged_manifest(home, tiny_model_factory):
    src = tiny_model_factory(qtype="Q8_0")
    s = store(home)
    s.import_file(src, "t:1", validate=validate)
    with pytest.raises(StoreError, match="already in the store"):
        s.import_file(src, "t:1", validate=validate)
    s.manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="manifest .* is damaged"):
        resolve_model("t:1")


def test_unpulled_catalog_name_says_how_to_get_it(home):
    with pytest.raises(ModelNotFoundError, match=r"not downloaded yet: run `ripe pull llama3.2:1b`"):
        resolve_model("llama3.2:1b")
    with pytest.raises(ModelNotFoundError, match="unknown model 'zzz'"):
        resolve_model("zzz")


def test_cli_import_models_run_rm(home, tiny_model_factory):
    src = tiny_model_factory(qtype="Q8_0")
    imp = ripe("import", str(src), "--name", "tiny-test", home=home)
    assert imp.returncode == 0, imp.stderr
    assert "imported" in imp.stdout and "tiny-test:latest" in imp.stdout
    listed = ripe("models", "--paths", home=home)
    assert "tiny-test:latest" in listed.stdout and "import" in listed.stdout and "sha256-" in listed.stdout
    run = ripe("run", "-m", "tiny-test", "--temp", "0", "--max-tokens", "3", "Hello", home=home)
    assert run.returncode == 0, run.stderr  # random weights: any text will do, the name resolved
    (home / "config.toml").write_text('model = "tiny-test"\n')
    assert "* tiny-test:latest" in ripe("models", home=home).stdout
    rm = ripe("rm", "tiny-test", home=home)
    assert rm.returncode == 0 and "freed" in rm.stdout
    assert ripe("rm", "smollm2:135m", home=home).stderr.startswith("ripe: error: smollm2:135m is bundled")
