"""Ollama's API of `ripe serve` (run as a separate process) through the official `ollama` Python client:
list, show, ps, chat and generate (streamed and not), embed, pull from a loopback hub, copy, delete; and
the 400s that name an unsupported field."""

from __future__ import annotations

import json
import math
import urllib.request
from datetime import datetime

import pytest
from hub_server import LoopbackHub
from openai_servers import ripe_serve
from retrieval_helpers import make_home

ollama = pytest.importorskip("ollama")

from ripelm.models.blobstore import ModelStore  # noqa: E402
from ripelm.models.gguf_file import open_gguf  # noqa: E402
from ripelm.ollama_params import ThinkSplitter, parse_keep_alive  # noqa: E402

REPO, FILE = "someone/Pulled-GGUF", "pulled-Q8_0.gguf"
OPTS = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def hub(tiny_model_factory):
    server = LoopbackHub()
    server.add(REPO, FILE, tiny_model_factory(qtype="Q8_0", n_layers=1).read_bytes())
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_factory, hub):
    home = make_home(tmp_path_factory.mktemp("ollama-home"))
    tiny = tiny_model_factory(qtype="Q4_0", n_layers=2)
    ModelStore(home / "models").import_file(tiny, "tiny:test", validate=lambda p: open_gguf(p).close())
    (home / "catalog.toml").write_text(f'["tiny:pulled"]\nrepo = "{REPO}"\nfile = "{FILE}"\nquant = "Q8_0"\n')
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "0"}
    with ripe_serve("tiny:test", home, "--ctx", "512", embeddings=True, env=env) as (url, _proc):
        base = url.removesuffix("/v1")
        yield ollama.Client(host=base), base, home


def test_version_list_show_and_ps(served):
    client, base, _ = served
    with urllib.request.urlopen(f"{base}/api/version") as r:
        assert json.loads(r.read())["version"].count(".") == 2
    with urllib.request.urlopen(f"{base}/") as r:
        assert r.read() == b"Ollama is running"
    listed = {m.model: m for m in client.list().models}
    assert {"tiny:test", "smollm2:135m"} <= set(listed)
    tiny = listed["tiny:test"]
    assert tiny.details.quantization_level == "Q4_0" and tiny.details.format == "gguf"
    assert isinstance(tiny.modified_at, datetime) and tiny.size > 0 and len(tiny.digest) == 64
    assert listed["smollm2:135m"].details.parameter_size.endswith("M")

    shown = client.show("tiny:test")
    assert shown.modelinfo["general.architecture"] == shown.details.family
    assert shown.modelinfo["general.parameter_count"] > 0
    assert shown.capabilities == ["completion"] and isinstance(shown.template, str)
    assert client.show("smollm2:135m").details.quantization_level == "Q4_1"
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope:missing")
    assert e.value.status_code == 404

    running = client.ps().models
    assert [m.model for m in running] == ["tiny:test"]
    assert running[0].context_length == 512 and isinstance(running[0].expires_at, datetime)
    assert running[0].digest == tiny.digest
    assert running[0].size > tiny.size  # as Ollama's: the file (/api/tags' size) and the K/V cache


def test_chat_streamed_and_not_give_the_same_answer(served):
    client = served[0]
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat(model="tiny:test", messages=msgs, options=OPTS)
    assert isinstance(whole, ollama.ChatResponse) and whole.done and whole.message.role == "assistant"
    assert whole.message.content and 1 <= whole.eval_count <= 8 and whole.prompt_eval_count > 5
    assert whole.done_reason in ("stop", "length") and whole.total_duration > 0
    parts = list(client.chat(model="tiny:test", messages=msgs, options=OPTS, stream=True))
    assert len(parts) >= 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_streamed_and_not_with_context(served):
    client = served[0]
    whole = client.generate(model="tiny:test", prompt="Once upon a time", options=OPTS)
    assert isinstance(whole, ollama.GenerateResponse) and whole.done and whole.response
    assert whole.context and all(isinstance(t, int) for t in whole.context)
    parts = list(client.generate(model="tiny:test", prompt="Once upon a time", options=OPTS, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model="tiny:test", prompt="Once upon a time", raw=True, options=OPTS)
    assert raw.done and raw.prompt_eval_count < whole.prompt_eval_count  # no chat template around it
    loaded = client.generate(model="tiny:test", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"options": {"mirostat": 2}}, "options.mirostat"),
        ({"options": {"no_such_option": 1}}, "options.no_such_option"),
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"format": {"type": "nope"}}, "format"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"think": True}, "think"),
    ],
)
def test_unsupported_fields_are_a_400_naming_them(served, kwargs, field):
    client = served[0]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny:test", messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert e.value.status_code == 400 and f"'{field}'" in e.value.error
    # neutral values of options we do not implement, and resource hints, are accepted
    ok = client.chat(
        model="tiny:test",
        messages=[{"role": "user", "content": "hi"}],
        options={**OPTS, "mirostat": 0, "num_ctx": 4096, "num_thread": 2},
        keep_alive="5m",
        think=False,
    )
    assert ok.done


def test_an_unknown_model_is_a_404(served):
    with pytest.raises(ollama.ResponseError) as e:
        served[0].chat(model="nope:missing", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "nope:missing" in e.value.error


def test_embed(served):
    client = served[0]
    out = client.embed(model="all-minilm:l6-v2", input=["The sea is blue.", "Paris is in France."])
    assert isinstance(out, ollama.EmbedResponse) and len(out.embeddings) == 2
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-3) for v in out.embeddings)
    short = client.embed(model="all-minilm:l6-v2", input="The sea is blue.", dimensions=64)
    assert len(short.embeddings[0]) == 64 and out.prompt_eval_count > 0
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny:test", input="x")
    assert e.value.status_code == 400 and "'model'" in e.value.error


def test_pull_copy_and_delete(served, hub):
    client, _, home = served
    steps = list(client.pull("tiny:pulled", stream=True))
    assert all(isinstance(s, ollama.ProgressResponse) for s in steps)
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    sizes = [s for s in steps if s.total]
    assert sizes and sizes[-1].completed == sizes[-1].total == len(hub.state.files[(REPO, FILE)])
    store = ModelStore(home / "models")
    assert store.get("tiny:pulled").hex == hub.state.sha256(REPO, FILE)
    assert not store.partial_downloads()
    assert client.pull("tiny:pulled").status == "success"  # not streamed: the last status

    assert client.copy("tiny:pulled", "tiny:copy").status == "success"
    names = {m.model for m in client.list().models}
    assert {"tiny:pulled", "tiny:copy"} <= names
    assert client.show("tiny:copy").details.quantization_level == "Q8_0"
    assert client.delete("tiny:copy").status == "success"
    assert "tiny:copy" not in {m.model for m in client.list().models}
    assert store.path_of(store.get("tiny:pulled")).is_file()  # the blob is still used by tiny:pulled
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny:copy")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("nothing:known")
    assert e.value.status_code == 404


def test_think_splitter_and_keep_alive_parsing():
    s = ThinkSplitter()
    pieces = [s.feed(t) for t in ["<thi", "nk>plan it", "</th", "ink>\n\nThe answer", " <think>is 4"]]
    pieces.append(s.flush())
    assert "".join(p[0] for p in pieces) == "plan it"
    assert "".join(p[1] for p in pieces) == "\n\nThe answer <think>is 4"
    assert parse_keep_alive("5m") == 300 and parse_keep_alive(0) == 0 and parse_keep_alive("-1") is None
    assert parse_keep_alive("1.5h") == 5400 and parse_keep_alive(30) == 30
