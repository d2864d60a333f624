"""The errors a user can cause by handing us a bad or unsupported model or input.

The CLI prints their message as one line and exits non-zero; anything else is a bug.
"""


class RipelmError(Exception):
    """Base of every user-facing error."""


class ModelFormatError(RipelmError):
    """The file is not a well-formed GGUF model (bad magic, truncated, out-of-range counts/offsets...)."""


class UnsupportedModelError(RipelmError):
    """The file is valid GGUF but its architecture or tensor types are not supported by the engine."""


class ModelNotFoundError(RipelmError):
    """A model name or path that resolves to nothing."""


class ModelFileChangedError(RipelmError):
    """The model file was truncated or rewritten on disk while an engine had it loaded."""
