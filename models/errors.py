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


class QuantizeError(RipelmError):
    """`ripe quantize` cannot do what was asked (unknown type, unreadable tensor type, bad output path)."""


class StoreError(RipelmError):
    """The model store cannot be read or written (damaged manifest, permissions, a name clash...)."""


class DiskFullError(StoreError):
    """No room left for a model file (disk full, quota, or file size limit)."""


class CatalogError(RipelmError):
    """A user catalog file that cannot be read or has a bad entry."""


class DownloadError(RipelmError):
    """A model file could not be fetched (not found, network failure, server error, bad answer)."""


class ChecksumError(DownloadError):
    """The bytes (or the hub's record of them) do not have the sha256 the catalog expects."""
