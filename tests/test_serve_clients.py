"""Client libraries from PyPI against `ripe serve` (a separate process) on the bundled model: `instructor`
extracts a Pydantic model (through a forced tool call, and through a JSON schema), and the OpenAI Agents SDK
runs an agent whose tool is called with valid arguments and whose result reaches the final answer.

instructor pins versions ripelm's environment does not use (rich < 15, jiter < 0.15), so it runs from its own
virtual environment, `.venv-instructor` (packaging/install_test_tools.sh makes it), as a user's program
would; set RIPELM_INSTRUCTOR_PYTHON to another interpreter that has it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from openai_servers import ripe_serve

ROOT = Path(__file__).resolve().parent.parent
EXTRACT = """
import json, sys
import instructor, openai
from pydantic import BaseModel, Field

class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)
    is_capital: bool

mode = {"tools": instructor.Mode.TOOLS, "json_schema": instructor.Mode.JSON_SCHEMA}[sys.argv[2]]
client = instructor.from_openai(openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0), mode=mode)
city = client.chat.completions.create(
    model="smollm2:135m", response_model=City, max_retries=1, temperature=0, max_tokens=200,
    messages=[{"role": "user", "content": "Paris is the capital of France and has about 2 million people."}],
)
print(json.dumps({"type": type(city).__name__, **city.model_dump()}))
"""


def instructor_python() -> str:
    python = os.environ.get("RIPELM_INSTRUCTOR_PYTHON") or str(ROOT / ".venv-instructor" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no instructor environment at {python}: run packaging/install_test_tools.sh")
    return python


def test_instructor_extracts_a_pydantic_model(tmp_path):
    python = instructor_python()
    with ripe_serve(None, tmp_path, "--ctx", "2048") as (url, _):
        for mode in ("tools", "json_schema"):
            cmd = [python, "-c", EXTRACT, url, mode]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            city = json.loads(out.stdout)
            assert city["type"] == "City" and city["name"] and isinstance(city["is_capital"], bool), city


def test_openai_agents_sdk_runs_an_agent_with_a_tool(tmp_path):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    seen: list[str] = []

    @agents.function_tool
    def lookup_code(city: str) -> str:
        """Look up the secret code of a city.

        Args:
            city: The city's name.
        """
        seen.append(city)
        return "The secret code is 4321."

    agents.set_tracing_disabled(True)  # no trace upload to OpenAI
    with ripe_serve(None, tmp_path, "--ctx", "2048") as (url, _):
        model = agents.OpenAIChatCompletionsModel(
            model="smollm2:135m", openai_client=AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        )
        agent = agents.Agent(
            name="codes",
            instructions="You answer with the secret code of a city. Use the tool, then say the code.",
            tools=[lookup_code],
            model=model,
            model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        )
        result = asyncio.run(agents.Runner.run(agent, "What is the secret code of Paris?", max_turns=4))
    assert seen and all(isinstance(c, str) and c for c in seen)  # called, with arguments valid for its schema
    assert "4321" in result.final_output, result.final_output
