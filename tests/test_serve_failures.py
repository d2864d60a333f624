"""An engine failure that is no RipelmError (a RuntimeError from a library, a bug) while `ripe serve`
generates: a non-streamed request answers 500 with a JSON error body, a stream ends with an OpenAI-style
error event (Ollama: an error line), the failure is logged, and the server keeps serving.

The engine is the real batched engine on a tiny model; a subclass makes its token stream raise after two
tokens, since the failure itself is what is tested."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

openai = pytest.importorskip("openai")

from ripelm.runtime.engine_backend import EngineBackend  # noqa: E402
from ripelm.server import Server  # noqa: E402


class FailingBackend(EngineBackend):
    fail = True

    def request_ids(self, req, stats, index=0):
        for i, tok in enumerate(super().request_ids(req, stats, index)):
            if self.fail and i == 2:
                raise RuntimeError("device lost")
            yield tok


@pytest.fixture(scope="module")
def served(tiny_model_factory):
    backend = FailingBackend(tiny_model_factory(qtype="Q4_0", n_layers=2), device="cpu", n_ctx=512,
                             kv_memory=16 << 20)  # fmt: skip
    server = Server(backend, host="127.0.0.1", port=0, api_key=None, model_name="tiny:test")
    server.start()
    yield f"http://127.0.0.1:{server.port}", backend
    server.close()
    backend.close()


ASK = dict(model="tiny:test", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=8)


def test_openai_routes_answer_500_or_an_error_event_and_log_it(served, caplog):
    base, backend = served
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    caplog.set_level(logging.ERROR, logger="ripelm.serve")
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(**ASK)
    assert e.value.status_code == 500
    assert e.value.body["message"] == "internal error: RuntimeError: device lost"
    assert e.value.body["type"] == "server_error"
    with pytest.raises(openai.APIError, match="internal error: RuntimeError: device lost"):
        for _ in c.chat.completions.create(**ASK, stream=True):
            pass
    with pytest.raises(openai.APIError, match="RuntimeError: device lost"):
        for _ in c.completions.create(model="tiny:test", prompt="Hi", max_tokens=8, stream=True):
            pass
    logged = [r for r in caplog.records if r.name == "ripelm.serve"]
    assert len(logged) == 3 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in logged)
    assert "POST /v1/chat/completions failed: RuntimeError: device lost" in logged[0].getMessage()
    backend.fail = False
    try:
        assert c.chat.completions.create(**ASK).choices[0].finish_reason in ("stop", "length")
    finally:
        backend.fail = True


def test_ollama_routes_answer_500_or_end_the_stream_with_an_error_line(served, caplog):
    base, _ = served
    caplog.set_level(logging.ERROR, logger="ripelm.serve")
    options = {"temperature": 0, "num_predict": 8}
    body = {"model": "tiny:test", "messages": ASK["messages"], "options": options}
    r = httpx.post(f"{base}/api/chat", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: device lost"}
    r = httpx.post(f"{base}/api/chat", json={**body, "stream": True}, timeout=60)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert r.status_code == 200 and lines[-1] == {"error": "internal error: RuntimeError: device lost"}
    assert not any(x.get("done") for x in lines)
    assert sum(r.name == "ripelm.serve" for r in caplog.records) == 2
