"""An MCP server for the chat app's tool tests, over stdio with the `mcp` SDK's MCPServer.

Its tools leave traces the tests can check: `remember_word` appends the word to the file named by
$MCP_TEST_LOG (so a test sees the call happened in this process), `add` returns a sum.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("ripe-test")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return f"{a} + {b} = {a + b}"


@server.tool()
def remember_word(word: str) -> str:
    """Write a word into the test's log file."""
    with open(os.environ["MCP_TEST_LOG"], "a", encoding="utf-8") as f:
        f.write(word + "\n")
    return f"remembered {word!r} (pid {os.getpid()})"


if __name__ == "__main__":
    server.run("stdio")
