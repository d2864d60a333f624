"""The app layer's errors (chat store, config, model pool, the servers' answers, MCP tools).

Those a user can cause derive from `RipelmError` (models/errors.py), which the CLI prints as one line and
the server answers with its JSON error. `ApiError` is itself an HTTP answer (status, type, fields);
`EmbeddingsError` (a 400) and `McpError` (a tool call's failure, reported to the model) are caught where
they arise, so they stay apart from `RipelmError` as before.
"""

from ripelm.models.errors import RipelmError

__all__ = [
    "ApiError",
    "ChatStoreError",
    "ConfigError",
    "EmbeddingsError",
    "McpError",
    "NotFound",
    "PoolFullError",
]


class ChatStoreError(RipelmError):
    """The chat database cannot be opened, is from a newer ripelm, or a chat, message or memory does not
    exist."""


class EmbeddingsError(Exception):
    """A bad /v1/embeddings request: the server answers 400 with this message."""


class McpError(Exception):
    """A server that would not start or a call that failed at the transport (one line)."""


class ConfigError(RipelmError):
    """config.toml cannot be read or has a setting of the wrong kind."""


class PoolFullError(RipelmError):
    """No room in the memory budget while other models are busy (answered with a 503)."""


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.kind = status, kind
        self.extra = extra or {}  # more fields of the error object


class NotFound(RipelmError):
    """A model name the store does not have (answered with a 404)."""
