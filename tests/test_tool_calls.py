"""Tool-call parsing per family on the real chat templates of the catalog's models (Qwen2.5, Qwen3, Llama
3.1/3.2, Mistral Nemo and Small 3.2, from llama.cpp's source tree: packaging/install_test_tools.sh puts
them in tests/data/chat_templates): each template renders an assistant turn with calls, and the parser gets
the same calls back from that text, whole and streamed in pieces of every size; grammars for forced calls
compile for both engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ripelm.runtime.chat_template import ChatTemplate
from ripelm.runtime.reasoning import ThinkSplitter
from ripelm.runtime.tool_calls import ToolParser, parser_for, template_messages
from ripelm.runtime.tool_grammar import call_grammar

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}  # fmt: skip
TOOLS = [WEATHER, TIME]
CALLS = [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "Europe/Paris"})]

BOT, EOT = "<|begin_of_text|>", "<|eot_id|>"
# template file, family, bos, eos, the text that ends an assistant turn, whether it renders parallel calls
MODELS = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", "hermes", "", "<|im_end|>", "<|im_end|>", True),
    "qwen3": ("Qwen-Qwen3-0.6B", "hermes", "", "<|im_end|>", "<|im_end|>", True),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct", "llama3", BOT, EOT, EOT, False),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct", "llama3", BOT, EOT, EOT, False),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", "<s>", "</s>", "</s>", True),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506", "mistral", "<s>", "</s>", "</s>", True),
}  # fmt: skip


def template(model: str) -> ChatTemplate:
    path = TEMPLATES / f"{MODELS[model][0]}.jinja"
    if not path.exists():
        pytest.skip(f"{path} is missing: packaging/install_test_tools.sh extracts llama.cpp's templates")
    _, _, bos, eos, *_ = MODELS[model]
    return ChatTemplate(path.read_text(), bos_token=bos, eos_token=eos)


def assistant_text(model: str, calls: list[tuple[str, dict]], content: str = "") -> str:
    """What the model would generate for `calls`: the template's rendering of that assistant turn."""
    tpl, parser = template(model), parser_for(template(model).source)
    user = [{"role": "user", "content": "Weather and time in Paris?"}]
    tool_calls = [
        {"id": f"call{i}abcd", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)
    ]
    prompt = parser.render(tpl, user, TOOLS)
    turn = [{"role": "assistant", "content": content, "tool_calls": tool_calls}]
    full = tpl.render(template_messages(user + turn, parser.family), add_generation_prompt=False, tools=TOOLS)
    assert full.startswith(prompt[: len(prompt) - 40]), "the template renders the prompt differently"
    turn = full[len(prompt) :] if full.startswith(prompt) else full[full.rfind("assistant") :]
    end = turn.find(MODELS[model][4])
    turn = turn if end < 0 else turn[:end]
    if turn.startswith("<think>"):  # Qwen3 writes its (here empty) thinking block first
        splitter = ThinkSplitter()
        turn = splitter.feed(turn)[1] + splitter.flush()[1]
    return turn


