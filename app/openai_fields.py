"""OpenAI request fields beyond plain sampling: structured output, and the fields not honoured yet.

`response_format` (`json_object`, `json_schema`) and llama.cpp's server's extension fields `json_schema` and
`grammar` (GBNF) become the request's grammar (`SamplingParams.grammar`, enforced by grammar-constrained
sampling in the engine). A field the server cannot honour yet (logprobs, image parts, n > 1, the legacy
`functions`) is a 400 naming it: a client must never believe it worked.
"""

from __future__ import annotations

import json
from typing import Any

UNSUPPORTED = ("functions", "function_call", "audio", "modalities", "prediction")  # tools: openai_chat.py


def _error(message: str):  # noqa: ANN202 - the server's ApiError (imported late: it imports this module)
    from ripelm.server import ApiError

    return ApiError(400, message)


def check_fields(body: dict[str, Any]) -> None:
    """A 400 naming the first field of the request that is set but not supported."""
    for field in UNSUPPORTED:
        if body.get(field) not in (None, False, [], {}):
            raise _error(f"'{field}' is not supported yet")


def text_parts(messages: list) -> None:
    """Content parts of chat messages joined into text; any part that is not text is a 400 naming it."""
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        if not isinstance(parts, list):
            continue
        for j, p in enumerate(parts):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind != "text":
                raise _error(f"'messages[{i}].content[{j}].type' {kind!r} is not supported (text only)")
        m["content"] = "".join(p.get("text", "") for p in parts)


def grammar_from_body(body: dict[str, Any]) -> tuple[str, str] | None:
    """The request's structured-output grammar (checked: a bad one is a 400 naming its field), or None."""
    grammar, field = _grammar(body)
    if grammar is not None:
        from ripelm.runtime.errors import BadSamplingError
        from ripelm.runtime.grammar import validate_grammar

        try:
            validate_grammar(grammar)
        except BadSamplingError as e:
            raise _error(f"'{field}': {e}") from None
    return grammar


def _grammar(body: dict[str, Any]) -> tuple[tuple[str, str] | None, str]:
    fmt = body.get("response_format")
    given = [k for k in ("json_schema", "grammar") if body.get(k) is not None]
    if fmt is not None and fmt != {"type": "text"}:
        given.insert(0, "response_format")
    if len(given) > 1:
        raise _error(f"'{given[0]}' and '{given[1]}' both ask for structured output: send one")
    if body.get("grammar") is not None:
        if not isinstance(body["grammar"], str):
            raise _error("'grammar' must be a GBNF grammar as a string")
        return ("gbnf", body["grammar"]), "grammar"
    if body.get("json_schema") is not None:
        return ("json_schema", _schema_text(body["json_schema"], "json_schema")), "json_schema"
    if fmt is None:
        return None, ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return ("json_object", ""), "response_format"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise _error("'response_format.json_schema.schema' is required for type json_schema")
        field = "response_format.json_schema.schema"
        return ("json_schema", _schema_text(spec["schema"], field)), field
    raise _error(f"'response_format.type' {kind!r} is not supported (text, json_object or json_schema)")


def _schema_text(schema: Any, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise _error(f"'{field}' is not valid JSON") from None
    if not isinstance(schema, dict):
        raise _error(f"'{field}' must be a JSON schema object")
    return json.dumps(schema)
