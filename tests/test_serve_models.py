"""`GET /v1/models` of `ripe serve` (a separate process, through the official `openai` client) lists every
chat model of the local store it can load, the one it started with first and marked loaded; a model loaded
on demand by name is marked loaded afterwards; an embedding model of the store is left out of the chat
models. Ollama's `/api/tags` lists the whole store, `/api/ps` what is loaded."""

from __future__ import annotations

import gguf
import httpx
import numpy as np
import pytest
from openai_servers import ripe_serve

openai = pytest.importorskip("openai")

from ripelm.models.blobstore import ModelStore  # noqa: E402
from ripelm.models.gguf_file import open_gguf  # noqa: E402
from ripelm.models.store import BUNDLED_NAME, bundled_model_path  # noqa: E402


def embedding_gguf(path):
    """A header-only BERT embedding model (the listing reads headers, it never loads this one)."""
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_uint32("bert.pooling_type", 1)
    w.add_uint32("bert.context_length", 128)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_v1_models_lists_the_store_and_marks_the_loaded_ones(tmp_path, tiny_model_factory):
    store = ModelStore(tmp_path / "models")
    for name, layers in (("tiny:one", 2), ("tiny:two", 1)):
        store.import_file(tiny_model_factory(qtype="Q4_0", n_layers=layers), name,
                          validate=lambda p: open_gguf(p).close())  # fmt: skip
    embedding_gguf(tmp_path / "models" / "embedder.gguf")
    bundled = [BUNDLED_NAME] if bundled_model_path() is not None else []
    with ripe_serve("tiny:one", tmp_path, "--ctx", "512", "--kv-memory", "16M") as (url, _):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)

        def listing() -> dict[str, dict]:
            return {m.id: m.model_extra for m in c.models.list().data}

        first = listing()
        assert list(first)[0] == "tiny:one"  # clients that name no model take the first
        assert sorted(first) == sorted(["tiny:one", "tiny:two", *bundled])  # not the embedder
        assert first["tiny:one"] == {"kind": "chat", "loaded": True, "max_model_len": 512}
        assert first["tiny:two"] == {"kind": "chat", "loaded": False}
        r = c.chat.completions.create(model="tiny:two", messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=3, temperature=0)  # fmt: skip
        assert r.model == "tiny:two"
        after = listing()
        assert after["tiny:two"] == {"kind": "chat", "loaded": True, "max_model_len": 512}
        assert list(after)[0] == "tiny:one"
        base = url.removesuffix("/v1")
        tags = {m["name"] for m in httpx.get(f"{base}/api/tags", timeout=30).json()["models"]}
        assert tags == {"tiny:one", "tiny:two", "embedder", *bundled}
        ps = {m["name"] for m in httpx.get(f"{base}/api/ps", timeout=30).json()["models"]}
        assert ps == {"tiny:one", "tiny:two"}
