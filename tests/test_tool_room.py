"""The chat's tool loop keeps a reply's tool turn inside a small context window (`--ctx 384`): on the real
engine with a tiny model whose calls are forced by grammar for as many rounds as it will go, the loop stops
offering tools with a one-line notice instead of overflowing, and a tool result too long for the room left
is cut with a marker (the longest prefix that fits) instead of failing the reply. The same through
`--engine openai` against `ripe serve --ctx 384` (a separate process), where the room is estimated."""

from __future__ import annotations

import pytest
from openai_servers import ripe_serve

from ripelm.assistant_tools.builtin import datetime_tool
from ripelm.assistant_tools.registry import Tool, ToolBox
from ripelm.runtime.engine_backend import EngineBackend
from ripelm.runtime.openai_backend import OpenAIBackend
from ripelm.runtime.sampling import SamplingParams
from ripelm.tool_loop import FULL_NOTICE, Forced, ToolLoop
from ripelm.tool_room import cut

CTX = 384
ASK = [{"role": "user", "content": "Read me the page, then tell me the time."}]
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.fixture(scope="module")
def small(tiny_model_factory):
    path = tiny_model_factory(qtype="Q4_0", n_layers=2)
    b = EngineBackend(path, device="cpu", n_ctx=CTX, kv_memory=16 << 20)
    yield b
    b.close()


def run_loop(backend, box: ToolBox, **kw) -> tuple[ToolLoop, list]:
    loop = ToolLoop(backend, ASK, SamplingParams(temperature=0, max_tokens=64), box, max_calls=50,
                    force=Forced("required", rounds=100), **kw)  # fmt: skip
    return loop, list(loop.events())


def test_calls_stop_with_a_notice_before_the_window_overflows(small):
    box = ToolBox()
    box.add(datetime_tool())
    box.set("current_datetime", True)
    loop, events = run_loop(small, box)
    notices = [e.text for e in events if e.kind == "notice"]
    assert notices == [FULL_NOTICE]
    assert loop.full and not loop.cut and 1 <= loop.calls_made < 50
    assert events[-1].kind == "done" and events[-1].stats is not None
    assert events[-1].stats.finish_reason in ("stop", "length")
    assert loop.prompt_tokens + 1 <= CTX  # the answer round's prompt fitted, with room to answer


def kept_of(text: str) -> int:
    return int(text.rsplit("after ", 1)[1].split(" characters")[0])


def test_an_over_long_result_is_cut_with_a_marker(small):
    page = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    box = ToolBox()
    box.add(Tool("read_page", "Reads the page.", NO_ARGS, run=lambda args: page))
    box.set("read_page", True)
    loop, events = run_loop(small, box)
    results = [e.result for e in events if e.kind == "result"]
    assert len(results) == 1 and results[0].ok  # no room for a second call after it
    kept = kept_of(results[0].content)
    assert 0 < kept < len(page) and results[0].content == cut(page, kept)  # page: over the toolbox's cap too
    assert loop.full and [e.text for e in events if e.kind == "notice"] == [FULL_NOTICE]
    assert events[-1].kind == "done" and events[-1].stats is not None
    room = loop._room()  # the cut is the longest that fits: one more character does not
    message = {"role": "tool", "tool_call_id": "x", "name": "read_page", "content": page}
    n = kept_of(room.fit_result(ASK, message))
    assert room.count([*ASK, {**message, "content": cut(page, n)}], []) <= room.limit
    assert room.count([*ASK, {**message, "content": cut(page, n + 1)}], []) > room.limit


def test_a_server_engine_stops_calls_by_its_stated_window(tmp_path, tiny_model_factory):
    path = tiny_model_factory(qtype="Q4_0", n_layers=2)
    with ripe_serve(path, tmp_path, "--ctx", str(CTX), "--kv-memory", "16M") as (url, _):
        backend = OpenAIBackend(url, api_key="x")
        try:
            assert backend.context_length == CTX  # from /v1/models' max_model_len
            box = ToolBox()
            box.add(datetime_tool())
            box.set("current_datetime", True)
            loop, events = run_loop(backend, box)
        finally:
            backend.close()
    assert [e.text for e in events if e.kind == "notice"] == [FULL_NOTICE]
    assert loop.full and 1 <= loop.calls_made < 50
    assert [e.kind for e in events].count("result") == loop.calls_made
    assert events[-1].kind == "done" and events[-1].stats is not None
