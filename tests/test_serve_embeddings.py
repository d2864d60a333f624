"""`/v1/embeddings` of `ripe serve` through the official `openai` client, with the real default embedder."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
from retrieval_helpers import embedder_gguf, make_home

openai = pytest.importorskip("openai")

from ripelm.embeddings_api import EmbeddingsApi  # noqa: E402
from ripelm.runtime.engine_backend import EngineBackend  # noqa: E402
from ripelm.runtime.openai_backend import OpenAIBackend  # noqa: E402
from ripelm.runtime.retrieval.embedder import Embedder  # noqa: E402
from ripelm.server import Server  # noqa: E402

KEY = "emb-key"
TEXTS = [
    "Paged attention stores the KV cache in fixed-size blocks.",
    "The capital of France is Paris.",
    "Speculative decoding drafts tokens with a small model.",
]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return embedder_gguf(make_home(tmp_path_factory.mktemp("serve-emb")))


@pytest.fixture(scope="module")
def served(tiny_model_factory, gguf):
    backend = EngineBackend(tiny_model_factory(qtype="Q4_0", n_layers=2), device="cpu", n_ctx=512)
    server = Server(
        backend,
        host="127.0.0.1",
        port=0,
        api_key=KEY,
        model_name="tiny:test",
        embeddings=EmbeddingsApi(str(gguf), workers=1),
    )
    server.start()
    yield server
    server.close()
    backend.close()


@pytest.fixture(scope="module")
def direct(gguf):
    e = Embedder(gguf, workers=1)
    yield e
    e.close()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)


def test_full_and_truncated_embeddings_through_the_openai_client(served, direct):
    c = client(served)
    full = c.embeddings.create(model="any", input=TEXTS)  # the client asks for base64 by default
    got = np.array([d.embedding for d in full.data], dtype=np.float32)
    assert got.shape == (3, direct.dim) and [d.index for d in full.data] == [0, 1, 2]
    np.testing.assert_allclose(got, direct.embed(TEXTS), atol=1e-6)
    assert full.usage.prompt_tokens > 0

    short = c.embeddings.create(model="any", input=TEXTS, dimensions=64, encoding_format="float")
    cut = np.array([d.embedding for d in short.data], dtype=np.float32)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    want = got[:, :64] / np.linalg.norm(got[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, want, atol=1e-5)
    # the truncated vectors still rank the related text first
    q = c.embeddings.create(model="any", input="Which city is France's capital?", dimensions=64)
    qv = np.array(q.data[0].embedding, dtype=np.float32)
    assert int(np.argmax(cut @ qv)) == 1


def test_single_string_and_token_ids(served, direct):
    c = client(served)
    one = c.embeddings.create(model="any", input=TEXTS[1], encoding_format="float")
    assert len(one.data) == 1
    ids = direct._models[0].tokenize(TEXTS[1].encode(), add_bos=False, special=False)
    by_ids = c.embeddings.create(model="any", input=[ids], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, by_ids.data[0].embedding, atol=1e-4)


def test_models_lists_the_embedder(served, gguf):
    models = client(served).models.list().data
    assert [(m.id, m.model_extra["kind"]) for m in models] == [
        ("tiny:test", "chat"),
        (gguf.stem, "embedding"),
    ]
    # what `--engine openai` (ripe run, the chat app's model picker) offers as chat models
    assert OpenAIBackend(f"http://127.0.0.1:{served.port}", api_key=KEY).list_models() == ["tiny:test"]


@pytest.mark.parametrize(
    "body,message",
    [
        ({"input": TEXTS, "dimensions": 0}, "positive integer"),
        ({"input": TEXTS, "dimensions": 100_000}, "dimensional vectors"),
        ({"input": []}, "empty"),
        ({"input": [""]}, "empty"),
        ({"input": 42}, "'input' must be"),
        ({"input": [[10**9]]}, "outside the vocabulary"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_requests_are_400_with_a_message(served, body, message):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request(
        "POST",
        "/v1/embeddings",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    assert resp.status == 400 and message in err["message"]


def test_a_missing_embedder_is_a_clear_503(tiny_model_factory, tmp_path):
    backend = EngineBackend(tiny_model_factory(qtype="Q4_0", n_layers=2), device="cpu", n_ctx=256)
    missing = tmp_path / "nope.gguf"
    missing.write_bytes(b"not a gguf")
    api = EmbeddingsApi(str(missing))
    server = Server(backend, host="127.0.0.1", port=0, api_key=None, model_name="t", embeddings=api)
    server.start()
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(model="any", input="hi")
        assert e.value.status_code == 503 and "embeddings are unavailable" in str(e.value)
    finally:
        server.close()
        backend.close()