def check_calls(got, calls) -> None:
    assert [(c.name, c.arguments) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("model", list(MODELS))
def test_family_is_read_from_the_template(model):
    assert parser_for(template(model).source).family == MODELS[model][1]


@pytest.mark.parametrize("model", list(MODELS))
def test_template_renders_the_tools(model):
    tpl = template(model)
    prompt = parser_for(tpl.source).render(tpl, [{"role": "user", "content": "Weather in Paris?"}], TOOLS)
    assert "get_weather" in prompt and "Current weather in a city" in prompt


@pytest.mark.parametrize("model", list(MODELS))
def test_parse_rendered_calls_whole_and_streamed(model):
    parallel = MODELS[model][5]
    calls = CALLS if parallel else CALLS[:1]
    text = assistant_text(model, calls)
    if not parallel:  # Llama 3's template renders one call per turn; several are written `;`-separated
        text = text + "; " + assistant_text(model, CALLS[1:]).strip()
        calls = CALLS
    parser = parser_for(template(model).source)
    content, got = parser.parse(text)
    assert content == ""
    check_calls(got, calls)
    for size in (1, 2, 3, 7, 1000):
        s = parser.stream()
        events = []
        for i in range(0, len(text), size):
            events += s.feed(text[i : i + size])
        events += s.finish()
        check_calls([e.call for e in events if e.kind == "call"], calls)
        leaked = "".join(e.text for e in events if e.kind == "text")
        assert leaked.strip() == "", (size, leaked)


@pytest.mark.parametrize("model", ["qwen2.5", "qwen3", "mistral-nemo"])
def test_text_before_the_calls_streams_as_text(model):
    text = assistant_text(model, CALLS, content="Let me look that up.")
    if model.startswith("mistral"):  # its template drops the text of a turn with calls
        text = "Let me look that up." + text
    parser = parser_for(template(model).source)
    content, got = parser.parse(text)
    assert content == "Let me look that up."
    check_calls(got, CALLS)
    s = parser.stream()
    first = s.feed(text[:12])
    assert [e.text for e in first] == [text[:12]]  # plain text is not held back


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "generic"])
def test_plain_answers_and_broken_calls_stay_text(family):
    p = ToolParser(family)
    assert p.parse("The weather is fine.") == ("The weather is fine.", [])
    broken = {"hermes": '<tool_call>\n{"name": "get_weather", "argu\n</tool_call>',
              "generic": "<tool_call>not json</tool_call>",
              "llama3": '{"city": "Paris"}', "mistral": "[TOOL_CALLS]oops"}[family]  # fmt: skip
    assert p.parse(broken) == (broken, [])


def test_hermes_call_cut_off_before_its_closing_tag_is_still_a_call():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}'
    content, calls = ToolParser("hermes").parse(text)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_time", {"tz": "UTC"})]


def test_tool_results_and_earlier_calls_render_on_the_next_turn():
    for model in MODELS:
        tpl = template(model)
        parser = parser_for(tpl.source)
        calls = CALLS if MODELS[model][5] else CALLS[:1]
        msgs = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}x", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                for i, (n, a) in enumerate(calls)]},
            *[{"role": "tool", "tool_call_id": f"call_{i}x", "content": f"result {i}: 21 C"}
              for i in range(len(calls))],
        ]  # fmt: skip
        prompt = parser.render(tpl, msgs, TOOLS)
        assert "result 0: 21 C" in prompt and "Paris" in prompt, model


def test_generic_template_gets_a_system_note_and_history_as_text():
    tpl = ChatTemplate(None)  # ChatML, knows no tools
    parser = parser_for(tpl.source)
    assert parser.family == "generic"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]  # fmt: skip
    prompt = parser.render(tpl, msgs, TOOLS)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert '"name": "get_weather", "arguments": {"city": "Oslo"}' in prompt
    assert "<tool_response>\n-3 C\n</tool_response>" in prompt


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "generic"])
def test_forcing_grammars_compile_for_both_engines(family):
    from llama_cpp.llama_grammar import LlamaGrammar
    from llguidance import LLMatcher

    from ripelm.runtime.grammar import validate_grammar

    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        kind, text = call_grammar(family, TOOLS, choice, syntax="lark")
        assert kind == "lark" and not LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(text))
        validate_grammar(call_grammar(family, TOOLS, choice, syntax="gbnf"))  # llguidance reads GBNF too
        LlamaGrammar.from_string(call_grammar(family, TOOLS, choice, syntax="gbnf")[1], verbose=False)


def test_chat_plan_forces_calls_in_the_engine_grammar_syntax():
    from ripelm.openai_chat import plan_chat
    from ripelm.runtime.sampling import SamplingParams

    class Backend:  # what plan_chat reads of a backend
        def __init__(self, name: str):
            self.name, self.template = name, template("qwen2.5")

    ask = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}
    for engine, kind in (("native", "lark"), ("llama.cpp", "gbnf")):
        params = SamplingParams()
        required = {**ask, "tool_choice": "required", "parallel_tool_calls": None}  # null: the default
        plan = plan_chat(Backend(engine), required, params)
        assert params.grammar[0] == kind and "<tool_call>" in params.grammar[1]
        assert plan.parser is not None and "get_weather" in plan.prompt
    params = SamplingParams()
    assert plan_chat(Backend("native"), ask, params).parser is not None and params.grammar is None  # auto
    none = plan_chat(Backend("native"), {**ask, "tool_choice": "none"}, params)
    assert none.parser is None and "get_weather" not in none.prompt
