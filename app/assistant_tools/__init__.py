"""Tools the chat app offers the model: a registry with schemas and on/off choices (`registry`), the file
sandbox (`files`), the built-in tools (`builtin`), MCP servers over stdio (`mcp_client`) and the settings
from config.toml and per chat (`settings`). The turn loop that runs them is `ripelm.tool_loop`."""
